"""Quoting for nginx, systemd and supervisord syntax: the one place where user values are escaped.

Every value that reaches a rendered file passes through one of these
functions (as Jinja filters), which return `Quoted`: the template
environment's finalize refuses any other string (vfgen/render.py). Control
characters are refused everywhere: no format below can carry a newline
safely, and config validation rejects them first, so reaching this check
means a bug in validation.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

# Shared with config.py and launch.py, so validation and quoting agree on what they refuse.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
SURROGATES = re.compile(r"[\ud800-\udfff]")  # lone surrogates: no UTF-8 file can hold one
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class QuotingError(ValueError):
    """A value cannot be represented safely in the target syntax."""


class Quoted(str):
    """Text already in its target syntax. Only this module makes one: the templates'
    finalize lets a Quoted (or an int) reach the output and refuses a plain str."""

    __slots__ = ()


def template_output(parts: Iterable[str]) -> Quoted:
    """What a template or macro produced: its own text and values that passed its finalize
    (Quoted or int), so quoted by construction (render.py's environment joins with this)."""
    return Quoted("".join(parts))


def rstrip(value: Quoted) -> Quoted:
    """Quoted text without its trailing blanks (a macro's last newline)."""
    if not isinstance(value, Quoted):
        raise QuotingError(f"rstrip: {value!r} is not quoted text")
    return Quoted(value.rstrip())


def comment(value: object) -> Quoted:
    """Text inside a `#` or `;` comment line (nginx, systemd, supervisord, YAML): one line, no control character."""
    return Quoted(_refuse_control(str(value), "comment"))


def _refuse_control(value: str, where: str) -> str:
    if not isinstance(value, str):
        value = str(value)
    if CONTROL_CHARS.search(value):
        raise QuotingError(f"{where}: control character in {value!r}")
    return value


# --- nginx -------------------------------------------------------------------
# Inside a double-quoted nginx string the parser turns \" into " and \\ into \;
# every other character is literal, except that `$name` is expanded in places
# that take variables (return text, paths). There is no escape for `$`, so a
# value meant literally may not contain one.


def nginx_str(value: object) -> Quoted:
    """A double-quoted nginx string whose content is exactly `value` (no `$` allowed)."""
    text = _refuse_control(str(value), "nginx string")
    if "$" in text:
        raise QuotingError(f"nginx string: '$' would expand a variable in {text!r}")
    return Quoted('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


_NGINX_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def nginx_vars(parts: Iterable[tuple[str, str]]) -> Quoted:
    """A double-quoted nginx string of literal text, variables and captures: ("text", "a|"), ("var", "name"), ("capture", "1").

    Literal parts may not hold `$`; variable names are checked, and written as
    ${name} so that the text after one cannot extend its name.
    """
    out = []
    for kind, value in parts:
        if kind == "var":
            if not _NGINX_VAR.fullmatch(value):
                raise QuotingError(f"nginx variable name {value!r} is not [A-Za-z0-9_]")
            out.append("${" + value + "}")
        elif kind == "capture":
            if not re.fullmatch(r"[1-9]", value):
                raise QuotingError(f"regex capture {value!r} is not 1-9")
            out.append("$" + value)
        elif kind == "text":
            out.append(nginx_str(value)[1:-1])
        else:
            raise QuotingError(f"nginx string part kind {kind!r}")
    return Quoted('"' + "".join(out) + '"')


def nginx_var(name: str) -> Quoted:
    """`$name`: a reference to an nginx variable, its name checked."""
    if not _NGINX_VAR.fullmatch(name):
        raise QuotingError(f"nginx variable name {name!r} is not [A-Za-z0-9_]")
    return Quoted("$" + name)


_NGINX_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def nginx_name(value: str) -> Quoted:
    """A bare nginx name: an upstream, a zone, a log format, a variable prefix (letters, digits, '_', '.', '-')."""
    if not _NGINX_NAME.fullmatch(value):
        raise QuotingError(f"nginx name {value!r} is not [A-Za-z0-9_.-]")
    return Quoted(value)


# One bare nginx token: an address (127.0.0.1:9100, [::1]:8000), a size (30m), a rate
# (10r/s), a path (/metrics). nginx ends a bare token at whitespace, ';', '{' or '}', and
# reads quotes, '$', '#' and '\\' specially: none of these may appear.
_NGINX_TOKEN = re.compile(r"[A-Za-z0-9_.:/\[\]@%+,=-]+")


def nginx_token(value: object) -> Quoted:
    text = str(value)
    if isinstance(value, bool) or not _NGINX_TOKEN.fullmatch(text):
        raise QuotingError(f"nginx token {text!r} may hold only [A-Za-z0-9_.:/[]@%+,=-]")
    return Quoted(text)


def nginx_log_format(fields: Iterable[tuple[str, str]]) -> Quoted:
    """The single-quoted escape=json log_format string of a JSON object: (key, variable name) pairs."""
    members = []
    for key, variable in fields:
        if not _NGINX_VAR.fullmatch(key):
            raise QuotingError(f"log field name {key!r} is not [A-Za-z0-9_]")
        members.append(f'"{key}":"{nginx_var(variable)}"')
    return Quoted("'{" + ",".join(members) + "}'")


def nginx_regex(pattern: str) -> Quoted:
    """A double-quoted nginx string holding a regex verbatim (map keys are never variable-expanded)."""
    text = _refuse_control(pattern, "nginx regex")
    return Quoted('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')


def nginx_exact_key(value: str) -> Quoted:
    """A map key matching exactly `value`, as an anchored regex: regex keys are not hashed,
    so no name length can overflow map_hash_bucket_size (64 bytes, set only in nginx.conf)."""
    return nginx_regex(f"~^{pcre_literal(value)}$")


def pcre_literal(value: str) -> str:
    """Escape `value` so PCRE matches it literally (byte for byte, unicode included)."""
    return "".join(c if c.isalnum() or c == "_" or ord(c) > 127 else "\\" + c for c in value)


def json_string_pcre(value: str, every_escape: bool = True) -> str:
    """PCRE matching the raw content of a JSON string that decodes to `value`.

    Each character may come raw or escaped, as JSON allows: \\uXXXX in either hex
    case (UTF-16 surrogate pairs above U+FFFF), and \\/ for '/'. Encoders do
    escape: Python's json.dumps every non-ASCII character, Go's encoding/json
    '<', '>' and '&', PHP '/'. With every_escape=False only those forms are
    accepted for ASCII characters (a shorter pattern, for very long names);
    non-ASCII characters always accept both forms.
    """
    def hex_class(unit: str) -> str:
        return "".join(f"[{d.lower()}{d.upper()}]" if d.isalpha() else d for d in unit)

    def escapes(char: str) -> list[str]:
        data = char.encode("utf-16-be")  # surrogate pairs above U+FFFF
        forms = ["".join("\\\\u" + hex_class(data[i:i + 2].hex()) for i in range(0, len(data), 2))]
        if char == "/":
            forms.append("\\\\/")
        return forms

    out = []
    for char in value:
        if ord(char) > 127 or every_escape or char in _ENCODER_ESCAPED:
            out.append("(?:" + "|".join([pcre_literal(char), *escapes(char)]) + ")")
        else:
            out.append(pcre_literal(char))
    return "".join(out)


# ASCII characters common encoders escape by default: Go (<, >, &), PHP (/).
_ENCODER_ESCAPED = frozenset("<>&/")
# nginx reads its config in 4096-byte buffers and refuses a longer token
# ("too long parameter"); a map key has to fit, quotes and escapes included.
NGINX_TOKEN_MAX = 4000


def nginx_regex_fits(pattern: str) -> bool:
    return len(nginx_regex(pattern)) <= NGINX_TOKEN_MAX


def nginx_json(value: object, numbers: dict[int, str] | None = None) -> Quoted:
    """A JSON document as a double-quoted nginx string (ASCII-only, so bytes are predictable).

    '$' can only occur inside JSON strings, where `\\u0024` means the same to
    every JSON reader and nginx sees no variable. `numbers` maps placeholder
    numbers (a member's whole value) to nginx variables holding digits, which
    nginx fills in per request.
    """
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), sort_keys=False).replace("$", "\\u0024")
    out = nginx_str(text)
    for number, variable in (numbers or {}).items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
            raise QuotingError(f"nginx variable name {variable!r} is not valid")
        out = re.sub(rf":{number}(?=[,}}\]])", f":${{{variable}}}", out)
    return Quoted(out)


