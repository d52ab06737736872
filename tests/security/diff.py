"""Compare what was rendered for a fuzzed value with what was rendered for a harmless marker.

The marker render fixes the intended structure: the same files, sections,
directives, words and JSON shapes must come out for the fuzzed value, and each
place that held the marker must hold the value, in the form that place needs:

- plain words: the value itself (an address before `:port` in its connect or
  bind form, see Subst);
- JSON documents (nginx `return` bodies, Prometheus targets): decoded, the
  value inside the same strings;
- route regexes in map keys (`~^...:MARKER$`): a pattern that matches every
  JSON spelling of the value (raw, \\uXXXX, \\/) and nothing near it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

from tests.security.parsers import UnitLine, json_or_none
from vfgen.quoting import json_string_pcre


@dataclass(frozen=True)
class Subst:
    value: str  # the value where the marker stood alone or inside text
    before_port: str | None = None  # the value where the marker was followed by ":<port>"


class Mismatch(AssertionError):
    pass


def assert_same_modulo(got: Any, benign: Any, subst: Mapping[str, Subst], where: str = "") -> None:
    if isinstance(benign, UnitLine):
        if not isinstance(got, UnitLine) or (got.section, got.key) != (benign.section, benign.key):
            raise Mismatch(f"{where}: expected [{benign.section}] {benign.key}=, got {got!r}")
        if benign.words is not None:
            assert_same_modulo(got.words, benign.words, subst, f"{where}/{benign.key}")
        else:
            assert_same_modulo(got.raw, benign.raw, subst, f"{where}/{benign.key}")
        return
    if dataclasses.is_dataclass(benign):
        raise TypeError(f"unsupported {type(benign)}")
    if isinstance(benign, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(benign):
            raise Mismatch(f"{where}: expected {len(benign)} items, got {_short(got)} instead of {_short(benign)}")
        for i, (g, b) in enumerate(zip(got, benign)):
            assert_same_modulo(g, b, subst, f"{where}[{i}]")
        return
    if isinstance(benign, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(benign):
            raise Mismatch(f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r} != {sorted(benign)}")
        for key in benign:
            assert_same_modulo(got[key], benign[key], subst, f"{where}.{key}")
        return
    if isinstance(benign, str):
        _same_string(got, benign, subst, where)
        return
    if got != benign:
        raise Mismatch(f"{where}: {got!r} != {benign!r}")


def _same_string(got: Any, benign: str, subst: Mapping[str, Subst], where: str) -> None:
    if not isinstance(got, str):
        raise Mismatch(f"{where}: expected a string like {benign!r}, got {got!r}")
    markers = [m for m in subst if m in benign]
    if not markers and benign.startswith("~"):
        # Route regexes spell each character of a name with its escapes: find the marker that way.
        markers = [m for m in subst if json_string_pcre(m) in benign]
    if not markers:
        if got != benign:
            raise Mismatch(f"{where}: changed although no fuzzed value belongs here:\n  got      {got!r}\n  expected {benign!r}")
        return
    decoded = json_or_none(benign)
    if decoded is not None:
        got_decoded = json_or_none(got)
        if got_decoded is None:
            raise Mismatch(f"{where}: no longer a JSON document: {got!r}")
        assert_same_modulo(got_decoded, decoded, subst, f"{where}<json>")
        return
    if benign.startswith("~"):
        _same_regex(got, benign, subst, markers, where)
        return
    expected = plain(benign, subst)
    if got != expected:
        raise Mismatch(f"{where}: value not intact:\n  got      {got!r}\n  expected {expected!r}")


def plain(benign: str, subst: Mapping[str, Subst]) -> str:
    """`benign` with every marker replaced by its value (address form before `:port`)."""
    out = benign
    for marker, sub in subst.items():
        pieces = out.split(marker)
        rebuilt = pieces[0]
        for piece in pieces[1:]:
            before_port = piece[:1] == ":" and piece[1:2].isdigit()
            rebuilt += (sub.before_port if before_port and sub.before_port is not None else sub.value) + piece
        out = rebuilt
    return out


def _same_regex(got: str, benign: str, subst: Mapping[str, Subst], markers: list[str], where: str) -> None:
    """The marker's part of a route regex must match every JSON spelling of the value, and nothing near it.

    A regex on a URI (`~^/v1/models/MARKER$`: nginx has decoded the URI) takes the value only as it is."""
    marker = markers[0]
    token = marker if marker in benign else json_string_pcre(marker)
    if len(markers) != 1 or benign.count(token) != 1:
        raise Mismatch(f"{where}: one marker per regex expected in {benign!r}")
    value = subst[marker].value
    prefix, suffix = benign.split(token)
    if not (got.startswith(prefix) and got.endswith(suffix) and len(got) >= len(prefix) + len(suffix)):
        raise Mismatch(f"{where}: regex frame changed: {got!r} vs {benign!r}")
    middle = got[len(prefix) : len(got) - len(suffix)]
    try:
        # These constructs ((?:a|b), [aA], escapes) mean the same in Python's re and PCRE.
        regex = re.compile(middle)
    except re.error as exc:
        raise Mismatch(f"{where}: {middle!r} is not a valid regex: {exc}") from None
    spellings = {value} if prefix.startswith("~^/") else json_spellings(value)
    for spelling in spellings:
        if not regex.fullmatch(spelling):
            raise Mismatch(f"{where}: {middle!r} does not match {spelling!r}, a JSON spelling of {value!r}")
    for near in near_misses(value) + sorted(json_spellings(value) - spellings):
        if regex.fullmatch(near):
            raise Mismatch(f"{where}: {middle!r} also matches {near!r}, which is not {value!r}")


def json_spellings(value: str) -> set[str]:
    """How JSON encoders write `value` inside a string: raw, \\uXXXX (either hex case), \\/ for '/',
    and every character escaped."""
    ascii_form = json.dumps(value, ensure_ascii=True)[1:-1]
    upper_hex = re.sub(r"\\u([0-9a-f]{4})", lambda m: "\\u" + m.group(1).upper(), ascii_form)
    units = value.encode("utf-16-be")
    every = "".join("\\u" + units[i:i + 2].hex() for i in range(0, len(units), 2))
    forms = {value, ascii_form, upper_hex, every, every.upper().replace("\\U", "\\u")}
    return forms | {f.replace("/", "\\/") for f in forms}


def near_misses(value: str) -> list[str]:
    out = [value + "x", "x" + value, value + " "]
    if len(value) > 1:
        out += [value[:-1], value[1:]]
    if value.swapcase() != value:
        out.append(value.swapcase())
    # Each character swapped for another: an unescaped metacharacter (. ? [ ...) matches these.
    for i, char in enumerate(value[:32]):
        out.append(value[:i] + ("x" if char != "x" else "y") + value[i + 1 :])
    return [n for n in out if n != value and n not in json_spellings(value)]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 300 else text[:300] + "..."
