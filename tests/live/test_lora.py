"""Promise (issue 19): LoRA adapters behind the dispatcher behave as they do on one vLLM instance.

Stand-in backends (vfgen-fake-vllm accepts vLLM's LoRA flags, lists adapters
with their parent and implements the runtime endpoints) under real nginx and
supervisord, rendered by the real CLI:

- two models, routed by the JSON "model": adapter names reach the base model's
  backends only (counted at the backends), /v1/models lists them with their
  parent, and the runtime load/unload endpoints are refused at the edge;
- one model with allow_runtime_lora_updating: `vfgen lora load` reaches every
  instance, reports an instance it could not change, and a second run repairs it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.harness.deploy import assert_json_error, stand_in_args
from tests.harness.load import run_load

pytestmark = pytest.mark.live

REQUESTS = 90


def make_adapter(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    for name in ("support", "fresh", "late"):
        make_adapter(root, name)
    return root


@pytest.fixture(scope="module")
def two_models(module_live_deploy, adapters):
    return module_live_deploy({"models": [
        {"model": "org/chat", "name": "chat", "served_model_name": "chat", "aliases": ["chat-latest"], "instances": 3,
         "max_batch_size": 8, "extra_args": stand_in_args(latency=0.01), "max_loras": 2,
         "lora_modules": [{"name": "support", "path": str(adapters / "support")},
                          {"name": "legal", "path": "org/legal-lora", "base_model_name": "chat-latest"}]},
        {"model": "org/embed", "name": "embed", "served_model_name": "embed", "instances": 1,
         "extra_args": stand_in_args(latency=0.01)},
    ]})


def test_adapter_names_reach_only_the_base_models_backends(two_models):
    d = two_models
    d.reset_stats()
    names = ["support", "legal", "chat", "embed"]
    jobs = [names[i % len(names)] for i in range(REQUESTS)]
    result = run_load(f"{d.url}/v1/completions", count=REQUESTS, concurrency=12,
                      body=lambda i: {"model": jobs[i], "prompt": f"p{i}", "max_tokens": 2}, deadline=60)
    assert not result.failed, [(r.status, r.body[:200]) for r in result.failed][:5]
    chat_ports = {b.port for b in d.backends if b.model == "chat"}
    (embed,) = [b for b in d.backends if b.model == "embed"]
    for reply in result.replies:
        name = jobs[reply.index]
        assert (reply.backend in chat_ports) == (name != "embed"), (name, reply.backend)
        # vLLM answers with the adapter's name; for a base name or alias, with the first served name.
        assert reply.json()["model"] == (name if name in ("support", "legal", "embed") else "chat")
    stats = d.all_stats()
    seen = {port: [a["model"] for a in s["arrivals"]] for port, s in stats.items()}
    for port in chat_ports:
        assert seen[port].count("support") > 0 and seen[port].count("legal") > 0, (port, seen[port])
    assert sum(seen[p].count("support") for p in chat_ports) == jobs.count("support")
    assert sum(seen[p].count("legal") for p in chat_ports) == jobs.count("legal")
    assert set(seen[embed.port]) == {"embed"}
    assert sum(s["misrouted"] for s in stats.values()) == 0


def test_models_list_adapters_with_their_parent_like_an_instance(two_models, adapters):
    d = two_models
    through_nginx = d.http.get(f"{d.url}/v1/models")
    assert through_nginx.status_code == 200
    listed = [(m["id"], m["object"], m["owned_by"], m["root"], m["parent"]) for m in through_nginx.json()["data"]]
    assert ("support", "model", "vllm", str(adapters / "support"), "chat") in listed
    assert ("legal", "model", "vllm", "org/legal-lora", "chat-latest") in listed
    for backend in d.backends:
        own = [(m["id"], m["object"], m["owned_by"], m["root"], m["parent"])
               for m in d.http.get(f"{backend.url}/v1/models").json()["data"]]
        # An instance lists its own model; nginx lists every model, each in the instance's order.
        assert [entry for entry in listed if entry in own] == own, (backend.program, own, listed)
        assert own, backend.program


def test_unknown_adapter_is_the_json_404(two_models):
    resp = two_models.http.post(f"{two_models.url}/v1/completions", json={"model": "supp0rt", "prompt": "x"})
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 404)
    assert "support" in error["message"] and "x-fake-vllm-port" not in resp.headers


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/adapters"), ("DELETE", "/adapters/support"), ("POST", "/v1/load%5Flora_adapter"),
])
def test_runtime_changes_are_refused_at_the_edge(two_models, adapters, method, path):
    d = two_models
    d.reset_stats()
    body = {"lora_name": "fresh", "lora_path": str(adapters / "fresh"), "model": "chat"}
    resp = d.http.request(method, f"{d.url}{path}", json=body)
    error = assert_json_error(resp.status_code, resp.headers, resp.content, 403)
    assert "one instance only" in error["message"] and "x-fake-vllm-port" not in resp.headers
    assert not any(s["lora_calls"] or s["requests"] for s in d.all_stats().values())
    # Nor do the instances themselves have the endpoints: runtime updating is off by default.
    assert d.http.post(f"{d.backends[0].url}/v1/load_lora_adapter", json=body).status_code == 404


# --- runtime loading with the operator option ------------------------------------------


@pytest.fixture
def runtime(live_deploy, adapters):
    return live_deploy({"allow_runtime_lora_updating": True, "models": [
        {"model": "org/chat", "name": "chat", "served_model_name": "chat", "instances": 3, "max_batch_size": 8,
         "extra_args": stand_in_args(latency=0.01),
         "lora_modules": [{"name": "support", "path": str(adapters / "support")}]},
    ]})


def vfgen_lora(d, *args: str) -> subprocess.CompletedProcess:
    return d.vfgen("lora", *args, "--timeout", "10")


def adapters_of(d) -> dict[str, dict[str, str]]:
    return {b.program: d.stats(b)["adapters"] for b in d.backends}


def test_vfgen_lora_load_reaches_every_instance_and_unload_removes_it(runtime, adapters):
    d = runtime
    fresh = str(adapters / "fresh")
    done = vfgen_lora(d, "load", "fresh", fresh)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(": loaded") == 3, done.stdout
    assert all(a == {"support": str(adapters / "support"), "fresh": fresh} for a in adapters_of(d).values())
    d.reset_stats()
    result = run_load(f"{d.url}/v1/completions", count=30, concurrency=6,
                      body=lambda i: {"model": "fresh", "prompt": f"p{i}"}, deadline=30)
    assert not result.failed and {r.json()["model"] for r in result.replies} == {"fresh"}
    assert all(s["requests"] > 0 for s in d.all_stats().values())  # every instance serves it
    # Through nginx it stays refused, with the way to do it instead.
    edge = d.http.post(f"{d.url}/v1/unload_lora_adapter", json={"lora_name": "fresh"})
    assert "vfgen lora load" in assert_json_error(edge.status_code, edge.headers, edge.content, 403)["message"]

    again = vfgen_lora(d, "load", "fresh", fresh)  # idempotent: nothing to do
    assert again.returncode == 0 and again.stdout.count("already loaded from this path") == 3, again.stdout
    gone = vfgen_lora(d, "unload", "fresh")
    assert gone.returncode == 0 and gone.stdout.count(": unloaded") == 3, gone.stdout
    assert all(set(a) == {"support"} for a in adapters_of(d).values())
    after = d.http.post(f"{d.url}/v1/completions", json={"model": "fresh", "prompt": "x"})
    assert_json_error(after.status_code, after.headers, after.content, 404)  # each instance's own 404


def test_vfgen_lora_load_names_the_instance_it_could_not_change_and_a_rerun_repairs_it(runtime, adapters):
    d = runtime
    down = d.backends[1]
    d.supervisorctl("stop", d.program(down))
    late = str(adapters / "late")
    partial = vfgen_lora(d, "load", "late", late)
    assert partial.returncode == 1, partial.stdout + partial.stderr
    assert partial.stderr.startswith("Error: ") and down.program in partial.stderr.splitlines()[0]
    assert "failed on 1 of 3 instance(s)" in partial.stderr
    assert f"{down.program}  {down.url}  FAILED" in partial.stdout and partial.stdout.count(": loaded") == 2
    d.supervisorctl("start", d.program(down))
    d.wait_healthy([down])
    # A restarted instance has the declared adapters only: runtime loads do not survive a restart.
    assert d.stats(down)["adapters"] == {"support": str(adapters / "support")}
    repaired = vfgen_lora(d, "load", "late", late)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert repaired.stdout.count("already loaded from this path") == 2 and repaired.stdout.count(": loaded") == 1
    assert all("late" in a for a in adapters_of(d).values())


def test_vfgen_lora_refuses_a_path_the_instances_cannot_load(runtime, tmp_path):
    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    result = vfgen_lora(runtime, "load", "broken", str(bad))
    assert result.returncode == 1 and "holds no adapter_config.json" in result.stderr
    assert not any(s["lora_calls"] for s in runtime.all_stats().values())


# --- prefix routing with adapters ---------------------------------------------------------


@pytest.fixture(params=["one-model", "two-models"])
def prefix_lora(request, live_deploy):
    """With one model nginx reads "model" for the key alone; with two it reuses the routing map's value."""
    models = [{"model": "org/chat", "served_model_name": "chat", "instances": 3, "gpus": [0, 1, 2], "max_batch_size": 8,
               "routing": "prefix", "extra_args": stand_in_args(latency=0.01),
               "lora_modules": ["support=org/support-lora", "legal=org/legal-lora"]}]
    if request.param == "two-models":
        models.append({"model": "org/embed", "served_model_name": "embed", "extra_args": stand_in_args(latency=0.01)})
    return live_deploy({"models": models})


