"""GPU hosts: the instances' units, addresses, health, user, and the files the role installed."""

from __future__ import annotations

import ipaddress

from tests.infra.conftest import UNIT_DIR, Deployment, listening

WILDCARDS = {"0.0.0.0", "::"}


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def test_units_enabled_and_active(host, backend_deployments: list[Deployment]) -> None:
    for d in backend_deployments:
        for unit in [d.target, *d.units]:
            service = host.service(unit)
            assert service.is_enabled, f"{unit} is not enabled"
            assert service.is_running, f"{unit} is not active"


def test_instances_listen_on_their_address_only(host, backend_deployments: list[Deployment]) -> None:
    sockets = listening(host)
    for d in backend_deployments:
        remote_lb = bool(d.raw.get("upstream_hosts"))
        for inst in d.plan["instances"]:
            bound = {address for address, port in sockets if port == inst["port"]}
            assert bound == {inst["host"]}, f"{inst['name']}: port {inst['port']} bound on {sorted(bound)}, expected {inst['host']}"
            if inst["host"] in WILDCARDS:
                continue  # the operator asked for it (vfgen_allow_wildcard_bind)
            # With a remote load balancer the backends must be reachable, so not on loopback.
            assert _is_loopback(inst["host"]) != remote_lb, f"{inst['name']} binds {inst['host']} (remote load balancer: {remote_lb})"


def test_instances_answer_health_and_list_their_model(host, backend_deployments: list[Deployment]) -> None:
    for d in backend_deployments:
        for inst in d.plan["instances"]:
            result = d.vfgen(host, "health", "check", "--url", inst["url"], "--expect-model", inst["served_name"])
            assert result.rc == 0, f"{inst['name']} at {inst['url']}: {result.stdout}{result.stderr}"


def test_instances_run_as_the_service_user(host, backend_deployments: list[Deployment]) -> None:
    for d in backend_deployments:
        user = host.user(d.user)
        assert user.exists, f"service user {d.user} is missing"
        assert user.shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"), f"{d.user} has a login shell {user.shell}"
        for unit in d.units:
            pid = host.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
            assert pid not in ("", "0"), f"{unit} has no main process"
            owner = host.run(f"ps -o user= -p {pid}").stdout.strip()
            assert owner == d.user, f"{unit} main process {pid} runs as {owner!r}, expected {d.user}"
        state = host.file("/var/lib/vfgen")
        assert state.is_directory and state.user == d.user, "/var/lib/vfgen must belong to the service user"


def test_files_owned_by_root_and_not_writable_by_others(host, backend_deployments: list[Deployment]) -> None:
    for d in backend_deployments:
        for path in [d.path, f"{UNIT_DIR}/{d.target}", *(f"{UNIT_DIR}/{u}" for u in d.units)]:
            f = host.file(path)
            assert f.is_file, f"{path} is missing"
            assert (f.user, f.group, f.mode) == ("root", "root", 0o644), f"{path}: {f.user}:{f.group} {oct(f.mode)}"
        # The units run these as the service user: root-owned, nobody else may change them.
        for executable in {d.vfgen_bin, str(d.raw.get("vllm_bin", "vllm"))}:
            if not executable.startswith("/"):
                continue
            f = host.file(executable)
            assert f.exists and f.is_executable, f"{executable} is missing or not executable"
            assert f.user == "root" and not f.mode & 0o022, f"{executable}: {f.user} {oct(f.mode)}"
