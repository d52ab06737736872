"""Promise: SSE responses pass through nginx chunk by chunk, not buffered until the end.

The stand-in streams 20 chunks 0.1 s apart. Through the dispatcher the first
chunk must arrive long before the last, and the arrivals must be spread out the
way they were sent. Checked for one model (plain proxy_pass) and for several
models (routing by the body, where `mirror` reads the body first).
"""

from __future__ import annotations

import itertools
import json
import time

import httpx
import pytest

from tests.harness.deploy import stand_in_args

pytestmark = pytest.mark.live

CHUNKS = 20
INTERVAL = 0.1
STREAMING = stand_in_args(chunks=CHUNKS, chunk_interval=INTERVAL)

SPECS = {
    "single-model": {"models": [
        {"model": "org/m", "served_model_name": "m", "instances": 2, "gpus": [0, 1], "extra_args": STREAMING},
    ]},
    "routed-by-model": {"models": [
        {"model": "org/m", "served_model_name": "m", "instances": 1, "gpus": [0], "extra_args": STREAMING},
        {"model": "org/other", "served_model_name": "other", "instances": 1, "gpus": [1], "extra_args": STREAMING},
    ]},
}


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_sse_arrives_chunk_by_chunk(live_deploy, kind):
    d = live_deploy(SPECS[kind])
    body = {"model": "m", "prompt": "count", "max_tokens": CHUNKS, "stream": True}
    arrivals: list[tuple[float, str]] = []
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        sent = time.monotonic()
        with client.stream("POST", f"{d.url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream"), resp.headers
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.monotonic() - sent, line[len("data: "):]))
    times = [t for t, _ in arrivals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"\n{kind}: {len(arrivals)} events; first at {times[0] * 1000:.0f} ms, last at {times[-1] * 1000:.0f} ms; "
          f"gaps (ms) {[round(g * 1000) for g in gaps]}")

    assert arrivals[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in arrivals[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [f" tok{i}" for i in range(CHUNKS)]
    span = (CHUNKS - 1) * INTERVAL
    assert times[0] < 0.5 * span, f"first chunk only after {times[0]:.2f}s: the response was buffered"
    assert times[CHUNKS - 1] - times[0] > 0.8 * span, f"chunks arrived bunched: {times}"
    # Each chunk arrives about when it was sent, not in bursts.
    spaced = sum(1 for g in gaps[: CHUNKS - 1] if g > INTERVAL / 2)
    assert spaced >= CHUNKS - 4, f"only {spaced} of {CHUNKS - 1} gaps look like the sender's interval: {gaps}"
