"""Benchmark of vfgen's rendered nginx dispatcher against direct access, plain round robin and vllm-factory.

Run it with `python -m bench` (see bench/__main__.py); results go to docs/benchmarks.md.
"""
