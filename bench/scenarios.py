"""The measurements of the benchmark, run side by side in one invocation; returns plain data.

Paths: direct, vfgen, round robin, vllm-factory, the minimal nginx proxy (fast backends
only) and the peer routers of bench/peers.py (vllm-router round_robin and cache_aware,
sglang-router round_robin, LiteLLM simple-shuffle).

1. Dispatch overhead on fast static backends (req/s at saturation; latency at one
   request at a time) and on stand-in vLLM backends (20-50 ms, --max-num-seqs 8) at
   their capacity.
2. Scheduling: 80% short / 20% long (streamed) requests at 1x, 2x, 4x capacity,
   capacity = 4 backends x 8 sequences = 32 requests in flight (closed loop:
   wrk keeps that many connections busy).
3. Affinity: GLiNER-style bodies with 16 label sets at half capacity; which
   backend each shape reached, from the stand-ins' /fake/stats.
4. Failure (bench/outage.py): short requests at capacity; one backend gets SIGKILL,
   is started again 10 s later, and its own log says when traffic reaches it again.
5. Streaming (bench/streaming.py): time to the first chunk and the gaps between chunks.

Measurements of the same kind are interleaved in rounds (the order rotates each
round) so that a burst of outside load hits all paths alike; medians are reported,
so one round spoilt by another tenant's burst does not decide a result.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from bench import outage, streaming
from bench.peers import PEERS
from bench.stack import BACKENDS, Backends, Dispatcher, Stack, cpu_seconds
from bench.wrk import WrkResult, run_wrk

# Stand-in vLLM backends: 20-50 ms per request, 8 sequences at once; a streamed
# ("long") request sends 10 chunks 20 ms apart, so it holds a slot ~200-230 ms.
REALISTIC = {"cap": 8, "latency": 0.02, "jitter": 0.03, "chunks": 10, "chunk_interval": 0.02}
CAPACITY = BACKENDS * REALISTIC["cap"]
LONG_FRACTION = 0.2
SHAPES = 16
THREADS = 4  # wrk threads; on the direct path thread i talks to backend i
STREAM_CONNECTIONS = CAPACITY // 2  # streaming part: no backend queue, so the gaps are the path's
# The parts `--parts` can pick; run_all runs them in this order.
PARTS = ("fast", "realistic", "scheduling", "affinity", "streaming", "failure")


@dataclass(frozen=True)
class OutageTiming:
    kill_at_s: float  # load before the kill
    outage_s: float  # the killed backend stays down this long
    revive_wait_s: float  # then watch it this long for its first request
    tail_s: float  # and keep the load on this long after that


@dataclass(frozen=True)
class Settings:
    duration: int  # seconds of each interleaved run
    rounds: int  # rounds of each interleaved comparison
    rounds_fast: int  # more on fast backends: their throughput is the number outside load moves most
    single_duration: int  # seconds of the runs done once per path (affinity)
    outage: OutageTiming
    factors: tuple[int, ...]  # load as multiples of CAPACITY
    # Fast backends: 16 requests in flight per backend, half of vfgen's default cap (32), so
    # no cap or overflow ever binds and only the cost of dispatching is measured.
    fast_connections: int = 64
    peers: tuple[str, ...] = tuple(PEERS)  # bench/peers.py names, in every part
    # The failure part's paths and peers (quick: fewer, it is the slow part).
    failure_paths: tuple[str, ...] = ("vfgen", "round-robin", "vllm-factory")
    failure_peers: tuple[str, ...] = tuple(PEERS)
    parts: tuple[str, ...] = PARTS
    # The fast part's peers. Quick leaves out LiteLLM there (its import alone takes ~10 s of a
    # busy box); the stand-in parts still smoke-test it.
    fast_peers: tuple[str, ...] = tuple(PEERS)

    @classmethod
    def quick(cls, fast_connections: int = 64, peers: tuple[str, ...] = tuple(PEERS),
              parts: tuple[str, ...] = PARTS) -> "Settings":
        return cls(duration=1, rounds=1, rounds_fast=1, single_duration=1,
                   outage=OutageTiming(kill_at_s=0.5, outage_s=1, revive_wait_s=1, tail_s=0.3), factors=(2,),
                   fast_connections=fast_connections, peers=peers, failure_paths=("vfgen", "vllm-factory"),
                   failure_peers=peers[:1], parts=parts,
                   fast_peers=tuple(p for p in peers if not PEERS[p].slow))

    @classmethod
    def full(cls, duration: int = 2, rounds: int = 5, fast_connections: int = 64,
             peers: tuple[str, ...] = tuple(PEERS), parts: tuple[str, ...] = PARTS) -> "Settings":
        # The outage is 10 s; the Rust routers were seen to wait ~51 s before using a revived
        # backend again, so the watch lasts 75 s before it says "none".
        return cls(duration=duration, rounds=rounds, rounds_fast=rounds + 3, single_duration=2 * duration,
                   outage=OutageTiming(kill_at_s=3, outage_s=10, revive_wait_s=75, tail_s=2), factors=(1, 2, 4),
                   fast_connections=fast_connections, peers=peers, failure_peers=peers, parts=parts,
                   fast_peers=peers)


class Bench:
    """Runs measurements and records the CPU each party used during each one."""

    def __init__(self, stack: Stack, wrk_bin: str, log: Callable[[str], None]) -> None:
        self.stack = stack
        self.wrk_bin = wrk_bin
        self.log = log
        self.loadavgs: list[float] = []  # 1-min load average before each run

    def sample_load(self) -> None:
        self.loadavgs.append(float(Path("/proc/loadavg").read_text().split()[0]))

    def measure(self, label: str, backends: Backends, dispatcher: Dispatcher | None, *, mode: str,
                connections: int, duration: int, threads: int = THREADS, env: dict[str, str] | None = None,
                action: tuple[float, Callable[[], object]] | None = None,
                stop_after_action: bool = False) -> WrkResult:
        """One wrk run through `dispatcher` (None: straight to the backends)."""
        url = dispatcher.url if dispatcher else backends.urls[0]
        if dispatcher:  # LiteLLM answers ~1 s late at 32 connections: a 1 s run would count nothing
            duration = max(duration, dispatcher.min_duration)
        ports = () if dispatcher else backends.ports
        backend_pids = [p.pid for p in backends.procs]
        dispatcher_pids = [p.pid for p in dispatcher.procs] if dispatcher else []
        if dispatcher and dispatcher.authorization:
            env = {**(env or {}), "BENCH_AUTHORIZATION": dispatcher.authorization}
        self.sample_load()
        before = _cpu_snapshot(backend_pids, dispatcher_pids)
        result = run_wrk(self.wrk_bin, f"{url}/", mode=mode, duration=duration, connections=connections,
                         threads=threads, ports=ports, env=env, action=action,
                         stop_after_action=stop_after_action)
        after = _cpu_snapshot([p.pid for p in backends.procs], dispatcher_pids)
        result.extra["cpu"] = _cpu_report(before, after, result)
        if dispatcher and dispatcher.settle:
            settle(dispatcher)
        self.log(f"  {label:<14} {mode:<6} c={connections:<4} {result.rps:9.0f} req/s  p50 {result.p(50):8.2f} ms"
                 f"  p99 {result.p(99):8.2f} ms  failed {result.failed}"
                 f"  (outside load {result.extra['cpu']['outside_cores']:.2f} cores"
                 f"{', disturbed' if result.extra['cpu']['outside_cores'] > 0.5 else ''})")
        return result

    def interleaved(self, rounds: int, labels: list[str],
                    run: Callable[[str], WrkResult]) -> dict[str, list[WrkResult]]:
        results: dict[str, list[WrkResult]] = {label: [] for label in labels}
        for r in range(rounds):
            order = labels[r % len(labels):] + labels[:r % len(labels)]
            for label in order:
                results[label].append(run(label))
        return results


def settle(dispatcher: Dispatcher, timeout: float = 15.0) -> None:
    """Until a slow dispatcher has worked off what wrk left in it (LiteLLM keeps answering requests
    whose client is gone for a second or more, and would charge that CPU to the next path's run)."""
    pids = [p.pid for p in dispatcher.procs]
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = cpu_seconds(pids)
        if now - last < 0.025:  # under 10% of a core
            return
        last = now


# --- CPU accounting -------------------------------------------------------------------------


def _proc_stat() -> tuple[float, float]:
    """Busy and stolen seconds of the whole machine so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def _cpu_snapshot(backend_pids: list[int], dispatcher_pids: list[int]) -> dict[str, float]:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has been waited for
    me = resource.getrusage(resource.RUSAGE_SELF)
    busy, steal = _proc_stat()
    return {"client": children.ru_utime + children.ru_stime, "self": me.ru_utime + me.ru_stime,
            "backends": cpu_seconds(backend_pids), "dispatcher": cpu_seconds(dispatcher_pids),
            "busy": busy, "steal": steal, "t": time.monotonic()}


def _cpu_report(before: dict[str, float], after: dict[str, float], result: WrkResult) -> dict[str, float]:
    delta = {key: max(0.0, after[key] - before[key]) for key in before}
    ours = delta["client"] + delta["self"] + delta["backends"] + delta["dispatcher"]
    requests = max(1, result.requests)
    return {
        "client_us_per_req": round(delta["client"] / requests * 1e6, 2),
        "backends_us_per_req": round(delta["backends"] / requests * 1e6, 2),
        "dispatcher_us_per_req": round(delta["dispatcher"] / requests * 1e6, 2),
        # Busy CPU of the machine that none of the benchmark's processes used: other tenants.
        "outside_cores": round(max(0.0, delta["busy"] - ours) / delta["t"], 3),
        "steal_cores": round(delta["steal"] / delta["t"], 3),
    }


# --- aggregation ----------------------------------------------------------------------------


def summarize(results: list[WrkResult]) -> dict:
    """Medians over rounds (failures are summed): the numbers the report shows."""
    def median(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    cpu_keys = results[0].extra["cpu"].keys()
    return {
        "rps": median([r.rps for r in results]),
        "rps_min": round(min(r.rps for r in results), 1),
        "rps_max": round(max(r.rps for r in results), 1),
        "p50_ms": median([r.p(50) for r in results]),
        "p90_ms": median([r.p(90) for r in results]),
        "p99_ms": median([r.p(99) for r in results]),
        "requests": sum(r.requests for r in results),
        "failed": sum(r.failed for r in results),
        "rounds": len(results),
        "cpu": {key: median([r.extra["cpu"][key] for r in results]) for key in cpu_keys},
        "outside_cores_max": max(r.extra["cpu"]["outside_cores"] for r in results),
        "runs": [r.to_json() for r in results],
    }


# --- the measurements -----------------------------------------------------------------------


def fast_overhead(bench: Bench, settings: Settings) -> dict:
    """Part 1 on fast static backends: saturation throughput, then latency one request at a time."""
    stack = bench.stack
    backends = stack.static_backends()
    dispatchers = {}
    try:
        dispatchers.update({
            "vfgen": stack.nginx_dispatcher("fast-vfgen", backends),
            "round-robin": stack.nginx_dispatcher("fast-rr", backends, round_robin=True),
            "vllm-factory": stack.vllm_factory(backends),
            "nginx-minimal": stack.minimal_nginx("fast-minimal", backends),
        })
        dispatchers.update(stack.peers(settings.fast_peers, backends))
        paths = ["direct", *dispatchers]
        bench.log(f"[1a] dispatch overhead, fast static backends: {settings.rounds_fast} round(s), "
                  f"{settings.fast_connections} connections")
        saturated = bench.interleaved(settings.rounds_fast, paths, lambda p: bench.measure(
            p, backends, dispatchers.get(p), mode="static", connections=settings.fast_connections,
            duration=settings.duration))
        # Interleaved too: the latency target divides vfgen's added p50 by a peer's, round by round.
        bench.log(f"[1a] one request at a time (1 connection): {settings.rounds} round(s)")
        light = bench.interleaved(settings.rounds, paths, lambda p: bench.measure(
            p, backends, dispatchers.get(p), mode="static", connections=1, threads=1, duration=settings.duration))
    finally:
        for dispatcher in dispatchers.values():
            stack.stop(dispatcher)
        for proc in backends.procs:
            stack.procs.stop(proc)
    return {"saturated": {p: summarize(r) for p, r in saturated.items()},
            "light": {p: summarize(r) for p, r in light.items()}}


def realistic_overhead(bench: Bench, settings: Settings, backends: Backends,
                       dispatchers: dict[str, Dispatcher]) -> dict:
    bench.log(f"[1b] dispatch overhead, stand-in vLLM backends at capacity ({CAPACITY} connections)")
    paths = ["direct", "vfgen", "round-robin", "vllm-factory", *settings.peers]

    def run(path: str) -> WrkResult:
        bench.stack.wait_idle(backends)
        return bench.measure(path, backends, dispatchers.get(path), mode="mix", connections=CAPACITY,
                             duration=settings.duration, env={"BENCH_LONG": "0"})

    results = bench.interleaved(settings.rounds, paths, run)
    return {p: summarize(r) for p, r in results.items()}


def scheduling(bench: Bench, settings: Settings, backends: Backends, dispatchers: dict[str, Dispatcher]) -> dict:
    names = ["vfgen", "round-robin", "vllm-factory"]
    out: dict[str, dict] = {}
    for factor in settings.factors:
        connections = factor * CAPACITY
        bench.log(f"[2] scheduling at {factor}x capacity ({connections} connections, "
                  f"{LONG_FRACTION:.0%} long requests)")

        def run(name: str, connections: int = connections) -> WrkResult:
            bench.stack.wait_idle(backends)
            return bench.measure(name, backends, dispatchers[name], mode="mix", connections=connections,
                                 duration=settings.duration, env={"BENCH_LONG": str(LONG_FRACTION)})

        results = bench.interleaved(settings.rounds, names, run)
        out[str(factor)] = {name: summarize(r) for name, r in results.items()}
    return out


def affinity(bench: Bench, settings: Settings, backends: Backends, dispatchers: dict[str, Dispatcher]) -> dict:
    connections = CAPACITY // 2
    bench.log(f"[3] affinity: {SHAPES} request shapes, {connections} connections (half capacity)")
    out = {}
    for name in ["vfgen-affinity", "vfgen", "vllm-factory"]:
        bench.stack.wait_idle(backends)
        bench.stack.reset_stats(backends)
        result = bench.measure(name, backends, dispatchers[name], mode="shapes", connections=connections,
                               duration=settings.single_duration, env={"BENCH_SHAPES": str(SHAPES)})
        bench.stack.wait_idle(backends)
        out[name] = {**shape_spread(bench.stack.arrivals(backends)), **summarize([result])}
    return out


def shape_spread(arrivals: list[list[dict]]) -> dict:
    """Hit rate (share of each shape's requests that reached its most frequent backend) and spread."""
    per_shape: dict[str, Counter] = defaultdict(Counter)
    per_backend = [0] * len(arrivals)
    for index, entries in enumerate(arrivals):
        for entry in entries:
            if entry.get("key"):
                per_shape[entry["key"]][index] += 1
                per_backend[index] += 1
    total = sum(per_backend)
    homes = Counter(counts.most_common(1)[0][0] for counts in per_shape.values())
    hits = sum(counts.most_common(1)[0][1] for counts in per_shape.values())
    mean_load = total / len(per_backend) if total else 0
    return {
        "shapes": len(per_shape),
        "hit_rate": round(hits / total, 4) if total else 0.0,
        "shapes_per_backend": [homes.get(i, 0) for i in range(len(arrivals))],
        "requests_per_backend": per_backend,
        "load_max_over_mean": round(max(per_backend) / mean_load, 3) if mean_load else 0.0,
    }


def run_all(bench: Bench, settings: Settings) -> dict:
    results: dict = {"settings": asdict(settings), "capacity": CAPACITY, "realistic": REALISTIC,
                     "long_fraction": LONG_FRACTION, "threads": THREADS, "streaming_connections": STREAM_CONNECTIONS}
    started = time.monotonic()
    parts = settings.parts
    if "fast" in parts:
        results["fast"] = fast_overhead(bench, settings)
    if set(parts) - {"fast"}:
        stand_in_parts(bench, settings, results, start_stand_in(bench, settings))
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    if bench.loadavgs:
        results["loadavg_runs"] = f"{statistics.median(bench.loadavgs):.2f} / {max(bench.loadavgs):.2f}"
    return results


def start_stand_in(bench: Bench, settings: Settings) -> tuple[Backends, dict[str, Dispatcher]]:
    """4 stand-in backends and every dispatcher in front of them; the peers may still be starting."""
    stack = bench.stack
    backends = stack.fake_backends(**REALISTIC)
    dispatchers = {
        "vfgen": stack.nginx_dispatcher("vfgen", backends),
        "round-robin": stack.nginx_dispatcher("rr", backends, round_robin=True),
        "vfgen-affinity": stack.nginx_dispatcher("vfgen-affinity", backends, affinity=True),
        "vllm-factory": stack.vllm_factory(backends),
        **stack.peers(settings.peers, backends, wait=False),
    }
    return backends, dispatchers


def stand_in_parts(bench: Bench, settings: Settings, results: dict,
                   stand_in: tuple[Backends, dict[str, Dispatcher]]) -> None:
    """Parts 1b-5, on one set of stand-in backends with every dispatcher in front of them."""
    parts = settings.parts
    backends, dispatchers = stand_in
    for name in settings.peers:
        bench.stack.wait_healthy(dispatchers[name])
    if "realistic" in parts:
        results["realistic_overhead"] = realistic_overhead(bench, settings, backends, dispatchers)
    if "scheduling" in parts:
        results["scheduling"] = scheduling(bench, settings, backends, dispatchers)
    if "affinity" in parts:
        results["affinity"] = affinity(bench, settings, backends, dispatchers)
    if "streaming" in parts:
        results["streaming"] = streaming.run(bench, settings, backends, dispatchers,
                                             ["direct", "vfgen", "round-robin", "vllm-factory", *settings.peers],
                                             STREAM_CONNECTIONS)
    if "failure" in parts:
        results["fail_timeout_s"] = outage.fail_timeout_s(dispatchers["vfgen"])
        results["failure"] = outage.run(bench, settings, backends, dispatchers,
                                        [*settings.failure_paths, *settings.failure_peers], CAPACITY)
