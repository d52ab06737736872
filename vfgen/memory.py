"""Per-instance GPU memory of a vLLM model, computed from its local config.json and safetensors sizes.

Pure functions only: nothing here downloads, prints or parses command lines. `estimate`
answers "how many bytes does one `vllm serve` instance of this model need on each GPU?",
`recommend_share` turns that into a `--gpu-memory-utilization` value and
`instances_that_fit` into an instance count. docs/memory.md explains every formula.

Units: sizes typed by users follow SI/IEC strictly. "GB"/"G" is 10**9 bytes, "GiB"/"Gi"
is 2**30 bytes, "MiB" is 2**20 bytes. nvidia-smi reports MiB, which is used exactly.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfgen.errors import ConfigError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

# --- Runtime constants -----------------------------------------------------------------
# Memory a vLLM process uses outside weights, KV cache and activations: the CUDA context,
# cuBLAS workspaces and other allocations made outside PyTorch's caching allocator.
# vLLM logged "non_torch_memory 1.79GiB" for Meta-Llama-3-8B on an H100 at TP=1
# (vllm-project/vllm PR #10511) and 0.16-0.20 GiB in later versions (PRs #12126,
# #14447); the CUDA context itself (~0.3-0.5 GiB) comes on top. 1.5 GiB covers both.
RUNTIME_BYTES = 3 * GIB // 2
# Extra non-torch memory per GPU once tensor parallelism starts NCCL: the same vLLM log
# went from 1.79 GiB (TP=1) to 3.58 GiB (TP=2), i.e. +1.79 GiB. Rounded up.
TP_COMM_BYTES = 2 * GIB
# CUDA graph pool. vLLM V0 warned "CUDA graphs can take additional 1~3 GiB memory per
# GPU"; V1 piecewise graphs were estimated at 0.36 GiB (gpustack/runner PR #251 log).
# 1 GiB is the low end of the V0 warning and ~3x the V1 figure. --enforce-eager captures
# no graphs, so estimate(enforce_eager=True) drops this term.
CUDA_GRAPH_BYTES = 1 * GIB
# vLLM profiles peak activation memory with one forward pass of max_num_batched_tokens
# tokens. 8192 is vLLM V1's default for the OpenAI server on large GPUs (2048 on small
# ones), so using it errs on the safe side.
PROFILE_BATCHED_TOKENS = 8192
# Peak activation bytes per token = (8 * hidden + 3 * ffn_width) * dtype bytes: the
# residual stream, norms and q/k/v/o buffers are a few multiples of hidden; the MLP's
# gate/up output and activation are ~3x its width. Calibrated against vLLM's own
# profile of Meta-Llama-3-8B at 8192 tokens: "PyTorch activation peak memory 1.26GiB"
# (PR #10511); this formula gives 1.28 GiB for that case.
ACTIVATION_HIDDEN_FACTOR = 8
ACTIVATION_FFN_FACTOR = 3
# The sampler materialises fp32 logits for every running sequence.
LOGITS_BYTES = 4
# vLLM's default when a config declares no context length (its _get_and_verify_max_len).
DEFAULT_MAX_MODEL_LEN = 2048
# Share of a GPU that all instances together may claim; the rest is headroom for the
# driver and per-process CUDA contexts. 0.92 is vLLM's own default for one instance.
# config.py takes its default budget from here.
DEFAULT_BUDGET = 0.92
NVIDIA_SMI_TIMEOUT = 5.0

# --kv-cache-dtype values other than auto, by bytes per element (the same list as vfgen.config).
KV_CACHE_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1,
                        "fp8_inc": 1, "fp8_ds_mla": 1}
DTYPE_BYTES = {
    "float16": 2, "half": 2,
    "bfloat16": 2,
    "float32": 4, "float": 4,
}
# Architectures vLLM can only serve as pooling models (embeddings, scores, classes).
ENCODER_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "deberta", "deberta-v2", "modernbert", "distilbert",
    "electra", "albert", "mpnet", "camembert", "nomic_bert", "new", "ernie", "jina_bert",
})
POOLING_ARCH_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification",
                         "ForRewardModel", "EmbeddingModel", "ForEmbedding")
# MLPs with one up projection (the rest are gated: gate + up + down).
NON_GATED_MODEL_TYPES = frozenset({
    "gpt_bigcode", "gpt2", "falcon", "RefinedWebModel", "RefinedWeb", "gpt_neox", "opt",
    "bloom", "mpt", "gptj", "phi", "starcoder2", "bert", "roberta", "xlm-roberta",
    "deberta", "deberta-v2", "distilbert", "electra", "albert", "mpnet", "camembert",
})
# Keys under which multimodal configs nest their language model.
TEXT_CONFIG_KEYS = ("text_config", "llm_config", "language_config")
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len",
                       "seq_length", "max_sequence_length", "model_max_length")

_SIZE_UNITS = {
    "b": 1,
    "k": 10**3, "kb": 10**3, "ki": KIB, "kib": KIB,
    "m": 10**6, "mb": 10**6, "mi": MIB, "mib": MIB,
    "g": 10**9, "gb": 10**9, "gi": GIB, "gib": GIB,
    "t": 10**12, "tb": 10**12, "ti": 1 << 40, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class ModelMemory:
    """Memory one vLLM instance needs on each of its GPUs (sharded terms divided by TP)."""

    weight_bytes: int
    kv_bytes_per_token: int    # 0 for encoder-only (pooling) models
    kv_bytes_per_sequence: int  # KV of one sequence of max_model_len tokens (sliding windows applied)
    max_model_len: int         # the context length the estimate used
    kv_bytes_workload: int     # KV for max_num_seqs x max_model_len; activations for encoders
    overhead_bytes: int        # runtime + CUDA graphs (+ decoder activations and logits)
    total_bytes: int           # weights + overhead + workload
    min_bytes: int             # weights + overhead + one full-length sequence
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Arch:
    """The numbers of config.json that memory depends on, with aliases resolved."""

    model_type: str
    architectures: tuple[str, ...]
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    tied_embeddings: bool
    gated_mlp: bool
    encoder: bool


def parse_size(text: str) -> int:
    """Parse "24GB", "24G", "24GiB", "80g", "24000MiB" into bytes (GB = 10**9, GiB = 2**30)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError("gpu_memory", text, "expected a number and a unit, e.g. 24GB, 24GiB or 24000MiB")
    number, unit = match.groups()
    if not unit:
        raise ConfigError("gpu_memory", text, "add a unit: GB (10^9 bytes), GiB (2^30 bytes) or MiB (2^20 bytes)")
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ConfigError("gpu_memory", text, f"unknown unit {unit!r}; use B, KB, KiB, MB, MiB, GB, GiB, TB or TiB")
    size = round(float(number) * factor)
    if size <= 0:
        raise ConfigError("gpu_memory", text, "must be greater than zero")
    return size


