"""Golden files of rendered scenarios, for reviewing diffs (behaviour is proven elsewhere).

Regenerate with: UPDATE_GOLDEN=1 python -m pytest tests/unit/test_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.scenarios import SCENARIOS
from vfgen.cli import app
from vfgen.manifest import MANIFEST_DIR

GOLDEN = Path(__file__).parent.parent / "golden"


def _render(name: str, tmp_path: Path) -> dict[str, str]:
    out = tmp_path / name
    result = CliRunner().invoke(app, ["render", "--output-dir", str(out), *SCENARIOS[name]], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    # The manifest only lists hashes of the other files (tests/unit/test_manifest.py covers it);
    # kept out so every template change does not also rewrite it here.
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*"))
            if p.is_file() and MANIFEST_DIR not in str(p.relative_to(out))}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden(name: str, tmp_path: Path) -> None:
    files = _render(name, tmp_path)
    golden_dir = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        for old in golden_dir.rglob("*"):
            if old.is_file():
                old.unlink()
        for rel, content in files.items():
            (golden_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (golden_dir / rel).write_text(content)
    expected = {str(p.relative_to(golden_dir)): p.read_text() for p in sorted(golden_dir.rglob("*")) if p.is_file()}
    assert sorted(files) == sorted(expected), "set of rendered files changed"
    for rel in files:
        assert files[rel] == expected[rel], f"{name}/{rel} differs from the golden file (UPDATE_GOLDEN=1 to accept)"


def test_render_is_deterministic(tmp_path: Path) -> None:
    first = _render("example-tp2-plus-embedding", tmp_path / "a")
    second = _render("example-tp2-plus-embedding", tmp_path / "b")
    assert first == second
