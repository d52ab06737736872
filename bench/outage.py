"""Part 4, failure: SIGKILL one stand-in under load, bring it back after an outage, see who notices.

For each path, first a check that it uses all 4 backends (an idle router may still hold a
backend killed during another path's run as dead: it must not start with a handicap), then
one wrk run of short requests at capacity:
1. after `kill_at_s`, SIGKILL backend KILLED (a crash: in-flight requests are cut);
2. after `outage_s` more, start it again and wait until it answers /v1/models ("ready");
3. watch the revived backend's own request log (/fake/stats arrivals, wall-clock stamps):
   the first inference request that reaches it, minus "ready", is how soon the path sends
   it traffic again. Watching stops after `revive_wait_s`;
4. `tail_s` more of load, to see what share of requests the revived backend then gets
   (a quarter is its fair share); then wrk gets SIGINT and reports.

Failed requests are wrk's count over the whole run: non-2xx answers, socket errors, timeouts.
"""

from __future__ import annotations

import json
import re
import time

from bench.stack import Backends, Dispatcher, http_get
from bench.wrk import run_wrk

THREADS = 4

KILLED = 1  # index of the backend that is killed
POLL_S = 0.05


def fail_timeout_s(dispatcher: Dispatcher) -> float:
    """The `fail_timeout` of vfgen's rendered server lines (nginx's default, 10 s, if none is set)."""
    found = {float(v) for v in re.findall(r"fail_timeout=(\d+)s?\b", dispatcher.config.read_text())}
    if len(found) > 1:
        raise RuntimeError(f"{dispatcher.config} has several fail_timeout values {sorted(found)}")
    return found.pop() if found else 10.0


def _stats(url: str) -> dict:
    status, body = http_get(f"{url}/fake/stats", timeout=10)
    if status != 200:
        raise RuntimeError(f"GET {url}/fake/stats answered {status}")
    return json.loads(body)


def _first_arrival(url: str, since: float) -> float | None:
    for entry in _stats(url)["arrivals"]:
        if entry["t"] >= since:
            return entry["t"]
    return None


def run(bench, settings, backends: Backends, dispatchers: dict[str, Dispatcher], paths: list[str],
        connections: int) -> dict:
    stack = bench.stack
    timing = settings.outage
    bench.log(f"[4] failure: SIGKILL backend {KILLED} after {timing.kill_at_s:g} s, back after {timing.outage_s:g} s "
              f"of outage; watch it up to {timing.revive_wait_s:g} s for traffic ({connections} connections)")
    out = {}
    for name in paths:
        stack.wait_idle(backends)
        all_used_after = until_all_backends_used(bench, backends, dispatchers[name], connections,
                                                 timing.revive_wait_s)
        stack.wait_idle(backends)
        seen: dict = {}

        def outage(seen: dict = seen) -> None:
            stack.kill_backend(backends, KILLED)
            seen["killed_wall"] = time.time()
            time.sleep(timing.outage_s)
            stack.restart_backend(backends, KILLED)
            ready = seen["ready_wall"] = time.time()
            url = backends.urls[KILLED]
            while time.time() < ready + timing.revive_wait_s:
                first = _first_arrival(url, ready)
                if first is not None:
                    seen["first_wall"] = first
                    break
                time.sleep(POLL_S)
            before = [_stats(u)["requests"] for u in backends.urls]
            time.sleep(timing.tail_s)
            after = [_stats(u)["requests"] for u in backends.urls]
            total = sum(after) - sum(before)
            seen["tail_share"] = round((after[KILLED] - before[KILLED]) / total, 3) if total > 0 else None

        longest = timing.kill_at_s + timing.outage_s + timing.revive_wait_s + timing.tail_s + 30
        result = bench.measure(name, backends, dispatchers[name], mode="mix", connections=connections,
                               duration=int(longest), env={"BENCH_LONG": "0"}, action=(timing.kill_at_s, outage),
                               stop_after_action=True)
        if "ready_wall" not in seen:
            raise RuntimeError("wrk ended before the backend was killed and revived")
        first = seen.get("first_wall")
        revived_after = round(first - seen["ready_wall"], 2) if first is not None else None
        bench.log(f"    revived backend's first request {revived_after if first else 'none'} s after it was ready"
                  f" (watched {timing.revive_wait_s:g} s); share of requests in the next {timing.tail_s:g} s: "
                  f"{seen['tail_share']}")
        out[name] = {**bench_summary(result), "errors": result.errors, "killed_at_s": round(result.action_at_s, 2),
                     "outage_s": round(seen["ready_wall"] - seen["killed_wall"], 2),
                     "revived_after_s": revived_after, "watched_s": timing.revive_wait_s,
                     "tail_share": seen["tail_share"], "all_used_before_s": all_used_after}
    return out


