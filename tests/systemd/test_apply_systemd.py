"""`vfgen apply` under a real systemd 252 (nspawn) with the container's own nginx, under load:
4 -> 2 -> 4 instances, then a changed --max-batch-size, then a changed vLLM argument (one
model from the command line); and, in a deployment FILE, a second model added and removed.

Both tests share one booted container (module fixture): the service user, the fake GPUs
and the foreign files are set up once, and each deployment has its own name, ports and
GPU. Each deployment is installed as docs/systemd.md says (render --output-dir /, start
the target, nginx.service serves it), then changed with `vfgen apply` run inside the
container. During each change load generators run in the container's network namespace
(one connection per request, every non-2xx and socket error counted), and a sampler on
the host reads, every 50 ms, every stand-in process of this container (/proc: its
--gpu-memory-utilization and CUDA_VISIBLE_DEVICES) and sums the shares per GPU.
Afterwards: exactly the planned units exist and run, no stale unit file or loaded unit,
the foreign files in /etc/systemd/system and /etc/nginx/conf.d are untouched, and nginx's
access log shows no request that met a failing backend first.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.nspawn import Container, booted_container, service_binds
from tests.harness.shares import ShareSampler, argv_of, in_cgroup
from tests.harness.systemd_deploy import VFGEN_BIN, ModelEntry, Spec, SystemdDeployment

BUDGET = 0.92
UPSTREAM_LOG = "/var/log/nginx/vfgen-upstreams.log"
MANIFEST_DIR = "/var/lib/vfgen-manifest"
FOREIGN = {
    "/etc/systemd/system/foreign.service": "[Unit]\nDescription=not vfgen's\n[Service]\nExecStart=/bin/true\n",
    "/etc/nginx/conf.d/00-upstream-log.conf": (
        "# not vfgen's: which backends nginx tried for each request\n"
        "log_format vfgen_upstreams '$msec $status \"$request\" upstream=\"$upstream_addr\" "
        "upstream_status=\"$upstream_status\"';\n"
        f"access_log {UPSTREAM_LOG} vfgen_upstreams;\n"
    ),
}

pytestmark = pytest.mark.systemd


@pytest.fixture(scope="module")
def systemd_host(rootfs: Path) -> Iterator[Container]:
    """One booted container for the module: service user, fake GPUs and foreign files, as an operator's host."""
    with booted_container(binds=service_binds(), rootfs=rootfs) as container:
        SystemdDeployment(container, Spec()).prepare()
        for path, content in FOREIGN.items():
            container.write_file(path, content)
        yield container


def _install_and_serve(sd: SystemdDeployment) -> None:
    sd.install()
    sd.start()
    sd.container.systemctl("enable", *sd.units)
    sd.container.run(["nginx", "-t"])
    sd.container.systemctl("reload-or-restart", "nginx.service")  # starts it for the first deployment
    sd.wait_until(lambda: sd.run_client([{"url": f"http://127.0.0.1:{sd.spec.port}/health"}], 1, 5)[0]["status"] == 200,
                  15, "nginx /health")


