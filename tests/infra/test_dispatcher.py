"""Load balancers: nginx enabled, its configuration valid, listening, upstreams spanning every backend, healthy."""

from __future__ import annotations

import re

import pytest

from tests.infra.conftest import Deployment, listening


def _upstream_servers(conf: str, upstream: str) -> list[str]:
    """`server` lines (address and parameters) of one upstream block."""
    block = re.search(r"^upstream %s \{\n(.*?)^\}" % re.escape(upstream), conf, re.MULTILINE | re.DOTALL)
    assert block, f"no upstream {upstream}"
    return [m.group(1) for m in re.finditer(r"^\s*server (.+);$", block.group(1), re.MULTILINE)]


def _connect(listen: str) -> str:
    if listen == "0.0.0.0":
        return "127.0.0.1"
    if listen in ("::", "[::]"):
        return "[::1]"
    return f"[{listen}]" if ":" in listen else listen


def test_nginx_enabled_and_running(host, dispatcher_deployments: list[Deployment]) -> None:
    nginx = host.service("nginx")
    assert nginx.is_enabled and nginx.is_running


def test_nginx_configuration_is_valid(host, dispatcher_deployments: list[Deployment]) -> None:
    if host.user().uid != 0:
        pytest.skip("nginx -t needs root: run with --sudo")
    result = host.run("nginx -t")
    assert result.rc == 0, result.stderr


def test_dispatcher_file_owned_by_root(host, dispatcher_deployments: list[Deployment]) -> None:
    for d in dispatcher_deployments:
        for path in (d.nginx_conf, d.path):
            f = host.file(path)
            assert (f.user, f.group, f.mode) == ("root", "root", 0o644), f"{path}: {f.user}:{f.group} {oct(f.mode)}"


def test_dispatcher_listens_where_configured(host, dispatcher_deployments: list[Deployment]) -> None:
    sockets = listening(host)
    for d in dispatcher_deployments:
        listen = d.plan["dispatcher"]["listen"]
        port = d.plan["dispatcher"]["port"]
        assert (listen, port) in sockets, f"nginx does not listen on {listen}:{port}: {sorted(s for s in sockets if s[1] == port)}"


def check_pool_servers(conf: str, pool: dict, expected_hosts: list[str]) -> None:
    """One pool of `vfgen plan --json` against its upstream block: capped primaries and the planned overflow."""
    assert "overflow_cap" in pool, "`vfgen plan --json` on the host has no overflow_cap: upgrade vfgen there"
    lines = _upstream_servers(conf, pool["upstream"])
    primaries = [line.split()[0] for line in lines if f"max_conns={pool['cap']}" in line and "backup" not in line]
    backups = [line for line in lines if "backup" in line.split()]
    assert sorted(primaries) == sorted(pool["servers"]), f"{pool['upstream']}: {lines}"
    cap = pool["overflow_cap"]  # None: uncapped backups; N > 0: backups capped at N; 0: no backups
    if cap == 0:
        assert backups == [], f"{pool['upstream']}: --max-queue 0 plans no overflow, but: {backups}"
    else:
        assert sorted(b.split()[0] for b in backups) == sorted(pool["servers"]), f"{pool['upstream']} overflow: {lines}"
        caps = {re.search(r"max_conns=(\d+)", b).group(1) if "max_conns=" in b else None for b in backups}
        assert caps == {None if cap is None else str(cap)}, f"{pool['upstream']} overflow caps {caps}, planned {cap}"
    if expected_hosts:  # remote load balancer: every GPU host's instances, as host:port
        hosts = {s.rpartition(":")[0].strip("[]") for s in pool["servers"]}
        assert hosts == set(expected_hosts), f"{pool['upstream']} spans {sorted(hosts)}, not {expected_hosts}"


def test_upstreams_span_every_backend_with_caps_and_overflow(host, dispatcher_deployments: list[Deployment]) -> None:
    for d in dispatcher_deployments:
        conf = host.file(d.nginx_conf).content_string
        for pool in d.plan["pools"]:
            check_pool_servers(conf, pool, d.raw.get("upstream_hosts") or [])


def test_every_backend_answers_from_here(host, dispatcher_deployments: list[Deployment]) -> None:
    for d in dispatcher_deployments:
        for pool in d.plan["pools"]:
            urls = [arg for server in pool["servers"] for arg in ("--url", f"http://{server}")]
            result = d.vfgen(host, "health", "check", *urls, "--expect-model", pool["served_names"][0])
            assert result.rc == 0, f"{pool['upstream']}: {result.stdout}{result.stderr}"


def test_dispatcher_health_endpoint_answers(host, dispatcher_deployments: list[Deployment]) -> None:
    for d in dispatcher_deployments:
        url = f"http://{_connect(d.plan['dispatcher']['listen'])}:{d.plan['dispatcher']['port']}"
        for pool in d.plan["pools"]:
            result = d.vfgen(host, "health", "check", "--url", url, "--expect-model", pool["served_names"][0])
            assert result.rc == 0, f"dispatcher {url} ({pool['served_names'][0]}): {result.stdout}{result.stderr}"
