"""vfgen.rollout with a fake command runner and stub instances: order, commands, stop at first failure."""

from __future__ import annotations

import io
import subprocess
import threading

import pytest

from tests.harness.procs import free_port
from tests.harness.stub_http import StubServer
from vfgen.errors import ConfigError
from vfgen.rollout import RolloutStep, rollout


class FakeRunner:
    """Records every command; answers from `results` (name → (returncode, stdout, stderr) or an exception)."""

    def __init__(self, results: dict | None = None, on_run=None):
        self.commands: list[list[str]] = []
        self.results = results or {}
        self.on_run = on_run

    def __call__(self, command, **kwargs):
        assert kwargs.get("timeout"), "every restart must be bounded"
        self.commands.append(list(command))
        if self.on_run:
            self.on_run(command)
        result = self.results.get(command[-1], (0, f"{command[-1]}: stopped\n{command[-1]}: started\n", ""))
        if isinstance(result, BaseException):
            raise result
        returncode, stdout, stderr = result
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)


@pytest.fixture
def instances():
    servers = [StubServer(models=["qwen"]).start() for _ in range(3)]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def steps_for(servers) -> list[RolloutStep]:
    return [RolloutStep(f"vllm-qwen-{i}", server.url, "qwen") for i, server in enumerate(servers)]


def test_systemd_restarts_in_order(instances):
    runner, out = FakeRunner(), io.StringIO()
    assert rollout(steps_for(instances), backend="systemd", timeout=10, runner=runner, out=out) == 0
    assert runner.commands == [["systemctl", "restart", f"vllm-qwen-{i}"] for i in range(3)]
    assert "rollout complete: 3 instance(s)" in out.getvalue()


def test_supervisord_uses_the_given_base_command(instances):
    runner = FakeRunner()
    base = ["supervisorctl", "-c", "/tmp/x/supervisord.conf"]
    assert rollout(steps_for(instances), backend="supervisord", timeout=10, supervisorctl=base,
                   runner=runner, out=io.StringIO()) == 0
    assert runner.commands == [[*base, "restart", f"vllm-qwen-{i}"] for i in range(3)]


def test_custom_systemctl_base_command(instances):
    runner = FakeRunner()
    rollout(steps_for(instances[:1]), backend="systemd", timeout=10, systemctl=["systemctl", "--user"],
            runner=runner, out=io.StringIO())
    assert runner.commands == [["systemctl", "--user", "restart", "vllm-qwen-0"]]


def test_stops_at_the_first_failed_restart(instances):
    runner = FakeRunner({"vllm-qwen-1": (1, "", "Job for vllm-qwen-1.service failed.\n")})
    out = io.StringIO()
    assert rollout(steps_for(instances), backend="systemd", timeout=10, runner=runner, out=out) == 1
    assert [c[-1] for c in runner.commands] == ["vllm-qwen-0", "vllm-qwen-1"]
    text = out.getvalue()
    assert "rollout stopped at vllm-qwen-1: restart failed (exit 1): Job for vllm-qwen-1.service failed." in text
    assert "1 of 3 instance(s) restarted; not touched: vllm-qwen-2" in text


def test_supervisorctl_spawn_error_counts_as_failure_even_with_exit_0(instances):
    runner = FakeRunner({"vllm-qwen-0": (0, "vllm-qwen-0: ERROR (spawn error)\n", "")})
    assert rollout(steps_for(instances), backend="supervisord", timeout=10, runner=runner, out=io.StringIO()) == 1
    assert len(runner.commands) == 1


def test_supervisorctl_restart_of_a_stopped_program_is_fine(instances):
    output = "vllm-qwen-0: ERROR (not running)\nvllm-qwen-0: started\n"
    runner = FakeRunner({"vllm-qwen-0": (0, output, "")})
    assert rollout(steps_for(instances), backend="supervisord", timeout=10, runner=runner, out=io.StringIO()) == 0


def test_waits_for_health_before_the_next_restart(instances):
    # The restart makes the instance "starting"; it must be healthy again before the next restart.
    seen_before_restart: list[list[bool]] = []

    def on_run(command):
        seen_before_restart.append([s.models == ["qwen"] for s in instances])
        index = int(command[-1].rsplit("-", 1)[1])
        instances[index].models = []
        threading.Timer(0.5, lambda: setattr(instances[index], "models", ["qwen"])).start()

    runner = FakeRunner(on_run=on_run)
    assert rollout(steps_for(instances), backend="systemd", timeout=10, runner=runner, out=io.StringIO()) == 0
    assert seen_before_restart == [[True, True, True]] * 3  # the previous one had recovered each time


def test_stops_when_an_instance_does_not_come_back(instances):
    instances[1].health_status = 503
    runner, out = FakeRunner(), io.StringIO()
    assert rollout(steps_for(instances), backend="systemd", timeout=1.5, runner=runner, out=out) == 1
    assert [c[-1] for c in runner.commands] == ["vllm-qwen-0", "vllm-qwen-1"]
    assert f"rollout stopped at vllm-qwen-1: not healthy within 1.5s of the restart ({instances[1].url})" in out.getvalue()


def test_stops_when_the_restart_hangs(instances):
    runner = FakeRunner({"vllm-qwen-0": subprocess.TimeoutExpired(["systemctl"], 10)})
    out = io.StringIO()
    assert rollout(steps_for(instances), backend="systemd", timeout=10, runner=runner, out=out) == 1
    assert "rollout stopped at vllm-qwen-0: restart did not finish within 10s" in out.getvalue()


def test_missing_tool_is_a_clean_failure():
    step = RolloutStep("vllm-qwen-0", f"http://127.0.0.1:{free_port()}", "qwen")
    out = io.StringIO()
    assert rollout([step], backend="systemd", timeout=5, systemctl=["/nonexistent/systemctl"], out=out) == 1
    assert "cannot run /nonexistent/systemctl" in out.getvalue()


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError):
        rollout([], backend="docker", timeout=1, runner=FakeRunner())
