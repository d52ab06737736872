"""`vfgen apply` under a real systemd 252 (nspawn) with the container's own nginx, under load:
4 -> 2 -> 4 instances, then a changed --max-batch-size, then a changed vLLM argument.

The deployment is installed as docs/systemd.md says (render --output-dir /, start the
target, start nginx.service), then changed twice with `vfgen apply` run inside the
container. During each change a load generator runs in the container's network
namespace (one connection per request, every non-2xx and socket error counted), and a
sampler on the host reads, every 50 ms, every stand-in process of this container
(/proc: its --gpu-memory-utilization and CUDA_VISIBLE_DEVICES) and sums the shares per
GPU. Afterwards: exactly the planned units exist and run, no stale unit file, the
foreign files in /etc/systemd/system and /etc/nginx/conf.d are untouched, and nginx's
access log shows no request that met a failing backend first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness.nspawn import booted_container, service_binds
from tests.harness.shares import ShareSampler, in_cgroup
from tests.harness.systemd_deploy import VFGEN_BIN, Spec, SystemdDeployment

BUDGET = 0.92
UPSTREAM_LOG = "/var/log/nginx/vfgen-upstreams.log"
FOREIGN = {
    "/etc/systemd/system/foreign.service": "[Unit]\nDescription=not vfgen's\n[Service]\nExecStart=/bin/true\n",
    "/etc/nginx/conf.d/00-upstream-log.conf": (
        "# not vfgen's: which backends nginx tried for each request\n"
        "log_format vfgen_upstreams '$msec $status \"$request\" upstream=\"$upstream_addr\" "
        "upstream_status=\"$upstream_status\"';\n"
        f"access_log {UPSTREAM_LOG} vfgen_upstreams;\n"
    ),
}


def _load_argv(pid1: int, url: str, body: dict, stop_file: str) -> list[str]:
    return ["nsenter", "-t", str(pid1), "--net", "--", sys.executable, "-m", "tests.harness.netns_load",
            url, json.dumps(body), "6", stop_file, "--deadline", "300"]


def _unit_names(sd: SystemdDeployment) -> set[str]:
    out = sd.container.systemctl("list-units", "--all", "--plain", "--no-legend", f"{sd.spec.name}-*").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _unit_files(sd: SystemdDeployment) -> set[str]:
    return set(sd.container.run(["sh", "-c", f"cd /etc/systemd/system && ls -1 {sd.spec.name}-*.service"]).stdout.split())


def _apply_under_load(sd: SystemdDeployment, spec: Spec, tmp_path: Path) -> str:
    c = sd.container
    stop_file = tmp_path / f"stop-{time.monotonic_ns()}"  # one per change: a used one stops the load at once
    log_before = len(c.run(["cat", UPSTREAM_LOG], check=False).stdout)
    load = subprocess.Popen(_load_argv(c.pid1, f"http://127.0.0.1:{spec.port}/v1/chat/completions", sd.chat_body(), str(stop_file)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        time.sleep(2.0)  # load before the change
        with ShareSampler(in_cgroup(c.name)) as shares:
            result = c.run([str(VFGEN_BIN), "apply", *spec.render_args()], check=False, timeout=400)
            time.sleep(1.0)  # and after it, on the final config
        stop_file.write_text("")
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
            load.communicate()
    print(f"\n{result.stdout}\n{result.stderr}\nload: {out.strip()[-600:]} {err[-2000:]}\npeak {shares.peak} over {shares.samples} samples")
    assert result.returncode == 0, f"apply failed:\n{result.stdout}\n{result.stderr}\n{sd.diagnostics()}"
    replies = json.loads(out)
    assert replies["requests"] > 100, replies
    assert replies["statuses"] == {"200": replies["requests"]}, replies
    assert shares.samples > 20, shares.samples
    assert all(total <= BUDGET + 1e-9 for total in shares.peak.values()), f"GPU over budget: {shares.peak}"
    log = c.run(["cat", UPSTREAM_LOG]).stdout[log_before:]
    retried = [line for line in log.splitlines() if re.search(r'upstream_status="[^"]*\b5\d\d\b', line)]
    assert log.strip() and not retried, f"{len(retried)} request(s) met a failing backend first: {retried[:3]}"
    return result.stdout


def _assert_converged(sd: SystemdDeployment, spec: Spec) -> None:
    c = sd.container
    sd.spec = spec
    wanted = {f"{spec.name}-qwen3-0-6b-{k}.service" for k in range(spec.instances)}
    assert _unit_files(sd) == wanted
    loaded = _unit_names(sd) - {f"{spec.name}.target"}
    assert loaded == wanted, f"units systemd knows: {sorted(loaded)}, wanted {sorted(wanted)}"
    for unit in wanted:
        assert c.show(unit, "ActiveState")["ActiveState"] == "active", unit
    args = spec.render_args()
    split = args.index("--") if "--" in args else len(args)  # what follows `--` belongs to vLLM
    dry = c.run([str(VFGEN_BIN), "render", *args[:split], "--output-dir", "/", "--dry-run", *args[split:]]).stdout
    assert all(line.startswith("unchanged") for line in dry.splitlines()), dry
    for path, content in FOREIGN.items():
        assert c.read_file(path) == content, f"apply changed {path}"
    wants = c.run(["ls", f"/etc/systemd/system/{spec.name}.target.wants"]).stdout.split()
    assert set(wants) == wanted, wants


pytestmark = pytest.mark.systemd


def test_apply_4_2_4_under_systemd_with_load(rootfs: Path, tmp_path: Path) -> None:
    spec = Spec(name="vt", instances=4, cuda_devices="0", latency=0.05, startup_delay=0.5, shutdown_timeout=3,
                start_timeout=30)
    with booted_container(binds=service_binds(), rootfs=rootfs) as container:
        sd = SystemdDeployment(container, spec)
        try:
            sd.prepare()
            sd.install()
            for path, content in FOREIGN.items():
                container.write_file(path, content)
            sd.start()
            container.systemctl("enable", *sd.units)
            container.run(["nginx", "-t"])
            container.systemctl("start", "nginx.service")
            sd.wait_until(lambda: sd.run_client([{"url": f"http://127.0.0.1:{spec.port}/health"}], 1, 5)[0]["status"] == 200,
                          15, "nginx /health")

            two = dataclasses.replace(spec, instances=2)
            out = _apply_under_load(sd, two, tmp_path)
            order = [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["stop"], ["restart"], ["start"])]
            assert order == [["stop", "vt-qwen3-0-6b-3"], ["stop", "vt-qwen3-0-6b-2"],
                             ["restart", "vt-qwen3-0-6b-0"], ["restart", "vt-qwen3-0-6b-1"]], out
            _assert_converged(sd, two)

            out = _apply_under_load(sd, spec, tmp_path)
            order = [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["stop"], ["restart"], ["start"])]
            assert order == [["restart", "vt-qwen3-0-6b-0"], ["restart", "vt-qwen3-0-6b-1"],
                             ["start", "vt-qwen3-0-6b-2"], ["start", "vt-qwen3-0-6b-3"]], out
            _assert_converged(sd, spec)

            # A changed --max-batch-size, then a changed vLLM argument: every instance restarted
            # one at a time, and each runs with the new value.
            every_restart = [["restart", f"vt-qwen3-0-6b-{k}"] for k in range(4)]
            for changed, flag, value in ((dataclasses.replace(spec, max_batch_size=8), "--max-num-seqs", "8"),
                                         (dataclasses.replace(spec, max_batch_size=8, vllm_args=("--fake-latency", "0.03")),
                                          "--fake-latency", "0.03")):
                out = _apply_under_load(sd, changed, tmp_path)
                order = [line.split()[:2] for line in out.splitlines() if line.split()[:1] in (["stop"], ["restart"], ["start"])]
                assert order == every_restart, out
                _assert_converged(sd, changed)
                for unit in sd.units:
                    argv = container.run(["cat", f"/proc/{sd.vllm_pid(unit)}/cmdline"]).stdout.split("\0")
                    assert argv[argv.index(flag) + 1] == value, (unit, argv)
            assert "max_conns=8 " in container.read_file(f"/etc/nginx/conf.d/{spec.name}.conf")
        except Exception:
            print(sd.diagnostics())
            raise
