"""Shared helpers for the test suite: tool checks, free ports, process cleanup."""
