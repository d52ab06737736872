"""The pure planner of `vfgen apply`: order of actions, per-GPU share simulation, the unsafe case."""

from __future__ import annotations

import dataclasses

import pytest

from vfgen.apply import ApplyError, Inst, format_plan, instances_of, plan_apply
from vfgen.config import parse_deployment
from vfgen.plan import build_plan
from vfgen.render import render_all

BUDGET = 0.92


def inst(name: str, share: float, *, gpus=("0",), port: int | None = None, order: int = 1, fp: str = "a",
         model: str = "m") -> Inst:
    index = int(name.rsplit("-", 1)[1])
    port = port if port is not None else 9100 + index
    return Inst(name, model, tuple(gpus), share, port, f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", model, order,
                fp, ("vllm", "serve", "--gpu-memory-utilization", f"{share:.2f}"))


def fleet(n: int, share: float, fp: str = "a") -> list[Inst]:
    return [inst(f"vllm-m-{k}", share, order=k + 1, fp=fp) for k in range(n)]


def steps(plan) -> list[tuple[str, str]]:
    return [(a.kind, a.target) for a in plan.actions if a.kind in ("drain", "stop", "restart", "start")]


def simulate(plan, old: list[Inst], new: list[Inst], skip: int = 0) -> float:
    """Replay the actions on the running set; the highest per-GPU sum after any instance action
    (the moment inside a restart, old stopped and new not started, is lower than both ends).
    The first `skip` instance actions are left out (before a too-full GPU got under its budget)."""
    running = {i.name: i for i in old}
    by_new = {i.name: i for i in new}
    peak, seen = 0.0, 0
    for a in plan.actions:
        if a.kind == "stop":
            running.pop(a.target)
        elif a.kind in ("restart", "start"):
            running.pop(a.target, None)
            running[a.target] = by_new[a.target]
        if a.kind in ("drain", "stop", "restart", "start"):
            seen += 1
            if seen > skip:
                gpus = {g for i in running.values() for g in i.gpus}
                peak = max([peak, *(sum(i.share for i in running.values() if g in i.gpus) for g in gpus)])
    return peak


def test_scale_down_4_to_2_stops_removed_first_then_restarts_one_at_a_time():
    old, new = fleet(4, 0.23), fleet(2, 0.46, fp="b")
    plan = plan_apply(old, new, BUDGET)
    assert steps(plan) == [
        ("drain", "vllm-m-3"), ("stop", "vllm-m-3"), ("drain", "vllm-m-2"), ("stop", "vllm-m-2"),
        ("drain", "vllm-m-0"), ("restart", "vllm-m-0"), ("drain", "vllm-m-1"), ("restart", "vllm-m-1"),
    ]
    assert plan.removed == ("vllm-m-3", "vllm-m-2") and plan.changed == ("vllm-m-0", "vllm-m-1")
    assert simulate(plan, old, new) <= BUDGET + 1e-9
    assert dict(plan.peak) == {"0": pytest.approx(0.92)}
    assert not plan.notes
    restart = next(a for a in plan.actions if a.kind == "restart")
    assert "share 0.23 -> 0.46" in restart.reason and "--gpu-memory-utilization 0.23 -> 0.46" in restart.reason


def test_scale_up_2_to_4_restarts_at_the_smaller_share_before_starting_new_ones():
    old, new = fleet(2, 0.46), fleet(4, 0.23, fp="b")
    plan = plan_apply(old, new, BUDGET)
    assert [s for s in steps(plan) if s[0] != "drain"] == [
        ("restart", "vllm-m-0"), ("restart", "vllm-m-1"), ("start", "vllm-m-2"), ("start", "vllm-m-3")]
    assert simulate(plan, old, new) <= BUDGET + 1e-9
    totals = [dict(a.gpu_totals)["0"] for a in plan.actions if a.kind in ("restart", "start")]
    assert totals == pytest.approx([0.69, 0.46, 0.69, 0.92])


