"""Promise: `python -m bench.json_routing --quick` measures every body on both dispatchers and both JIT modes.

A smoke run (a few seconds), not a timed test: it checks that the table has a row for
every body and that the routed dispatcher gave each the answer docs/routing.md says
(200, or 400 past PCRE's limits), with pcre_jit off and on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import json_routing
from tests.harness.tools import require_tool

pytestmark = pytest.mark.live

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_measures_every_body():
    require_tool("nginx", "nginx-light")
    done = subprocess.run([sys.executable, "-m", "bench.json_routing", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in done.stdout.splitlines() if line.startswith("| ")}
    for label in json_routing.bodies():
        refused = "backslash run (30MB)" in label or "deep nesting" in label
        matching = [row for name, row in rows.items() if name.startswith(label)]
        assert len(matching) == 1, (label, sorted(rows))
        assert ("(answers 400)" in matching[0]) == refused, matching[0]
        assert "answers 5" not in matching[0] and "answers 413" not in matching[0], matching[0]
