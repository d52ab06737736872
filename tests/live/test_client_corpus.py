"""Promise (issue 16): bodies as real client libraries serialise them route by their top-level "model".

The corpus is produced by the libraries themselves, never written by hand:
- the official `openai` SDK, captured at its HTTP transport (httpx2.MockTransport):
  chat with tools and response_format, completions, embeddings, extra_body and
  metadata, several of which nest a "model" key naming ANOTHER served model;
- Go's encoding/json (tests/fixtures/go-json/main.go): a map (keys sorted, so
  "metadata" comes before "model") and a struct (declaration order), both with
  Go's default \\u003c \\u003e \\u0026 escapes;
- Python's json.dumps with ensure_ascii=True, pretty-printed (indent=2), and
  re-serialised with "model" moved last (what a gateway rebuilding the dict does);
- httpx and requests chunked uploads (generators: no Content-Length).
Each body goes through a real nginx to stand-in backends; the model json.loads
finds is the oracle, and every backend's request and misroute counters are checked.
"""

from __future__ import annotations

import collections
import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import requests

from tests.harness.deploy import stand_in_args
from tests.harness.tools import require_tool

pytestmark = pytest.mark.live

GO_PROGRAM = Path(__file__).resolve().parents[1] / "fixtures" / "go-json" / "main.go"
UNICODE = "gämma-模型"
# Served name -> first served name of its model (what the backend reports).
SERVED = {"alpha-a": "alpha-a", "A&B": "A&B", "a<b>/c": "A&B", UNICODE: UNICODE}
SPEC = {"models": [
    {"model": "org/alpha", "served_model_name": "alpha-a", "instances": 1, "gpus": [0], "extra_args": stand_in_args()},
    {"model": "org/amp", "name": "amp", "served_model_name": "A&B", "aliases": ["a<b>/c"], "instances": 1, "gpus": [1],
     "extra_args": stand_in_args()},
    {"model": "org/gamma", "name": "gamma", "served_model_name": UNICODE, "instances": 1, "gpus": [1],
     "extra_args": stand_in_args()},
]}


@pytest.fixture(scope="module")
def routed(module_live_deploy):
    return module_live_deploy(SPEC)


def other(name: str) -> str:
    """A served name of a different model, for nested "model" keys that must not count."""
    return next(n for n in SERVED if SERVED[n] != SERVED[name])