def test_starting_new_instances_before_shrinking_would_overcommit():
    # The naive order (start the new ones first) is what the planner must avoid.
    old, new = fleet(2, 0.46), fleet(4, 0.23, fp="b")
    naive = 0.46 * 2 + 0.23
    assert naive > BUDGET
    assert simulate(plan_apply(old, new, BUDGET), old, new) <= BUDGET + 1e-9


def test_unchanged_instances_are_not_touched_and_an_empty_change_is_empty():
    old = fleet(3, 0.30)
    plan = plan_apply(old, list(old), BUDGET)
    assert plan.empty and plan.unchanged == ("vllm-m-0", "vllm-m-1", "vllm-m-2")
    new = [*old[:2], inst("vllm-m-2", 0.30, order=3, fp="b")]
    assert steps(plan_apply(old, new, BUDGET)) == [("drain", "vllm-m-2"), ("restart", "vllm-m-2")]


def test_the_planner_picks_the_restart_that_fits_first():
    # 0.60 next to 0.46 does not fit; shrinking instance 1 first makes room.
    old = [inst("vllm-m-0", 0.46, fp="a"), inst("vllm-m-1", 0.46, order=2)]
    new = [inst("vllm-m-0", 0.60, fp="b"), inst("vllm-m-1", 0.30, order=2, fp="b")]
    plan = plan_apply(old, new, BUDGET)
    assert [s for s in steps(plan) if s[0] == "restart"] == [("restart", "vllm-m-1"), ("restart", "vllm-m-0")]
    assert simulate(plan, old, new) <= BUDGET + 1e-9
    assert not plan.notes


def test_a_lower_budget_has_no_safe_in_place_order_which_is_said_with_its_cost():
    # The budget drops from 0.92 to 0.80: 0.40 next to the other's old 0.46 is 0.86, so neither
    # restart fits in place. The planner stops the other too, says so and what it costs.
    old = fleet(2, 0.46)
    new = fleet(2, 0.40, fp="b")
    plan = plan_apply(old, new, 0.80, start_timeout=120)
    assert steps(plan) == [("drain", "vllm-m-1"), ("stop", "vllm-m-1"), ("drain", "vllm-m-0"),
                           ("restart", "vllm-m-0"), ("start", "vllm-m-1")]
    after_first_stop = simulate(plan, old, new, skip=1)
    assert after_first_stop <= 0.80 + 1e-9, "from the first stop on, every moment is within the new budget"
    assert any("already exceed the budget 0.80: GPU 0 0.92" in n for n in plan.notes), plan.notes
    note = next(n for n in plan.notes if "no safe in-place order" in n)
    assert "2 instance(s) (vllm-m-0, vllm-m-1)" in note and "down together" in note and "at most 120s each" in note, note


def test_new_shares_over_the_budget_cannot_be_planned():
    with pytest.raises(ApplyError, match="does not fit"):
        plan_apply(fleet(3, 0.20), fleet(3, 0.30, fp="b"), 0.55)


def test_growing_shares_with_room_restart_in_place():
    # Shares grow but the slack covers one restart at a time: no instance needs to wait down.
    old, new = fleet(2, 0.30), fleet(2, 0.46, fp="b")
    plan = plan_apply(old, new, BUDGET)
    assert [s for s in steps(plan) if s[0] != "drain"] == [("restart", "vllm-m-0"), ("restart", "vllm-m-1")]
    assert not plan.notes and simulate(plan, old, new) <= BUDGET + 1e-9


def test_ports_move_only_after_their_holder_stopped():
    # Model a removed; b's instances take a's ports; c takes b's old ports.
    a = [inst("vllm-a-0", 0.2, port=9100, model="a"), inst("vllm-a-1", 0.2, port=9101, gpus=("1",), model="a")]
    b_old = [inst("vllm-b-0", 0.2, port=9102, model="b"), inst("vllm-b-1", 0.2, port=9103, gpus=("1",), model="b")]
    b_new = [inst("vllm-b-0", 0.2, port=9100, model="b", fp="b"), inst("vllm-b-1", 0.2, port=9101, gpus=("1",), model="b", fp="b")]
    c = [inst("vllm-c-0", 0.2, port=9102, model="c"), inst("vllm-c-1", 0.2, port=9103, gpus=("1",), model="c")]
    plan = plan_apply([*a, *b_old], [*b_new, *c], BUDGET)
    order = [s for s in steps(plan) if s[0] != "drain"]
    assert order == [("stop", "vllm-a-0"), ("stop", "vllm-a-1"), ("restart", "vllm-b-0"), ("restart", "vllm-b-1"),
                     ("start", "vllm-c-0"), ("start", "vllm-c-1")]
    assert "port 9102 -> 9100" in next(a.reason for a in plan.actions if a.kind == "restart")


