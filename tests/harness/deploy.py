"""Run a rendered deployment for real: vfgen's nginx and supervisord files, stand-in vLLM backends.

`LiveDeployment(root, procs, spec).start()`:

1. renders with the real CLI in a subprocess (`vfgen render ... --backend
   supervisord --output-dir ROOT/out`), with the test's ports, paths and binaries
   passed as flags, and reads the instance list from `vfgen plan --json`;
2. wraps the rendered nginx conf.d file in a main nginx.conf, checks it with
   `nginx -t` and runs nginx in the foreground;
3. wraps the rendered supervisord conf.d file in a supervisord.conf and runs
   supervisord in the foreground; it starts every `vfgen launch -- vfgen-fake-vllm`;
4. waits, bounded, until every backend lists its model and nginx /health is 200.

`stop()` stops supervisord (which stops the launchers and so the stand-ins),
stops nginx, then looks for any process still tagged with this deployment's
unique tag (an environment variable every child inherits) or listening on its
ports, kills those by PID, and fails if there were any.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import httpx
import yaml

from tests.harness.procs import ProcessGroup
from tests.harness.tools import require_tool
from tests.harness.waiting import wait_until  # noqa: F401  (re-exported for the tiers)
from vfgen.local import free_port_block

START_TIMEOUT = 45.0  # all stand-ins up and nginx /health 200
STOP_TIMEOUT = 60.0  # supervisord stopping every program
TAG_ENV = "VFGEN_LIVE_TAG"
def console_script(name: str) -> str:
    """Absolute path of a console script of this interpreter (not a pyenv shim)."""
    beside = Path(sys.executable).parent / name
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed; run `pip install -e .[test]`")
    return os.path.abspath(found)


@dataclass(frozen=True)
class Backend:
    program: str  # supervisord program name, e.g. live-m-0
    model: str  # model key
    served_name: str  # first served name: what the stand-in reports in X-Fake-Vllm-Model
    port: int
    gpus: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LiveDeployment:
    """One rendered deployment running under real nginx and supervisord."""

    def __init__(self, root: Path, procs: ProcessGroup, spec: Mapping[str, Any] | Sequence[str], *,
                 env: Mapping[str, str] | None = None, vllm_bin: str | None = None) -> None:
        """`spec` is a deployment-file mapping, or CLI arguments for `vfgen render` (MODEL, -n 4, -- ...).
        `vllm_bin` replaces the stand-in (vfgen-fake-vllm) with another binary, e.g. a real vLLM."""
        self.nginx_bin = require_tool("nginx", "nginx-light")
        self.supervisord_bin = require_tool("supervisord", "supervisor")
        self.supervisorctl_bin = require_tool("supervisorctl", "supervisor")
        self.root = Path(root)
        self.procs = procs
        self.spec = spec
        self.extra_env = dict(env or {})
        self.vllm_bin = vllm_bin
        self.tag = uuid.uuid4().hex
        self.out = self.root / "out"
        self.log_dir = self.root / "logs"
        self.lock_dir = self.root / "locks"
        self.event_log = self.root / "events.jsonl"
        # Short, world-traversable runtime dir: the unix socket path must stay under
        # 108 bytes, and nginx workers (user nobody) must reach their temp dirs.
        self.run_dir = Path(tempfile.mkdtemp(prefix="vfgen-live-"))
        os.chmod(self.run_dir, 0o755)
        self.nginx_proc: subprocess.Popen | None = None
        self.supervisord_proc: subprocess.Popen | None = None
        self.backends: tuple[Backend, ...] = ()
        self.ports_used: set[int] = set()  # every backend port any version of the deployment had
        self.plan: dict[str, Any] = {}
        self.port: int | None = None  # nginx; the backends take the ports right after it
        self.http = httpx.Client(timeout=10.0, trust_env=False)
        self._files: list = []

    # --- render ---------------------------------------------------------------------

    def _cli_args(self) -> list[str]:
        if isinstance(self.spec, Mapping):
            spec = dict(self.spec)
            spec.setdefault("timeouts", {})
            spec["timeouts"] = {"start": 60, "shutdown": 3, **spec["timeouts"]}
            path = self.root / "deploy.yaml"
            path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
            return ["-f", str(path)]
        return list(self.spec)

    def _vfgen(self, command: str, extra: Sequence[str]) -> subprocess.CompletedProcess:
        result = self.vfgen(command, *extra)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(result.args)}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def vfgen(self, *words: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """`vfgen WORDS...` with this deployment's arguments (as rendered), e.g. ("lora", "load", NAME, PATH)."""
        args = self._cli_args()
        vllm_args: list[str] = []
        if "--" in args:
            split = args.index("--")
            args, vllm_args = args[:split], args[split:]
        if not isinstance(self.spec, Mapping):
            for flag, value in (("--start-timeout", "60"), ("--shutdown-timeout", "3")):
                if flag not in args:
                    args += [flag, value]
        argv = [console_script("vfgen"), *words, *args, *self._overrides(), *vllm_args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def _overrides(self) -> list[str]:
        return [
            "--name", self.name, "--port", str(self.port), "--port-start", str(self.port + 1),
            "--backend", "supervisord", "--user", "root",
            "--vfgen-bin", console_script("vfgen"), "--vllm-bin", self.vllm_bin or console_script("vfgen-fake-vllm"),
            "--lock-dir", str(self.lock_dir), "--log-dir", str(self.log_dir),
        ]

    @property
    def name(self) -> str:
        if isinstance(self.spec, Mapping):
            return str(self.spec.get("name", "live"))
        args = list(self.spec)
        return args[args.index("--name") + 1] if "--name" in args else "live"

    def render(self) -> None:
        """Render `self.spec` into ROOT/out. Calling it again after changing `spec` (a rollout)
        keeps the ports; then `supervisorctl("update")` and `reload_nginx()` apply the change."""
        if self.port is None:
            self.port = free_port_block(self._instance_count() + 1)
        self.plan = json.loads(self._vfgen("plan", ["--json"]).stdout)
        self._vfgen("render", ["--output-dir", str(self.out)])
        self.backends = tuple(
            Backend(i["name"], i["model"], i["served_name"], int(i["port"]), tuple(i["gpus"]))
            for i in self.plan["instances"]
        )
        self.ports_used |= {b.port for b in self.backends}
        rendered_nginx = self.out / "etc/nginx"
        nginx_dir = self.spec.get("nginx_dir") if isinstance(self.spec, Mapping) else None
        if nginx_dir:
            # The conf includes the API keys map by its absolute path under nginx_dir (a
            # directory of the test's own): make that path the rendered tree.
            rendered_nginx = self.out / str(nginx_dir).lstrip("/")
            if not os.path.lexists(nginx_dir):
                Path(nginx_dir).symlink_to(rendered_nginx, target_is_directory=True)
        self.nginx_conf_d = rendered_nginx / "conf.d" / f"{self.name}.conf"
        self.supervisord_conf_d = self.out / "etc/supervisor/conf.d" / f"{self.name}.conf"
        assert self.nginx_conf_d.is_file() and self.supervisord_conf_d.is_file(), sorted(self.out.rglob("*"))

    def apply(self, spec: Mapping[str, Any] | Sequence[str], *extra: str, check: bool = True,
              timeout: float = 300) -> subprocess.CompletedProcess:
        """`vfgen apply` of `spec` onto the running deployment (same ports, paths, nginx and supervisord)."""
        self.spec = spec
        nginx = shlex.join([self.nginx_bin, "-c", str(self.root / "nginx.conf"), "-p", str(self.run_dir)])
        result = self.vfgen("apply", "--output-dir", str(self.out), "--nginx", nginx,
                            "--supervisorctl", shlex.join([self.supervisorctl_bin, "-c", str(self.supervisord_conf)]),
                            *extra, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"`{' '.join(result.args)}` exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        self.plan = json.loads(self._vfgen("plan", ["--json"]).stdout)
        self.backends = tuple(
            Backend(i["name"], i["model"], i["served_name"], int(i["port"]), tuple(i["gpus"]))
            for i in self.plan["instances"]
        )
        self.ports_used |= {b.port for b in self.backends}
        return result

    def _instance_count(self) -> int:
        if isinstance(self.spec, Mapping):
            return sum(int(m.get("instances", 1)) for m in self.spec["models"])
        args = list(self.spec)
        for flag in ("-n", "--instances"):
            if flag in args:
                return int(args[args.index(flag) + 1])
        return 1

    # --- nginx ----------------------------------------------------------------------

    def _write_nginx_conf(self) -> Path:
        temp = self.run_dir / "nginx"
        temp.mkdir(mode=0o755, exist_ok=True)
        conf = self.root / "nginx.conf"
        conf.write_text(
            "# Test wrapper around the rendered conf.d file.\n"
            "worker_processes 2;\n"
            "daemon off;\n"
            f"pid {self.root / 'nginx.pid'};\n"
            f"error_log {self.root / 'nginx-error.log'} notice;\n"
            "events { worker_connections 4096; }\n"
            "http {\n"
            # Which backends nginx tried for each request, in order: failover evidence.
            "    log_format upstreams '$msec $status \"$request\" upstream=\"$upstream_addr\" "
            "upstream_status=\"$upstream_status\"';\n"
            f"    access_log {self.root / 'nginx-access.log'} upstreams;\n"
            + "".join(f"    {kind}_temp_path {temp / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + f"    include {self.nginx_conf_d};\n"
            "}\n"
        )
        return conf

    def _start_nginx(self) -> None:
        conf = self._write_nginx_conf()
        check = subprocess.run([self.nginx_bin, "-t", "-c", str(conf), "-p", str(self.run_dir)],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected the rendered config:\n{check.stderr}")
        self.nginx_proc = self.procs.start([self.nginx_bin, "-c", str(conf), "-p", str(self.run_dir)],
                                           stdout=subprocess.DEVNULL, stderr=self._log_file("nginx-stderr.log"))

    def _log_file(self, name: str):
        handle = open(self.root / name, "wb")
        self._files.append(handle)
        return handle

    def reload_nginx(self) -> None:
        """Check the (re-rendered) config, then make the running nginx load it (SIGHUP)."""
        conf = self.root / "nginx.conf"
        check = subprocess.run([self.nginx_bin, "-t", "-c", str(conf), "-p", str(self.run_dir)],
                               capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected the re-rendered config:\n{check.stderr}")
        assert self.nginx_proc is not None and self.nginx_proc.poll() is None, "nginx is not running"
        os.kill(self.nginx_proc.pid, signal.SIGHUP)

    def nginx_access_log(self) -> str:
        path = self.root / "nginx-access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def nginx_error_log(self) -> str:
        path = self.root / "nginx-error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- supervisord ----------------------------------------------------------------

    def _write_supervisord_conf(self) -> Path:
        self.socket = self.run_dir / "supervisor.sock"
        conf = self.root / "supervisord.conf"
        conf.write_text(
            "; Test wrapper around the rendered conf.d file.\n"
            "[supervisord]\n"
            "nodaemon=true\n"
            "user=root\n"
            f"logfile={self.root / 'supervisord.log'}\n"
            f"pidfile={self.root / 'supervisord.pid'}\n"
            f"childlogdir={self.log_dir}\n"
            "\n[unix_http_server]\n"
            f"file={self.socket}\n"
            "chmod=0700\n"
            "\n[supervisorctl]\n"
            f"serverurl=unix://{self.socket}\n"
            "\n[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
            "\n[include]\n"
            f"files = {self.supervisord_conf_d.parent}/*.conf\n"
        )
        return conf

    def _start_supervisord(self) -> None:
        self.log_dir.mkdir(exist_ok=True)
        self.supervisord_conf = self._write_supervisord_conf()
        env = {**os.environ, TAG_ENV: self.tag, "VFGEN_FAKE_EVENT_LOG": str(self.event_log), **self.extra_env}
        self.supervisord_proc = self.procs.start(
            [self.supervisord_bin, "-c", str(self.supervisord_conf)], env=env,
            stdout=subprocess.DEVNULL, stderr=self._log_file("supervisord-stderr.log"),
        )

    def supervisorctl(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        result = subprocess.run([self.supervisorctl_bin, "-c", str(self.supervisord_conf), *args],
                                capture_output=True, text=True, timeout=timeout)
        # supervisorctl exits non-zero for e.g. `status` when a program is not RUNNING.
        if check and result.returncode != 0:
            raise RuntimeError(f"supervisorctl {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def start_programs(self, backends: Sequence[Backend]) -> list[subprocess.Popen]:
        """`supervisorctl start` each, without waiting (it blocks for startsecs): for tests that
        watch the moment a backend is back. Wait on the returned processes before stopping."""
        return [subprocess.Popen([self.supervisorctl_bin, "-c", str(self.supervisord_conf), "start", self.program(b)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for b in backends]

    def first_healthy(self, backends: Sequence[Backend], timeout: float,
                      check: Callable[[], None] | None = None) -> tuple[Backend, float]:
        """Poll the backends' own /health every 10 ms: the first to answer 200 and the monotonic
        time it did. `check`, if given, runs about once a second and may raise."""
        end = time.monotonic() + timeout
        next_check = 0.0
        with httpx.Client(timeout=0.5, trust_env=False) as client:
            while time.monotonic() < end:
                if check is not None and time.monotonic() >= next_check:
                    check()
                    next_check = time.monotonic() + 1.0
                for b in backends:
                    try:
                        if client.get(f"{b.url}/health").status_code == 200:
                            return b, time.monotonic()
                    except httpx.HTTPError:
                        pass
                time.sleep(0.01)
        raise TimeoutError(f"no backend of {[b.program for b in backends]} healthy after {timeout}s\n{self.diagnostics()}")

    def program(self, backend: Backend) -> str:
        """The name supervisorctl wants (each instance is a program of its own, no group)."""
        return backend.program

    def status(self) -> dict[str, str]:
        out = self.supervisorctl("status", check=False).stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}

    # --- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT, check: Callable[[], None] | None = None,
              wait: bool = True) -> LiveDeployment:
        """`wait=False` returns once nginx and supervisord run, for tests of starts that fail."""
        self.render()
        self._start_nginx()
        self._start_supervisord()
        if wait:
            self.wait_healthy(timeout=timeout, check=check)
        return self

    def wait_healthy(self, backends: Sequence[Backend] | None = None, timeout: float = START_TIMEOUT,
                     check: Callable[[], None] | None = None) -> None:
        """Until every backend (default: all) lists its model and nginx /health answers 200.
        `check`, if given, runs on every poll and may raise to stop waiting early."""
        waiting = list(self.backends if backends is None else backends)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if check is not None:
                check()
            waiting = [b for b in waiting if not self.backend_ready(b)]
            if not waiting and self._get_status(f"{self.url}/health") == 200:
                return
            for proc, what in ((self.nginx_proc, "nginx"), (self.supervisord_proc, "supervisord")):
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{what} exited with {proc.returncode}\n{self.diagnostics()}")
            time.sleep(0.1)
        raise TimeoutError(f"not healthy after {timeout}s: {[b.program for b in waiting]}\n{self.diagnostics()}")

    def backend_ready(self, backend: Backend) -> bool:
        try:
            resp = self.http.get(f"{backend.url}/v1/models", timeout=1.0)
            return resp.status_code == 200 and any(m["id"] == backend.served_name for m in resp.json()["data"])
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def _get_status(self, url: str) -> int:
        try:
            return self.http.get(url, timeout=2.0).status_code
        except httpx.HTTPError:
            return 0

    def diagnostics(self) -> str:
        parts = [f"--- supervisorctl status\n{self.supervisorctl('status', check=False).stdout if self.supervisord_proc else ''}"]
        for path in [self.root / "supervisord.log", self.root / "nginx-error.log", *sorted(self.log_dir.glob("*.log"))]:
            if path.exists():
                parts.append(f"--- {path.name} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop everything this deployment started; raise if any of its processes outlived that."""
        try:
            if self.supervisord_proc is not None and self.supervisord_proc.poll() is None:
                self.procs.stop(self.supervisord_proc, timeout=STOP_TIMEOUT)
            if self.nginx_proc is not None:
                self.procs.stop(self.nginx_proc, timeout=10)
            leftovers = self.leftover_pids()
            for pid in leftovers:
                _kill(pid)
            if leftovers:
                raise AssertionError(f"processes of this deployment survived its stop: {leftovers}")
        finally:
            self.http.close()
            for handle in self._files:
                handle.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def leftover_pids(self) -> dict[int, str]:
        """Live processes tagged with this deployment, or listening on its ports."""
        ports = {self.port, *self.ports_used} if self.ports_used else set()
        found = {pid: _cmdline(pid) for pid in _pids_listening(ports)}
        found.update(self._tagged())
        return {pid: cmd for pid, cmd in found.items() if process_alive(pid)}

    def instance_pids(self) -> dict[int, str]:
        """Live launchers and stand-ins of this deployment (every tagged process but supervisord)."""
        manager = self.supervisord_proc.pid if self.supervisord_proc else None
        return {pid: cmd for pid, cmd in self._tagged().items() if pid != manager and process_alive(pid)}

    def _tagged(self) -> dict[int, str]:
        needle = f"{TAG_ENV}={self.tag}".encode()
        found = {}
        for pid in _all_pids():
            try:
                if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found[pid] = _cmdline(pid)
            except OSError:
                continue
        return found

    # --- client helpers -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats(self, backend: Backend) -> dict[str, Any]:
        return self.http.get(f"{backend.url}/fake/stats").json()

    def all_stats(self) -> dict[int, dict[str, Any]]:
        return {b.port: self.stats(b) for b in self.backends}

    def reset_stats(self) -> None:
        for b in self.backends:
            self.http.post(f"{b.url}/fake/reset").raise_for_status()

    def backend_by_port(self, port: int) -> Backend:
        return next(b for b in self.backends if b.port == port)

    def vllm_pid(self, backend: Backend) -> int:
        """PID of the stand-in listening on the backend's port (found through /proc, not by name)."""
        pids = _pids_listening({backend.port})
        if len(pids) != 1:
            raise RuntimeError(f"expected one process listening on {backend.port}, found {pids}")
        return pids[0]

    def launcher_pid(self, backend: Backend) -> int:
        """PID of the `vfgen launch` that supervisord runs for this backend."""
        out = self.supervisorctl("pid", self.program(backend)).stdout.strip()
        return int(out)

    def events(self) -> list[dict[str, Any]]:
        if not self.event_log.exists():
            return []
        return [json.loads(line) for line in self.event_log.read_text().splitlines() if line.strip()]


# --- /proc helpers --------------------------------------------------------------------


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _listening_inodes(ports: set[int]) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) in ports:  # 0A = LISTEN
                inodes.add(inode)
    return inodes


def _pids_listening(ports: set[int]) -> list[int]:
    inodes = _listening_inodes(ports)
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    pids = []
    for pid in _all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                    pids.append(pid)
                    break
            except OSError:
                continue
    return sorted(pids)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stand_in_args(latency: float = 0.0, chunks: int | None = None, chunk_interval: float | None = None) -> list[str]:
    """`extra_args` that make vfgen-fake-vllm behave like a loaded vLLM."""
    args = ["--fake-latency", str(latency)]
    if chunks is not None:
        args += ["--fake-stream-chunks", str(chunks)]
    if chunk_interval is not None:
        args += ["--fake-chunk-interval", str(chunk_interval)]
    return args


def assert_json_error(status: int, headers: Mapping[str, str], body: bytes, code: int) -> dict[str, Any]:
    """An OpenAI-style JSON error (never an HTML page) with the given status; returns its `error` object."""
    content_type = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    assert status == code, (status, body[:300])
    assert content_type.startswith("application/json"), (content_type, body[:300])
    error = json.loads(body)["error"]
    assert error["code"] == code and error["message"] and error["type"], error
    return error


def raw_request(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send exact bytes (e.g. a chunked body with no Content-Length) and read the reply until close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return status, headers, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2:]
    return out

