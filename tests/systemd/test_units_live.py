"""Prove the rendered systemd units under a real systemd 252 booted in systemd-nspawn.

Three deployments, each in a fresh container, each rendered inside it with
`vfgen render --output-dir /` (four stand-in vLLM instances on two fake GPUs,
two per GPU):

- `started`: started once; its tests only look (start order, parallelism,
  traffic through nginx, verify, hardening, exposure score);
- `restarted`: started, then kill -9 of one launcher and of another unit's
  vLLM process on the same GPU; its tests check who restarted and the GPU lock;
- the graceful-stop test's own, stopped while requests are in flight.

Every wait is bounded. A failing test prints the container's status, event
log and journal; booted_container() fails teardown if anything is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.nspawn import booted_container, service_binds
from tests.harness.systemd_deploy import (
    FAKE_GPU_DEVICES,
    SECRET_ENV,
    DeploymentError,
    Spec,
    SystemdDeployment,
    Window,
)

pytestmark = pytest.mark.systemd

DOCS = Path(__file__).resolve().parents[2] / "docs" / "systemd.md"
# `systemd-analyze security` of the vLLM unit (0 = locked down, 10 = fully exposed).
# Raise it only together with the measured score in docs/systemd.md, for a reason.
EXPOSURE_LIMIT = 3.0
LOAD_REQUESTS = 200
LOAD_CONCURRENCY = 16

_live: list[SystemdDeployment] = []


@pytest.fixture(autouse=True)
def _diagnostics_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    report = getattr(request.node, "vfgen_report_call", None)
    if report is not None and report.failed:
        for deployment in _live:
            print(f"--- {deployment.container.name} ---\n{deployment.diagnostics()}")


@contextlib.contextmanager
def _deployment(rootfs: Path, spec: Spec) -> Iterator[SystemdDeployment]:
    with booted_container(binds=service_binds(), rootfs=rootfs) as container:
        deployment = SystemdDeployment(container, spec)
        _live.append(deployment)
        try:
            deployment.prepare()
            deployment.install()
            yield deployment
        except Exception as exc:
            # A test that holds the deployment itself fails here, before the container goes.
            if not isinstance(exc, DeploymentError):  # those carry the diagnostics already
                print(f"--- {container.name} ---\n{deployment.diagnostics()}")
            raise
        finally:
            _live.remove(deployment)


@pytest.fixture(scope="module")
def started(rootfs: Path) -> Iterator[SystemdDeployment]:
    with _deployment(rootfs, Spec(env_file="/etc/vfgen/secrets.env")) as deployment:
        seconds = deployment.start()
        print(f"\nsystemctl start {deployment.target}: {seconds:.1f}s for {len(deployment.units)} instances")
        deployment.records["after_start"] = deployment.snapshot()
        yield deployment


def _on_same_gpu(deployment: SystemdDeployment) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(predecessor, successor) pairs the plan orders on one GPU."""
    by_name = {inst["name"]: inst for inst in deployment.instances}
    pairs = [(by_name[before], inst) for inst in deployment.instances for before in inst["after"]]
    assert pairs, "the plan must order some instances, or the ordering test proves nothing"
    return pairs


def _windows_by_port(deployment: SystemdDeployment) -> dict[int, list[Window]]:
    out: dict[int, list[Window]] = {}
    for window in deployment.windows():
        out.setdefault(window.port, []).append(window)
    return out


def _usec(props: dict[str, str], name: str) -> int:
    return int(props[name])


# ---------------------------------------------------------------- 1. ordered start


def test_start_orders_instances_on_a_gpu_behind_the_previous_ones_health(started: SystemdDeployment) -> None:
    snap = started.records["after_start"]
    windows = _windows_by_port(started)
    assert all(len(w) == 1 for w in windows.values()), f"one vLLM process per instance expected: {windows}"
    for before, after in _on_same_gpu(started):
        first, then = snap[f"{before['name']}.service"], snap[f"{after['name']}.service"]
        # systemd: the successor's launcher ran only once the predecessor was active (healthy).
        assert _usec(then, "ExecMainStartTimestampMonotonic") >= _usec(first, "ActiveEnterTimestampMonotonic") > 0
        assert _usec(then, "InactiveExitTimestampMonotonic") >= _usec(first, "ActiveEnterTimestampMonotonic")
        # vLLM: the successor's process started only after the predecessor's model was ready.
        (w_before,), (w_after,) = windows[before["port"]], windows[after["port"]]
        assert w_before.ready_t is not None and w_after.exec_t >= w_before.ready_t, (w_before, w_after)


