"""vfgen.memory against real public model configs: weights, KV per token, shares, sizes, errors."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from vfgen import memory
from vfgen.errors import ConfigError
from vfgen.memory import (
    CUDA_GRAPH_BYTES,
    GIB,
    MIB,
    PROFILE_BATCHED_TOKENS,
    detect_gpu_memory,
    estimate,
    instances_that_fit,
    load_model_config,
    parse_size,
    recommend_share,
    share_warning,
)

MODELS = Path(__file__).resolve().parents[1] / "fixtures" / "models"

# name, published parameter count (see each fixture's SOURCE.md), KV bytes per token worked out by hand
# from the published architecture: layers x KV heads x head dim x 2 (K and V) x 2 bytes (16-bit),
# or layers x (latent + RoPE dim) x 2 bytes for MLA, 0 for encoders.
FIXTURES = [
    ("meta-llama-3-8b", 8_030_261_248, 32 * 8 * 128 * 2 * 2),            # 131072
    ("qwen2.5-0.5b", 0.49e9, 24 * 2 * 64 * 2 * 2),                       # 12288
    ("qwen2.5-7b", 7.61e9, 28 * 4 * 128 * 2 * 2),                        # 57344
    ("mistral-7b-v0.1", 7.24e9, 32 * 8 * 128 * 2 * 2),                   # 131072
    ("mixtral-8x7b-instruct-v0.1", 46.7e9, 32 * 8 * 128 * 2 * 2),        # 131072
    ("falcon-7b-instruct", 7.0e9, 32 * 1 * 64 * 2 * 2),                  # 8192, MQA
    ("gpt_bigcode-santacoder", 1.1e9, 24 * 1 * 128 * 2 * 2),             # 12288, MQA
    ("deepseek-v2-lite", 15.7e9, 27 * (512 + 64) * 2),                   # 31104, MLA
    ("gemma-2-9b-it", 9_241_705_984, 42 * 8 * 256 * 2 * 2),              # 344064
    ("modernbert-base", 149e6, 0),
    ("deberta-v3-base", 184e6, 0),
]


def _model(name: str) -> Path:
    return MODELS / name


def _copy_model(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    target.mkdir()
    shutil.copy(_model(name) / "config.json", target / "config.json")
    return target


def test_every_fixture_cites_its_source() -> None:
    names = sorted(p.name for p in MODELS.iterdir() if p.is_dir())
    assert names == sorted(name for name, _, _ in FIXTURES)
    for name in names:
        source = (_model(name) / "SOURCE.md").read_text(encoding="utf-8")
        assert "https://" in source and "Published parameters" in source, name


@pytest.mark.parametrize(("name", "published_params", "kv_per_token"), FIXTURES, ids=[f[0] for f in FIXTURES])
def test_weights_within_5_percent_and_exact_kv(name: str, published_params: float, kv_per_token: int) -> None:
    published_bytes = published_params * 2  # every fixture is served in 16 bits
    from_architecture = estimate(config=load_model_config(_model(name)))
    from_directory = estimate(_model(name))
    assert abs(from_architecture.weight_bytes - published_bytes) / published_bytes <= 0.05
    assert abs(from_directory.weight_bytes - published_bytes) / published_bytes <= 0.05
    assert from_architecture.kv_bytes_per_token == kv_per_token
    assert from_directory.kv_bytes_per_token == kv_per_token
    assert from_directory.total_bytes == (from_directory.weight_bytes + from_directory.overhead_bytes
                                          + from_directory.kv_bytes_workload)


def test_full_workload_is_seqs_times_len_times_kv() -> None:
    mem = estimate(_model("meta-llama-3-8b"), max_num_seqs=32, max_model_len=8192)
    assert mem.kv_bytes_workload == 32 * 8192 * 131072  # 32 GiB
    assert mem.min_bytes == mem.weight_bytes + mem.overhead_bytes + 8192 * 131072


def test_default_max_model_len_comes_from_config() -> None:
    llama = estimate(_model("meta-llama-3-8b"), max_num_seqs=1)
    assert llama.kv_bytes_workload == 8192 * 131072  # max_position_embeddings 8192
    falcon = estimate(_model("falcon-7b-instruct"), max_num_seqs=1)
    assert falcon.kv_bytes_workload == 2048 * 8192  # no context length declared: vLLM's 2048
    assert any("no context length" in note for note in falcon.notes)


@pytest.mark.parametrize("name", ["falcon-7b-instruct", "gpt_bigcode-santacoder"])
def test_mqa_has_one_kv_head_even_under_tensor_parallelism(name: str) -> None:
    single = estimate(_model(name))
    split = estimate(_model(name), tensor_parallel_size=2)
    assert any(note.startswith("MQA") for note in single.notes)
    # One KV head cannot be split: every rank keeps a replica.
    assert split.kv_bytes_per_token == single.kv_bytes_per_token


def test_gqa_kv_heads_split_across_ranks_then_replicate() -> None:
    path = _model("meta-llama-3-8b")
    assert estimate(path, tensor_parallel_size=2).kv_bytes_per_token == 131072 // 2
    assert estimate(path, tensor_parallel_size=8).kv_bytes_per_token == 131072 // 8
    # 8 KV heads over 16 ranks: one replicated head per rank.
    assert estimate(path, tensor_parallel_size=16).kv_bytes_per_token == 32 * 1 * 128 * 2 * 2


def test_sliding_window_caps_kv_per_sequence() -> None:
    path = _model("mistral-7b-v0.1")
    long = estimate(path, max_num_seqs=4, max_model_len=32768)
    assert long.kv_bytes_per_token == 131072
    assert long.kv_bytes_workload == 4 * 4096 * 131072  # each sequence keeps only its 4096-token window
    # vLLM admits a request if the window plus one full prefill chunk fits.
    assert long.min_bytes == long.weight_bytes + long.overhead_bytes + (4096 + PROFILE_BATCHED_TOKENS - 1) * 131072
    assert any("sliding window 4096" in note and "all layers" in note for note in long.notes)
    short = estimate(path, max_num_seqs=4, max_model_len=2048)
    assert short.kv_bytes_workload == 4 * 2048 * 131072
    assert not any("sliding" in note for note in short.notes)


def test_interleaved_sliding_window_caps_only_local_layers() -> None:
    mem = estimate(_model("gemma-2-9b-it"), max_num_seqs=1, max_model_len=8192)
    per_layer = 8 * 256 * 2 * 2
    assert mem.kv_bytes_workload == 21 * per_layer * 8192 + 21 * per_layer * 4096
    assert any("21 of 42 layers" in note for note in mem.notes)


def test_qwen_declares_but_disables_sliding_window(tmp_path: Path) -> None:
    config = load_model_config(_model("qwen2.5-7b")) | {"sliding_window": 4096}
    mem = estimate(config=config, max_num_seqs=1, max_model_len=32768)
    assert mem.kv_bytes_workload == 32768 * 57344  # use_sliding_window: false wins


def test_mla_caches_latent_not_heads() -> None:
    mem = estimate(_model("deepseek-v2-lite"), max_num_seqs=2, max_model_len=4096)
    assert mem.kv_bytes_per_token == 31104
    assert mem.kv_bytes_workload == 2 * 4096 * 31104
    assert any(note.startswith("MLA") for note in mem.notes)
    # The latent is replicated on every tensor-parallel rank.
    assert estimate(_model("deepseek-v2-lite"), tensor_parallel_size=2).kv_bytes_per_token == 31104


@pytest.mark.parametrize("name", ["modernbert-base", "deberta-v3-base"])
def test_encoders_keep_no_kv_cache(name: str) -> None:
    mem = estimate(_model(name))
    assert mem.kv_bytes_per_token == 0
    assert 0 < mem.kv_bytes_workload < GIB  # one batch of activations, not a KV cache
    assert any("encoder" in note for note in mem.notes)
    with pytest.raises(ConfigError, match="pooling"):
        estimate(_model(name), pooling=False)


def test_pooling_detected_from_architecture_name() -> None:
    config = load_model_config(_model("qwen2.5-0.5b")) | {"architectures": ["Qwen2ForSequenceClassification"]}
    classifier = estimate(config=config)
    generator = estimate(_model("qwen2.5-0.5b"))
    assert any("pooling" in note for note in classifier.notes)
    assert not any("pooling" in note for note in generator.notes)
    # A pooling decoder samples no tokens: no fp32 logits buffer.
    assert generator.overhead_bytes - classifier.overhead_bytes == 32 * 151936 * 4


def test_tensor_parallel_halves_weights_per_gpu() -> None:
    for source in (_model("meta-llama-3-8b"), None):  # safetensors index, then architecture
        kwargs = {"config": load_model_config(_model("meta-llama-3-8b"))} if source is None else {}
        one = estimate(source, **kwargs)
        two = estimate(source, tensor_parallel_size=2, **kwargs)
        assert two.weight_bytes == -(-one.weight_bytes // 2)


def test_safetensors_index_total_size_is_preferred(tmp_path: Path) -> None:
    model = _copy_model("qwen2.5-0.5b", tmp_path)
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 123_456_789}}))
    (model / "model-00001-of-00001.safetensors").write_bytes(b"x" * 10)  # ignored: the index wins
    mem = estimate(model)
    assert mem.weight_bytes == 123_456_789
    assert any("model.safetensors.index.json" in note for note in mem.notes)


def test_safetensors_file_sizes_used_without_index(tmp_path: Path) -> None:
    model = _copy_model("qwen2.5-0.5b", tmp_path)
    for index, size in enumerate((300 * MIB, 200 * MIB)):
        with open(model / f"model-0000{index}.safetensors", "wb") as handle:
            handle.truncate(size)  # sparse file: real size, no disk use
    mem = estimate(model)
    assert mem.weight_bytes == 500 * MIB
    assert any("2 safetensors file(s)" in note for note in mem.notes)


def test_float32_checkpoint_is_served_in_16_bits(tmp_path: Path) -> None:
    model = _copy_model("modernbert-base", tmp_path)  # torch_dtype float32
    with open(model / "model.safetensors", "wb") as handle:
        handle.truncate(600 * MIB)
    assert estimate(model).weight_bytes == 300 * MIB
    assert estimate(model, dtype="float32").weight_bytes == 600 * MIB


def test_explicit_float32_doubles_weights_and_kv() -> None:
    config = load_model_config(_model("meta-llama-3-8b"))
    half = estimate(config=config)
    full = estimate(config=config, dtype="float32")
    assert full.weight_bytes == 2 * half.weight_bytes
    assert full.kv_bytes_per_token == 2 * half.kv_bytes_per_token
    with pytest.raises(ConfigError, match="dtype"):
        estimate(config=config, dtype="int3")


def test_quantized_config_without_files_uses_its_bits() -> None:
    config = load_model_config(_model("meta-llama-3-8b")) | {"quantization_config": {"bits": 4, "quant_method": "gptq"}}
    mem = estimate(config=config)
    assert mem.weight_bytes == 8_030_261_248 * 4 // 8
    assert any("4 bits" in note for note in mem.notes)


def test_multimodal_text_config_is_unwrapped() -> None:
    text = load_model_config(_model("meta-llama-3-8b"))
    wrapped = {"architectures": ["LlavaForConditionalGeneration"], "torch_dtype": "bfloat16",
               "text_config": {k: v for k, v in text.items() if k != "torch_dtype"}}
    assert estimate(config=wrapped).kv_bytes_per_token == 131072


def test_enforce_eager_drops_cuda_graph_memory() -> None:
    graphs = estimate(_model("qwen2.5-0.5b"))
    eager = estimate(_model("qwen2.5-0.5b"), enforce_eager=True)
    assert graphs.overhead_bytes - eager.overhead_bytes == CUDA_GRAPH_BYTES
    assert any("enforce-eager" in note for note in eager.notes)


def test_worked_example_150m_encoder_on_24gb_gpu() -> None:
    gpu = parse_size("24GB")  # 24 * 10**9 bytes
    mem = estimate(_model("modernbert-base"))  # 149M parameters, max_model_len 8192, 32 sequences
    assert mem.weight_bytes == 298_116_096
    assert mem.total_bytes == 3_139_757_056
    share = recommend_share(mem, gpu)
    assert share == 0.14
    assert instances_that_fit(mem, gpu) == 6  # 0.92 // 0.14
    assert share_warning(mem, gpu, share) is None
    eager = estimate(_model("modernbert-base"), enforce_eager=True)
    assert (recommend_share(eager, gpu), instances_that_fit(eager, gpu)) == (0.09, 10)


def test_recommended_share_rounds_up_and_holds_total() -> None:
    gpu = 80 * GIB
    mem = estimate(_model("meta-llama-3-8b"), max_model_len=8192, max_num_seqs=32)
    share = recommend_share(mem, gpu)
    assert share * gpu >= mem.total_bytes > (share - 0.01) * gpu
    assert instances_that_fit(mem, gpu) == int(92 // round(share * 100))
    assert instances_that_fit(mem, gpu, budget=share) == 1
    assert instances_that_fit(mem, 20 * GIB) == 0
    assert recommend_share(mem, 20 * GIB) > 1.0  # does not fit one GPU


def test_warning_when_share_cannot_hold_weights_and_one_sequence() -> None:
    gpu = parse_size("24GB")
    mem = estimate(_model("meta-llama-3-8b"), max_model_len=8192)
    warning = share_warning(mem, gpu, 0.5)
    assert warning is not None and "0.50" in warning and "one full-length sequence" in warning
    assert share_warning(mem, gpu, 0.95) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("24GB", 24 * 10**9),
    ("24G", 24 * 10**9),
    ("24gb", 24 * 10**9),
    ("80g", 80 * 10**9),
    ("24GiB", 24 * GIB),
    ("24Gi", 24 * GIB),
    ("24000MiB", 24000 * MIB),
    ("24564MiB", 24564 * MIB),
    ("1.5GiB", 3 * GIB // 2),
    (" 16 GB ", 16 * 10**9),
    ("512MB", 512 * 10**6),
    ("1TiB", 1 << 40),
    ("100B", 100),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "24", "GB", "24 parsecs", "-1GB", "0GB", "1e3GB", "24GB extra", "twenty GB"])
def test_parse_size_rejects_bad_input(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(text)
    assert info.value.field == "gpu_memory"


def test_malformed_config_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 4096,', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_model_config(tmp_path)
    path = str(tmp_path / "config.json")
    assert info.value.field == "model" and info.value.source == path
    assert path in str(info.value) and "not valid JSON" in str(info.value)
    with pytest.raises(ConfigError, match="config.json"):
        estimate(tmp_path)


def test_missing_directory_and_fields_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a local directory"):
        load_model_config(tmp_path / "absent")
    with pytest.raises(ConfigError, match="no config.json"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        estimate(tmp_path)
    assert "num_hidden_layers" in str(info.value) and info.value.source == str(tmp_path / "config.json")
    with pytest.raises(ConfigError):
        estimate()
    with pytest.raises(ConfigError, match="max_num_seqs"):
        estimate(_model("qwen2.5-0.5b"), max_num_seqs=0)


def _fake_nvidia_smi(directory: Path, body: str) -> None:
    script = directory / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body + "\n", encoding="utf-8")
    script.chmod(0o755)


@pytest.fixture
def fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + "/usr/bin" + os.pathsep + "/bin")
    return bin_dir


def test_detect_gpu_memory_reads_smallest_gpu_in_mib(fake_path: Path) -> None:
    _fake_nvidia_smi(fake_path, 'echo 24564; echo 23028')
    assert detect_gpu_memory() == 23028 * MIB


@pytest.mark.parametrize("body", ["exit 9", "echo 'NVIDIA-SMI has failed'", "echo"])
def test_detect_gpu_memory_returns_none_on_failure(fake_path: Path, body: str) -> None:
    _fake_nvidia_smi(fake_path, body)
    assert detect_gpu_memory() is None


def test_detect_gpu_memory_without_nvidia_smi(fake_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_path))  # empty directory
    assert detect_gpu_memory() is None


def test_detect_gpu_memory_times_out(fake_path: Path) -> None:
    _fake_nvidia_smi(fake_path, "exec sleep 30")  # exec: the timeout kills the sleeping process itself
    started = time.monotonic()
    assert detect_gpu_memory(timeout=0.5) is None
    assert time.monotonic() - started < 5


def test_module_constants_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "memory.md").read_text(encoding="utf-8")
    for name in ("RUNTIME_BYTES", "TP_COMM_BYTES", "CUDA_GRAPH_BYTES", "PROFILE_BATCHED_TOKENS",
                 "ACTIVATION_HIDDEN_FACTOR", "ACTIVATION_FFN_FACTOR", "DEFAULT_BUDGET"):
        assert hasattr(memory, name) and name in doc, name
