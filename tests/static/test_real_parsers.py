"""Every rendered file is accepted by the real tool that will read it.

nginx -t (standalone and inside Debian's stock nginx.conf), systemd-analyze
verify with nothing on stderr, and supervisord's own config parser, whose
split of every `command=` must give back exactly the planned argv.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.harness.tools import missing, require_tool
from tests.scenarios import SCENARIOS
from vfgen.cli import app, load_deployment

VFGEN_BIN = shutil.which("vfgen") or "/usr/local/bin/vfgen"


def render_tree(args: list[str], out: Path) -> Path:
    result = CliRunner().invoke(app, ["render", "--output-dir", str(out), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


def scenario_args(name: str) -> list[str]:
    args = list(SCENARIOS[name])
    args[args.index("--vfgen-bin") + 1] = VFGEN_BIN  # systemd-analyze checks the executable exists
    return args


def with_options(args: list[str], *options: str) -> list[str]:
    """Insert options before a `--` separator, whose tail belongs to vllm."""
    split = args.index("--") if "--" in args else len(args)
    return [*args[:split], *options, *args[split:]]


def nginx_wrapper(tmp: Path, include: str) -> Path:
    main = tmp / "nginx-main.conf"
    main.write_text(
        f"worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    client_body_temp_path {tmp}/body;\n    proxy_temp_path {tmp}/proxy;\n"
        f"    include {include};\n}}\n"
    )
    return main


def nginx_test(nginx: str, main: Path, prefix: Path) -> subprocess.CompletedProcess:
    return subprocess.run([nginx, "-t", "-q", "-p", str(prefix), "-c", str(main)], capture_output=True, text=True, timeout=30)


NGINX_SCENARIOS = [n for n in sorted(SCENARIOS) if n != "single-instance"]


@pytest.mark.parametrize("name", NGINX_SCENARIOS)
def test_nginx_t_accepts_rendered_config(name: str, tmp_path: Path) -> None:
    nginx = require_tool("nginx", "nginx-light")
    tree = render_tree(scenario_args(name), tmp_path / "root")
    confs = list((tree / "etc/nginx/conf.d").glob("*.conf"))
    assert len(confs) == 1
    result = nginx_test(nginx, nginx_wrapper(tmp_path, str(confs[0])), tmp_path)
    assert result.returncode == 0, result.stderr


# The longest name config accepts: variable names and regex captures derived from it must
# still fit nginx's variables hash (bucket 64) and PCRE2's 32-character capture names.
LONGEST_NAME = "d" + "-x" * 19 + "y"


@pytest.mark.parametrize("name", NGINX_SCENARIOS)
def test_nginx_t_accepts_the_longest_deployment_name(name: str, tmp_path: Path) -> None:
    nginx = require_tool("nginx", "nginx-light")
    assert len(LONGEST_NAME) == 40
    tree = render_tree(with_options(scenario_args(name), "--name", LONGEST_NAME), tmp_path / "root")
    (conf,) = (tree / "etc/nginx/conf.d").glob("*.conf")
    assert conf.name == f"{LONGEST_NAME}.conf"
    result = nginx_test(nginx, nginx_wrapper(tmp_path, str(conf)), tmp_path)
    assert result.returncode == 0, result.stderr


def test_nginx_t_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check above can fail: a stray brace is caught."""
    nginx = require_tool("nginx", "nginx-light")
    conf = tmp_path / "broken.conf"
    conf.write_text("upstream x { server 127.0.0.1:1; }}\n")
    assert nginx_test(nginx, nginx_wrapper(tmp_path, str(conf)), tmp_path).returncode != 0