def size_reading(text: str) -> str | None:
    """For a size in decimal units (GB, MB...): which reading was understood, and the binary spelling."""
    match = _SIZE_RE.match(str(text))
    if not match or _SIZE_UNITS.get(match.group(2).lower()) not in (10**3, 10**6, 10**9, 10**12):
        return None
    size = parse_size(text)
    return (f"{text.strip()!r} is read as {size:,} bytes ({format_bytes(size)}: GB means 10^9 bytes); a card that "
            f"nvidia-smi shows as {round(float(match.group(1)) * 1024)} MiB has {match.group(1)} GiB: "
            f"write {match.group(1)}GiB for that")


def format_bytes(size: int) -> str:
    """Render a byte count in GiB with two decimals, the unit nvidia-smi users compare against."""
    return f"{size / GIB:.2f} GiB"


def detect_gpu_memory(timeout: float = NVIDIA_SMI_TIMEOUT) -> int | None:
    """Memory of the smallest local GPU from nvidia-smi, in bytes; None when unknown. Never raises."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        result = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    mib_values = [int(line) for line in (s.strip() for s in result.stdout.splitlines()) if line.isdigit()]
    # Every GPU must hold its instances, so the smallest one decides.
    return min(mib_values) * MIB if mib_values else None


def load_model_config(model_dir: str | Path) -> dict:
    """Read <model_dir>/config.json; ConfigError(field="model") says why it is unusable."""
    directory = Path(model_dir)
    path = directory / "config.json"
    if not directory.is_dir():
        raise ConfigError("model", str(model_dir), "not a local directory (vfgen never downloads models)")
    if not path.is_file():
        raise ConfigError("model", str(model_dir), "no config.json in this directory (vfgen never downloads models)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError("model", str(path), f"config.json is not valid JSON: {exc.msg} at line {exc.lineno} "
                          f"column {exc.colno}", source=str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("model", str(path), f"cannot read config.json: {exc}", source=str(path)) from exc
    if not isinstance(data, dict):
        raise ConfigError("model", str(path), "config.json must hold a JSON object", source=str(path))
    return data


def estimate(
    model_dir: str | Path | None = None,
    *,
    config: dict | None = None,
    dtype: str = "auto",
    max_num_seqs: int = 32,
    max_model_len: int | None = None,
    tensor_parallel_size: int = 1,
    enforce_eager: bool = False,
    pooling: bool | None = None,
    quantization: str | None = None,
    kv_cache_dtype: str | None = None,
) -> ModelMemory:
    """Estimate the per-GPU memory of one vLLM instance from config.json (and safetensors sizes)."""
    if config is None and model_dir is None:
        raise ConfigError("model", None, "give a local model directory or a parsed config.json")
    source = str(Path(model_dir) / "config.json") if model_dir is not None else None
    raw = config if config is not None else load_model_config(model_dir)
    cfg = _text_config(raw)
    for field_name, value in (("max_num_seqs", max_num_seqs), ("tensor_parallel_size", tensor_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(field_name, value, "must be a positive integer")
    arch = _architecture(cfg, source)
    notes: list[str] = []

    act_bytes = _serving_dtype_bytes(cfg, dtype)
    context = _context_length(cfg)
    if max_model_len is None:
        max_model_len = context
        if not any(isinstance(cfg.get(k), int) for k in CONTEXT_LENGTH_KEYS):
            notes.append(f"config.json declares no context length; assuming vLLM's default {context}")
    elif not isinstance(max_model_len, int) or max_model_len < 1:
        raise ConfigError("max_model_len", max_model_len, "must be a positive integer")

    is_pooling = (arch.encoder or _pooling_architecture(arch)) if pooling is None else pooling
    if arch.encoder and not is_pooling:
        raise ConfigError("model", arch.model_type, "an encoder-only model can only be served as a pooling model",
                          source=source)

    weight_bytes = _weight_bytes(model_dir, cfg, arch, act_bytes, notes)
    weight_bytes = _quantized_weight_bytes(weight_bytes, cfg, act_bytes, quantization, notes)
    weight_bytes = -(-weight_bytes // tensor_parallel_size)
    kv_bytes = act_bytes
    if kv_cache_dtype not in (None, "auto"):
        kv_bytes = KV_CACHE_DTYPE_BYTES.get(kv_cache_dtype, 0)
        if not kv_bytes:
            raise ConfigError("kv_cache_dtype", kv_cache_dtype, f"use one of {', '.join(sorted(KV_CACHE_DTYPE_BYTES))}")
        notes.append(f"--kv-cache-dtype {kv_cache_dtype}: {kv_bytes}-byte KV cache")

    overhead = RUNTIME_BYTES + (TP_COMM_BYTES if tensor_parallel_size > 1 else 0)
    if enforce_eager:
        notes.append("--enforce-eager: no CUDA graph memory")
    else:
        overhead += CUDA_GRAPH_BYTES
    per_token_activation = (ACTIVATION_HIDDEN_FACTOR * arch.hidden
                            + ACTIVATION_FFN_FACTOR * _ffn_width(cfg, arch)) * act_bytes

    if arch.encoder:
        # No KV cache: the memory that grows with the workload is one batch of activations.
        kv_per_token = 0
        kv_sequence = 0
        batch_tokens = min(max_num_seqs * max_model_len, max(PROFILE_BATCHED_TOKENS, max_model_len))
        workload = batch_tokens * per_token_activation // tensor_parallel_size
        one_sequence = max_model_len * per_token_activation // tensor_parallel_size
        notes.append("encoder (pooling): no KV cache; workload is activations for one batch")
    else:
        layer_kv = _kv_bytes_per_layer(cfg, arch, kv_bytes, tensor_parallel_size, notes)
        kv_per_token = sum(layer_kv)
        windows = _sliding_windows(cfg, arch.layers)
        steady = kv_sequence = _sequence_kv(layer_kv, windows, max_model_len, extra=0)
        workload = max_num_seqs * steady
        # vLLM admits a request only if its KV fits, counting a full prefill chunk past the window.
        one_sequence = _sequence_kv(layer_kv, windows, max_model_len, extra=PROFILE_BATCHED_TOKENS - 1)
        window = next((w for w in windows if w), None)
        if window and window < max_model_len:
            sliding = sum(1 for w in windows if w)
            scope = "all layers" if sliding == arch.layers else f"{sliding} of {arch.layers} layers"
            notes.append(f"sliding window {window} caps KV per sequence ({scope})")
        if is_pooling:
            notes.append("pooling on a decoder: KV is held only while a prompt is processed")
        activation = PROFILE_BATCHED_TOKENS * per_token_activation // tensor_parallel_size
        logits = 0 if is_pooling else max_num_seqs * arch.vocab * LOGITS_BYTES
        overhead += activation + logits

    return ModelMemory(
        weight_bytes=weight_bytes,
        kv_bytes_per_token=kv_per_token,
        kv_bytes_per_sequence=kv_sequence,
        max_model_len=max_model_len,
        kv_bytes_workload=workload,
        overhead_bytes=overhead,
        total_bytes=weight_bytes + overhead + workload,
        min_bytes=weight_bytes + overhead + one_sequence,
        notes=tuple(notes),
    )


def recommend_share(mem: ModelMemory, gpu_bytes: int) -> float:
    """Smallest --gpu-memory-utilization (rounded up to 0.01) that holds total_bytes; > 1.0 means it cannot."""
    return _hundredths(mem.total_bytes, gpu_bytes) / 100


def instances_that_fit(mem: ModelMemory, gpu_bytes: int, budget: float = DEFAULT_BUDGET) -> int:
    """How many instances, each given recommend_share(), fit in `budget` of one GPU."""
    share = _hundredths(mem.total_bytes, gpu_bytes)
    return int(round(budget * 100)) // share


def share_warning(mem: ModelMemory, gpu_bytes: int, share: float, given: frozenset[str] = frozenset()) -> str | None:
    """A warning when `share` of the GPU cannot hold the weights plus one full-length sequence.

    `given`: the vLLM flags the user already set (--max-model-len, --kv-cache-dtype), which the
    advice then names as "shorter"/already used instead of offering them as new.
    """
    granted = int(share * gpu_bytes)
    if granted >= mem.min_bytes:
        return None
    advice = [f"Use at least {_hundredths(mem.min_bytes, gpu_bytes) / 100:.2f}", "fewer instances"]
    if "--max-model-len" in given:
        advice.append(f"a --max-model-len below {mem.max_model_len}")
    else:
        advice.append(f"--max-model-len below the model's {mem.max_model_len}")
    if "--kv-cache-dtype" not in given and mem.kv_bytes_per_token:
        advice.append("--kv-cache-dtype fp8")
    return (f"--gpu-memory-utilization {share:.2f} gives {format_bytes(granted)}, but weights, runtime and one "
            f"full-length sequence ({mem.max_model_len} tokens) need {format_bytes(mem.min_bytes)}; vLLM will refuse to start. "
            f"{', '.join(advice[:-1])} or {advice[-1]}.")


def _hundredths(need: int, gpu_bytes: int) -> int:
    if gpu_bytes <= 0:
        raise ConfigError("gpu_memory", gpu_bytes, "must be greater than zero")
    return max(1, -(-need * 100 // gpu_bytes))


def _text_config(cfg: dict) -> dict:
    """The language-model part of a (possibly multimodal) config, inheriting the top-level dtype."""
    if "num_hidden_layers" in cfg or "n_layer" in cfg:
        return cfg
    for key in TEXT_CONFIG_KEYS:
        nested = cfg.get(key)
        if isinstance(nested, dict):
            merged = dict(nested)
            for inherited in ("torch_dtype", "dtype", "quantization_config", "architectures"):
                if inherited in cfg and inherited not in merged:
                    merged[inherited] = cfg[inherited]
            return merged
    return cfg


def _first(cfg: dict, *names: str) -> Any:
    return next((cfg[n] for n in names if cfg.get(n) is not None), None)


def _architecture(cfg: dict, source: str | None) -> _Arch:
    model_type = str(cfg.get("model_type", ""))
    architectures = tuple(str(a) for a in cfg.get("architectures") or ())
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", "dim")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers")
    heads = _first(cfg, "num_attention_heads", "n_head", "n_heads", "num_heads")
    vocab = _first(cfg, "vocab_size", "padded_vocab_size")
    for name, value in (("hidden_size", hidden), ("num_hidden_layers", layers),
                        ("num_attention_heads", heads), ("vocab_size", vocab)):
        if not isinstance(value, int) or value < 1:
            raise ConfigError("model", value, f"config.json has no usable {name}; vfgen cannot size this model",
                              source=source)
    head_dim = cfg.get("head_dim") if isinstance(cfg.get("head_dim"), int) else hidden // heads
    intermediate = _first(cfg, "intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim") or 4 * hidden
    encoder = model_type in ENCODER_MODEL_TYPES or any(
        a.startswith(("Bert", "Roberta", "XLMRoberta", "ModernBert", "DebertaV2", "Deberta")) for a in architectures)
    return _Arch(
        model_type=model_type,
        architectures=architectures,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=_kv_heads(cfg, model_type, heads),
        head_dim=head_dim,
        vocab=vocab,
        intermediate=intermediate,
        tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),  # transformers' default
        gated_mlp=model_type not in NON_GATED_MODEL_TYPES,
        encoder=encoder,
    )


def _kv_heads(cfg: dict, model_type: str, heads: int) -> int:
    if model_type in ("falcon", "RefinedWebModel", "RefinedWeb"):
        # Falcon: multi_query means one KV head unless the new decoder architecture is used.
        if cfg.get("new_decoder_architecture"):
            return int(_first(cfg, "num_kv_heads", "n_head_kv") or heads)
        return 1 if cfg.get("multi_query", True) else heads
    explicit = _first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num")
    if explicit:
        return int(explicit)
    return 1 if cfg.get("multi_query") else heads


def _pooling_architecture(arch: _Arch) -> bool:
    return any(a.endswith(POOLING_ARCH_SUFFIXES) for a in arch.architectures)


def _uses_mla(cfg: dict) -> bool:
    return isinstance(cfg.get("kv_lora_rank"), int) and cfg["kv_lora_rank"] > 0 and cfg.get("use_mla", True)


def _kv_bytes_per_layer(cfg: dict, arch: _Arch, dtype_bytes: int, tp: int, notes: list[str]) -> list[int]:
    if _uses_mla(cfg):
        # MLA caches one compressed latent plus the shared RoPE key per token, replicated on every TP rank.
        latent = cfg["kv_lora_rank"] + int(cfg.get("qk_rope_head_dim") or 0)
        notes.append(f"MLA: caches a {latent}-wide latent per layer instead of per-head K and V")
        return [latent * dtype_bytes] * arch.layers
    # vLLM splits KV heads across TP ranks and replicates them when there are fewer heads than ranks.
    kv_heads_per_gpu = max(1, arch.kv_heads // tp)
    if arch.kv_heads == 1:
        notes.append("MQA: one KV head shared by all query heads")
    elif arch.kv_heads < arch.heads:
        notes.append(f"GQA: {arch.kv_heads} KV heads for {arch.heads} query heads")
    return [2 * kv_heads_per_gpu * arch.head_dim * dtype_bytes] * arch.layers


def _sliding_windows(cfg: dict, layers: int) -> list[int]:
    """Per layer: the attention window in tokens, or 0 for full attention."""
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or window <= 0:
        return [0] * layers
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == layers:
        return [window if "sliding" in str(t) else 0 for t in layer_types]
    if cfg.get("model_type") == "gemma2":
        return [window if i % 2 == 0 else 0 for i in range(layers)]  # even layers are local
    pattern = cfg.get("sliding_window_pattern")
    if isinstance(pattern, int) and pattern > 0:
        return [0 if (i + 1) % pattern == 0 else window for i in range(layers)]
    if cfg.get("use_sliding_window") is False:
        return [0] * layers
    if cfg.get("use_sliding_window") is True and isinstance(cfg.get("max_window_layers"), int):
        return [window if i >= cfg["max_window_layers"] else 0 for i in range(layers)]
    return [window] * layers


def _sequence_kv(layer_kv: list[int], windows: list[int], length: int, extra: int) -> int:
    return sum(kv * (min(length, w + extra) if w else length) for kv, w in zip(layer_kv, windows))


def _context_length(cfg: dict) -> int:
    # vLLM takes the smallest context length the config declares.
    declared = [cfg[k] for k in CONTEXT_LENGTH_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
    return min(declared) if declared else DEFAULT_MAX_MODEL_LEN


def declared_max_model_len(model_dir: str | Path) -> int | None:
    """The max_model_len vLLM derives from a local config.json when no --max-model-len is given,
    or None when vfgen cannot be sure (rope scaling stretches it by rules vfgen does not copy)."""
    cfg = _text_config(load_model_config(model_dir))
    if cfg.get("rope_scaling"):
        return None
    declared = [cfg[k] for k in CONTEXT_LENGTH_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
    return min(declared) if declared else None


def _checkpoint_dtype(cfg: dict) -> str:
    # transformers writes "torch_dtype" (newer versions "dtype"); absent means float32.
    return str(_first(cfg, "torch_dtype", "dtype") or "float32").removeprefix("torch.")


def _serving_dtype_bytes(cfg: dict, dtype: str) -> int:
    if dtype == "auto":
        # vLLM's --dtype auto keeps 16-bit checkpoints and serves float32 ones in 16 bits.
        return min(DTYPE_BYTES.get(_checkpoint_dtype(cfg), 2), 2)
    if dtype not in DTYPE_BYTES:
        raise ConfigError("dtype", dtype, f"use auto or one of {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[dtype]


def _weight_bytes(model_dir: str | Path | None, cfg: dict, arch: _Arch, dtype_bytes: int,
                  notes: list[str]) -> int:
    quant = cfg.get("quantization_config")
    stored = _safetensors_bytes(Path(model_dir), notes) if model_dir is not None else None
    if stored is not None:
        checkpoint_bytes = DTYPE_BYTES.get(_checkpoint_dtype(cfg))
        if quant or checkpoint_bytes is None or checkpoint_bytes == dtype_bytes:
            return stored
        notes.append(f"checkpoint is {_checkpoint_dtype(cfg)}; scaled to {dtype_bytes}-byte weights")
        return stored * dtype_bytes // checkpoint_bytes
    params = _parameter_count(cfg, arch)
    if isinstance(quant, dict):
        bits = quant.get("bits") or quant.get("w_bit") or (8 if "fp8" in str(quant.get("quant_method")) else None)
        if isinstance(bits, int) and 0 < bits < 16:
            notes.append(f"weights from the architecture at {bits} bits (quantized; scales not counted)")
            return params * bits // 8
    notes.append(f"weights from the architecture: {params / 1e9:.3f}B parameters x {dtype_bytes} bytes")
    return params * dtype_bytes


# --quantization methods that quantize an unquantized checkpoint while loading, by bits per weight.
ONLINE_QUANTIZATION_BITS = {"fp8": 8, "fbgemm_fp8": 8, "ptpc_fp8": 8, "bitsandbytes": 4}


def _quantized_weight_bytes(stored: int, cfg: dict, dtype_bytes: int, quantization: str | None, notes: list[str]) -> int:
    """Weights under --quantization: a quantized checkpoint is already counted as stored."""
    if quantization is None or cfg.get("quantization_config"):
        return stored
    bits = ONLINE_QUANTIZATION_BITS.get(quantization)
    if bits is None:
        raise ConfigError("--quantization", quantization,
                          "this method needs a quantized checkpoint (config.json has no quantization_config), so vfgen "
                          f"cannot size it; online quantization it can size: {', '.join(ONLINE_QUANTIZATION_BITS)}")
    notes.append(f"--quantization {quantization}: weights quantized to {bits} bits while loading")
    return stored * bits // (8 * dtype_bytes)


def _safetensors_bytes(directory: Path, notes: list[str]) -> int | None:
    """Checkpoint size from model.safetensors.index.json, else the sum of *.safetensors files."""
    for index in sorted(directory.glob("*.safetensors.index.json")):
        try:
            total = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(total, int) and total > 0:
            notes.append(f"weights from {index.name} total_size")
            return total
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    notes.append(f"weights from the sizes of {len(files)} safetensors file(s)")
    return sum(f.stat().st_size for f in files)


def _ffn_width(cfg: dict, arch: _Arch) -> int:
    """Width of the MLP a token passes through: routed experts' combined width for MoE."""
    experts = _expert_count(cfg)
    if experts:
        per_token = int(_first(cfg, "num_experts_per_tok", "num_experts_per_token", "moe_topk") or 1)
        moe_width = int(_first(cfg, "moe_intermediate_size") or arch.intermediate)
        shared = (int(cfg.get("n_shared_experts") or 0) * moe_width
                  + int(cfg.get("shared_expert_intermediate_size") or 0))
        return max(arch.intermediate if _first_dense_layers(cfg) else 0, per_token * moe_width + shared)
    return arch.intermediate


