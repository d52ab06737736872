"""Promise: after a total outage, requests succeed from the moment any backend accepts them again.

During an outage nginx's passive checks mark every server of the pool failed,
the capped primaries and the `backup` overflow entries alike. A failed server
then gets one trial request at a time after fail_timeout, and the backups only
ever see overflow, so without a remedy they stay failed long after their
backend is back, and the next burst that overflows the caps is refused (503).
vfgen's remedy is a last-resort upstream per model (every backend once,
`max_fails=0`, like the dispatcher's /health) that the fallback location tries
when the pool has no live server.

4 stand-ins, cap 2 each (total capacity 8), bursts of 12 x 8 = 96 concurrent
requests. Every non-2xx and every socket error counts as a failure.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.harness.deploy import assert_json_error, stand_in_args
from tests.harness.load import run_load, start_load

pytestmark = pytest.mark.live

BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}
INSTANCES = 4
CAP = 2
BURST = 12 * INSTANCES * CAP
LATENCY = 0.05


def _deploy(live_deploy, fail_timeout: int = 5, **extra):
    return live_deploy({**extra, "timeouts": {"fail": fail_timeout}, "models": [{
        "model": "org/m", "served_model_name": "m", "instances": INSTANCES, "gpus": list(range(INSTANCES)),
        "max_batch_size": CAP, "extra_args": stand_in_args(latency=LATENCY),
    }]})


def _outage(d) -> None:
    """Stop every backend, then send requests so nginx marks every server failed."""
    d.supervisorctl("stop", *(d.program(b) for b in d.backends))
    assert set(d.status().values()) == {"STOPPED"}, d.status()
    result = run_load(f"{d.url}/v1/completions", count=16, concurrency=16, body=BODY, deadline=30)
    assert result.statuses == {503: 16}, result.summary()
    for reply in result.replies:
        assert_json_error(reply.status, reply.headers, reply.body, 503)
    assert d.http.get(f"{d.url}/health").status_code == 503


def _burst_right_after(d, healthy_at: float, count: int = BURST):
    """A burst of `count` concurrent requests; the test is void unless it began within 1 s of `healthy_at`."""
    began = time.monotonic()
    result = run_load(f"{d.url}/v1/completions", count=count, concurrency=count, body=BODY, deadline=60)
    assert began - healthy_at < 1.0, f"the burst began {began - healthy_at:.2f}s after /health 200: too late to prove it"
    return result


def _wait_all(starters) -> None:
    for proc in starters:
        proc.wait(timeout=60)


def _failures(result):
    return [(r.status, r.error, r.body[:120]) for r in result.failed][:5]


def test_all_back_at_once_then_burst_then_kill(live_deploy):
    d = _deploy(live_deploy)
    _outage(d)

    starters = d.start_programs(d.backends)
    first, healthy_at = d.first_healthy(d.backends, timeout=30)
    burst = _burst_right_after(d, healthy_at)
    print(f"\nfirst back: {first.program}; burst right after its /health 200: {burst.summary()}")
    assert not burst.failed, _failures(burst)
    _wait_all(starters)
    d.wait_healthy()

    # kill -9 one backend while a 200-request burst runs: the cut requests are retried elsewhere.
    victim = d.backends[1]
    load = start_load(f"{d.url}/v1/completions", count=200, concurrency=BURST, body=BODY, deadline=60)
    load.wait_for_progress(20, timeout=30)
    os.kill(d.vllm_pid(victim), signal.SIGKILL)
    result = load.result()
    print(f"kill -9 of {victim.program} during a 200-request burst: {result.summary()}")
    assert len(result.replies) == 200 and not result.failed, _failures(result)
    cut = [line for line in d.nginx_error_log().splitlines()
           if "prematurely closed" in line and f"127.0.0.1:{victim.port}/" in line]
    assert cut, "the kill interrupted no in-flight request, so it proved nothing"


def test_backends_come_back_one_at_a_time(live_deploy):
    d = _deploy(live_deploy)
    _outage(d)
    up, starters = [], []
    try:
        for backend in d.backends:
            starters += d.start_programs([backend])
            _, healthy_at = d.first_healthy([backend], timeout=30)
            up.append(backend)
            burst = _burst_right_after(d, healthy_at)
            print(f"\n{len(up)} backend(s) back ({backend.program} just now): {burst.summary()}")
            assert not burst.failed, (len(up), _failures(burst))
            assert set(burst.per_backend) <= {b.port for b in up}, burst.per_backend
    finally:
        _wait_all(starters)


def test_latent_state_after_recovery_and_light_load(live_deploy):
    # fail_timeout 1 s: the seconds of light load below stand for minutes at the default 5 s.
    d = _deploy(live_deploy, fail_timeout=1)
    _outage(d)
    _wait_all(d.start_programs(d.backends))
    d.wait_healthy()
    # Full recovery, then light load that never overflows the caps (at most 4 at once, capacity 8),
    # for several fail_timeouts: the primaries serve it, the backups see nothing.
    light = run_load(f"{d.url}/v1/completions", count=240, concurrency=4, body=BODY, deadline=60)
    print(f"\nlight load after the recovery: {light.summary()}")
    assert not light.failed, _failures(light)
    assert light.elapsed > 3, f"the light load lasted {light.elapsed:.1f}s, under 3 fail_timeouts"
    stats = d.all_stats()
    assert all(s["max_queued"] == 0 for s in stats.values()), f"the light load overflowed: {stats}"
    # Then a sudden burst that overflows every cap.
    burst = run_load(f"{d.url}/v1/completions", count=BURST, concurrency=BURST, body=BODY, deadline=60)
    print(f"sudden burst of {BURST}: {burst.summary()}")
    assert not burst.failed, _failures(burst)
    assert any(s["max_queued"] > 0 for s in d.all_stats().values()), "the burst never overflowed the caps"


def test_bounded_queue_serves_right_after_an_outage_and_keeps_its_bound(live_deploy):
    # --max-queue has no last-resort pool (its own max_conns counters would break the bound):
    # its capped backups are never marked failed instead, so they serve as soon as a backend is back.
    queue = 2
    d = _deploy(live_deploy, max_queue=queue)
    _outage(d)
    starters = d.start_programs(d.backends[:1])
    _, healthy_at = d.first_healthy(d.backends[:1], timeout=30)
    # The primaries are still marked failed (fail_timeout): the backup entry takes up to `queue`.
    burst = _burst_right_after(d, healthy_at, count=queue)
    print(f"\nbounded, one backend back: {burst.summary()}")
    assert not burst.failed, _failures(burst)
    _wait_all(starters + d.start_programs(d.backends[1:]))
    d.wait_healthy()
    d.reset_stats()
    over = run_load(f"{d.url}/v1/completions", count=BURST, concurrency=BURST, body=BODY, deadline=60)
    stats = d.all_stats()
    print(f"bounded, all back, burst of {BURST}: {over.summary()}; "
          f"max in flight/queued {[(s['max_in_flight'], s['max_queued']) for s in stats.values()]}")
    assert set(over.statuses) <= {200, 503} and over.statuses[200] >= INSTANCES * CAP, over.summary()
    assert all(s["max_in_flight"] <= CAP and s["max_queued"] <= queue for s in stats.values()), stats


def _tried(access_log: str, port: int) -> tuple[int, int]:
    """(completions logged, those whose upstream attempts include 127.0.0.1:PORT)."""
    lines = [line for line in access_log.splitlines() if "/v1/completions" in line]
    return len(lines), sum(1 for line in lines if f'127.0.0.1:{port}' in line.split('upstream="', 1)[1].split('"', 1)[0])


@pytest.mark.parametrize("max_queue", [None, 2], ids=["unbounded", "max-queue-2"])
def test_what_a_dead_backend_costs(live_deploy, max_queue):
    # docs/operations.md, "What a dead backend costs each request": one of 4 backends is down.
    d = _deploy(live_deploy, **({} if max_queue is None else {"max_queue": max_queue}))
    dead = d.backends[3]
    d.supervisorctl("stop", d.program(dead))
    assert not run_load(f"{d.url}/v1/completions", count=8, concurrency=1, body=BODY).failed  # marks it failed
    # Under the caps, then overflowing them (within the bound in bounded mode: 3 x (2 + 2) = 12).
    for concurrency in (4, 24 if max_queue is None else 10):
        mark = len(d.nginx_access_log())
        result = run_load(f"{d.url}/v1/completions", count=200, concurrency=concurrency, body=BODY, deadline=60)
        logged, tried_dead = _tried(d.nginx_access_log()[mark:], dead.port)
        print(f"\n{'unbounded' if max_queue is None else f'max_queue={max_queue}'}, concurrency {concurrency}: "
              f"{tried_dead} of {logged} requests tried the dead backend (one refused connect each); {result.summary()}")
        assert not result.failed, _failures(result)
        if concurrency == 4:
            assert tried_dead == 0  # no overflow: the dead backend's entries stay marked failed
        elif max_queue is not None:
            assert tried_dead > 0  # its never-failed backup entry is tried, refused, and skipped
