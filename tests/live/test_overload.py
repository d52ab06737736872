"""Promise: overload never drops a request, and nginx overflows only when every backend is full.

4 stand-ins, cap (max_batch_size = --max-num-seqs) 8 each, 0.2 s per request.
Phase A keeps the load at exactly 4 x 8: no backend may ever queue, which it
would if nginx had sent a 9th request to one backend while another had room.
Phase B sends 256 at once: every one succeeds, the excess waits in the stand-ins'
own queues, and the work is spread evenly.
"""

from __future__ import annotations

import pytest

from tests.harness.deploy import stand_in_args
from tests.harness.load import run_load

pytestmark = pytest.mark.live

CAP = 8
INSTANCES = 4
LATENCY = 0.2
BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}


def test_overload_without_drops(live_deploy):
    d = live_deploy({"models": [{
        "model": "org/m", "served_model_name": "m", "instances": INSTANCES, "gpus": [0, 1, 2, 3],
        "max_batch_size": CAP, "extra_args": stand_in_args(latency=LATENCY),
    }]})
    url = f"{d.url}/v1/completions"

    # Phase A: load exactly at the total cap. A backend only queues when it gets a
    # request beyond its cap, i.e. when nginx overflowed before all were full.
    at_cap = run_load(url, count=160, concurrency=CAP * INSTANCES, body=BODY, deadline=60)
    stats_a = d.all_stats()
    print(f"\nphase A (concurrency {CAP * INSTANCES}): {at_cap.summary()}")
    print("phase A max_in_flight/max_queued per backend:",
          {port: (s["max_in_flight"], s["max_queued"]) for port, s in stats_a.items()})
    assert not at_cap.failed, at_cap.summary()
    assert set(at_cap.per_backend) == {b.port for b in d.backends}, at_cap.summary()
    for port, s in stats_a.items():
        assert s["max_in_flight"] <= CAP, (port, s["max_in_flight"])
        assert s["max_queued"] == 0, f"backend {port} queued {s['max_queued']} while the load never exceeded the total cap"

    # Phase B: 256 at once, far beyond 4 x 8.
    d.reset_stats()
    overload = run_load(url, count=256, concurrency=256, body=BODY, deadline=90)
    stats_b = d.all_stats()
    print(f"phase B (concurrency 256): {overload.summary()}")
    print("phase B max_in_flight/max_queued per backend:",
          {port: (s["max_in_flight"], s["max_queued"]) for port, s in stats_b.items()})
    assert not overload.failed, overload.summary()
    mean = 256 / INSTANCES
    for b in d.backends:
        count = overload.per_backend[b.port]
        assert 0.75 * mean <= count <= 1.25 * mean, f"backend {b.port} got {count}, mean {mean}: {overload.summary()}"
        assert stats_b[b.port]["max_in_flight"] == CAP, (b.port, stats_b[b.port])  # every backend was full
    # The excess waited in the backends' own queues instead of being refused.
    assert sum(s["max_queued"] for s in stats_b.values()) > 0
    # Nothing was sent twice or lost between nginx and the backends.
    assert sum(s["requests"] for s in stats_b.values()) == 256
