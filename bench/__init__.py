"""Benchmark of vfgen's rendered nginx dispatcher against direct access, plain round robin, vllm-factory
and the peer routers (vllm-router, sglang-router, LiteLLM; bench/peers.py).

Run it with `python -m bench` (see bench/__main__.py); results go to docs/benchmarks.md.
Parts that measure one thing live in modules of their own (bench/streaming.py, bench/outage.py):
a `run(...)` that returns plain data, and `markdown(...)` / `console(...)` that report it.
"""
