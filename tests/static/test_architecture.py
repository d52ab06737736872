"""The layers of docs/architecture.md, checked on the imports of every vfgen module.

config -> plan -> render -> output is a one-way street: a lower layer never imports a
higher one, and the core never imports the runtime (health, launch, rollout, ...) or the CLI.
Function-level imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import jinja2
import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vfgen"
REPO = PACKAGE.parent

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
    "render": {"", "errors", "plan", "quoting"},
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


# --- render only formats ------------------------------------------------------------

_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
# Reads of files or of the machine; finding its own templates (templates_dir's is_dir) is the one exception.
_READS = {"open", "read_text", "read_bytes", "read_api_keys", "stat", "exists", "is_file", "iterdir", "glob", "getenv",
          "environ", "listdir", "scandir"}


def test_render_py_does_no_arithmetic_and_reads_nothing():
    tree = ast.parse((PACKAGE / "render.py").read_text())
    arithmetic = [node.lineno for node in ast.walk(tree)
                  if isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(node.op, _ARITHMETIC)]
    reads = [(node.lineno, name) for node in ast.walk(tree)
             for name in [node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None]
             if name in _READS]
    assert not arithmetic, f"vfgen/render.py does arithmetic on lines {arithmetic}: compute it in plan.py"
    assert not reads, f"vfgen/render.py reads files or the environment: {reads}; read in config.py or plan.py"


def _templates():
    return sorted(p.relative_to(REPO / "templates") for p in (REPO / "templates").rglob("*.j2"))


@pytest.mark.parametrize("template", _templates(), ids=str)
def test_templates_do_no_arithmetic(template: Path):
    """Numbers come from the plan: a template formats them (`{{ n }}s`), it never computes one."""
    env = jinja2.Environment()
    tree = env.parse((REPO / "templates" / template).read_text())
    ops = (jinja2.nodes.Add, jinja2.nodes.Sub, jinja2.nodes.Mul, jinja2.nodes.Div, jinja2.nodes.FloorDiv,
           jinja2.nodes.Mod, jinja2.nodes.Pow, jinja2.nodes.Neg)
    found = [(node.lineno, type(node).__name__) for node in tree.find_all(ops)]
    assert not found, f"templates/{template}: arithmetic at {found}; compute it in plan.py"


def test_the_ansible_role_keeps_no_copy_of_the_connect_host_rule():
    """Where a wildcard bind is reached (0.0.0.0 -> 127.0.0.1, :: -> [::1]) is plan.py's `_connect_host`
    alone; the role reads the result from `vfgen plan --json` (dispatcher.url, instances[].url)."""
    copies = [(str(p.relative_to(REPO)), marker) for p in sorted((REPO / "ansible").rglob("*.yml"))
              for marker in ("'[::1]'", "== '0.0.0.0'") if marker in p.read_text()]
    assert not copies, copies