def _expert_count(cfg: dict) -> int:
    return int(_first(cfg, "num_local_experts", "n_routed_experts", "num_experts", "moe_num_experts") or 0)


def _first_dense_layers(cfg: dict) -> int:
    return int(cfg.get("first_k_dense_replace") or 0)


def _is_moe_layer(cfg: dict, index: int) -> bool:
    if index < _first_dense_layers(cfg):
        return False
    if index in (cfg.get("mlp_only_layers") or ()):
        return False
    step = int(_first(cfg, "moe_layer_freq", "decoder_sparse_step") or 1)
    return index % step == 0 if step > 1 else True


def _parameter_count(cfg: dict, arch: _Arch) -> int:
    """Parameters vLLM loads for this architecture (embeddings, layers, head)."""
    h = arch.hidden
    params = arch.vocab * h
    params += _position_and_type_embeddings(cfg, arch)
    attention = _attention_parameters(cfg, arch)
    experts = _expert_count(cfg)
    for index in range(arch.layers):
        params += attention + 2 * h  # two norms per layer
        if experts and _is_moe_layer(cfg, index):
            params += _moe_parameters(cfg, arch, experts)
        else:
            params += (3 if arch.gated_mlp else 2) * h * arch.intermediate
            if arch.encoder or arch.model_type == "gpt_bigcode":
                params += arch.intermediate + h  # MLP biases
    params += h  # final norm
    if arch.encoder:
        params += _encoder_extras(cfg, arch)
    elif not arch.tied_embeddings:
        params += arch.vocab * h  # separate lm_head
    return params


