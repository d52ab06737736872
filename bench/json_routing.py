"""`python -m bench.json_routing`: what finding the top-level "model" costs nginx on 1 MB and 30 MB bodies.

    python -m bench.json_routing             # ~1 min; rewrites the results block of docs/routing.md
    python -m bench.json_routing --quick     # smoke run: 1 round, prints only

Two dispatchers rendered by `vfgen render`, in one nginx (1 worker): "routed" (two
models, so every body is parsed by the patterns of vfgen/jsonpcre.py) and "plain"
(one model with two instances: nginx reads the body and proxies it, no pattern).
Their backends are an nginx server that answers 200 without looking at the body,
so the difference is nginx's own work. Each body is sent to both, one request at
a time on a kept-alive connection, in interleaved rounds; the cost is the paired
difference of the medians. Then the same with `pcre_jit on;` in the main context,
and the patterns alone through libpcre2-8 (the library nginx links) in-process,
interpreted and JIT-compiled.
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.harness import pcre2
from tests.harness.procs import ProcessGroup, wait_port
from vfgen import jsonpcre
from vfgen.local import free_port_block

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "routing.md"
BEGIN, END = "<!-- bench:json-routing:begin -->", "<!-- bench:json-routing:end -->"
MB = 1024 * 1024


def bodies() -> dict[str, bytes]:
    """Realistic and adversarial request bodies of about 1 MB and 30 MB."""
    out = {}
    for size, label in ((MB, "1MB"), (30 * MB, "30MB")):
        words = "lorem ipsum \\\"dolor\\\" sit amet, " * (size // 32)
        out[f"prompt text, model last ({label})"] = ('{"prompt": "' + words + '", "max_tokens": 1, "model": "beta"}').encode()
        out[f"prompt text, model first ({label})"] = ('{"model": "beta", "prompt": "' + words + '"}').encode()
        turns = [{"role": "user", "content": "hello world " * 80}] * (size // 1000)
        out[f"chat, {size // 1000} turns ({label})"] = json.dumps({"messages": turns, "model": "beta"}).encode()
        out[f"CJK text as json.dumps escapes it ({label})"] = json.dumps(
            {"model": "beta", "prompt": "模型文本" * (size // 24)}).encode()
        ids = list(range(size // 8))
        out[f"token ids, {len(ids)} ({label})"] = json.dumps({"model": "beta", "prompt": ids}).encode()
        out[f"backslash run ({label})"] = b'{"prompt": "' + b"\\\\" * (size // 2) + b'", "model": "beta"}'
    out["deep nesting, 100k levels (0.2MB)"] = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "model": "beta"}'
    return out


def render(root: Path, name: str, spec: dict, port: int) -> Path:
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "port": port, "port_start": port + 1, "max_body_size": "40m", **spec}))
    vfgen = shutil.which("vfgen", path=str(Path(sys.executable).parent)) or "vfgen"
    subprocess.run([vfgen, "render", "-f", str(path), "--output-dir", str(root / name)],
                   check=True, capture_output=True, timeout=60)
    return root / name / "etc/nginx/conf.d" / f"{name}.conf"


class Nginx:
    def __init__(self, root: Path, procs: ProcessGroup, confs: list[Path], sink_ports: list[int], jit: bool) -> None:
        self.prefix = root / ("jit" if jit else "nojit")
        self.prefix.mkdir()
        sinks = "".join(f"listen 127.0.0.1:{p}; " for p in sink_ports)
        conf = self.prefix / "nginx.conf"
        conf.write_text(
            f"worker_processes 1;\ndaemon off;\npid {self.prefix}/nginx.pid;\npcre_jit {'on' if jit else 'off'};\n"
            f"error_log {self.prefix}/error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n"
            "    access_log off;\n"
            + "".join(f"    {k}_temp_path {self.prefix}/{k};\n" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
            + "".join(f"    include {c};\n" for c in confs)
            + f"    server {{ {sinks} client_max_body_size 0; location / {{ return 200 '{{}}'; }} }}\n}}\n")
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
        argv = [nginx, "-p", str(self.prefix), "-e", str(self.prefix / "error.log"), "-c", str(conf)]
        subprocess.run([*argv, "-t", "-q"], check=True, timeout=30)
        self.proc = procs.start(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs = procs

    def stop(self) -> None:
        self.procs.stop(self.proc)


def timed_post(conn: http.client.HTTPConnection, body: bytes) -> tuple[float, int]:
    began = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return time.perf_counter() - began, resp.status


def measure(ports: dict[str, int], docs: dict[str, bytes], rounds: int, per_round: int) -> dict:
    conns = {k: http.client.HTTPConnection("127.0.0.1", p, timeout=120) for k, p in ports.items()}
    out = {}
    for label, body in docs.items():
        times: dict[str, list[float]] = {k: [] for k in ports}
        statuses: dict[str, set[int]] = {k: set() for k in ports}
        for _ in range(rounds):
            for kind in ports:  # interleaved: routed, plain, routed, plain ...
                for _ in range(per_round):
                    took, status = timed_post(conns[kind], body)
                    times[kind].append(took)
                    statuses[kind].add(status)
        routed, plain = statistics.median(times["routed"]), statistics.median(times["plain"])
        out[label] = {"bytes": len(body), "routed_ms": routed * 1e3, "plain_ms": plain * 1e3,
                      "cost_ms": (routed - plain) * 1e3, "routed_status": sorted(statuses["routed"]),
                      "plain_status": sorted(statuses["plain"])}
    for c in conns.values():
        c.close()
    return out


def pcre_alone(docs: dict[str, bytes], repeat: int) -> dict:
    """Median time of the three body patterns in turn, as nginx's map tries them, in libpcre2-8."""
    patterns = jsonpcre.body_patterns("m")
    out = {}
    for jit in (False, True):
        compiled = [pcre2.compile(p, jit) for p in (patterns.model, patterns.model_key, patterns.no_model)]
        for label, body in docs.items():
            times, results = [], []
            for _ in range(repeat):
                began = time.perf_counter()
                rcs = []
                for pattern in compiled:
                    rcs.append(pattern.match(body)[0])
                    if rcs[-1] != pcre2.ERROR_NOMATCH:  # matched (>0) or an error: nginx's map stops here
                        break
                times.append(time.perf_counter() - began)
                results.append(rcs)
            out.setdefault(label, {})["jit" if jit else "interpreted"] = {
                "ms": statistics.median(times) * 1e3, "rc": results[0]}
    return out


