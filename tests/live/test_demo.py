"""`vfgen demo` brings a deployment up on a machine without a GPU, shows routing, and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.harness.tools import require_tool

pytestmark = pytest.mark.live


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline}")
    return found


def test_demo_routes_by_model_and_cleans_up() -> None:
    require_tool("nginx", "nginx-light")
    require_tool("supervisord", "supervisor")
    result = subprocess.run(["vfgen", "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "-> chat, chat-latest, embed" in out
    rows = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^POST (\S+ \S+)\s+(\d{3})\s+(\S+)", out, re.M)}
    assert rows["/v1/chat/completions chat"][0] == "200"
    assert rows["/v1/embeddings embed"][0] == "200"
    assert rows["/v1/completions no-such-model"] == ("404", "-")
    assert rows["/v1/embeddings embed"][1] not in {rows["/v1/chat/completions chat"][1], rows["/v1/chat/completions chat-latest"][1]}
    assert re.search(r"streamed 6 SSE events", out)
    workdir = re.search(r"rendered into (\S+)/root:", out).group(1)
    assert not Path(workdir).exists(), "the demo's temporary directory was left behind"
    assert _processes_mentioning(workdir) == [], "demo processes survived the teardown"