def nginx_api_key_entry(key: str) -> Quoted:
    """A map entry matching `Authorization: Bearer <key>` exactly.

    A regex, because plain map keys compare case-insensitively (seen with
    nginx 1.22), which would make `ABC...` and `abc...` the same key. The
    scheme is case-insensitive, as RFC 9110 says; the key is not.
    """
    return Quoted(nginx_regex("~^(?i:Bearer) " + pcre_literal(key) + "$") + " 1;")


# --- systemd -----------------------------------------------------------------
# systemd unquotes ExecStart= words C-style inside double quotes, expands `%`
# specifiers everywhere and `$VAR` in command lines; `%%` and `$$` are literal.


def systemd_word(value: object) -> Quoted:
    text = _refuse_control(str(value), "systemd word")
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return Quoted(f'"{text}"')


def systemd_exec(argv: Iterable[object]) -> Quoted:
    """A command line for ExecStart=: every word quoted, the executable included."""
    words = [str(a) for a in argv]
    if not words:
        raise QuotingError("systemd command line is empty")
    if words[0][:1] in "@-:+!":
        raise QuotingError(f"systemd executable may not start with a prefix character: {words[0]!r}")
    return Quoted(" ".join(systemd_word(w) for w in words))


def systemd_env(key: str, value: object) -> Quoted:
    """One quoted KEY=VALUE assignment for Environment= (no `$` expansion there, `%` still expands)."""
    if not ENV_NAME.fullmatch(key):
        raise QuotingError(f"environment key {key!r} is not a valid name")
    text = _refuse_control(str(value), "systemd environment")
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return Quoted(f'"{key}={text}"')


