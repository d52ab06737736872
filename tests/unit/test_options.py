"""The option table (vfgen/options.py) against what the CLI, config and README really do.

The table generates the typer options, the CLI -> config mapping, config's error labels and
the README table; these tests check each product against the real thing: the click command
typer builds, errors from real command lines, config's own defaults, the README file.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from vfgen import config, options
from vfgen.cli import app

ROOT = Path(__file__).resolve().parents[2]
CPU_TINY = ROOT / "examples" / "cpu-tiny.yaml"
COMMANDS = [("render",), ("plan",), ("health", "check"), ("rollout",), ("apply",), ("lora", "load"), ("lora", "unload")]


def command(*path: str):
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return cmd


def run(*argv: str):
    return CliRunner().invoke(app, list(argv), catch_exceptions=False)


# --- the README --------------------------------------------------------------------------


def test_readme_options_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert options.README_BEGIN in readme and options.README_END in readme
    block = readme[readme.index(options.README_BEGIN) + len(options.README_BEGIN):readme.index(options.README_END)]
    assert block == options.markdown(), "README options table is stale: run `make readme-options`"
    assert options.with_table(readme) == readme


def test_markdown_command_prints_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "vfgen.options", "--markdown"], capture_output=True, text=True, check=True)
    assert out.stdout == options.markdown()
    rows = [line for line in out.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == len(options.for_command("render"))


# --- labels ------------------------------------------------------------------------------


def _spellings(cmd) -> dict[str, set[str]]:
    """Parameter name -> how a user types it (flags, or the argument's metavar)."""
    return {p.name: set(p.opts) if p.param_type_name == "option" else {p.metavar} for p in cmd.params}


def test_every_error_label_is_an_option_of_the_cli_and_a_field_of_config() -> None:
    """No dead labels (the old table had --connect-timeout and --instance-env, options that do not exist)."""
    spelled = _spellings(command("render"))
    keys = {"global": config._GLOBAL_KEYS, "model": config._MODEL_KEYS, "timeouts": config._TIMEOUT_KEYS}
    by_field = {o.field: o for o in options.TO_CONFIG}
    for field, label in config.CLI_LABELS.items():
        o = by_field[field]
        assert o.config_key in keys[o.scope], f"{label} sets {field}, which config does not know"
        if o.argument:
            assert o.metavar in spelled[o.name], (field, label)
        else:
            assert label in spelled[o.name], f"label {label!r} of {field} is not a flag of render"


def test_config_names_every_cli_field_by_its_flag() -> None:
    v = config._Validator(None)
    for o in options.TO_CONFIG:
        assert v.label(o.field) == o.error_label, o.name
        assert v.label(o.field + "[0]") == o.error_label, o.name  # list items (upstream_hosts[0])
    assert v.label("env.HF_HOME") == "--env HF_HOME"
    # A field no option sets keeps its file name instead of an invented flag.
    assert v.label("min_memory_share") == "min_memory_share"


# A value every validator refuses, per type: a control character in text, a number past every bound.
BAD = {str: "bad\nvalue", Path: "bad\nvalue", int: "1000000000000", float: "1000000000000"}


def _bad_value_cases(scopes: tuple[str, ...]) -> list[options.Option]:
    return [o for o in options.TO_CONFIG if o.scope in scopes and not o.is_flag and not o.choices]


def _argv(o: options.Option, value: str) -> list[str]:
    if o.name == "model":
        return [value, "-n", "2"]
    if o.name == "vllm_args":
        return ["org/m", "-n", "2", "--", value]
    if o.name == "env":
        value = f"MY_VAR={value}"
    return ["org/m", "-n", "2", o.long, value]


@pytest.mark.parametrize("o", _bad_value_cases(options.SCOPES), ids=lambda o: o.name)
def test_a_bad_value_is_named_by_the_flag_the_user_typed(o: options.Option, tmp_path: Path) -> None:
    result = run("render", *_argv(o, BAD[o.type]), "--output-dir", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert re.match(rf"Error: {re.escape(o.error_label)}[ =:]", result.stderr), result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("o", _bad_value_cases(("global", "timeouts")), ids=lambda o: o.name)
def test_a_bad_flag_on_top_of_a_file_is_named_as_the_flag(o: options.Option, tmp_path: Path) -> None:
    result = run("render", "-f", str(CPU_TINY), o.long, BAD[o.type], "--output-dir", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert re.match(rf"Error: {re.escape(o.error_label)}[=:]", result.stderr), result.stderr
    assert "cpu-tiny.yaml" not in result.stderr


def test_model_options_with_a_file_are_refused_by_their_flags() -> None:
    result = run("render", "-f", str(CPU_TINY), "--max-batch-size", "4", "-e", "A=1")
    assert result.exit_code == 1
    assert "per-model options (--max-batch-size, --env); put them in the file" in result.stderr


# --- choices -----------------------------------------------------------------------------


@pytest.mark.parametrize("o", [o for o in options.OPTIONS if o.choices], ids=lambda o: o.name)
def test_a_value_outside_the_choices_is_a_usage_error_naming_value_and_choices(o: options.Option) -> None:
    result = run("render", "org/m", "-n", "2", o.long, "nope")
    assert result.exit_code == 2, result.output
    # One plain sentence: the flag, the value and the choices (no validator's wording in between).
    assert (f"Error: Invalid value for '{o.long}': 'nope' is not one of "
            + ", ".join(f"'{c}'" for c in o.choices) + ".") in result.stderr
    assert "Traceback" not in result.output


def test_config_refuses_the_same_values_in_a_file(tmp_path: Path) -> None:
    """The parser's choices are config's vocabularies: a file cannot sneak another value in."""
    for key, value in (("backend", "launchd"), ("access_log", "combined")):
        with pytest.raises(config.ConfigError, match=f"{key}='{value}': must be one of"):
            config.parse_deployment({key: value, "models": [{"model": "org/m", "instances": 2}]}, source="t.yaml")
    for key, value in (("routing", "rr"), ("dtype", "bf16")):
        with pytest.raises(config.ConfigError, match=rf"models\[0\].{key}='{value}': must be one of"):
            config.parse_deployment({"models": [{"model": "org/m", "instances": 2, key: value}]}, source="t.yaml")


# --- defaults ----------------------------------------------------------------------------


def _config_value(d: config.Deployment, o: options.Option) -> str:
    owner = {"global": d, "model": d.models[0], "timeouts": d.timeouts}[o.scope]
    value = getattr(owner, o.config_key)
    return ",".join(value) if isinstance(value, tuple) else str(value)


def test_the_defaults_the_help_shows_are_the_ones_config_uses() -> None:
    d = config.parse_deployment({"models": [{"model": "org/m"}]}, source=None)
    literal = [o for o in options.TO_CONFIG if o.default is not None]
    assert len(literal) > 20
    wrong = [f"{o.long}: table says {o.default}, config uses {_config_value(d, o)}" for o in literal
             if _config_value(d, o) != o.default]
    assert not wrong, "\n".join(wrong)


def test_render_gets_the_table_default_of_its_own_options(tmp_path: Path, monkeypatch) -> None:
    seen = {}
    from vfgen import commands

    monkeypatch.setattr(commands, "render", lambda d, **kw: seen.update(kw))
    assert run("render", "org/m", "-n", "2").exit_code == 0
    assert seen["only"] == options.BY_NAME["only"].default and seen["emit"] is None and seen["prune"] is False


# --- the commands and their help ---------------------------------------------------------


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_deployment_command_takes_every_deployment_option(path: tuple[str, ...]) -> None:
    spelled = _spellings(command(*path))
    for o in options.DEPLOYMENT:
        assert o.name in spelled, f"{' '.join(path)} lacks {o.error_label}"
        assert spelled[o.name] == (set(o.flags) if not o.argument else {o.metavar}), o.name


def _help_sections(text: str) -> dict[str, str]:
    sections, title = {}, None
    for line in text.splitlines():
        if re.fullmatch(r"[A-Za-z][A-Za-z ]*:", line):
            title = line[:-1]
            sections[title] = ""
        elif title is not None:
            sections[title] += line + "\n"
    return sections


@pytest.mark.parametrize("path", [("render",), ("health", "check")], ids=" ".join)
def test_help_groups_the_options_by_panel(path: tuple[str, ...]) -> None:
    result = run(*path, "--help")
    assert result.exit_code == 0
    sections = _help_sections(result.stdout)
    panels = [t for t in sections if t in options.PANELS]
    assert panels == [p for p in options.PANELS if p in panels] and len(panels) >= 8, list(sections)
    for o in options.for_command(path[0]):
        if o.argument:
            continue
        where = [t for t, body in sections.items() if re.search(rf"^  (-\w, )?{re.escape(o.long)}\b(?!-)", body, re.M)]
        assert where == [o.panel], f"{o.long} listed under {where}, not {o.panel}"
    assert re.search(r"^  -e, --env KEY=VALUE ", sections["Instances"], re.M)
    assert re.search(r"^  --backend <systemd\|supervisord>", sections["Deployment"], re.M)


def test_max_batch_size_reaches_max_conns_and_max_num_seqs(tmp_path: Path) -> None:
    """One value from the flag to nginx's per-server cap and vLLM's --max-num-seqs, nowhere else."""
    result = run("render", "org/m", "-n", "3", "--max-batch-size", "7", "--output-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    nginx = (tmp_path / "etc/nginx/conf.d/vllm.conf").read_text()
    upstream = re.search(r"^upstream vllm-m \{\n(.*?)^\}", nginx, re.M | re.S).group(1)
    servers = re.findall(r"^\s*server \S+ (.*);$", upstream, re.M)
    primary = [opts for opts in servers if "backup" not in opts]
    assert len(primary) == 3 and all(re.search(r"\bmax_conns=7\b", o) for o in primary), servers
    assert "max_conns=32" not in nginx
    units = sorted((tmp_path / "etc/systemd/system").glob("vllm-m-*.service"))
    assert len(units) == 3
    for unit in units:
        argv = shlex.split(re.search(r"^ExecStart=(.*)$", unit.read_text(), re.M).group(1))
        assert argv.count("--max-num-seqs") == 1 and argv[argv.index("--max-num-seqs") + 1] == "7", argv
