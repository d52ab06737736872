"""Start and stop what the benchmark measures: backends and the dispatchers in front of them.

Backends: 4 "fast static" nginx processes that answer every request with a fixed
JSON body, or 4 stand-in vLLM servers (vfgen.testing.fake_vllm) with service
time and a --max-num-seqs scheduler.

Dispatchers, each on its own free port in front of the same backends:
- "vfgen": `vfgen render MODEL -n 4 --emit nginx` (least_conn, max_conns caps,
  backup overflow, passive health checks, retries), run by nginx unchanged.
- "vfgen-affinity": the same render with --enable-request-affinity.
- "round-robin": vfgen's render with three edits (see `round_robin_variant`):
  plain nginx round robin with everything else identical.
- "vllm-factory": vllm-factory 0.2.1's Dispatcher (bench/vllm_factory_runner.py).
- "nginx-minimal" (fast static backends only): upstream + keepalive + proxy_pass,
  nothing else; the floor any nginx hop costs.
- the peer routers of bench/peers.py (vllm-router, sglang-router, LiteLLM), each from its
  own pinned venv (`Stack.peers`).

Every process is started in its own session through a ProcessGroup and stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from bench import peers
from bench.wrk import MODEL
from tests.harness.deploy import console_script
from tests.harness.procs import ProcessGroup, free_port, free_port_range, wait_port
from vfgen import procfs

REPO = Path(__file__).resolve().parent.parent
BACKENDS = 4
START_TIMEOUT = 30.0
PEER_START_TIMEOUT = 120.0  # LiteLLM imports for a long while on a busy 2-core box
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

STATIC_BODY = ('{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2,0.3,0.4]}],'
               '"model":"%s","usage":{"prompt_tokens":9,"total_tokens":9}}' % MODEL)


def http_get(url: str, timeout: float = 2.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with _NO_PROXY.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, urllib.error.URLError):
        return 0, b""


def http_post(url: str, timeout: float = 2.0) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with _NO_PROXY.open(request, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return 0


@dataclass
class Backends:
    kind: str  # "static" or "fake-vllm"
    ports: list[int]
    argvs: list[list[str]]
    procs: list[subprocess.Popen] = field(default_factory=list)
    cap: int = 32  # --max-num-seqs, and the dispatchers' per-backend cap

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]


@dataclass
class Dispatcher:
    name: str
    port: int
    procs: list[subprocess.Popen]
    config: Path | None = None  # the nginx conf.d file it runs, if nginx
    health: str = "/health"  # a GET that answers 200 once it serves
    authorization: str | None = None  # Authorization header every request through it needs
    settle: bool = False  # wait after each run until it is idle (bench.scenarios.settle)
    min_duration: int = 1  # seconds: a slow dispatcher's runs last at least this long

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def round_robin_variant(rendered: str) -> str:
    """vfgen's nginx config as plain round robin: drop `least_conn;`, every `max_conns=N`, every backup server.

    Zone, keepalive, passive health checks (max_fails/fail_timeout), retries
    (proxy_next_upstream), timeouts and buffering stay as rendered.
    """
    counts = {"least_conn": 0, "max_conns": 0, "backup": 0}
    kept: list[str] = []
    for line in rendered.splitlines():
        stripped = line.strip()
        if stripped == "least_conn;":
            counts["least_conn"] += 1
            continue
        if stripped.startswith("server ") and " backup" in stripped:
            counts["backup"] += 1
            continue
        line, caps = re.subn(r" max_conns=\d+", "", line)
        counts["max_conns"] += caps
        kept.append(line)
    if not all(counts.values()):
        raise RuntimeError(f"the rendered config no longer has the expected shape: {counts}")
    return "\n".join(kept) + "\n"


class Stack:
    """All processes of one benchmark run, under one world-readable runtime directory."""

    def __init__(self, root: Path, procs: ProcessGroup, nginx_bin: str) -> None:
        self.root = root
        self.procs = procs
        self.nginx_bin = nginx_bin
        self.vfgen_bin = console_script("vfgen")
        self._logs: list = []

    def _log(self, name: str):
        handle = open(self.root / f"{name}.log", "ab")
        self._logs.append(handle)
        return handle

    def close_logs(self) -> None:
        for handle in self._logs:
            handle.close()

    # --- nginx --------------------------------------------------------------------

    def _nginx(self, name: str, workers: str, http_body: str, main: str = "") -> list[subprocess.Popen]:
        """One nginx; `main` goes in the main context (e.g. `pcre_jit on;`), `http_body` inside http{}."""
        prefix = self.root / name
        prefix.mkdir(mode=0o755)
        conf = prefix / "nginx.conf"
        temp_paths = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                             for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf.write_text(
            f"worker_processes {workers};\n"
            "daemon off;\n"
            f"pid {prefix / 'nginx.pid'};\n"
            f"error_log {prefix / 'error.log'} warn;\n"
            f"{main}"
            "events { worker_connections 8192; }\n"
            "http {\n"
            "    access_log off;\n"
            f"{temp_paths}{http_body}"
            "}\n"
        )
        argv = [self.nginx_bin, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]
        check = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t rejected {conf}:\n{check.stderr}")
        return [self.procs.start(argv, stdout=subprocess.DEVNULL, stderr=self._log(f"{name}-stderr"))]

    # --- backends -----------------------------------------------------------------

    def static_backends(self) -> Backends:
        """4 nginx processes (1 worker each) answering every request with a fixed JSON body."""
        first = free_port_range(BACKENDS)
        backends = Backends("static", list(range(first, first + BACKENDS)), [])
        for i, port in enumerate(backends.ports):
            body = (f"    server {{\n        listen 127.0.0.1:{port};\n        keepalive_requests 100000;\n"
                    f"        location / {{\n            default_type application/json;\n"
                    f"            return 200 '{STATIC_BODY}';\n        }}\n    }}\n")
            backends.procs += self._nginx(f"static{i}", "1", body)
        for port in backends.ports:
            wait_port("127.0.0.1", port, timeout=START_TIMEOUT)
        return backends

    def fake_backends(self, *, cap: int, latency: float, jitter: float, chunks: int,
                      chunk_interval: float) -> Backends:
        """4 stand-in vLLM servers: service time latency..latency+jitter, `cap` sequences at once."""
        first = free_port_range(BACKENDS)
        ports = list(range(first, first + BACKENDS))
        argvs = [[sys.executable, "-m", "vfgen.testing.fake_vllm", "serve", MODEL, "--host", "127.0.0.1",
                  "--port", str(port), "--max-num-seqs", str(cap), "--fake-latency", str(latency),
                  "--fake-latency-jitter", str(jitter), "--fake-stream-chunks", str(chunks),
                  "--fake-chunk-interval", str(chunk_interval)] for port in ports]
        backends = Backends("fake-vllm", ports, argvs, cap=cap)
        for i in range(BACKENDS):
            backends.procs.append(self._start_fake(backends, i))
        for i in range(BACKENDS):
            self.wait_fake_ready(backends, i)
        return backends

    def _start_fake(self, backends: Backends, index: int) -> subprocess.Popen:
        return self.procs.start(backends.argvs[index], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=self._log(f"fake{index}"))

    def wait_fake_ready(self, backends: Backends, index: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            status, body = http_get(f"{backends.urls[index]}/v1/models")
            if status == 200 and json.loads(body).get("data"):
                return
            if backends.procs[index].poll() is not None:
                raise RuntimeError(f"stand-in vLLM on port {backends.ports[index]} exited "
                                   f"{backends.procs[index].returncode}; see {self.root}/fake{index}.log")
            time.sleep(0.05)
        raise TimeoutError(f"stand-in vLLM on port {backends.ports[index]} not ready after {START_TIMEOUT}s")

    def kill_backend(self, backends: Backends, index: int) -> None:
        """SIGKILL, as a crash: no draining, in-flight requests are cut."""
        proc = backends.procs[index]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def restart_backend(self, backends: Backends, index: int) -> None:
        self.procs.stop(backends.procs[index])
        backends.procs[index] = self._start_fake(backends, index)
        self.wait_fake_ready(backends, index)

    def wait_idle(self, backends: Backends, timeout: float = 15.0) -> None:
        """Until no stand-in has a request in flight or queued (leftovers of the previous load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = 0
            for url in backends.urls:
                status, body = http_get(f"{url}/fake/stats")
                stats = json.loads(body) if status == 200 else {}
                busy += stats.get("in_flight", 0) + stats.get("queued", 0)
            if not busy:
                return
            time.sleep(0.1)
        raise TimeoutError(f"backends still busy after {timeout}s")

    def reset_stats(self, backends: Backends) -> None:
        for url in backends.urls:
            if http_post(f"{url}/fake/reset") != 200:
                raise RuntimeError(f"POST {url}/fake/reset failed")

    def arrivals(self, backends: Backends) -> list[list[dict]]:
        """Per backend: the requests it received since the last reset (key = X-Test-Key)."""
        result = []
        for url in backends.urls:
            status, body = http_get(f"{url}/fake/stats", timeout=10)
            if status != 200:
                raise RuntimeError(f"GET {url}/fake/stats answered {status}")
            result.append(json.loads(body)["arrivals"])
        return result

    # --- dispatchers --------------------------------------------------------------

    def render_vfgen(self, backends: Backends, port: int, *, affinity: bool, extra_args: Sequence[str] = ()) -> str:
        argv = [self.vfgen_bin, "render", MODEL, "-n", str(BACKENDS), "--max-batch-size", str(backends.cap),
                "--port", str(port), "--port-start", str(backends.ports[0]), "--name", "bench",
                "--emit", "nginx", *extra_args]
        if affinity:
            argv.append("--enable-request-affinity")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(argv)}` exited {result.returncode}:\n{result.stderr}")
        return result.stdout

    def nginx_dispatcher(self, name: str, backends: Backends, *, affinity: bool = False,
                         round_robin: bool = False, extra_args: Sequence[str] = ()) -> Dispatcher:
        """vfgen's rendered dispatcher (or its round-robin variant) under nginx with `worker_processes auto`.
        `extra_args` go to `vfgen render` (e.g. --access-log json)."""
        port = free_port()
        rendered = self.render_vfgen(backends, port, affinity=affinity, extra_args=extra_args)
        if round_robin:
            rendered = round_robin_variant(rendered)
        conf_d = self.root / f"{name}.conf"
        conf_d.write_text(rendered)
        procs = self._nginx(name, "auto", f"    include {conf_d};\n")
        dispatcher = Dispatcher(name, port, procs, conf_d)
        self._wait_healthy(dispatcher)
        return dispatcher

    def minimal_nginx(self, name: str, backends: Backends) -> Dispatcher:
        """The least an nginx reverse proxy can be: one upstream with keepalive and proxy_pass.

        A reference, not a dispatcher: no caps, overflow, retries or error pages. Whatever
        throughput it loses against direct is the cost of the hop itself.
        """
        port = free_port()
        servers = "".join(f"        server 127.0.0.1:{p};\n" for p in backends.ports)
        conf_d = self.root / f"{name}.conf"
        conf_d.write_text(
            f"upstream minimal {{\n{servers}        keepalive 128;\n}}\n"
            f"server {{\n    listen 127.0.0.1:{port};\n    location / {{\n        proxy_pass http://minimal;\n"
            "        proxy_http_version 1.1;\n        proxy_set_header Connection \"\";\n    }\n}\n")
        procs = self._nginx(name, "auto", f"    include {conf_d};\n")
        dispatcher = Dispatcher(name, port, procs, conf_d)
        self._wait_healthy(dispatcher)
        return dispatcher

    def vllm_factory(self, backends: Backends) -> Dispatcher:
        port = free_port()
        argv = [sys.executable, "-m", "bench.vllm_factory_runner", "--port", str(port),
                "--max-bs", str(backends.cap), *backends.urls]
        proc = self.procs.start(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._log("vllm-factory"))
        dispatcher = Dispatcher("vllm-factory", port, [proc])
        self._wait_healthy(dispatcher)
        return dispatcher

    def peers(self, names: Sequence[str], backends: Backends, *, wait: bool = True) -> dict[str, Dispatcher]:
        """bench/peers.py's routers, each from its own venv, in front of `backends` (started together:
        LiteLLM takes seconds to import). With wait=False, call wait_healthy on each before use."""
        started = {}
        for name in names:
            peer = peers.PEERS[name]
            port = free_port()
            proc = peers.start(self, peer, port, backends.urls, MODEL)
            started[name] = Dispatcher(name, port, [proc], health=peer.health, authorization=peer.authorization,
                                       settle=peer.slow, min_duration=3 if peer.slow else 1)
        if wait:
            for dispatcher in started.values():
                self.wait_healthy(dispatcher)
        return started

    def wait_healthy(self, dispatcher: Dispatcher) -> None:
        self._wait_healthy(dispatcher, PEER_START_TIMEOUT)

    def _wait_healthy(self, dispatcher: Dispatcher, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": dispatcher.authorization} if dispatcher.authorization else {}
        while time.monotonic() < deadline:
            if http_get(f"{dispatcher.url}{dispatcher.health}", headers=headers)[0] == 200:
                return
            for proc in dispatcher.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{dispatcher.name} exited with {proc.returncode}; logs in {self.root}")
            time.sleep(0.05)
        raise TimeoutError(f"{dispatcher.name} {dispatcher.health} not 200 after {timeout}s; logs in {self.root}")

    def stop(self, dispatcher: Dispatcher) -> None:
        for proc in dispatcher.procs:
            self.procs.stop(proc)


def cpu_seconds(pids: Sequence[int]) -> float:
    """User+system CPU time of these processes and all their descendants (e.g. nginx workers)."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent pid, CPU seconds)
    ticks = os.sysconf("SC_CLK_TCK")
    for pid, fields in procfs.stat_fields().items():
        stats[pid] = (int(fields[procfs.PPID]), (int(fields[procfs.UTIME]) + int(fields[procfs.STIME])) / ticks)
    wanted = set(pids)
    grew = True
    while grew:  # add children of wanted processes until nothing changes
        children = {pid for pid, (parent, _) in stats.items() if parent in wanted} - wanted
        wanted |= children
        grew = bool(children)
    return sum(stats[pid][1] for pid in wanted if pid in stats)
