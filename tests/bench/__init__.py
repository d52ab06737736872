"""Smoke test of the benchmark command (bench/)."""
