"""The `vfgen` command line: options and help only; every command calls into vfgen.commands.

Domain errors (VfgenError) become one red `Error:` line and exit 1; usage errors (an unknown
option, a number that is not a number, a value outside an option's choices) exit 2, and
`vfgen health check` exits 3 (UNKNOWN) for both.

The shape, compared with fastapi-cli (fastapi/fastapi-cli, src/fastapi_cli/cli.py), a
well-kept typer CLI: the same split (cli.py holds options and help, the work lives in other
modules; a domain exception becomes one red error line and exit 1, typer's usage errors
exit 2) and the same declarations (`Annotated[type, typer.Option(...)]` parameters). Where
it differs, and why: fastapi-cli's `dev` and `run` spell their six options out twice, inline,
which is cheap for two commands whose options exist only on the command line. vfgen's
deployment options are ~60, shared by seven commands (render, plan, health check, rollout,
apply, lora load/unload), and each one is also a key of the deployment file, with an error
label config must use and a README row. Spelled out per command they were four hand-synced
tables. So they are declared once, as data, in vfgen/options.py, and `deployment_command`
builds each command's signature from that table: `inspect.Signature` of `Annotated[...,
typer.Option(...)]` parameters, which typer reads through `inspect.signature` exactly as it
reads a hand-written function. That is typer's documented API (Annotated options, a
`parser` for choices, rich_help_panel), nothing of its internals; typer is pinned to its 0.29 series
(pyproject.toml) because its 0.x minors change the usage-error texts. Help stays plain text
(fastapi-cli uses rich): `_PanelCommand`, given through typer's `cls=` hook, prints the
rich_help_panel groups with click's own formatter.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Annotated, Any, List, Optional

import typer
from typer.core import TyperCommand

from vfgen import __version__, options
from vfgen.errors import VfgenError

app = typer.Typer(
    help="Render systemd units or a supervisord conf for N vLLM instances per model, plus a stock-nginx dispatcher.",
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
health_app = typer.Typer(help="Probe instances and the dispatcher; wait for health.", no_args_is_help=True)
app.add_typer(health_app, name="health")
lora_app = typer.Typer(help="Load or unload a LoRA adapter on every instance of a model (runtime changes).", no_args_is_help=True)
app.add_typer(lora_app, name="lora")

_state = {"verbose": False}


@app.callback(invoke_without_command=True)
def _main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        typer.echo(f"vfgen {__version__}")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())
        raise typer.Exit(2)
    _state["verbose"] = verbose


# `vfgen health check` is a monitoring check: a broken check (config or usage error) must not
# read as "degraded" (1) or "down" (2), so it exits 3, UNKNOWN in the Nagios plugin convention.
UNKNOWN = 3


def _fail(exc: BaseException, code: int = 1) -> None:
    if _state["verbose"]:
        raise exc
    typer.secho(f"Error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


class _PanelCommand(TyperCommand):
    """Plain-text help with the options grouped by their `rich_help_panel` (Deployment, Instances ...).

    typer groups by panel only in its rich help; vfgen keeps plain help (it is read in
    terminals, logs and these tests alike), so the grouping is done here with click's own
    formatter: Arguments, the command's own Options, then the panels of vfgen/options.py.
    """

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            title = "Arguments" if param.param_type_name == "argument" else getattr(param, "rich_help_panel", None) or "Options"
            sections.setdefault(title, []).append(record)
        for title in ("Arguments", "Options", *options.PANELS):
            if title in sections:
                with formatter.section(title):
                    formatter.write_dl(sections[title])


class _CheckCommand(_PanelCommand):
    """A command whose usage errors (unknown option, bad number) exit UNKNOWN instead of 2."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            # Usage errors are the exceptions with click's usage exit code 2 (typer does not
            # export their class; it moved when typer vendored click).
            if getattr(exc, "exit_code", None) == 2:
                exc.exit_code = UNKNOWN
            raise


# --- deployment options: generated from the table in vfgen/options.py -----------------
# Defaults are None here so that only values the user typed reach the config;
# the defaults themselves live in vfgen.config (shown in the help texts).

_P = inspect.Parameter


def _choice(choices: tuple[str, ...]):
    def parse(value: str) -> str:
        if value not in choices:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(map(repr, choices))}.")
        return value
    return parse


