"""Promise (issue 16): hostile bodies never reach the wrong model, and nginx keeps answering.

With default_model set (the case where a body nginx cannot read would be most
tempting to send somewhere), each body below gets either its model's backend
or a clear JSON 400, and never the default model's. Bodies past PCRE's limits
(nesting deeper than jsonpcre.HEAP_LIMIT_KIB allows, 3000-5000 levels; more than
~1.2 million object members, past PCRE2's match limit) make pcre2_match() fail, which nginx
logs; the map then answers "unreadable". The time these take is measured in
`python -m bench.json_routing`, not here.
"""

from __future__ import annotations

import json

import pytest

from tests.harness.deploy import assert_json_error, stand_in_args

pytestmark = pytest.mark.live

MB = 1024 * 1024


@pytest.fixture(scope="module")
def hostile(module_live_deploy):
    return module_live_deploy({"max_body_size": "40m", "default_model": "dflt", "models": [
        {"model": "org/dflt", "served_model_name": "dflt", "instances": 1, "gpus": [0], "extra_args": stand_in_args()},
        {"model": "org/target", "served_model_name": "target", "instances": 1, "gpus": [1], "extra_args": stand_in_args()},
    ]})


def nest(levels: int, model_last: bool = True) -> bytes:
    """`levels` of nesting (arrays and objects in turn, each object with its own "model": "dflt")."""
    pairs = levels // 2
    inner = b'{"x": ' + b'[{"model": "dflt", "k": ' * pairs + b"1" + b"}]" * pairs
    return inner + (b', "model": "target", "prompt": "x"}' if model_last else b"}")


ROUTED = {
    "nesting 900 levels, nested model keys": nest(900),
    # Deeper than Python's json (and so vLLM and the stand-in) reads: routed, and the backend answers 400.
    "nesting 1500 levels": nest(1500),
    "1 MB run of escaped backslashes": b'{"prompt": "' + b"\\\\" * (MB // 2) + b'", "model": "target"}',
    "1 MB of escaped quotes": b'{"prompt": "' + b'\\"' * (MB // 2) + b'", "model": "target"}',
    "fake keys in text": json.dumps({"prompt": '"model": "dflt", ' * 50_000, "model": "target"}).encode(),
    "30 MB prompt, model last": json.dumps({"prompt": "lorem ipsum " * (30 * MB // 12), "model": "target"}).encode(),
    "30 MB prompt, model first": json.dumps({"model": "target", "prompt": "lorem ipsum " * (30 * MB // 12)}).encode(),
    "30 MB of chat turns": json.dumps({"messages": [{"role": "user", "content": "hello " * 160}] * 30_000,
                                       "model": "target"}).encode(),
    "30 MB of CJK text, json.dumps escapes (5 M \\uXXXX)": json.dumps({"prompt": "模型文本" * (30 * MB // 24),
                                                                    "model": "target"}).encode(),
    "4 M token ids": json.dumps({"model": "target", "prompt": list(range(4_000_000))}).encode(),
}
REFUSED = {
    "nesting 100k levels (past the heap limit)": nest(100_000),
    "nesting 10k levels (past the heap limit)": nest(10_000),
    "nesting 100k levels, model first": b'{"model": "target", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "1.5 M object members (past the match limit)": json.dumps(
        {"model": "target", "x": {f"k{i}": 1 for i in range(1_500_000)}}).encode(),
    "15 M escaped backslashes (past the match limit)": b'{"model": "target", "prompt": "' + b"\\\\" * (15 * MB) + b'"}',
    "unterminated backslash run": b'{"model": "target", "prompt": "' + b"\\" * (MB + 1),
    "unbalanced quotes": b'{"model": "target", "prompt": "' + b'"' * 1001 + b"}",
}


@pytest.mark.parametrize("label", ROUTED)
def test_hostile_but_valid_body_reaches_its_model(hostile, label):
    body = ROUTED[label]
    if len(body) < 2 * MB and label != "nesting 1500 levels":  # Python's json stops near 1000 levels
        assert json.loads(body)["model"] == "target"
    resp = hostile.http.post(f"{hostile.url}/v1/completions", content=body, timeout=120,
                             headers={"Content-Type": "application/json"})
    assert "x-fake-vllm-port" in resp.headers, (resp.status_code, resp.text[:300], hostile.nginx_error_log()[-500:])
    assert hostile.backend_by_port(int(resp.headers["x-fake-vllm-port"])).served_name == "target"


@pytest.mark.parametrize("label", REFUSED)
def test_body_past_the_limits_is_a_clear_400_never_the_default_model(hostile, label):
    seen = len(hostile.nginx_error_log())
    resp = hostile.http.post(f"{hostile.url}/v1/completions", content=REFUSED[label], timeout=120,
                             headers={"Content-Type": "application/json"})
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 400)
    assert "x-fake-vllm-port" not in resp.headers
    assert "could not be inspected" in error["message"] or "once" in error["message"], error
    if "limit" in label:
        assert "pcre2_match() failed" in hostile.nginx_error_log()[seen:]
    # nginx still routes the next request.
    ok = hostile.http.post(f"{hostile.url}/v1/completions", json={"model": "target", "prompt": "x"})
    assert ok.status_code == 200 and hostile.backend_by_port(int(ok.headers["x-fake-vllm-port"])).served_name == "target"
