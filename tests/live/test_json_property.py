"""Property (issue 16): for any JSON document whose top-level "model" is a served name, the route
real nginx takes is the model Python's json module reads.

hypothesis builds random documents: nested objects and arrays (which may carry
their own "model" keys, before or after the top-level one, naming other served
models), strings full of quotes, backslashes and look-alike `"model": "..."`
text, and random key order. Each is then serialised by a randomised encoder:
any character of any string (the key "model" and the served name included) may
be written as a \\uXXXX escape in either hex case or as a short escape, with
random JSON whitespace between tokens. All examples go through ONE nginx (one
deployment for the module); the oracle is json.loads(body)["model"], and the
backend that answered must serve it (the stand-in also counts misroutes).
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.deploy import stand_in_args

pytestmark = pytest.mark.live

# Served name -> first served name of its model.
SERVED = {"alpha": "alpha", "org/alpha-2": "alpha", "A&B": "A&B", "gämma-模型": "gämma-模型", "𝔡elta": "gämma-模型"}
SPEC = {"models": [
    {"model": "org/alpha", "served_model_name": "alpha", "aliases": ["org/alpha-2"], "instances": 1, "gpus": [0],
     "extra_args": stand_in_args()},
    {"model": "org/amp", "name": "amp", "served_model_name": "A&B", "instances": 1, "gpus": [1], "extra_args": stand_in_args()},
    {"model": "org/gamma", "name": "gamma", "served_model_name": "gämma-模型", "aliases": ["𝔡elta"], "instances": 1,
     "gpus": [1], "extra_args": stand_in_args()},
]}
NAMES = sorted(SERVED)
EXAMPLES = 250  # ~5 ms each through nginx: the whole property runs in a few seconds

TRICKY_TEXT = st.sampled_from(['"model": "alpha"', '\\"model\\":\\"A&B\\"', "model", "\\", '"', "{", "}", "[", "]",
                               ",", ":", "\\u006dodel", "\\\\\\", "𝔡", "\u2028", "\x00", "\n"])
TEXT = st.one_of(st.text(max_size=12), TRICKY_TEXT, st.sampled_from(NAMES))
KEYS = st.one_of(st.just("model"), TEXT)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=False, allow_infinity=False), TEXT)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)), max_leaves=20)


@st.composite
def documents(draw):
    """(members, name): top-level members in order, exactly one of them "model": name."""
    name = draw(st.sampled_from(NAMES))
    others = draw(st.dictionaries(TEXT.filter(lambda k: k != "model"), VALUES, max_size=6))
    members = list(others.items())
    members.insert(draw(st.integers(0, len(members))), ("model", name))
    return members, name


def encode_string(text: str, rng: random.Random, p_escape: float) -> str:
    out = ['"']
    for ch in text:
        short = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
        if ch in '"\\' or ord(ch) < 0x20 or rng.random() < p_escape:
            if ch in short and rng.random() < 0.5:
                out.append(short[ch])
            else:
                units = ch.encode("utf-16-be")
                for i in range(0, len(units), 2):
                    code = units[i:i + 2].hex()
                    out.append("\\u" + (code.upper() if rng.random() < 0.5 else code))
        else:
            out.append(ch)
    return "".join(out) + '"'


def encode(value, rng: random.Random, p_escape: float) -> str:
    def ws() -> str:
        return rng.choice(["", "", "", " ", "\n", "\t", "\r\n  "])

    if isinstance(value, Members):
        parts = [ws() + encode_string(k, rng, p_escape) + ws() + ":" + ws() + encode(v, rng, p_escape) + ws()
                 for k, v in value]
        return "{" + ",".join(parts) + ws() + "}"
    if isinstance(value, list):
        return "[" + ",".join(ws() + encode(v, rng, p_escape) + ws() for v in value) + ws() + "]"
    if isinstance(value, str):
        return encode_string(value, rng, p_escape)
    return json.dumps(value)


class Members(list):
    """An object's members in order (a plain list stays a JSON array)."""


def as_members(value):
    if isinstance(value, dict):
        return Members((k, as_members(v)) for k, v in value.items())
    if isinstance(value, list):
        return [as_members(v) for v in value]
    return value


@pytest.fixture(scope="module")
def routed(module_live_deploy):
    d = module_live_deploy(SPEC)
    d.reset_stats()
    return d


def test_route_equals_what_python_json_reads(routed):
    seen = {"requests": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(doc=documents(), seed=st.integers(0, 2**32 - 1), p_escape=st.sampled_from([0.0, 0.2, 1.0]))
    def check(doc, seed, p_escape):
        members, name = doc
        rng = random.Random(seed)
        body = (rng.choice(["", " ", "\n"]) + encode(Members((k, as_members(v)) for k, v in members), rng, p_escape)
                + rng.choice(["", "\n", " \r\n"])).encode()
        assert json.loads(body)["model"] == name  # the oracle agrees with the generator
        resp = routed.http.post(f"{routed.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        seen["requests"] += 1
        assert resp.status_code == 200, (resp.status_code, resp.text[:200], body[:300])
        got = routed.backend_by_port(int(resp.headers["x-fake-vllm-port"])).served_name
        assert got == SERVED[name], (got, name, body[:300])

    check()
    stats = routed.all_stats()
    assert sum(s["requests"] for s in stats.values()) == seen["requests"]
    assert all(s["misrouted"] == 0 for s in stats.values()), stats
