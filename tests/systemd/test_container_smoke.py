"""Prove the nspawn harness: real systemd boots, runs and restarts a unit, isolates the network, cleans up."""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.harness import nspawn
from tests.harness.nspawn import Container, ContainerBootError, booted_container, leftovers, python_env_binds
from tests.harness.procs import free_port
from tests.harness.tools import missing
from tests.harness.waiting import wait_until

pytestmark = pytest.mark.systemd

SMOKE_UNIT = """\
[Unit]
Description=vfgen harness smoke test

[Service]
Type=exec
ExecStart=/usr/bin/python3 -m http.server --bind 127.0.0.1 {port}
Restart=on-failure
RestartSec=100ms
"""


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    return wait_until(predicate, timeout, interval=0.05, what=what)


def curl_ok(container: Container, port: int) -> bool:
    result = container.run(["curl", "-sf", "-o", "/dev/null", "--max-time", "2", f"http://127.0.0.1:{port}/"], check=False)
    return result.returncode == 0


def host_pid_of(container: Container, container_pid: int) -> int:
    """Host PID of a process known by its PID inside the container's PID namespace."""
    container_ns = os.readlink(f"/proc/{container.pid1}/ns/pid")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "ns/pid") != container_ns:
                continue
            ns_pids = re.search(r"^NSpid:\s+(.*)$", (entry / "status").read_text(), re.MULTILINE)
        except OSError:
            continue
        if ns_pids and ns_pids.group(1).split()[-1] == str(container_pid):
            return int(entry.name)
    raise AssertionError(f"no host process for container PID {container_pid}")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_boots_real_systemd_252(container: Container) -> None:
    state = container.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded"), container.run(["systemctl", "--failed"], check=False).stdout
    assert container.run(["systemctl", "--version"]).stdout.startswith("systemd 252")
    assert Path(f"/proc/{container.pid1}/comm").read_text().strip() == "systemd"
    assert container.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"


def test_unit_serves_restarts_after_kill_and_stays_private(container: Container) -> None:
    port = free_port()  # free on the host, so a host connection that succeeds would be a leak
    container.write_file("/etc/systemd/system/smoke.service", SMOKE_UNIT.format(port=port))
    container.systemctl("daemon-reload")
    container.systemctl("start", "smoke.service")
    wait_for(lambda: curl_ok(container, port), 10, "smoke.service to answer")

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    before = container.show("smoke.service", "MainPID", "NRestarts")
    assert before["NRestarts"] == "0"
    container.run(["kill", "-9", before["MainPID"]])

    def restarted():
        now = container.show("smoke.service", "MainPID", "NRestarts", "ActiveState")
        return now if now["NRestarts"] == "1" and now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"]) else None

    wait_for(restarted, 10, "smoke.service to be restarted once")
    wait_for(lambda: curl_ok(container, port), 10, "restarted smoke.service to answer")


def test_host_python_environment_works_inside(container: Container) -> None:
    result = container.run([sys.executable, "-c", "import jinja2, typer; print('ok')"])
    assert result.stdout.strip() == "ok"
    # The repo is bound at the same path, so the checkout imports from its root.
    vfgen_file = container.run([sys.executable, "-c", "import vfgen; print(vfgen.__file__)"], cwd=str(nspawn.REPO_ROOT)).stdout
    assert vfgen_file.strip() == str(nspawn.REPO_ROOT / "vfgen" / "__init__.py")
    # Console scripts carry the host interpreter's path in their shebang.
    installed_vfgen = Path(sys.executable).with_name("vfgen")
    if not installed_vfgen.exists():  # after `pip install -e .`, the .pth points into the bound repo
        missing(f"the vfgen console script beside {sys.executable}", "pip install -e .")
    assert container.run([str(installed_vfgen), "--help"]).stdout.startswith("Usage: vfgen")
    scripts = [Path(sys.executable).with_name("pytest"), Path(sys.base_prefix) / "bin" / "pytest"]
    script = next((s for s in scripts if s.exists()), None)
    if script is None:
        missing(f"a pytest console script ({', '.join(map(str, scripts))})", "pip install pytest")
    assert container.run([str(script), "--version"]).stdout.startswith("pytest ")


def test_write_file_and_show(container: Container) -> None:
    container.write_file("/etc/vfgen/deep/dir/file.conf", "a=1\n", mode=0o600)
    assert container.run(["stat", "-c", "%a %s", "/etc/vfgen/deep/dir/file.conf"]).stdout.split() == ["600", "4"]
    assert container.read_file("/etc/vfgen/deep/dir/file.conf") == "a=1\n"
    # The overlay is per container: the cached rootfs is never written.
    assert not (container.rootfs / "etc/vfgen").exists()
    props = container.show("dbus.service", "Id", "ActiveState")
    assert props == {"Id": "dbus.service", "ActiveState": "active"}


def test_teardown_leaves_nothing_behind(rootfs: Path) -> None:
    with booted_container(binds=python_env_binds(), rootfs=rootfs) as c:
        # Something for teardown to stop: a unit and a stray process entered with nsenter.
        c.run(["systemd-run", "--unit", "stray-unit", "sleep", "300"])
        stray = host_pid_of(c, int(c.run("sleep 300 >/dev/null 2>&1 & echo $!").stdout))
        unit_pid = host_pid_of(c, int(c.show("stray-unit.service", "MainPID")["MainPID"]))
        name, pid1, nspawn_pid, cgroup_dirs, log_path = c.name, c.pid1, c.nspawn_pid, c.cgroup_dirs, c.log_path
        # The checks below must see something while the container runs, or they prove nothing.
        members = {pid for d in cgroup_dirs for procs in d.rglob("cgroup.procs") for pid in procs.read_text().split()}
        assert {str(nspawn_pid), str(pid1), str(unit_pid)} <= members, "nspawn must run in a cgroup of its own"
        assert log_path.exists()
        assert all(alive(pid) for pid in (pid1, nspawn_pid, stray, unit_pid))
        assert {f"cgroup {d}" for d in cgroup_dirs} <= set(leftovers(rootfs, name))

    assert not any(alive(pid) for pid in (pid1, nspawn_pid, stray, unit_pid))
    assert leftovers(rootfs, name) == []
    assert not log_path.exists() and not log_path.parent.exists()
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert str(rootfs) not in mountinfo and name not in mountinfo


def test_teardown_kills_a_container_that_will_not_halt(rootfs: Path) -> None:
    stubborn = "[Service]\nExecStart=/bin/sh -c 'trap \"\" TERM; while :; do sleep 1; done'\nTimeoutStopSec=300\n"
    started = time.monotonic()
    with booted_container(rootfs=rootfs, stop_timeout=1.0) as c:
        c.write_file("/etc/systemd/system/stubborn.service", stubborn)
        c.systemctl("daemon-reload")
        c.systemctl("start", "stubborn.service")
        name, pid1 = c.name, c.pid1
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 8, "teardown must be bounded by stop_timeout plus the kill"
    assert not alive(pid1)
    assert leftovers(rootfs, name) == []
    assert time.monotonic() - started < 20


def test_boot_failure_shows_the_nspawn_log(tmp_path: Path) -> None:
    pattern = f"vfgen-{os.getpid()}-*"
    before = {p for mount in nspawn._cgroup_mounts()[1] for p in mount.glob(pattern)}
    with pytest.raises(ContainerBootError, match=r"(?s)nspawn log.*os-release file is missing"):
        with booted_container(rootfs=tmp_path):
            pass
    after = {p for mount in nspawn._cgroup_mounts()[1] for p in mount.glob(pattern)}
    assert after == before
