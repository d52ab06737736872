"""Promise: `python -m bench prefix` runs its stand-in part and refuses clearly without its tools.

Not a timed test: it checks that the stand-in part moved requests through both
dispatchers (least_conn and prefix), both again with pcre_jit on, and the three
controls, with no failed request, and measured a CPU time per request for each, that it wrote its block and JSON, and that the real-vLLM
part exits 2 naming vllm-router when that venv is missing. Speeds are never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.tools import require_tool

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]


def test_stand_in_part_runs_both_dispatchers(tmp_path):
    require_tool("nginx", "nginx-light")
    require_tool("wrk")
    done = subprocess.run([sys.executable, "-m", "bench", "prefix", "--stand-in-only", "--cpu-rounds", "2",
                           "--duration", "1", "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads((tmp_path / "prefix-results.json").read_text())
    cpu = results["cpu"]
    # Both with pcre_jit on, and the controls that split prefix's cost (hashing, body map, key regex).
    fronts = {"least_conn", "prefix", "least_conn-jit", "prefix-jit", "prefix, short key", "least_conn + body map",
              "least_conn + key map"}
    assert set(cpu["failed"]) >= fronts and not any(cpu["failed"].values()), cpu
    assert all(cpu["rps"][k] > 0 and cpu["cpu_us_per_request"][k] > 0 for k in fronts), cpu
    assert len(cpu["ratios"]) == 2 and len(cpu["jit_ratios"]) == 2
    block = (tmp_path / "prefix-results.md").read_text()
    assert "nginx CPU per request" in block and "prefix / least_conn" in block
    assert all(f"| {k} |" in block for k in fronts), block
    # Only the part that ran writes its block: no real-vLLM table from a stand-in-only run.
    assert "Real vLLM" not in block


def test_vllm_part_without_vllm_router_exits_2_naming_it(tmp_path):
    env = {**os.environ, "VFGEN_VLLM_ROUTER_VENV": str(tmp_path / "no-such-venv")}
    done = subprocess.run([sys.executable, "-m", "bench", "prefix", "--vllm-only", "--no-write"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert "vllm-router 0.1.17" in done.stderr and "pip install vllm-router==0.1.17" in done.stderr, done.stderr
