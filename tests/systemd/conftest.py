"""Fixtures for the systemd tier: the cached rootfs and a booted container per test."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.nspawn import Container, booted_container, ensure_rootfs, service_binds


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Lets the container fixture know whether the test failed.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"vfgen_report_{report.when}", report)


@pytest.fixture(scope="session")
def rootfs() -> Path:
    """The bookworm rootfs, built on first use (about a minute) and cached."""
    return ensure_rootfs()


@pytest.fixture
def container(rootfs: Path, request: pytest.FixtureRequest) -> Iterator[Container]:
    """A freshly booted container with this Python environment and the repo bound read-only.

    When the test fails, the container's journal is printed before teardown.
    """
    with booted_container(binds=service_binds(), rootfs=rootfs) as booted:
        yield booted
        report = getattr(request.node, "vfgen_report_call", None)
        if report is not None and report.failed:
            print(f"--- journal of {booted.name} ---\n{booted.journal(lines=300)}")
