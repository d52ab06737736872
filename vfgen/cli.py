"""The `vfgen` command line: options only; every command calls into the core modules.

Domain errors (VfgenError) become one red `Error:` line and exit 1; usage
errors (unknown option, a number that is not a number) exit 2.
"""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path
from typing import Any, List, Optional

import typer
from typer.core import TyperCommand

try:  # typer >= 0.25 vendors its own click; its usage errors are not click's
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer on real click
    from click.exceptions import UsageError

from vfgen import __version__
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


class _CheckCommand(TyperCommand):
    """A command whose usage errors (unknown option, bad number) exit UNKNOWN instead of 2."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            exc.exit_code = UNKNOWN
            raise


# --- deployment options shared by render, plan, health check and rollout ---------
# Defaults are None here so that only values the user typed reach the config;
# the defaults themselves live in vfgen.config (shown in the help texts).

_P = inspect.Parameter
_OPTS = typer.Option
_DEPLOYMENT_PARAMS = [
    ("model", Optional[str], typer.Argument(None, metavar="MODEL", help="Hugging Face id or local path of the model (or use -f).", show_default=False)),
    ("vllm_args", Optional[List[str]], typer.Argument(None, metavar="[-- VLLM_ARGS...]", help="Arguments after -- go to every `vllm serve` unchanged.", show_default=False)),
    ("file", Optional[Path], _OPTS(None, "--file", "-f", help="Deployment YAML file (several models).", dir_okay=False)),
    ("name", Optional[str], _OPTS(None, help="Deployment name: prefix of units, upstreams, files. [default: vllm]")),
    ("instances", Optional[int], _OPTS(None, "--instances", "-n", help="vLLM instances of the model. [default: 1]")),
    ("max_batch_size", Optional[int], _OPTS(None, help="--max-num-seqs of each instance, and its concurrency cap in nginx. [default: 32]")),
    ("port", Optional[int], _OPTS(None, help="Port clients connect to (nginx, or vLLM itself with one instance). [default: 8000]")),
    ("port_start", Optional[int], _OPTS(None, help="First backend port; instances use consecutive ports. [default: 9100]")),
    ("host", Optional[str], _OPTS(None, help="Address the backends bind to. [default: 127.0.0.1]")),
    ("listen", Optional[str], _OPTS(None, help="Address the dispatcher binds to. [default: 127.0.0.1]")),
    ("gpu_memory_utilization", Optional[str], _OPTS(None, help="Per-instance memory share, or auto = budget / instances on the GPU. [default: auto]")),
    ("memory_budget", Optional[float], _OPTS(None, help="Share of each GPU all instances may use together. [default: 0.92]")),
    ("cuda_devices", Optional[str], _OPTS(None, help="GPU ids for the instances, comma-separated; instances are spread round robin. [default: 0]")),
    ("tensor_parallel_size", Optional[int], _OPTS(None, help="GPUs per instance. [default: 1]")),
    ("routing", Optional[str], _OPTS(None, help="How nginx picks a backend: least_conn, shape, prefix (same conversation start -> same backend) or session. [default: least_conn]")),
    ("prefix_bytes", Optional[int], _OPTS(None, help="prefix/session routing: bytes of the first message and of the first user message in the key. [default: 256]")),
    ("session_header", Optional[str], _OPTS(None, help="session routing: request header naming the session (else the OpenAI `user` field, else prefix).")),
    ("enable_request_affinity", bool, _OPTS(False, "--enable-request-affinity", help="Old name of --routing shape: same JSON shape -> same backend while it has room.")),
    ("max_queue", Optional[int], _OPTS(None, help="Requests each backend may hold beyond its cap; past that clients get 503 + Retry-After. [default: unbounded]")),
    ("max_body_size", Optional[str], _OPTS(None, help="Largest request body, nginx size syntax. [default: 32m]")),
    ("dtype", Optional[str], _OPTS(None, help="vLLM --dtype.")),
    ("enforce_eager", bool, _OPTS(False, "--enforce-eager", help="vLLM --enforce-eager (no CUDA graphs).")),
    ("io_processor_plugin", Optional[str], _OPTS(None, help="vLLM --io-processor-plugin.")),
    ("max_model_len", Optional[int], _OPTS(None, help="vLLM --max-model-len.")),
    ("served_model_name", Optional[List[str]], _OPTS(None, help="Name clients use (repeat for aliases). [default: MODEL]")),
    ("vllm_bin", Optional[str], _OPTS(None, help="Path of the vllm executable. [default: vllm]")),
    ("vfgen_bin", Optional[str], _OPTS(None, help="Path of this vfgen executable as the units should call it. [default: vfgen if systemd's search path has it, else this vfgen's absolute path]")),
    ("user", Optional[str], _OPTS(None, help="System user the instances run as. [default: vllm]")),
    ("env", Optional[List[str]], _OPTS(None, "--env", "-e", help="KEY=VALUE for every instance (repeatable). Lands in the unit or conf file: no secrets.")),
    ("env_file", Optional[str], _OPTS(None, help="KEY=VALUE file read when an instance starts, for secrets such as HF_TOKEN; keep it mode 0600.")),
    ("backend", Optional[str], _OPTS(None, help="Process manager: systemd or supervisord. [default: systemd]")),
    ("start_timeout", Optional[int], _OPTS(None, help="Seconds an instance may take to become healthy, counted once it holds its GPU start lock. [default: 900]")),
    ("lock_timeout", Optional[int], _OPTS(None, help="Seconds an instance may wait for its GPU start lock. [default: (instances sharing its GPUs - 1) x (start timeout + 30)]")),
    ("shutdown_timeout", Optional[int], _OPTS(None, help="vLLM --shutdown-timeout: seconds in-flight requests get on stop. [default: 30]")),
    ("read_timeout", Optional[int], _OPTS(None, help="nginx proxy_read_timeout in seconds. [default: 3600]")),
    ("fail_timeout", Optional[int], _OPTS(None, help="Seconds nginx skips a failed backend. [default: 5]")),
    ("lock_dir", Optional[str], _OPTS(None, help="Directory of the per-GPU start locks. [default: /run/vfgen/locks]")),
    ("log_dir", Optional[str], _OPTS(None, help="supervisord log directory (must exist). [default: /var/log/supervisor]")),
    ("gpu_memory", Optional[str], _OPTS(None, help="Memory of each GPU (e.g. 80GiB or 81920MiB; GB means 10^9 bytes) to check shares against local model dirs. [default: nvidia-smi, if present]")),
    ("upstream_host", Optional[List[str]], _OPTS(None, help="Address of a GPU host running the backends (repeat); renders a remote load balancer.")),
    ("api_key_file", Optional[str], _OPTS(None, help="File of API keys, one per line, mode 0600; nginx answers 401 without one. [default: no keys]")),
    ("tls_certificate", Optional[str], _OPTS(None, help="TLS certificate (PEM) for the dispatcher; needs --tls-certificate-key.")),
    ("tls_certificate_key", Optional[str], _OPTS(None, help="TLS private key (PEM) for the dispatcher.")),
    ("rate_limit", Optional[str], _OPTS(None, help="Requests per client address, e.g. 20r/s or 600r/m; past it 429. [default: none]")),
    ("rate_limit_burst", Optional[int], _OPTS(None, help="Requests over --rate-limit a client may send at once. [default: one second's worth]")),
    ("nginx_dir", Optional[str], _OPTS(None, help="nginx's directory on the dispatcher host; the keys map is included from there. [default: /etc/nginx]")),
    ("lora_module", Optional[List[str]], _OPTS(None, "--lora-module", help="NAME=PATH of a LoRA adapter every instance serves; NAME routes to the model (repeatable).")),
    ("enable_lora", bool, _OPTS(False, "--enable-lora", help="vLLM --enable-lora without adapters at start (implied by --lora-module).")),
    ("max_lora_rank", Optional[int], _OPTS(None, help="vLLM --max-lora-rank: the largest adapter rank. [default: vLLM's, 16]")),
    ("max_loras", Optional[int], _OPTS(None, help="vLLM --max-loras: adapters in one batch (GPU slots). [default: vLLM's, 1]")),
    ("max_cpu_loras", Optional[int], _OPTS(None, help="vLLM --max-cpu-loras: adapters cached in CPU memory. [default: --max-loras]")),
    ("allow_runtime_lora_updating", bool, _OPTS(False, "--allow-runtime-lora-updating", help="Let `vfgen lora load/unload` change adapters on the (loopback-only) instances; nginx still refuses those calls.")),
    ("access_log", Optional[str], _OPTS(None, help="nginx access log: default (nginx.conf's) or json (one object per request, backends tried, X-Request-Id). [default: default]")),
    ("access_log_path", Optional[str], _OPTS(None, help="File of the JSON access log. [default: /var/log/nginx/NAME.access.json]")),
    ("nginx_exporter", bool, _OPTS(False, "--nginx-exporter", help="Render a prometheus-nginx-exporter unit, nginx's loopback stub_status for it, and its scrape target.")),
    ("nginx_exporter_port", Optional[int], _OPTS(None, help="Loopback port of the prometheus-nginx-exporter unit. [default: 9113]")),
    ("nginx_status_port", Optional[int], _OPTS(None, help="Loopback port of nginx's stub_status for the exporter. [default: 9112]")),
]
_GLOBAL_OPTIONS = {
    "name": "name", "port": "port", "port_start": "port_start", "host": "host", "listen": "listen",
    "memory_budget": "memory_budget", "max_queue": "max_queue", "max_body_size": "max_body_size",
    "vllm_bin": "vllm_bin", "vfgen_bin": "vfgen_bin", "user": "user", "backend": "backend",
    "lock_dir": "lock_dir", "log_dir": "log_dir", "upstream_host": "upstream_hosts", "gpu_memory": "gpu_memory",
    "api_key_file": "api_key_file", "tls_certificate": "tls_certificate", "tls_certificate_key": "tls_certificate_key",
    "rate_limit": "rate_limit", "rate_limit_burst": "rate_limit_burst", "nginx_dir": "nginx_dir",
    "access_log": "access_log", "access_log_path": "access_log_path", "nginx_exporter_port": "nginx_exporter_port",
    "nginx_status_port": "nginx_status_port",
}
_GLOBAL_FLAGS = {"allow_runtime_lora_updating": "allow_runtime_lora_updating", "nginx_exporter": "nginx_exporter"}
_TIMEOUT_OPTIONS = {"start_timeout": "start", "shutdown_timeout": "shutdown", "read_timeout": "read", "fail_timeout": "fail",
                    "lock_timeout": "lock"}
_MODEL_OPTIONS = {
    "instances": "instances", "max_batch_size": "max_batch_size", "gpu_memory_utilization": "gpu_memory_utilization",
    "cuda_devices": "gpus", "tensor_parallel_size": "tensor_parallel_size", "dtype": "dtype",
    "io_processor_plugin": "io_processor_plugin", "max_model_len": "max_model_len",
    "served_model_name": "served_model_name", "vllm_args": "extra_args", "env_file": "env_file",
    "lora_module": "lora_modules", "max_lora_rank": "max_lora_rank", "max_loras": "max_loras",
    "max_cpu_loras": "max_cpu_loras",
    "routing": "routing", "prefix_bytes": "prefix_bytes", "session_header": "session_header",
}
_MODEL_FLAGS = {"enable_request_affinity": "enable_request_affinity", "enforce_eager": "enforce_eager",
                "enable_lora": "enable_lora"}


def load_deployment(opts: dict[str, Any]):
    """Deployment from CLI options: a one-model file in memory, or -f plus global overrides."""
    from vfgen import config

    opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}
    opts = {k: (None if v == [] else v) for k, v in opts.items()}
    overrides: dict[str, Any] = {k2: opts[k] for k, k2 in _GLOBAL_OPTIONS.items() if opts[k] is not None}
    overrides.update({k2: True for k, k2 in _GLOBAL_FLAGS.items() if opts[k]})
    timeouts = {k2: opts[k] for k, k2 in _TIMEOUT_OPTIONS.items() if opts[k] is not None}
    model_opts = {k2: opts[k] for k, k2 in _MODEL_OPTIONS.items() if opts[k] is not None}
    model_opts.update({k2: True for k, k2 in _MODEL_FLAGS.items() if opts[k]})
    if opts["env"]:
        model_opts["env"] = config.parse_env_option(opts["env"])
    if opts["file"] is not None:
        if opts["model"] is not None or model_opts:
            given = ["MODEL"] * (opts["model"] is not None) + sorted(model_opts)
            raise config.ConfigError("--file", str(opts["file"]), f"cannot be combined with per-model options ({', '.join(given)}); put them in the file")
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
    if opts["model"] is None:
        raise config.ConfigError("MODEL", None, "give a model id or path, or a deployment file with -f")
    raw = {"models": [{"model": opts["model"], **model_opts}], **overrides}
    if timeouts:
        raw["timeouts"] = timeouts
    return config.parse_deployment(raw, source=None)


def deployment_command(fn=None, *, optional: bool = False, error_exit: int = 1):
    """Give `fn` the shared deployment options; it receives `deployment` instead.

    With optional=True a command run without MODEL and -f gets deployment=None.
    Errors exit `error_exit`.
    """
    if fn is None:
        return functools.partial(deployment_command, optional=optional, error_exit=error_exit)
    own = [p for name, p in inspect.signature(fn).parameters.items() if name != "deployment"]
    params = [_P(name, _P.KEYWORD_ONLY, default=default, annotation=annot) for name, annot, default in _DEPLOYMENT_PARAMS]
    # The command's own arguments come before MODEL and [-- VLLM_ARGS...] (`vfgen lora load NAME PATH -f FILE`).
    own_args = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]
    own = [p for p in own if p not in own_args]

    @functools.wraps(fn)
    def wrapper(**kwargs):
        opts = {name: kwargs.pop(name) for name, _, _ in _DEPLOYMENT_PARAMS}
        try:
            absent = optional and opts["model"] is None and opts["file"] is None
            deployment = None if absent else load_deployment(opts)
            return fn(deployment=deployment, **kwargs)
        except VfgenError as exc:
            _fail(exc, error_exit)

    wrapper.__signature__ = inspect.Signature([p.replace(kind=_P.KEYWORD_ONLY) for p in own_args] + params
                                              + [p.replace(kind=_P.KEYWORD_ONLY) for p in own])
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


@app.command()
@deployment_command
def render(
    deployment,
    emit: Optional[str] = typer.Option(None, help="Print one artefact to stdout: nginx, supervisord, prometheus, prometheus-rules, nginx-exporter, a file name or a path."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Write the tree (etc/systemd/system/..., etc/nginx/conf.d/...) under DIR, atomically.", file_okay=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be created or changed under --output-dir (default /) and write nothing."),
    only: str = typer.Option("all", help="all, backends (units only) or dispatcher (nginx only, e.g. on a load-balancer host)."),
    prune: bool = typer.Option(False, "--prune", help="Delete `stale` files: written there by vfgen before (see its manifest), no longer rendered, unchanged since."),
) -> None:
    """Render units (or a supervisord conf) and the nginx dispatcher for a deployment.

    Examples:

      vfgen render Qwen/Qwen2.5-0.5B -n 4 --emit nginx | sudo tee /etc/nginx/conf.d/vllm.conf

      vfgen render -f deploy.yaml --output-dir / --dry-run
    """
    from vfgen import commands

    commands.render(deployment, emit=emit, output_dir=output_dir, dry_run=dry_run, only=only, out=sys.stdout, prune=prune)


@app.command()
@deployment_command
def plan(
    deployment,
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Show placement (instance, GPU, port, memory share, start order) and, for local model dirs, the memory estimate."""
    from vfgen import commands

    commands.show_plan(deployment, as_json=as_json, out=sys.stdout)


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


