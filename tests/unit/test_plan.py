"""Placement, ports, memory shares and start order computed by vfgen.plan."""

from __future__ import annotations

import pytest

from vfgen.config import parse_deployment
from vfgen.errors import PlanError
from vfgen.plan import build_plan


def plan_of(**top):
    models = top.pop("models")
    return build_plan(parse_deployment({"models": models, **top}, source="test.yaml"))


def test_auto_share_is_budget_over_instances_rounded_down():
    plan = plan_of(models=[{"model": "m", "instances": 3}])
    assert [i.memory_share for i in plan.instances] == ["0.30"] * 3  # 0.92/3 = 0.3066 -> 0.30
    assert plan.gpus[0].total == "0.90"


def test_ports_are_consecutive_from_port_start_and_user_port_is_separate():
    plan = plan_of(port=8001, port_start=20000, models=[{"model": "a", "instances": 2}, {"model": "b", "instances": 2}])
    assert [i.port for i in plan.instances] == [20000, 20001, 20002, 20003]
    assert plan.dispatcher and plan.route_by_model


def test_single_instance_serves_the_user_port_without_nginx():
    plan = plan_of(listen="0.0.0.0", port=8123, models=[{"model": "m"}])
    (inst,) = plan.instances
    assert (inst.host, inst.port) == ("0.0.0.0", 8123)
    assert inst.url == "http://127.0.0.1:8123"
    assert not plan.dispatcher


def test_instances_spread_round_robin_over_gpus_and_start_in_parallel_across_gpus():
    plan = plan_of(models=[{"model": "m", "instances": 4, "gpus": [0, 1]}])
    assert [i.gpus for i in plan.instances] == [("0",), ("1",), ("0",), ("1",)]
    assert [i.start_order for i in plan.instances] == [1, 1, 2, 2]
    assert plan.instances[2].after == (plan.instances[0].name,)
    assert plan.instances[3].after == (plan.instances[1].name,)
    assert [i.memory_share for i in plan.instances] == ["0.46"] * 4


def test_start_is_serialised_per_gpu_across_models():
    plan = plan_of(models=[{"model": "a", "gpus": [0]}, {"model": "b", "instances": 2, "gpus": [0]}])
    a0, b0, b1 = plan.instances
    assert b0.after == (a0.name,) and b1.after == (b0.name,)
    assert [i.start_order for i in plan.instances] == [1, 2, 3]
    assert all(i.locks == ("/run/vfgen/locks/gpu-0.lock",) for i in plan.instances)
    # --start-timeout is one instance's own load; the lock wait covers the two others
    # (each holding the lock for its start plus the time a timed-out start takes to let go).
    assert {i.start_timeout for i in plan.instances} == {900}
    assert {i.lock_timeout for i in plan.instances} == {2 * (900 + 30)}
    assert {i.unit_start_timeout for i in plan.instances} == {2 * 930 + 900 + 60}


def test_start_timeout_is_not_multiplied_and_the_lock_wait_is_separate():
    plan = plan_of(models=[{"model": "m", "instances": 8, "gpus": [0]}], timeouts={"start": 600})
    assert {i.start_timeout for i in plan.instances} == {600}
    assert {i.lock_timeout for i in plan.instances} == {7 * 630}
    alone = plan_of(models=[{"model": "m", "instances": 2, "gpus": [0, 1]}], timeouts={"start": 600})
    assert [(i.lock_timeout, i.start_timeout, i.unit_start_timeout) for i in alone.instances] == [(0, 600, 660)] * 2
    given = plan_of(models=[{"model": "m", "instances": 2, "gpus": [0]}], timeouts={"start": 600, "lock": 100})
    assert [(i.lock_timeout, i.health_timeout, i.unit_start_timeout) for i in given.instances] == [(100, 700, 760)] * 2


def test_tensor_parallel_instance_takes_a_gpu_group_and_both_locks():
    plan = plan_of(models=[
        {"model": "big", "instances": 2, "tensor_parallel_size": 2, "gpus": [0, 1, 2, 3], "gpu_memory_utilization": 0.8},
        {"model": "emb", "instances": 1, "gpus": [1]},
    ])
    big0, big1, emb = plan.instances
    assert big0.gpus == ("0", "1") and big1.gpus == ("2", "3")
    assert big0.locks == ("/run/vfgen/locks/gpu-0.lock", "/run/vfgen/locks/gpu-1.lock")
    assert ("CUDA_VISIBLE_DEVICES", "0,1") in big0.env
    assert "--tensor-parallel-size" in big0.vllm_argv
    assert emb.after == (big0.name,) and emb.memory_share == "0.12"  # 0.92 - 0.80 left on GPU 1
    assert {g.gpu: g.total for g in plan.gpus} == {"0": "0.80", "1": "0.92", "2": "0.80", "3": "0.80"}


