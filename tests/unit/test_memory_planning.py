"""`vfgen plan` honours the vLLM arguments that change memory, and says what it did not check.

Every case runs the real CLI (`vfgen plan ... --json`) on model fixtures whose
config.json and safetensors index are copies of the published ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vfgen.cli import app

LLAMA = str(Path(__file__).resolve().parents[1] / "fixtures/models/meta-llama-3-8b")
LLAMA_KV_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head dim x (K, V) x 2 bytes
LLAMA_WEIGHTS = 16_060_522_496  # model.safetensors.index.json total_size (bfloat16)


def run(*argv: str):
    return CliRunner().invoke(app, list(argv), catch_exceptions=False)


def plan_json(*argv: str) -> dict:
    result = run("plan", *argv, "--json") if "--" not in argv else run(
        "plan", *argv[:argv.index("--")], "--json", *argv[argv.index("--"):])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_plan_json_exposes_weights_kv_per_token_and_one_full_sequence():
    memory = plan_json(LLAMA, "--gpu-memory", "80GiB")["memory"][0]
    assert memory["weight_bytes"] == LLAMA_WEIGHTS
    assert memory["kv_bytes_per_token"] == LLAMA_KV_PER_TOKEN
    assert memory["max_model_len"] == 8192
    assert memory["kv_bytes_per_sequence"] == 8192 * LLAMA_KV_PER_TOKEN  # 1 GiB


def test_max_model_len_after_double_dash_is_what_the_memory_check_uses():
    """At 21 GiB the model's own 8192-token context cannot start; the 4096 the user passes to vLLM can."""
    refused = run("plan", LLAMA, "--gpu-memory", "21GiB")
    assert refused.exit_code == 1 and "the auto share 0.92 cannot start it" in refused.stderr
    assert "--max-model-len below the model's 8192" in refused.stderr
    memory = plan_json(LLAMA, "--gpu-memory", "21GiB", "--", "--max-model-len", "4096")["memory"][0]
    assert memory["max_model_len"] == 4096
    assert memory["kv_bytes_per_sequence"] == 4096 * LLAMA_KV_PER_TOKEN


def test_kv_cache_dtype_and_quantization_after_double_dash_are_honoured():
    fp8_kv = plan_json(LLAMA, "--gpu-memory", "80GiB", "--", "--kv-cache-dtype", "fp8")["memory"][0]
    assert fp8_kv["kv_bytes_per_token"] == LLAMA_KV_PER_TOKEN // 2
    fp8_weights = plan_json(LLAMA, "--gpu-memory", "80GiB", "--", "--quantization=fp8")["memory"][0]
    assert fp8_weights["weight_bytes"] == LLAMA_WEIGHTS // 2


def test_quantization_needing_a_quantized_checkpoint_is_refused_by_name():
    result = run("plan", LLAMA, "--gpu-memory", "80GiB", "--", "--quantization", "awq")
    assert result.exit_code == 1
    assert "--quantization='awq': this method needs a quantized checkpoint" in result.stderr


def test_advice_never_offers_a_flag_already_given():
    result = run("plan", LLAMA, "-n", "2", "--gpu-memory", "24GiB", "--", "--max-model-len", "4096",
                 "--kv-cache-dtype", "fp8")
    assert result.exit_code == 1, result.stderr
    assert "vLLM will refuse to start" in result.stderr
    assert "--kv-cache-dtype fp8" not in result.stderr and "below the model's" not in result.stderr
    assert "a --max-model-len below 4096" in result.stderr


def test_unknown_gpu_size_is_said_not_silently_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    result = run("plan", LLAMA, "-n", "2")
    assert result.exit_code == 0
    assert "Warning: GPU size unknown: memory not checked; pass --gpu-memory" in result.stderr


def test_planning_more_instances_than_fit_warns():
    result = run("plan", LLAMA, "-n", "2", "--gpu-memory", "80GiB")
    assert result.exit_code == 0, result.stderr
    assert "INSTANCES THAT FIT" in result.stdout
    assert "Warning: meta-llama-3-8b: 2 instance(s) planned per GPU, but only 1 fit" in result.stderr
    assert "planned per GPU" not in run("plan", LLAMA, "-n", "1", "--gpu-memory", "80GiB").stderr


def test_gpu_memory_says_which_unit_it_understood():
    decimal = run("plan", LLAMA, "--gpu-memory", "80GB")
    assert "'80GB' is read as 80,000,000,000 bytes (74.51 GiB" in decimal.stderr and "write 80GiB" in decimal.stderr
    assert "74.51 GiB" in decimal.stdout
    binary = run("plan", LLAMA, "--gpu-memory", "80GiB")
    assert "is read as" not in binary.stderr and "80.00 GiB" in binary.stdout
    mib = plan_json(LLAMA, "--gpu-memory", "81920MiB")["memory"][0]
    assert mib["gpu_bytes"] == 80 * 2**30


def test_absolute_model_path_that_does_not_exist_warns(tmp_path: Path):
    missing = run("render", str(tmp_path / "no-such-model"), "-n", "2", "--emit", "nginx")
    assert missing.exit_code == 0
    assert f"model path {tmp_path / 'no-such-model'} does not exist" in missing.stderr
    assert "does not exist" not in run("render", "org/model", "-n", "2", "--emit", "nginx").stderr


@pytest.mark.parametrize("args,cap", [([], None), (["--max-queue", "4"], 4), (["--max-queue", "0"], 0)])
def test_plan_json_carries_the_overflow_cap(args, cap):
    pool = plan_json("org/m", "-n", "2", *args)["pools"][0]
    assert pool["overflow_cap"] == cap and pool["cap"] == 32
