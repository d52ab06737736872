"""Promise: a start that never becomes healthy fails after --start-timeout and frees the GPU for the next.

Two stand-ins share GPU 0 under a real supervisord, --start-timeout 3. The first
never opens its port (its model "loads" forever). Its launcher stops it 3 s after
it took the GPU start lock (not 3 s per instance on the GPU, as before), releases
the lock, and the second instance, which waited for it, starts and serves
through nginx. The two start windows (stand-in exec -> exit or ready) never overlap.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from tests.harness.deploy import LiveDeployment, stand_in_args, wait_until
from tests.harness.procs import ProcessGroup

pytestmark = pytest.mark.live

START_TIMEOUT = 3


def test_hung_start_times_out_releases_the_lock_and_the_next_starts(procs: ProcessGroup, tmp_path):
    spec = {"timeouts": {"start": START_TIMEOUT}, "models": [{
        "model": "org/m", "served_model_name": "m", "instances": 2, "gpus": [0],
        "extra_args": stand_in_args(),
        # Instance 0 never listens: a model load that hangs.
        "instance_env": [{"VFGEN_FAKE_STARTUP_DELAY": "100000"}, {}],
    }]}
    d = LiveDeployment(tmp_path, procs, spec)
    try:
        d.start(wait=False)
        hung, next_ = d.backends
        plan = {i["name"]: i for i in d.plan["instances"]}
        print(f"\nplan: {[(n, i['lock_timeout'], i['start_timeout'], i['unit_start_timeout']) for n, i in plan.items()]}")
        assert plan[hung.program]["start_timeout"] == START_TIMEOUT  # not multiplied by the instances on GPU 0
        assert plan[next_.program]["lock_timeout"] == START_TIMEOUT + 30

        wait_until(lambda: d.backend_ready(next_), timeout=40, what=f"{next_.program} healthy")
        wait_until(lambda: d.http.get(f"{d.url}/health").status_code == 200, timeout=10, what="nginx /health 200")
        resp = d.http.post(f"{d.url}/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert resp.status_code == 200 and resp.headers["x-fake-vllm-port"] == str(next_.port), resp.text

        hung_log = (d.log_dir / f"{hung.program}.log").read_text()
        next_log = (d.log_dir / f"{next_.program}.log").read_text()
        print(f"--- {hung.program}\n{hung_log}--- {next_.program}\n{next_log}")
        assert f"not healthy after {START_TIMEOUT}s" in hung_log, hung_log
        assert "released GPU lock(s)" in hung_log
        assert not d.backend_ready(hung)

        # Start windows on GPU 0, exec -> exit (the hung one) or exec -> ready: never two at once,
        # and the first hung window is what the second one waited for.
        windows = {}
        for e in d.events():
            if e["event"] == "exec":
                windows[e["pid"]] = [e["t"], None, e["port"]]
            elif e["event"] in ("ready", "exit") and e["pid"] in windows and windows[e["pid"]][1] is None:
                windows[e["pid"]][1] = e["t"]
        ordered = sorted((w[0], w[1] if w[1] is not None else float("inf"), w[2]) for w in windows.values())
        print("start windows:", [(round(a - ordered[0][0], 2), round(b - ordered[0][0], 2), port) for a, b, port in ordered])
        assert all(b[0] >= a[1] for a, b in pairwise(ordered)), f"two starts overlapped on GPU 0: {ordered}"
        first_next = min(w for w in ordered if w[2] == next_.port)
        assert any(w[2] == hung.port and w[1] <= first_next[0] for w in ordered), ordered
    finally:
        d.stop()
