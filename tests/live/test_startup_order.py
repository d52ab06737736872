"""Issue 3 under a real supervisord: start-up is serialised per GPU, with timestamps.

The stand-in writes "exec" when its process starts and "ready" when its model
is listed; a start window is exec→ready (or exec→exit for a process that died
before it was ready). Windows of processes on the same GPU must never overlap;
windows on different GPUs may.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.harness.deploy import process_alive, wait_until

pytestmark = pytest.mark.live

STARTUP = ["--fake-startup-delay", "1.0"]


def start_windows(events: list[dict]) -> dict[int, tuple[float, float, int]]:
    """pid -> (exec time, ready-or-exit time, port)."""
    windows: dict[int, list] = {}
    for e in events:
        if e["event"] == "exec":
            windows[e["pid"]] = [e["t"], None, e["port"]]
        elif e["event"] in ("ready", "exit") and e["pid"] in windows and windows[e["pid"]][1] is None:
            windows[e["pid"]][1] = e["t"]
    return {pid: (w[0], w[1] if w[1] is not None else float("inf"), w[2]) for pid, w in windows.items()}


def overlapping(windows: list[tuple[float, float, int]]) -> list[tuple]:
    ordered = sorted(windows)
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if b[0] < a[1]]


def test_instances_on_one_gpu_start_one_after_another(live_deploy):
    d = live_deploy({"models": [{"model": "org/m", "served_model_name": "m", "instances": 3, "gpus": [0],
                                 "extra_args": STARTUP}]})
    by_port = {w[2]: w for w in start_windows(d.events()).values()}
    ports = [b.port for b in sorted(d.backends, key=lambda b: b.port)]
    for earlier, later in zip(ports, ports[1:]):
        print(f"port {earlier} ready at {by_port[earlier][1]:.2f}, port {later} exec at {by_port[later][0]:.2f}")
        assert by_port[earlier][1] <= by_port[later][0], f"instance on {later} started before {earlier} was healthy"


def test_instances_on_two_gpus_start_in_parallel(live_deploy):
    d = live_deploy({"models": [{"model": "org/m", "served_model_name": "m", "instances": 4, "gpus": [0, 1],
                                 "extra_args": STARTUP}]})
    backends = sorted(d.backends, key=lambda b: b.port)
    windows = {w[2]: w for w in start_windows(d.events()).values()}
    gpu0, gpu1 = windows[backends[0].port], windows[backends[1].port]
    assert gpu0[0] < gpu1[1] and gpu1[0] < gpu0[1], f"first instances of GPU 0 and 1 did not overlap: {gpu0} {gpu1}"
    for gpu in ("0", "1"):
        same = [windows[b.port] for b in backends if b.gpus == (gpu,)]
        assert not overlapping(same), f"GPU {gpu}: two instances were starting at once"


def test_a_crash_while_a_neighbour_starts_never_overlaps_two_starts(live_deploy):
    """Restart instance 1 (slow start), kill -9 instance 0 meanwhile: its restart waits for the GPU lock."""
    d = live_deploy({"models": [{"model": "org/m", "served_model_name": "m", "instances": 2, "gpus": [0],
                                 "extra_args": ["--fake-startup-delay", "2.0"]}]})
    wait_until(lambda: all(s == "RUNNING" for s in d.status().values()), timeout=30, what="all RUNNING")
    first, second = sorted(d.backends, key=lambda b: b.port)
    victim = d.vllm_pid(first)
    d.supervisorctl("stop", d.program(second))
    stopped_at = time.time()
    # `supervisorctl start` blocks for startsecs; run it aside and strike while the stand-in loads.
    starter = subprocess.Popen([d.supervisorctl_bin, "-c", str(d.supervisord_conf), "start", d.program(second)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: any(e["event"] == "exec" and e["port"] == second.port and e["t"] > stopped_at for e in d.events()),
               timeout=10, what="second instance loading again")
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not process_alive(victim), timeout=5, what="victim gone")
    assert starter.wait(timeout=30) == 0
    wait_until(lambda: d.backend_ready(first) and d.backend_ready(second), timeout=60, what="both healthy again")
    windows = list(start_windows(d.events()).values())
    restarts = [w for w in windows if w[0] > 0 and w[2] == first.port]
    assert len(restarts) >= 2, "instance 0 was not restarted by supervisord"
    clash = overlapping(windows)
    assert not clash, f"two instances on GPU 0 were starting at the same time: {clash}"
    log = (d.log_dir / f"{d.program(first).split(':')[-1]}.log").read_text(errors="replace")
    assert "waiting for lock" in log, "the restart never had to wait for the lock, so the test proved nothing"
