"""Write rendered artefacts under an output root atomically, or describe what would change.

All files are staged as temporary files next to their targets first, then
renamed into place. A failure at any step removes every temporary file and
every directory it created, and undoes the renames already done, so no target
is ever half-written and a failed run changes nothing; the error names the path.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from vfgen.errors import OutputError
from vfgen.render import Artefact


@dataclass(frozen=True)
class Change:
    path: Path
    action: str  # create | update | unchanged
    mode: int


def resolve_inside(root: Path, relative: str) -> Path:
    """`root/relative`, refusing anything (.., absolute paths, symlinks) that lands outside root."""
    if os.path.isabs(relative) or "\x00" in relative:
        raise OutputError(f"refusing to write {relative!r}: not a relative path")
    root_real = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root_real / relative))
    if root_real != target and root_real not in target.parents:
        raise OutputError(f"refusing to write {relative!r}: it resolves outside {root}")
    return target


def plan_changes(root: Path, artefacts: Iterable[Artefact]) -> list[Change]:
    changes = []
    for art in artefacts:
        target = resolve_inside(root, art.path)
        try:
            if not target.exists():
                action = "create"
            elif target.read_text(encoding="utf-8", errors="replace") != art.content or (target.stat().st_mode & 0o777) != art.mode:
                action = "update"
            else:
                action = "unchanged"
        except OSError as exc:
            raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
        changes.append(Change(target, action, art.mode))
    return changes


def write_tree(root: Path, artefacts: list[Artefact]) -> list[Change]:
    """Write every changed artefact, or nothing: on any failure the tree is as it was."""
    changes = plan_changes(root, artefacts)
    staged: list[tuple[str, Path]] = []
    created_dirs: list[Path] = []
    current: Path = root
    try:
        for art, change in zip(artefacts, changes):
            if change.action == "unchanged":
                continue
            current = change.path.parent
            created_dirs += _make_dirs(change.path.parent)
            # The parent may be a symlink created between the check and now; check again.
            resolve_inside(root, art.path)
            current = change.path
            fd, tmp = tempfile.mkstemp(prefix=f".{change.path.name}.", suffix=".vfgen-tmp", dir=change.path.parent)
            staged.append((tmp, change.path))
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(art.content)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, art.mode)
        _replace_all(staged)
    except BaseException as exc:
        for tmp, _ in staged:
            _unlink_quietly(tmp)
        for directory in reversed(created_dirs):
            _rmdir_quietly(directory)
        if not isinstance(exc, OSError):
            raise
        failed = current if str(exc.filename or "").endswith(".vfgen-tmp") else exc.filename or current
        raise OutputError(f"cannot write {failed}: {exc.strerror or exc}; nothing under {root} was changed") from None
    return changes


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (outermost first) so a failure can remove them."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists() or candidate.is_symlink():
            break
        missing.append(candidate)
    created = []
    for candidate in reversed(missing):
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError:
            for made in reversed(created):
                _rmdir_quietly(made)
            raise
        created.append(candidate)
    return created


def _replace_all(staged: list[tuple[str, Path]]) -> None:
    """Rename every staged file onto its target; if one rename fails, undo the earlier ones.

    An existing target is first hard-linked to a backup name, so undoing puts back the very
    same file (content, mode, owner); a target that did not exist is removed again.
    """
    done: list[tuple[Path, str | None]] = []
    try:
        for tmp, target in staged:
            backup = None
            try:
                if target.exists():
                    backup = f"{tmp}.old"
                    os.link(target, backup)
                os.replace(tmp, target)
            except OSError as exc:
                if backup:
                    _unlink_quietly(backup)
                raise OSError(exc.errno, exc.strerror, str(target)) from exc  # name the target, not the temp file
            done.append((target, backup))
    except OSError:
        for target, backup in reversed(done):
            if backup:
                os.replace(backup, target)
            else:
                _unlink_quietly(str(target))
        raise
    for _, backup in done:
        if backup:
            _unlink_quietly(backup)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
