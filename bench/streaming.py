"""Part 5, streaming: time to the first chunk, and when the chunks arrive, through each path.

wrk only sees whole responses, so this part has its own client: `connections` asyncio
tasks (aiohttp), each sending streamed completions one after the other for `duration`
seconds. For every stream it records, from the moment the request was sent:
- time to the first chunk (the first SSE `data:` event with a choice);
- the gap between consecutive events (the stand-ins send one every 20 ms, so a path that
  passes chunks straight on shows gaps of ~20 ms; one that buffers shows gaps near 0 and a
  late first chunk);
- whether the stream ended with `data: [DONE]` (anything else, a non-200 or a socket error
  counts as failed).
On the direct path task i talks to backend i mod 4, like wrk's threads.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

from bench.stack import Backends, Dispatcher, cpu_seconds
from bench.wrk import MODEL

BODY = json.dumps({"model": MODEL, "prompt": "Summarise the report in one line.", "max_tokens": 16,
                   "stream": True}).encode()


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def _client(urls: list[str], authorization: str | None, connections: int, duration: float) -> dict:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if authorization:
        headers["Authorization"] = authorization
    first_ms: list[float] = []
    gaps_ms: list[float] = []
    events: list[int] = []
    failed = {"status": 0, "incomplete": 0, "socket": 0}
    deadline = time.perf_counter() + duration

    async def worker(index: int, session) -> None:
        url = urls[index % len(urls)] + "/v1/completions"
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            stamps: list[float] = []
            done = False
            try:
                async with session.post(url, data=BODY, headers=headers) as resp:
                    if resp.status != 200:
                        await resp.read()
                        failed["status"] += 1
                        continue
                    async for line in resp.content:
                        if not line.startswith(b"data:"):
                            continue
                        if line.strip() == b"data: [DONE]":
                            done = True
                            break
                        stamps.append(time.perf_counter())
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                failed["socket"] += 1
                continue
            if not done or not stamps:
                failed["incomplete"] += 1
                continue
            first_ms.append((stamps[0] - sent) * 1000)
            gaps_ms.extend((b - a) * 1000 for a, b in zip(stamps, stamps[1:]))
            events.append(len(stamps))

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(i, session) for i in range(connections)))
        elapsed = time.perf_counter() - started
    return {"streams": len(first_ms), "seconds": elapsed, "failed_by": failed, "first_ms": first_ms,
            "gaps_ms": gaps_ms, "events": events}


def measure(bench, label: str, backends: Backends, dispatcher: Dispatcher | None, connections: int,
            duration: float) -> dict:
    urls = [dispatcher.url] if dispatcher else backends.urls
    pids = [p.pid for p in dispatcher.procs] if dispatcher else []
    bench.sample_load()
    cpu_before = cpu_seconds(pids)
    raw = asyncio.run(_client(urls, dispatcher.authorization if dispatcher else None, connections, duration))
    streams = raw["streams"]
    run = {
        "streams": streams, "streams_per_s": round(streams / raw["seconds"], 1),
        "failed": sum(raw["failed_by"].values()), "failed_by": raw["failed_by"],
        "first_p50_ms": round(_percentile(raw["first_ms"], 50), 3),
        "first_p99_ms": round(_percentile(raw["first_ms"], 99), 3),
        "gap_p50_ms": round(_percentile(raw["gaps_ms"], 50), 3),
        "gap_p1_ms": round(_percentile(raw["gaps_ms"], 1), 3),
        "gap_p99_ms": round(_percentile(raw["gaps_ms"], 99), 3),
        "events_min": min(raw["events"], default=0), "events_max": max(raw["events"], default=0),
        "dispatcher_us_per_stream": round((cpu_seconds(pids) - cpu_before) / max(1, streams) * 1e6, 1),
    }
    bench.log(f"  {label:<18} stream c={connections:<3} {run['streams_per_s']:7.1f} streams/s  first chunk p50 "
              f"{run['first_p50_ms']:6.1f} ms p99 {run['first_p99_ms']:6.1f} ms  gap p50 {run['gap_p50_ms']:5.1f} ms "
              f"(p1 {run['gap_p1_ms']:.1f}, p99 {run['gap_p99_ms']:.1f})  failed {run['failed']}")
    return run


def run(bench, settings, backends: Backends, dispatchers: dict[str, Dispatcher], paths: list[str],
        connections: int) -> dict:
    bench.log(f"[5] streaming: {connections} connections of streamed completions, {settings.rounds} round(s) "
              f"of {settings.duration} s")
    per_path: dict[str, list[dict]] = {p: [] for p in paths}

    def one(path: str) -> dict:
        bench.stack.wait_idle(backends)
        dispatcher = dispatchers.get(path)
        duration = max(settings.duration, dispatcher.min_duration) if dispatcher else settings.duration
        return measure(bench, path, backends, dispatcher, connections, duration)

    for path, runs in bench.interleaved(settings.rounds, paths, one).items():
        per_path[path] = runs
    return {path: summarize(runs) for path, runs in per_path.items()}


def summarize(runs: list[dict]) -> dict:
    keys = ["streams_per_s", "first_p50_ms", "first_p99_ms", "gap_p50_ms", "gap_p1_ms", "gap_p99_ms",
            "dispatcher_us_per_stream"]
    out = {key: round(statistics.median(r[key] for r in runs), 3) for key in keys}
    out.update({"streams": sum(r["streams"] for r in runs), "failed": sum(r["failed"] for r in runs),
                "events_min": min(r["events_min"] for r in runs), "events_max": max(r["events_max"] for r in runs),
                "rounds": len(runs), "runs": runs})
    return out


# --- report ----------------------------------------------------------------------------------


def markdown(results: dict, names: dict[str, str]) -> list[str]:
    from bench.report import _ms, _plus, _table

    part = results["streaming"]
    settings = results["settings"]
    direct = part.get("direct")
    out = ["", "### 5. Streaming: first chunk and chunk spacing", "",
           f"{results['streaming_connections']} connections, each sending streamed completions one after the other "
           f"(the stand-ins wait 20–50 ms, then send 10 chunks 20 ms apart); median of {settings['rounds']} "
           f"interleaved round(s) of {settings['duration']} s. Times are taken at the client from sending the "
           "request. A path that passes chunks on as they come keeps the 20 ms gaps; one that buffers shows "
           "gaps near 0 and a late first chunk.", ""]
    rows = []
    for name, s in part.items():
        added = _plus(s["first_p50_ms"] - direct["first_p50_ms"]) if direct and name != "direct" else "–"
        rows.append([names.get(name, name), f"{s['streams_per_s']:.0f}", _ms(s["first_p50_ms"]),
                     _ms(s["first_p99_ms"]), added, _ms(s["gap_p1_ms"]), _ms(s["gap_p50_ms"]),
                     _ms(s["gap_p99_ms"]), f"{s['events_min']}–{s['events_max']}",
                     f"{s['dispatcher_us_per_stream']:.0f}" if name != "direct" else "–", str(s["failed"])])
    out.append(_table(["path", "streams/s", "first chunk p50 ms", "first chunk p99 ms", "added p50",
                       "gap p1 ms", "gap p50 ms", "gap p99 ms", "chunks per stream", "dispatcher CPU µs/stream",
                       "failed"], rows))
    return out


def console(results: dict) -> list[str]:
    lines = ["streaming (first chunk p50 / p99, chunk gap p50):"]
    for name, s in results["streaming"].items():
        lines.append(f"  {name:<18} {s['first_p50_ms']:6.1f} / {s['first_p99_ms']:6.1f} ms   gap {s['gap_p50_ms']:5.1f} ms"
                     f"   failed {s['failed']}")
    return lines