def _attention_parameters(cfg: dict, arch: _Arch) -> int:
    h = arch.hidden
    if _uses_mla(cfg):
        heads = arch.heads
        rope = int(cfg.get("qk_rope_head_dim") or 0)
        nope = int(cfg.get("qk_nope_head_dim") or 0)
        v_dim = int(cfg.get("v_head_dim") or arch.head_dim)
        latent = cfg["kv_lora_rank"]
        q_rank = cfg.get("q_lora_rank")
        q = (h * q_rank + q_rank + q_rank * heads * (nope + rope)) if q_rank else h * heads * (nope + rope)
        kv = h * (latent + rope) + latent + latent * heads * (nope + v_dim)
        return q + kv + heads * v_dim * h
    q_dim = arch.heads * arch.head_dim
    kv_dim = arch.kv_heads * arch.head_dim
    params = 2 * h * q_dim + 2 * h * kv_dim
    has_bias = (arch.encoder and arch.model_type != "modernbert") or arch.model_type in ("qwen2", "gpt_bigcode") \
        or bool(cfg.get("attention_bias") or cfg.get("qkv_bias") or cfg.get("bias"))
    if has_bias:
        params += q_dim + 2 * kv_dim + h
    return params


def _moe_parameters(cfg: dict, arch: _Arch, experts: int) -> int:
    h = arch.hidden
    width = int(_first(cfg, "moe_intermediate_size") or arch.intermediate)
    params = experts * 3 * h * width + h * experts  # experts + router
    params += int(cfg.get("n_shared_experts") or 0) * 3 * h * width
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    if shared:
        params += 3 * h * shared + h  # shared expert and its gate
    return params


