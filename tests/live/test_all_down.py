"""Promise: with every backend down, clients get JSON errors (never nginx's HTML), and recovery is automatic.

All programs are stopped through supervisorctl: the dispatcher's /health answers
503 with a JSON body and an inference request gets an OpenAI-style 503 error
with Retry-After. Starting one program again brings /health back to 200 and
requests succeed again.
"""

from __future__ import annotations

import json

import pytest

from tests.harness.deploy import assert_json_error, stand_in_args, wait_until

pytestmark = pytest.mark.live

BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}


def test_all_backends_down_then_one_back(live_deploy):
    # CLI form of the deployment (the harness also takes a deployment-file mapping).
    d = live_deploy(["org/m", "--served-model-name", "m", "-n", "2", "--cuda-devices", "0,1",
                     "--max-batch-size", "4", "--", *stand_in_args()])
    assert d.http.post(f"{d.url}/v1/completions", json=BODY).status_code == 200

    d.supervisorctl("stop", *(d.program(b) for b in d.backends))
    assert set(d.status().values()) == {"STOPPED"}, d.status()
    assert not d.instance_pids(), f"stopping every program left processes running: {d.instance_pids()}"

    health = d.http.get(f"{d.url}/health")
    assert health.status_code == 503, health.text
    assert health.headers["content-type"].startswith("application/json"), health.headers
    assert health.json()["status"] == "unhealthy"

    for attempt in range(2):  # the second one meets backends nginx already marked failed
        resp = d.http.post(f"{d.url}/v1/completions", json=BODY)
        error = assert_json_error(resp.status_code, resp.headers, resp.content, 503)
        assert resp.headers.get("retry-after") == "1", resp.headers
        print(f"\nall down, attempt {attempt}: {resp.status_code} {json.dumps(error)}")

    first = d.backends[0]
    d.supervisorctl("start", d.program(first))
    wait_until(lambda: d.http.get(f"{d.url}/health").status_code == 200, timeout=30, what="/health 200")
    # nginx skips a failed backend for fail_timeout (5 s by default), then tries it again.
    wait_until(lambda: d.http.post(f"{d.url}/v1/completions", json=BODY).status_code == 200,
               timeout=20, interval=0.5, what="a request served again")
    resp = d.http.post(f"{d.url}/v1/completions", json=BODY)
    assert resp.status_code == 200 and resp.headers["x-fake-vllm-port"] == str(first.port)
