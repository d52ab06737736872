"""vfgen.launch wrapping a stub "vllm" (tests/harness/stub_http.py) in real subprocesses.

Every child writes JSON event lines (start / ready / sigterm, with times) to a record
file, which is how these tests see what happened inside the launcher's child.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness.procs import free_port
from tests.harness.stub_http import StubServer, read_records
from tests.harness.waiting import wait_until
from vfgen.health import Probe, Target, pid_alive, probe

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MODEL = "stubmodel"


class Launched:
    """One launcher process, its log file and its child's record file."""

    def __init__(self, proc: subprocess.Popen, log: Path, record: Path, port: int):
        self.proc, self.log, self.record, self.port = proc, log, record, port

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def events(self, name: str) -> list[dict]:
        return [event for event in read_records(str(self.record)) if event["event"] == name]

    def child_pid(self) -> int:
        return self.events("start")[0]["pid"]


def launch(procs, tmp_path: Path, tag: str, *options: str, child: tuple[str, ...] = (), port: int | None = None,
           model: str = MODEL, python_prefix: tuple[str, ...] = ("-m", "vfgen.launch")) -> Launched:
    port = port or free_port()
    record = tmp_path / f"{tag}.record"
    log = tmp_path / f"{tag}.log"
    stub = [sys.executable, "-m", "tests.harness.stub_http", "--port", str(port), "--model", model,
            "--record", str(record), *child]
    argv = [sys.executable, *python_prefix, "--health-url", f"http://127.0.0.1:{port}",
            "--served-model-name", model, *options, "--", *stub]
    with open(log, "wb") as handle:
        proc = procs.start(argv, stderr=handle, stdout=handle, cwd=REPO, env=ENV)
    return Launched(proc, log, record, port)


def until(condition, timeout: float, what: str):
    """Poll `condition` (bounded); return its first truthy value or fail naming `what`."""
    return wait_until(condition, timeout, interval=0.05, what=what)