class _Load:
    """tests.harness.netns_load in the container's network namespace, until stop()."""

    def __init__(self, c: Container, url: str, body: dict, concurrency: int, tmp_path: Path) -> None:
        self.stop_file = tmp_path / f"stop-{time.monotonic_ns()}"  # one per load: a used one stops it at once
        argv = ["nsenter", "-t", str(c.pid1), "--net", "--", sys.executable, "-m", "tests.harness.netns_load",
                url, json.dumps(body), str(concurrency), str(self.stop_file), "--deadline", "300"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).parents[2])

    def stop(self) -> dict[str, Any]:
        self.stop_file.write_text("")
        try:
            out, err = self.proc.communicate(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        if self.proc.returncode != 0 or not out.strip():
            raise AssertionError(f"the load generator failed ({self.proc.returncode}): {err[-2000:]}")
        return json.loads(out)


def _apply_with_loads(sd: SystemdDeployment, spec: Spec, tmp_path: Path,
                      loads: dict[str, tuple[dict, int]]) -> tuple[str, dict[str, dict[str, Any]]]:
    """`vfgen apply` of `spec` while one load per entry ({name: (body, concurrency)}) runs before, during
    and after it; asserts the apply, the per-GPU budget and no upstream 5xx; returns its output and each load's result."""
    c = sd.container
    log_before = len(c.run(["cat", UPSTREAM_LOG], check=False).stdout)
    url = f"http://127.0.0.1:{spec.port}/v1/chat/completions"
    running: dict[str, _Load] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, (body, concurrency) in loads.items():
            running[name] = _Load(c, url, body, concurrency, tmp_path)
        time.sleep(2.0)  # load before the change
        with ShareSampler(in_cgroup(c.name)) as shares:
            result = c.run([str(VFGEN_BIN), "apply", *sd.stage(spec)], check=False, timeout=400)
            time.sleep(1.0)  # and after it, on the final config
    finally:
        for name, load in running.items():
            results[name] = load.stop()
    print(f"\n{result.stdout}\n{result.stderr}\npeak {shares.peak} over {shares.samples} samples")
    for name, replies in results.items():
        print(f"load {name}: {replies['summary']} statuses={replies['statuses']} errors={replies['errors']}")
    assert result.returncode == 0, f"apply failed:\n{result.stdout}\n{result.stderr}\n{sd.diagnostics()}"
    assert shares.samples > 20, shares.samples
    assert all(total <= BUDGET + 1e-9 for total in shares.peak.values()), f"GPU over budget: {shares.peak}"
    log = c.run(["cat", UPSTREAM_LOG]).stdout[log_before:]
    retried = [line for line in log.splitlines() if re.search(r'upstream_status="[^"]*\b5\d\d\b', line)]
    assert log.strip() and not retried, f"{len(retried)} request(s) met a failing backend first: {retried[:3]}"
    return result.stdout, results


def _apply_under_load(sd: SystemdDeployment, spec: Spec, tmp_path: Path) -> str:
    out, loads = _apply_with_loads(sd, spec, tmp_path, {"load": (sd.chat_body(), 6)})
    replies = loads["load"]
    assert replies["requests"] > 100, replies
    assert replies["statuses"] == {"200": replies["requests"]}, replies
    return out


def _steps(out: str, kinds: tuple[str, ...] = ("stop", "restart", "start")) -> list[list[str]]:
    return [line.split()[:2] for line in out.splitlines() if line.split()[:1] and line.split()[0] in kinds]


def _unit_names(sd: SystemdDeployment) -> set[str]:
    out = sd.container.systemctl("list-units", "--all", "--plain", "--no-legend", f"{sd.spec.name}-*").stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _unit_files(sd: SystemdDeployment) -> set[str]:
    return set(sd.container.run(["sh", "-c", f"cd /etc/systemd/system && ls -1 {sd.spec.name}-*.service"]).stdout.split())


def _assert_converged(sd: SystemdDeployment, spec: Spec) -> None:
    c = sd.container
    sd.replan(spec)
    wanted = set(sd.units)
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


def test_apply_4_2_4_under_systemd_with_load(systemd_host: Container, tmp_path: Path) -> None:
    spec = Spec(name="vt", instances=4, cuda_devices="0", latency=0.05, startup_delay=0.5, shutdown_timeout=3,
                start_timeout=30)
    container = systemd_host
    sd = SystemdDeployment(container, spec)
    try:
        _install_and_serve(sd)

        two = dataclasses.replace(spec, instances=2)
        out = _apply_under_load(sd, two, tmp_path)
        assert _steps(out) == [["stop", "vt-qwen3-0-6b-3"], ["stop", "vt-qwen3-0-6b-2"],
                               ["restart", "vt-qwen3-0-6b-0"], ["restart", "vt-qwen3-0-6b-1"]], out
        _assert_converged(sd, two)

        out = _apply_under_load(sd, spec, tmp_path)
        assert _steps(out) == [["restart", "vt-qwen3-0-6b-0"], ["restart", "vt-qwen3-0-6b-1"],
                               ["start", "vt-qwen3-0-6b-2"], ["start", "vt-qwen3-0-6b-3"]], out
        _assert_converged(sd, spec)

        # A changed --max-batch-size, then a changed vLLM argument: every instance restarted
        # one at a time, and each runs with the new value.
        every_restart = [["restart", f"vt-qwen3-0-6b-{k}"] for k in range(4)]
        for changed, flag, value in ((dataclasses.replace(spec, max_batch_size=8), "--max-num-seqs", "8"),
                                     (dataclasses.replace(spec, max_batch_size=8, vllm_args=("--fake-latency", "0.03")),
                                      "--fake-latency", "0.03")):
            out = _apply_under_load(sd, changed, tmp_path)
            assert _steps(out) == every_restart, out
            _assert_converged(sd, changed)
            for unit in sd.units:
                argv = container.run(["cat", f"/proc/{sd.vllm_pid(unit)}/cmdline"]).stdout.split("\0")
                assert argv[argv.index(flag) + 1] == value, (unit, argv)
        assert "max_conns=8 " in container.read_file(f"/etc/nginx/conf.d/{spec.name}.conf")
    except Exception:
        print(sd.diagnostics())
        raise


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def _only_200(replies: dict[str, Any], at_least: int) -> None:
    assert replies["requests"] >= at_least and replies["statuses"] == {"200": replies["requests"]}, replies
    assert not replies["errors"], replies


def _200_or_unknown_model(replies: dict[str, Any]) -> None:
    """A model's requests while it is added or removed: served, or the dispatcher's JSON 404 — no 5xx, no socket error."""
    assert not replies["errors"], f"socket errors: {replies['errors']}"
    assert set(replies["statuses"]) == {"200", "404"}, replies["statuses"]  # both: the change happened under this load
    for failed in replies["failed"]:
        assert failed["status"] == 404 and json.loads(failed["body"])["error"]["code"] == 404, failed


def _ports_answering(sd: SystemdDeployment, model: str, count: int = 12) -> set[int]:
    url = f"http://127.0.0.1:{sd.spec.port}/v1/chat/completions"
    results = sd.run_client([{"url": url, "body": _chat(model)} for _ in range(count)], 4, 20)
    assert [r["status"] for r in results] == [200] * count, results
    return {int(r["port"]) for r in results}


def _assert_start_settings(sd: SystemdDeployment, units: set[str], lock: int) -> None:
    """The units on disk, and as systemd loaded them (daemon-reload), carry the new lock timeout."""
    for unit in units:
        text = sd.container.read_file(f"/etc/systemd/system/{unit}")
        assert f'"--lock-timeout" "{lock}" ' in text and f"TimeoutStartSec={lock + 30 + 60}\n" in text, (unit, text)
        assert sd.props(unit, "NeedDaemonReload")["NeedDaemonReload"] == "no", f"{unit}: systemd runs an older unit file"


def test_apply_adds_and_removes_a_model_of_a_deployment_file_under_load(systemd_host: Container, tmp_path: Path) -> None:
    """Model b added to a file serving a, then removed, under load on both: a never fails and is never
    restarted, though its default lock timeout changes (its units are rewritten and reloaded); b is
    started health-gated, then routed by "model"; removed, it is drained, stopped and pruned."""
    c = systemd_host
    a = ModelEntry("a", instances=2, gpus=("1",), share=0.2)
    b = ModelEntry("b", instances=2, gpus=("1",), share=0.2)
    # vfgen's default lock timeout: it grows with the instances sharing GPU 1 (60 s with a alone,
    # 180 s with b), so a's unit files change, yet only in start-time settings: a is not restarted.
    only_a = Spec(name="mm", port=18090, port_start=19101, latency=0.05, startup_delay=0.5, shutdown_timeout=3,
                  start_timeout=30, models=(a,))
    both = dataclasses.replace(only_a, models=(a, b))
    a_units = {"mm-a-0.service", "mm-a-1.service"}
    b_units = {"mm-b-0.service", "mm-b-1.service"}
    sd = SystemdDeployment(c, only_a)
    try:
        _install_and_serve(sd)
        a_pids = {unit: sd.props(unit, "MainPID")["MainPID"] for unit in a_units}
        loads = {"a": (_chat("a"), 4), "b": (_chat("b"), 2)}

        # b added: started one at a time, each healthy before the next; served from the final reload.
        out, replies = _apply_with_loads(sd, both, tmp_path, loads)
        assert _steps(out) == [["start", "mm-b-0"], ["start", "mm-b-1"]], out
        assert _steps(out, ("update",)) == [["update", "mm-a-0"], ["update", "mm-a-1"]], out
        assert "only start-time settings changed (lock timeout 60 -> 180 s" in out, out
        assert "summary: 0 removed, 0 changed, 2 updated, 2 new, 0 unchanged" in out, out
        _assert_start_settings(sd, a_units, lock=180)
        assert {unit: sd.props(unit, "MainPID")["MainPID"] for unit in a_units} == a_pids, "a was restarted"
        _only_200(replies["a"], at_least=50)
        _200_or_unknown_model(replies["b"])  # 404 until nginx serves b, then 200: never a 5xx of a b not yet healthy
        _assert_converged(sd, both)
        b_ports = {inst["port"] for inst in sd.instances if f"{inst['name']}.service" in b_units}
        assert len(b_ports) == 2, sd.instances
        windows = [w for w in sd.windows() if w.port in b_ports]
        assert len(windows) == 2 and windows[0].ready_t is not None and windows[0].ready_t < windows[1].exec_t, windows
        assert _ports_answering(sd, "b") == b_ports  # routed by the JSON "model", over both of b's instances
        assert not _ports_answering(sd, "a") & b_ports

        # b removed: unknown from the first reload on, its instances drained, then stopped and pruned.
        out, replies = _apply_with_loads(sd, only_a, tmp_path, loads)
        assert _steps(out, ("drain", "stop", "restart", "start")) == [
            ["drain", "mm-b-1"], ["stop", "mm-b-1"], ["drain", "mm-b-0"], ["stop", "mm-b-0"]], out
        assert _steps(out, ("update",)) == [["update", "mm-a-0"], ["update", "mm-a-1"]], out
        _assert_start_settings(sd, a_units, lock=60)
        assert "mm-b-1: drained" in out and "mm-b-0: drained" in out, out
        _only_200(replies["a"], at_least=50)
        _200_or_unknown_model(replies["b"])  # in flight when b left nginx: finished; after: the JSON 404
        _assert_converged(sd, only_a)
        assert not _unit_names(sd) & b_units, _unit_names(sd)
        every_unit = c.systemctl("list-units", "--all", "--plain", "--no-legend").stdout
        assert "mm-b-" not in every_unit, every_unit
        assert not [pid for pid in in_cgroup(c.name)() if "org/b" in argv_of(pid)], "a process of b survived"
        manifest = json.loads(c.read_file(f"{MANIFEST_DIR}/mm.json"))
        assert sorted(i["name"] for i in manifest["instances"]) == ["mm-a-0", "mm-a-1"], manifest["instances"]
        assert not [path for path in manifest["files"] if "mm-b-" in path], manifest["files"]
        listed = c.run(["sh", "-c", "cd / && sha256sum " + " ".join(sorted(manifest["files"]))]).stdout
        assert {line.split()[1]: line.split()[0] for line in listed.splitlines()} == {
            path: entry["sha256"] for path, entry in manifest["files"].items()}, "a listed file is missing or changed"
        assert set(c.run(["ls", MANIFEST_DIR]).stdout.split()) <= {"mm.json", "vt.json"}
        status, body = c.run(["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", "-H", "Content-Type: application/json",
                              "-d", json.dumps(_chat("b")), f"http://127.0.0.1:{only_a.port}/v1/chat/completions"]
                             ).stdout.rsplit("\n", 1)[::-1]
        assert status == "404" and json.loads(body)["error"]["code"] == 404, (status, body)

        # a served throughout by the very same processes.
        assert {unit: sd.props(unit, "MainPID")["MainPID"] for unit in a_units} == a_pids
        assert all(sd.props(unit, "NRestarts")["NRestarts"] == "0" for unit in a_units)
    except Exception:
        print(sd.diagnostics())
        raise
