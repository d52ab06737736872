"""Shared state of the security tier: the fuzz example counter, printed in the terminal summary."""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

# Failing-example patches go to a temp dir, not into the repository.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "vfgen-hypothesis"))

FUZZ = {"examples": Counter(), "accepted": Counter(), "seconds": Counter()}


@pytest.fixture
def fuzz_counter(request: pytest.FixtureRequest):
    """Count examples per test (accepted = rendered and parsed) and time the test."""
    name = request.node.name
    started = time.monotonic()

    def count(accepted: bool) -> None:
        FUZZ["examples"][name] += 1
        FUZZ["accepted"][name] += accepted

    yield count
    FUZZ["seconds"][name] += time.monotonic() - started


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    examples = FUZZ["examples"]
    if not examples:
        return
    write = terminalreporter.write_line
    write("")
    write("security fuzz: examples per field (accepted = rendered and re-parsed, the rest rejected with ConfigError)")
    for name in sorted(examples):
        write(f"  {name:70} {examples[name]:6} ({FUZZ['accepted'][name]} accepted) {FUZZ['seconds'][name]:6.1f}s")
    total = sum(examples.values())
    write(f"  total: {total} examples, {sum(FUZZ['accepted'].values())} accepted, {sum(FUZZ['seconds'].values()):.1f}s")
