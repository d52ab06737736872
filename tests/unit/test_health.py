"""vfgen.health against the stub HTTP server: probe states, check() exit codes and output, wait()."""

from __future__ import annotations

import io
import json
import signal
import threading
import time

import pytest

from tests.harness.procs import free_port
from tests.harness.stub_http import StubServer
from vfgen import health
from vfgen.errors import HealthError
from vfgen.health import Target, check, probe, wait


@pytest.fixture
def stub():
    with StubServer(models=["qwen"]) as server:
        yield server


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# -- probe -------------------------------------------------------------------------------

def test_probe_healthy_with_expected_and_with_any_model(stub):
    for expected in ("qwen", None):
        result = probe(Target("q/0", stub.url, expected_model=expected))
        assert result.state == "healthy", result
        assert result.models == ("qwen",)
        assert result.latency_ms is not None and result.latency_ms > 0


def test_probe_starting_when_health_is_200_but_no_model_listed(stub):
    stub.models = []
    result = probe(Target("q/0", stub.url))
    assert (result.state, result.detail) == ("starting", "no model listed yet")


def test_probe_starting_when_another_model_is_listed(stub):
    stub.models = ["other"]
    result = probe(Target("q/0", stub.url, expected_model="qwen"))
    assert result.state == "starting"
    assert result.detail == "model 'qwen' not listed (serves: other)"


def test_probe_unhealthy_on_503(stub):
    stub.health_status = 503
    result = probe(Target("q/0", stub.url))
    assert (result.state, result.detail) == ("unhealthy", "HTTP 503 on /health")


def test_probe_unhealthy_names_the_api_key_on_401(stub):
    stub.models_status = 401
    result = probe(Target("q/0", stub.url))
    assert result.state == "unhealthy"
    assert result.detail == "HTTP 401 on /v1/models (set VLLM_API_KEY)"


