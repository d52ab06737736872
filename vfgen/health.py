"""Probe vLLM instances and the nginx dispatcher over HTTP: one-shot checks and blocking waits.

An instance is *healthy* when `GET /health` answers 200 AND `GET /v1/models` lists the
expected served model name (any model when none is expected). A dispatcher (nginx) is
healthy when its `GET /health` answers 200. Probe states:

    healthy    the definition above holds
    starting   /health answers 200 but the model is not listed yet
    unhealthy  an HTTP answer other than 200 (or an unusable /v1/models)
    down       no HTTP answer: connection refused, timeout, unreachable

`check()` exit codes, Nagios-like:

    0  OK        every target is healthy
    1  WARNING   degraded: at least one target is healthy, some are not
    2  CRITICAL  no target is healthy, or the dispatcher (the single entry point) is not

`wait()` returns 0 once every URL is healthy, 1 on timeout or when the watched PID died.

When VLLM_API_KEY is set in the environment (vLLM reads the same variable), probes send
it as a bearer token, because vLLM protects /v1/models with --api-key (not /health).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TextIO
from urllib.parse import urlparse

import requests

from vfgen.errors import HealthError
from vfgen.tables import table_lines

PROBE_TIMEOUT_S = 2.0
WAIT_REPORT_EVERY_S = 5.0


@dataclass(frozen=True)
class Target:
    """One thing to probe."""

    name: str  # e.g. "qwen/0" or "dispatcher"
    url: str  # base URL, e.g. http://127.0.0.1:9100
    port: int | None = None
    gpus: str = ""  # e.g. "0" or "0,1"
    expected_model: str | None = None  # None: any listed model is fine
    kind: str = "instance"  # "instance" | "dispatcher"


@dataclass(frozen=True)
class Probe:
    """The outcome of probing one target once."""

    target: Target
    state: str  # "healthy" | "starting" | "unhealthy" | "down"
    latency_ms: float | None  # round trip of GET /health; None when it got no answer
    models: tuple[str, ...]
    detail: str  # one human line


_local = threading.local()


def _session() -> requests.Session:
    """One Session per thread: Sessions are not thread-safe, but reusing one keeps connections alive."""
    session = getattr(_local, "session", None)
    if session is None:
        session = requests.Session()
        session.trust_env = False  # never route loopback probes through an HTTP(S)_PROXY
        _local.session = session
    return session


def _headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get("VLLM_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def _why_no_answer(exc: requests.RequestException, timeout: float) -> str:
    """One short line for an HTTP call that got no answer."""
    if isinstance(exc, requests.ConnectTimeout):
        return f"connect timed out after {timeout:g}s"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout:g}s"
    cause: BaseException | None = exc
    seen = 0
    while isinstance(cause, BaseException) and seen < 10:  # the root cause hides a few levels down in urllib3
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        cause = getattr(cause, "reason", None) or cause.__cause__ or cause.__context__
        seen += 1
    if "Connection refused" in str(exc):
        return "connection refused"
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidSchema)):
        return f"invalid URL: {exc}"
    return f"{type(exc).__name__}: {str(exc)[:160]}"


def _listed_models(response: requests.Response) -> tuple[str, ...] | None:
    """The model ids of a /v1/models answer, or None when it is not an OpenAI model list."""
    try:
        data = response.json()["data"]
        return tuple(str(entry["id"]) for entry in data)
    except (ValueError, KeyError, TypeError):
        return None


def probe(target: Target, timeout: float = PROBE_TIMEOUT_S, *, api_key: str | None = None) -> Probe:
    """Probe one target once; never raises for network failures (they become states)."""
    session = _session()
    headers = _headers(api_key)
    base = target.url.rstrip("/")
    started = time.monotonic()
    try:
        health = session.get(f"{base}/health", timeout=timeout, headers=headers)
    except requests.RequestException as exc:
        return Probe(target, "down", None, (), _why_no_answer(exc, timeout))
    latency_ms = (time.monotonic() - started) * 1000.0
    if health.status_code != 200:
        return Probe(target, "unhealthy", latency_ms, (), f"HTTP {health.status_code} on /health")

    try:
        listing = session.get(f"{base}/v1/models", timeout=timeout, headers=headers)
    except requests.RequestException as exc:
        if target.kind == "dispatcher":
            return Probe(target, "healthy", latency_ms, (), "ok")
        return Probe(target, "unhealthy", latency_ms, (), f"/v1/models: {_why_no_answer(exc, timeout)}")
    models = _listed_models(listing) if listing.status_code == 200 else None

    if target.kind == "dispatcher":  # nginx may not list models at all; /health is the verdict
        return Probe(target, "healthy", latency_ms, models or (), "ok")
    if listing.status_code != 200:
        hint = " (set VLLM_API_KEY)" if listing.status_code in (401, 403) else ""
        return Probe(target, "unhealthy", latency_ms, (), f"HTTP {listing.status_code} on /v1/models{hint}")
    if models is None:
        return Probe(target, "unhealthy", latency_ms, (), "/v1/models did not return a model list")
    if target.expected_model is None:
        if models:
            return Probe(target, "healthy", latency_ms, models, "ok")
        return Probe(target, "starting", latency_ms, models, "no model listed yet")
    if target.expected_model in models:
        return Probe(target, "healthy", latency_ms, models, "ok")
    serves = ", ".join(models) or "nothing yet"
    return Probe(target, "starting", latency_ms, models, f"model {target.expected_model!r} not listed (serves: {serves})")


def _exit_code(probes: list[Probe]) -> int:
    healthy = [p for p in probes if p.state == "healthy"]
    if len(healthy) == len(probes):
        return 0
    dispatcher_down = any(p.target.kind == "dispatcher" and p.state != "healthy" for p in probes)
    if not healthy or dispatcher_down:
        return 2
    return 1


_VERDICT = {0: "OK", 1: "DEGRADED", 2: "CRITICAL"}


def _port_of(target: Target) -> int | None:
    if target.port is not None:
        return target.port
    try:
        return urlparse(target.url).port
    except ValueError:
        return None


def _table(probes: list[Probe]) -> str:
    header = ("INSTANCE", "PORT", "GPU", "STATE", "LATENCY", "MODEL", "DETAIL")
    rows = [header]
    for p in probes:
        port = _port_of(p.target)
        rows.append((
            p.target.name,
            str(port) if port is not None else "-",
            p.target.gpus or "-",
            p.state,
            f"{p.latency_ms:.1f}ms" if p.latency_ms is not None else "-",
            ",".join(p.models) or "-",
            p.detail,
        ))
    return "\n".join(table_lines(rows))


def check(targets: list[Target], timeout: float = PROBE_TIMEOUT_S, as_json: bool = False,
          out: TextIO | None = None) -> int:
    """Probe every target in parallel, print a table (or JSON), return the exit code (see module doc)."""
    if not targets:
        raise HealthError("nothing to check: no instances or dispatcher given")
    out = out if out is not None else sys.stdout
    with ThreadPoolExecutor(max_workers=min(32, len(targets))) as pool:
        probes = list(pool.map(lambda target: probe(target, timeout), targets))
    code = _exit_code(probes)
    healthy = sum(p.state == "healthy" for p in probes)
    if as_json:
        document = {
            "status": _VERDICT[code].lower(),
            "exit_code": code,
            "healthy": healthy,
            "total": len(probes),
            "targets": [
                {**asdict(p.target), "port": _port_of(p.target), "state": p.state,
                 "latency_ms": None if p.latency_ms is None else round(p.latency_ms, 2),
                 "models": list(p.models), "detail": p.detail}
                for p in probes
            ],
        }
        out.write(json.dumps(document, indent=2) + "\n")
    else:
        out.write(_table(probes) + "\n")
        out.write(f"{_VERDICT[code]}: {healthy}/{len(probes)} healthy\n")
    out.flush()
    return code


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (a dead child nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: os.kill is all we know
    return state not in ("Z", "X")


def wait(urls: list[str], *, model: str | None, timeout: float, pid: int | None = None,
         interval: float = 1.0, out: TextIO | None = None) -> int:
    """Block until every URL is healthy (see module doc); 0 healthy, 1 timeout or `pid` gone."""
    out = out if out is not None else sys.stderr

    def say(message: str) -> None:
        out.write(message + "\n")
        out.flush()

    targets = [Target(name=url, url=url, expected_model=model) for url in urls]
    wanted = f"model {model!r}" if model else "any model"
    watching = f" while pid {pid} lives" if pid is not None else ""
    say(f"waiting up to {timeout:g}s for {', '.join(urls)} to serve {wanted}{watching}")
    started = time.monotonic()
    deadline = started + timeout
    next_report = started + WAIT_REPORT_EVERY_S
    delay = min(interval, 0.25)  # back off from quick first retries up to `interval`
    last: dict[str, Probe] = {}
    pending = list(targets)

    def states() -> str:
        return "; ".join(f"{t.url}: {last[t.url].state} ({last[t.url].detail})" for t in pending if t.url in last)

    while True:
        if pid is not None and not pid_alive(pid):
            say(f"process {pid} exited before {', '.join(t.url for t in pending)} became healthy"
                + (f"; last state: {states()}" if last else ""))
            return 1
        for target in pending:
            remaining = deadline - time.monotonic()
            last[target.url] = probe(target, timeout=max(0.1, min(PROBE_TIMEOUT_S, remaining)))
        pending = [t for t in pending if last[t.url].state != "healthy"]
        now = time.monotonic()
        if not pending:
            say(f"healthy after {now - started:.1f}s: {', '.join(urls)}")
            return 0
        if now >= deadline:
            say(f"timed out after {timeout:g}s; {states()}")
            return 1
        if now >= next_report:
            say(f"still waiting ({now - started:.0f}s/{timeout:g}s): {states()}")
            next_report = now + WAIT_REPORT_EVERY_S
        time.sleep(max(0.0, min(delay, deadline - now)))
        delay = min(interval, delay * 2)
