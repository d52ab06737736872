"""Drive the Ansible tier: offline installs for the containers, ansible-playbook runs, a private network of hosts.

- `require_ansible_tier()` finds ansible-playbook, ansible-lint and the cache
  scripts/install-ansible-tier.sh fills; fails in CI, skips loudly elsewhere.
- `build_wheelhouse()` puts vfgen's wheel (built from this checkout), its
  dependencies and a stand-in `vllm` wheel (console script `vllm` = vfgen's
  fake vLLM) in one directory the containers get read-only; the role installs
  from it with PIP_NO_INDEX, exactly as on an air-gapped GPU host.
- `use_local_apt_repo()` points a container's apt at the cached local repository.
- `Ansible.playbook()` runs ansible-playbook with the test's inventory through the
  `vfgen_nsenter` connection plugin and parses the PLAY RECAP.
- `PrivateNetwork` is a bridge in a network namespace the test creates, with each
  container attached by a veth pair and an address in 198.51.100.0/24 (TEST-NET-2).
  Its `SteadyLoad` sends requests from inside that namespace until stopped.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import importlib.util
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import requests
import yaml

from tests.harness.nspawn import Container
from tests.harness.tools import missing, require_tool

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parents[2]
ROLES_PATH = REPO_ROOT / "ansible" / "roles"
EXAMPLES = REPO_ROOT / "examples" / "ansible"
PLUGINS = Path(__file__).resolve().parent / "connection_plugins"
CACHE = Path(os.environ.get("VFGEN_ANSIBLE_CACHE", Path.home() / ".cache" / "vfgen" / "ansible-tier")).expanduser()
INSTALL_SCRIPT = "scripts/install-ansible-tier.sh"

# Where the containers see the offline installs (bound read-only).
WHEELHOUSE_INSIDE = "/srv/vfgen-wheelhouse"
APT_REPO_INSIDE = "/srv/vfgen-apt"
# The stand-in vLLM wheel carries the version the examples pin.
STANDIN_VLLM_VERSION = "0.32.0"

PLAYBOOK_TIMEOUT = 600.0
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)",
                   re.MULTILINE)


# ---------------------------------------------------------------- tools and cache


@dataclass(frozen=True)
class Tools:
    ansible_playbook: str
    ansible_lint: str


def require_ansible_tier(rootfs: Path) -> Tools:
    """The tier's tools and a cache that matches the rootfs; fails in CI, skips loudly elsewhere."""
    tools = Tools(require_tool("ansible-playbook", f"ansible-core: run {INSTALL_SCRIPT}"),
                  require_tool("ansible-lint", f"ansible-lint: run {INSTALL_SCRIPT}"))
    marker = CACHE / "marker"
    if not marker.exists():
        missing(f"the offline cache {CACHE}", f"run {INSTALL_SCRIPT}")
    wanted = subprocess.run(["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f=${Version}", "python3.11"],
                            capture_output=True, text=True, check=True).stdout
    if f"python3.11={wanted} " not in marker.read_text():
        missing(f"a cache in {CACHE} for the rootfs's python3.11 {wanted}", f"the rootfs changed: run {INSTALL_SCRIPT} again")
    return tools


def build_wheelhouse(dest: Path) -> Path:
    """vfgen's wheel from this checkout, its cached dependencies, and the stand-in vLLM wheel."""
    if importlib.util.find_spec("hatchling") is None:  # builds the wheel without a package index
        missing("hatchling", f"run {INSTALL_SCRIPT}")
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in (CACHE / "wheels").glob("*.whl"):
        shutil.copy2(wheel, dest / wheel.name)
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dest), str(REPO_ROOT)],
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"building the vfgen wheel failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    standin_vllm_wheel(dest)
    return dest


