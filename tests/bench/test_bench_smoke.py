"""Promise: `python -m bench --quick` runs every measurement on every path, peers included, and prints the verdict.

A smoke run of about a second per path and part, not a timed test: it checks that each
path (the peer routers vllm-router, sglang-router and LiteLLM too) moved requests
(> 0 req/s), that nothing failed where nothing may fail, that streams arrived whole,
that the failure run really killed and revived a backend, that affinity beats no
affinity, and that the table, the JSON and the five plots were written. It never
asserts speed. Under CI=true a missing peer venv fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peers import PEERS, missing_peers
from tests.harness.tools import missing, require_tool

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]
PATHS = ["direct", "vfgen", "round-robin", "vllm-factory", *PEERS]
TIMEOUT_S = 400  # the quick run takes about 70 s
PLOTS = ["bench-throughput.png", "bench-latency.png", "bench-scheduling.png", "bench-affinity-failure.png",
         "bench-streaming-revival.png"]
TARGETS = 7


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    require_tool("nginx", "nginx-light")
    require_tool("wrk")
    for module, package in (("forge", "vllm-factory==0.2.1 --no-deps"), ("aiohttp", "aiohttp"),
                            ("matplotlib", "matplotlib")):
        if importlib.util.find_spec(module) is None:
            missing(f"Python package {package}", "scripts/install-bench.sh")
    for entry in missing_peers(PEERS):
        missing(f"peer router venv {entry}", "scripts/install-bench.sh")
    out = tmp_path_factory.mktemp("bench")
    bench = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--out-dir", str(out)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = bench.communicate(timeout=TIMEOUT_S)
    finally:
        if bench.poll() is None:
            # SIGTERM first: the bench then stops every process it started, by PID.
            bench.terminate()
            try:
                bench.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                bench.kill()
                bench.communicate()
    assert bench.returncode == 0, f"exit {bench.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout, json.loads((out / "results.json").read_text()), out


def test_prints_the_table_and_a_verdict_per_target(quick_run):
    stdout, results, _ = quick_run
    assert "vfgen dispatcher benchmark" in stdout
    verdicts = [line.split()[0] for line in stdout.split("targets:", 1)[1].splitlines() if line.strip()][:TARGETS]
    assert len(results["targets"]) == TARGETS and all(v in ("PASS", "FAIL") for v in verdicts), stdout[-2000:]
    assert any("fastest peer" in t["detail"] for t in results["targets"]), results["targets"]


def test_every_path_moves_requests(quick_run):
    _, results, _ = quick_run
    for path in PATHS:
        parts = [results["realistic_overhead"]]
        if not (path in PEERS and PEERS[path].slow):  # quick leaves LiteLLM out of the fast part
            parts += [results["fast"]["saturated"], results["fast"]["light"]]
        for part in parts:
            assert path in part, (path, list(part))
            assert part[path]["rps"] > 0 and part[path]["requests"] > 0, (path, part[path])
            assert part[path]["failed"] == 0, (path, part[path])
            assert 0 < part[path]["p50_ms"] <= part[path]["p99_ms"], (path, part[path])
    for per in results["scheduling"].values():
        for name, summary in per.items():
            assert summary["rps"] > 0, (name, summary)
        # Overflow goes to the backups and round robin has no caps: neither may drop a request.
        assert per["vfgen"]["failed"] == 0 and per["round-robin"]["failed"] == 0, per


def test_the_bare_nginx_hop_is_measured_as_a_reference(quick_run):
    stdout, results, _ = quick_run
    for part in (results["fast"]["saturated"], results["fast"]["light"]):
        assert part["nginx-minimal"]["rps"] > 0 and part["nginx-minimal"]["failed"] == 0, part["nginx-minimal"]
    assert "of the minimal nginx proxy's" in stdout and "CPU per request: direct" in stdout, stdout[-2000:]


def test_every_path_streams_every_chunk(quick_run):
    _, results, _ = quick_run
    for path in PATHS:
        summary = results["streaming"][path]
        assert summary["streams"] > 0 and summary["failed"] == 0, (path, summary)
        # The stand-ins send 10 chunks; a path may re-chunk (LiteLLM adds a final one) but lose none.
        assert summary["events_min"] >= 10, (path, summary)
        assert 0 < summary["first_p50_ms"], (path, summary)


def test_failure_run_kills_and_revives_a_backend_and_vfgen_loses_nothing(quick_run):
    _, results, _ = quick_run
    assert set(results["failure"]) >= {"vfgen", "vllm-factory"} and set(results["failure"]) & set(PEERS)
    for name, summary in results["failure"].items():
        assert summary["killed_at_s"] is not None and summary["requests"] > 0, (name, summary)
        assert summary["outage_s"] >= results["settings"]["outage"]["outage_s"], (name, summary)
    assert results["failure"]["vfgen"]["failed"] == 0, results["failure"]["vfgen"]
    # vllm-factory never ejects a backend: it sends to the revived one at once (and fails the
    # requests that reach the dead one), so the revival watch really sees arrivals.
    assert results["failure"]["vllm-factory"]["revived_after_s"] is not None, results["failure"]["vllm-factory"]
    assert results["failure"]["vllm-factory"]["failed"] > 0, results["failure"]["vllm-factory"]


def test_affinity_keeps_shapes_together(quick_run):
    _, results, _ = quick_run
    affinity = results["affinity"]
    assert affinity["vfgen-affinity"]["shapes"] == 16
    assert affinity["vfgen-affinity"]["hit_rate"] > affinity["vfgen"]["hit_rate"], affinity


def test_writes_markdown_json_and_plots(quick_run):
    _, _, out = quick_run
    assert "### Targets" in (out / "results.md").read_text()
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
