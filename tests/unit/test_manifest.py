"""The manifest of written files: `render -o` reports `stale` files, `--prune` removes only vfgen's own,
`--dry-run` shows both, and `vfgen apply --dry-run` prints the ordered plan and changes nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from typer.testing import CliRunner

from vfgen.cli import app
from vfgen.manifest import manifest_path

UNITS = "etc/systemd/system"


def vfgen(*args: str):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_scaling_down_reports_stale_units_and_prune_removes_only_vfgen_files(tmp_path: Path):
    assert vfgen("render", "org/m", "-n", "4", "-o", str(tmp_path)).exit_code == 0
    (tmp_path / UNITS / "foreign.service").write_text("[Service]\nExecStart=/bin/true\n")
    (tmp_path / UNITS / "vllm-m-9.service").write_text("# Rendered by vfgen for deployment vllm. (by hand)\n")

    dry = vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path), "--dry-run")
    assert dry.exit_code == 0, dry.output
    stale = [line.split() for line in dry.stdout.splitlines() if line.startswith("stale")]
    assert stale == [["stale", "644", str(tmp_path / UNITS / "vllm-m-2.service")],
                     ["stale", "644", str(tmp_path / UNITS / "vllm-m-3.service")]], dry.stdout
    assert (tmp_path / UNITS / "vllm-m-3.service").exists()

    with_prune = vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path), "--dry-run", "--prune")
    assert [line.split()[0] for line in with_prune.stdout.splitlines() if "vllm-m-2" in line or "vllm-m-3" in line] == ["remove", "remove"]
    assert (tmp_path / UNITS / "vllm-m-2.service").exists(), "--dry-run removed a file"

    kept = vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path))
    assert "stale     " + str(tmp_path / UNITS / "vllm-m-2.service") in kept.stdout
    assert (tmp_path / UNITS / "vllm-m-2.service").exists(), "without --prune nothing is removed"

    pruned = vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path), "--prune")
    assert pruned.exit_code == 0, pruned.output
    assert "removed   " + str(tmp_path / UNITS / "vllm-m-3.service") in pruned.stdout
    assert sorted(p.name for p in (tmp_path / UNITS).iterdir()) == [
        "foreign.service", "vllm-m-0.service", "vllm-m-1.service", "vllm-m-9.service", "vllm.target"]
    again = vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path), "--dry-run")
    assert all(line.startswith("unchanged") for line in again.stdout.splitlines()), again.stdout


def test_a_stale_file_someone_edited_is_reported_and_never_pruned(tmp_path: Path):
    vfgen("render", "org/m", "-n", "3", "-o", str(tmp_path))
    edited = tmp_path / UNITS / "vllm-m-2.service"
    edited.write_text(edited.read_text() + "# local change\n")
    result = vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path), "--prune")
    assert f"modified  {edited}" in result.stdout, result.stdout
    assert edited.exists()
    assert "modified" in vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path), "--dry-run").stdout


def test_only_scopes_what_can_be_stale(tmp_path: Path):
    vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path))
    # A dispatcher-only render must not call the units stale, nor a backends-only one the nginx conf.
    for only in ("dispatcher", "backends"):
        result = vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path), "--only", only, "--dry-run")
        assert "stale" not in result.stdout, (only, result.stdout)
    # Switching to supervisord makes the units stale (they are vfgen's, no longer rendered).
    result = vfgen("render", "org/m", "-n", "2", "--backend", "supervisord", "-o", str(tmp_path), "--dry-run")
    assert sum(line.startswith("stale") for line in result.stdout.splitlines()) == 3, result.stdout


def test_manifest_is_deterministic_and_lists_hashes(tmp_path: Path):
    for sub in ("a", "b"):
        vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path / sub))
    a = (tmp_path / "a" / manifest_path("vllm")).read_text()
    assert a == (tmp_path / "b" / manifest_path("vllm")).read_text()
    data = json.loads(a)
    unit = tmp_path / "a" / UNITS / "vllm-m-0.service"
    assert data["files"][f"{UNITS}/vllm-m-0.service"] == {"kind": "systemd", "sha256": hashlib.sha256(unit.read_bytes()).hexdigest()}
    assert [i["name"] for i in data["instances"]] == ["vllm-m-0", "vllm-m-1"]


def test_a_broken_manifest_is_one_clear_error(tmp_path: Path):
    vfgen("render", "org/m", "-o", str(tmp_path), "-n", "2")
    path = tmp_path / manifest_path("vllm")
    path.write_text("{not json")
    result = vfgen("render", "org/m", "-n", "2", "-o", str(tmp_path))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: the manifest {path} is not one vfgen wrote for deployment 'vllm'"), result.stderr
    assert result.stderr.count("\n") == 1


def test_prune_needs_an_output_dir():
    result = vfgen("render", "org/m", "-n", "2", "--prune")
    assert result.exit_code == 1 and "--prune removes stale files under --output-dir" in result.stderr


def test_apply_dry_run_prints_the_ordered_plan_and_changes_nothing(tmp_path: Path):
    vfgen("render", "org/m", "-n", "4", "-o", str(tmp_path))
    before = snapshot(tmp_path)
    result = vfgen("apply", "org/m", "-n", "2", "-o", str(tmp_path), "--dry-run",
                   "--systemctl", "/bin/false", "--nginx", "/bin/false")
    assert result.exit_code == 0, result.output
    kinds = [line.split()[0] for line in result.stdout.splitlines()]
    assert kinds == ["check", "drain", "stop", "drain", "stop", "drain", "restart", "drain", "restart",
                     "write", "write", "reload", "reload", "summary:"], result.stdout
    assert "stop     vllm-m-3  (removed; frees 0.23 on GPU 0" in result.stdout
    assert "summary: 2 removed, 2 changed, 0 updated, 0 new, 0 unchanged; peak share sum GPU 0 0.92 (budget 0.92)" in result.stdout
    assert snapshot(tmp_path) == before


def test_apply_refuses_a_multi_host_deployment(tmp_path: Path):
    result = vfgen("apply", "org/m", "-n", "2", "--upstream-host", "10.0.0.5", "-o", str(tmp_path), "--dry-run")
    assert result.exit_code == 1
    assert "apply changes one host" in result.stderr
