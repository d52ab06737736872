"""Fixtures shared by every tier of the suite."""

from __future__ import annotations

import pytest

from tests.harness.procs import ProcessGroup


@pytest.fixture
def procs():
    """Start processes with procs.start(argv); all are killed at teardown, pass or fail."""
    group = ProcessGroup()
    try:
        yield group
    finally:
        group.stop_all()