def standin_vllm_wheel(dest: Path, version: str = STANDIN_VLLM_VERSION) -> Path:
    """A wheel named `vllm` whose `vllm` console script is vfgen's fake vLLM, and nothing else.

    Lets the role's "install vLLM, pinned, into a venv" path run for real without
    a GPU build of vLLM; it can only ever come from the test's own wheelhouse. The
    fake is one standard-library-only file, so the wheel carries a copy of it and
    needs no dependencies.
    """
    from vfgen.testing import fake_vllm

    info = f"vllm-{version}.dist-info"
    files = {
        "vfgen_standin_vllm.py": Path(fake_vllm.__file__).read_text(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                            "Summary: vfgen test stand-in for vLLM (vfgen.testing.fake_vllm); not vLLM\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: vfgen-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": "[console_scripts]\nvllm = vfgen_standin_vllm:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    path = dest / f"vllm-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def offline_binds(wheelhouse: Path) -> list[tuple[Path, Path]]:
    return [(CACHE / "apt", Path(APT_REPO_INSIDE)), (wheelhouse, Path(WHEELHOUSE_INSIDE))]


def use_local_apt_repo(container: Container) -> None:
    """The container's only apt source becomes the cached local repository (it has no network)."""
    container.write_file("/etc/apt/sources.list", f"deb [trusted=yes] file:{APT_REPO_INSIDE} ./\n")
    container.run("rm -f /etc/apt/sources.list.d/*")


# ---------------------------------------------------------------- the deployment under test


def example_deployment(port: int, port_start: int, latency: float) -> dict[str, Any]:
    """The examples' deployment (group_vars/all.yml) with this test's ports, wheelhouse and timeouts.

    Extra vars override the examples' group_vars; everything else (models,
    instances, GPUs, the pinned vLLM version) is exactly what the example ships.
    """
    example = yaml.safe_load((EXAMPLES / "group_vars" / "all.yml").read_text())
    models = []
    for model in example["vfgen_models"]:
        env = dict(model.get("env") or {})
        env["VFGEN_FAKE_LATENCY"] = f"{latency:g}"  # the stand-in's service time
        models.append({**model, "env": env})
    from vfgen import __version__

    return {
        "vfgen_models": models,
        "vfgen_port": port,
        "vfgen_port_start": port_start,
        "vfgen_version": __version__,
        "vfgen_pip_environment": {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELHOUSE_INSIDE},
        "vfgen_vllm_install": True,
        "vfgen_vllm_version": STANDIN_VLLM_VERSION,
        "vfgen_timeouts": {"start": 60, "shutdown": 10},
        "vfgen_health_timeout": 60,
    }


# ---------------------------------------------------------------- ansible-playbook


@dataclass(frozen=True)
class HostStats:
    ok: int
    changed: int
    unreachable: int
    failed: int
    skipped: int


@dataclass
class PlaybookRun:
    argv: list[str]
    rc: int
    output: str
    seconds: float
    recap: dict[str, HostStats] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{' '.join(self.argv)} -> exit {self.rc} in {self.seconds:.1f}s\n{self.output[-12000:]}"

    def changed_tasks(self) -> list[str]:
        """`changed: [host]` lines with the task each belongs to, to explain a changed count."""
        out, task = [], ""
        for line in self.output.splitlines():
            if line.startswith(("TASK [", "RUNNING HANDLER [")):
                task = line
            elif line.startswith("changed:"):
                out.append(f"{task} {line}")
        return out


class Ansible:
    """ansible-playbook with a private ANSIBLE_HOME, the test connection plugin and the repo's roles."""

    def __init__(self, tools: Tools, workdir: Path) -> None:
        self.tools = tools
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")},
            "ANSIBLE_HOME": str(workdir / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(workdir / "ansible-tmp"),
            "ANSIBLE_CONFIG": str(workdir / "ansible.cfg"),
            "ANSIBLE_CONNECTION_PLUGINS": str(PLUGINS),
            "ANSIBLE_ROLES_PATH": str(ROLES_PATH),
            "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_FORKS": "5",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_DEPRECATION_WARNINGS": "0",
            "PYTHONUNBUFFERED": "1",
        }
        (workdir / "ansible.cfg").write_text("[defaults]\n")

    def inventory(self, name: str, hosts: Mapping[str, Container], groups: Mapping[str, Sequence[str]] | None = None,
                  host_vars: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
        """A YAML inventory reaching each container through vfgen_nsenter (as root, so no become)."""
        inventory: dict[str, Any] = {
            "all": {
                "vars": {"ansible_connection": "vfgen_nsenter", "ansible_python_interpreter": "/usr/bin/python3",
                         "ansible_become": False},
                "hosts": {h: {"vfgen_nsenter_pid": c.pid1, **(host_vars or {}).get(h, {})} for h, c in hosts.items()},
                "children": {g: {"hosts": {h: {} for h in members}} for g, members in (groups or {}).items()},
            }
        }
        path = self.workdir / f"{name}.yml"
        path.write_text(yaml.safe_dump(inventory, sort_keys=False))
        return path

    def vars_file(self, name: str, values: Mapping[str, Any]) -> Path:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(values, indent=2))
        return path

    def playbook(self, playbook: Path, inventories: Sequence[Path], extra_vars: Sequence[Path] = (), *,
                 check: bool = False, timeout: float = PLAYBOOK_TIMEOUT) -> PlaybookRun:
        argv = [self.tools.ansible_playbook, str(playbook)]
        argv += [arg for inv in inventories for arg in ("-i", str(inv))]
        argv += [arg for ev in extra_vars for arg in ("-e", f"@{ev}")]
        if check:
            argv.append("--check")
        began = time.monotonic()
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            output, _ = proc.communicate()
            raise AssertionError(f"{' '.join(argv)} did not finish in {timeout}s:\n{output[-8000:]}") from None
        run = PlaybookRun(argv, proc.returncode, output, time.monotonic() - began)
        for m in RECAP.finditer(output):
            run.recap[m.group(1)] = HostStats(*(int(m.group(i)) for i in (2, 3, 4, 5, 6)))
        return run


# ---------------------------------------------------------------- network

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(path: str) -> None:
    """Move the calling thread (only) into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class PrivateNetwork:
    """A bridge in a network namespace of its own: containers on 198.51.100.0/24, nothing else.

    The bridge itself is 198.51.100.1, where the test's clients sit. Removing the
    namespace removes the bridge and the veth ends in it; a container's end goes
    with the container.
    """

    PREFIX = "198.51.100"

    def __init__(self) -> None:
        self.ip = require_tool("ip", "iproute2")
        self.name = f"vfgenhub-{os.getpid()}-{secrets.token_hex(3)}"
        self.path = f"/run/netns/{self.name}"
        self.links = 0

    def _ip(self, *args: str) -> None:
        subprocess.run([self.ip, "-n", self.name, *args], check=True, capture_output=True, text=True, timeout=30)

    def __enter__(self) -> "PrivateNetwork":
        subprocess.run([self.ip, "netns", "add", self.name], check=True, capture_output=True, text=True, timeout=30)
        try:
            self._ip("link", "set", "lo", "up")
            self._ip("link", "add", "br0", "type", "bridge")
            self._ip("addr", "add", f"{self.PREFIX}.1/24", "dev", "br0")
            self._ip("link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run([self.ip, "netns", "del", self.name], capture_output=True, timeout=30)

    def attach(self, container: Container, address: str) -> None:
        """A veth from the bridge into the container (its end named eth0), with `address`/24."""
        self.links += 1
        hub_end = f"vh{self.links}"
        self._ip("link", "add", hub_end, "type", "veth", "peer", "name", "eth0", "netns", str(container.pid1))
        self._ip("link", "set", hub_end, "master", "br0", "up")
        inside = [container.nsenter, "-t", str(container.pid1), "-n", self.ip]
        subprocess.run([*inside, "addr", "add", f"{address}/24", "dev", "eth0"], check=True, capture_output=True, timeout=30)
        subprocess.run([*inside, "link", "set", "eth0", "up"], check=True, capture_output=True, timeout=30)

    def call(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        """Run `fn` in a thread inside this namespace and return its result."""
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                enter_netns(self.path)
                box["value"] = fn()
            except BaseException as exc:  # re-raised in the caller
                box["error"] = exc

        thread = threading.Thread(target=body, daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f"call in {self.name} did not return within {timeout}s")
        if "error" in box:
            raise box["error"]
        return box["value"]


def http_json(method: str, url: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any, Mapping[str, str]]:
    with requests.Session() as session:
        session.trust_env = False
        resp = session.request(method, url, json=body, timeout=timeout)
        try:
            payload = resp.json()
        except ValueError:
            payload = resp.text
        return resp.status_code, payload, resp.headers


@dataclass
class Outcome:
    started: float  # monotonic
    status: int  # 0: no HTTP answer
    error: str = ""


class SteadyLoad:
    """Worker threads inside a network namespace, each sending one request after another until stopped.

    Requests alternate between the given (path, body) pairs. Bounded: every
    request has a timeout and the whole load a deadline.
    """

    def __init__(self, network: PrivateNetwork, base_url: str, requests_: Sequence[tuple[str, Any]], *,
                 workers: int = 4, deadline: float = 300.0, timeout: float = 15.0) -> None:
        self.network = network
        self.base_url = base_url
        self.requests = list(requests_)
        self.workers = workers
        self.deadline = time.monotonic() + deadline
        self.timeout = timeout
        self.stop_event = threading.Event()
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(workers)]

    def __enter__(self) -> "SteadyLoad":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _work(self, worker: int) -> None:
        enter_netns(self.network.path)
        session = requests.Session()
        session.trust_env = False
        n = worker
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            path, body = self.requests[n % len(self.requests)]
            n += 1
            started = time.monotonic()
            try:
                resp = session.post(self.base_url + path, json=body, timeout=self.timeout)
                outcome = Outcome(started, resp.status_code, "" if resp.ok else resp.text[:300])
            except requests.RequestException as exc:
                outcome = Outcome(started, 0, f"{type(exc).__name__}: {exc}")
            with self.lock:
                self.outcomes.append(outcome)
        session.close()

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def wait_for(self, done: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while self.count() < done:
            if time.monotonic() > end:
                raise TimeoutError(f"only {self.count()}/{done} requests in {timeout}s")
            time.sleep(0.02)

    def stop(self) -> list[Outcome]:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(self.timeout + 5)
        with self.lock:
            return list(self.outcomes)


def failures(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]
