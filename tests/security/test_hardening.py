"""The instance units' sandbox: its exposure score stays low, and it still lets vLLM work.

- `systemd-analyze security --offline=yes` scores every rendered instance unit
  at or below EXPOSURE_THRESHOLD (docs/security.md records the score);
- nothing in the unit closes the device policy (PrivateDevices=, DeviceAllow=,
  DevicePolicy=, or ProtectClock=, which implied DeviceAllow=char-rtc before
  systemd 252), and the system call deny list leaves every call CUDA and vLLM
  make allowed;
- under a real systemd 252 (nspawn), a process started by a rendered unit
  reaches NVIDIA device nodes, writes its caches, reads a model directory, and
  cannot write the system, home directories or see other users' processes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.harness.tools import require_tool
from tests.scenarios import SCENARIOS
from tests.security import parsers
from vfgen import config
from vfgen.plan import build_plan
from vfgen.render import render_all

# Rendered units score 2.3 with systemd 252 (3.6 before the deny list,
# ProtectProc= and PrivateMounts=); a change that loosens the sandbox fails here.
EXPOSURE_THRESHOLD = 2.5
VFGEN_BIN = shutil.which("vfgen") or "/usr/local/bin/vfgen"

# Calls vLLM, PyTorch, NCCL and the CUDA driver make (or debuggers and profilers
# attached to them): none may be in a denied group.
NEEDED_CALLS = {
    "ioctl", "mmap", "munmap", "mprotect", "mremap", "madvise", "mlock", "munlock", "shmget", "shmat", "memfd_create",
    "setrlimit", "prlimit64", "sched_setaffinity", "sched_getaffinity", "mbind", "set_mempolicy", "get_mempolicy",
    "move_pages", "clone", "clone3", "execve", "ptrace", "perf_event_open", "process_vm_readv", "pidfd_open",
    "pidfd_getfd", "sendmsg", "recvmsg", "socket", "bind", "getrandom", "io_uring_setup", "futex", "eventfd2",
    "clock_gettime", "clock_nanosleep", "chown", "fchown", "ioprio_set",
}


def instance_units(name: str, tmp: Path) -> dict[str, str]:
    from typer.testing import CliRunner

    from vfgen.cli import app

    args = list(SCENARIOS[name])
    args[args.index("--vfgen-bin") + 1] = VFGEN_BIN
    # Every scenario's units, supervisord ones included (before a `--`, whose tail is vLLM's),
    # with the dedicated user: `nobody` scores 2.6, and systemd warns that it "is not safe".
    split = args.index("--") if "--" in args else len(args)
    args[split:split] = ["--backend", "systemd", "--user", "vllm"]
    out = tmp / name
    result = CliRunner().invoke(app, ["render", "--output-dir", str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    unit_dir = out / "etc/systemd/system"
    return {p.name: p.read_text() for p in unit_dir.glob("*.service")}


def exposure(unit_dir: Path, unit: str) -> tuple[float, str]:
    analyze = require_tool("systemd-analyze", "systemd")
    result = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", unit], cwd=unit_dir,
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1)), result.stdout


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_exposure_score_stays_under_the_threshold(name: str, tmp_path: Path) -> None:
    units = instance_units(name, tmp_path)
    assert units
    unit_dir = tmp_path / name / "etc/systemd/system"
    for unit in units:
        score, report = exposure(unit_dir, unit)
        assert score <= EXPOSURE_THRESHOLD, f"{unit}: exposure {score} > {EXPOSURE_THRESHOLD}\n{report}"


def test_the_score_check_can_fail(tmp_path: Path) -> None:
    """A unit without the sandbox scores far above the threshold."""
    unit = tmp_path / "bare.service"
    unit.write_text(f"[Service]\nExecStart={VFGEN_BIN} --version\n")
    score, _ = exposure(tmp_path, unit.name)
    assert score > EXPOSURE_THRESHOLD


def test_units_keep_gpu_devices_and_cuda_system_calls_reachable(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    for text in instance_units("four-instances", tmp_path).values():
        lines = parsers.parse_unit(text)
        keys = {line.key: line.raw for line in lines if line.section == "Service"}
        for closing in ("PrivateDevices", "DeviceAllow", "DevicePolicy", "ProtectClock", "RemoveIPC", "ProcSubset",
                        "MemoryDenyWriteExecute", "PrivateUsers"):
            assert closing not in keys, f"{closing}= would break GPU access or sibling instances (docs/security.md)"
        for required, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "read-only"),
                                ("PrivateTmp", "yes"), ("ProtectProc", "invisible"), ("User", "vllm"),
                                ("CapabilityBoundingSet", ""), ("SystemCallErrorNumber", "EPERM"), ("UMask", "0077")):
            assert keys.get(required) == value, (required, keys.get(required))
        denied = keys["SystemCallFilter"]
        assert denied.startswith("~"), "an allow list could kill vLLM on a call nobody listed"
        calls: set[str] = set()
        for group in denied[1:].split():
            listing = subprocess.run([analyze, "syscall-filter", group], capture_output=True, text=True, timeout=30).stdout
            calls |= {w for w in listing.split() if re.fullmatch(r"[a-z_0-9]+", w)}
        assert calls, "the denied groups should resolve to system calls"
        assert not calls & NEEDED_CALLS, f"denied but needed: {sorted(calls & NEEDED_CALLS)}"


# --- the sandbox under a real systemd ---------------------------------------------------

PROBE = textwrap.dedent("""\
    #!/usr/bin/python3
    # Stand-in for vfgen in a rendered unit: try what vLLM needs, and what it must not do.
    import errno, json, os, resource, sys, time
    if sys.argv[1] != "launch":
        sys.exit(0)
    def attempt(fn):
        try:
            fn()
            return "ok"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
    def write(path):
        def go():
            with open(path, "w") as fh:
                fh.write("x")
        return go
    def read(path):
        def go():
            with open(path, "rb") as fh:
                fh.read(1)
        return go
    env = os.environ
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    results = {
        "gpu": attempt(read("/dev/nvidia0")), "gpuctl": attempt(read("/dev/nvidiactl")),
        "uvm": attempt(read("/dev/nvidia-uvm")),
        "hf_home": attempt(lambda: (os.makedirs(env["HF_HOME"] + "/hub", exist_ok=True), write(env["HF_HOME"] + "/hub/f")())),
        "vllm_cache": attempt(lambda: (os.makedirs(env["VLLM_CACHE_ROOT"], exist_ok=True), write(env["VLLM_CACHE_ROOT"] + "/f")())),
        "home": attempt(write(env["HOME"] + "/f")), "shm": attempt(write("/dev/shm/vfgen-probe")),
        "tmp": attempt(write("/tmp/vfgen-probe")), "model": attempt(read("/srv/models/m/config.json")),
        "usr": attempt(write("/usr/vfgen-probe")), "etc": attempt(write("/etc/vfgen-probe")),
        "root_home": attempt(write("/root/vfgen-probe")), "user_home": attempt(write("/home/someone/vfgen-probe")),
        "proc_of_pid1": os.path.exists("/proc/1/environ"),
        "setrlimit": attempt(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))),
        "affinity": attempt(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
        "set_clock": attempt(lambda: time.clock_settime(time.CLOCK_REALTIME, time.clock_gettime(time.CLOCK_REALTIME))),
        "umask_mode": oct(os.stat(env["HOME"] + "/f").st_mode & 0o777) if os.path.exists(env["HOME"] + "/f") else None,
    }
    with open("/var/lib/vfgen/probe.json", "w") as fh:
        json.dump(results, fh)