def test_emit_nginx_works_inside_debian_stock_nginx_conf(tmp_path: Path) -> None:
    """`--emit nginx | tee /etc/nginx/conf.d/x.conf` with Debian's own nginx.conf."""
    nginx = require_tool("nginx", "nginx-light")
    stock = Path("/etc/nginx")
    if not (stock / "nginx.conf").exists():
        pytest.fail("Debian's /etc/nginx/nginx.conf is missing: install nginx-light")
    etc = tmp_path / "etc-nginx"
    shutil.copytree(stock, etc, symlinks=True)
    (etc / "conf.d").mkdir(exist_ok=True)
    result = CliRunner().invoke(app, ["render", "Qwen/Qwen2.5-0.5B", "-n", "4", "--emit", "nginx"], catch_exceptions=False)
    (etc / "conf.d" / "vllm.conf").write_text(result.stdout)
    main = etc / "nginx.conf"
    text = main.read_text().replace("/etc/nginx/", f"{etc}/").replace("/run/nginx.pid", f"{tmp_path}/nginx.pid")
    main.write_text(text)
    assert f"include {etc}/conf.d/*.conf;" in text
    # Debian's prefix: modules-enabled/ loads modules by paths relative to it.
    check = nginx_test(nginx, main, Path("/usr/share/nginx"))
    assert check.returncode == 0, check.stderr


SYSTEMD_SCENARIOS = [n for n in sorted(SCENARIOS) if "supervisord" not in n]


@pytest.mark.parametrize("name", SYSTEMD_SCENARIOS)
def test_systemd_analyze_verify_is_clean(name: str, tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    tree = render_tree(with_options(scenario_args(name), "--backend", "systemd"), tmp_path / "root")
    unit_dir = tree / "etc/systemd/system"
    units = sorted(p.name for p in unit_dir.iterdir())
    assert any(u.endswith(".target") for u in units) and any(u.endswith(".service") for u in units)
    result = subprocess.run([analyze, "verify", *units], cwd=unit_dir, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", f"systemd-analyze verify warned:\n{result.stderr}"


def test_systemd_analyze_verify_catches_unknown_keys(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported on stderr."""
    analyze = require_tool("systemd-analyze", "systemd")
    unit = tmp_path / "typo.service"
    unit.write_text(f"[Service]\nExecStart={VFGEN_BIN} --version\nRestrt=always\n")
    result = subprocess.run([analyze, "verify", unit.name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "Unknown key" in result.stderr


def _exec_start_words(unit_text: str) -> str:
    return re.search(r"^ExecStart=(.*)$", unit_text, re.M).group(1)


@pytest.mark.parametrize("name", [n for n in sorted(SCENARIOS) if n.startswith(("four", "supervisord"))])
def test_supervisord_parser_reads_back_every_argv(name: str, tmp_path: Path) -> None:
    """supervisord's real parser (configparser + %-expansion + shlex) yields the planned argv."""
    try:
        from supervisor.options import ServerOptions
    except ImportError:
        missing("the supervisor Python package", "pip install supervisor (the test extra)")

    from vfgen.plan import build_plan

    args = scenario_args(name)
    if "--backend" not in args:
        # supervisord refuses unknown users; `nobody` exists on every Debian host.
        args = with_options(args, "--backend", "supervisord", "--user", "nobody")
    args = with_options(args, "--log-dir", str(tmp_path))
    tree = render_tree(args, tmp_path / "root")
    conf = next((tree / "etc/supervisor/conf.d").glob("*.conf"))
    main = tmp_path / "supervisord.conf"
    main.write_text(f"[supervisord]\nlogfile={tmp_path}/sd.log\npidfile={tmp_path}/sd.pid\n[include]\nfiles={conf}\n")
    opts = ServerOptions()
    opts.configfile = str(main)
    opts.process_config(do_usage=False)
    programs = {p.name: p for group in opts.process_group_configs for p in group.process_configs}

    split = None if "--" not in args else args.index("--")
    cli_args = args if split is None else args[:split]
    extra = [] if split is None else args[split + 1:]
    opts_dict = _cli_opts(cli_args, extra)
    plan = build_plan(load_deployment(opts_dict))
    assert sorted(programs) == sorted(i.name for i in plan.instances)
    for inst in plan.instances:
        assert shlex.split(programs[inst.name].command) == list(inst.supervisor_command)


def _cli_opts(args: list[str], extra: list[str]) -> dict:
    """Parse a scenario's CLI args the way typer would, via the real command (without running it)."""
    import typer.main

    command = typer.main.get_command(app).commands["render"]
    ctx = command.make_context("render", [*args, *(["--", *extra] if extra else [])], resilient_parsing=False)
    params = dict(ctx.params)
    for key in ("emit", "output_dir", "dry_run", "only"):
        params.pop(key, None)
    return params
