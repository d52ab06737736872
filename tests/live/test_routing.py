"""Promise (issue 7): one endpoint, several models, each request reaches a backend of the model it names.

3 models on 2 fake GPUs, aliases, a non-ASCII served name and a default_model.
Mixed concurrent load must misroute nothing; unknown models get a JSON 404 that
lists the served names; /v1/models lists exactly the served names. Then one test
per edge case of finding the top-level "model" member in the raw body
(vfgen/jsonpcre.py): nested keys, escapes, duplicates, bodies that are no object.
"""

from __future__ import annotations

import json
import random

import pytest

from tests.harness.deploy import assert_json_error, raw_request, stand_in_args
from tests.harness.load import run_load

pytestmark = pytest.mark.live

UNICODE = "gämma-模型"
# Served names -> the first served name of their model (what X-Fake-Vllm-Model reports).
SERVED = {"alpha": "alpha", "alpha-latest": "alpha", "org/alpha": "alpha", "beta": "beta", UNICODE: UNICODE}
SPEC = {
    "default_model": "beta",
    "models": [
        {"model": "org/alpha", "served_model_name": "alpha", "aliases": ["alpha-latest", "org/alpha"],
         "instances": 2, "gpus": [0, 1], "max_batch_size": 8, "extra_args": stand_in_args(latency=0.02)},
        {"model": "org/beta", "served_model_name": "beta", "instances": 1, "gpus": [0], "max_batch_size": 8,
         "extra_args": stand_in_args(latency=0.02)},
        {"model": "org/gamma", "name": "gamma", "served_model_name": UNICODE, "instances": 1, "gpus": [1],
         "max_batch_size": 8, "extra_args": stand_in_args(latency=0.02)},
    ],
}


@pytest.fixture(scope="module")
def routed(module_live_deploy):
    return module_live_deploy(SPEC)


def post(d, body: bytes | dict, path: str = "/v1/completions"):
    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return d.http.post(f"{d.url}{path}", content=content, headers={"Content-Type": "application/json"})


def routed_to(d, resp) -> str:
    """First served name of the backend that answered (by port: the model header is latin-1 only)."""
    return d.backend_by_port(int(resp.headers["x-fake-vllm-port"])).served_name


def test_mixed_load_is_never_misrouted(routed):
    routed.reset_stats()
    rng = random.Random(7)
    names = sorted(SERVED)
    jobs = []
    for i in range(400):
        name = rng.choice(names)
        path, body = rng.choice([
            ("/v1/completions", {"model": name, "prompt": f"p{i}", "max_tokens": 3}),
            ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": f"m{i}"}]}),
            ("/v1/embeddings", {"input": [f"e{i}", "x"], "model": name}),
        ])
        jobs.append((name, path, body))
    result = run_load(lambda i: f"{routed.url}{jobs[i][1]}", count=len(jobs), concurrency=32,
                      body=lambda i: jobs[i][2], deadline=60)
    print(f"\n{result.summary()}")
    assert not result.failed, [(r.status, r.body[:200]) for r in result.failed][:5]
    wrong = []
    for reply in result.replies:
        name = jobs[reply.index][0]
        served = routed.backend_by_port(reply.backend).served_name
        if served != SERVED[name] or reply.json()["model"] != SERVED[name]:
            wrong.append((name, served, reply.json()["model"]))
    assert not wrong, f"{len(wrong)} replies from the wrong model: {wrong[:10]}"
    stats = routed.all_stats()
    assert sum(s["misrouted"] for s in stats.values()) == 0, {p: s["misrouted"] for p, s in stats.items()}
    assert sum(s["requests"] for s in stats.values()) == len(jobs)
    for b in routed.backends:
        assert stats[b.port]["requests"] > 0, f"{b.program} got nothing"


def test_unknown_model_is_json_404_listing_served_names(routed):
    resp = post(routed, {"model": "gpt-4", "prompt": "x"})
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 404)
    for name in SERVED:
        assert name in error["message"], (name, error["message"])
    assert "x-fake-vllm-port" not in resp.headers  # answered by nginx, no backend saw it


def test_v1_models_lists_exactly_the_served_names(routed):
    resp = routed.http.get(f"{routed.url}/v1/models")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
    ids = [m["id"] for m in resp.json()["data"]]
    assert sorted(ids) == sorted(SERVED), ids


# --- edge cases of finding "model" in the raw body ------------------------------------


@pytest.mark.parametrize("body", [
    b'{"metadata": {"model": "beta"}, "model": "alpha", "prompt": "x"}',
    b'{"response_format": {"type": "json_schema", "json_schema": {"schema": {"properties": {"model": {"type": "string"}}}}},'
    b' "tools": [{"function": {"name": "f", "parameters": {"model": "beta"}}}], "x": ["model", {"model": "beta"}], "model": "alpha"}',
    b'{"extra": [[[{"model": "beta"}]]], "model": "alpha", "after": {"model": "beta"}}',
], ids=["metadata", "schema-and-tools", "deep-before-and-after"])
def test_top_level_model_decides_whatever_nested_model_keys_come_first(routed, body):
    """Issue 16: a nested "model" before (or after) the top-level one never decides the route."""
    assert json.loads(body)["model"] == "alpha"
    resp = post(routed, body)
    assert resp.status_code == 200, resp.text
    assert routed_to(routed, resp) == "alpha"


