"""`vfgen rollout` under continuous load: every instance drained, restarted one at a time, 0 failed requests.

The drain is proven by nginx's access log: no request met a failing backend first (no
upstream 5xx or refused connection that nginx then retried elsewhere). The load opens one
connection per request: the drain reloads nginx, and a reload closes keep-alive client
connections after their current response (docs/operations.md).
"""

from __future__ import annotations

import re

import pytest

from tests.harness.deploy import stand_in_args
from tests.harness.load import start_load

pytestmark = pytest.mark.live


def test_rollout_under_load_fails_no_request(live_deploy):
    d = live_deploy({"models": [{"model": "org/m", "served_model_name": "m", "instances": 3, "gpus": [0, 1, 2],
                                 "max_batch_size": 8, "extra_args": stand_in_args(latency=0.05)}]})
    before = {b.port: d.vllm_pid(b) for b in d.backends}
    load = start_load(f"{d.url}/v1/completions", count=4000, concurrency=8,
                      body={"model": "m", "prompt": "hi", "max_tokens": 4}, deadline=120, keepalive=False)
    load.wait_for_progress(100, timeout=30)
    log_before = len(d.nginx_access_log())
    nginx = f"{d.nginx_bin} -c {d.root / 'nginx.conf'} -p {d.run_dir}"
    rollout = d._vfgen("rollout", ["--supervisorctl", f"{d.supervisorctl_bin} -c {d.supervisord_conf}", "--timeout", "60",
                                   "--output-dir", str(d.out), "--nginx", nginx])
    done_during_rollout = load.completed
    result = load.result()
    print(f"\n{rollout.stderr}\n{result.summary()}")
    assert done_during_rollout < 4000, "the load ended before the rollout did, so it proved nothing"
    assert not result.failed, [(r.status, r.error, r.body[:200]) for r in result.failed][:5]
    after = {b.port: d.vllm_pid(b) for b in d.backends}
    assert all(after[port] != before[port] for port in before), "not every instance was restarted"
    assert set(result.per_backend) == set(before), "some instance got no traffic"
    assert rollout.stderr.count("drained") == 3, rollout.stderr
    retried = [line for line in d.nginx_access_log()[log_before:].splitlines()
               if re.search(r'upstream_status="[^"]*\b5\d\d\b', line)]
    assert not retried, f"{len(retried)} request(s) met a failing backend first: {retried[:3]}"
    assert not re.search(r"^\s+server \S+ .*\bdown;$", d.nginx_conf_d.read_text(), re.MULTILINE)