def lock_is_free(path: Path) -> bool:
    """Try the lock from a fresh open file description; release at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def gone(pid: int) -> bool:
    return not pid_alive(pid)


def finish(launched: Launched, timeout: float = 10.0) -> int:
    try:
        return launched.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"launcher did not exit within {timeout}s; log:\n{launched.text()}")


# -- serialised start-up -----------------------------------------------------------------

def _startup_intervals(launchers: list[Launched]) -> list[tuple[float, float]]:
    until(lambda: all(l.events("ready") for l in launchers), 20, "every child to become ready")
    return sorted((l.events("start")[0]["t"], l.events("ready")[0]["t"]) for l in launchers)


def test_two_launchers_sharing_a_lock_never_start_together(procs, tmp_path):
    lock = tmp_path / "locks" / "gpu-0.lock"  # parent dir does not exist yet
    first, second = (launch(procs, tmp_path, tag, "--lock", str(lock), child=("--ready-after", "1.0"))
                     for tag in ("a", "b"))
    (start1, ready1), (start2, ready2) = _startup_intervals([first, second])
    assert ready1 <= start2, "the second child started while the first was still starting"
    waiter = first if "waiting for lock" in first.text() else second
    assert f"waiting for lock {lock} (held by pid" in waiter.text()
    assert oct(lock.parent.stat().st_mode & 0o777) == "0o755"
    until(lambda: "healthy after" in first.text() and "healthy after" in second.text(), 10, "both healthy")
    assert "released GPU lock(s) " + str(lock) in first.text()


def test_without_a_lock_the_same_launchers_do_overlap(procs, tmp_path):
    # Control for the test above: its overlap measurement does see concurrent start-ups.
    launchers = [launch(procs, tmp_path, tag, child=("--ready-after", "1.0")) for tag in ("a", "b")]
    (start1, ready1), (start2, ready2) = _startup_intervals(launchers)
    assert start2 < ready1


def test_holder_writes_its_pid_and_name_into_the_lock_file(procs, tmp_path):
    lock = tmp_path / "gpu-0.lock"
    launched = launch(procs, tmp_path, "a", "--lock", str(lock), child=("--ready-after", "30"))
    until(lambda: launched.events("start"), 10, "the child to start")
    assert lock.read_text() == f"{launched.proc.pid} {MODEL}:{launched.port}\n"
    assert not lock_is_free(lock)


def test_killed_holder_leaves_no_stale_lock_and_no_orphan_child(procs, tmp_path):
    lock = tmp_path / "gpu-0.lock"
    holder = launch(procs, tmp_path, "holder", "--lock", str(lock), child=("--ready-after", "60"))
    until(lambda: holder.events("start"), 10, "the holder's child to start")
    orphan = holder.child_pid()
    waiter = launch(procs, tmp_path, "waiter", "--lock", str(lock), child=("--ready-after", "0.2"))
    until(lambda: "waiting for lock" in waiter.text(), 10, "the waiter to block on the lock")

    holder.proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    until(lambda: waiter.events("start"), 3, "the waiter's child to start after the holder died")
    assert waiter.events("start")[0]["t"] - killed_at < 2.0
    until(lambda: gone(orphan), 3, f"the killed launcher's child (pid {orphan}) to die of PDEATHSIG")
    until(lambda: "healthy after" in waiter.text(), 10, "the waiter to become healthy")


def test_lock_fds_are_not_passed_to_the_child(procs, tmp_path):
    lock = tmp_path / "gpu-0.lock"
    launched = launch(procs, tmp_path, "a", "--lock", str(lock), child=("--ready-after", "30"))
    until(lambda: launched.events("start"), 10, "the child to start")
    open_files = launched.events("start")[0]["fds"]
    assert str(lock) not in open_files
    assert any(path.endswith("a.log") for path in open_files)  # the listing itself works


def test_locks_are_taken_in_sorted_order(procs, tmp_path):
    lock_a, lock_b = tmp_path / "gpu-0.lock", tmp_path / "gpu-1.lock"
    held = os.open(lock_a, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        launched = launch(procs, tmp_path, "tp", "--lock", str(lock_b), "--lock", str(lock_a),
                          child=("--ready-after", "0.2"))
        until(lambda: f"waiting for lock {lock_a}" in launched.text(), 10, "the launcher to wait for gpu-0")
        assert lock_is_free(lock_b), "gpu-1 was taken before gpu-0"
        assert not launched.events("start")
    finally:
        os.close(held)
    until(lambda: "healthy after" in launched.text(), 10, "the launcher to become healthy")
    assert f"released GPU lock(s) {lock_a}, {lock_b}" in launched.text()
    assert lock_is_free(lock_a) and lock_is_free(lock_b)


def test_tensor_parallel_launchers_with_crossed_lock_lists_do_not_deadlock(procs, tmp_path):
    lock_a, lock_b = str(tmp_path / "gpu-0.lock"), str(tmp_path / "gpu-1.lock")
    launchers = [
        launch(procs, tmp_path, "x", "--lock", lock_a, "--lock", lock_b, child=("--ready-after", "0.5")),
        launch(procs, tmp_path, "y", "--lock", lock_b, "--lock", lock_a, child=("--ready-after", "0.5")),
    ]
    (start1, ready1), (start2, ready2) = _startup_intervals(launchers)
    assert ready1 <= start2


# -- child failures and signals ----------------------------------------------------------

def test_child_crash_before_healthy_exits_non_zero_and_releases_the_lock(procs, tmp_path):
    lock = tmp_path / "gpu-0.lock"
    launched = launch(procs, tmp_path, "a", "--lock", str(lock),
                      child=("--ready-after", "30", "--exit-after", "0.5", "--exit-code", "3"))
    assert finish(launched) == 3
    assert lock_is_free(lock)
    assert "child exited with code 3 before becoming healthy" in launched.text()
    assert "Traceback" not in launched.text()


def test_child_exit_0_before_healthy_counts_as_failure(procs, tmp_path):
    launched = launch(procs, tmp_path, "a", child=("--ready-after", "30", "--exit-after", "0.3", "--exit-code", "0"))
    assert finish(launched) == 1


def test_sigterm_after_healthy_is_forwarded_and_exits_0(procs, tmp_path):
    launched = launch(procs, tmp_path, "a", "--lock", str(tmp_path / "gpu-0.lock"))
    until(lambda: "healthy after" in launched.text(), 10, "the launcher to become healthy")
    launched.proc.send_signal(signal.SIGTERM)
    assert finish(launched) == 0
    assert launched.events("sigterm"), "the child never saw SIGTERM"
    assert gone(launched.child_pid())
    assert "forwarding SIGTERM" in launched.text()


def test_sigterm_while_starting_is_forwarded_and_exits_0(procs, tmp_path):
    lock = tmp_path / "gpu-0.lock"
    launched = launch(procs, tmp_path, "a", "--lock", str(lock), child=("--ready-after", "30"))
    until(lambda: launched.events("start"), 10, "the child to start")
    launched.proc.send_signal(signal.SIGTERM)
    assert finish(launched) == 0
    assert launched.events("sigterm")
    assert lock_is_free(lock)


def test_sigterm_while_waiting_for_the_lock_exits_0_without_starting(procs, tmp_path):
    lock = tmp_path / "gpu-0.lock"
    held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        launched = launch(procs, tmp_path, "a", "--lock", str(lock))
        until(lambda: "waiting for lock" in launched.text(), 10, "the launcher to wait")
        launched.proc.send_signal(signal.SIGTERM)
        assert finish(launched) == 0
        assert not launched.events("start")
        assert "received SIGTERM before the child started" in launched.text()
    finally:
        os.close(held)


def test_child_killed_by_a_signal_exits_128_plus_n(procs, tmp_path):
    launched = launch(procs, tmp_path, "a")
    until(lambda: "healthy after" in launched.text(), 10, "the launcher to become healthy")
    os.kill(launched.child_pid(), signal.SIGKILL)
    assert finish(launched) == 128 + signal.SIGKILL
    assert "child was killed by SIGKILL" in launched.text()


def test_start_timeout_stops_the_child_and_exits_1(procs, tmp_path):
    lock = tmp_path / "gpu-0.lock"
    launched = launch(procs, tmp_path, "a", "--lock", str(lock), "--start-timeout", "1", child=("--ready-after", "30"))
    assert finish(launched) == 1
    assert launched.events("sigterm")
    assert lock_is_free(lock)
    assert "not healthy after 1s (down: connection refused)" in launched.text()


def test_start_timeout_counts_from_the_lock_and_releases_it_for_the_next(procs, tmp_path):
    # The holder never becomes healthy: it is stopped --start-timeout after it took the lock,
    # which it then releases, and the waiter (bounded by --lock-timeout) starts.
    lock = tmp_path / "gpu-0.lock"
    hung = launch(procs, tmp_path, "hung", "--lock", str(lock), "--start-timeout", "1.5", "--lock-timeout", "0",
                  child=("--ready-after", "60"))
    until(lambda: hung.events("start"), 10, "the hung child to start")
    waiter = launch(procs, tmp_path, "waiter", "--lock", str(lock), "--start-timeout", "30", "--lock-timeout", "20",
                    child=("--ready-after", "0.2"))
    assert finish(hung) == 1
    assert "not healthy after 1.5s" in hung.text() and f"released GPU lock(s) {lock}" in hung.text()
    until(lambda: "healthy after" in waiter.text(), 20, "the waiter to start and become healthy")
    assert hung.events("sigterm")[0]["t"] <= waiter.events("start")[0]["t"]
    assert "waiting for lock" in waiter.text() and "acquired lock" in waiter.text()


def test_lock_timeout_gives_up_without_starting(procs, tmp_path):
    lock = tmp_path / "gpu-0.lock"
    holder = launch(procs, tmp_path, "holder", "--lock", str(lock), child=("--ready-after", "60"))
    until(lambda: holder.events("start"), 10, "the holder's child to start")
    late = launch(procs, tmp_path, "late", "--lock", str(lock), "--lock-timeout", "1")
    assert finish(late) == 1
    # The elapsed time is whole seconds as the launcher saw them: 1 s, or more on a loaded machine.
    assert re.search(rf"lock {re.escape(str(lock))} not free after [1-9][0-9]*s \(held by pid {holder.proc.pid}\b",
                     late.text()), late.text()
    assert "--lock-timeout is 1s; not starting" in late.text()
    assert not late.events("start")


def test_after_stops_waiting_when_the_predecessor_lets_go_of_the_lock_unhealthy(procs, tmp_path):
    # supervisord ordering: the successor waits for its predecessor (--after); a predecessor
    # whose start timed out released the lock unhealthy, so the successor starts at once
    # instead of waiting out --lock-timeout while the predecessor's restart retakes the lock.
    lock = tmp_path / "gpu-0.lock"
    first = launch(procs, tmp_path, "first", "--lock", str(lock), "--start-timeout", "1", child=("--ready-after", "60"))
    until(lambda: first.events("start"), 10, "the first child to start")
    second = launch(procs, tmp_path, "second", "--lock", str(lock), "--after", f"http://127.0.0.1:{first.port}",
                    "--lock-timeout", "60", child=("--ready-after", "0.2"))
    assert finish(first) == 1
    until(lambda: "healthy after" in second.text(), 20, "the second to start")
    assert "released the start lock without becoming healthy; starting anyway" in second.text()


def test_start_timeout_kills_a_child_that_ignores_sigterm(procs, tmp_path):
    # Same entry point with a short SIGTERM→SIGKILL grace, so the test takes ~2 s, not 11.
    prefix = ("-c", "import sys, vfgen.launch as l; l.STOP_GRACE_S = 0.5; sys.exit(l.main(sys.argv[1:]))")
    launched = launch(procs, tmp_path, "a", "--start-timeout", "1",
                      child=("--ready-after", "30", "--on-sigterm", "ignore"), python_prefix=prefix)
    assert finish(launched) == 1
    assert "ignored SIGTERM for 0.5s; sending SIGKILL" in launched.text()
    assert gone(launched.child_pid())


# -- ordering and environment ------------------------------------------------------------

def test_after_waits_for_the_predecessor(procs, tmp_path):
    with StubServer(health_status=503) as predecessor:
        became_healthy = []

        def heal() -> None:
            became_healthy.append(time.time())
            predecessor.health_status = 200

        timer = threading.Timer(1.5, heal)
        timer.start()
        try:
            launched = launch(procs, tmp_path, "a", "--after", predecessor.url)
            until(lambda: launched.events("start"), 10, "the child to start")
        finally:
            timer.cancel()
        assert became_healthy and launched.events("start")[0]["t"] >= became_healthy[0]
        assert f"waiting up to 900s for {predecessor.url} to serve any model" in launched.text()


def test_after_gives_up_on_a_dead_predecessor_and_starts_anyway(procs, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    launched = launch(procs, tmp_path, "a", "--after", dead, "--start-timeout", "1")
    until(lambda: "healthy after" in launched.text(), 10, "the launcher to become healthy")
    assert f"warning: {dead} not healthy after 1s; starting anyway" in launched.text()


def test_env_reaches_the_child(procs, tmp_path):
    launched = launch(procs, tmp_path, "a", "--env", "VFGEN_TEST_A=1=2", "--env", "VFGEN_TEST_EMPTY=",
                      child=("--record-env", "VFGEN_TEST_A", "--record-env", "VFGEN_TEST_EMPTY",
                             "--record-env", "PYTHONPATH"))
    until(lambda: launched.events("start"), 10, "the child to start")
    assert launched.events("start")[0]["env"] == {"VFGEN_TEST_A": "1=2", "VFGEN_TEST_EMPTY": "", "PYTHONPATH": str(REPO)}


def test_env_file_reaches_the_child_and_overrides_env(procs, tmp_path):
    env_file = tmp_path / "secrets.env"
    env_file.write_text('# secrets\n\nVFGEN_TEST_TOKEN="s3 cr=t"\n; ignored\n  VFGEN_TEST_A = from-file \n')
    env_file.chmod(0o600)
    launched = launch(procs, tmp_path, "a", "--env", "VFGEN_TEST_A=from-env", "--env-file", str(env_file),
                      child=("--record-env", "VFGEN_TEST_TOKEN", "--record-env", "VFGEN_TEST_A"))
    until(lambda: launched.events("start"), 10, "the child to start")
    # As systemd's EnvironmentFile=: the file wins over Environment= (--env).
    assert launched.events("start")[0]["env"] == {"VFGEN_TEST_TOKEN": "s3 cr=t", "VFGEN_TEST_A": "from-file"}
    assert "s3 cr=t" not in launched.text()


@pytest.mark.parametrize("content,message", [
    (None, "cannot read env file {path}: No such file or directory"),
    (b"OK=1\nHF_TOKEN=hf_secretvalue\xff\n", "{path}:2: invalid UTF-8"),
    (b"OK=1\nHF_TOKEN=hf_secret\0value\n", "{path}: a NUL byte"),
])
def test_bad_env_file_exits_1_naming_it_without_starting_or_echoing(procs, tmp_path, content, message):
    # The files systemd refuses to start with (tests/systemd/test_env_file_parity.py).
    env_file = tmp_path / "secrets.env"
    if content is not None:
        env_file.write_bytes(content)
    lock = tmp_path / "gpu-0.lock"
    launched = launch(procs, tmp_path, "a", "--lock", str(lock), "--env-file", str(env_file))
    assert finish(launched) == 1
    assert message.format(path=env_file) in launched.text(), launched.text()
    assert "hf_secretvalue" not in launched.text()
    assert not launched.events("start") and lock_is_free(lock)


def test_env_file_lines_systemd_drops_are_dropped_with_a_warning_naming_the_line(procs, tmp_path):
    env_file = tmp_path / "secrets.env"
    env_file.write_text("VFGEN_TEST_A=1\nHF_TOKEN hf_secretvalue\n1BAD=hf_secretvalue\n")
    launched = launch(procs, tmp_path, "a", "--env-file", str(env_file),
                      child=("--record-env", "VFGEN_TEST_A", "--record-env", "HF_TOKEN"))
    until(lambda: launched.events("start"), 10, "the child to start")
    env = launched.events("start")[0]["env"]
    assert env["VFGEN_TEST_A"] == "1" and env.get("HF_TOKEN") is None, env
    assert f"{env_file}:2: not a KEY=VALUE line; ignored" in launched.text()
    assert f"{env_file}:3: invalid variable name; ignored" in launched.text()
    assert "hf_secretvalue" not in launched.text()


def test_output_lines_carry_the_prefix(procs, tmp_path):
    launched = launch(procs, tmp_path, "a")
    until(lambda: "healthy after" in launched.text(), 10, "the launcher to become healthy")
    launcher_lines = [line for line in launched.text().splitlines() if "vfgen-launch" in line]
    assert launcher_lines and all(line.startswith(f"vfgen-launch[{MODEL}:{launched.port}]: ") for line in launcher_lines)


# -- usage errors --------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--health-url", "http://127.0.0.1:1"], "nothing to run: give the command after `--`"),
    (["--health-url", "http://127.0.0.1:1", "--"], "nothing to run: give the command after `--`"),
    (["--health-url", "http://127.0.0.1:1", "--no-such-option", "--", "true"], "unrecognized arguments"),
    (["--", "true"], "the following arguments are required: --health-url"),
    (["--health-url", "http://127.0.0.1:1", "--env", "NOEQUALS", "--", "true"], "expected KEY=VALUE"),
    (["--health-url", "http://127.0.0.1:1", "--start-timeout", "0", "--", "true"], "must be > 0"),
])
def test_usage_errors_exit_2_without_traceback(argv, message):
    result = subprocess.run([sys.executable, "-m", "vfgen.launch", *argv], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("separator", [["--"], []])
def test_command_options_are_left_alone_with_or_without_the_separator(separator):
    from vfgen.launch import _parse

    args, command = _parse(["--lock", "/l/a", "--health-url", "http://h:1", *separator,
                            "vllm", "serve", "m", "--port", "1", "--lock", "x", "--", "--help"])
    assert command == ["vllm", "serve", "m", "--port", "1", "--lock", "x", "--", "--help"]
    assert args.lock == ["/l/a"]


def test_missing_command_exits_127_and_releases_the_lock(tmp_path):
    lock = tmp_path / "gpu-0.lock"
    result = subprocess.run([sys.executable, "-m", "vfgen.launch", "--lock", str(lock), "--health-url",
                             "http://127.0.0.1:1", "--", str(tmp_path / "no-such-vllm")],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 127
    assert "cannot start" in result.stderr and "Traceback" not in result.stderr
    assert lock_is_free(lock)


# -- with the stand-in vLLM ----------------------------------------------------------------

def test_lock_is_held_until_the_model_is_listed_with_the_fake_vllm_and_an_api_key(procs, tmp_path):
    # fake_vllm answers /health before it lists its model, and guards /v1/models with --api-key:
    # the launcher must keep the lock through that window, authenticating with VLLM_API_KEY.
    port, lock, log = free_port(), tmp_path / "gpu-0.lock", tmp_path / "launch.log"
    argv = [sys.executable, "-m", "vfgen.launch", "--lock", str(lock), "--health-url", f"http://127.0.0.1:{port}",
            "--served-model-name", "qwen", "--env", "VLLM_API_KEY=sekret", "--",
            sys.executable, "-m", "vfgen.testing.fake_vllm", "serve", "Qwen/Qwen2.5-0.5B", "--served-model-name",
            "qwen", "--host", "127.0.0.1", "--port", str(port), "--api-key", "sekret",
            "--fake-startup-delay", "0.3", "--fake-register-delay", "1.5"]
    with open(log, "wb") as handle:
        launcher = procs.start(argv, stderr=handle, stdout=handle, cwd=REPO, env=ENV)
    seen_starting = probe_until_starting(f"http://127.0.0.1:{port}")
    assert seen_starting.detail == "model 'qwen' not listed (serves: nothing yet)"
    assert not lock_is_free(lock), "lock released before the model was listed"
    until(lambda: "healthy after" in log.read_text(), 15, "the launcher to become healthy")
    assert lock_is_free(lock)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=10) == 0


def probe_until_starting(url: str) -> Probe:
    def starting() -> Probe | None:
        result = probe(Target("fake", url, expected_model="qwen"), api_key="sekret")
        return result if result.state == "starting" else None

    return until(starting, 10, "/health 200 without the model")
