"""The examples' site: one load balancer and two GPU hosts, each a booted systemd container with its own address.

The hosts and addresses are those of examples/ansible/inventory.ini (TEST-NET-2,
198.51.100.0/24), on a bridge in a network namespace this module creates; the
test's clients sit on that bridge too, so no traffic leaves namespaces the test
made. The playbooks are the examples' own, run with the examples' group_vars;
extra vars only swap in this test's ports, the offline wheelhouse and short
timeouts. The tests run in file order and build on each other.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.ansible.conftest import run_testinfra
from tests.ansible.harness import (
    EXAMPLES,
    Ansible,
    PlaybookRun,
    PrivateNetwork,
    SteadyLoad,
    Tools,
    example_deployment,
    failures,
    http_json,
    offline_binds,
    use_local_apt_repo,
)
from tests.harness.nspawn import Container, booted_container
from tests.harness.waiting import wait_until

pytestmark = pytest.mark.ansible

INVENTORY = EXAMPLES / "inventory.ini"
LATENCY = 0.02  # the stand-in's service time per request: a steady, countable load
REQUESTS = [
    ("/v1/chat/completions", {"model": "qwen", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}),
    ("/v1/embeddings", {"model": "bge", "input": "hello"}),
]


def example_hosts() -> tuple[dict[str, str], dict[str, list[str]]]:
    """(host -> ansible_host, group -> hosts) of the example inventory."""
    addresses: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    group = None
    for line in INVENTORY.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if m := re.fullmatch(r"\[(\S+)\]", line):
            group = m.group(1)
        elif m := re.fullmatch(r"(\S+)\s+ansible_host=(\S+)", line):
            addresses[m.group(1)] = m.group(2)
            groups.setdefault(group or "ungrouped", []).append(m.group(1))
    return addresses, groups


@dataclass
class Cluster:
    network: PrivateNetwork
    hosts: dict[str, Container]
    addresses: dict[str, str]
    groups: dict[str, list[str]]
    ansible: Ansible
    inventories: list[Path]
    deployment: dict[str, Any]
    runs: list[PlaybookRun] = field(default_factory=list)

    @property
    def lb_url(self) -> str:
        lb = self.groups["vfgen_lb"][0]
        return f"http://{self.addresses[lb]}:{self.deployment['vfgen_port']}"

    def playbook(self, name: str, *, check: bool = False) -> PlaybookRun:
        extra = self.ansible.vars_file("ci", self.deployment)
        run = self.ansible.playbook(EXAMPLES / name, self.inventories, [extra], check=check)
        self.runs.append(run)
        assert run.rc == 0 and set(run.recap) == set(self.hosts), f"{run}\n{self.journals()}"
        return run

    def journals(self) -> str:
        return "\n".join(f"--- journal of {h} ---\n{c.journal(lines=40)}" for h, c in self.hosts.items())

    def plan(self, host: str) -> dict[str, Any]:
        out = self.hosts[host].run(["/opt/vfgen/bin/vfgen", "plan", "-f", "/etc/vfgen/chat.yaml", "--json"]).stdout
        return json.loads(out)

    def units(self, host: str) -> list[str]:
        return [f"{i['name']}.service" for i in self.plan(host)["instances"]]

    def backend_stats(self, host: str) -> list[dict[str, Any]]:
        """/fake/stats of each instance on `host`, asked from the bridge (where the load balancer's traffic goes)."""
        urls = [i["url"] for i in self.plan(host)["instances"]]
        return self.network.call(lambda: [http_json("GET", f"{u}/fake/stats")[1] for u in urls])

    def props(self, host: str, unit: str, *names: str) -> dict[str, str]:
        return self.hosts[host].show(unit, *names)


@pytest.fixture(scope="module")
def cluster(tools: Tools, wheelhouse: Path, ansible_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    addresses, groups = example_hosts()
    assert set(groups) >= {"vfgen_gpu", "vfgen_lb"} and len(groups["vfgen_gpu"]) == 2, groups
    for address in addresses.values():  # the test's network may only use the documentation range
        assert ipaddress.ip_address(address) in ipaddress.ip_network("198.51.100.0/24"), address
    port = random.randint(20000, 29000)  # private namespaces: cannot collide; random anyway
    with contextlib.ExitStack() as stack:
        network = stack.enter_context(PrivateNetwork())
        hosts: dict[str, Container] = {}
        for name, address in addresses.items():
            hosts[name] = stack.enter_context(booted_container(binds=offline_binds(wheelhouse), rootfs=ansible_rootfs))
            network.attach(hosts[name], address)
            use_local_apt_repo(hosts[name])
        ansible = Ansible(tools, tmp_path_factory.mktemp("ansible-cluster"))
        connection = ansible.inventory("containers", hosts)
        yield Cluster(network, hosts, addresses, groups, ansible, [INVENTORY, connection],
                      example_deployment(port, port + 100, latency=LATENCY))


def test_preflight_refuses_a_wildcard_backend_address_before_touching_a_host(cluster: Cluster) -> None:
    wildcard = {**cluster.deployment, "vfgen_backend_address": "0.0.0.0"}
    run = cluster.ansible.playbook(EXAMPLES / "site.yml", cluster.inventories, [cluster.ansible.vars_file("wildcard", wildcard)])
    assert run.rc != 0 and all(stats.failed == 1 and stats.changed == 0 for stats in run.recap.values()), run
    assert "need vfgen_allow_wildcard_bind: true" in run.output, run
    for host, container in cluster.hosts.items():
        assert container.run(["test", "-e", "/opt/vfgen"], check=False).returncode == 1, f"{host} was changed"


def test_site_applies_to_three_hosts_and_a_second_run_changes_nothing(cluster: Cluster) -> None:
    first = cluster.playbook("site.yml")
    assert all(stats.changed > 0 for stats in first.recap.values()), first
    second = cluster.playbook("site.yml")
    assert all(stats.changed == 0 for stats in second.recap.values()), "\n".join(second.changed_tasks()) or str(second)
    print(f"cluster: first apply {first.seconds:.1f}s, second {second.seconds:.1f}s")


def test_check_mode_reports_no_change(cluster: Cluster) -> None:
    run = cluster.playbook("site.yml", check=True)
    assert all(stats.changed == 0 for stats in run.recap.values()), "\n".join(run.changed_tasks()) or str(run)


def test_testinfra_suite_passes_on_every_host(cluster: Cluster) -> None:
    result = run_testinfra([c.pid1 for c in cluster.hosts.values()])
    assert result.returncode == 0, result.stdout + result.stderr
    # GPU hosts run the 5 backend checks, the load balancer the 7 dispatcher checks; the rest skip.
    assert re.search(r"\b17 passed, 19 skipped\b", result.stdout), result.stdout


def test_requests_are_routed_by_model_across_both_gpu_hosts(cluster: Cluster) -> None:
    for host in cluster.groups["vfgen_gpu"]:
        urls = [i["url"] for i in cluster.plan(host)["instances"]]
        cluster.network.call(lambda: [http_json("POST", f"{u}/fake/reset") for u in urls])

    def send() -> list[tuple[int, str | None]]:
        out = []
        for n in range(40):
            path, body = REQUESTS[n % 2]
            status, _, headers = http_json("POST", cluster.lb_url + path, body)
            out.append((status, headers.get("x-fake-vllm-model")))
        return out

    replies = cluster.network.call(send)
    assert all(status == 200 for status, _ in replies), replies
    assert [model for _, model in replies] == ["qwen", "bge"] * 20
    for host in cluster.groups["vfgen_gpu"]:
        stats = cluster.backend_stats(host)
        assert sum(s["completed"] for s in stats) > 0, f"{host} served nothing: {stats}"
        assert all(s["misrouted"] == 0 for s in stats), stats
    status, models, _ = cluster.network.call(lambda: http_json("GET", cluster.lb_url + "/v1/models"))
    assert status == 200 and sorted(m["id"] for m in models["data"]) == ["bge", "qwen"], models


def refused(address: str, port: int) -> bool:
    try:
        socket.create_connection((address, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def poll(predicate, timeout: float) -> bool:
    try:
        return bool(wait_until(predicate, timeout, interval=0.05))
    except TimeoutError:
        return False


def test_killing_one_gpu_hosts_instances_loses_no_request(cluster: Cluster) -> None:
    gpu1, gpu2 = cluster.groups["vfgen_gpu"]
    victims = cluster.plan(gpu1)["instances"]
    ports = [(i["host"], i["port"]) for i in victims]
    served_before = sum(s["completed"] for s in cluster.backend_stats(gpu2))
    with SteadyLoad(cluster.network, cluster.lb_url, REQUESTS, workers=4, deadline=120) as load:
        load.wait_for(100, timeout=30)
        killed_at = time.monotonic()
        cluster.hosts[gpu1].systemctl("kill", "--signal=SIGKILL", *[f"{i['name']}.service" for i in victims])
        down = cluster.network.call(lambda: poll(lambda: all(refused(a, p) for a, p in ports), timeout=3))
        assert down, f"{gpu1}'s instances still accept connections 3s after SIGKILL"
        after_kill = load.count()
        load.wait_for(after_kill + 200, timeout=30)
        outcomes = load.stop()
    # Restart= brings them back only after RestartSec=10s: still down now means down for the whole window.
    still_down = cluster.network.call(lambda: all(refused(a, p) for a, p in ports))
    window = time.monotonic() - killed_at
    assert still_down, f"{gpu1} came back within {window:.1f}s (load too slow); the window proves nothing"
    assert not failures(outcomes), f"{len(failures(outcomes))} of {len(outcomes)} failed: {failures(outcomes)[:5]}"
    later = [o for o in outcomes if o.started > killed_at]
    served_after = sum(s["completed"] for s in cluster.backend_stats(gpu2))
    assert len(later) >= 200 and served_after - served_before >= len(later), (len(later), served_before, served_after)
    print(f"kill: {len(outcomes)} requests, {len(later)} after the kill of {gpu1}, 0 failed")
    # systemd restarts the killed instances (Restart=on-failure); the next test needs them.
    for i in victims:
        cluster.hosts[gpu1].run(["/opt/vfgen/bin/vfgen", "health", "wait", i["url"], "--model", i["served_name"],
                                 "--timeout", "60"], timeout=75)
        assert int(cluster.props(gpu1, f"{i['name']}.service", "NRestarts")["NRestarts"]) >= 1


def test_rolling_restart_under_load_loses_no_request(cluster: Cluster) -> None:
    gpus = cluster.groups["vfgen_gpu"]
    props = ("MainPID", "ActiveEnterTimestampMonotonic", "ActiveExitTimestampMonotonic")
    before = {(h, u): cluster.props(h, u, *props) for h in gpus for u in cluster.units(h)}
    with SteadyLoad(cluster.network, cluster.lb_url, REQUESTS, workers=4, deadline=300) as load:
        load.wait_for(100, timeout=30)
        began = time.monotonic()
        run = cluster.ansible.playbook(EXAMPLES / "rolling-restart.yml", cluster.inventories,
                                       [cluster.ansible.vars_file("ci", cluster.deployment)])
        ended = time.monotonic()
        load.wait_for(load.count() + 100, timeout=30)
        outcomes = load.stop()
    assert run.rc == 0, f"{run}\n{cluster.journals()}"
    assert not failures(outcomes), f"{len(failures(outcomes))} of {len(outcomes)} failed: {failures(outcomes)[:5]}"
    during = [o for o in outcomes if began <= o.started <= ended]
    assert len(during) >= 200, f"only {len(during)} requests during the rolling restart"
    after = {(h, u): cluster.props(h, u, *props) for h in gpus for u in cluster.units(h)}
    assert all(after[k]["MainPID"] != before[k]["MainPID"] for k in before), "every instance must have been restarted"
    # One host at a time, its instances one by one: each stopped only after the previous was active again.
    steps = sorted(after.items(), key=lambda kv: int(kv[1]["ActiveExitTimestampMonotonic"]))
    for (prev_key, prev), (key, cur) in zip(steps, steps[1:]):
        assert int(cur["ActiveExitTimestampMonotonic"]) >= int(prev["ActiveEnterTimestampMonotonic"]), (prev_key, key)
    hosts = [host for (host, _), _ in steps]
    assert hosts == sorted(hosts, key=gpus.index), f"hosts interleaved: {[key for key, _ in steps]}"
    print(f"rolling restart: {run.seconds:.1f}s, {len(during)} requests during it, {len(outcomes)} in all, 0 failed")
