"""Read rendered files back the way nginx, systemd and supervisord will, fast enough to fuzz.

- nginx: crossplane's lexer and tree, then nginx's own unescaping of every
  word (`\\\\`, `\\"`, `\\'`, `\\t`, `\\r`, `\\n`; see ngx_conf_read_token).
- systemd: a strict model of the subset of unit syntax vfgen writes
  (double-quoted words with `\\\\` and `\\"` escapes, `%%` for `%`, `$$` for `$`
  in command lines). Anything outside that subset raises UnitSyntaxError, so
  the model never guesses. tests/security/test_real_tools.py checks it against
  a real systemd 252.
- supervisord: its own ServerOptions, as supervisord itself reads a config.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from unittest import mock

import crossplane

# --- nginx -----------------------------------------------------------------------------

Node = tuple[tuple[str, ...], "tuple[Node, ...] | None"]  # (words, block)


class NginxSyntaxError(AssertionError):
    pass


def nginx_unescape(word: str) -> str:
    """nginx's unescaping, applied to a word crossplane has already split (and de-quoted)."""
    out = []
    i = 0
    while i < len(word):
        char = word[i]
        if char == "\\" and i + 1 < len(word):
            nxt = word[i + 1]
            if nxt in "\\\"'":
                out.append(nxt)
                i += 2
                continue
            if nxt in "trn":
                out.append({"t": "\t", "r": "\r", "n": "\n"}[nxt])
                i += 2
                continue
        out.append(char)
        i += 1
    return "".join(out)


def parse_nginx(path: Path) -> tuple[Node, ...]:
    """The directive tree of an http-context file: words unescaped as nginx does."""
    result = crossplane.parse(str(path), single=True, check_ctx=False, comments=False, catch_errors=False)
    if result["status"] != "ok" or result["errors"]:
        raise NginxSyntaxError(f"crossplane: {result['errors']}")
    return _nodes(result["config"][0]["parsed"])


def parse_nginx_text(text: str, scratch: Path) -> tuple[Node, ...]:
    scratch.write_text(text, encoding="utf-8")
    return parse_nginx(scratch)


def _nodes(parsed: list[dict]) -> tuple[Node, ...]:
    return tuple(
        (tuple(nginx_unescape(w) for w in [d["directive"], *d["args"]]), _nodes(d["block"]) if "block" in d else None)
        for d in parsed
    )


# --- systemd ---------------------------------------------------------------------------


class UnitSyntaxError(AssertionError):
    """The unit uses syntax outside the subset this model understands."""


@dataclass(frozen=True)
class UnitLine:
    section: str
    key: str
    raw: str
    words: tuple[str, ...] | None  # for command lines and Environment=


COMMAND_KEYS = {"ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop", "ExecStopPost", "ExecReload"}
WORD_KEYS = COMMAND_KEYS | {"Environment"}
# Variables vfgen itself writes into command lines, on purpose.
KNOWN_VARIABLES = {"${MAINPID}"}


def parse_unit(text: str) -> tuple[UnitLine, ...]:
    lines = []
    section = ""
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.strip()
        if line.endswith("\\"):
            raise UnitSyntaxError(f"line {number} ends in a backslash: systemd would join the next line")
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("["):
            if not re.fullmatch(r"\[[A-Za-z]+\]", stripped):
                raise UnitSyntaxError(f"line {number}: bad section header {stripped!r}")
            section = stripped[1:-1]
            continue
        match = re.fullmatch(r"([A-Za-z]+)=(.*)", line)
        if not match:
            raise UnitSyntaxError(f"line {number}: not KEY=VALUE: {line!r}")
        key, raw = match.groups()
        words = None
        if key in WORD_KEYS:
            words = tuple(_expand(w, command=key in COMMAND_KEYS) for w in split_words(raw))
        elif "%" in raw or "\\" in raw or '"' in raw:
            raise UnitSyntaxError(f"line {number}: {key}= holds a character this model does not interpret: {raw!r}")
        lines.append(UnitLine(section, key, raw, words))
    return tuple(lines)


