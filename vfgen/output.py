"""Write rendered artefacts under an output root atomically, or describe what would change.

All files are staged as temporary files next to their targets first, then
renamed into place; a failure while staging removes every temporary file, so
no target is ever half-written and a failed run changes nothing.
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
        if not target.exists():
            action = "create"
        elif target.read_text(encoding="utf-8", errors="replace") != art.content or (target.stat().st_mode & 0o777) != art.mode:
            action = "update"
        else:
            action = "unchanged"
        changes.append(Change(target, action, art.mode))
    return changes


def write_tree(root: Path, artefacts: list[Artefact]) -> list[Change]:
    changes = plan_changes(root, artefacts)
    staged: list[tuple[str, Path]] = []
    try:
        for art, change in zip(artefacts, changes):
            if change.action == "unchanged":
                continue
            change.path.parent.mkdir(parents=True, exist_ok=True)
            # The parent may be a symlink created between the check and now; check again.
            resolve_inside(root, art.path)
            fd, tmp = tempfile.mkstemp(prefix=f".{change.path.name}.", suffix=".vfgen-tmp", dir=change.path.parent)
            staged.append((tmp, change.path))
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(art.content)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, art.mode)
    except OSError as exc:
        for tmp, _ in staged:
            _unlink_quietly(tmp)
        raise OutputError(f"cannot write under {root}: {exc.strerror or exc}") from None
    for tmp, target in staged:
        os.replace(tmp, target)
    return changes


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