def _parameter(o: options.Option) -> inspect.Parameter:
    """One table row as a typer parameter: `name: Annotated[type, typer.Option(...)] = absent`."""
    annotation: Any = List[o.type] if o.repeat else o.type
    absent = o.absent()
    if absent is None:
        annotation = Optional[annotation]
    common = dict(help=o.help_text(), metavar=o.metavar, show_default=False, rich_help_panel=o.panel)
    if o.choices:
        # A parser of our own rather than Literal: typer 0.29 checks Literal through pydantic,
        # whose message starts "Value error, ". This one says the value and the choices only.
        common.update(parser=_choice(o.choices), metavar=o.metavar or "<" + "|".join(o.choices) + ">")
    if o.type is Path:
        common.update(file_okay=o.file_okay, dir_okay=o.dir_okay)
    info = typer.Argument(**common) if o.argument else typer.Option(*o.flags, **common)
    return _P(o.name, _P.KEYWORD_ONLY, default=absent, annotation=Annotated[annotation, info])


_DEPLOYMENT_PARAMS = [_parameter(o) for o in options.DEPLOYMENT]


def load_deployment(opts: dict[str, Any]):
    """Deployment from CLI options: a one-model file in memory, or -f plus global overrides.

    Each option the user typed goes to the key `options.OPTIONS` gives it, in its scope:
    the top level, the one model, or `timeouts`.
    """
    from vfgen import config

    given: dict[options.Option, Any] = {}
    for o in options.TO_CONFIG:
        value = opts[o.name]
        value = list(value) if isinstance(value, tuple) else value
        if value is None or value is False or value == []:  # not typed (0 is a value)
            continue
        given[o] = config.parse_env_option(value) if o.name == "env" else value
    scoped: dict[str, dict[str, Any]] = {scope: {} for scope in options.SCOPES}
    for o, value in given.items():
        scoped[o.scope][o.config_key] = value
    overrides, model_opts, timeouts = scoped["global"], scoped["model"], scoped["timeouts"]
    if opts["file"] is not None:
        if model_opts:
            labels = [o.error_label for o in given if o.scope == "model"]
            raise config.ConfigError("--file", str(opts["file"]), f"cannot be combined with per-model options "
                                     f"({', '.join(labels)}); put them in the file")
        raw = config.read_file_mapping(opts["file"])
        # A flag replaces the file's key however the file spells it (port-start or port_start).
        raw = {k: val for k, val in raw.items() if str(k).replace("-", "_") not in overrides}
        raw.update(overrides)
        if timeouts:
            file_timeouts = raw.get("timeouts") or {}
            if isinstance(file_timeouts, dict):  # anything else is reported against the file below
                raw["timeouts"] = {**file_timeouts, **timeouts}
        cli_fields = frozenset(overrides) | frozenset(f"timeouts.{k}" for k in timeouts)
        return config.parse_deployment(raw, source=str(opts["file"]), cli_fields=cli_fields)
    if "model" not in model_opts:
        raise config.ConfigError("MODEL", None, "give a model id or path, or a deployment file with -f")
    raw = {"models": [model_opts], **overrides}
    if timeouts:
        raw["timeouts"] = timeouts
    return config.parse_deployment(raw, source=None)


def deployment_command(fn=None, *, optional: bool = False, error_exit: int = 1):
    """Give `fn` the shared deployment options of the table; it receives `deployment` instead.

    `fn`'s parameters before `deployment` are its own positional arguments: they come
    before MODEL (`vfgen lora load NAME PATH -f FILE`). A parameter named like a table
    option of this command (render's --emit ...) gets the table's declaration; the others
    keep their own typer declarations. With optional=True a command run without MODEL and
    -f gets deployment=None. Errors exit `error_exit`.

    The signature typer reads is built with `inspect.Signature` from `Annotated[type,
    typer.Option(...)]` parameters, typer's documented way to declare options; nothing
    here depends on typer's internals.
    """
    if fn is None:
        return functools.partial(deployment_command, optional=optional, error_exit=error_exit)
    names = list(inspect.signature(fn).parameters)
    own = [p for name, p in inspect.signature(fn).parameters.items() if name != "deployment"]
    own_args = own[:names.index("deployment")]
    own_opts = own[names.index("deployment"):]
    table = {o.name: o for o in options.for_command(fn.__name__) if o.commands is not None}
    missing = set(table) - {p.name for p in own_opts}
    assert not missing, f"{fn.__name__} lacks its table options {sorted(missing)}"
    own_opts = [_parameter(table[p.name]) if p.name in table else p for p in own_opts]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        opts = {p.name: kwargs.pop(p.name) for p in _DEPLOYMENT_PARAMS}
        try:
            absent = optional and opts["model"] is None and opts["file"] is None
            deployment = None if absent else load_deployment(opts)
            return fn(deployment=deployment, **kwargs)
        except VfgenError as exc:
            _fail(exc, error_exit)

    wrapper.__signature__ = inspect.Signature([p.replace(kind=_P.KEYWORD_ONLY) for p in own_args] + _DEPLOYMENT_PARAMS
                                              + [p.replace(kind=_P.KEYWORD_ONLY) for p in own_opts])
    return wrapper


