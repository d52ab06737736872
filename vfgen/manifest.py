"""The manifest of what vfgen wrote under an output root, and of what `vfgen apply` last ran.

It lives at ROOT/var/lib/vfgen-manifest/NAME.json (one per deployment name), outside
the units' StateDirectory /var/lib/vfgen, which systemd hands to the service user:
that user must not be able to edit the list of files vfgen may delete.

- `files`: every file vfgen wrote (path relative to the root, sha256 of the content,
  kind). A file is stale when the manifest lists it and the deployment no longer
  renders it; `--prune` deletes it only while its content is still what vfgen wrote,
  so a file someone edited (or vfgen never wrote) is never touched.
- `instances`: the instances as `vfgen apply` last started them (plain data, see
  vfgen.apply.instance_record); `render` carries this part over unchanged.

The JSON is deterministic (sorted keys, no timestamps) and written with the tree,
staged and renamed like every other file (vfgen.output).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from vfgen.errors import OutputError
from vfgen.render import Artefact

MANIFEST_DIR = "var/lib/vfgen-manifest"
FORMAT = 1


def manifest_path(name: str) -> str:
    return f"{MANIFEST_DIR}/{name}.json"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Manifest:
    deployment: str
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # path -> {"sha256", "kind"}
    instances: tuple[dict[str, Any], ...] = ()
    backend: str | None = None  # of the applied instances

    def to_json(self) -> str:
        data = {"format": FORMAT, "deployment": self.deployment, "backend": self.backend,
                "files": self.files, "instances": list(self.instances)}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    def artefact(self) -> Artefact:
        return Artefact("manifest", manifest_path(self.deployment), self.to_json(), mode=0o644)


def read(root: Path, name: str) -> Manifest | None:
    path = Path(root) / manifest_path(name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read the manifest {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
        if data.get("format") != FORMAT or data.get("deployment") != name:
            raise ValueError(f"format {data.get('format')!r}, deployment {data.get('deployment')!r}")
        files = {str(p): {"sha256": str(e["sha256"]), "kind": str(e["kind"])} for p, e in data["files"].items()}
        instances = tuple(dict(i) for i in data.get("instances") or ())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise OutputError(f"the manifest {path} is not one vfgen wrote for deployment {name!r} ({exc}); "
                          "move it away to start over (vfgen then knows of no earlier files)") from None
    return Manifest(name, files, instances, data.get("backend"))


@dataclass(frozen=True)
class Stale:
    path: str  # relative to the root
    state: str  # stale: unchanged since vfgen wrote it | modified: someone changed it (never deleted)
    mode: int | None
    sha256: str  # what vfgen wrote


def in_scope(kind: str, only: str) -> bool:
    """Whether a file of `kind` belongs to what `render --only ONLY` renders (so can be stale)."""
    if only == "dispatcher":
        return kind == "nginx"
    if only == "backends":
        return kind != "nginx"
    return True


def stale_files(root: Path, old: Manifest | None, arts: Iterable[Artefact], only: str) -> list[Stale]:
    """Files the old manifest lists, in scope, that `arts` no longer contains and that still exist."""
    if old is None:
        return []
    from vfgen.output import resolve_inside

    rendered = {a.path for a in arts}
    out = []
    for path, entry in sorted(old.files.items()):
        if path in rendered or not in_scope(entry["kind"], only):
            continue
        target = resolve_inside(root, path)
        try:
            content = target.read_text(encoding="utf-8", errors="replace")
            mode = target.stat().st_mode & 0o777
        except FileNotFoundError:
            continue  # gone already: dropped from the manifest
        except OSError as exc:
            raise OutputError(f"cannot read {target}: {exc.strerror or exc}") from None
        out.append(Stale(path, "stale" if sha256(content) == entry["sha256"] else "modified", mode, entry["sha256"]))
    return out


def updated(old: Manifest | None, name: str, arts: Iterable[Artefact], only: str, keep: Iterable[Stale] = (),
            instances: tuple[dict[str, Any], ...] | None = None, backend: str | None = None) -> Manifest:
    """The manifest after writing `arts`: out-of-scope entries kept, stale ones only if listed in `keep`."""
    files: dict[str, dict[str, str]] = {}
    kept = {s.path for s in keep}
    if old is not None:
        for path, entry in old.files.items():
            if not in_scope(entry["kind"], only) or path in kept:
                files[path] = dict(entry)
    for art in arts:
        if art.kind != "manifest":
            files[art.path] = {"sha256": sha256(art.content), "kind": art.kind}
    return Manifest(
        name, dict(sorted(files.items())),
        instances if instances is not None else (old.instances if old else ()),
        backend if instances is not None else (old.backend if old else None),
    )


def remove_stale(root: Path, stale: Iterable[Stale]) -> list[Stale]:
    """Delete stale files that are unchanged since vfgen wrote them; modified ones are kept."""
    from vfgen.output import resolve_inside

    removed = []
    for s in stale:
        if s.state != "stale":
            continue
        target = resolve_inside(root, s.path)
        try:
            # Checked again right before the unlink: an edit since the listing keeps the file.
            if sha256(target.read_text(encoding="utf-8", errors="replace")) != s.sha256:
                continue
            os.unlink(target)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot remove {target}: {exc.strerror or exc}") from None
        removed.append(s)
    return removed