def test_a_port_cycle_falls_back_to_a_stop():
    # 0 and 1 swap ports: neither can start while the other holds its port.
    old = [inst("vllm-m-0", 0.2, port=9100), inst("vllm-m-1", 0.2, port=9101, order=2)]
    new = [inst("vllm-m-0", 0.2, port=9101, fp="b"), inst("vllm-m-1", 0.2, port=9100, order=2, fp="b")]
    plan = plan_apply(old, new, BUDGET)
    assert [s for s in steps(plan) if s[0] != "drain"] == [("stop", "vllm-m-1"), ("restart", "vllm-m-0"), ("start", "vllm-m-1")]
    assert plan.notes


def test_one_instance_models_say_they_go_down():
    plan = plan_apply([inst("vllm-m-0", 0.9)], [inst("vllm-m-0", 0.9, fp="b")], BUDGET)
    assert any("serves nothing while vllm-m-0 restarts" in n for n in plan.notes)
    plan = plan_apply([inst("vllm-m-0", 0.9)], [inst("vllm-m-0", 0.9, fp="b")], BUDGET, dispatcher=False)
    assert not any(a.kind == "drain" for a in plan.actions)
    assert any("no dispatcher" in n for n in plan.notes)


def test_file_and_reload_actions_frame_the_instance_steps():
    old, new = fleet(2, 0.46), fleet(4, 0.23, fp="b")
    plan = plan_apply(old, new, BUDGET, backend="supervisord", conf="etc/supervisor/conf.d/vllm.conf",
                      final_files=["etc/prometheus/file_sd/vllm.json"], stale=["etc/old.conf"])
    kinds = [(a.kind, a.target) for a in plan.actions]
    assert kinds[:3] == [("check", "nginx"), ("write", "etc/supervisor/conf.d/vllm.conf"), ("reload", "supervisord")]
    assert kinds[-3:] == [("write", "etc/prometheus/file_sd/vllm.json"), ("remove", "etc/old.conf"), ("reload", "nginx")]
    plan = plan_apply(old, new, BUDGET, backend="systemd")
    assert ("reload", "systemd") in [(a.kind, a.target) for a in plan.actions]


def _start_only(i: Inst, lock: int, run_fp: str = "run") -> Inst:
    return dataclasses.replace(i, fingerprint=f"{i.fingerprint}-lock{lock}", run_fingerprint=run_fp,
                               start_settings=(("lock timeout", lock), ("start timeout", 30), ("TimeoutStartSec", lock + 90)))


def test_only_start_time_settings_changed_updates_without_a_restart_next_to_a_real_change_that_restarts():
    old = [_start_only(inst("vllm-m-0", 0.2), 90), _start_only(inst("vllm-m-1", 0.2, order=2), 90)]
    # Instance 0: only its lock timeout grew (another model joined its GPU). Instance 1: its share changed too.
    new = [_start_only(inst("vllm-m-0", 0.2), 270),
           _start_only(inst("vllm-m-1", 0.3, order=2, fp="b"), 270, run_fp="run-b")]
    plan = plan_apply(old, new, BUDGET)
    assert plan.updated == ("vllm-m-0",) and plan.changed == ("vllm-m-1",) and not plan.unchanged
    assert steps(plan) == [("drain", "vllm-m-1"), ("restart", "vllm-m-1")]
    update = next(a for a in plan.actions if a.kind == "update")
    assert update.target == "vllm-m-0"
    assert update.reason.startswith("only start-time settings changed (lock timeout 90 -> 270 s, TimeoutStartSec 180 -> 360 s)")
    assert "no restart" in update.reason and "next start" in update.reason
    assert ("reload", "systemd") in [(a.kind, a.target) for a in plan.actions]
    assert "summary: 0 removed, 1 changed, 1 updated, 0 new, 0 unchanged" in format_plan(plan)


