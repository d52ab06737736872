"""The README's options table lists exactly the options `vfgen render` has (and says its defaults)."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from vfgen.cli import app

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_table() -> dict[str, str]:
    """Option -> its row, from the table under "Options of `render`"."""
    text = README.read_text(encoding="utf-8")
    start = text.index("Options of `render`")
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| option"):
            continue
        first = line.split("|")[1]
        for option in re.findall(r"`([^`]+)`", first):
            for word in re.split(r"[ ,/]+", option):
                if word == "--":  # `-- VLLM_ARGS...`: the arguments after --, not an option
                    break
                if word.startswith("-") or word == option:  # `MODEL` (a metavar alone), not `--env KEY=VALUE`
                    rows[word.split("=")[0]] = line
    return rows


def cli_options() -> dict[str, object]:
    render = typer.main.get_command(app).commands["render"]
    options = {}
    for param in render.params:
        names = [*param.opts, *param.secondary_opts] if param.param_type_name == "option" else [param.metavar or param.name]
        for name in names:
            if name not in ("-h", "--help", "[-- VLLM_ARGS...]"):
                options[name] = param
    return options


def test_readme_table_lists_every_render_option_and_nothing_else() -> None:
    table, cli = readme_table(), cli_options()
    assert sorted(set(cli) - set(table)) == [], "options missing from the README table"
    assert sorted(set(table) - set(cli)) == [], "README table lists options the CLI does not have"


def test_readme_table_gives_the_default_the_help_gives() -> None:
    """A help text ending in [default: X] has X in the option's README row."""
    table = readme_table()
    wrong = []
    for name, param in cli_options().items():
        match = re.search(r"\[default: ([^\]]+)\]", getattr(param, "help", None) or "")
        if match and name in table and match.group(1) not in table[name]:
            wrong.append(f"{name}: README row lacks the default {match.group(1)!r}")
    assert not wrong, "\n".join(wrong)