def test_target_is_active_once_every_instance_is(started: SystemdDeployment) -> None:
    snap = started.records["after_start"]
    target = snap[started.target]
    assert target["ActiveState"] == "active"
    # `systemctl start` blocked until every instance was up, not just until the jobs were queued.
    assert all(snap[unit]["ActiveState"] == "active" and snap[unit]["NRestarts"] == "0" for unit in started.units), snap
    last_instance = max(_usec(snap[unit], "ActiveEnterTimestampMonotonic") for unit in started.units)
    assert _usec(target, "ActiveEnterTimestampMonotonic") >= last_instance


# ---------------------------------------------------------------- 2. parallel across GPUs


def test_instances_on_different_gpus_start_in_parallel(started: SystemdDeployment) -> None:
    snap = started.records["after_start"]
    windows = _windows_by_port(started)
    firsts = [inst for inst in started.instances if not inst["after"]]
    assert len({tuple(inst["gpus"]) for inst in firsts}) == 2, f"expected one first instance per fake GPU: {firsts}"
    a, b = firsts
    (wa,), (wb,) = windows[a["port"]], windows[b["port"]]
    assert wa.overlaps(wb), f"GPU {a['gpus']} and GPU {b['gpus']} vLLM starts did not overlap: {wa} {wb}"
    ua, ub = snap[f"{a['name']}.service"], snap[f"{b['name']}.service"]
    assert _usec(ub, "ExecMainStartTimestampMonotonic") < _usec(ua, "ActiveEnterTimestampMonotonic")
    assert _usec(ua, "ExecMainStartTimestampMonotonic") < _usec(ub, "ActiveEnterTimestampMonotonic")
    # Each process saw only its own fake GPU.
    for event in started.events():
        if event["event"] == "exec":
            assert event["cuda_visible_devices"] == ",".join(started.gpus_of_port()[event["port"]]), event
    # Two GPUs with two instances each: two start rounds, not four one after another.
    each = [(_usec(snap[u], "ActiveEnterTimestampMonotonic") - _usec(snap[u], "InactiveExitTimestampMonotonic")) / 1e6 for u in started.units]
    assert started.start_seconds < 0.75 * sum(each), f"start took {started.start_seconds:.1f}s, the instances {each}"


# ---------------------------------------------------------------- 5. traffic


def test_dispatcher_answers_a_short_load_with_no_errors(started: SystemdDeployment) -> None:
    c = started.container
    conf = f"/etc/nginx/conf.d/{started.spec.name}.conf"
    assert c.run(["test", "-f", conf], check=False).returncode == 0, "vfgen render --output-dir / wrote no nginx conf"
    c.run(["nginx", "-t"])
    c.systemctl("start", "nginx.service")
    url = f"http://127.0.0.1:{started.spec.port}"
    started.wait_until(lambda: started.run_client([{"url": f"{url}/health"}], 1, 5)[0]["status"] == 200, 15, "nginx /health")

    body = started.chat_body()
    began = time.monotonic()
    results = started.run_client([{"url": f"{url}/v1/chat/completions", "body": body}] * LOAD_REQUESTS, LOAD_CONCURRENCY, 60)
    seconds = time.monotonic() - began
    errors = [r for r in results if r["status"] != 200 or r.get("choices") != 1]
    assert not errors, f"{len(errors)} of {LOAD_REQUESTS} requests failed, e.g. {errors[:3]}"
    backends = {r["port"] for r in results}
    assert backends == {str(inst["port"]) for inst in started.instances}, f"least_conn used only {backends}"
    print(f"{LOAD_REQUESTS} requests at concurrency {LOAD_CONCURRENCY} through nginx in {seconds:.2f}s, 0 errors")


# ---------------------------------------------------------------- 6. verify and hardening


def test_systemd_analyze_verify_is_clean(started: SystemdDeployment) -> None:
    result = started.container.run(["systemd-analyze", "verify", *started.unit_files()], check=False)
    assert result.returncode == 0 and result.stderr.strip() == "" and result.stdout.strip() == "", result


