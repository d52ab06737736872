"""The role on one booted systemd host that is both GPU host and load balancer (backends on 127.0.0.1).

One container for the whole module; the tests run in file order and build on
each other: a check-mode preview of the bare host, the real apply, a second
apply with 0 changes, check mode on the converged host, the user-facing
testinfra suite, requests through nginx, then a reconfiguration.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.ansible.conftest import run_testinfra
from tests.ansible.harness import EXAMPLES, Ansible, PlaybookRun, Tools, example_deployment, offline_binds, use_local_apt_repo
from tests.harness.nspawn import Container, booted_container

pytestmark = pytest.mark.ansible

HOST = "aio"


@dataclass
class Site:
    container: Container
    ansible: Ansible
    inventory: Path
    deployment: dict[str, Any]
    runs: list[PlaybookRun] = field(default_factory=list)

    def apply(self, *, check: bool = False, deployment: dict[str, Any] | None = None) -> PlaybookRun:
        extra = self.ansible.vars_file("deployment", deployment or self.deployment)
        run = self.ansible.playbook(EXAMPLES / "site.yml", [self.inventory], [EXAMPLES / "group_vars" / "all.yml", extra],
                                    check=check)
        self.runs.append(run)
        assert run.rc == 0 and HOST in run.recap, f"{run}\n--- journal ---\n{self.container.journal(lines=80)}"
        return run

    def plan(self) -> dict[str, Any]:
        return json.loads(self.container.run(["/opt/vfgen/bin/vfgen", "plan", "-f", "/etc/vfgen/chat.yaml", "--json"]).stdout)

    def main_pids(self) -> dict[str, str]:
        return {i["name"]: self.container.show(f"{i['name']}.service", "MainPID")["MainPID"] for i in self.plan()["instances"]}


@pytest.fixture(scope="module")
def site(tools: Tools, wheelhouse: Path, ansible_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    port = random.randint(20000, 29000)  # the container's network is private; random anyway
    with booted_container(binds=offline_binds(wheelhouse), rootfs=ansible_rootfs) as container:
        use_local_apt_repo(container)
        ansible = Ansible(tools, tmp_path_factory.mktemp("ansible-aio"))
        inventory = ansible.inventory(HOST, {HOST: container}, {"vfgen_gpu": [HOST], "vfgen_lb": [HOST]},
                                      {HOST: {"ansible_host": "127.0.0.1"}})
        yield Site(container, ansible, inventory, example_deployment(port, port + 100, latency=0.0))


def test_check_mode_on_a_bare_host_previews_and_changes_nothing(site: Site) -> None:
    run = site.apply(check=True)
    assert run.recap[HOST].changed > 0, run
    for path in ("/opt/vfgen", "/etc/vfgen", "/etc/systemd/system/chat.target"):
        assert site.container.run(["test", "-e", path], check=False).returncode == 1, f"check mode created {path}"


def test_apply_converges_and_a_second_run_changes_nothing(site: Site) -> None:
    first = site.apply()
    assert first.recap[HOST].changed > 0, first
    second = site.apply()
    assert second.recap[HOST].changed == 0, "\n".join(second.changed_tasks()) or str(second)
    # vLLM was installed into its own venv at the pinned version, and the units run it.
    version = site.container.run(["/opt/vllm/bin/python", "-c", "import importlib.metadata as m; print(m.version('vllm'))"]).stdout
    assert version.strip() == "0.32.0"
    assert '"/opt/vllm/bin/vllm" "serve"' in site.container.read_file("/etc/systemd/system/chat-qwen-0.service")
    print(f"all-in-one: first apply {first.seconds:.1f}s, second {second.seconds:.1f}s")


def test_check_mode_on_the_converged_host_reports_no_change(site: Site) -> None:
    run = site.apply(check=True)
    assert run.recap[HOST].changed == 0, "\n".join(run.changed_tasks()) or str(run)


def test_testinfra_suite_passes_against_the_host(site: Site) -> None:
    result = run_testinfra([site.container.pid1])
    assert result.returncode == 0, result.stdout + result.stderr
    # Both halves ran: the host is GPU host and load balancer at once.
    assert " skipped" not in result.stdout.splitlines()[-1], result.stdout
    assert "12 passed" in result.stdout, result.stdout


def test_nginx_routes_each_model_to_its_instances(site: Site) -> None:
    port = site.deployment["vfgen_port"]
    seen: dict[str, set[str]] = {}
    chat = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}]}
    for model, path, body in (("qwen", "/v1/chat/completions", chat), ("bge", "/v1/embeddings", {"model": "bge", "input": "hi"})):
        for _ in range(6):
            out = site.container.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", "--max-time", "5",
                                      "-H", "Content-Type: application/json", "-d", json.dumps(body),
                                      f"http://127.0.0.1:{port}{path}"]).stdout
            assert out.startswith("HTTP/1.1 200"), out
            headers = dict(line.split(": ", 1) for line in out.splitlines()[1:] if ": " in line)
            assert headers["x-fake-vllm-model"] == model, out
            seen.setdefault(model, set()).add(headers["x-fake-vllm-port"])
    assert len(seen["qwen"]) == 2 and len(seen["bge"]) == 1, seen  # least_conn spreads over both qwen instances


def test_reconfigure_removes_stale_units_and_rolls_out_changed_ones(site: Site) -> None:
    before = site.main_pids()
    smaller = json.loads(json.dumps(site.deployment))
    qwen = next(m for m in smaller["vfgen_models"] if m["name"] == "qwen")
    qwen["instances"] = 1  # chat-qwen-1 goes away; chat-bge-0 moves down one port
    qwen["gpus"] = [0]
    run = site.apply(deployment=smaller)
    assert run.recap[HOST].changed > 0, run
    c = site.container
    assert c.run(["test", "-e", "/etc/systemd/system/chat-qwen-1.service"], check=False).returncode == 1
    assert c.show("chat-qwen-1.service", "LoadState", "ActiveState") == {"LoadState": "not-found", "ActiveState": "inactive"}
    after = site.main_pids()
    assert set(after) == {"chat-qwen-0", "chat-bge-0"}
    assert after["chat-bge-0"] != before["chat-bge-0"], "the changed unit must have been restarted"
    assert after["chat-qwen-0"] == before["chat-qwen-0"], "an unchanged unit must not be restarted"
    bge_port = next(i["port"] for i in site.plan()["instances"] if i["name"] == "chat-bge-0")
    assert f"127.0.0.1:{bge_port} max_conns=" in c.read_file("/etc/nginx/conf.d/chat.conf")
    again = site.apply(deployment=smaller)
    assert again.recap[HOST].changed == 0, "\n".join(again.changed_tasks()) or str(again)
    port = site.deployment["vfgen_port"]
    body = json.dumps({"model": "bge", "input": "hi"})
    out = c.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "-H", "Content-Type: application/json",
                 "-d", body, f"http://127.0.0.1:{port}/v1/embeddings"]).stdout
    assert out == "200"
    site.deployment = smaller


def test_a_broken_dispatcher_never_replaces_the_working_one(site: Site) -> None:
    conf = "/etc/nginx/conf.d/chat.conf"
    working = site.container.read_file(conf)
    broken = {**site.deployment, "vfgen_listen": "nosuchhost.invalid"}  # vfgen accepts it; nginx cannot resolve it
    extra = site.ansible.vars_file("broken", broken)
    run = site.ansible.playbook(EXAMPLES / "site.yml", [site.inventory], [EXAMPLES / "group_vars" / "all.yml", extra])
    assert run.rc != 0 and run.recap[HOST].failed == 1, run
    assert "failed to validate" in run.output and "host not found" in run.output, str(run)
    assert site.container.read_file(conf) == working
    port = site.deployment["vfgen_port"]
    out = site.container.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                              f"http://127.0.0.1:{port}/health"]).stdout
    assert out == "200", "nginx must keep serving the working configuration"
