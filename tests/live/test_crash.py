"""Promise: a backend crash under load loses no request, and the backend comes back by itself.

During a 500-request load, one instance is killed with SIGKILL: either its vLLM
process (the launcher's child, found by the port it listens on) or the
`vfgen launch` wrapper itself (whose child then dies with it). nginx retries the
interrupted requests on other backends; supervisord restarts the program and the
restarted backend gets traffic again within 30 s.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.harness.deploy import parent_pid, process_alive, stand_in_args, wait_until
from tests.harness.load import run_load, start_load

pytestmark = pytest.mark.live

BODY = {"model": "m", "prompt": "hello", "max_tokens": 4}
RECOVERY_S = 30.0


@pytest.mark.parametrize("victim_kind", ["vllm", "launcher"])
def test_crash_under_load_loses_nothing_and_recovers(live_deploy, victim_kind):
    d = live_deploy({"models": [{
        "model": "org/m", "served_model_name": "m", "instances": 4, "gpus": [0, 1, 2, 3],
        "max_batch_size": 8, "extra_args": stand_in_args(latency=0.2),
    }]})
    # Past startsecs, so the kill is a crash of a RUNNING program, not a failed start.
    wait_until(lambda: all(s == "RUNNING" for s in d.status().values()), timeout=20, what="all programs RUNNING")
    victim = d.backends[1]
    old_vllm = d.vllm_pid(victim)
    launcher = d.launcher_pid(victim)
    assert parent_pid(old_vllm) == launcher, "the stand-in on the port is not the launcher's child"
    target = old_vllm if victim_kind == "vllm" else launcher

    load = start_load(f"{d.url}/v1/completions", count=500, concurrency=24, body=BODY, deadline=90)
    load.wait_for_progress(100, timeout=30)
    os.kill(target, signal.SIGKILL)
    killed_at = time.monotonic()
    result = load.result()
    print(f"\nkilled {victim_kind} pid {target} of {victim.program} after 100+ requests: {result.summary()}")
    assert not result.failed, [(r.status, r.error, r.body[:200]) for r in result.failed][:5]
    assert len(result.replies) == 500
    # The kill cut requests that were in flight on the victim; nginx retried them elsewhere.
    interrupted = [line for line in d.nginx_error_log().splitlines()
                   if "prematurely closed" in line and f"127.0.0.1:{victim.port}/" in line]
    print(f"requests in flight on the victim when it died, retried by nginx: {len(interrupted)}")
    assert interrupted, "the kill interrupted no in-flight request, so it proved nothing"

    # The whole instance went down: a killed launcher takes its child with it.
    wait_until(lambda: not process_alive(old_vllm), timeout=5, what=f"old stand-in {old_vllm} gone")
    # supervisord restarts it, and nginx sends it traffic again.
    new_pid = wait_until(lambda: _new_listener(d, victim, old_vllm), timeout=RECOVERY_S, what="restarted stand-in")
    served = 0
    while served == 0:
        assert time.monotonic() - killed_at < RECOVERY_S, f"{victim.program} got no traffic {RECOVERY_S}s after the kill"
        probe = run_load(f"{d.url}/v1/completions", count=16, concurrency=16, body=BODY, deadline=20)
        assert not probe.failed, probe.summary()
        served = probe.per_backend[victim.port]
        if served == 0:
            time.sleep(0.5)
    recovered = time.monotonic() - killed_at
    stats = d.stats(victim)
    print(f"{victim.program}: new pid {new_pid} serving again {recovered:.1f}s after the kill "
          f"({stats['requests']} requests so far)")
    assert stats["pid"] == new_pid
    starts = [e for e in d.events() if e["port"] == victim.port and e["event"] == "exec"]
    assert len(starts) == 2, f"expected exactly one restart of port {victim.port}, events: {starts}"


def _new_listener(d, victim, old_pid: int) -> int | None:
    try:
        pid = d.vllm_pid(victim)
    except RuntimeError:
        return None
    return pid if pid != old_pid and d.backend_ready(victim) else None
