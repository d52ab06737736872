"""Sample, in a thread, the per-GPU sum of the memory shares of running vLLM processes.

A process counts from the moment it exists until it is gone (starting, serving or
draining): `--gpu-memory-utilization` from its command line, its GPUs from
CUDA_VISIBLE_DEVICES in its environment, both read from /proc. `select(pid)` says
which processes belong to the deployment under test.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Iterable


def argv_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw if "=" in item)


class ShareSampler:
    """`with ShareSampler(pids):` samples every 50 ms; `peak` is the highest sum seen per GPU."""

    def __init__(self, pids: Callable[[], Iterable[int]], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="vfgen-shares")

    def __enter__(self) -> "ShareSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def sample(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid in self.pids():
            argv = argv_of(pid)
            if "serve" not in argv or "launch" in argv or "--gpu-memory-utilization" not in argv:
                continue  # not a vLLM server (the launcher's argv holds vLLM's too, after `launch`)
            share = float(argv[argv.index("--gpu-memory-utilization") + 1])
            for gpu in environ_of(pid).get("CUDA_VISIBLE_DEVICES", "?").split(","):
                totals[gpu] = totals.get(gpu, 0.0) + share
        return totals

    def _run(self) -> None:
        while not self._stop.is_set():
            for gpu, total in self.sample().items():
                self.peak[gpu] = max(self.peak.get(gpu, 0.0), total)
            self.samples += 1
            self._stop.wait(self.interval)


def in_cgroup(name: str) -> Callable[[], list[int]]:
    """Every process whose cgroup path contains `name` (e.g. an nspawn container's)."""
    def pids() -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if name in (proc / "cgroup").read_text():
                        found.append(int(proc.name))
                except OSError:
                    continue
        return found
    return pids