def domain_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VfgenError as exc:
            _fail(exc)

    return wrapper


# --- commands --------------------------------------------------------------------


@app.command(cls=_PanelCommand)
@deployment_command
def render(deployment, emit, output_dir, dry_run, only, prune) -> None:
    """Render units (or a supervisord conf) and the nginx dispatcher for a deployment.

    Examples:

      vfgen render Qwen/Qwen2.5-0.5B -n 4 --emit nginx | sudo tee /etc/nginx/conf.d/vllm.conf

      vfgen render -f deploy.yaml --output-dir / --dry-run
    """
    from vfgen import commands

    commands.render(deployment, emit=emit, output_dir=output_dir, dry_run=dry_run, only=only, out=sys.stdout, prune=prune)


@app.command(cls=_PanelCommand)
@deployment_command
def plan(
    deployment,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    only=None,
) -> None:
    """Show placement (instance, GPU, port, memory share, start order) and, for local model dirs, the memory estimate."""
    from vfgen import commands

    commands.show_plan(deployment, as_json=as_json, out=sys.stdout, only=only)


@health_app.command("check", cls=_CheckCommand)
@deployment_command(optional=True, error_exit=UNKNOWN)
def health_check(
    deployment,
    url: Optional[List[str]] = typer.Option(None, "--url", help="Probe this base URL instead of a deployment (repeatable)."),
    model_name: Optional[str] = typer.Option(None, "--expect-model", help="With --url: the served name each URL must list."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    timeout: float = typer.Option(2.0, help="Seconds per probe."),
) -> None:
    """Probe every instance and the dispatcher of a deployment (same arguments as render), or --url URLs.

    Exit codes, as for a Nagios check: 0 all healthy, 1 degraded (some not
    healthy), 2 nothing serving (all down, or the dispatcher down), 3 unknown
    (the check itself is wrong: a config or usage error).
    """
    from vfgen import commands

    raise typer.Exit(commands.health_check(deployment, urls=url or [], expected_model=model_name, as_json=as_json, timeout=timeout))


@health_app.command("wait")
@domain_errors
def health_wait(
    urls: List[str] = typer.Argument(..., help="Base URLs of the instances to wait for."),
    timeout: float = typer.Option(900.0, help="Give up after this many seconds (exit 1)."),
    model: Optional[str] = typer.Option(None, help="Served name /v1/models must list; any model when absent."),
    pid: Optional[int] = typer.Option(None, help="Fail at once if this process dies (systemd passes $MAINPID)."),
    interval: float = typer.Option(1.0, help="Seconds between probes."),
) -> None:
    """Block until /health is 200 and /v1/models lists the model."""
    from vfgen import health

    raise typer.Exit(health.wait(list(urls), model=model, timeout=timeout, pid=pid, interval=interval))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def launch(ctx: typer.Context) -> None:
    """Used by the rendered units: take the per-GPU start lock, start vLLM, release when healthy."""
    from vfgen import launch as launcher

    raise typer.Exit(launcher.main(list(ctx.args)))


@app.command(cls=_PanelCommand)
@deployment_command
def rollout(
    deployment,
    timeout: Optional[float] = typer.Option(None, help="Seconds each instance may take to be healthy again. [default: --start-timeout]"),
    supervisorctl: Optional[str] = typer.Option(None, help="supervisorctl command line, e.g. 'supervisorctl -c /etc/supervisor/supervisord.conf'."),
    systemctl: Optional[str] = typer.Option(None, help="systemctl command line. [default: systemctl]"),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Root the files live under, for draining through nginx. [default: /]", file_okay=False),
    nginx: Optional[str] = typer.Option(None, help="nginx command line; -t and -s reload are added. [default: nginx]"),
    drain: bool = typer.Option(True, "--drain/--no-drain", help="Mark each instance down in nginx and let its requests finish before the restart (needs nginx on this host)."),
) -> None:
    """Restart instances one at a time, each drained first and healthy again before the next."""
    from vfgen import commands

    raise typer.Exit(commands.rollout(deployment, timeout=timeout, supervisorctl=supervisorctl, systemctl=systemctl,
                                      output_dir=output_dir, nginx=nginx, drain=drain))


@lora_app.command("load", cls=_PanelCommand)
@deployment_command
def lora_load(
    adapter_name: str = typer.Argument(..., metavar="NAME", help="Adapter name clients will send as \"model\"."),
    adapter_path: str = typer.Argument(..., metavar="PATH", help="Absolute adapter directory on the instances' host, or a Hugging Face id."),
    deployment=None,
    lora_model: Optional[str] = typer.Option(None, "--model", help="Model key or served name. [default: the only model serving LoRA]"),
    timeout: float = typer.Option(60.0, help="Seconds each instance may take to load the adapter."),
) -> None:
    """Load adapter NAME from PATH on every instance of a model; report which instances failed.

    Needs allow_runtime_lora_updating in the deployment (same arguments as render):

      vfgen lora load support-bot /srv/adapters/support-bot -f deploy.yaml
    """
    from vfgen import lora
    from vfgen.plan import build_plan

    # The instances are called directly, never nginx: a GPU host has no API key file to read.
    raise typer.Exit(lora.change(build_plan(deployment, nginx=False), "load", adapter_name, adapter_path, model=lora_model,
                                 timeout=timeout, out=sys.stdout, err=sys.stderr))


@lora_app.command("unload", cls=_PanelCommand)
@deployment_command
def lora_unload(
    adapter_name: str = typer.Argument(..., metavar="NAME", help="Adapter to unload."),
    deployment=None,
    lora_model: Optional[str] = typer.Option(None, "--model", help="Model key or served name. [default: the only model serving LoRA]"),
    timeout: float = typer.Option(60.0, help="Seconds each instance may take."),
) -> None:
    """Unload adapter NAME from every instance of a model; report which instances failed."""
    from vfgen import lora
    from vfgen.plan import build_plan

    # The instances are called directly, never nginx: a GPU host has no API key file to read.
    raise typer.Exit(lora.change(build_plan(deployment, nginx=False), "unload", adapter_name, None, model=lora_model,
                                 timeout=timeout, out=sys.stdout, err=sys.stderr))


@app.command(cls=_PanelCommand)
@deployment_command
def apply(
    deployment,
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Root the files live under. [default: /]", file_okay=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the ordered plan (stop, remove, write, reload, restart, start, with reasons) and change nothing."),
    supervisorctl: Optional[str] = typer.Option(None, help="supervisorctl command line, e.g. 'supervisorctl -c /etc/supervisor/supervisord.conf'. [default: supervisorctl]"),
    systemctl: Optional[str] = typer.Option(None, help="systemctl command line. [default: systemctl]"),
    nginx: Optional[str] = typer.Option(None, help="nginx command line; apply adds -t to check and -s reload to reload. [default: nginx]"),
) -> None:
    """Change the running deployment on this host into the rendered one, without losing a request.

    Compares with the manifest of what vfgen installed, then: drains and stops removed
    instances, restarts changed ones one at a time (drained first, healthy before the
    next), starts new ones, keeping every GPU's share sum within the budget; nginx is
    checked with `nginx -t` before every reload.

    Example: vfgen apply -f deploy.yaml --dry-run
    """
    from vfgen import commands

    commands.apply(deployment, output_dir=output_dir, dry_run=dry_run, systemctl=systemctl,
                   supervisorctl=supervisorctl, nginx=nginx, out=sys.stdout)


@app.command()
@domain_errors
def demo(keep: bool = typer.Option(False, "--keep", help="Keep the temporary directory (rendered files, logs).")) -> None:
    """Run a two-model deployment with stand-in vLLM backends under nginx + supervisord, show routing, tear down.

    Needs nginx and supervisord installed (Debian: apt-get install nginx-light supervisor); no GPU.
    """
    from vfgen.demo import run_demo

    raise typer.Exit(run_demo(sys.stdout, keep=keep))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
