"""Install a vfgen systemd deployment in a booted container the way an operator would, and observe it.

`SystemdDeployment(container, spec)`:

- `prepare()` creates the service user, lets it reach this Python environment
  (bound read-only from the host) and creates fake NVIDIA device nodes;
- `install()` runs `vfgen render ... --output-dir /` inside the container, with
  the stand-in vLLM as `--vllm-bin`, then `systemctl daemon-reload`. A `Spec`
  with `models` is a deployment FILE (several models, `ModelEntry`): `stage()`
  writes it to /etc/vfgen/NAME.yaml inside and returns `-f` that path;
- `start()` runs `systemctl start <name>.target`, bounded, and raises with every
  unit's status and journal when it fails.

Observation helpers read `systemctl show` properties, the stand-in's event log
("exec", "ready", "sigterm", "exit" per process) and the journal. `run_client()`
runs a small bounded HTTP client inside the container (the tests' traffic never
leaves the container's loopback).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.harness.nspawn import REPO_FOR_SERVICES, Container, python_env_binds
from tests.harness.tools import missing
from tests.harness.waiting import wait_until

T = TypeVar("T")

# The console scripts of this environment; the container sees them at the same path.
VFGEN_BIN = Path(sys.executable).with_name("vfgen")
FAKE_VLLM_BIN = Path(sys.executable).with_name("vfgen-fake-vllm")

EVENT_LOG = "/var/lib/vfgen/events.jsonl"  # inside StateDirectory=vfgen: writable under ProtectSystem=strict
CLIENT_PATH = "/usr/local/lib/vfgen-test-client.py"
SECRET_ENV = ("VFGEN_TEST_SECRET", "hf_not-in-any-rendered-file")
FAKE_GPU_DEVICES = {"nvidia0": (195, 0), "nvidia1": (195, 1), "nvidiactl": (195, 255)}

TIMESTAMP_PROPS = (
    "ActiveEnterTimestampMonotonic", "ActiveExitTimestampMonotonic", "ExecMainStartTimestampMonotonic",
    "InactiveExitTimestampMonotonic", "InactiveEnterTimestampMonotonic",
)
STATE_PROPS = ("ActiveState", "SubState", "Result", "NRestarts", "MainPID", "ExecMainStatus")


class DeploymentError(AssertionError):
    """The deployment did not install, start or get somewhere in time; the message carries what systemd saw."""


@dataclass(frozen=True)
class ModelEntry:
    """One model of a deployment file: `org/KEY`, served as KEY; its units are NAME-KEY-N."""

    key: str
    instances: int = 2
    gpus: tuple[str, ...] = ("0",)
    share: float | None = None  # gpu_memory_utilization; None: auto (budget / instances on the GPU)
    max_batch_size: int = 8
    vllm_args: tuple[str, ...] = ()

    def mapping(self, env: dict[str, str]) -> dict[str, Any]:
        entry: dict[str, Any] = {"model": f"org/{self.key}", "served_model_name": self.key, "instances": self.instances,
                                 "gpus": list(self.gpus), "max_batch_size": self.max_batch_size, "env": env}
        if self.share is not None:
            entry["gpu_memory_utilization"] = self.share
        if self.vllm_args:
            entry["extra_args"] = list(self.vllm_args)
        return entry


@dataclass(frozen=True)
class Spec:
    """What to render: one model, `instances` instances spread over `cuda_devices` (fake ids);
    or, with `models`, a deployment file of those models (model, instances, cuda_devices,
    max_batch_size and vllm_args then come from each entry)."""

    name: str = "vt"
    model: str = "Qwen/Qwen3-0.6B"
    instances: int = 4
    cuda_devices: str = "0,1"
    port: int = 18080  # the container has a private network: fixed ports cannot collide
    port_start: int = 19001
    user: str = "vllm"
    startup_delay: float = 2.0
    latency: float = 0.0
    shutdown_timeout: int = 5
    start_timeout: int = 60
    lock_timeout: int | None = None  # None: vfgen's default, which grows with the instances sharing a GPU
    extra_env: tuple[str, ...] = ()
    max_batch_size: int = 32
    vllm_args: tuple[str, ...] = ()  # after `--`, passed to every instance
    env_file: str | None = None  # written by prepare(), root-only, holding SECRET_ENV
    models: tuple[ModelEntry, ...] = ()  # non-empty: a deployment file (see deploy_file)

    @property
    def file_path(self) -> str:
        return f"/etc/vfgen/{self.name}.yaml"

    def _env(self) -> list[str]:
        # PYTHONPATH: the units' PrivateTmp hides an editable checkout under /tmp (see nspawn.REPO_FOR_SERVICES).
        env = [f"VFGEN_FAKE_STARTUP_DELAY={self.startup_delay:g}", f"VFGEN_FAKE_EVENT_LOG={EVENT_LOG}",
               f"PYTHONPATH={REPO_FOR_SERVICES}"]
        if self.latency:
            env.append(f"VFGEN_FAKE_LATENCY={self.latency:g}")
        return env + list(self.extra_env)

    def deploy_file(self) -> str:
        """The deployment file of `models`, with what render_args() passes as flags for one model."""
        env = dict(pair.split("=", 1) for pair in self._env())
        data: dict[str, Any] = {
            "name": self.name, "port": self.port, "port_start": self.port_start, "user": self.user,
            "vfgen_bin": str(VFGEN_BIN), "vllm_bin": str(FAKE_VLLM_BIN),
            "timeouts": {"start": self.start_timeout, "shutdown": self.shutdown_timeout,
                         **({"lock": self.lock_timeout} if self.lock_timeout is not None else {})},
            "models": [m.mapping(dict(env)) for m in self.models],
        }
        if self.env_file:
            for entry in data["models"]:
                entry["env_file"] = self.env_file
        return yaml.safe_dump(data, sort_keys=False)

    def render_args(self) -> list[str]:
        if self.models:
            return ["-f", self.file_path]
        env = self._env()
        args = [
            self.model, "--name", self.name, "-n", str(self.instances), "--cuda-devices", self.cuda_devices,
            "--port", str(self.port), "--port-start", str(self.port_start), "--user", self.user,
            "--vfgen-bin", str(VFGEN_BIN), "--vllm-bin", str(FAKE_VLLM_BIN),
            "--shutdown-timeout", str(self.shutdown_timeout), "--start-timeout", str(self.start_timeout),
        ]
        for pair in env:
            args += ["--env", pair]
        if self.env_file:
            args += ["--env-file", self.env_file]
        if self.lock_timeout is not None:
            args += ["--lock-timeout", str(self.lock_timeout)]
        args += ["--max-batch-size", str(self.max_batch_size)]
        return args + (["--", *self.vllm_args] if self.vllm_args else [])


@dataclass(frozen=True)
class Window:
    """One stand-in process from "exec" to "ready" (ready=None: it never got there)."""

    pid: int
    port: int
    gpus: tuple[str, ...]
    exec_t: float
    ready_t: float | None

    def overlaps(self, other: Window) -> bool:
        end, other_end = self.ready_t or float("inf"), other.ready_t or float("inf")
        return self.exec_t < other_end and other.exec_t < end


@dataclass
class SystemdDeployment:
    container: Container
    spec: Spec = field(default_factory=Spec)
    plan: dict[str, Any] = field(default_factory=dict)
    start_seconds: float = 0.0
    records: dict[str, Any] = field(default_factory=dict)  # what a test scenario saw, for the tests that check it

    # ------------------------------------------------------------ set-up

    def prepare(self) -> None:
        """Service user, a Python it can run, fake GPUs; what an operator's host has before vfgen."""
        for script in (VFGEN_BIN, FAKE_VLLM_BIN):
            if not script.exists():
                missing(str(script), "pip install -e . puts the vfgen console scripts next to this Python")
        c = self.container
        c.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
               "--shell", "/usr/sbin/nologin", self.spec.user])
        # Debian's /root is 0700: the service user cannot reach a Python installed under it
        # (the units then fail with 203/EXEC "Permission denied"). On a real host, install
        # vfgen where the user can read it (e.g. /opt/vfgen); here, open the parents in the overlay.
        self._make_traversable(python_env_binds())
        for node, (major, minor) in FAKE_GPU_DEVICES.items():
            c.run(["mknod", "-m", "666", f"/dev/{node}", "c", str(major), str(minor)])
        if self.spec.env_file:
            c.run(["mkdir", "-p", str(Path(self.spec.env_file).parent)])
            c.write_file(self.spec.env_file, f"# operator's secrets\n{SECRET_ENV[0]}={SECRET_ENV[1]}\n", mode=0o600)
        for script in (VFGEN_BIN, FAKE_VLLM_BIN):
            check = c.run(["runuser", "-u", self.spec.user, "--", str(script), "--help"], check=False)
            if check.returncode != 0:
                raise DeploymentError(f"user {self.spec.user} cannot run {script}:\n{check.stderr}")

    def _make_traversable(self, paths: list[Path]) -> None:
        parents = sorted({str(p) for path in paths for p in path.parents if p != Path("/")})
        script = (
            "import os, stat, sys\n"
            "for d in sys.argv[1:]:\n"
            "    mode = os.stat(d).st_mode\n"
            "    if not mode & stat.S_IXOTH:\n"
            "        os.chmod(d, stat.S_IMODE(mode) | stat.S_IXOTH)\n"
        )
        self.container.run(["python3", "-c", script, *parents])

    def stage(self, spec: Spec) -> list[str]:
        """The vfgen arguments of `spec`; a deployment file is written in the container first."""
        if spec.models:
            self.container.write_file(spec.file_path, spec.deploy_file())
        return spec.render_args()

    def replan(self, spec: Spec) -> None:
        """Make `spec` the one the observation helpers describe (after an apply of it)."""
        args = self.stage(spec)
        split = args.index("--") if "--" in args else len(args)  # what follows `--` belongs to vLLM
        args = [*args[:split], "--json", *args[split:]]
        if spec.models:  # the file lives in the container
            out = self.container.run([str(VFGEN_BIN), "plan", *args], check=False)
            if out.returncode != 0:
                raise DeploymentError(f"vfgen plan failed inside the container:\n{out.stderr}")
            self.plan = json.loads(out.stdout)
        else:
            self.plan = json.loads(_host(["plan", *args]))
        self.spec = spec

    def install(self) -> None:
        """`vfgen render --output-dir /` inside, then daemon-reload and enable, as docs/systemd.md says."""
        self.replan(self.spec)
        result = self.container.run([str(VFGEN_BIN), "render", *self.spec.render_args(), "--output-dir", "/"], check=False)
        if result.returncode != 0:
            raise DeploymentError(f"vfgen render failed inside the container:\n{result.stdout}\n{result.stderr}")
        self.container.systemctl("daemon-reload")
        # Enabled, the target hangs off multi-user.target, so systemd keeps it and its
        # instances loaded when stopped (a stopped unreferenced unit is unloaded, timestamps and all).
        self.container.systemctl("enable", self.target)

    def start(self, timeout: float = 90.0) -> float:
        """`systemctl start <target>`; returns how long it blocked."""
        began = time.monotonic()
        try:
            result = self.container.systemctl("start", self.target, check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"systemctl start {self.target} took over {timeout}s\n{self.diagnostics()}") from None
        self.start_seconds = time.monotonic() - began
        if result.returncode != 0:
            raise DeploymentError(f"systemctl start {self.target} failed: {result.stderr}\n{self.diagnostics()}")
        return self.start_seconds

    # ------------------------------------------------------------ plan

    @property
    def target(self) -> str:
        return f"{self.spec.name}.target"

    @property
    def instances(self) -> list[dict[str, Any]]:
        return self.plan["instances"]

    @property
    def units(self) -> list[str]:
        return [f"{inst['name']}.service" for inst in self.instances]

    def instance(self, unit: str) -> dict[str, Any]:
        return next(inst for inst in self.instances if f"{inst['name']}.service" == unit)

    def unit_files(self) -> list[str]:
        return [f"/etc/systemd/system/{name}" for name in (*self.units, self.target)]

    def gpus_of_port(self) -> dict[int, tuple[str, ...]]:
        return {inst["port"]: tuple(inst["gpus"]) for inst in self.instances}

    # ------------------------------------------------------------ observation

    def props(self, unit: str, *names: str) -> dict[str, str]:
        return self.container.show(unit, *(names or TIMESTAMP_PROPS + STATE_PROPS))

    def snapshot(self) -> dict[str, dict[str, str]]:
        """Timestamps and state of every instance unit and the target."""
        return {unit: self.props(unit) for unit in (*self.units, self.target)}

    def vllm_pid(self, unit: str) -> int:
        """The stand-in: the launcher's (MainPID's) only child once the unit is active."""
        main = self.props(unit, "MainPID")["MainPID"]
        children = self.container.run(["pgrep", "-P", main], check=False).stdout.split()
        if len(children) != 1:
            raise AssertionError(f"{unit}: MainPID {main} has children {children}, expected exactly the vLLM process")
        return int(children[0])

    def events(self) -> list[dict[str, Any]]:
        text = self.container.run(["cat", EVENT_LOG], check=False).stdout
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def windows(self) -> list[Window]:
        """Every stand-in process's exec → ready interval, in exec order."""
        gpus = self.gpus_of_port()
        seen: dict[int, dict[str, Any]] = {}
        for event in self.events():
            entry = seen.setdefault(event["pid"], {"port": event["port"]})
            entry.setdefault(event["event"], event["t"])
            entry["port"] = event["port"]  # "exec" may precede binding; later events carry the real port
        out = [Window(pid, e["port"], gpus.get(e["port"], ()), e["exec"], e.get("ready")) for pid, e in seen.items() if "exec" in e]
        return sorted(out, key=lambda w: w.exec_t)

    def journal_text(self, unit: str) -> str:
        return self.container.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False).stdout

    def wait_until(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        try:
            return wait_until(predicate, timeout, interval=0.2, what=what)
        except TimeoutError as exc:
            raise DeploymentError(f"{exc}\n{self.diagnostics()}") from None

    def diagnostics(self) -> str:
        status = self.container.systemctl("status", "--no-pager", "--lines=0", self.target, *self.units, check=False).stdout
        events = self.container.run(["tail", "-n", "40", EVENT_LOG], check=False).stdout
        journal = self.container.run(["journalctl", "--no-pager", "-n", "150", "-o", "short-monotonic"], check=False).stdout
        return f"--- systemctl status ---\n{status}\n--- event log ---\n{events}\n--- journal ---\n{journal}"

    # ------------------------------------------------------------ traffic

    def run_client(self, requests: list[dict[str, Any]], concurrency: int, timeout: float) -> list[dict[str, Any]]:
        """Send `requests` ({"url", "body"?, "at"?}) from inside the container; one result each, in order."""
        if self.container.run(["test", "-f", CLIENT_PATH], check=False).returncode != 0:
            self.container.write_file(CLIENT_PATH, CLIENT_SCRIPT)
        job = json.dumps({"requests": requests, "concurrency": concurrency, "timeout": timeout})
        result = self.container.run(["python3", CLIENT_PATH], input=job, timeout=timeout + 15)
        return json.loads(result.stdout)

    def chat_body(self, text: str = "hello") -> dict[str, Any]:
        return {"model": self.instances[0]["served_name"], "messages": [{"role": "user", "content": text}], "max_tokens": 4}


def _host(args: list[str]) -> str:
    """Run this environment's vfgen on the host (pure computation, e.g. `plan --json`)."""
    result = subprocess.run([str(VFGEN_BIN), *args], capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise DeploymentError(f"vfgen {shlex.join(args)} failed:\n{result.stderr}")
    return result.stdout


# Runs with the container's own python3 (standard library only). Reads a job on stdin,
# prints one result per request: status (0 = no HTTP answer), wall-clock start/end,
# the stand-in port that answered (x-fake-vllm-port), and an error text if any.
CLIENT_SCRIPT = r'''
"""Bounded HTTP client for the systemd test tier: JSON job on stdin, JSON results on stdout."""
import json, queue, sys, threading, time, urllib.error, urllib.request

job = json.load(sys.stdin)
deadline = time.monotonic() + job["timeout"]
began = time.time()
todo = queue.Queue()
for index, request in enumerate(job["requests"]):
    todo.put((index, request))
results = [None] * len(job["requests"])
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

def one(index, request):
    at = request.get("at", 0.0)
    time.sleep(max(0.0, began + at - time.time()))
    body = request.get("body")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(request["url"], data=data, headers={"Content-Type": "application/json"})
    out = {"index": index, "url": request["url"], "status": 0, "port": None, "error": None, "t_start": time.time()}
    try:
        with opener.open(req, timeout=max(0.1, deadline - time.monotonic())) as response:
            payload = response.read()
            out["status"] = response.status
            out["port"] = response.headers.get("x-fake-vllm-port")
    except urllib.error.HTTPError as exc:
        payload = exc.read()
        out["status"] = exc.code
        out["port"] = exc.headers.get("x-fake-vllm-port")
    except Exception as exc:
        payload = b""
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["t_end"] = time.time()
    try:
        out["choices"] = len(json.loads(payload).get("choices", []))
    except Exception:
        out["choices"] = None
    results[index] = out

def worker():
    while time.monotonic() < deadline:
        try:
            index, request = todo.get_nowait()
        except queue.Empty:
            return
        one(index, request)

threads = [threading.Thread(target=worker, daemon=True) for _ in range(job["concurrency"])]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(max(0.0, deadline - time.monotonic()) + 1)
for index, result in enumerate(results):
    if result is None:
        results[index] = {"index": index, "status": 0, "error": "not sent before the deadline"}
print(json.dumps(results))
'''