def test_explicit_shares_over_budget_show_the_per_gpu_table():
    with pytest.raises(PlanError) as err:
        plan_of(models=[{"model": "a", "name": "a", "gpu_memory_utilization": 0.5, "instances": 2}])
    assert "GPU 0: explicit gpu-memory-utilization shares add up to 1.00, over the budget 0.92" in str(err.value)
    assert "GPU 0: a/0=0.50, a/1=0.50" in str(err.value)


def test_memory_budget_is_configurable():
    plan = plan_of(memory_budget=0.5, models=[{"model": "m", "instances": 2}])
    assert [i.memory_share for i in plan.instances] == ["0.25", "0.25"]


def test_vllm_argv_carries_every_option_and_extra_args_last():
    plan = plan_of(vllm_bin="/opt/v/bin/vllm", models=[{
        "model": "org/m", "instances": 2, "served_model_name": "m", "aliases": ["m2"], "max_batch_size": 8,
        "dtype": "bfloat16", "enforce_eager": True, "io_processor_plugin": "p_io", "max_model_len": 4096,
        "extra_args": ["--trust-remote-code"],
    }])
    assert plan.instances[1].vllm_argv == (
        "/opt/v/bin/vllm", "serve", "org/m", "--host", "127.0.0.1", "--port", "9101", "--served-model-name", "m", "m2",
        "--max-num-seqs", "8", "--gpu-memory-utilization", "0.46", "--shutdown-timeout", "30", "--dtype", "bfloat16",
        "--enforce-eager", "--io-processor-plugin", "p_io", "--max-model-len", "4096", "--trust-remote-code",
    )


def test_pool_caps_equal_max_batch_size_and_remote_hosts_multiply_servers():
    plan = plan_of(host="0.0.0.0", upstream_hosts=["10.0.0.1", "10.0.0.2"], max_queue=3,
                   models=[{"model": "m", "instances": 2, "max_batch_size": 16}])
    (pool,) = plan.pools
    assert pool.cap == 16 and pool.overflow_cap == 3
    assert pool.servers == ("10.0.0.1:9100", "10.0.0.1:9101", "10.0.0.2:9100", "10.0.0.2:9101")


def test_per_instance_env_is_applied_in_order():
    plan = plan_of(models=[{"model": "m", "instances": 2, "env": {"A": "1"},
                            "instance_env": [{"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_OMP_THREADS_BIND": "1"}]}])
    assert plan.instances[1].env == (("CUDA_VISIBLE_DEVICES", "0"), ("A", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "1"))


MODERNBERT = str(__import__("pathlib").Path(__file__).parent.parent / "fixtures/models/modernbert-base")


def test_local_model_dir_is_checked_against_gpu_memory():
    plan = plan_of(gpu_memory="24GB", models=[{"model": MODERNBERT, "name": "mb", "instances": 4}])
    (fit,) = plan.memory
    assert fit.instances_that_fit == 6 and fit.recommended_share == 0.14


def test_auto_share_too_small_for_a_local_model_is_an_error_with_the_table():
    with pytest.raises(PlanError) as err:
        plan_of(gpu_memory="24GB", models=[{"model": MODERNBERT, "name": "mb", "instances": 8}])
    assert "mb: the auto share 0.11 cannot start it" in str(err.value)
    assert "Use at least 0.14" in str(err.value) and "GPU 0: mb/0=auto" in str(err.value)


def test_explicit_share_too_small_is_a_warning():
    plan = plan_of(gpu_memory="24GB", models=[{"model": MODERNBERT, "name": "mb", "gpu_memory_utilization": 0.05}])
    assert any("Use at least 0.14" in w for w in plan.warnings), plan.warnings