def test_probe_sends_vllm_api_key_as_bearer(stub, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    probe(Target("q/0", stub.url))
    probe(Target("q/0", stub.url), api_key="explicit")
    auth = [headers.get("Authorization") for path, headers in stub.requests if path == "/v1/models"]
    assert auth == ["Bearer from-env", "Bearer explicit"]


def test_probe_down_when_refused():
    result = probe(Target("q/0", refused_url()))
    assert result == health.Probe(result.target, "down", None, (), "connection refused")


def test_probe_down_on_timeout(stub):
    stub.delay = 3.0  # far above the timeout, so a loaded machine cannot blur the two
    began = time.monotonic()
    result = probe(Target("q/0", stub.url), timeout=0.2)
    assert time.monotonic() - began < 2.5
    assert (result.state, result.detail) == ("down", "no answer within 0.2s")


def test_dispatcher_is_healthy_on_health_200_even_without_models(stub):
    stub.models_status = 404
    result = probe(Target("dispatcher", stub.url, kind="dispatcher"))
    assert result.state == "healthy"
    stub.health_status = 502
    assert probe(Target("dispatcher", stub.url, kind="dispatcher")).state == "unhealthy"


# -- check -------------------------------------------------------------------------------

def test_check_exit_codes(stub):
    healthy = Target("q/0", stub.url, port=stub.port, gpus="0", expected_model="qwen")
    down = Target("q/1", refused_url(), gpus="1")
    out = io.StringIO()
    assert check([healthy], out=out) == 0
    assert check([healthy, down], out=out) == 1
    assert check([down, Target("q/2", refused_url())], out=out) == 2
    stub_starting = Target("q/3", stub.url, expected_model="not-served")
    assert check([stub_starting], out=out) == 2  # nothing healthy


def test_check_is_critical_when_the_dispatcher_is_down(stub):
    targets = [Target("q/0", stub.url), Target("dispatcher", refused_url(), kind="dispatcher")]
    assert check(targets, out=io.StringIO()) == 2


def test_check_prints_a_table(stub):
    out = io.StringIO()
    down_url = refused_url()
    check([Target("qwen/0", stub.url, gpus="0,1", expected_model="qwen"), Target("qwen/1", down_url, gpus="2")], out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["INSTANCE", "PORT", "GPU", "STATE", "LATENCY", "MODEL", "DETAIL"]
    assert lines[1].split()[:4] == ["qwen/0", str(stub.port), "0,1", "healthy"]
    assert lines[1].split()[5:] == ["qwen", "ok"]
    assert lines[2].split() == ["qwen/1", down_url.rsplit(":", 1)[1], "2", "down", "-", "-", "connection", "refused"]
    assert lines[3] == "DEGRADED: 1/2 healthy"


def test_check_prints_json(stub):
    out = io.StringIO()
    code = check([Target("qwen/0", stub.url, expected_model="qwen"), Target("qwen/1", refused_url())],
                 as_json=True, out=out)
    document = json.loads(out.getvalue())
    assert code == document["exit_code"] == 1
    assert document["status"] == "degraded"
    assert [t["state"] for t in document["targets"]] == ["healthy", "down"]
    assert document["targets"][0]["port"] == stub.port
    assert document["targets"][0]["models"] == ["qwen"]
    assert document["targets"][1]["latency_ms"] is None


def test_check_probes_in_parallel():
    servers = [StubServer().start() for _ in range(4)]
    try:
        for server in servers:
            server.delay = 0.5  # per request; a probe makes two
        began = time.monotonic()
        assert check([Target(f"s/{i}", s.url) for i, s in enumerate(servers)], out=io.StringIO()) == 0
        assert time.monotonic() - began < 2.5  # serially it would take 4 s
    finally:
        for server in servers:
            server.stop()


def test_check_without_targets_is_an_error():
    with pytest.raises(HealthError):
        check([], out=io.StringIO())


# -- wait --------------------------------------------------------------------------------

def test_wait_succeeds_once_the_model_appears(stub):
    stub.models = []
    timer = threading.Timer(1.0, lambda: setattr(stub, "models", ["qwen"]))
    timer.start()
    out = io.StringIO()
    began = time.monotonic()
    try:
        assert wait([stub.url], model="qwen", timeout=10, interval=0.2, out=out) == 0
    finally:
        timer.cancel()
    # It waited out the timeout and then gave up: the upper bound only catches a wait that
    # never ends (a loaded CI machine may take seconds longer; speed lives in bench/).
    assert 1.0 <= time.monotonic() - began < 30.0
    assert "healthy after" in out.getvalue().splitlines()[-1]


def test_wait_waits_for_every_url(stub):
    with StubServer(models=[]) as second:
        threading.Timer(0.8, lambda: setattr(second, "models", ["qwen"])).start()
        began = time.monotonic()
        assert wait([stub.url, second.url], model="qwen", timeout=10, interval=0.2, out=io.StringIO()) == 0
        assert time.monotonic() - began >= 0.8


def test_wait_times_out_cleanly(stub):
    stub.models = ["other"]
    out = io.StringIO()
    began = time.monotonic()
    assert wait([stub.url], model="qwen", timeout=1.0, interval=0.2, out=out) == 1
    # It waited out the timeout and then gave up: the upper bound only catches a wait that
    # never ends (a loaded CI machine may take seconds longer; speed lives in bench/).
    assert 1.0 <= time.monotonic() - began < 30.0
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("timed out after 1s") and "model 'qwen' not listed (serves: other)" in last


def test_wait_reports_refused_connections_without_a_traceback():
    out = io.StringIO()
    assert wait([refused_url()], model=None, timeout=0.5, interval=0.1, out=out) == 1
    assert "connection refused" in out.getvalue()
    assert "Traceback" not in out.getvalue()


def test_wait_reports_progress_at_a_bounded_rate(monkeypatch):
    monkeypatch.setattr(health, "WAIT_REPORT_EVERY_S", 0.5)
    out = io.StringIO()
    wait([refused_url()], model=None, timeout=2.2, interval=0.05, out=out)
    progress = [line for line in out.getvalue().splitlines() if line.startswith("still waiting")]
    assert 2 <= len(progress) <= 5, out.getvalue()


def test_wait_fails_early_when_the_pid_dies(procs, stub):
    stub.models = []  # never healthy
    sleeper = procs.start(["sleep", "30"])
    threading.Timer(0.5, lambda: sleeper.send_signal(signal.SIGKILL)).start()
    out = io.StringIO()
    began = time.monotonic()
    assert wait([stub.url], model="qwen", timeout=30, pid=sleeper.pid, interval=0.2, out=out) == 1
    assert time.monotonic() - began < 15.0  # the unreaped zombie counts as gone (the timeout is 30 s)
    assert f"process {sleeper.pid} exited before {stub.url} became healthy" in out.getvalue()


def test_pid_alive(procs):
    sleeper = procs.start(["sleep", "30"])
    assert health.pid_alive(sleeper.pid)
    sleeper.kill()
    deadline = time.monotonic() + 5
    while health.pid_alive(sleeper.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not health.pid_alive(sleeper.pid)  # zombie, not reaped yet
    sleeper.wait()
    assert not health.pid_alive(sleeper.pid)  # reaped
