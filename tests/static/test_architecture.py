"""The layers of docs/architecture.md, checked on the imports of every vfgen module.

config -> plan -> render -> output is a one-way street: a lower layer never imports a
higher one, and the core never imports the runtime (health, launch, rollout, ...) or the CLI.
Function-level imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vfgen"

# The core, bottom up: each module may import only these vfgen modules ("" = vfgen itself,
# for __version__). Modules not listed here (runtime helpers, commands, demo) may import
# the core freely, but nothing may import the CLI.
CORE_IMPORTS: dict[str, set[str]] = {
    "errors": set(),
    "quoting": set(),
    "jsonpcre": set(),
    "procfs": set(),
    "tables": set(),
    "options": set(),
    "memory": {"errors"},
    "config": {"errors", "memory", "options", "quoting"},
    "plan": {"config", "errors", "jsonpcre", "memory", "quoting"},
    "render": {"", "config", "errors", "plan", "quoting"},
    "output": {"errors", "render"},
    "manifest": {"errors", "output", "render"},
}


def vfgen_imports(path: Path) -> set[str]:
    """Names of the vfgen modules `path` imports ("" for `from vfgen import X` of a non-module)."""
    found: set[str] = set()
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "vfgen":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found |= {a.name if a.name in modules else "" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("vfgen.")}
    return found


def test_the_layer_table_names_real_modules():
    # A rename must update the table, or the checks below would pass on nothing.
    assert set(CORE_IMPORTS) <= {p.stem for p in PACKAGE.glob("*.py")}


@pytest.mark.parametrize("module", sorted(CORE_IMPORTS))
def test_core_modules_import_only_the_layers_below(module: str):
    extra = vfgen_imports(PACKAGE / f"{module}.py") - CORE_IMPORTS[module]
    assert not extra, f"vfgen/{module}.py imports {sorted(extra)}; see docs/architecture.md"


def test_nothing_imports_the_cli():
    offenders = [p.name for p in PACKAGE.rglob("*.py") if p.stem != "cli" and "cli" in vfgen_imports(p)]
    assert not offenders, offenders


def test_the_checker_sees_function_level_imports(tmp_path: Path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from vfgen import health\n    from vfgen.output import write_tree\n    import vfgen.launch\n")
    assert vfgen_imports(probe) == {"health", "output", "launch"}
