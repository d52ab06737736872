"""Find the vfgen deployments on a host under test, for the testinfra checks in this directory.

Run the checks against your own hosts after applying the Ansible role:

    pytest --hosts=ssh://gpu1,ssh://gpu2,ssh://lb1 tests/infra     # add --sudo unless you log in as root
    pytest --hosts='ansible://all?ansible_inventory=examples/ansible/inventory.ini' tests/infra

Every deployment file in /etc/vfgen (the role writes NAME.yaml there) is read
and planned with the host's own vfgen (`vfgen plan --json`), so the checks know
the units, addresses and ports without being told. A host with the
deployment's systemd target is a GPU host; one with its nginx file a load
balancer; an all-in-one host is both. Environment variables:

    VFGEN_INFRA_DEPLOYMENT   check only this deployment name
    VFGEN_INFRA_CONFIG_DIR   directory of the deployment files (default /etc/vfgen)

Without --hosts the checks are skipped: they test deployed machines, not this checkout.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

UNIT_DIR = "/etc/systemd/system"
NGINX_CONF_DIR = "/etc/nginx/conf.d"


@dataclass(frozen=True)
class Deployment:
    name: str
    path: str  # the deployment file on the host
    raw: dict[str, Any]  # its content
    plan: dict[str, Any]  # `vfgen plan --json` on the host
    vfgen_bin: str
    runs_backends: bool
    runs_dispatcher: bool

    @property
    def user(self) -> str:
        return str(self.raw.get("user", "vllm"))

    @property
    def units(self) -> list[str]:
        return [f"{i['name']}.service" for i in self.plan["instances"]]

    @property
    def target(self) -> str:
        return f"{self.name}.target"

    @property
    def nginx_conf(self) -> str:
        return f"{NGINX_CONF_DIR}/{self.name}.conf"

    def vfgen(self, host, *args: str):
        """Run this deployment's vfgen on the host."""
        return host.run(" ".join(shlex.quote(a) for a in (self.vfgen_bin, *args)))


@pytest.fixture(scope="session", autouse=True)
def _needs_hosts(request: pytest.FixtureRequest) -> None:
    # Session scope: decided before the module-scoped fixtures below touch any host.
    if not request.config.getoption("hosts", None):
        pytest.skip("tests/infra checks deployed hosts: run `pytest --hosts=ssh://HOST tests/infra` "
                    "(tests/ansible runs it against containers)")


def _load(host, path: str) -> Deployment:
    raw = yaml.safe_load(host.file(path).content_string)
    if not isinstance(raw, dict):
        pytest.fail(f"{path}: not a vfgen deployment file")
    name = str(raw.get("name", "vllm"))
    vfgen_bin = str(raw.get("vfgen_bin", "vfgen"))
    # --only backends: the same JSON, without reading the API key file, which a GPU host does not have.
    result = host.run(f"{shlex.quote(vfgen_bin)} plan -f {shlex.quote(path)} --json --only backends")
    if result.rc != 0:
        pytest.fail(f"{vfgen_bin} plan -f {path} failed (exit {result.rc}): {result.stderr.strip()}")
    return Deployment(
        name=name,
        path=path,
        raw=raw,
        plan=json.loads(result.stdout),
        vfgen_bin=vfgen_bin,
        runs_backends=host.file(f"{UNIT_DIR}/{name}.target").exists,
        runs_dispatcher=host.file(f"{NGINX_CONF_DIR}/{name}.conf").exists,
    )


@pytest.fixture(scope="module")
def deployments(host) -> list[Deployment]:
    """Every deployment on the host (narrowed by VFGEN_INFRA_DEPLOYMENT); fails when there is none."""
    config_dir = os.environ.get("VFGEN_INFRA_CONFIG_DIR", "/etc/vfgen")
    wanted = os.environ.get("VFGEN_INFRA_DEPLOYMENT")
    directory = host.file(config_dir)
    files = sorted(f for f in directory.listdir() if f.endswith(".yaml")) if directory.is_directory else []
    found = [_load(host, f"{config_dir}/{f}") for f in files]
    if wanted:
        found = [d for d in found if d.name == wanted]
    found = [d for d in found if d.runs_backends or d.runs_dispatcher]
    if not found:
        pytest.fail(f"no vfgen deployment{' ' + wanted if wanted else ''} with units or an nginx file "
                    f"under {config_dir} on {host.backend.get_pretty_hostname()}")
    return found


@pytest.fixture(scope="module")
def backend_deployments(deployments: list[Deployment]) -> list[Deployment]:
    mine = [d for d in deployments if d.runs_backends]
    if not mine:
        pytest.skip("not a GPU host: no deployment has its systemd target here")
    return mine


@pytest.fixture(scope="module")
def dispatcher_deployments(deployments: list[Deployment]) -> list[Deployment]:
    mine = [d for d in deployments if d.runs_dispatcher]
    if not mine:
        pytest.skip("not a load balancer: no deployment has its nginx file here")
    return mine


def listening(host) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket."""
    out = set()
    for url in host.socket.get_listening_sockets():
        if url.startswith("tcp://"):
            address, _, port = url[len("tcp://"):].rpartition(":")
            out.add((address.strip("[]"), int(port)))
    return out