@pytest.mark.parametrize("key,secret", [
    ("HF_TOKEN", True), ("HUGGING_FACE_HUB_TOKEN", True), ("OPENAI_API_KEY", True), ("WANDB_KEY", True),
    ("DB_PASSWORD", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("HF_HUB_OFFLINE", False), ("VLLM_CPU_KVCACHE_SPACE", False), ("KEYBOARD", False), ("MONKEY_PATCH", False),
])
def test_secret_looking_env_names_warn_towards_env_file(key, secret):
    plan = plan_of(models=[{"model": "m", "instances": 2, "env": {key: "x"}}])
    warned = [w for w in plan.warnings if key in w and "env_file" in w]
    assert bool(warned) == secret, plan.warnings


def test_instance_env_secrets_warn_too_and_env_file_alone_does_not():
    plan = plan_of(models=[{"model": "m", "instances": 2, "instance_env": [{}, {"HF_TOKEN": "x"}]}])
    assert any("HF_TOKEN" in w for w in plan.warnings)
    plan = plan_of(models=[{"model": "m", "instances": 2, "env_file": "/etc/vfgen/secrets.env"}])
    assert not plan.warnings and {i.env_file for i in plan.instances} == {"/etc/vfgen/secrets.env"}


@pytest.mark.parametrize("listen,url", [
    ("127.0.0.1", "http://127.0.0.1:8000"),
    ("0.0.0.0", "http://127.0.0.1:8000"),
    ("::", "http://[::1]:8000"),
    ("::1", "http://[::1]:8000"),
    ("fd00::5", "http://[fd00::5]:8000"),
])
def test_health_check_reaches_the_dispatcher_where_the_plan_says(listen, url):
    # One connect-host rule for instances and the dispatcher: `vfgen health check` once probed [::].
    from vfgen.commands import health_targets, plan_json

    plan = plan_of(listen=listen, models=[{"model": "m", "instances": 2}])
    (dispatcher,) = [t for t in health_targets(plan) if t.kind == "dispatcher"]
    assert dispatcher.url == plan.dispatcher_url == url == plan_json(plan)["dispatcher"]["url"]


def test_routing_key_recipes_are_plan_data():
    from vfgen.plan import HashKey

    plan = plan_of(models=[
        {"model": "a", "name": "a", "instances": 2, "routing": "prefix", "prefix_bytes": 512},
        {"model": "b", "name": "b", "instances": 2, "routing": "session", "session_header": "X-Session-ID"},
        {"model": "c", "name": "c", "instances": 2, "routing": "session"},
        {"model": "d", "name": "d", "instances": 2, "enable_request_affinity": True},
        {"model": "e", "name": "e", "instances": 2},
    ])
    keys = {p.model: p.hash_key for p in plan.pools}
    assert keys["a"] == HashKey(routing="prefix", consistent=True, model="a", prefix_bytes=512)
    assert keys["b"] == HashKey(routing="session", consistent=True, model="b", prefix_bytes=256,
                                session_header="http_x_session_id", session_field="user")
    assert keys["c"].session_header is None and keys["c"].session_field == "user"
    # The old flag is routing: shape, with plain (not ring) hashing as before.
    assert keys["d"] == HashKey(routing="shape", consistent=False, model="d", prefix_bytes=256)
    assert keys["e"] is None
    assert {p.model: p.affinity_upstream for p in plan.pools} == {
        "a": "vllm-a-affinity", "b": "vllm-b-affinity", "c": "vllm-c-affinity", "d": "vllm-d-affinity", "e": None}


# --- routing by model (issue 16) -------------------------------------------------------


def test_max_model_len_comes_from_the_flag_or_the_local_config(tmp_path):
    plain, scaled = tmp_path / "plain", tmp_path / "scaled"
    for directory, extra in ((plain, {}), (scaled, {"rope_scaling": {"type": "yarn", "factor": 4.0}})):
        directory.mkdir()
        (directory / "config.json").write_text(__import__("json").dumps(
            {"max_position_embeddings": 4096, "n_positions": 2048, **extra}))
    plan = plan_of(models=[{"model": str(plain), "name": "p"}, {"model": str(scaled), "name": "s"},
                           {"model": "org/hub", "max_model_len": 777}, {"model": "org/other"}])
    lengths = {m.id: m.max_model_len for m in plan.served_models}
    # vLLM takes the smallest declared length; rope scaling stretches it by rules vfgen does not copy.
    assert lengths == {str(plain): 2048, str(scaled): None, "org/hub": 777, "org/other": None}


def test_chunked_framing_room_in_the_body_buffer():
    assert plan_of(max_body_size="64k", models=[{"model": "a"}, {"model": "b"}]).body_buffer_bytes == 6 * 65536 + 4096


def test_route_table_order_names_first_then_the_markers():
    plan = plan_of(default_model="b", models=[{"model": "org/a", "served_model_name": "a"}, {"model": "b"}])
    routes = plan.routing.routes
    assert [up for _, up in routes] == ["vllm-a", "vllm-b", "vllm-b", "vllm-ambiguous-model", "vllm-unreadable-body",
                                        "vllm-b", "vllm-unreadable-body"]
    assert routes[0][0] == "~^[A-Z]+:(?:a|\\\\u0061)$"
    assert [key for key, _ in plan.routing.body][0] == ""  # no body in memory: an exact key, before any regex
    assert plan_of(models=[{"model": "a"}]).routing is None  # one model: no body inspection


@pytest.mark.parametrize("models,clash", [
    ([{"model": "a", "name": "health", "instances": 2}], "the dispatcher's /health"),
    ([{"model": "a", "instances": 2}, {"model": "b", "name": "unknown-model", "instances": 2}], "an error answer"),
    ([{"model": "a", "name": "x", "instances": 2, "routing": "prefix"},
      {"model": "b", "name": "x-affinity", "instances": 2}], "model 'x'"),
])
def test_a_model_key_that_reuses_a_derived_upstream_name_is_refused(models, clash):
    with pytest.raises(PlanError, match=f"its nginx upstream .* is already the upstream of {clash}"):
        plan_of(name="d", models=models)