def split_words(raw: str) -> list[str]:
    """Words of a command line or Environment=: "quoted" (C escapes \\\\ and \\" only) or bare."""
    words: list[str] = []
    i, n = 0, len(raw)
    while i < n:
        if raw[i] == '"':
            i += 1
            word = []
            while True:
                if i >= n:
                    raise UnitSyntaxError(f"unterminated quote in {raw!r}")
                char = raw[i]
                if char == "\\":
                    if i + 1 >= n or raw[i + 1] not in '\\"':
                        raise UnitSyntaxError(f"escape outside the model (\\\\ and \\\" only) in {raw!r}")
                    word.append(raw[i + 1])
                    i += 2
                    continue
                if char == '"':
                    i += 1
                    break
                word.append(char)
                i += 1
            if i < n and raw[i] != " ":
                raise UnitSyntaxError(f"quoted word not followed by a space in {raw!r}")
            words.append("".join(word))
        else:
            end = raw.find(" ", i)
            end = n if end < 0 else end
            bare = raw[i:end]
            if not re.fullmatch(r"[A-Za-z0-9_./:=,+@${}-]+", bare):
                raise UnitSyntaxError(f"bare word outside the model: {bare!r}")
            words.append(bare)
            i = end
        if i < n:
            if raw[i] != " " or (i + 1 < n and raw[i + 1] == " "):
                raise UnitSyntaxError(f"words must be separated by one space in {raw!r}")
            i += 1
    return words


def _expand(word: str, command: bool) -> str:
    """Specifiers (%% only) everywhere; $$ and whole known variables in command lines."""
    if word in KNOWN_VARIABLES and command:
        return word
    out = []
    i = 0
    while i < len(word):
        char = word[i]
        if char == "%":
            if word[i + 1 : i + 2] != "%":
                raise UnitSyntaxError(f"specifier {word[i:i + 2]!r} would be expanded in {word!r}")
            out.append("%")
            i += 2
            continue
        if char == "$" and command:
            if word[i + 1 : i + 2] != "$":
                raise UnitSyntaxError(f"variable {word[i:i + 2]!r} would be expanded in {word!r}")
            out.append("$")
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def unit_values(lines: Iterable[UnitLine], key: str) -> list[tuple[str, ...]]:
    return [line.words if line.words is not None else (line.raw,) for line in lines if line.key == key]


def unit_environment(lines: Iterable[UnitLine]) -> list[tuple[str, str]]:
    pairs = []
    for words in unit_values(lines, "Environment"):
        for word in words:
            key, sep, value = word.partition("=")
            if not sep:
                raise UnitSyntaxError(f"Environment word without '=': {word!r}")
            pairs.append((key, value))
    return pairs


# --- supervisord -----------------------------------------------------------------------


def parse_supervisord(conf_text: str, scratch: Path, known_users: bool = True) -> dict[str, dict[str, Any]]:
    """Programs as supervisord's ServerOptions reads them: name -> command argv, user, log, priority."""
    from supervisor import options

    conf = scratch / "programs.conf"
    conf.write_text(conf_text, encoding="utf-8")
    main = scratch / "supervisord.conf"
    if not main.exists():
        main.write_text(f"[supervisord]\nlogfile={scratch}/sd.log\npidfile={scratch}/sd.pid\n[include]\nfiles={conf}\n")
    opts = options.ServerOptions()
    opts.configfile = str(main)
    # supervisord looks users up; the fuzzer's user names need not exist on this machine.
    patch = mock.patch.object(options, "name_to_uid", lambda name: 4242) if not known_users else contextlib.nullcontext()
    with patch:
        opts.process_config(do_usage=False)
    programs = {}
    for group in opts.process_group_configs:
        for proc in group.process_configs:
            programs[proc.name] = {
                "group": group.name,
                "argv": tuple(shlex.split(proc.command)),
                "uid": proc.uid,
                "stdout_logfile": proc.stdout_logfile,
                "priority": proc.priority,
            }
    return programs


# --- JSON / PCRE helpers ---------------------------------------------------------------

_PCRE_META = set("\\^$.[|()?*+{")


def pcre_literal_value(pattern: str) -> str | None:
    """The one string `pattern` matches if it is a plain PCRE literal, else None."""
    out = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 >= len(pattern) or pattern[i + 1].isalnum() or ord(pattern[i + 1]) > 127:
                return None  # \d, \w, \Q ... are not literals
            out.append(pattern[i + 1])
            i += 2
            continue
        if char in _PCRE_META:
            return None
        out.append(char)
        i += 1
    return "".join(out)


def json_or_none(text: str) -> Any:
    if not text.startswith(("{", "[")):
        return None
    try:
        # A number nginx fills in per request (`"created":${prefix_now}`) stands for a number.
        return json.loads(re.sub(r":\$\{[A-Za-z_][A-Za-z0-9_]*\}(?=[,}\]])", ":0", text))
    except ValueError:
        return None


def yaml_document(text: str) -> Any:
    """A YAML file (the Prometheus rules) as plain data, the way Prometheus's YAML parser reads it."""
    import yaml

    return yaml.safe_load(text)
