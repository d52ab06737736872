"""`vfgen apply` under continuous load, real nginx and supervisord: scale, change, add and remove models.

For every change a load generator runs before, during and after the apply and counts
every non-2xx answer and socket error; a sampler reads, every 50 ms, which stand-in
processes exist and the --gpu-memory-utilization each was started with, and sums
them per GPU (CUDA_VISIBLE_DEVICES of the process). Afterwards: no stale program or
file, foreign files in vfgen's directories untouched, and nginx's access log shows
no request that met a 5xx from a backend (so none was saved by nginx retrying a
draining or stopped instance).

The load opens one connection per request: every nginx reload closes keep-alive client
connections after their current response, and a client reusing one at that instant
gets a connection error whatever vfgen renders (docs/operations.md has the numbers).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import pytest

from tests.harness.deploy import LiveDeployment, stand_in_args, wait_until
from tests.harness.load import start_load
from tests.harness.shares import ShareSampler, argv_of

pytestmark = pytest.mark.live

BUDGET = 0.92
FOREIGN = ("etc/nginx/conf.d/foreign.conf", "etc/supervisor/conf.d/foreign.txt", "etc/prometheus/file_sd/other.json",
           "etc/systemd/system/foreign.service")


def _put_foreign_files(d: LiveDeployment) -> dict[str, str]:
    hashes = {}
    for rel in FOREIGN:
        path = d.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# not vfgen's: {rel}\n")
        hashes[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def _assert_foreign_untouched(d: LiveDeployment, hashes: dict[str, str]) -> None:
    for rel, digest in hashes.items():
        path = d.out / rel
        assert path.exists(), f"apply removed a file vfgen never wrote: {path}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"apply changed {path}"


def _upstream_failures(log: str) -> list[str]:
    """Access-log lines where some backend answered 5xx (or none answered) before nginx found another."""
    return [line for line in log.splitlines() if re.search(r'upstream_status="[^"]*\b5\d\d\b', line)]


def _down_servers(d: LiveDeployment) -> set[str]:
    """Backend servers the nginx config marks `down` (the one-line error-route upstreams aside)."""
    return set(re.findall(r"^\s+server (\S+) .*\bdown;$", d.nginx_conf_d.read_text(), re.MULTILINE))


def _listener_argv(d: LiveDeployment, port: int) -> list[str]:
    return argv_of(d.vllm_pid(d.backend_by_port(port)))


def apply_under_load(d: LiveDeployment, spec, model: str = "m", *, concurrency: int = 8) -> tuple[str, dict[str, float]]:
    """Apply `spec` while load runs before, during and after; assert 0 failures and the budget."""
    log_before = len(d.nginx_access_log())
    load = start_load(f"{d.url}/v1/completions", count=100_000, concurrency=concurrency,
                      body={"model": model, "prompt": "hi", "max_tokens": 4}, deadline=240, keepalive=False)
    load.wait_for_progress(50, timeout=30)
    with ShareSampler(lambda: d.instance_pids()) as sampler:
        began = load.completed
        result = d.apply(spec, check=False)
        during = load.completed - began
        time.sleep(0.5)  # a little load after the apply, on the final config
    replies = load.stop()
    print(f"\n{result.stdout}\n{result.stderr}\n{replies.summary()}\npeak shares {sampler.peak} over {sampler.samples} samples")
    assert result.returncode == 0, f"apply failed:\n{result.stdout}\n{result.stderr}"
    assert during > 50, f"only {during} requests completed during the apply: the load proved nothing"
    assert not replies.failed, [(r.status, r.error, r.body[:200]) for r in replies.failed][:5]
    assert sampler.samples > 20, sampler.samples
    assert all(total <= BUDGET + 1e-9 for total in sampler.peak.values()), f"GPU over budget: {sampler.peak}"
    retried = _upstream_failures(d.nginx_access_log()[log_before:])
    assert not retried, f"{len(retried)} request(s) met a failing backend first: {retried[:3]}"
    return result.stdout, sampler.peak


def assert_converged(d: LiveDeployment, foreign: dict[str, str]) -> None:
    """Exactly the planned programs run, the files are what render would write, nothing stale."""
    wanted = {b.program: "RUNNING" for b in d.backends}
    # supervisord says STARTING for startsecs=5 after a start, healthy or not.
    wait_until(lambda: d.status() == wanted or None, timeout=15, what=f"programs {wanted}")
    dry = d._vfgen("render", ["--output-dir", str(d.out), "--dry-run"]).stdout
    assert dry.strip() and all(line.startswith("unchanged") for line in dry.splitlines()), dry
    assert not _down_servers(d), f"servers still marked down: {_down_servers(d)}"
    reread = d.supervisorctl("reread").stdout
    assert "No config updates" in reread, reread
    _assert_foreign_untouched(d, foreign)
    for b in d.backends:  # each answers with its new settings
        assert d.backend_ready(b), b


def _spec(instances: int, batch: int = 4, latency: float = 0.05, gpus=(0,)) -> dict:
    return {"models": [{"model": "org/m", "served_model_name": "m", "instances": instances, "gpus": list(gpus),
                        "max_batch_size": batch, "extra_args": stand_in_args(latency=latency)}]}


def test_apply_4_2_4_batch_size_and_vllm_arg_under_load(live_deploy):
    d = live_deploy(_spec(4))
    foreign = _put_foreign_files(d)
    assert {_listener_argv(d, b.port)[_listener_argv(d, b.port).index("--gpu-memory-utilization") + 1]
            for b in d.backends} == {"0.23"}

    # 4 -> 2: two instances drained, stopped and dropped; 0 and 1 restarted at 0.46, one at a time.
    out, peak = apply_under_load(d, _spec(2))
    assert [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["stop"], ["restart"], ["start"])] == [
        ["stop", "live-m-3"], ["stop", "live-m-2"], ["restart", "live-m-0"], ["restart", "live-m-1"]], out
    assert len(d.backends) == 2
    for b in d.backends:
        argv = _listener_argv(d, b.port)
        assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.46", argv
    assert_converged(d, foreign)

    # 2 -> 4: 0 and 1 first shrink to 0.23, then 2 and 3 start.
    out, peak = apply_under_load(d, _spec(4))
    assert [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["stop"], ["restart"], ["start"])] == [
        ["restart", "live-m-0"], ["restart", "live-m-1"], ["start", "live-m-2"], ["start", "live-m-3"]], out
    assert_converged(d, foreign)

    # --max-batch-size 4 -> 8: every instance restarted with --max-num-seqs 8, nginx caps 8.
    apply_under_load(d, _spec(4, batch=8))
    for b in d.backends:
        argv = _listener_argv(d, b.port)
        assert argv[argv.index("--max-num-seqs") + 1] == "8", argv
    assert "max_conns=8 " in d.nginx_conf_d.read_text()
    assert_converged(d, foreign)

    # A changed vLLM argument (passed through after --).
    apply_under_load(d, _spec(4, batch=8, latency=0.03))
    for b in d.backends:
        argv = _listener_argv(d, b.port)
        assert argv[argv.index("--fake-latency") + 1] == "0.03", argv
    assert_converged(d, foreign)


def test_apply_adds_and_removes_a_model_under_load(live_deploy):
    def model(key: str) -> dict:
        return {"model": f"org/{key}", "served_model_name": key, "instances": 2, "gpus": [0, 1],
                "max_batch_size": 4, "extra_args": stand_in_args(latency=0.05)}

    d = live_deploy({"models": [model("a"), model("b")]})
    foreign = _put_foreign_files(d)
    # a removed, c added; b's instances move to the ports a had (ports are consecutive).
    out, _ = apply_under_load(d, {"models": [model("b"), model("c")]}, model="b")
    assert sorted(b.program for b in d.backends) == ["live-b-0", "live-b-1", "live-c-0", "live-c-1"]
    assert_converged(d, foreign)
    for name, status in (("c", 200), ("b", 200), ("a", 404)):
        resp = d.http.post(f"{d.url}/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
        assert resp.status_code == status, (name, resp.status_code, resp.text)


def test_broken_changes_stop_with_a_clear_error_and_the_old_deployment_serves(live_deploy):
    def spec(instances: int, listen: str | None = None, batch: int = 4) -> dict:
        s = {"models": [{"model": "org/m", "served_model_name": "m", "instances": instances, "gpus": [0, 1, 2],
                         "gpu_memory_utilization": 0.3, "max_batch_size": batch, "extra_args": stand_in_args(latency=0.05),
                         # instance 2 (only in the 3-instance spec) never registers its model
                         "instance_env": [{}] * instances if instances < 3 else [{}, {}, {"VFGEN_FAKE_REGISTER_DELAY": "1000"}]}],
             "timeouts": {"start": 6}}
        if listen:
            s["listen"] = listen
        return s

    d = live_deploy(spec(2))
    conf_before = d.nginx_conf_d.read_text()
    pids_before = {b.port: d.vllm_pid(b) for b in d.backends}
    manifest = d.out / "var/lib/vfgen-manifest/live.json"
    instances_before = json.loads(manifest.read_text())["instances"]

    # 1. nginx -t fails (the new listen address is not on this host): nothing changes.
    load = start_load(f"{d.url}/v1/completions", count=100_000, concurrency=4,
                      body={"model": "m", "prompt": "hi", "max_tokens": 4}, deadline=120, keepalive=False)
    load.wait_for_progress(20, timeout=30)
    result = d.apply(spec(2, listen="192.0.2.1", batch=8), check=False)
    print(result.stdout, result.stderr)
    assert result.returncode == 1, result.stdout
    assert "Error: apply stopped: nginx -t (the new config)" in result.stderr, result.stderr
    assert "192.0.2.1" in result.stdout + result.stderr  # nginx's own message names the address
    assert "done: nothing" in result.stdout, result.stdout
    not_done = next(line for line in result.stdout.splitlines() if line.startswith("not done: "))
    assert not_done.startswith("not done: check nginx, write ") and "restart live-m-0" in not_done, not_done
    assert "could not update nginx" not in result.stdout, result.stdout
    assert d.nginx_conf_d.read_text() == conf_before, "the running nginx config was not put back"
    assert {b.port: d.vllm_pid(b) for b in d.backends} == pids_before, "an instance was restarted"
    assert json.loads(manifest.read_text())["instances"] == instances_before

    # 2. A new instance never becomes healthy: apply stops, says so, stops it again; 0 and 1 keep serving.
    result = d.apply(spec(3), check=False)
    print(result.stdout, result.stderr)
    replies = load.stop()
    print(replies.summary())
    assert result.returncode == 1, result.stdout
    assert "live-m-2 did not become healthy within 6s" in result.stderr, result.stderr
    assert "stopped it again" in result.stderr
    assert re.search(r"^done: .*check nginx", result.stdout, re.MULTILINE), result.stdout
    assert "not done: start live-m-2" in result.stdout, result.stdout
    assert not replies.failed, [(r.status, r.error, r.body[:200]) for r in replies.failed][:5]
    assert {p for p in replies.per_backend} == set(pids_before), replies.per_backend
    assert d.status().get("live-m-2") in ("STOPPED", "EXITED", "FATAL"), d.status()
    recorded = [i["name"] for i in json.loads(manifest.read_text())["instances"]]
    assert recorded == ["live-m-0", "live-m-1"], recorded
    # nginx never got a config with live-m-2 in it: it is not served, nothing else changed.
    assert d.nginx_conf_d.read_text() == conf_before


def test_a_model_added_to_a_shared_gpu_leaves_the_other_models_programs_running(live_deploy):
    """b added to a's GPU grows a's default --lock-timeout (60 -> 180 s), a start-time setting only:
    a's programs are rewritten in the conf and reread, never `update`d, so the same processes serve."""
    def model(key: str) -> dict:
        return {"model": f"org/{key}", "served_model_name": key, "instances": 2, "gpus": [0],
                "gpu_memory_utilization": 0.2, "max_batch_size": 4, "extra_args": stand_in_args(latency=0.05)}

    only_a = {"models": [model("a")], "timeouts": {"start": 30}}
    both = {"models": [model("a"), model("b")], "timeouts": {"start": 30}}
    d = live_deploy(only_a)
    foreign = _put_foreign_files(d)
    conf = next((d.out / "etc/supervisor/conf.d").glob("live*.conf"))

    def a_processes() -> dict[str, tuple[str, int]]:  # program: (launcher pid, stand-in pid)
        return {b.program: (d.supervisorctl("pid", b.program).stdout.strip(), d.vllm_pid(b))
                for b in d.backends if b.program.startswith("live-a-")}

    def lock_timeouts() -> dict[str, str]:
        text = conf.read_text()
        return {name: re.search(r"--lock-timeout (\d+)", text[text.index(f"[program:{name}]"):]).group(1)
                for name in ("live-a-0", "live-a-1")}

    before = a_processes()
    assert len(before) == 2 and lock_timeouts() == {"live-a-0": "60", "live-a-1": "60"}
    for spec, lock in ((both, "180"), (only_a, "60")):
        out, _ = apply_under_load(d, spec, model="a")
        assert [line.split()[:2] for line in out.splitlines() if line.startswith("update ")] == [
            ["update", "live-a-0"], ["update", "live-a-1"]], out
        assert not [line for line in out.splitlines() if "update live-a-" in line and line.lstrip().startswith("$")], out
        assert "summary: " + ("0 removed" if spec is both else "2 removed") + ", 0 changed, 2 updated" in out, out
        assert lock_timeouts() == {"live-a-0": lock, "live-a-1": lock}
        assert a_processes() == before, "a's programs were restarted"
        if spec is both:
            # The cost docs/operations.md states: supervisord still holds a's old start settings.
            reread = d.supervisorctl("reread").stdout
            assert "live-a-0: changed" in reread and "live-a-1: changed" in reread, reread
    assert_converged(d, foreign)  # back at the settings supervisord holds: `reread` finds nothing
