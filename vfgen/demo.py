"""`vfgen demo`: bring up a two-model deployment with stand-in vLLM backends, show the routing, tear down.

Runs on a laptop with no GPU: the backends are `vfgen-fake-vllm`, the
dispatcher is the rendered nginx config, the processes run under a private
supervisord, all on 127.0.0.1 in a temporary directory.
"""

from __future__ import annotations

import getpass
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import requests

from vfgen import health
from vfgen.commands import select_artefacts
from vfgen.config import USER_NAME, parse_deployment
from vfgen.errors import VfgenError
from vfgen.local import LocalRun, free_port_block
from vfgen.output import write_tree
from vfgen.plan import build_plan


def _script(name: str) -> str:
    beside = Path(sys.argv[0]).resolve().parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise VfgenError(f"{name} is not on PATH; install vfgen with pip first")
    return found


def demo_deployment(workdir: Path) -> dict:
    first = free_port_block(4)
    user = getpass.getuser()
    return {
        "name": "demo",
        "listen": "127.0.0.1",
        "port": first,
        "port_start": first + 1,
        "backend": "supervisord",
        # supervisord can only switch users as root; `root` renders no user= line.
        "user": user if USER_NAME.fullmatch(user) else "root",
        "vfgen_bin": _script("vfgen"),
        "vllm_bin": _script("vfgen-fake-vllm"),
        "lock_dir": str(workdir / "locks"),
        "log_dir": str(workdir),
        "timeouts": {"start": 60, "shutdown": 5},
        "models": [
            {"model": "demo/chat-llm", "name": "chat", "served_model_name": "chat", "aliases": ["chat-latest"],
             "instances": 2, "gpus": [0], "max_batch_size": 4,
             "env": {"VFGEN_FAKE_LATENCY": "0.05", "VFGEN_FAKE_CHUNK_INTERVAL": "0.1"}},
            {"model": "demo/embedder", "name": "embed", "served_model_name": "embed", "instances": 1, "gpus": [1]},
        ],
    }


def run_demo(out: TextIO, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="vfgen-demo-"))
    run = None
    try:
        d = parse_deployment(demo_deployment(workdir), source="vfgen demo")
        plan = build_plan(d)
        root = workdir / "root"
        write_tree(root, select_artefacts(plan, "all"))
        out.write(f"rendered into {root}:\n")
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            out.write(f"  {path.relative_to(root)}\n")
        run = LocalRun(workdir, root / f"etc/nginx/conf.d/{d.name}.conf", root / f"etc/supervisor/conf.d/{d.name}.conf")
        run.start()
        out.write("starting 3 stand-in vLLM instances under supervisord (one at a time per GPU) ...\n")
        if health.wait([i.url for i in plan.instances], model=None, timeout=60, out=out) != 0:
            raise VfgenError(f"the demo instances did not become healthy; see {workdir}/*.log")
        _show_traffic(f"http://127.0.0.1:{d.port}", out)
        return 0
    finally:
        if run is not None:
            run.stop()
            out.write("stopped nginx, supervisord and every instance\n")
        if keep:
            out.write(f"kept {workdir}\n")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _show_traffic(base: str, out: TextIO) -> None:
    session = requests.Session()
    deadline = time.monotonic() + 15
    while session.get(f"{base}/health", timeout=2).status_code != 200:
        if time.monotonic() > deadline:
            raise VfgenError("the dispatcher never answered /health with 200")
        time.sleep(0.2)
    models = [m["id"] for m in session.get(f"{base}/v1/models", timeout=5).json()["data"]]
    out.write(f"\nGET {base}/v1/models -> {', '.join(models)}\n\n")
    out.write(f"{'REQUEST':42} {'STATUS':6} {'BACKEND':8} ANSWER\n")
    calls = [
        ("/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "hello"}]}),
        ("/v1/chat/completions", {"model": "chat-latest", "messages": [{"role": "user", "content": "again"}]}),
        ("/v1/completions", {"model": "chat", "prompt": "a third one"}),
        ("/v1/embeddings", {"model": "embed", "input": "vectors please"}),
        ("/v1/completions", {"model": "no-such-model", "prompt": "?"}),
    ]
    for path, body in calls:
        resp = session.post(f"{base}{path}", json=body, timeout=10)
        answer = resp.json()
        summary = answer.get("error", {}).get("message") or f"served by model {answer.get('model')}"
        out.write(f"{'POST ' + path + ' ' + body['model']:42} {resp.status_code:<6} {resp.headers.get('X-Fake-Vllm-Port', '-'):8} {summary[:70]}\n")
    started = time.monotonic()
    with session.post(f"{base}/v1/chat/completions", stream=True, timeout=10,
                      json={"model": "chat", "stream": True, "messages": [{"role": "user", "content": "stream"}]}) as resp:
        chunks = [f"{time.monotonic() - started:.2f}s" for line in resp.iter_lines() if line.startswith(b"data:")]
    out.write(f"\nstreamed {len(chunks)} SSE events through nginx, arriving at {', '.join(chunks)}\n")
    out.write(json.dumps({"dispatcher": base, "models": models}) + "\n")
