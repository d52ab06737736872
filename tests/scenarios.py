"""Named render scenarios shared by the golden, static and hardening tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Fixed binaries keep golden files identical on every machine.
BINS = ["--vfgen-bin", "/usr/local/bin/vfgen", "--vllm-bin", "/opt/vllm/bin/vllm"]

SCENARIOS: dict[str, list[str]] = {
    "single-instance": ["org/tiny-model", *BINS],
    "four-instances": ["Qwen/Qwen2.5-0.5B", "-n", "4", "--env-file", "/etc/vfgen/secrets.env", *BINS],
    "four-affinity-queue": [
        "/models/my gliner", "-n", "4", "--served-model-name", "gliner", "--enable-request-affinity",
        "--max-queue", "4", "--max-batch-size", "8", "--cuda-devices", "0,1", "--env", "HF_HUB_OFFLINE=1", *BINS,
        "--", "--trust-remote-code", "--chat-template", "/etc/vllm/tmpl; }#.jinja",
    ],
    "four-prefix": ["org/chat", "-n", "4", "--routing", "prefix", "--prefix-bytes", "512", *BINS],
    # Base model and adapter share the pool, not their caches: the key takes the request's "model".
    "lora-prefix": ["org/chat", "-n", "2", "--routing", "prefix", "--lora-module", "sql=org/sql-lora", *BINS],
    "supervisord-two-gpus": ["org/m", "-n", "4", "--cuda-devices", "0,1", "--backend", "supervisord", "--user", "nobody",
                             "--env-file", "/etc/vfgen/secrets.env", *BINS],
    "lora-two-models": ["-f", str(ROOT / "tests" / "fixtures" / "lora" / "scenario.yaml"), *BINS],
}
# Routing by model with the observability options on: JSON access log (and its UTF-8 maps), nginx exporter.
SCENARIOS["observability"] = ["-f", str(EXAMPLES / "two-llms-one-gpu.yaml"), "--access-log", "json", "--nginx-exporter", *BINS]
for example in sorted(EXAMPLES.glob("*.yaml")):
    SCENARIOS[f"example-{example.stem}"] = ["-f", str(example), *BINS]