def test_a_start_time_update_under_supervisord_rereads_and_says_the_old_settings_stay_in_memory():
    old = [_start_only(inst("vllm-m-0", 0.2), 90)]
    plan = plan_apply(old, [_start_only(inst("vllm-m-0", 0.2), 270)], BUDGET, backend="supervisord",
                      conf="etc/supervisor/conf.d/vllm.conf", dispatcher=False)
    assert [(a.kind, a.target) for a in plan.actions] == [
        ("write", "etc/supervisor/conf.d/vllm.conf"), ("reload", "supervisord"), ("update", "vllm-m-0")]
    reason = plan.actions[-1].reason
    assert "keeps the old start settings until the program's next `update`" in reason
    assert "a manual `supervisorctl update` would restart it" in reason
    assert not plan.notes  # nothing goes down, not even a one-instance model


def test_a_manifest_without_the_running_fingerprint_restarts_as_before():
    record = _start_only(inst("vllm-m-0", 0.2), 90).record()
    del record["run_fingerprint"], record["start_settings"]
    old = Inst.from_record(record)
    assert old.running_fingerprint == old.fingerprint
    plan = plan_apply([old], [_start_only(inst("vllm-m-0", 0.2), 270)], BUDGET)
    assert plan.changed == ("vllm-m-0",) and not plan.updated
    assert Inst.from_record(_start_only(inst("vllm-m-0", 0.2), 90).record()) == _start_only(inst("vllm-m-0", 0.2), 90)


@pytest.mark.parametrize("backend", ["systemd", "supervisord"])
def test_a_model_added_to_a_shared_gpu_changes_only_the_other_models_start_time_settings(backend):
    def fleet_of(*keys: str, share: float = 0.2, **timeouts: int) -> list[Inst]:
        raw = {"name": "mm", "backend": backend, "timeouts": {"start": 30, **timeouts},
               "models": [{"model": f"org/{k}", "served_model_name": k, "instances": 2, "gpus": [1],
                           "gpu_memory_utilization": share} for k in keys]}
        plan = build_plan(parse_deployment(raw))
        return instances_of(plan, render_all(plan))

    only_a, both = fleet_of("a"), fleet_of("a", "b")
    assert [i.fingerprint for i in only_a] != [i.fingerprint for i in both[:2]]  # a's files do change
    plan = plan_apply(only_a, both, BUDGET, backend=backend)
    assert plan.updated == ("mm-a-0", "mm-a-1") and not plan.changed and plan.added == ("mm-b-0", "mm-b-1")
    assert "(lock timeout 60 -> 180 s, TimeoutStartSec 150 -> 270 s)" in next(a.reason for a in plan.actions if a.kind == "update")
    back = plan_apply(both, only_a, BUDGET, backend=backend)
    assert back.updated == ("mm-a-0", "mm-a-1") and not back.changed and back.removed == ("mm-b-1", "mm-b-0")
    # An explicit lock or start timeout is a start-time setting too ...
    assert plan_apply(only_a, fleet_of("a", lock=5), BUDGET, backend=backend).updated == ("mm-a-0", "mm-a-1")
    assert plan_apply(only_a, fleet_of("a", start=60), BUDGET, backend=backend).updated == ("mm-a-0", "mm-a-1")
    # ... but a change a running instance depends on still restarts it, even together with one.
    real = plan_apply(only_a, fleet_of("a", share=0.3, lock=5), BUDGET, backend=backend)
    assert real.changed == ("mm-a-0", "mm-a-1") and not real.updated
    assert plan_apply(only_a, fleet_of("a", shutdown=10), BUDGET, backend=backend).changed == ("mm-a-0", "mm-a-1")
