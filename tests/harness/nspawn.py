"""Boot a real systemd (Debian bookworm, systemd 252) in systemd-nspawn for tests.

`ensure_rootfs()` builds and caches the root filesystem once per machine.
`booted_container()` boots it with a throw-away overlay and a private network
from a cgroup of its own, waits for systemd to finish starting, and on exit
stops it and checks that no process, cgroup or mount is left behind.
Commands run inside through `nsenter` into the container's PID 1.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from tests.harness.tools import missing, require_tool

# Bump when PACKAGES in scripts/build-rootfs.sh changes, so caches rebuild.
ROOTFS_VERSION = "v1"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-rootfs.sh"
ROOTFS_MARKER = "etc/vfgen-rootfs"

BUILD_TIMEOUT = 900.0
BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

CONTAINER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host trees never bound over the container's own (a system Python's /usr stays the container's).
_SYSTEM_TREES = tuple(Path(p) for p in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc", "/var", "/boot", "/dev", "/proc", "/sys", "/run"))
# Too broad to bind as a whole; subdirectories are fine.
_SHALLOW = {Path(p) for p in ("/", "/tmp", "/root", "/home", "/opt", "/srv", "/mnt")}


class ContainerError(RuntimeError):
    """Base class: the container could not be built, booted, used or cleaned up."""


class ContainerBootError(ContainerError):
    """Boot failed; the message carries the nspawn log."""


class ContainerTeardownError(ContainerError):
    """Something (process, cgroup, mount) survived the container."""


class ContainerCommandError(subprocess.CalledProcessError):
    """A command inside the container exited non-zero; str() shows its output."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n--- stdout ---\n{_tail(self.stdout or '')}"
            f"\n--- stderr ---\n{_tail(self.stderr or '')}"
        )


# ---------------------------------------------------------------- rootfs


