"""Decide what happens when a test needs a system tool that is missing.

In CI (CI=true) a missing tool is a failure: the test command installs every
tool, so a missing one means the install step is broken. On a developer's
laptop the test is skipped, loudly.
"""

from __future__ import annotations

import os
import shutil
import sys

import pytest

# Debian puts some tools in sbin, which is not on every user's PATH.
_EXTRA_PATHS = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def which(tool: str) -> str | None:
    found = shutil.which(tool)
    if found:
        return found
    for base in _EXTRA_PATHS:
        candidate = os.path.join(base, tool)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def missing(what: str, hint: str) -> None:
    """Fail in CI, skip loudly elsewhere."""
    message = f"{what} is not available ({hint})"
    if in_ci():
        pytest.fail(f"CI=true and {message}: the test command must install it", pytrace=False)
    print(f"\n*** SKIPPING: {message}. Run `make test` to install it. ***", file=sys.stderr)
    pytest.skip(f"LOUD SKIP: {message}")


def require_tool(tool: str, package: str | None = None) -> str:
    path = which(tool)
    if path is None:
        missing(tool, f"apt-get install {package or tool}")
    return path
