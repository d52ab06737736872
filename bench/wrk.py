"""Run one bounded wrk load (with bench.lua) against a URL and return its numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

LUA_SCRIPT = Path(__file__).with_name("bench.lua")
MODEL = "bench-model"


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    latency_ms: dict[float, float]  # percentile -> milliseconds
    max_ms: float
    action_at_s: float | None = None  # when `action` ran, seconds after the start
    extra: dict = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        """Requests that did not get a 2xx/3xx answer: HTTP errors plus socket errors and timeouts."""
        return sum(self.errors.values())

    def p(self, percentile: float) -> float:
        return self.latency_ms[percentile]

    def to_json(self) -> dict:
        return {"requests": self.requests, "seconds": round(self.seconds, 3), "rps": round(self.rps, 1),
                "errors": self.errors, "failed": self.failed, "max_ms": self.max_ms,
                "latency_ms": {str(k): round(v, 3) for k, v in self.latency_ms.items()},
                "action_at_s": self.action_at_s, **self.extra}


def run_wrk(wrk_bin: str, url: str, *, mode: str, duration: int, connections: int, threads: int,
            ports: Sequence[int] = (), timeout_s: int = 10, env: dict[str, str] | None = None,
            action: tuple[float, Callable[[], object]] | None = None, stop_after_action: bool = False) -> WrkResult:
    """wrk for `duration` whole seconds; `action=(t, fn)` calls fn t seconds into the run.

    With `stop_after_action`, wrk gets SIGINT once fn returns: it then stops early and still
    writes its summary (bench.lua's done()), so `duration` is only an upper bound.
    """
    threads = max(1, min(threads, connections))
    with tempfile.TemporaryDirectory(prefix="vfgen-bench-wrk-") as tmp:
        out = Path(tmp) / "result.json"
        run_env = {**os.environ, "BENCH_MODE": mode, "BENCH_OUT": str(out), "BENCH_MODEL": MODEL,
                   "BENCH_PORTS": " ".join(str(p) for p in ports), **(env or {})}
        argv = [wrk_bin, "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
                "--timeout", f"{timeout_s}s", "-s", str(LUA_SCRIPT), url]
        proc = subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        action_at = None
        started = time.monotonic()
        try:
            if action is not None:
                delay, fn = action
                if not _wait_exit(proc, delay):
                    action_at = time.monotonic() - started
                    fn()
                    if stop_after_action and proc.poll() is None:
                        proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=duration + timeout_s + 30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(argv)}\n"
                               f"{stdout.decode()}\n{stderr.decode()}")
        data = json.loads(out.read_text())
    latency = data["latency_us"]
    return WrkResult(
        requests=data["requests"], seconds=data["duration_us"] / 1e6, errors=data["errors"],
        latency_ms={float(p): v / 1000 for p, v in latency["percentiles"]}, max_ms=latency["max"] / 1000,
        action_at_s=action_at,
    )


def _wait_exit(proc: subprocess.Popen, seconds: float) -> bool:
    """Sleep up to `seconds`; True if the process ended first."""
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False