def default_rootfs_path() -> Path:
    override = os.environ.get("VFGEN_ROOTFS_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "vfgen" / f"rootfs-bookworm-{ROOTFS_VERSION}"


def script_packages() -> str:
    match = re.search(r'^PACKAGES="([^"]+)"', BUILD_SCRIPT.read_text(), re.MULTILINE)
    if match is None:
        raise ContainerError(f"no PACKAGES= line in {BUILD_SCRIPT}")
    return match.group(1)


def ensure_rootfs(path: Path | None = None) -> Path:
    """The cached bookworm rootfs, built by scripts/build-rootfs.sh on first use.

    The script takes a flock on `<path>.lock`, so concurrent pytest processes
    build once, and renames a finished build into place, so `path` existing
    means it is complete.
    """
    _require_nspawn()  # a rootfs nobody can boot is a minute wasted
    rootfs = path or default_rootfs_path()
    if not rootfs.exists():
        _build_rootfs(rootfs)
    _check_rootfs(rootfs)
    return rootfs


def _build_rootfs(rootfs: Path) -> None:
    require_tool("debootstrap")
    print(f"\nvfgen: building test rootfs {rootfs}, or waiting for a build in progress (about a minute, once per machine)", file=sys.stderr)
    # Own session, so a timeout kills debootstrap too, not just the shell.
    proc = subprocess.Popen(["sh", str(BUILD_SCRIPT), str(rootfs)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        # SIGTERM first: debootstrap and the script unmount and remove their work dir.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        raise ContainerError(f"{BUILD_SCRIPT} did not finish in {BUILD_TIMEOUT:.0f}s:\n{_tail(output)}") from None
    if proc.returncode != 0 or not rootfs.exists():
        raise ContainerError(f"{BUILD_SCRIPT} {rootfs} failed (exit {proc.returncode}):\n{_tail(output)}")


def _check_rootfs(rootfs: Path) -> None:
    if not (rootfs / "usr/lib/systemd/systemd").exists():
        raise ContainerError(f"{rootfs} has no systemd: delete it and let the harness rebuild it")
    marker = rootfs / ROOTFS_MARKER
    built_with = marker.read_text().strip() if marker.exists() else "(no marker)"
    wanted = f"packages={script_packages()}"
    if built_with != wanted:
        raise ContainerError(
            f"{rootfs} was built with {built_with!r} but {BUILD_SCRIPT.name} now says {wanted!r}: "
            f"bump ROOTFS_VERSION in {__file__} (or delete the cache)"
        )


# ---------------------------------------------------------------- binds


# The repo again, outside /tmp: units run with PrivateTmp=yes, which hides a
# checkout under /tmp (CI may clone there). Services get PYTHONPATH pointing here.
REPO_FOR_SERVICES = Path("/srv/vfgen-src")


def python_env_binds(repo: Path = REPO_ROOT) -> list[Path]:
    """Host paths to bind read-only so this Python environment and the repo work inside.

    Covers the venv (sys.prefix), the interpreter it was made from
    (sys.base_prefix, e.g. a pyenv version), directories on sys.path outside
    both (user site, editable-install .pth targets) and the repo. System
    directories such as /usr are skipped: the container has its own.
    """
    candidates: list[Path] = [Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parents[1], repo]
    candidates += [Path(entry) for entry in sys.path if entry]
    return _minimal_cover(path for path in candidates if path.is_dir())


def service_binds(repo: Path = REPO_ROOT) -> list:
    """python_env_binds() plus the repo at REPO_FOR_SERVICES, for tests that run vfgen in units."""
    return [*python_env_binds(repo), (repo, REPO_FOR_SERVICES)]


def _minimal_cover(paths: Iterable[Path]) -> list[Path]:
    """Absolute, deduplicated bindable paths, without ones nested in another.

    Not resolved: a venv reached through a symlink must appear inside at the
    path its scripts name.
    """
    kept: list[Path] = []
    for path in sorted({Path(os.path.abspath(p)) for p in paths}, key=lambda p: len(p.parts)):
        if _bindable(path) and not any(path == k or k in path.parents for k in kept):
            kept.append(path)
    return kept


def _bindable(path: Path) -> bool:
    """False for directories the container needs its own copy of (/usr, /etc, ...)."""
    if path in _SHALLOW:
        return False
    local = Path("/usr/local")
    if path == local or local in path.parents:
        return True
    return not any(path == tree or tree in path.parents for tree in _SYSTEM_TREES)


def _bind_arg(source: Path, target: Path) -> str:
    # nspawn splits on ':'; it unescapes backslashes.
    def esc(p: Path) -> str:
        return str(p).replace("\\", "\\\\").replace(":", "\\:")

    return f"{esc(source)}:{esc(target)}"


# ---------------------------------------------------------------- cgroups


def _cgroup_mounts() -> tuple[Path | None, list[Path]]:
    """(cgroup2 mount point, every cgroup mount point) from /proc/self/mounts."""
    unified: Path | None = None
    every: list[Path] = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mount_point, fstype, *_ = line.split()
        if fstype in ("cgroup", "cgroup2"):
            every.append(Path(mount_point))
            if fstype == "cgroup2" and unified is None:
                unified = Path(mount_point)
    return unified, every


def _own_cgroup_v2_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


def _cgroup_candidates(name: str) -> list[Path]:
    """Where a cgroup `name` made next to ours can appear, in every hierarchy."""
    _, mounts = _cgroup_mounts()
    relative = _own_cgroup_v2_path().lstrip("/")
    return sorted({mount / relative / name for mount in mounts})


@dataclass
class _Cgroup:
    """The cgroup nspawn starts in; nspawn mirrors it into the name=systemd hierarchy on hybrid hosts."""

    name: str
    unified: Path
    hybrid: bool
    all_dirs: list[Path] = field(default_factory=list)

    @classmethod
    def create(cls, name: str) -> "_Cgroup":
        unified_root, _ = _cgroup_mounts()
        if unified_root is None:
            missing("a cgroup v2 hierarchy", "systemd 252 in nspawn needs cgroup2 mounted (unified or hybrid)")
        unified = unified_root / _own_cgroup_v2_path().lstrip("/") / name
        unified.mkdir()
        return cls(name=name, unified=unified, hybrid=unified_root != Path("/sys/fs/cgroup"), all_dirs=_cgroup_candidates(name))

    def join(self) -> None:
        """Called in the child before exec: move this process into the cgroup."""
        fd = os.open(self.unified / "cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    def pids(self) -> set[int]:
        found: set[int] = set()
        for top in self.all_dirs:
            for procs in top.rglob("cgroup.procs") if top.exists() else ():
                with contextlib.suppress(OSError):
                    found.update(int(pid) for pid in procs.read_text().split())
        return found

    def kill_all(self) -> None:
        kill_file = self.unified / "cgroup.kill"
        if kill_file.exists():
            with contextlib.suppress(OSError):
                kill_file.write_text("1")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            leftovers = [d for d in self.all_dirs if d.exists()]
            for top in leftovers:
                # Deepest first: a cgroup can only be removed when it has no children.
                for directory in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
                    with contextlib.suppress(OSError):
                        directory.rmdir()
            leftovers = [d for d in self.all_dirs if d.exists()]
            if not leftovers:
                return
            if time.monotonic() > deadline:
                raise ContainerTeardownError(f"cgroups still present after {timeout}s: {leftovers} (pids {sorted(self.pids())})")
            self.kill_all()
            time.sleep(0.05)


# ---------------------------------------------------------------- container


@dataclass
class Container:
    """A booted container; every method runs through nsenter into its PID 1."""

    name: str
    rootfs: Path
    pid1: int
    nspawn_pid: int
    log_path: Path
    cgroup_dirs: list[Path]  # the cgroup nspawn runs in, in each hierarchy where it exists
    nsenter: str = "nsenter"
    boot_seconds: float = 0.0
    boot_state: str = ""

    def nsenter_argv(self, env: Mapping[str, str] | None = None, cwd: str | None = None) -> list[str]:
        """Prefix that runs a command inside, with a clean environment."""
        base_env = {"PATH": CONTAINER_PATH, "HOME": "/root", "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}
        base_env.update(env or {})
        argv = [self.nsenter, "-t", str(self.pid1), "-a", "--", "env", "-i"]
        if cwd:
            argv.append(f"--chdir={cwd}")
        return argv + [f"{key}={value}" for key, value in base_env.items()]

    def run(
        self,
        cmd: Sequence[str] | str,
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | bytes | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` (argv, or a string for sh -c) inside; output decoded as text."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = self.nsenter_argv(env, cwd) + argv
        data = input.encode() if isinstance(input, str) else input
        # Own session: on timeout the whole group dies, including nsenter's forked child.
        proc = subprocess.Popen(full, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(data, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a daemon that left the group still holds the pipes
                out, err = b"", b""
            raise subprocess.TimeoutExpired(argv, timeout, out, err) from None
        result = subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
        if check and result.returncode != 0:
            raise ContainerCommandError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def write_file(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """Create or replace `path` inside (in the overlay), making parent directories."""
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
        self.run(["sh", "-c", script, "sh", path, format(mode, "o")], input=content)

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run(["systemctl", *args], check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show` as a dict; all properties when none are named."""
        argv = ["show", unit] + (["-p", ",".join(props)] if props else [])
        lines = self.systemctl(*argv).stdout.splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def journal(self, unit: str | None = None, lines: int = 200) -> str:
        argv = ["journalctl", "--no-pager", "-n", str(lines)] + (["-u", unit] if unit else [])
        return self.run(argv, check=False).stdout

    def log(self) -> str:
        """What nspawn and the container console printed so far."""
        if not self.log_path.exists():
            return ""
        # The console is a pty: lines end in \r\n.
        return self.log_path.read_text(errors="replace").replace("\r", "")


@contextlib.contextmanager
def booted_container(
    binds: Iterable[Path | str | tuple[Path | str, Path | str]] = (),
    rw_binds: Iterable[Path | str | tuple[Path | str, Path | str]] = (),
    *,
    rootfs: Path | None = None,
    boot_timeout: float = BOOT_TIMEOUT,
    stop_timeout: float = STOP_TIMEOUT,
    extra_args: Sequence[str] = (),
) -> Iterator[Container]:
    """Boot the rootfs with a volatile overlay and a private network; yield a Container.

    `binds` are mounted read-only, `rw_binds` read-write; a plain path is
    bound at the same path inside, a (host, container) pair where given.
    """
    nspawn, nsenter = _require_nspawn()
    rootfs = rootfs or ensure_rootfs()
    name = f"vfgen-{os.getpid()}-{secrets.token_hex(3)}"
    argv = [
        nspawn, "--directory", str(rootfs), "--machine", name,
        # No host bus here: don't register with machined, stay in our cgroup.
        "--register=no", "--keep-unit",
        "--boot", "--volatile=overlay", "--private-network", "--console=read-only",
    ]
    argv += [f"--bind-ro={_bind_arg(*_bind_pair(b))}" for b in binds]
    argv += [f"--bind={_bind_arg(*_bind_pair(b))}" for b in rw_binds]
    argv += list(extra_args)

    log_dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    log_path = log_dir / "nspawn.log"
    cgroup: _Cgroup | None = None
    proc: subprocess.Popen | None = None
    try:
        cgroup = _Cgroup.create(name)
        env = {**os.environ, "TERM": "dumb", "SYSTEMD_COLORS": "0"}
        if cgroup.hybrid:
            # systemd 252 inside needs cgroup v2; the host's is at /sys/fs/cgroup/unified.
            env["SYSTEMD_NSPAWN_UNIFIED_HIERARCHY"] = "1"
        started = time.monotonic()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                    env=env, preexec_fn=cgroup.join, start_new_session=True)
        container = Container(name=name, rootfs=rootfs, pid1=0, nspawn_pid=proc.pid, log_path=log_path,
                              cgroup_dirs=[], nsenter=nsenter)
        container.pid1 = _wait_for_pid1(proc, container, started + boot_timeout)
        container.boot_state = _wait_until_booted(proc, container, started + boot_timeout)
        container.boot_seconds = time.monotonic() - started
        container.cgroup_dirs = [d for d in cgroup.all_dirs if d.exists()]
        yield container
    finally:
        try:
            if cgroup is not None:
                _teardown(proc, cgroup, rootfs, name, stop_timeout)
        finally:
            shutil.rmtree(log_dir, ignore_errors=True)


def _bind_pair(bind: Path | str | tuple[Path | str, Path | str]) -> tuple[Path, Path]:
    if isinstance(bind, tuple):
        return Path(bind[0]), Path(bind[1])
    return Path(bind), Path(bind)


def _boot_failure(container: Container, reason: str) -> ContainerBootError:
    return ContainerBootError(f"{reason}\n--- nspawn log (last 80 lines) ---\n{_tail(container.log(), 80)}")


def _wait_for_pid1(proc: subprocess.Popen, container: Container, deadline: float) -> int:
    """The container's init: a child of nspawn that is PID 1 in its namespace and runs systemd."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _boot_failure(container, f"systemd-nspawn exited with {proc.returncode} before the container started")
        for child in _children(proc.pid):
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{child}/status").read_text()
                ns_pids = re.search(r"^NSpid:\s+(.*)$", status, re.MULTILINE)
                comm = Path(f"/proc/{child}/comm").read_text().strip()
                if ns_pids and ns_pids.group(1).split()[-1] == "1" and len(ns_pids.group(1).split()) > 1 and comm == "systemd":
                    return child
        time.sleep(0.02)
    raise _boot_failure(container, "no container PID 1 appeared in time")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in children.read_text().split()]
    return found


def _wait_until_booted(proc: subprocess.Popen, container: Container, deadline: float) -> str:
    """Poll `systemctl is-system-running --wait` until running or degraded."""
    last = ""
    while True:
        remaining = deadline - time.monotonic()
        if proc.poll() is not None:
            raise _boot_failure(container, f"systemd-nspawn exited with {proc.returncode} during boot")
        if remaining <= 0:
            raise _boot_failure(container, f"systemd did not finish booting in time (last state: {last!r})")
        try:
            result = container.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=remaining)
        except subprocess.TimeoutExpired:
            continue
        last = (result.stdout.strip() or result.stderr.strip())
        if last in ("running", "degraded"):
            return last
        if last in ("maintenance", "stopping"):
            raise _boot_failure(container, f"systemd reached {last!r} instead of running")
        # The manager's bus is not up yet ("Failed to connect to bus"): try again.
        time.sleep(0.05)


def _teardown(proc: subprocess.Popen | None, cgroup: _Cgroup, rootfs: Path, name: str, stop_timeout: float) -> None:
    """SIGTERM nspawn (an orderly halt), SIGKILL what remains, remove the cgroup, check for leftovers."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            pass
    cgroup.kill_all()
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    cgroup.remove()
    problems = leftovers(rootfs, name)
    # nspawn removes its propagation directory on a clean exit, not after SIGKILL
    # (nor when /run is a disk file system, as here). It is ours if nothing is mounted there.
    propagate = _propagate_dir(name)
    if problems == [f"directory {propagate}"]:
        shutil.rmtree(propagate, ignore_errors=True)
        problems = leftovers(rootfs, name)
    if problems:
        raise ContainerTeardownError("container left things behind:\n" + "\n".join(problems))


def leftovers(rootfs: Path, name: str) -> list[str]:
    """Everything a container named `name` could leave on the host, if still there."""
    problems = [f"cgroup {d}" for d in _cgroup_candidates(name) if d.exists()]
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4]
        if mount_point.startswith(str(rootfs)) or name in line:
            problems.append(f"mount {line}")
    propagate = _propagate_dir(name)
    if propagate.exists():
        problems.append(f"directory {propagate}")
    return problems


def _propagate_dir(name: str) -> Path:
    return Path("/run/systemd/nspawn/propagate") / name


# ---------------------------------------------------------------- checks


def _require_root() -> None:
    if os.geteuid() != 0:
        missing("root", "systemd-nspawn and debootstrap need root; run the systemd tier as root")


def _require_nspawn() -> tuple[str, str]:
    """Paths of systemd-nspawn and nsenter; fails in CI, skips loudly elsewhere."""
    _require_root()
    return require_tool("systemd-nspawn", "systemd-container"), require_tool("nsenter", "util-linux")


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])