@app.command()
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


@lora_app.command("load")
@deployment_command
def lora_load(
    deployment,
    adapter_name: str = typer.Argument(..., metavar="NAME", help="Adapter name clients will send as \"model\"."),
    adapter_path: str = typer.Argument(..., metavar="PATH", help="Absolute adapter directory on the instances' host, or a Hugging Face id."),
    lora_model: Optional[str] = typer.Option(None, "--model", help="Model key or served name. [default: the only model serving LoRA]"),
    timeout: float = typer.Option(60.0, help="Seconds each instance may take to load the adapter."),
) -> None:
    """Load adapter NAME from PATH on every instance of a model; report which instances failed.

    Needs allow_runtime_lora_updating in the deployment (same arguments as render):

      vfgen lora load support-bot /srv/adapters/support-bot -f deploy.yaml
    """
    from vfgen import lora
    from vfgen.plan import build_plan

    raise typer.Exit(lora.change(build_plan(deployment), "load", adapter_name, adapter_path, model=lora_model,
                                 timeout=timeout, out=sys.stdout, err=sys.stderr))


@lora_app.command("unload")
@deployment_command
def lora_unload(
    deployment,
    adapter_name: str = typer.Argument(..., metavar="NAME", help="Adapter to unload."),
    lora_model: Optional[str] = typer.Option(None, "--model", help="Model key or served name. [default: the only model serving LoRA]"),
    timeout: float = typer.Option(60.0, help="Seconds each instance may take."),
) -> None:
    """Unload adapter NAME from every instance of a model; report which instances failed."""
    from vfgen import lora
    from vfgen.plan import build_plan

    raise typer.Exit(lora.change(build_plan(deployment), "unload", adapter_name, None, model=lora_model,
                                 timeout=timeout, out=sys.stdout, err=sys.stderr))


@app.command()
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