""")


@pytest.mark.systemd
def test_sandbox_reaches_gpu_nodes_and_caches_but_not_the_system(tmp_path: Path) -> None:
    from tests.harness.nspawn import booted_container

    probe = "/usr/local/bin/vfgen-probe"
    deployment = config.parse_deployment(
        {"name": "hard", "vfgen_bin": probe, "models": [{"model": "/srv/models/m", "instances": 2}]}, source="probe.yaml")
    plan = build_plan(deployment)
    inst = plan.instances[0]
    unit_text = next(a.content for a in render_all(plan) if a.name == inst.unit)
    with booted_container() as box:
        box.run(["useradd", "--system", "--no-create-home", "vllm"])
        box.run("mkdir -p /srv/models/m /home/someone && echo '{}' > /srv/models/m/config.json && chmod -R a+rX /srv/models"
                " && chmod 777 /home/someone")
        # NVIDIA's majors (195; nvidia-uvm's is dynamic): opening them gives ENXIO without the driver,
        # which proves the sandbox let the open reach the device layer.
        box.run("mknod -m 666 /dev/nvidia0 c 195 0 && mknod -m 666 /dev/nvidiactl c 195 255"
                " && mknod -m 666 /dev/nvidia-uvm c 234 0")
        box.write_file(probe, PROBE, mode=0o755)

        def run_probe(unit: str, extra: str = "") -> dict:
            box.write_file(f"/etc/systemd/system/{unit}", unit_text + extra)
            box.run("rm -f /var/lib/vfgen/probe.json")
            box.systemctl("daemon-reload")
            box.systemctl("start", unit)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                found = box.run("cat /var/lib/vfgen/probe.json 2>/dev/null", check=False).stdout
                if found:
                    return json.loads(found)
                time.sleep(0.2)
            raise AssertionError(f"no probe result from {unit}:\n{box.journal(unit)}")

        results = run_probe(inst.unit)
        # Control: the same probe behind PrivateDevices=yes cannot see the GPU at all.
        control = run_probe("control.service", "\n[Service]\nPrivateDevices=yes\n")

    assert results["gpu"] == results["gpuctl"] == results["uvm"] == "ENXIO", results
    assert control["gpu"] == "ENOENT", control
    for writable in ("hf_home", "vllm_cache", "home", "shm", "tmp"):
        assert results[writable] == "ok", (writable, results)
    assert results["model"] == "ok"
    for protected in ("usr", "etc", "root_home", "user_home"):
        assert results[protected] in ("EROFS", "EACCES", "ENOENT"), (protected, results)
    assert results["proc_of_pid1"] is False, "ProtectProc=invisible should hide root's processes"
    assert results["setrlimit"] == "ok" and results["affinity"] == "ok"
    assert results["set_clock"] == "EPERM"
    assert results["umask_mode"] == "0o600"
