"""Promise: with max_body_size 64k, any body up to the limit is routed by its "model", anything above gets 413 JSON.

Routing reads the body from memory, so a body at the limit with the "model" key
at its very end is the hard case: it must reach the right model's backend, not a
default and not an error. One byte more is refused with a JSON 413, whether the
client sent a Content-Length or a chunked body.
"""

from __future__ import annotations

import json

import pytest

from tests.harness.deploy import assert_json_error, raw_request, stand_in_args

pytestmark = pytest.mark.live

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def routed(module_live_deploy):
    return module_live_deploy({"max_body_size": "64k", "models": [
        {"model": "org/first", "served_model_name": "first", "instances": 1, "gpus": [0], "extra_args": stand_in_args()},
        {"model": "org/second", "served_model_name": "second", "instances": 1, "gpus": [1], "extra_args": stand_in_args()},
    ]})


def padded_body(size: int, model: str, model_last: bool) -> bytes:
    """A completion request of exactly `size` bytes, the "model" key first or last."""
    def encode(prompt: str) -> bytes:
        body = {"prompt": prompt, "model": model} if model_last else {"model": model, "prompt": prompt}
        return json.dumps(body).encode()

    body = encode(f"{'x' * (size - len(encode('')))}")
    assert len(body) == size
    return body


@pytest.mark.parametrize("size,model_last", [(LIMIT - 100, False), (LIMIT - 1, True), (LIMIT, True)],
                         ids=["under-model-first", "one-under-model-last", "at-limit-model-last"])
@pytest.mark.parametrize("model", ["first", "second"])
def test_body_up_to_limit_is_routed_by_model(routed, size, model_last, model):
    body = padded_body(size, model, model_last)
    resp = routed.http.post(f"{routed.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, (resp.status_code, resp.text[:300], routed.nginx_error_log()[-2000:])
    assert resp.headers["x-fake-vllm-model"] == model
    backend = routed.backend_by_port(int(resp.headers["x-fake-vllm-port"]))
    assert backend.served_name == model


def test_body_over_limit_gets_413_json(routed):
    body = padded_body(LIMIT + 1, "second", model_last=True)
    resp = routed.http.post(f"{routed.url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 413)
    assert "64k" in error["message"], error


def chunked_request(body: bytes, chunk: int) -> bytes:
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts) + b"0\r\n\r\n"
    return (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)


@pytest.mark.parametrize("chunk", [1, 16, 1000, LIMIT], ids=["1-byte", "16-byte", "1000-byte", "one-chunk"])
@pytest.mark.parametrize("size", [LIMIT * 3 // 4, LIMIT], ids=["three-quarters", "at-limit"])
def test_chunked_body_up_to_limit_is_routed_whatever_the_chunk_size(routed, chunk, size):
    """Issue 16: nginx kept the chunk framing in the body buffer, so 16-byte chunks failed from
    ~73% of max_body_size and 1-byte chunks from ~17%, with the 400 "could not be inspected"."""
    body = padded_body(size, "second", model_last=True)
    seen = len(routed.nginx_error_log())
    status, headers, reply = raw_request(routed.port, chunked_request(body, chunk), timeout=30.0)
    log = routed.nginx_error_log()[seen:]
    assert status == 200, (status, reply[:300], log[-1000:])
    assert routed.backend_by_port(int(headers["x-fake-vllm-port"])).served_name == "second"
    assert "temporary file" not in log


@pytest.mark.parametrize("chunk", [1, 16, LIMIT // 2 + 1], ids=["1-byte", "16-byte", "two-chunks"])
def test_chunked_body_over_limit_gets_413_json(routed, chunk):
    body = padded_body(LIMIT + 1, "second", model_last=True)
    status, headers, reply = raw_request(routed.port, chunked_request(body, chunk), timeout=30.0)
    assert_json_error(status, headers, reply, 413)
