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


def test_a_file_in_the_way_of_a_directory_leaves_no_directory_behind_and_names_the_path(tmp_path: Path):
    """All or nothing: the directories made for the first file go again when the second fails."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "blocked").write_text("a file where a directory is needed")
    with pytest.raises(OutputError) as info:
        write_tree(root, arts(("etc/nginx/conf.d/first.conf", "1"), ("blocked/sub/second.conf", "2")))
    assert f"cannot write {root / 'blocked' / 'sub'}" in str(info.value), info.value
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["blocked"]


def test_an_output_root_that_did_not_exist_is_removed_again_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The disk fills up while staging the second file: no directory, temp file or target remains."""
    import errno
    import tempfile

    real_mkstemp = tempfile.mkstemp
    calls = []

    def mkstemp(*args, **kwargs):
        calls.append(kwargs.get("dir"))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    root = tmp_path / "new" / "root"
    with pytest.raises(OutputError) as info:
        write_tree(root, arts(("etc/a.conf", "1"), ("var/lib/b.conf", "2")))
    assert f"cannot write {root / 'var/lib/b.conf'}: No space left on device" in str(info.value), info.value
    assert not (tmp_path / "new").exists()


def test_a_failed_rename_undoes_the_renames_before_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The second rename fails (a directory took the target's place): the first file is restored, byte for byte."""
    root = tmp_path / "root"
    write_tree(root, arts(("etc/a.conf", "old a"), ("etc/b.conf", "old b")))
    (root / "etc/a.conf").chmod(0o640)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("b.conf"):
            (root / "etc/b.conf").unlink()
            (root / "etc/b.conf").mkdir()
            (root / "etc/b.conf/occupied").write_text("x")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputError) as info:
        write_tree(root, arts(("etc/a.conf", "new a"), ("etc/b.conf", "new b"), ("etc/c.conf", "new c")))
    assert f"cannot write {root / 'etc/b.conf'}" in str(info.value)
    assert (root / "etc/a.conf").read_text() == "old a" and (root / "etc/a.conf").stat().st_mode & 0o777 == 0o640
    assert not (root / "etc/c.conf").exists()
    assert sorted(p.name for p in (root / "etc").iterdir()) == ["a.conf", "b.conf"], "temp or backup files left"


def test_a_directory_where_a_file_goes_is_an_error_naming_it(tmp_path: Path):
    root = tmp_path / "root"
    (root / "etc/x.conf").mkdir(parents=True)
    with pytest.raises(OutputError) as info:
        write_tree(root, arts(("etc/x.conf", "1")))
    assert str(root / "etc/x.conf") in str(info.value)
