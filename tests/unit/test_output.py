"""Atomic writes, dry runs and path containment of vfgen.output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vfgen.errors import OutputError
from vfgen.output import plan_changes, write_tree
from vfgen.render import Artefact


def arts(*items):
    return [Artefact("nginx", path, content) for path, content in items]


def test_write_tree_creates_files_with_modes_and_reports_changes(tmp_path: Path):
    changes = write_tree(tmp_path, arts(("etc/a.conf", "A\n"), ("etc/sub/b.conf", "B\n")))
    assert [c.action for c in changes] == ["create", "create"]
    assert (tmp_path / "etc/a.conf").read_text() == "A\n"
    assert oct((tmp_path / "etc/a.conf").stat().st_mode & 0o777) == "0o644"
    again = write_tree(tmp_path, arts(("etc/a.conf", "A\n"), ("etc/sub/b.conf", "B2\n")))
    assert [c.action for c in again] == ["unchanged", "update"]
    assert not list(tmp_path.rglob("*.vfgen-tmp")), "temporary files left behind"


def test_dry_run_lists_changes_and_writes_nothing(tmp_path: Path):
    changes = plan_changes(tmp_path, arts(("etc/a.conf", "A\n")))
    assert [c.action for c in changes] == ["create"]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad", ["../escape.conf", "/etc/passwd", "etc/../../x"])
def test_paths_outside_the_root_are_refused(tmp_path: Path, bad: str):
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(OutputError):
        write_tree(root, arts(("etc/ok.conf", "ok\n"), (bad, "x")))
    assert not any(root.rglob("*")), "nothing may be written when one path is refused"


def test_symlink_escaping_the_root_is_refused(tmp_path: Path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "etc" / "nginx")
    with pytest.raises(OutputError):
        write_tree(root, arts(("etc/nginx/x.conf", "x")))
    assert not any(outside.iterdir())


def test_failure_while_staging_leaves_no_file_and_no_temp(tmp_path: Path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "blocked").write_text("a file where a directory is needed")
    with pytest.raises(OutputError):
        write_tree(root, arts(("etc/first.conf", "1"), ("etc/blocked/second.conf", "2")))
    assert sorted(p.name for p in root.rglob("*")) == ["blocked", "etc"]
