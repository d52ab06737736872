"""Promise: the bench's pieces that decide a verdict or start a peer do what they say, without running a load.

- the peer pins in bench/peers.py are the versions scripts/install-bench.sh installs;
- LiteLLM gets one deployment per backend, simple-shuffle and a master key;
- the revival limit comes from the fail_timeout vfgen really renders;
- the targets pick the fastest peer, pair rounds, and judge revival against fail_timeout + 2 s.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from bench import outage, report
from bench.peers import LITELLM_KEY, PEER_PINS, PEERS, litellm_config
from bench.stack import Dispatcher

REPO = Path(__file__).resolve().parents[2]


def test_peer_pins_are_what_the_install_script_installs():
    script = (REPO / "scripts/install-bench.sh").read_text()
    pins = dict(re.findall(r"^(VLLM_ROUTER|SGLANG_ROUTER|LITELLM)_VERSION=(\S+)$", script, re.M))
    assert pins == {"VLLM_ROUTER": PEER_PINS["vllm-router"], "SGLANG_ROUTER": PEER_PINS["sglang-router"],
                    "LITELLM": PEER_PINS["litellm"]}
    for peer in PEERS.values():  # the path another part of the bench (and other benches) look for
        assert peer.venv.name == f"{peer.package}-{peer.version}"


def test_litellm_gets_every_backend_shuffled_behind_a_master_key():
    urls = [f"http://127.0.0.1:{port}" for port in (9001, 9002, 9003, 9004)]
    config = yaml.safe_load(litellm_config(urls, "bench-model"))
    assert [d["litellm_params"]["api_base"] for d in config["model_list"]] == [f"{u}/v1" for u in urls]
    assert {d["model_name"] for d in config["model_list"]} == {"bench-model"}
    assert {d["litellm_params"]["model"] for d in config["model_list"]} == {"hosted_vllm/bench-model"}
    assert config["router_settings"]["routing_strategy"] == "simple-shuffle"
    assert config["general_settings"]["master_key"] == LITELLM_KEY


def test_revival_limit_is_the_rendered_fail_timeout(tmp_path):
    vfgen = Path(sys.executable).with_name("vfgen")
    rendered = subprocess.run([str(vfgen), "render", "bench-model", "-n", "4", "--port", "8080", "--port-start",
                               "9000", "--name", "bench", "--emit", "nginx"], capture_output=True, text=True,
                              check=True, cwd=REPO).stdout
    config = tmp_path / "vfgen.conf"
    config.write_text(rendered)
    rendered_values = {float(v) for v in re.findall(r"fail_timeout=(\d+)s", rendered)}
    assert len(rendered_values) == 1
    assert outage.fail_timeout_s(Dispatcher("vfgen", 8080, [], config)) == rendered_values.pop()
    config.write_text(rendered.replace("fail_timeout=", "fail_timeout=1"))  # 5s -> 15s, say
    assert outage.fail_timeout_s(Dispatcher("vfgen", 8080, [], config)) > 10


def _runs(rps: list[float], p50: list[float] | None = None) -> dict:
    p50 = p50 or [1.0] * len(rps)
    return {"rps": sorted(rps)[len(rps) // 2], "runs": [{"rps": r, "latency_ms": {"50.0": p}} for r, p in zip(rps, p50)]}


def _results(revived_after: float | None) -> dict:
    saturated = {"direct": _runs([100_000, 90_000, 110_000]), "vfgen": _runs([30_000, 20_000, 33_000]),
                 "nginx-minimal": _runs([30_000, 25_000, 33_000]), "vllm-factory": _runs([5_000, 4_000, 6_000]),
                 "vllm-router-rr": _runs([10_000, 5_000, 11_000]), "sglang-router-rr": _runs([6_000, 6_000, 6_000]),
                 "litellm": _runs([60, 50, 55])}
    light = {"direct": _runs([1, 1, 1], [0.05, 0.06, 0.05]), "vfgen": _runs([1, 1, 1], [0.06, 0.07, 0.06]),
             "vllm-router-rr": _runs([1, 1, 1], [0.17, 0.20, 0.15]), "sglang-router-rr": _runs([1, 1, 1], [0.09, 0.10, 0.09]),
             "litellm": _runs([1, 1, 1], [12, 13, 14])}
    failure = {"vfgen": {"failed": 0, "requests": 5000, "outage_s": 10.2, "revived_after_s": revived_after,
                         "watched_s": 75},
               "vllm-router-rr": {"failed": 0, "requests": 5000, "outage_s": 10.2, "revived_after_s": None,
                                  "watched_s": 75}}
    return {"fast": {"saturated": saturated, "light": light}, "failure": failure, "fail_timeout_s": 5.0}


def test_targets_pair_rounds_against_the_fastest_peer():
    rows = {row["target"]: row for row in report.targets(_results(revived_after=3.0))}
    hop = rows["Throughput on fast backends >= 95% of the minimal nginx proxy's"]
    assert hop["value"] == 1.0 and hop["pass"]  # per round 1.0, 0.8, 1.0: the median of the pairs
    throughput = rows["Throughput on fast backends >= 2.5x the fastest peer's"]
    assert "vllm-router-rr" in throughput["detail"] and throughput["value"] == 3.0 and throughput["pass"]
    latency = rows["Added p50 at one connection <= 1/3 of the fastest peer's"]
    # sglang adds the least (0.04 ms each round, vllm-router 0.10-0.14); vfgen adds 0.01.
    assert "sglang-router-rr" in latency["detail"] and abs(latency["value"] - 0.25) < 1e-6 and latency["pass"]


def test_revival_target_is_fail_timeout_plus_two_seconds():
    def verdict(revived: float | None) -> bool:
        rows = {row["target"]: row for row in report.targets(_results(revived))}
        return rows["Revived backend gets traffic within fail_timeout + 2 s"]["pass"]

    assert verdict(0.4) and verdict(7.0)
    assert not verdict(7.5) and not verdict(None)
