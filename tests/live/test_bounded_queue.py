"""Promise: with max_queue, overload beyond caps + queues is refused fast with 503 + Retry-After, never worse.

2 backends, cap 2, max_queue 2, 0.5 s per request: at most 2 x (2 + 2) = 8
requests can be inside at once. 40 at once must give only 200s and 503s, the
503s with Retry-After and an OpenAI-style JSON body, and no backend may hold
more than its cap in service plus max_queue waiting.
"""

from __future__ import annotations

import pytest

from tests.harness.deploy import assert_json_error, stand_in_args
from tests.harness.load import run_load

pytestmark = pytest.mark.live

CAP = 2
QUEUE = 2
INSTANCES = 2
LATENCY = 0.5


def test_bounded_queue_refuses_excess_with_503(live_deploy):
    d = live_deploy({"max_queue": QUEUE, "models": [{
        "model": "org/m", "served_model_name": "m", "instances": INSTANCES, "gpus": [0, 1],
        "max_batch_size": CAP, "extra_args": stand_in_args(latency=LATENCY),
    }]})
    result = run_load(f"{d.url}/v1/completions", count=40, concurrency=40,
                      body={"model": "m", "prompt": "hello"}, deadline=30)
    stats = d.all_stats()
    print(f"\n{result.summary()}")
    print("max_in_flight/max_queued per backend:", {p: (s["max_in_flight"], s["max_queued"]) for p, s in stats.items()})

    assert set(result.statuses) <= {200, 503}, result.summary()
    refused = [r for r in result.replies if r.status == 503]
    served = [r for r in result.replies if r.status == 200]
    assert refused, f"40 requests at once never hit the bound: {result.summary()}"
    assert len(served) >= CAP * INSTANCES, result.summary()
    for reply in refused:
        assert_json_error(reply.status, reply.headers, reply.body, 503)
        assert reply.headers.get("Retry-After") == "1", reply.headers
        assert reply.latency < LATENCY, f"a refusal took {reply.latency:.2f}s: it waited instead of failing fast"
    for port, s in stats.items():
        assert s["max_in_flight"] <= CAP and s["max_queued"] <= QUEUE, (port, s)
    assert sum(s["requests"] for s in stats.values()) == len(served)
