"""Write a tiny LoRA adapter for the tiny Llama, offline, with torch and safetensors only.

    VENV/bin/python -m tests.harness.tiny_lora BASE_MODEL_DIR OUT_DIR [SEED]

A PEFT-format directory: adapter_config.json (peft_type LORA, r=8, lora_alpha 16,
target_modules q_proj and v_proj) and adapter_model.safetensors with
`base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.weight`, shapes
(r, in) and (out, r). PEFT starts B at zero, which would change nothing; here A
and B are random and large next to the base weights (initializer_range 0.02), so
at temperature 0 the adapter's output differs from the base model's. safetensors
writes 0600 files; they are made world-readable, as a service user must read them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "v_proj")
SCALE = 0.3


def build(base: Path, out: Path, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    widths = {"q_proj": heads * head_dim, "v_proj": config.get("num_key_value_heads", heads) * head_dim}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, hidden, generator=generator) * SCALE
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(widths[module], RANK, generator=generator) * SCALE
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base),
    }, indent=2) + "\n")
    for path in out.iterdir():
        path.chmod(0o644)
    out.chmod(0o755)
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m tests.harness.tiny_lora BASE_MODEL_DIR OUT_DIR [SEED]", file=sys.stderr)
        return 2
    print(build(Path(argv[0]), Path(argv[1]), int(argv[2]) if len(argv) == 3 else 0))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
