"""Promise (issue 16): the official `openai` SDK works end to end through the dispatcher (stand-ins).

models.list()/retrieve(), chat with and without streaming, completions, embeddings
and /tokenize work; each failure surfaces as the SDK's own exception type:
unknown model -> NotFoundError, wrong key -> AuthenticationError (401), a body over
max_body_size -> 413, and a 503 (overload with max_queue 0, or every backend down)
is retried by the SDK after Retry-After and, when it persists, raised as
InternalServerError. The class and message of each case are printed (run with -s)
and recorded in docs/routing.md.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from tests.harness.deploy import stand_in_args

pytestmark = pytest.mark.live

KEY = "sk-test-0123456789abcdef"
SLOW_LATENCY = 1.5  # the blocker holds the only slot of "slow" this long


@pytest.fixture(scope="module")
def sdk_deployment(module_live_deploy):
    return module_live_deploy({
        "max_body_size": "64k", "max_queue": 0,
        "models": [
            {"model": "org/chat", "served_model_name": "chat", "max_model_len": 512, "instances": 2, "gpus": [0, 1],
             "max_batch_size": 4, "extra_args": stand_in_args(chunks=4)},
            {"model": "org/embed", "served_model_name": "embed", "instances": 1, "gpus": [1], "extra_args": stand_in_args()},
            {"model": "org/slow", "served_model_name": "slow", "instances": 1, "gpus": [0], "max_batch_size": 1,
             "extra_args": stand_in_args(latency=SLOW_LATENCY)},
        ],
    })


def client(d, key: str = KEY, retries: int = 0):
    import httpx2
    import openai

    return openai.OpenAI(base_url=f"{d.url}/v1", api_key=key, max_retries=retries,
                         http_client=httpx2.Client(trust_env=False, timeout=30))


def record(case: str, exc: Exception) -> None:
    print(f"\n[openai-sdk] {case}: {type(exc).__name__} (status {getattr(exc, 'status_code', None)}): {exc}")


def test_models_list_and_retrieve(sdk_deployment):
    sdk = client(sdk_deployment)
    models = {m.id: m for m in sdk.models.list()}
    assert sorted(models) == ["chat", "embed", "slow"]
    assert models["chat"].model_extra["max_model_len"] == 512
    now = time.time()
    assert abs(models["chat"].created - now) < 120, models["chat"].created  # request time, like vLLM
    assert sdk.models.retrieve("chat").id == "chat"
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("gpt-4")
    record("models.retrieve(unknown)", info.value)


def test_chat_completion_embedding_and_stream(sdk_deployment):
    sdk = client(sdk_deployment)
    chat = sdk.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "chat" and chat.choices[0].message.content
    done = sdk.completions.create(model="chat", prompt="hello", max_tokens=4)
    assert done.model == "chat" and done.choices[0].text
    stream = sdk.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 tok3"
    assert chunks[-1].usage.completion_tokens == 4
    text = "".join(c.choices[0].text for c in sdk.completions.create(model="chat", prompt="x", stream=True))
    assert text == " tok0 tok1 tok2 tok3"
    vectors = sdk.embeddings.create(model="embed", input=["a", "b"])
    assert vectors.model == "embed" and len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0
    # /tokenize is not an SDK method (vLLM serves it at the root): routed by its "model" too.
    for name in ("chat", "embed"):
        resp = httpx.post(f"{sdk_deployment.url}/tokenize", json={"model": name, "prompt": "one two three"}, trust_env=False,
                          headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status_code == 200 and resp.json()["count"] == 3, resp.text
        assert sdk_deployment.backend_by_port(int(resp.headers["x-fake-vllm-port"])).served_name == name


def test_unknown_model_is_not_found_error(sdk_deployment):
    import openai

    with pytest.raises(openai.NotFoundError) as info:
        client(sdk_deployment).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    record("chat(model=unknown)", info.value)
    assert "chat, embed, slow" in str(info.value)


def test_wrong_or_missing_key_is_authentication_error(tmp_path, procs):
    """With api_key_file (the edge harness of tests/security renders and runs it under real nginx)."""
    import openai

    from tests.security.test_edge_live import KEYS, start_edge

    keys = tmp_path / "api-keys"
    keys.write_text(KEYS[0] + "\n")
    keys.chmod(0o600)
    edge = start_edge(tmp_path, procs, {"api_key_file": str(keys)})
    sdk = openai.OpenAI(base_url=f"{edge.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        sdk.models.list()
    record("models.list(wrong key)", info.value)
    assert info.value.status_code == 401
    ok = openai.OpenAI(base_url=f"{edge.url}/v1", api_key=KEYS[0], max_retries=0)
    assert {m.id for m in ok.models.list()} == {"org/alpha", "org/beta"}
    # The SDK refuses to send without a key; a raw client without the header gets the same 401.
    resp = httpx.post(f"{edge.url}/v1/completions", json={"model": "org/alpha", "prompt": "x"}, trust_env=False)
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"


def test_body_over_limit_is_413(sdk_deployment):
    import openai

    with pytest.raises(openai.APIStatusError) as info:
        client(sdk_deployment).completions.create(model="chat", prompt="x" * (64 * 1024))
    record("completions(body over max_body_size)", info.value)
    assert info.value.status_code == 413 and "64k" in str(info.value)


def attempts(d, since: int, path: str, done) -> list[tuple[float, int]]:
    """(time, status) of the requests nginx logged for `path` after access-log offset `since`.

    nginx writes the line after it sent the answer, so the client may have it first:
    wait (bounded) until done(statuses) holds; the caller asserts on what was found.
    """
    deadline = time.monotonic() + 5
    while True:
        out = []
        for line in d.nginx_access_log()[since:].splitlines():
            match = re.match(r"(\d+\.\d+) (\d+) \"POST " + re.escape(path), line)
            if match:
                out.append((float(match.group(1)), int(match.group(2))))
        if done([status for _, status in out]) or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def hold_slow_slot(d) -> threading.Thread:
    """Occupy the only slot of "slow" (max_batch_size 1, max_queue 0) for SLOW_LATENCY seconds."""
    started = threading.Event()

    def run() -> None:
        started.set()
        httpx.post(f"{d.url}/v1/completions", json={"model": "slow", "prompt": "hold"}, timeout=30, trust_env=False,
                   headers={"Authorization": f"Bearer {KEY}"}).raise_for_status()

    thread = threading.Thread(target=run)
    thread.start()
    started.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(s["in_flight"] for s in
                                                   (d.stats(b) for b in d.backends if b.served_name == "slow")):
        time.sleep(0.01)
    return thread


def test_overload_503_is_retried_after_retry_after_then_succeeds(sdk_deployment):
    d = sdk_deployment
    blocker = hold_slow_slot(d)
    since = len(d.nginx_access_log())
    done = client(d, retries=3).completions.create(model="slow", prompt="x", extra_headers={"x-test-key": "retried"})
    blocker.join()
    assert done.model == "slow"
    log = attempts(d, since, "/v1/completions", lambda seen: seen.count(200) == 2)
    statuses = [s for _, s in log]
    assert 503 in statuses and statuses.count(200) == 2, log  # ours (after retries) and the blocker's
    refused = [t for t, s in log if s == 503]
    retried = [t for t, s in log if s == 200 and t > refused[0]]
    # The SDK waited Retry-After (1 s) before each new attempt.
    gaps = [b - a for a, b in zip(refused, refused[1:] + retried[-1:])]
    assert all(g >= 0.9 for g in gaps), gaps


def test_persistent_overload_surfaces_as_internal_server_error(sdk_deployment):
    import openai

    d = sdk_deployment
    blocker = hold_slow_slot(d)
    since = len(d.nginx_access_log())
    with pytest.raises(openai.InternalServerError) as info:
        client(d, retries=1).completions.create(model="slow", prompt="x")
    blocker.join()
    record("completions(overload, max_queue 0, retries exhausted)", info.value)
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
    assert [s for _, s in attempts(d, since, "/v1/completions", lambda seen: len(seen) >= 3)].count(503) == 2  # first try + one retry


def test_outage_503_surfaces_as_internal_server_error(sdk_deployment):
    import openai

    d = sdk_deployment
    embed = [b for b in d.backends if b.served_name == "embed"]
    d.supervisorctl("stop", *(d.program(b) for b in embed))
    try:
        since = len(d.nginx_access_log())
        with pytest.raises(openai.InternalServerError) as info:
            client(d, retries=2).embeddings.create(model="embed", input="x")
        record("embeddings(every backend of the model down)", info.value)
        assert info.value.status_code == 503
        assert [s for _, s in attempts(d, since, "/v1/embeddings", lambda seen: len(seen) >= 3)] == [503, 503, 503]
    finally:
        d.supervisorctl("start", *(d.program(b) for b in embed))
        d.wait_healthy(embed)