def sdk_bodies(name: str) -> list[tuple[str, str, bytes]]:
    """(label, path, body) exactly as the openai SDK sends them, captured at its transport."""
    import httpx2
    import openai

    captured: list[tuple[str, bytes]] = []

    def transport(request):
        captured.append((request.url.path, request.content))
        return httpx2.Response(200, json={})

    client = openai.OpenAI(base_url="http://capture.invalid/v1", api_key="k", max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(transport)))
    nested = other(name)
    schema = {"type": "object", "properties": {"model": {"type": "string", "enum": [nested]}}, "required": ["model"]}
    calls = [
        ("chat-tools-response-format", lambda: client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": f'Say {{"model": "{nested}"}} <b>&</b>'}],
            tools=[{"type": "function", "function": {"name": "pick", "parameters": schema}}],
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": schema}})),
        ("chat-metadata-stream", lambda: client.chat.completions.with_raw_response.create(
            model=name, messages=[{"role": "user", "content": "hi"}], metadata={"model": nested}, stream=True)),
        ("completion-extra-body", lambda: client.completions.with_raw_response.create(
            model=name, prompt="x", max_tokens=3, extra_body={"routing": {"model": nested}, "guided": [{"model": nested}]})),
        ("embedding", lambda: client.embeddings.with_raw_response.create(model=name, input=["a", nested])),
    ]
    out = []
    for label, call in calls:
        call()
        path, body = captured[-1]
        out.append((label, path, body))
    return out


def go_encodings(bodies: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(map, struct) encodings of each body by Go's encoding/json."""
    go = require_tool("go", "golang-go")
    done = subprocess.run([go, "run", str(GO_PROGRAM)], input=b"\n".join(bodies) + b"\n", capture_output=True,
                          timeout=120, env={"HOME": str(Path.home()), "PATH": "/usr/bin:/bin", "GOFLAGS": "-mod=mod",
                                            "GO111MODULE": "off", "GOCACHE": str(Path.home() / ".cache" / "go-build")})
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.splitlines()
    assert len(lines) == 2 * len(bodies), (len(lines), len(bodies))
    return [(lines[2 * i], lines[2 * i + 1]) for i in range(len(bodies))]


def corpus() -> list[tuple[str, str, bytes]]:
    out = []
    for name in SERVED:
        for label, path, body in sdk_bodies(name):
            doc = json.loads(body)
            moved = {k: v for k, v in doc.items() if k != "model"} | {"model": doc["model"]}
            out += [
                (f"sdk/{label}", path, body),
                (f"ensure_ascii/{label}", path, json.dumps(doc, ensure_ascii=True).encode()),
                (f"pretty/{label}", path, json.dumps(doc, indent=2, ensure_ascii=False).encode()),
                (f"model-last/{label}", path, json.dumps(moved, ensure_ascii=False).encode()),
            ]
    sdk = [(label, path, body) for label, path, body in out if label.startswith("sdk/")]
    for (label, path, body), (as_map, as_struct) in zip(sdk, go_encodings([b for _, _, b in sdk])):
        out += [(f"go-map/{label[4:]}", path, as_map), (f"go-struct/{label[4:]}", path, as_struct)]
    return out


def first_model_match(body: bytes) -> str:
    """What the old regex (first `"model": "..."` anywhere in the body) picked."""
    found = re.search(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
    return json.loads(b'"' + found.group(1) + b'"')


def pieces(body: bytes, size: int):
    for i in range(0, len(body), size):
        yield body[i:i + size]


def test_every_body_real_clients_send_reaches_its_models_backend(routed):
    bodies = corpus()
    # The corpus really contains what the issue is about (not only model-first ASCII bodies).
    assert any(b"\\u0026" in b for _, _, b in bodies) and any(b"\\u00e4" in b for _, _, b in bodies)
    first_match = [label for label, _, b in bodies if first_model_match(b) != json.loads(b)["model"]]
    assert len(first_match) >= len(SERVED) * 2, first_match  # the old "first match wins" regex misroutes these
    routed.reset_stats()
    expected = collections.Counter()
    wrong = []
    with httpx.Client(timeout=30, trust_env=False) as hx, requests.Session() as rq:
        for label, path, body in bodies:
            want = SERVED[json.loads(body)["model"]]
            url = f"{routed.url}{path}"
            headers = {"Content-Type": "application/json", "Authorization": "Bearer k"}
            sends = {
                "content-length": lambda: hx.post(url, content=body, headers=headers),
                "httpx-chunked": lambda: hx.post(url, content=pieces(body, 7), headers=headers),
                "requests-chunked": lambda: rq.post(url, data=pieces(body, 13), headers=headers, timeout=30),
            }
            for how, send in sends.items():
                resp = send()
                expected[want] += 1
                got = routed.backend_by_port(int(resp.headers["x-fake-vllm-port"])).served_name \
                    if "x-fake-vllm-port" in resp.headers else None
                if resp.status_code != 200 or got != want:
                    wrong.append((label, how, resp.status_code, got, want, resp.text[:120]))
    print(f"\n{len(bodies)} bodies x 3 ways: {sum(expected.values())} requests, {len(wrong)} wrong")
    assert not wrong, wrong[:10]
    stats = routed.all_stats()
    counted = {b.served_name: stats[b.port]["requests"] for b in routed.backends}
    assert counted == dict(expected), (counted, dict(expected))
    assert all(s["misrouted"] == 0 for s in stats.values()), stats


def test_chunked_uploads_really_are_chunked():
    """The two chunked senders above send no Content-Length (what the stand-in saw, not assumed)."""
    seen = []

    def capture(request: httpx.Request):
        seen.append(request.headers.get("transfer-encoding"))
        return httpx.Response(200)

    with httpx.Client(transport=httpx.MockTransport(capture)) as hx:
        hx.post("http://x/", content=pieces(b'{"model":"A&B"}', 7))
    prepared = requests.Request("POST", "http://x/", data=pieces(b'{"model":"A&B"}', 13)).prepare()
    assert seen == ["chunked"] and prepared.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in prepared.headers
