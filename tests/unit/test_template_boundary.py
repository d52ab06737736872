"""The template boundary: only a quoting filter's output (or an int) reaches a rendered file.

render.py's one Jinja environment has a finalize that refuses a plain str: a template
that interpolates a value without the quoting filter of its syntax fails to render,
naming its file and line. The second half loosens config's validation on purpose
(dataclasses.replace skips it) for every place issue 15 named: each hostile value is
refused at the template boundary instead of reaching the file.
"""

from __future__ import annotations

import dataclasses

import jinja2
import pytest
from typer.testing import CliRunner

from tests.scenarios import SCENARIOS
from vfgen import config, quoting, render
from vfgen.cli import app
from vfgen.errors import RenderError
from vfgen.plan import build_plan


def tiny(source: str, **context) -> str:
    env = render.make_environment(jinja2.DictLoader({"tiny.j2": source}))
    return render.render_template("tiny.j2", env=env, **context)


def test_a_raw_string_fails_naming_the_template_file_and_line() -> None:
    with pytest.raises(render.UnquotedValue) as info:
        tiny("# one\n{{ n }}\nserver {{ s }};\n", n=1, s="10.0.0.1:80; include /etc/passwd")
    assert str(info.value).startswith("templates/tiny.j2:3: str '10.0.0.1:80; include /etc/passwd' reaches the output unquoted")


@pytest.mark.parametrize("value", ["plain", 1.5, True, None, ["a"], {"k": "v"}])
def test_anything_but_quoted_text_or_an_int_is_refused(value) -> None:
    with pytest.raises(render.UnquotedValue):
        tiny("{{ v }}", v=value)


def test_quoted_text_and_ints_pass() -> None:
    assert tiny("{{ q }} {{ n }}", q=quoting.nginx_str('a "b"'), n=3) == '"a \\"b\\"" 3'


@pytest.mark.parametrize("source", ["{{ q | upper }}", "{{ q ~ s }}", "{{ q[1:] }}", "{{ q | replace('a', s) }}",
                                    "{{ 'literal' }}", "{{ s | default('x') }}"])
def test_a_filter_or_operator_that_makes_plain_text_is_refused(source: str) -> None:
    """Changing quoted text gives a plain str again: only quoting.py makes a Quoted."""
    with pytest.raises(render.UnquotedValue):
        tiny(source, q=quoting.nginx_str("a"), s="; evil")


def test_a_macro_passes_its_output_but_not_its_raw_arguments() -> None:
    macro = "{% macro m(v) %}[{{ v }}]{% endmacro %}"
    assert tiny(macro + "{{ m(q) | rstrip }}", q=quoting.nginx_name("up")) == "[up]"
    with pytest.raises(render.UnquotedValue):
        tiny(macro + "{{ m(s) }}", s="up")


def test_the_render_environment_is_the_strict_one() -> None:
    env = render.environment()
    assert env.finalize is render._finalize and isinstance(env.undefined(), jinja2.StrictUndefined)


# Branches no golden scenario reaches: API keys, TLS, rate limit, IPv6 wildcard, session header,
# supervisord with a user and a log dir, bounded queue 0.
EXTRA = {
    "edge": ["org/m", "-n", "3", "--name", "edge", "--tls-certificate", "/etc/ssl/c.pem", "--tls-certificate-key",
             "/etc/ssl/k.pem", "--rate-limit", "10r/s", "--rate-limit-burst", "20", "--listen", "0.0.0.0"],
    "v6-session": ["org/m", "-n", "3", "--listen", "::", "--host", "::1", "--routing", "session", "--session-header",
                   "X-Session-Id", "--access-log", "json", "--nginx-exporter", "--lock-dir", "/var/lock/vf"],
    "supervisord": ["org/m", "-n", "2", "--backend", "supervisord", "--user", "nobody", "--log-dir", "/var/log/x",
                    "--routing", "session", "--max-queue", "0"],
}


def test_every_template_renders_under_the_strict_finalize(tmp_path) -> None:
    """Every golden scenario and the edge branches render, and between them every template file is used."""
    keys = tmp_path / "keys"
    keys.write_text("sk-good-key-0123456789\n")
    keys.chmod(0o600)
    env = render.environment()
    env.cache.clear()
    runs = {**SCENARIOS, **EXTRA}
    runs["edge"] = [*runs["edge"], "--api-key-file", str(keys)]
    for name, args in runs.items():
        result = CliRunner().invoke(app, ["render", "--output-dir", str(tmp_path / name), *args])
        assert result.exit_code == 0, f"{name}: {result.stderr}"
    used = {name for _, name in env.cache.keys()}
    assert used == set(env.list_templates()), f"never rendered: {sorted(set(env.list_templates()) - used)}"