def _position_and_type_embeddings(cfg: dict, arch: _Arch) -> int:
    h = arch.hidden
    if arch.model_type in ("gpt_bigcode", "gpt2"):
        return int(cfg.get("n_positions") or 0) * h
    if not arch.encoder or arch.model_type == "modernbert":
        return 0  # rotary positions
    params = int(cfg.get("type_vocab_size") or 0) * h
    if cfg.get("position_biased_input", True):
        params += int(cfg.get("max_position_embeddings") or 0) * h
    return params


def _encoder_extras(cfg: dict, arch: _Arch) -> int:
    h = arch.hidden
    params = 2 * h  # embedding norm
    if cfg.get("relative_attention"):
        # DeBERTa's shared relative-position embeddings.
        buckets = int(cfg.get("position_buckets") or 0)
        span = buckets if buckets > 0 else int(cfg.get("max_relative_positions") or 0)
        if span < 1:
            span = int(cfg.get("max_position_embeddings") or 0)
        params += 2 * span * h + 2 * h
    if arch.model_type in ("bert", "roberta", "xlm-roberta", "camembert"):
        params += h * h + h  # pooler
    return params



# --- LoRA ------------------------------------------------------------------------------
# vLLM allocates LoRA memory when it loads the model, whatever adapters it then serves:
# every LoRA-capable layer gets `max_loras` slots of rank `max_lora_rank`
# (vllm/lora/layers: lora_a_stacked [max_loras, rank, in] and lora_b_stacked
# [max_loras, out, rank] per linear slice; [max_loras, vocab, rank] and
# [max_loras, hidden, rank] for the input embeddings), in the model's dtype.
# The punica kernels add fp32 buffers of [batched tokens, rank] per slice at run time.
LORA_BUFFER_BYTES = 4
LORA_BUFFER_SLICES = 3  # q/k/v: the widest packed layer's slices


