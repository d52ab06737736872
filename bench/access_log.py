"""`python -m bench.access_log`: what the JSON access log costs in throughput.

The same vfgen dispatcher (4 fast static backends, `vfgen render ... --emit nginx`) three ways,
in interleaved rounds:

- "no-log": as rendered by default, under an http{} block with `access_log off`;
- "combined": the `--access-log json` render with its access_log line switched to nginx's
  stock `combined` format (the cost of logging at all);
- "json": `--access-log json` as rendered (log_format escape=json, the UTF-8 maps, X-Request-Id).

Logs go to files under the run's temporary directory. Prints medians per path and the paired
ratios json/no-log and json/combined per round (each round runs the three back to back).

    python -m bench.access_log                 # 7 rounds of 3 s, 64 connections
    python -m bench.access_log --rounds 1 --duration 1
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import report
from bench.__main__ import _require
from bench.scenarios import Bench
from bench.stack import Stack
from tests.harness.procs import ProcessGroup

PATHS = ("no-log", "combined", "json")


def _dispatchers(stack: Stack, backends, root: Path) -> dict:
    json_args = ["--access-log", "json", "--access-log-path", str(root / "access.json")]
    plain = stack.nginx_dispatcher("log-none", backends)
    logged = stack.nginx_dispatcher("log-json", backends, extra_args=json_args)
    combined = stack.nginx_dispatcher("log-combined", backends, extra_args=json_args)
    # Same config, nginx's stock format into another file; reloaded with SIGHUP.
    text = combined.config.read_text()
    text, count = re.subn(r'access_log "([^"]+)" \S+;', f'access_log "{root / "access.combined"}" combined;', text)
    assert count == 1, "the rendered config no longer has one access_log line"
    combined.config.write_text(text)
    stack.stop(combined)
    return {"no-log": plain, "combined": _restart(stack, combined), "json": logged}


def _restart(stack: Stack, dispatcher):
    """Start nginx again on the edited conf.d file (same port)."""
    from bench.stack import Dispatcher

    name = dispatcher.name + "-edited"
    procs = stack._nginx(name, "auto", f"    include {dispatcher.config};\n")
    edited = Dispatcher(name, dispatcher.port, procs, dispatcher.config)
    stack._wait_healthy(edited)
    return edited


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.access_log", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--duration", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args(argv)
    nginx_bin, wrk_bin = _require()
    root = Path(tempfile.mkdtemp(prefix="vfgen-bench-log-"))
    os.chmod(root, 0o755)
    procs = ProcessGroup()
    stack = Stack(root, procs, nginx_bin)
    try:
        machine = report.machine_info(nginx_bin, wrk_bin)
        print(f"bench.access_log: {machine['cpus']} CPUs ({machine['cpu_model']}), load average "
              f"{machine['loadavg_at_start']}; nginx {machine.get('nginx', '?')}", flush=True)
        bench = Bench(stack, wrk_bin, lambda line: print(line, flush=True))
        backends = stack.static_backends()
        dispatchers = _dispatchers(stack, backends, root)
        runs = bench.interleaved(args.rounds, list(PATHS), lambda p: bench.measure(
            p, backends, dispatchers[p], mode="static", connections=args.connections, duration=args.duration))
        lines = {name: sum(1 for _ in open(root / name, "rb")) for name in ("access.json", "access.combined")}
    finally:
        procs.stop_all()
        stack.close_logs()
    failed = sum(r.failed for results in runs.values() for r in results)
    print(f"\n{'path':<10} {'median req/s':>13} {'min':>9} {'max':>9}")
    for path in PATHS:
        rps = [r.rps for r in runs[path]]
        print(f"{path:<10} {statistics.median(rps):13.0f} {min(rps):9.0f} {max(rps):9.0f}")
    for a, b in (("json", "no-log"), ("json", "combined"), ("combined", "no-log")):
        ratios = [x.rps / y.rps for x, y in zip(runs[a], runs[b])]
        print(f"{a}/{b}: median {statistics.median(ratios):.3f} (rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"failed requests: {failed}; lines logged: {lines}; outside load max "
          f"{max(r.extra['cpu']['outside_cores'] for rs in runs.values() for r in rs):.2f} cores")
    shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