# --- loosened validation: the places issue 15 named ------------------------------------


def deployment(**overrides) -> config.Deployment:
    return config.parse_deployment({"models": [{"model": "org/m", "instances": 2}], **overrides}, source="x.yaml")


def refused(d: config.Deployment, *, plan_changes: dict | None = None, kind: str | None = None) -> str:
    """The error of rendering every file (or those of `kind`) of the plan of `d`."""
    plan = build_plan(d)
    if plan_changes:
        plan = dataclasses.replace(plan, **plan_changes)
    with pytest.raises(RenderError) as info:
        for f in plan.files:
            if kind in (None, f.kind):
                render.render_file(plan, f)
    return str(info.value)


HOSTILE = "x\nExecStartPre=/bin/sh -c evil"


def test_systemd_user_and_group() -> None:
    message = refused(dataclasses.replace(deployment(), user=HOSTILE))
    assert message.startswith("systemd/instance.service.j2:17: systemd value: control character"), message


def test_systemd_environment_file() -> None:
    d = deployment()
    models = (dataclasses.replace(d.models[0], env_file="/etc/x.env /etc/shadow"),)
    assert "systemd path '/etc/x.env /etc/shadow'" in refused(dataclasses.replace(d, models=models))


def test_systemd_read_write_paths() -> None:
    """A space would add a second writable path (/etc) to a hardened unit."""
    assert "systemd path '/var/lock/vf /etc'" in refused(dataclasses.replace(deployment(), lock_dir="/var/lock/vf /etc"))


def test_supervisord_user_and_log_file() -> None:
    d = dataclasses.replace(deployment(), backend="supervisord")
    assert "supervisord value 'nobody ;comment'" in refused(dataclasses.replace(d, user="nobody ;comment"), kind="supervisord")
    assert "supervisord value '/var/log/x ;comment/" in refused(dataclasses.replace(d, log_dir="/var/log/x ;comment"),
                                                                kind="supervisord")
    assert "supervisord/deployment.conf.j2" in refused(dataclasses.replace(d, user="nobody\n[program:evil]"), kind="supervisord")


def test_supervisord_percent_is_doubled_not_expanded() -> None:
    d = dataclasses.replace(deployment(), backend="supervisord", log_dir="/var/log/%(here)s")
    conf = next(a for a in render.render_all(build_plan(d)) if a.kind == "supervisord").content
    assert "stdout_logfile=/var/log/%%(here)s/vllm-m-0.log" in conf


def test_nginx_server_address() -> None:
    d = dataclasses.replace(deployment(), upstream_hosts=("10.0.0.5:80 backup; server 10.6.6.6",))
    assert "nginx token '10.0.0.5:80 backup; server 10.6.6.6:9100'" in refused(d)


def test_nginx_listen() -> None:
    assert "nginx token" in refused(dataclasses.replace(deployment(), listen="127.0.0.1 default_server; include /etc/passwd"))


def test_nginx_rate() -> None:
    assert "nginx token '1r/s burst=9; evil'" in refused(dataclasses.replace(deployment(), rate_limit="1r/s burst=9; evil"))


def test_nginx_client_max_body_size() -> None:
    """Changed after planning: the plan computes the body buffer from the size, which a hostile one fails first."""
    d = deployment()
    bad = dataclasses.replace(d, max_body_size="1m; include /etc/passwd")
    assert "nginx token '1m; include /etc/passwd'" in refused(d, plan_changes={"deployment": bad})


def test_nginx_affinity_replacement() -> None:
    d = deployment(models=[{"model": "org/m", "instances": 2, "routing": "shape"}])
    plan = build_plan(d)
    shape = plan.nginx.shape_maps[0]
    evil = dataclasses.replace(shape, replacement=(("var", 'a}"; evil "${b'),))
    nginx = dataclasses.replace(plan.nginx, shape_maps=(evil, *plan.nginx.shape_maps[1:]))
    assert "nginx variable name" in refused(d, plan_changes={"nginx": nginx})


def test_nginx_upstream_and_prefix_names() -> None:
    d = deployment()
    plan = build_plan(d)
    assert "nginx name" in refused(d, plan_changes={"nginx_prefix": "vfgen_x; evil"})
    assert "nginx name" in refused(d, plan_changes={"nginx": dataclasses.replace(plan.nginx, health_upstream="h { }")})