def until_all_backends_used(bench, backends: Backends, dispatcher: Dispatcher, connections: int,
                            timeout: float) -> float | None:
    """Seconds of 1 s load bursts until every backend got a request of a burst; None if not by `timeout`."""
    env = {"BENCH_LONG": "0", **({"BENCH_AUTHORIZATION": dispatcher.authorization} if dispatcher.authorization else {})}
    started = time.monotonic()
    while True:
        before = [_stats(u)["requests"] for u in backends.urls]
        run_wrk(bench.wrk_bin, f"{dispatcher.url}/", mode="mix", duration=1, connections=connections,
                threads=THREADS, env=env)
        after = [_stats(u)["requests"] for u in backends.urls]
        waited = round(time.monotonic() - started, 1)
        if all(b > a for a, b in zip(before, after)):
            return waited
        if waited > timeout:
            bench.log(f"    {dispatcher.name}: backend(s) {[i for i, (a, b) in enumerate(zip(before, after)) if b <= a]}"
                      f" got no request in {waited:g} s of load; measuring anyway")
            return None
        time.sleep(1)


def bench_summary(result) -> dict:
    from bench.scenarios import summarize  # late: scenarios imports this module

    return summarize([result])


# --- report ----------------------------------------------------------------------------------


def revival_text(s: dict) -> str:
    if s["revived_after_s"] is None:
        return f"none within {s['watched_s']:g} s"
    return f"{s['revived_after_s']:.1f} s"


def markdown(results: dict, names: dict[str, str]) -> list[str]:
    fail = results["failure"]
    any_run = next(iter(fail.values()))
    out = ["", "### 4. Failure: one backend killed, revived after an outage", "",
           f"Short requests at capacity ({results['capacity']} connections). SIGKILL to one of the 4 stand-ins "
           f"{any_run['killed_at_s']:.0f} s into the run; it is started again after {results['settings']['outage']['outage_s']:g} s "
           "and the run goes on until it gets a request (or the watch ends), plus a short tail. Failed = non-2xx "
           "answers plus socket errors. *Revived gets traffic*: time from the revived backend answering again to "
           "the first request it received, from its own log. *Tail share*: its share of all requests right "
           "after that (25% is an even share).", ""]
    rows = []
    for name, s in fail.items():
        errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items() if v) or "none"
        share = f"{s['tail_share']:.0%}" if s["tail_share"] is not None else "–"
        rows.append([names.get(name, name), f"{s['requests']:,}", str(s["failed"]),
                     f"{s['failed'] / max(1, s['requests']):.1%}", errors, revival_text(s), share])
    out.append(_table(["path", "requests", "failed", "failed %", "errors (wrk)", "revived gets traffic",
                       "tail share"], rows))
    return out


def console(results: dict) -> list[str]:
    lines = ["one backend killed, revived (failed / requests; revived backend's first request after):"]
    for name, s in results["failure"].items():
        lines.append(f"  {name:<18} {s['failed']:>6} / {s['requests']:<8,}  {revival_text(s)}")
    return lines


def _table(header: list[str], rows: list[list[str]]) -> str:
    from bench.report import _table as table

    return table(header, rows)
