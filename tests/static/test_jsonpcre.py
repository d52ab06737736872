"""The body patterns of vfgen/jsonpcre.py in libpcre2-8 itself, and the limits docs/routing.md states.

The live tests send bodies through nginx; these pin PCRE2's own answers (match,
no match, heap limit, match limit, JIT stack) on the exact patterns the plan
renders, so a change to the patterns that moves a documented limit fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness import pcre2
from tests.harness.tools import require_tool
from tests.static.test_real_parsers import nginx_test, nginx_wrapper, render_tree
from vfgen import jsonpcre, quoting

PATTERNS = jsonpcre.body_patterns("m")


def classify(body: bytes, jit: bool = False) -> tuple[str, bytes | None]:
    """What nginx's map decides: the first pattern that matches, or the default on no match or error."""
    for kind, pattern in (("model", PATTERNS.model), ("ambiguous", PATTERNS.model_key), ("none", PATTERNS.no_model)):
        rc, group = pcre2.compile(pattern, jit).match(body)
        if rc > 0:
            return kind, group
        if rc != pcre2.ERROR_NOMATCH:
            return f"error {rc}", None
    return "unreadable", None


def nest(levels: int) -> bytes:
    pairs = levels // 2
    return b'{"x": ' + b'[{"model": "d", "k": ' * pairs + b"1" + b"}]" * pairs + b', "model": "t"}'


@pytest.mark.parametrize("body,expected", [
    (b'{"model": "a"}', ("model", b"a")),
    (b' \n{"metadata": {"model": "b"}, "model" : "a", "x": [{"model": "c"}]}\n', ("model", b"a")),
    (b'{"\\u006Dodel": "A\\u0026B"}', ("model", b"A\\u0026B")),
    (b'{"p": "\\\\\\"model\\": \\"b\\"", "model": "a\\"q"}', ("model", b'a\\"q')),
    (b'{"model": "a", "model": "b"}', ("ambiguous", None)),
    (b'{"model": ["a"]}', ("ambiguous", None)),
    (b'{"prompt": "x", "modelx": "a"}', ("none", None)),
    (b"[1]", ("unreadable", None)),
    (b'{"model": "a"', ("ambiguous", None)),
    (b'{"x": "unterminated, "model": "a"}', ("unreadable", None)),
])
def test_the_map_decides_as_json_would(body, expected):
    assert classify(body) == expected
    try:
        doc = json.loads(body)
    except ValueError:
        return
    if expected[0] == "model":
        assert json.loads(b'"' + expected[1] + b'"') == doc["model"]


def test_nesting_limit_interpreted_is_past_what_python_json_reads():
    """Debian's default (pcre_jit off): 3277 levels of arrays and objects in turn, then the heap limit."""
    with pytest.raises(RecursionError):
        json.loads(nest(1000))
    assert classify(nest(3276)) == ("model", b"t")
    assert classify(nest(3280)) == (f"error {pcre2.ERROR_HEAPLIMIT}", None)
    assert classify(b'{"x": ' + b"[" * 5240 + b"]" * 5240 + b', "model": "t"}') == ("model", b"t")


def test_nesting_limit_with_pcre_jit_is_226_levels():
    assert classify(nest(226), jit=True) == ("model", b"t")
    assert classify(nest(228), jit=True) == (f"error {pcre2.ERROR_JIT_STACKLIMIT}", None)


def test_match_limit_allows_millions_of_token_ids_and_escapes():
    tokens = json.dumps({"model": "t", "prompt": list(range(4_000_000))}).encode()  # flat: one step
    assert classify(tokens) == ("model", b"t")
    cjk = json.dumps({"prompt": "模型文本" * 1_300_000, "model": "t"}).encode()  # 5.2 M \uXXXX escapes
    assert classify(cjk) == ("model", b"t")
    strings = json.dumps({"model": "t", "input": ["a"] * 1_400_000}).encode()
    assert classify(strings) == ("model", b"t")
    members = json.dumps({"model": "t", "x": {f"k{i}": 1 for i in range(1_300_000)}}).encode()
    assert classify(members) == (f"error {pcre2.ERROR_MATCHLIMIT}", None)


@pytest.mark.parametrize("char", ["a", "o"])
def test_a_256_byte_served_name_still_renders_a_config_nginx_accepts(char, tmp_path: Path):
    """Names whose escape-everything pattern passes nginx's 4 KB token limit get the shorter one."""
    nginx = require_tool("nginx", "nginx-light")
    name = char * 256
    full = f"~^[A-Z]+:1:{quoting.json_string_pcre(name)}$"
    assert quoting.nginx_regex_fits(full) == (char == "a")
    spec = tmp_path / "deploy.yaml"
    spec.write_text(json.dumps({"models": [{"model": "org/a", "served_model_name": name}, {"model": "org/b"}]}))
    tree = render_tree(["-f", str(spec)], tmp_path / "root")
    conf = next((tree / "etc/nginx/conf.d").glob("*.conf"))
    result = nginx_test(nginx, nginx_wrapper(tmp_path, str(conf)), tmp_path)
    assert result.returncode == 0, result.stderr