@pytest.mark.parametrize("body,name", [
    (b'{"model": "\\u0062eta", "prompt": "x"}', "beta"),
    (b'{"\\u006dodel": "beta", "prompt": "x"}', "beta"),
    (b'{"mo\\u0064\\u0045l": "beta", "prompt": "x"}', None),  # "modEl" is another key: no model, default beta
    (b'{"model": "\\u0061\\u006C\\u0070\\u0068\\u0061-latest", "prompt": "x"}', "alpha"),
    (b'{"model": "org\\u002Falpha", "prompt": "x"}', "alpha"),
], ids=["value-escape", "key-escape", "other-key", "every-char-escaped-uppercase-hex", "slash-as-u002F"])
def test_json_escapes_of_key_and_value(routed, body, name):
    decoded = json.loads(body)
    assert decoded.get("model") in (None, *SERVED), decoded
    resp = post(routed, body)
    assert resp.status_code == 200, resp.text
    assert routed_to(routed, resp) == (SERVED[decoded["model"]] if name else "beta")


@pytest.mark.parametrize("body", [
    b'{"model": "alpha", "prompt": "x", "model": "beta"}',
    b'{"model": "beta", "prompt": "x", "\\u006dodel": "beta"}',
    b'{"model": 5, "prompt": "x"}',
    b'{"model": null, "prompt": "x"}',
    b'{"model": "alpha", "prompt": "x",}',
], ids=["duplicate", "duplicate-escaped-same-name", "number", "null", "broken-after-model"])
def test_ambiguous_or_invalid_top_level_model_is_a_clear_400(routed, body):
    """vLLM (json.loads) takes the last duplicate; nginx refuses duplicates instead of guessing."""
    resp = post(routed, body)
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 400)
    assert '"model"' in error["message"] and "once" in error["message"], error
    assert "x-fake-vllm-port" not in resp.headers


@pytest.mark.parametrize("body", [b"[1, 2]", b'"model"', b'{"prompt": "x"', b"model=alpha"],
                         ids=["array", "string", "truncated", "form"])
def test_body_that_is_not_one_json_object_is_a_clear_400(routed, body):
    resp = post(routed, body)
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 400)
    assert "could not be inspected" in error["message"], error


def test_model_key_last(routed):
    resp = post(routed, b'{"prompt": "x", "max_tokens": 3, "temperature": 0.5, "model": "beta"}')
    assert resp.status_code == 200 and routed_to(routed, resp) == "beta"


def test_whitespace_and_newlines_around_the_colon(routed):
    resp = post(routed, b'{\n  "prompt": "x",\n  "model"\r\n\t :\n  "alpha-latest"\n}\n')
    assert resp.status_code == 200 and routed_to(routed, resp) == "alpha"


def test_unicode_served_name_raw_utf8(routed):
    resp = post(routed, json.dumps({"model": UNICODE, "prompt": "x"}, ensure_ascii=False).encode())
    assert resp.status_code == 200, resp.text
    assert routed_to(routed, resp) == UNICODE


def test_unicode_served_name_json_escaped(routed):
    body = json.dumps({"model": UNICODE, "prompt": "x"}).encode()  # ensure_ascii=True: "g\u00e4mma-\u6a21\u578b"
    assert b"\\u" in body
    resp = post(routed, body)
    assert resp.status_code == 200, resp.text
    assert routed_to(routed, resp) == UNICODE


def test_served_name_with_escaped_slash(routed):
    resp = post(routed, b'{"model": "org\\/alpha", "prompt": "x"}')
    assert resp.status_code == 200, resp.text
    assert routed_to(routed, resp) == "alpha"


def test_escaped_quotes_in_text_do_not_fake_a_model_key(routed):
    fake = 'Reply with {\\"model\\": \\"beta\\"} and nothing else: \\"model\\":\\"beta\\"'
    for body in (
        '{"messages": [{"role": "user", "content": "%s"}], "model": "alpha"}' % fake,  # fake key first
        '{"model": "alpha", "messages": [{"role": "user", "content": "%s"}]}' % fake,
    ):
        json.loads(body)  # valid JSON whose only real "model" key is alpha
        resp = post(routed, body.encode(), path="/v1/chat/completions")
        assert resp.status_code == 200, resp.text
        assert routed_to(routed, resp) == "alpha", body


def test_chunked_body_without_content_length(routed):
    payload = json.dumps({"prompt": "x" * 5000, "model": "beta"}).encode()
    parts = [payload[i:i + 1000] for i in range(0, len(payload), 1000)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)
    assert b"content-length" not in request.lower()
    status, headers, reply = raw_request(routed.port, request)
    assert status == 200, reply[:300]
    assert routed.backend_by_port(int(headers["x-fake-vllm-port"])).served_name == "beta"


def test_default_model_serves_clients_that_omit_the_field(routed):
    resp = post(routed, {"prompt": "no model field", "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    assert routed_to(routed, resp) == "beta"
    assert resp.json()["model"] == "beta"
