"""Fixtures for the Ansible tier: the tools, the cached rootfs and the offline wheelhouse the containers install from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.ansible.harness import REPO_ROOT, Tools, build_wheelhouse, require_ansible_tier
from tests.harness.nspawn import ensure_rootfs

TESTINFRA_TIMEOUT = 300.0


@pytest.fixture(scope="session")
def ansible_rootfs() -> Path:
    return ensure_rootfs()


@pytest.fixture(scope="session")
def tools(ansible_rootfs: Path) -> Tools:
    return require_ansible_tier(ansible_rootfs)


@pytest.fixture(scope="session")
def wheelhouse(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheelhouse(tmp_path_factory.mktemp("wheelhouse"))


def run_testinfra(pids: list[int], timeout: float = TESTINFRA_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """The user-facing suite tests/infra, unchanged, against containers through the nsenter:// backend."""
    hosts = ",".join(f"nsenter://{pid}" for pid in pids)
    argv = [sys.executable, "-m", "pytest", "-p", "tests.ansible.testinfra_nsenter", "-p", "no:cacheprovider",
            f"--hosts={hosts}", "-rA", "-q", "tests/infra"]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
