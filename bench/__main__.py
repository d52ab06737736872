"""`python -m bench`: run every measurement side by side, print the table and the targets, write the plots.

    python -m bench                 # full run (~15 min): updates docs/benchmarks.md and docs/bench-*.png
    python -m bench --quick         # smoke run (~1 min): prints the table, writes nothing
    python -m bench --out-dir DIR   # write results.md, results.json and the plots to DIR instead
    python -m bench prefix [...]    # prefix-aware routing with real vLLM (bench/prefix.py)
    python -m bench --parts failure --out-dir DIR   # only some parts (docs/ is only written by all of them)

Everything listens on 127.0.0.1 on free ports; every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.peers import PEERS, missing_peers
from bench.scenarios import PARTS, Bench, Settings, run_all
from bench.stack import REPO, Stack
from tests.harness.procs import ProcessGroup

DOCS = REPO / "docs"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 s per measurement, one round")
    parser.add_argument("--duration", type=int, default=2,
                        help="seconds of each interleaved run (full run; default 2; affinity runs take twice that)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds of each comparison (default 5; fast backends: 3 more)")
    parser.add_argument("--connections", type=int, default=64,
                        help="wrk connections on the fast static backends (default 64: 16 per backend)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write results.md, results.json and plots here (default: docs/ for a full run, "
                             "nothing for --quick)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peer routers to run beside vfgen (default all: {','.join(PEERS)}; "
                             "'' for none); their venvs come from scripts/install-bench.sh")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    parser.add_argument("--no-plots", action="store_true", help="skip matplotlib")
    parser.add_argument("--check-targets", action="store_true", help="exit 1 when a target fails")
    parser.add_argument("--keep-logs", action="store_true", help="keep the runtime directory with all logs")
    args = parser.parse_args(argv)
    if min(args.duration, args.rounds, args.connections) < 1:
        parser.error("--duration, --rounds and --connections must be >= 1")
    args.peers = tuple(p for p in args.peers.split(",") if p)
    args.parts = tuple(p for p in args.parts.split(",") if p)
    for value, known, option in ((args.peers, PEERS, "--peers"), (args.parts, PARTS, "--parts")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    if not args.parts:
        parser.error("--parts: name at least one part")
    if args.out_dir is None and not args.quick and set(args.parts) != set(PARTS):
        parser.error("--parts with fewer than all parts needs --out-dir (docs/ shows one whole run)")
    return args


def which(tool: str) -> str | None:
    """Like shutil.which, also looking in sbin (Debian's nginx), which is not on every PATH."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/local/sbin")


def _require(peer_names: tuple[str, ...] = ()) -> tuple[str, str]:
    """nginx and wrk binaries; vllm-factory and aiohttp importable; the peers' venvs.

    Exit 2 naming the install step otherwise."""
    missing = []
    nginx_bin, wrk_bin = which("nginx"), which("wrk")
    if nginx_bin is None:
        missing.append("nginx (apt-get install nginx-light)")
    if wrk_bin is None:
        missing.append("wrk (apt-get install wrk)")
    for module, package in (("forge.dispatcher", "vllm-factory==0.2.1 --no-deps"), ("aiohttp", "aiohttp")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} (pip install {package})")
    missing += [f"peer {entry}" for entry in missing_peers(peer_names)]
    if missing:
        print("bench: missing " + "; ".join(missing) + ". Run scripts/install-bench.sh.", file=sys.stderr)
        sys.exit(2)
    return nginx_bin, wrk_bin


def _terminate(signum: int, frame) -> None:
    raise SystemExit(128 + signum)  # so the finally blocks stop every process


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prefix"]:
        from bench import prefix

        return prefix.main(argv[1:])
    args = parse_args(argv)
    nginx_bin, wrk_bin = _require(args.peers)
    settings = (Settings.quick(args.connections, args.peers, args.parts) if args.quick
                else Settings.full(args.duration, args.rounds, args.connections, args.peers, args.parts))
    out_dir = args.out_dir if args.out_dir else (None if args.quick else DOCS)
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    signal.signal(signal.SIGTERM, _terminate)

    # World-traversable: nginx workers run as nobody and need their temp dirs.
    root = Path(tempfile.mkdtemp(prefix="vfgen-bench-"))
    os.chmod(root, 0o755)
    procs = ProcessGroup()
    stack = Stack(root, procs, nginx_bin)
    ok = False
    try:
        machine = report.machine_info(nginx_bin, wrk_bin)
        print(f"bench: {machine['cpus']} CPUs ({machine['cpu_model']}), load average {machine['loadavg_at_start']}; "
              f"logs in {root}", flush=True)
        results = run_all(Bench(stack, wrk_bin, lambda line: print(line, flush=True)), settings)
        ok = True
    finally:
        procs.stop_all()
        stack.close_logs()
        if ok and not args.keep_logs:
            shutil.rmtree(root, ignore_errors=True)
        elif not ok:
            print(f"bench: logs kept in {root}", file=sys.stderr)

    machine["loadavg_at_end"] = report.loadavg()
    results["machine"] = machine
    results["outside_cores_max"] = _outside_max(results)
    results["targets"] = report.targets(results)
    print(report.console_table(results), flush=True)

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if out_dir.resolve() != DOCS.resolve():
            (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        plots = [] if args.no_plots else report.plots(results, out_dir)
        block = report.markdown(results, command.strip(), [str(p) for p in plots])
        if out_dir.resolve() == DOCS.resolve():
            report.update_docs(DOCS / "benchmarks.md", block)
            raw = Path(tempfile.gettempdir()) / "vfgen-bench-results.json"  # every run's numbers, for the prose
            raw.write_text(json.dumps(results, indent=1, default=str) + "\n")
            print(f"\nbench: updated docs/benchmarks.md and {len(plots)} plot(s) in docs/; raw results in {raw}")
        else:
            (out_dir / "results.md").write_text(block)
            print(f"\nbench: wrote results.md, results.json and {len(plots)} plot(s) to {out_dir}")
    if args.check_targets and not all(t["pass"] for t in results["targets"]):
        return 1
    return 0


def _outside_max(results: dict) -> float:
    """The most CPU other tenants of the machine used during any one measurement, in cores."""
    seen: list[float] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if "outside_cores_max" in node:
                seen.append(node["outside_cores_max"])
            for value in node.values():
                walk(value)

    walk({k: v for k, v in results.items() if k != "outside_cores_max"})
    return max(seen, default=0.0)


if __name__ == "__main__":
    start = time.monotonic()
    code = main()
    print(f"bench: done in {time.monotonic() - start:.0f} s")
    sys.exit(code)