def test_vllm_unit_is_hardened_and_still_reaches_the_gpu_devices(started: SystemdDeployment) -> None:
    c, unit = started.container, started.units[0]
    props = started.props(unit, "User", "DynamicUser", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp",
                          "PrivateDevices", "DevicePolicy", "DeviceAllow", "CapabilityBoundingSet")
    props.setdefault("DeviceAllow", "")  # `systemctl show` leaves out an empty list
    assert props == {
        "User": started.spec.user, "DynamicUser": "no", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "read-only", "PrivateTmp": "yes", "PrivateDevices": "no", "DevicePolicy": "auto",
        "DeviceAllow": "", "CapabilityBoundingSet": "",
    }
    # What the running vLLM process really got, not just what the unit asks for.
    pid = started.vllm_pid(unit)
    uid = c.run(["id", "-u", started.spec.user]).stdout.strip()
    status = dict(line.split(":\t", 1) for line in c.read_file(f"/proc/{pid}/status").splitlines() if ":\t" in line)
    assert uid != "0" and status["Uid"].split() == [uid] * 4 and status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0, status
    mounts = {line.split()[4]: line for line in c.read_file(f"/proc/{pid}/mountinfo").splitlines()}
    assert " ro," in mounts["/"].split(" - ")[0] + ",", "ProtectSystem=strict: / must be read-only"
    assert "systemd-private-" in mounts["/tmp"], "PrivateTmp: /tmp must be the unit's own"
    assert " rw," in mounts["/var/lib/vfgen"], "StateDirectory must stay writable"
    # In the service's mount namespace, as its user: ENXIO (no driver behind the fake node)
    # means the node is there and its mode lets the user open it; PrivateDevices= would give
    # ENOENT, a wrong mode EACCES. The device cgroup is not enforced inside nspawn (even
    # DevicePolicy=closed opens here), so DevicePolicy=/DeviceAllow= are checked as properties above.
    probe = "import os, sys\ntry:\n    os.open(sys.argv[1], os.O_RDWR)\nexcept OSError as e:\n    print(e.errno)\nelse:\n    print(0)\n"
    for node in FAKE_GPU_DEVICES:
        got = c.run(["nsenter", "-t", str(pid), "-m", "-S", uid, "-G", uid, "/usr/bin/python3", "-c", probe, f"/dev/{node}"]).stdout
        assert int(got) == errno.ENXIO, f"/dev/{node} inside {unit}: errno {got.strip()} ({errno.errorcode.get(int(got))})"
    for path in ("/usr/lib/vfgen-probe", "/home/vfgen-probe", "/etc/vfgen-probe"):
        denied = c.run(["nsenter", "-t", str(pid), "-m", "-S", uid, "-G", uid, "touch", path], check=False)
        assert denied.returncode != 0 and "Read-only file system" in denied.stderr, (path, denied.stderr)