def _small_bytes(size: int) -> str:
    """KiB or MiB below 1 GiB: adapters and their slots are often a few MiB, or less."""
    if size < MIB:
        return f"{size / KIB:.1f} KiB"
    return f"{size / MIB:.1f} MiB" if size < GIB else format_bytes(size)


def lora_bytes(model_dir: str | Path | None = None, *, config: dict | None = None, dtype: str = "auto",
               max_lora_rank: int = 16, max_loras: int = 1, tensor_parallel_size: int = 1,
               adapter_bytes: tuple[int, ...] = ()) -> tuple[int, tuple[str, ...]]:
    """Per-GPU bytes vLLM reserves for LoRA (adapter slots + kernel buffers), with a note saying how."""
    source = str(Path(model_dir) / "config.json") if model_dir is not None else None
    cfg = _text_config(config if config is not None else load_model_config(model_dir))
    arch = _architecture(cfg, source)
    dtype_bytes = _serving_dtype_bytes(cfg, dtype)
    h, q_dim, kv_dim = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    ffn = _ffn_width(cfg, arch)
    # (input, output) width of every linear slice of one decoder layer.
    slices = [(h, q_dim), (h, kv_dim), (h, kv_dim), (q_dim, h)]
    slices += [(h, ffn), (h, ffn), (ffn, h)] if arch.gated_mlp else [(h, ffn), (ffn, h)]
    per_slot = sum(i + o for i, o in slices) * arch.layers + arch.vocab + h
    slots = max_loras * max_lora_rank * per_slot * dtype_bytes // tensor_parallel_size
    buffers = PROFILE_BATCHED_TOKENS * max_lora_rank * LORA_BUFFER_BYTES * LORA_BUFFER_SLICES
    note = (f"LoRA: {_small_bytes(slots)} for {max_loras} adapter slot(s) (max_loras) of rank {max_lora_rank} "
            f"(max_lora_rank) on every attention/MLP layer and the embeddings, which vLLM allocates at start, "
            f"+ {_small_bytes(buffers)} kernel buffers")
    if adapter_bytes:
        note += f"; the largest adapter's weight files are {_small_bytes(max(adapter_bytes))} (they fill one slot)"
    return slots + buffers, (note,)
