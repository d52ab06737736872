"""LoRA adapters in config, plan and the rendered files (issue 19).

The live and real-vLLM tiers prove the behaviour (tests/live/test_lora.py,
tests/vllm/test_dispatcher_e2e.py); these pin the data the plan hands the
templates: the flags on every instance, the names routed to each pool, the
/v1/models entries nginx answers, the memory estimate.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.procs import free_port_range
from vfgen import memory
from vfgen.commands import plan_json, plan_table
from vfgen.config import ConfigError, parse_deployment
from vfgen.plan import build_plan
from vfgen.quoting import json_string_pcre
from vfgen.render import render_nginx

FIXTURES = Path(__file__).parent.parent / "fixtures"
QWEN = FIXTURES / "models" / "qwen2.5-0.5b"


def adapter_dir(root: Path, name: str = "support", rank: int = 8, targets=("q_proj", "v_proj"), weights: int = 4096) -> Path:
    path = root / name
    path.mkdir(exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}))
    (path / "adapter_model.safetensors").write_bytes(b"\0" * weights)
    return path


def two_models(tmp_path: Path, **chat) -> dict:
    return {"models": [
        {"model": "org/chat", "name": "chat", "served_model_name": "chat", "aliases": ["chat-latest"], "instances": 2,
         "lora_modules": [{"name": "support", "path": str(adapter_dir(tmp_path))},
                          {"name": "legal", "path": "org/legal-lora", "base_model_name": "chat-latest"}],
         **chat},
        {"model": "org/embed", "name": "embed", "served_model_name": "embed"},
    ]}


def test_every_instance_of_the_model_gets_the_same_lora_flags(tmp_path):
    plan = build_plan(parse_deployment(two_models(tmp_path, max_lora_rank=8, max_loras=2, max_cpu_loras=4), source="t.yaml"))
    chat = [i.vllm_argv for i in plan.instances_of("chat")]
    assert len(chat) == 2 and chat[0][chat[0].index("--enable-lora"):] == chat[1][chat[1].index("--enable-lora"):]
    tail = chat[0][chat[0].index("--enable-lora"):]
    assert tail == (
        "--enable-lora", "--lora-modules", f"support={tmp_path / 'support'}",
        json.dumps({"name": "legal", "path": "org/legal-lora", "base_model_name": "chat-latest"}),
        "--max-lora-rank", "8", "--max-loras", "2", "--max-cpu-loras", "4",
    )
    assert not any("lora" in a for a in plan.instances_of("embed")[0].vllm_argv)


def test_adapter_names_route_to_the_base_pool_and_are_listed_like_vllm(tmp_path):
    plan = build_plan(parse_deployment(two_models(tmp_path), source="t.yaml"))
    chat = plan.pools[0]
    assert chat.route_names == ("chat", "chat-latest", "support", "legal")
    conf = render_nginx(plan)
    routes = dict(plan.routing.routes)
    for name in ("support", "legal"):
        assert routes[f"~^[A-Z]+:{json_string_pcre(name)}$"] == "vllm-chat"
    models_line = next(line for line in conf.splitlines() if line.strip().startswith('return 200 "{\\"object\\":\\"list\\"'))
    # `created` is the request time, an nginx variable in the rendered JSON.
    listed = json.loads(re.sub(r"\$\{\w+\}", "0", json.loads(models_line.strip()[len("return 200 "):-1])))
    assert [(m["id"], m["parent"], m["root"]) for m in listed["data"]] == [
        ("chat", None, "org/chat"), ("chat-latest", None, "org/chat"),
        ("support", "chat", str(tmp_path / "support")), ("legal", "chat-latest", "org/legal-lora"),
        ("embed", None, "org/embed"),
    ]
    assert {k for m in listed["data"] for k in m} >= {"id", "object", "owned_by", "root", "parent"}
    assert plan_json(plan)["pools"][0]["adapters"][0] == {"name": "support", "root": str(tmp_path / "support"), "parent": "chat"}
    assert "support  parent=chat" in plan_table(plan)


def test_runtime_endpoints_are_refused_at_the_edge_only_when_lora_is_on(tmp_path):
    with_lora = render_nginx(build_plan(parse_deployment(two_models(tmp_path), source="t.yaml")))
    for location in ("= /v1/load_lora_adapter", "= /v1/unload_lora_adapter", "= /adapters", "^~ /adapters/"):
        assert f"location {location} {{\n        return 403 " in with_lora, location
    without = render_nginx(build_plan(parse_deployment({"models": [{"model": "org/m", "instances": 2}]}, source="t.yaml")))
    assert "lora" not in without


def test_runtime_updating_sets_vllms_variable_on_lora_models_only(tmp_path):
    spec = {**two_models(tmp_path), "allow_runtime_lora_updating": True}
    plan = build_plan(parse_deployment(spec, source="t.yaml"))
    assert all(("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True") in i.env for i in plan.instances_of("chat"))
    assert not any(k == "VLLM_ALLOW_RUNTIME_LORA_UPDATING" for k, _ in plan.instances_of("embed")[0].env)
    assert "vfgen lora load" in render_nginx(plan)
    off = build_plan(parse_deployment(two_models(tmp_path), source="t.yaml"))
    assert not any(k == "VLLM_ALLOW_RUNTIME_LORA_UPDATING" for i in off.instances for k, _ in i.env)


def test_single_model_adapter_reaches_the_only_pool_without_body_routing(tmp_path):
    plan = build_plan(parse_deployment(
        {"models": [{"model": "org/m", "instances": 2, "lora_modules": [f"support={adapter_dir(tmp_path)}"]}]}, source=None))
    assert not plan.route_by_model and plan.pools[0].route_names == ("org/m", "support")


def test_names_with_comma_or_equals_use_vllms_json_form(tmp_path):
    plan = build_plan(parse_deployment({"models": [{"model": "org/m", "instances": 2, "lora_modules": [
        {"name": "a=b", "path": "org/x"}, {"name": "c,d", "path": "org/y"}]}]}, source="t.yaml"))
    argv = plan.instances[0].vllm_argv
    assert json.loads(argv[argv.index("--lora-modules") + 1]) == {"name": "a=b", "path": "org/x"}
    assert json.loads(argv[argv.index("--lora-modules") + 2]) == {"name": "c,d", "path": "org/y"}


def test_adapter_within_rank_and_targets_of_a_local_llama_is_accepted(tmp_path):
    spec = {"models": [{"model": str(FIXTURES / "models" / "meta-llama-3-8b"), "instances": 2, "max_lora_rank": 32,
                        "lora_modules": [{"name": "a", "path": str(adapter_dir(tmp_path, rank=32, targets=(
                            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))}]}]}
    (module,) = parse_deployment(spec, source="t.yaml").models[0].lora_modules
    assert (module.rank, module.weight_bytes) == (32, 4096)


def test_unknown_model_type_skips_the_target_check(tmp_path):
    spec = {"models": [{"model": str(FIXTURES / "models" / "falcon-7b-instruct"),
                        "lora_modules": [{"name": "a", "path": str(adapter_dir(tmp_path, targets=("query_key_value",)))}]}]}
    assert parse_deployment(spec, source="t.yaml").models[0].lora_modules[0].target_modules == ("query_key_value",)


def test_lora_memory_counts_every_slot_vllm_preallocates():
    config = json.loads((QWEN / "config.json").read_text())
    extra, (note,) = memory.lora_bytes(config=config, max_lora_rank=8, max_loras=2, adapter_bytes=(3 * memory.MIB,))
    h, layers, vocab, ffn = 896, 24, 151936, 4864
    q, kv = 14 * 64, 2 * 64
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + ffn) + (ffn + h)
    slots = 2 * 8 * (per_layer * layers + vocab + h) * 2  # bfloat16 checkpoint: 2 bytes
    assert extra == slots + memory.PROFILE_BATCHED_TOKENS * 8 * 4 * 3
    assert "2 adapter slot(s) (max_loras) of rank 8" in note and "3.0 MiB" in note


def test_plan_adds_lora_memory_and_says_how(tmp_path):
    base = {"model": str(QWEN), "instances": 2}
    without = build_plan(parse_deployment({"models": [base]}, source="t.yaml"), gpu_bytes=24 * 10**9).memory[0]
    spec = {"models": [{**base, "max_loras": 4, "lora_modules": [f"a={adapter_dir(tmp_path)}"]}]}
    with_lora = build_plan(parse_deployment(spec, source="t.yaml"), gpu_bytes=24 * 10**9).memory[0]
    config = json.loads((QWEN / "config.json").read_text())
    extra, _ = memory.lora_bytes(config=config, max_lora_rank=16, max_loras=4)
    assert with_lora.need_bytes - without.need_bytes == extra
    assert with_lora.min_bytes - without.min_bytes == extra
    assert any(n.startswith("LoRA: ") and "4 adapter slot(s)" in n for n in with_lora.notes)


def test_cli_lora_options_build_the_same_model_as_the_file(tmp_path):
    from vfgen.cli import load_deployment
    from vfgen.options import unset

    opts = unset()
    path = adapter_dir(tmp_path)
    opts.update(model="org/m", instances=2, lora_module=[f"support={path}"], max_lora_rank=8, max_loras=2,
                enable_lora=False, enable_request_affinity=False, enforce_eager=False, allow_runtime_lora_updating=True)
    cli = load_deployment(opts)
    file = parse_deployment({"allow_runtime_lora_updating": True, "models": [
        {"model": "org/m", "instances": 2, "max_lora_rank": 8, "max_loras": 2,
         "lora_modules": [{"name": "support", "path": str(path)}]}]}, source="t.yaml")
    assert cli.models == file.models and cli.allow_runtime_lora_updating


def test_enable_lora_alone_allows_runtime_adapters_without_static_ones():
    plan = build_plan(parse_deployment({"models": [{"model": "org/m", "instances": 2, "enable_lora": True}]}, source="t.yaml"))
    assert plan.instances[0].vllm_argv[-1] == "--enable-lora" and plan.pools[0].adapters == ()


@pytest.mark.parametrize("name", ["support", "chat-v2"])
def test_runtime_adapter_names_are_checked_like_declared_ones(tmp_path, name):
    from vfgen.config import runtime_adapter

    d = parse_deployment(two_models(tmp_path), source="t.yaml")
    assert runtime_adapter(d, d.models[0], "fresh", "org/fresh").path == "org/fresh"
    if name == "support":
        with pytest.raises(ConfigError, match="declared in lora_modules"):
            runtime_adapter(d, d.models[0], name, "org/x")
    else:
        big = adapter_dir(tmp_path, name="big", rank=64)
        with pytest.raises(ConfigError, match="r=64 is above max_lora_rank=16"):
            runtime_adapter(d, d.models[0], name, str(big))


@pytest.mark.parametrize("action", ["load", "unload"])
def test_lora_commands_on_a_gpu_host_need_no_api_key_file(tmp_path, action):
    # The deployment names a key file that exists only on the load balancer; `lora load`
    # calls the instances themselves, so it must get as far as them (refused: none runs).
    deployment = {"api_key_file": str(tmp_path / "on-the-load-balancer-only.keys"), "allow_runtime_lora_updating": True,
                  "port_start": free_port_range(2), "models": [{"model": "org/chat", "name": "chat", "instances": 2, "enable_lora": True}]}
    path = tmp_path / "deploy.yaml"
    path.write_text(json.dumps(deployment))
    vfgen = str(Path(sys.executable).with_name("vfgen"))
    words = ("load", "support", str(adapter_dir(tmp_path))) if action == "load" else ("unload", "support")
    result = subprocess.run([vfgen, "lora", *words, "-f", str(path), "--timeout", "2"], capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "api_key_file" not in output and "api-key-file" not in output, output
    assert output.count("refused") >= 2, output  # both instances were tried
