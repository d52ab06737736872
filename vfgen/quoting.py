"""Quoting for nginx, systemd and supervisord syntax: the one place where user values are escaped.

Every user value that reaches a rendered file passes through one of these
functions (as Jinja filters). Control characters are refused everywhere: no
format below can carry a newline safely, and config validation rejects them
first, so reaching this check means a bug in validation.
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


def nginx_str(value: object) -> str:
    """A double-quoted nginx string whose content is exactly `value` (no `$` allowed)."""
    text = _refuse_control(str(value), "nginx string")
    if "$" in text:
        raise QuotingError(f"nginx string: '$' would expand a variable in {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_NGINX_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def nginx_vars(parts: Iterable[tuple[str, str]]) -> str:
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
    return '"' + "".join(out) + '"'


def nginx_regex(pattern: str) -> str:
    """A double-quoted nginx string holding a regex verbatim (map keys are never variable-expanded)."""
    text = _refuse_control(pattern, "nginx regex")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def nginx_exact_key(value: str) -> str:
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


def nginx_json(value: object, numbers: dict[int, str] | None = None) -> str:
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
    return out


def nginx_api_key_entry(key: str) -> str:
    """A map entry matching `Authorization: Bearer <key>` exactly.

    A regex, because plain map keys compare case-insensitively (seen with
    nginx 1.22), which would make `ABC...` and `abc...` the same key. The
    scheme is case-insensitive, as RFC 9110 says; the key is not.
    """
    return nginx_regex("~^(?i:Bearer) " + pcre_literal(key) + "$") + " 1;"


# --- systemd -----------------------------------------------------------------
# systemd unquotes ExecStart= words C-style inside double quotes, expands `%`
# specifiers everywhere and `$VAR` in command lines; `%%` and `$$` are literal.


def systemd_word(value: object) -> str:
    text = _refuse_control(str(value), "systemd word")
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{text}"'


def systemd_exec(argv: Iterable[object]) -> str:
    """A command line for ExecStart=: every word quoted, the executable included."""
    words = [str(a) for a in argv]
    if not words:
        raise QuotingError("systemd command line is empty")
    if words[0][:1] in "@-:+!":
        raise QuotingError(f"systemd executable may not start with a prefix character: {words[0]!r}")
    return " ".join(systemd_word(w) for w in words)


def systemd_env(key: str, value: object) -> str:
    """One quoted KEY=VALUE assignment for Environment= (no `$` expansion there, `%` still expands)."""
    if not ENV_NAME.fullmatch(key):
        raise QuotingError(f"environment key {key!r} is not a valid name")
    text = _refuse_control(str(value), "systemd environment")
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{key}={text}"'


# --- supervisord ---------------------------------------------------------------
# supervisord reads its conf with configparser (';' and '#' after whitespace
# start an inline comment), expands %(name)s, then splits `command=` with
# shlex.split. Backslash-escaping every unsafe character defeats all three:
# no unescaped whitespace, ';' or '#' survives, and '%' is doubled.

_SUPERVISOR_SAFE = re.compile(r"[A-Za-z0-9_./:=,+@-]")


def supervisor_word(value: object) -> str:
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
    return "".join(out)


def supervisor_command(argv: Iterable[object]) -> str:
    return " ".join(supervisor_word(a) for a in argv)


# --- Prometheus (YAML rule files, PromQL) ---------------------------------------
# Every scalar of a rendered YAML file is a double-quoted YAML string written by
# yaml_str: a JSON string is a valid YAML double-quoted scalar, so no value can
# start a new key, list item, anchor, tag or document. PromQL string literals
# take Go's escapes; promql_str makes one, and yaml_str then carries the whole
# expression.


def yaml_str(value: object) -> str:
    """A double-quoted YAML scalar whose content is exactly `value` (ASCII-only output)."""
    if isinstance(value, bool) or value is None:
        raise QuotingError(f"YAML string: {value!r} is not text")
    text = str(value)
    if SURROGATES.search(text):
        raise QuotingError(f"YAML string: lone surrogate in {text!r}")
    return json.dumps(text, ensure_ascii=True)



def promql_str(value: object) -> str:
    """A double-quoted PromQL string literal (a label matcher value) matching `value` exactly."""
    text = _refuse_control(str(value), "PromQL string")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
