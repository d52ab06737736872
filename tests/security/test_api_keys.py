"""The API key file: how vfgen reads it, reports problems, and where the keys end up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vfgen import config
from vfgen.cli import app
from vfgen.errors import ConfigError
from vfgen.plan import build_plan
from vfgen.render import render_all

GOOD = "sk-good-key-0123456789"


def keys_file(tmp_path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return path


def read(path: Path, source: str | None = "deploy.yaml") -> tuple[str, ...]:
    raw = {"api_key_file": str(path), "models": [{"model": "org/m", "instances": 2}]}
    return config.read_api_keys(config.parse_deployment(raw, source=source))


@pytest.mark.parametrize(("text", "reason"), [
    (f"{GOOD}\n\n# rotated 2024\nshort-key\n", "line 4: a key must be 16 to 512 characters long (it has 9)"),
    (f"{GOOD}\nsecret key with spaces\n", "line 2: a key must be printable ASCII without spaces, quotes, backslashes or '$'"),
    (f'{GOOD}\n"quoted-key-0123456789"\n', "line 2: a key must be printable ASCII"),
    (f"{GOOD}\nkey-with-dollar-$-0123456\n", "line 2: a key must be printable ASCII"),
    (f"{GOOD}\nkey-with-backslash-\\-0123\n", "line 2: a key must be printable ASCII"),
    (f"{GOOD}\n{GOOD}\n", "line 2: same key as line 1"),
    ("# only a comment\n\n", "contains no keys"),
    (f"{GOOD}\nclé-non-ascii-0123456789\n".encode(), "line 2: a key must be printable ASCII"),
])
def test_bad_keys_are_reported_by_line_without_the_key(tmp_path: Path, text, reason: str) -> None:
    path = keys_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        read(path)
    message = str(info.value)
    assert message == f"deploy.yaml: api_key_file={str(path)!r}: {reason}" or reason in message, message
    for secret in ("short-key", "secret key", "quoted-key", "key-with-dollar", "key-with-backslash", GOOD, "clé"):
        assert secret not in message


def test_keys_are_trimmed_and_crlf_tolerated(tmp_path: Path) -> None:
    path = keys_file(tmp_path, f"  {GOOD}  \r\n\tsecond-key-0123456789\r\n")
    assert read(path) == (GOOD, "second-key-0123456789")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602, 0o666])
def test_a_key_file_other_users_can_access_is_refused(tmp_path: Path, mode: int) -> None:
    path = keys_file(tmp_path, GOOD + "\n", mode)
    with pytest.raises(ConfigError, match=rf"is accessible to every user \(mode 0{mode:o}\); chmod 600 it"):
        read(path)


def test_group_readable_is_allowed_for_an_admin_group(tmp_path: Path) -> None:
    assert read(keys_file(tmp_path, GOOD + "\n", 0o640)) == (GOOD,)


def test_a_symlink_or_directory_is_refused(tmp_path: Path) -> None:
    real = keys_file(tmp_path, GOOD + "\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="cannot read"):
        read(link)
    with pytest.raises(ConfigError, match="is not a regular file"):
        read(tmp_path)


def test_cli_names_the_option(tmp_path: Path) -> None:
    path = keys_file(tmp_path, "short\n")
    result = CliRunner().invoke(app, ["render", "org/m", "-n", "2", "--api-key-file", str(path), "--emit", "nginx"])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: --api-key-file={str(path)!r}: line 1: ") and "short" not in result.stderr.split(": line")[1]


# --- where the keys go -----------------------------------------------------------------------


def render_cli(tmp_path: Path, *args: str):
    path = keys_file(tmp_path, f"{GOOD}\nsecond-key-0123456789\n")
    return CliRunner().invoke(app, ["render", "org/m", "-n", "2", "--name", "edge", "--api-key-file", str(path), *args])


def test_output_dir_writes_the_keys_map_0600_and_the_conf_without_keys(tmp_path: Path) -> None:
    out = tmp_path / "root"
    result = render_cli(tmp_path, "--output-dir", str(out))
    assert result.exit_code == 0, result.stderr
    conf = out / "etc/nginx/conf.d/edge.conf"
    keys = out / "etc/nginx/vfgen/edge-api-keys.map"
    assert stat.S_IMODE(os.stat(conf).st_mode) == 0o644 and stat.S_IMODE(os.stat(keys).st_mode) == 0o600
    assert GOOD not in conf.read_text() and 'include "/etc/nginx/vfgen/edge-api-keys.map";' in conf.read_text()
    assert '"~^(?i:Bearer) sk\\\\-good\\\\-key\\\\-0123456789$" 1;' in keys.read_text()
    assert not list(out.rglob("*.vfgen-tmp")), "temporary files left behind"


def test_dry_run_shows_the_keys_map_mode(tmp_path: Path) -> None:
    result = render_cli(tmp_path, "--output-dir", str(tmp_path / "root"), "--dry-run")
    assert f"create    600 {tmp_path}/root/etc/nginx/vfgen/edge-api-keys.map" in result.stdout


def test_emit_nginx_prints_the_conf_and_points_at_the_keys_map(tmp_path: Path) -> None:
    result = render_cli(tmp_path, "--emit", "nginx")
    assert result.exit_code == 0, result.stderr
    assert "map $http_authorization $vfgen_edge_authorized" in result.stdout and GOOD not in result.stdout
    assert "--emit edge-api-keys.map" in result.stderr and "mode 0600" in result.stderr


def test_emit_the_keys_map_by_name(tmp_path: Path) -> None:
    result = render_cli(tmp_path, "--emit", "edge-api-keys.map")
    assert result.exit_code == 0 and "sk\\\\-good" in result.stdout
    assert "Note:" not in result.stderr


def test_printing_everything_leaves_the_keys_out(tmp_path: Path) -> None:
    result = render_cli(tmp_path)
    assert result.exit_code == 0, result.stderr
    assert GOOD.split("-")[-1] not in result.stdout
    assert "edge-api-keys.map ===== (not printed: it holds API keys" in result.stdout


def test_backends_only_renders_without_the_key_file(tmp_path: Path) -> None:
    """A GPU host renders its units from the same file; the keys stay on the load balancer."""
    result = CliRunner().invoke(app, ["render", "org/m", "-n", "2", "--api-key-file", "/nonexistent/keys",
                                      "--only", "backends", "--output-dir", str(tmp_path / "gpu")])
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "gpu/etc/nginx").exists()


def test_the_keys_map_path_follows_nginx_dir(tmp_path: Path) -> None:
    path = keys_file(tmp_path, GOOD + "\n")
    d = config.parse_deployment({"api_key_file": str(path), "nginx_dir": "/usr/local/nginx",
                                 "models": [{"model": "org/m", "instances": 2}]}, source="x.yaml")
    arts = {a.path: a for a in render_all(build_plan(d))}
    assert "usr/local/nginx/vfgen/vllm-api-keys.map" in arts and "usr/local/nginx/conf.d/vllm.conf" in arts
    assert 'include "/usr/local/nginx/vfgen/vllm-api-keys.map";' in arts["usr/local/nginx/conf.d/vllm.conf"].content


# --- plan and render read the file alike; a GPU host needs none ---------------------------------


@pytest.mark.parametrize(("text", "mode", "reason"), [
    (None, 0o600, "cannot read: No such file or directory"),
    ("short\n", 0o600, "line 1: a key must be 16 to 512 characters long (it has 5)"),
    (GOOD + "\n", 0o644, "is accessible to every user (mode 0644); chmod 600 it"),
])
def test_plan_and_render_refuse_a_bad_key_file_with_the_same_error(tmp_path: Path, text, mode: int, reason: str) -> None:
    """`vfgen plan` reads the key file where `vfgen render` does (the dispatcher's part of the plan)."""
    path = tmp_path / "keys" if text is None else keys_file(tmp_path, text, mode)
    deployment = ["org/m", "-n", "2", "--api-key-file", str(path)]
    expected = f"Error: --api-key-file={str(path)!r}: {reason}\n"
    for argv in (["plan", *deployment], ["plan", *deployment, "--json"], ["render", *deployment, "--output-dir", str(tmp_path / "out")],
                 ["render", *deployment, "--emit", "nginx"], ["render", *deployment, "--only", "dispatcher"]):
        result = CliRunner().invoke(app, argv)
        assert (result.exit_code, result.stderr) == (1, expected), f"{argv[0]} {argv[-2:]}: {result.stderr}"
        assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_a_gpu_host_plans_and_renders_its_units_without_the_key_file(tmp_path: Path) -> None:
    """The key file lives on the load balancer: units, the supervisord conf and a backends-only plan need none."""
    missing = ["org/m", "-n", "2", "--api-key-file", str(tmp_path / "absent")]
    for argv in (["plan", *missing, "--only", "backends", "--json"], ["render", *missing, "--emit", "vllm-m-0.service"],
                 ["render", *missing, "--emit", "supervisord"], ["render", *missing, "--emit", "prometheus-rules"],
                 ["render", *missing, "--only", "backends"]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, f"{argv}: {result.stderr}"
    unit = CliRunner().invoke(app, ["render", *missing, "--emit", "vllm-m-0.service"]).stdout
    assert unit.startswith("# Rendered by vfgen") and "ExecStart=" in unit
    d = config.parse_deployment({"api_key_file": str(tmp_path / "absent"), "models": [{"model": "org/m", "instances": 2}]})
    plan = build_plan(d, nginx=False)
    assert plan.nginx is None and plan.dispatcher
    kinds = {a.kind for a in render_all(plan, dispatcher=False)}
    assert kinds == {"systemd", "supervisord", "prometheus", "prometheus-rules"}
    with pytest.raises(ConfigError, match="cannot read"):
        build_plan(d)
