"""The units call a vfgen that systemd can find.

systemd resolves a bare ExecStart= command only in its fixed search path
(/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin), never in the venv or
pipx directory vfgen is usually installed in. Without --vfgen-bin the units get the
absolute path of the running vfgen, and `systemd-analyze verify` proves they can start.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.harness.tools import require_tool
from vfgen import config
from vfgen.cli import app

RUNNING_VFGEN = os.path.join(os.path.dirname(sys.executable), "vfgen")


def render(out: Path, *extra: str):
    result = CliRunner().invoke(app, ["render", "org/m", "-n", "2", "--output-dir", str(out), *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return result


def exec_starts(unit: Path) -> list[str]:
    return [w.strip('"') for w in re.findall(r"^ExecStart(?:Post|Pre)?=(\S+)", unit.read_text(), re.M)]


def test_default_vfgen_bin_is_the_running_vfgen_and_systemd_analyze_accepts_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    assert os.access(RUNNING_VFGEN, os.X_OK), "the test runs from a venv with vfgen installed"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(config, "SYSTEMD_SEARCH_PATH", (str(empty),))  # whatever this host has in /usr/local/bin
    result = render(tmp_path / "root")
    assert "Warning" not in result.stderr, result.stderr
    unit_dir = tmp_path / "root/etc/systemd/system"
    unit = unit_dir / "vllm-m-0.service"
    assert exec_starts(unit) and set(exec_starts(unit)) == {RUNNING_VFGEN}, unit.read_text()
    verify = subprocess.run([analyze, "verify", unit.name, "vllm.target", "vllm-m-1.service"], cwd=unit_dir,
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


def test_systemd_analyze_refuses_a_bare_vfgen_it_cannot_find(tmp_path: Path) -> None:
    """The check above can fail: the old default, bare `vfgen`, is reported when systemd's path lacks it."""
    analyze = require_tool("systemd-analyze", "systemd")
    if any(os.access(os.path.join(d, "vfgen"), os.X_OK) for d in config.SYSTEMD_SEARCH_PATH):
        pytest.skip("vfgen is installed on systemd's search path here, so bare `vfgen` is found")
    render(tmp_path / "root", "--vfgen-bin", "vfgen")
    unit_dir = tmp_path / "root/etc/systemd/system"
    verify = subprocess.run([analyze, "verify", "vllm-m-0.service"], cwd=unit_dir, capture_output=True, text=True, timeout=60)
    assert "Command vfgen is not executable" in verify.stderr, verify.stderr


def test_bare_vfgen_is_kept_when_systemd_finds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "vfgen").write_text("#!/bin/sh\n")
    (fake_bin / "vfgen").chmod(0o755)
    monkeypatch.setattr(config, "SYSTEMD_SEARCH_PATH", (str(fake_bin),))
    render(tmp_path / "root")
    assert set(exec_starts(tmp_path / "root/etc/systemd/system/vllm-m-0.service")) == {"vfgen"}


def test_no_vfgen_anywhere_warns_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "SYSTEMD_SEARCH_PATH", (str(tmp_path),))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(sys, "argv", ["pytest"])
    result = render(tmp_path / "root")
    assert "Warning: `vfgen` is not on systemd's search path" in result.stderr
    assert "pass --vfgen-bin" in result.stderr