def test_env_file_secret_reaches_vllm_but_no_rendered_file(started: SystemdDeployment) -> None:
    c, unit = started.container, started.units[0]
    key, secret = SECRET_ENV
    environ = dict(item.split("=", 1) for item in c.read_file(f"/proc/{started.vllm_pid(unit)}/environ").split("\0") if "=" in item)
    assert environ.get(key) == secret, sorted(environ)
    assert started.props(unit, "EnvironmentFiles")["EnvironmentFiles"].startswith(started.spec.env_file)
    for path in started.unit_files():
        assert secret not in c.read_file(path), path
    # systemd reads the file as root before dropping privileges: the service user cannot.
    denied = c.run(["runuser", "-u", started.spec.user, "--", "cat", started.spec.env_file], check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied


def test_exposure_score_is_under_the_limit_and_documented(started: SystemdDeployment) -> None:
    out = started.container.run(["systemd-analyze", "security", "--no-pager", started.units[0]]).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", out)
    assert match, out[-500:]
    score = float(match.group(1))
    print(f"systemd-analyze security {started.units[0]}: {score}")
    assert score < EXPOSURE_LIMIT, out
    documented = re.search(r"Measured exposure score: \*\*(\d+\.\d)\*\*", DOCS.read_text())
    assert documented and float(documented.group(1)) == score, f"docs/systemd.md must record the measured score {score}"


# ---------------------------------------------------------------- 3. restart after kill -9


@pytest.fixture(scope="module")
def restarted(rootfs: Path) -> Iterator[SystemdDeployment]:
    """Kill -9 the launcher of the second instance on GPU 0, then the vLLM process of the first.

    The second one restarts first (RestartSec after its kill); the first one's
    restart comes while the second is still loading. systemd orders only the
    second behind the first (After=), not the other way round, so only the
    launcher's GPU lock can keep the two starts apart.
    """
    with _deployment(rootfs, Spec(startup_delay=3.0)) as d:
        d.start()
        first, second = [f"{inst['name']}.service" for inst in d.instances if inst["gpus"] == ["0"]][:2]
        d.records["before_kill"] = d.snapshot()
        launcher = d.props(second, "MainPID")["MainPID"]
        orphan = d.vllm_pid(second)
        d.container.run(["kill", "-9", launcher])
        d.wait_until(lambda: d.props(second, "SubState")["SubState"] == "auto-restart", 10, f"{second} to fail")
        time.sleep(1.5)
        vllm = d.vllm_pid(first)
        d.container.run(["kill", "-9", str(vllm)])
        d.records["killed"] = {second: ("launcher", int(launcher), orphan), first: ("vllm", vllm, None)}

        def back() -> bool:  # exact counts are the tests' to judge
            now = [d.props(u, "ActiveState", "NRestarts") for u in (first, second)]
            return all(p["ActiveState"] == "active" and int(p["NRestarts"]) >= 1 for p in now)

        d.wait_until(back, 45, f"{first} and {second} to restart and become active")
        d.records["after_restart"] = d.snapshot()
        yield d


def test_kill_9_restarts_only_the_killed_instance(restarted: SystemdDeployment) -> None:
    d = restarted
    before, after, killed = d.records["before_kill"], d.records["after_restart"], d.records["killed"]
    counts = {u: (before[u]["NRestarts"], after[u]["NRestarts"]) for u in d.units}
    print(f"NRestarts before/after: {counts}")
    for unit in d.units:
        if unit in killed:
            assert counts[unit] == ("0", "1"), counts
            assert after[unit]["MainPID"] != before[unit]["MainPID"]
        else:
            # Neither stopped nor restarted: same process, same timestamps, never left "active".
            for prop in ("NRestarts", "MainPID", "ActiveEnterTimestampMonotonic", "InactiveExitTimestampMonotonic",
                         "ActiveExitTimestampMonotonic"):
                assert after[unit][prop] == before[unit][prop], (unit, prop, before[unit][prop], after[unit][prop])
            assert after[unit]["ActiveExitTimestampMonotonic"] == "0"
    assert after[d.target]["ActiveState"] == "active"
    assert after[d.target]["ActiveEnterTimestampMonotonic"] == before[d.target]["ActiveEnterTimestampMonotonic"]
    # Both kinds of kill led to exactly one vLLM process per unit again; the killed
    # launcher's child did not survive it (PR_SET_PDEATHSIG).
    for unit, (kind, pid, orphan) in killed.items():
        assert d.container.run(["kill", "-0", str(pid)], check=False).returncode != 0, f"{kind} {pid} of {unit} survived"
        if orphan is not None:
            assert d.container.run(["kill", "-0", str(orphan)], check=False).returncode != 0, f"vLLM {orphan} outlived its launcher"
    # The stand-in's own command line starts with its interpreter and script (a launcher's has "vfgen launch").
    stand_ins = d.container.run(["pgrep", "-u", d.spec.user, "-f", "^[^ ]+ [^ ]+/vfgen-fake-vllm serve"], check=False).stdout.split()
    assert sorted(map(int, stand_ins)) == sorted(d.vllm_pid(u) for u in d.units)
    for inst in d.instances:
        health = d.run_client([{"url": f"http://127.0.0.1:{inst['port']}/health"}], 1, 5)[0]
        assert health["status"] == 200, (inst["name"], health)


def test_gpu_start_serialisation_holds_during_restarts(restarted: SystemdDeployment) -> None:
    d = restarted
    killed = d.records["killed"]
    first = next(unit for unit, (kind, _, _) in killed.items() if kind == "vllm")
    lock = f"/run/vfgen/locks/gpu-{d.instance(first)['gpus'][0]}.lock"
    # The precondition: the restart really collided with the other start on that GPU.
    journal = d.journal_text(first)
    assert f"waiting for lock {lock}" in journal, "the restarts did not overlap: this test proved nothing"
    print(*re.findall(r".*acquired lock.*", journal))
    windows = d.windows()
    assert len(windows) == len(d.units) + len(killed), windows
    for gpu in {g for w in windows for g in w.gpus}:
        on_gpu = [w for w in windows if gpu in w.gpus]
        for i, a in enumerate(on_gpu):
            assert a.ready_t is not None, f"{a} never became ready"
            for b in on_gpu[i + 1:]:
                assert not a.overlaps(b), f"GPU {gpu}: two vLLM processes loading at once: {a} and {b}"


# ---------------------------------------------------------------- 4. graceful stop


def test_stopping_the_target_lets_in_flight_requests_finish(rootfs: Path) -> None:
    spec = Spec(startup_delay=1.0, latency=4.0, shutdown_timeout=10)
    with _deployment(rootfs, spec) as d:
        d.start()
        c = d.container
        # Units stop in reverse start order: the ones behind an After= get SIGTERM first,
        # the first ones only when those are gone. Their requests are sent later so they
        # are still in flight when their own SIGTERM comes.
        stops_first = [inst for inst in d.instances if inst["after"]]
        stops_last = [inst for inst in d.instances if not inst["after"]]
        requests = [{"url": f"http://127.0.0.1:{i['port']}/v1/chat/completions", "body": d.chat_body(), "at": 0.0} for i in stops_first]
        requests += [{"url": f"http://127.0.0.1:{i['port']}/v1/chat/completions", "body": d.chat_body(), "at": 1.5} for i in stops_last]
        results: list[list[dict[str, Any]]] = []
        client = threading.Thread(target=lambda: results.append(d.run_client(requests, len(requests), 30)), daemon=True)
        client.start()

        def in_flight(inst: dict[str, Any]) -> bool:
            stats = c.run(["curl", "-sf", "--max-time", "1", f"http://127.0.0.1:{inst['port']}/fake/stats"], check=False).stdout
            return bool(stats) and json.loads(stats)["in_flight"] >= 1

        d.wait_until(lambda: all(in_flight(i) for i in stops_first), 10, "the first slow requests to arrive")
        began = time.monotonic()
        c.systemctl("stop", d.target, timeout=60)
        returned = time.monotonic() - began
        # `systemctl stop` waits for the target's own job only; the target is ordered after
        # the instances, so on stop it goes first and the instances stop after it returned.
        d.wait_until(lambda: all(d.props(u, "ActiveState")["ActiveState"] == "inactive" for u in d.units),
                     2 * (spec.shutdown_timeout + 15), "every instance to stop")
        stop_seconds = time.monotonic() - began
        client.join(35)
        assert results, "the client did not finish"
        print(f"systemctl stop {d.target} returned after {returned:.1f}s; all instances down after {stop_seconds:.1f}s "
              f"with {len(requests)} requests in flight")

        replies = results[0]
        assert [r["status"] for r in replies] == [200] * len(requests), replies
        assert all(r["choices"] == 1 for r in replies), replies
        # Precondition: every unit got its SIGTERM while its request was still being served.
        sigterm = {e["port"]: e["t"] for e in d.events() if e["event"] == "sigterm"}
        for reply, inst in zip(replies, stops_first + stops_last):
            assert reply["t_start"] < sigterm[inst["port"]] < reply["t_end"], (inst["name"], reply, sigterm)
        exits = {e["port"]: e["code"] for e in d.events() if e["event"] == "exit"}
        assert exits == {inst["port"]: 0 for inst in d.instances}, exits
        for unit in d.units:
            p = d.props(unit)
            assert (p["ActiveState"], p["Result"], p["ExecMainStatus"]) == ("inactive", "success", "0"), (unit, p)
            took = (_usec(p, "InactiveEnterTimestampMonotonic") - _usec(p, "ActiveExitTimestampMonotonic")) / 1e6
            assert 0 < took < spec.shutdown_timeout, f"{unit} took {took:.1f}s to stop"
        killed = re.findall(r".*(?:SIGKILL|status=9/KILL|timed out).*", c.run(["journalctl", "--no-pager", "-o", "cat"]).stdout)
        assert not killed, killed
        assert c.run(["pgrep", "-u", spec.user], check=False).stdout == "", "processes of the service user survived the stop"
