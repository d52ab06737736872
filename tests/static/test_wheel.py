"""A wheel built from the repo, installed in a fresh venv, renders from outside the source tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("vfgen-*.whl")
    return whl


def test_wheel_ships_the_templates(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for template in ("nginx/dispatcher.conf.j2", "systemd/instance.service.j2", "supervisord/deployment.conf.j2"):
        assert f"vfgen/templates/{template}" in names


def test_wheel_renders_from_a_fresh_venv_outside_the_tree(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = subprocess.run([str(venv / "bin/vfgen"), "render", "org/model", "-n", "2", "--emit", "nginx"],
                            cwd=work, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "least_conn;" in result.stdout and "max_conns=32" in result.stdout
    where = subprocess.run([str(venv / "bin/python"), "-c", "import vfgen.render as r; print(r.templates_dir())"],
                           cwd=work, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(venv)), "templates must come from the installed wheel"
