"""Test helpers that users may run too (the stand-in vLLM server)."""
