"""Format a Plan into file contents with Jinja2 templates; no decisions are made here.

Templates live in the repository's templates/ folder and ship inside the wheel
as vfgen/templates. The Jinja environment is built once, with StrictUndefined
so a missing value is an error rather than an empty string, and with a
finalize that lets only a `quoting.Quoted` (made by a quoting filter) or an
int reach the output: a template that interpolates a plain string fails to
render, naming its file and line. Every number, path, name, answer and map
comes from the Plan (vfgen/plan.py); render reads no file but its templates.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from vfgen import __version__, quoting
from vfgen.errors import RenderError
from vfgen.plan import DISPATCHER_KINDS, Instance, OutputFile, Plan


@dataclass(frozen=True)
class Artefact:
    kind: str  # nginx | nginx-exporter | systemd | supervisord | prometheus | prometheus-rules
    path: str  # relative to the output root, e.g. etc/nginx/conf.d/vllm.conf
    content: str
    mode: int = 0o644

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def secret(self) -> bool:
        """Readable by its owner only (API keys): never printed unless asked for by name."""
        return not self.mode & 0o077


def templates_dir() -> Path:
    packaged = Path(__file__).parent.joinpath("templates")
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.joinpath("templates")


class UnquotedValue(RenderError):
    """A template interpolated a value that no quoting filter made (a bug in the template)."""


def _finalize(value: object) -> object:
    """Every `{{ ... }}`: a Quoted (a quoting filter's result) or an int passes; a str, float,
    bool, None or anything else is refused, so no template can emit a value unquoted."""
    if isinstance(value, quoting.Quoted) or type(value) is int:
        return value
    raise UnquotedValue(f"{_template_position()}: {type(value).__name__} {value!r} reaches the output unquoted; "
                        "pass it through the quoting filter of its syntax (vfgen/quoting.py)")


def _template_position() -> str:
    """templates/FILE:LINE of the template code that called finalize (Jinja's debug_info maps the line)."""
    frame = sys._getframe(1)
    while frame is not None:
        info = frame.f_globals.get("debug_info")
        if isinstance(info, str) and "environment" in frame.f_globals:
            pairs = [tuple(map(int, x.split("="))) for x in info.split("&")] if info else []
            line = next((t for t, code in reversed(pairs) if code <= frame.f_lineno), 1)
            name = frame.f_globals.get("name")
            return f"templates/{name}:{line}" if name else f"<template>:{line}"
        frame = frame.f_back
    return "<template>:?"


class _Environment(jinja2.Environment):
    # A macro's (or the whole template's) output is template text plus values that passed
    # finalize: quoted by construction, so `{{ macro() }}` may be emitted.
    concat = staticmethod(quoting.template_output)


def make_environment(loader: jinja2.BaseLoader) -> jinja2.Environment:
    env = _Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        finalize=_finalize,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(
        comment=quoting.comment,
        nginx_str=quoting.nginx_str,
        nginx_regex=quoting.nginx_regex,
        nginx_exact_key=quoting.nginx_exact_key,
        nginx_vars=quoting.nginx_vars,
        nginx_var=quoting.nginx_var,
        nginx_name=quoting.nginx_name,
        nginx_token=quoting.nginx_token,
        nginx_json=quoting.nginx_json,
        nginx_log_format=quoting.nginx_log_format,
        systemd_exec=quoting.systemd_exec,
        systemd_env=quoting.systemd_env,
        systemd_value=quoting.systemd_value,
        systemd_unit=quoting.systemd_unit,
        systemd_path=quoting.systemd_path,
        supervisor_command=quoting.supervisor_command,
        supervisor_value=quoting.supervisor_value,
        supervisor_name=quoting.supervisor_name,
        yaml_str=quoting.yaml_str,
        json_document=quoting.json_document,
        rstrip=quoting.rstrip,
        nginx_api_key_entry=quoting.nginx_api_key_entry,
    )
    return env


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return make_environment(jinja2.FileSystemLoader(str(templates_dir())))


def render_template(name: str, env: jinja2.Environment | None = None, **context) -> str:
    try:
        return str((env or environment()).get_template(name).render(version=__version__, **context))
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"{exc.filename or name}:{exc.lineno}: {exc.message}") from exc
    except (jinja2.UndefinedError, quoting.QuotingError, TypeError) as exc:
        raise RenderError(f"{name}:{_template_line(name)}: {exc}") from exc


def _template_line(name: str) -> str:
    """Line of the failing template, found in the traceback Jinja rewrote."""
    tb = sys.exc_info()[2]
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


def render_all(plan: Plan, dispatcher: bool = True) -> list[Artefact]:
    """Every file of the plan, for both process backends, in the plan's order.

    dispatcher=False leaves the load balancer's files out (nginx, its keys, its
    exporter), so a GPU host renders its backends from a plan built with nginx=False.
    """
    return [render_file(plan, f, dispatcher=dispatcher) for f in plan.files
            if dispatcher or f.kind not in DISPATCHER_KINDS]


def render_file(plan: Plan, f: OutputFile, dispatcher: bool = True) -> Artefact:
    """One file of `plan.files`; `dispatcher` says whether the dispatcher host's exporter is a scrape target."""
    if f.kind in DISPATCHER_KINDS and plan.nginx is None:
        raise RenderError(f"{f.path}: the plan was built without its dispatcher part (build_plan(nginx=False))")
    if f.role == "nginx":
        content = render_nginx(plan)
    elif f.role == "api-keys":
        content = render_api_keys(plan)
    elif f.role == "nginx-exporter":
        content = render_nginx_exporter(plan)
    elif f.role == "unit":
        content = render_unit(plan, next(i for i in plan.instances if i.name == f.instance))
    elif f.role == "target":
        content = render_template("systemd/deployment.target.j2", d=plan.deployment, plan=plan)
    elif f.role == "supervisord":
        content = render_supervisord(plan)
    elif f.role == "prometheus":
        content = render_prometheus(plan, dispatcher=dispatcher)
    elif f.role == "prometheus-rules":
        content = render_prometheus_rules(plan)
    else:
        raise RenderError(f"{f.path}: no renderer for {f.role!r}")
    return Artefact(f.kind, f.path, content, f.mode)


# --- nginx -----------------------------------------------------------------------


def render_api_keys(plan: Plan) -> str:
    """The keys map: mode 0600, included by the world-readable conf, which never holds a key."""
    return render_template("nginx/api-keys.map.j2", d=plan.deployment, entries=plan.nginx.api_keys)


def render_nginx(plan: Plan) -> str:
    return render_template("nginx/dispatcher.conf.j2", d=plan.deployment, plan=plan, n=plan.nginx,
                           routing=plan.routing, mon=plan.monitoring)


# --- systemd / supervisord ---------------------------------------------------------


def render_unit(plan: Plan, inst: Instance) -> str:
    return render_template("systemd/instance.service.j2", d=plan.deployment, plan=plan, inst=inst)


def render_supervisord(plan: Plan) -> str:
    return render_template("supervisord/deployment.conf.j2", d=plan.deployment, plan=plan)


# --- observability -----------------------------------------------------------------


def render_nginx_exporter(plan: Plan) -> str:
    return render_template("systemd/nginx-exporter.service.j2", d=plan.deployment, exporter=plan.monitoring.exporter)


def render_prometheus(plan: Plan, dispatcher: bool = True) -> str:
    mon = plan.monitoring
    extra = (mon.dispatcher_target,) if dispatcher and mon.dispatcher_target is not None else ()
    return render_template("prometheus/targets.json.j2", targets=[*mon.targets, *extra])


def render_prometheus_rules(plan: Plan) -> str:
    mon = plan.monitoring
    return render_template("prometheus/rules.yml.j2", d=plan.deployment, group=mon.group, rules=mon.rules)