def systemd_value(value: object) -> Quoted:
    """The whole value of a unit setting that takes free text (Description=, User=, SyslogIdentifier=):
    `%` specifiers doubled; no leading or trailing blank, no trailing backslash (a line continuation)."""
    text = _refuse_control(str(value), "systemd value")
    if text != text.strip() or text.endswith("\\") or not text:
        raise QuotingError(f"systemd value {text!r} is empty, ends in a backslash or has blanks at its ends")
    return Quoted(text.replace("%", "%%"))


# Unit names: systemd allows ASCII letters, digits, ':', '-', '_', '.', '\\' and '@'; vfgen makes
# no escaped ('\\') or template ('@') names.
_SYSTEMD_UNIT = re.compile(r"[A-Za-z0-9:_.-]+")


def systemd_unit(value: str) -> Quoted:
    """A unit name in a list setting (Wants=, After=, PartOf=, WantedBy=)."""
    if not _SYSTEMD_UNIT.fullmatch(value):
        raise QuotingError(f"systemd unit name {value!r} is not [A-Za-z0-9:_.-]")
    return Quoted(value)


def systemd_path(value: str, relative: bool = False) -> Quoted:
    """A path in a path setting (EnvironmentFile=, ReadWritePaths=, RuntimeDirectory=): absolute
    (or, with relative=True, relative), one word: no blank, quote, backslash or leading '-', '+', '~'."""
    text = _refuse_control(str(value), "systemd path")
    if not text or any(c.isspace() or c in "\"'\\" for c in text) or text[0] in "-+~!:" \
            or (text[0] == "/") == relative:
        kind = "relative" if relative else "absolute"
        raise QuotingError(f"systemd path {text!r} is not one {kind} path without blanks, quotes or backslashes")
    return Quoted(text.replace("%", "%%"))


# --- supervisord ---------------------------------------------------------------
# supervisord reads its conf with configparser (';' and '#' after whitespace
# start an inline comment), expands %(name)s, then splits `command=` with
# shlex.split. Backslash-escaping every unsafe character defeats all three:
# no unescaped whitespace, ';' or '#' survives, and '%' is doubled.

_SUPERVISOR_SAFE = re.compile(r"[A-Za-z0-9_./:=,+@-]")


def supervisor_word(value: object) -> Quoted:
    text = _refuse_control(str(value), "supervisord word")
    if text == "":
        return "''"
    out = []
    for char in text:
        if char == "%":
            out.append("%%")
        elif _SUPERVISOR_SAFE.fullmatch(char):
            out.append(char)
        else:
            out.append("\\" + char)
    # configparser strip()s every value, and str.strip() takes Unicode spaces
    # too (NEL, NBSP ...): a word ending in one would lose it and leave a
    # dangling backslash. An empty '' after it keeps the line's end intact.
    if text[-1].isspace():
        out.append("''")
    return Quoted("".join(out))


def supervisor_command(argv: Iterable[object]) -> Quoted:
    return Quoted(" ".join(supervisor_word(a) for a in argv))


def supervisor_value(value: object) -> Quoted:
    """A plain configparser value (user=, stdout_logfile=): '%' doubled for supervisord's
    expansion; no blank at its ends (configparser strips them) and none before ';' or '#'
    (an inline comment)."""
    text = _refuse_control(str(value), "supervisord value")
    if not text or text != text.strip() or re.search(r"\s[;#]", text):
        raise QuotingError(f"supervisord value {text!r} is empty, has blanks at its ends or an inline comment")
    return Quoted(text.replace("%", "%%"))


def supervisor_name(value: str) -> Quoted:
    """A program name inside `[program:NAME]`."""
    if not _NGINX_NAME.fullmatch(value):
        raise QuotingError(f"supervisord program name {value!r} is not [A-Za-z0-9_.-]")
    return Quoted(value)


# --- Prometheus (YAML rule files, PromQL) ---------------------------------------
# Every scalar of a rendered YAML file is a double-quoted YAML string written by
# yaml_str: a JSON string is a valid YAML double-quoted scalar, so no value can
# start a new key, list item, anchor, tag or document. PromQL string literals
# take Go's escapes; promql_str makes one, and yaml_str then carries the whole
# expression.


def yaml_str(value: object) -> Quoted:
    """A double-quoted YAML scalar whose content is exactly `value` (ASCII-only output)."""
    if isinstance(value, bool) or value is None:
        raise QuotingError(f"YAML string: {value!r} is not text")
    text = str(value)
    if SURROGATES.search(text):
        raise QuotingError(f"YAML string: lone surrogate in {text!r}")
    return Quoted(json.dumps(text, ensure_ascii=True))


def json_document(value: object, indent: int = 2) -> Quoted:
    """A whole JSON file (Prometheus file_sd targets): keys sorted; '<', '>', '&' and "'"
    as \\u escapes, as Jinja's tojson wrote them."""
    text = json.dumps(value, indent=indent, sort_keys=True)
    for char in "<>&'":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return Quoted(text)


def promql_str(value: object) -> Quoted:
    """A double-quoted PromQL string literal (a label matcher value) matching `value` exactly."""
    text = _refuse_control(str(value), "PromQL string")
    return Quoted('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