def markdown(results: dict, command: str) -> str:
    lines = [f"Command: `{command}` on {results['machine']}.", "",
             "| body | size | routed | plain | cost of routing | routed, pcre_jit on | cost, jit | patterns alone | patterns alone, JIT |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, r in results["nginx"]["off"].items():
        j = results["nginx"]["on"][label]
        p = results["pcre"][label]
        status = "" if r["routed_status"] == [200] else f" (answers {','.join(map(str, r['routed_status']))})"
        jstatus = "" if j["routed_status"] == [200] else f" (answers {','.join(map(str, j['routed_status']))})"
        lines.append(f"| {label}{status} | {r['bytes'] / MB:.1f} MB | {r['routed_ms']:.1f} ms | {r['plain_ms']:.1f} ms | "
                     f"{r['cost_ms']:+.1f} ms | {j['routed_ms']:.1f} ms{jstatus} | {j['cost_ms']:+.1f} ms | "
                     f"{p['interpreted']['ms']:.2f} ms (rc {p['interpreted']['rc']}) | {p['jit']['ms']:.2f} ms (rc {p['jit']['rc']}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.json_routing", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of one request each; print only")
    args = parser.parse_args(argv)
    rounds, per_round, repeat = (1, 1, 1) if args.quick else (5, 3, 5)
    docs = bodies()
    procs = ProcessGroup()
    root = Path(tempfile.mkdtemp(prefix="vfgen-json-bench-"))
    root.chmod(0o755)
    try:
        base = free_port_block(8)
        sink = [base + 1, base + 2, base + 5, base + 6]
        routed = render(root, "routed", {"models": [
            {"model": "org/alpha", "served_model_name": "alpha", "gpus": [0]},
            {"model": "org/beta", "served_model_name": "beta", "gpus": [1]}]}, base)
        plain = render(root, "plain", {"models": [{"model": "org/beta", "served_model_name": "beta", "instances": 2,
                                                   "gpus": [0, 1]}]}, base + 4)
        results: dict = {"machine": f"{platform.node()}, {platform.machine()}, "
                                    f"{len(__import__('os').sched_getaffinity(0))} cores, Python {platform.python_version()}",
                         "nginx": {}}
        for jit in (False, True):
            server = Nginx(root, procs, [routed, plain], sink, jit)
            for port in (base, base + 4, *sink):
                wait_port("127.0.0.1", port, timeout=15)
            results["nginx"]["on" if jit else "off"] = measure({"routed": base, "plain": base + 4}, docs, rounds, per_round)
            server.stop()
        results["pcre"] = pcre_alone(docs, repeat)
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    command = "python -m bench.json_routing" + (" --quick" if args.quick else "")
    block = markdown(results, command)
    print(block)
    if not args.quick:
        text = DOC.read_text()
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        DOC.write_text(text[:start] + "\n" + block + "\n" + text[end:])
        print(f"updated {DOC.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