def test_prefix_routing_keys_on_the_adapter_name_too(prefix_lora):
    """vLLM's prefix cache is per adapter: one conversation under two adapters is two keys."""
    d = prefix_lora
    conversations = 24
    jobs = [(conv, model) for conv in range(conversations) for model in ("support", "legal", "chat") for _ in range(2)]

    def body(i: int) -> dict:
        conv, model = jobs[i]
        return {"model": model, "max_tokens": 2, "messages": [
            {"role": "system", "content": f"You are the assistant of tenant {conv}. " + "Be brief and exact. " * 20},
            {"role": "user", "content": f"Question {conv}: what changed in release {conv * 7}?"}]}

    result = run_load(f"{d.url}/v1/chat/completions", count=len(jobs), concurrency=4, body=body, deadline=60)
    assert not result.failed, result.summary()
    homes: dict[tuple[int, str], set[int]] = {}
    for reply in result.replies:
        assert reply.json()["model"] == jobs[reply.index][1]
        homes.setdefault(jobs[reply.index], set()).add(reply.backend)
    assert all(len(ports) == 1 for ports in homes.values()), homes  # each (conversation, adapter) sticks
    differ = [c for c in range(conversations) if homes[(c, "support")] != homes[(c, "legal")]]
    print(f"\n{len(differ)} of {conversations} conversations sit on another backend under the other adapter")
    # With the adapter name left out of the key, every conversation would share one backend across adapters.
    assert differ, homes
