"""Carry out the CLI commands on a validated Deployment: plan, render, write, probe, roll out."""

from __future__ import annotations

import dataclasses

import json
import os
import shlex
import sys
from pathlib import Path
from typing import TextIO

from vfgen.config import Deployment
from vfgen.errors import OutputError
from vfgen.options import ONLY as ONLY_CHOICES
from vfgen.plan import DISPATCHER_KINDS, OutputFile, Plan, build_plan, with_nginx
from vfgen.render import Artefact, render_file
from vfgen.tables import table_lines


def make_plan(d: Deployment, *, nginx: bool = True) -> Plan:
    """The plan, with GPU memory from nvidia-smi when a model dir is local and no size was given.

    nginx=False plans the backends only (no API key file read); `with_nginx` adds the rest.
    """
    from vfgen.plan import local_model_dir

    gpu_bytes = d.gpu_memory_bytes
    if gpu_bytes is None and any(local_model_dir(m.source) for m in d.models):
        from vfgen.memory import detect_gpu_memory

        gpu_bytes = detect_gpu_memory()
    # The deployment's own warnings (which unit a size was read in...) first: they explain a PlanError too.
    for warning in d.warnings:
        sys.stderr.write(f"Warning: {warning}\n")
    plan = build_plan(d, gpu_bytes, nginx=nginx)
    for warning in plan.warnings[len(d.warnings):]:
        sys.stderr.write(f"Warning: {warning}\n")
    return plan


def _check_only(only: str) -> None:
    if only not in ONLY_CHOICES:
        raise OutputError(f"--only={only!r}: must be one of {', '.join(ONLY_CHOICES)}")


def selected_files(plan: Plan, only: str) -> list[OutputFile]:
    """The files of the deployment's backend, narrowed by --only."""
    _check_only(only)
    kinds = ("nginx", "nginx-exporter", plan.deployment.backend, "prometheus", "prometheus-rules")
    files = [f for f in plan.files if f.kind in kinds]
    if only == "backends":
        files = [f for f in files if f.kind not in DISPATCHER_KINDS]
    elif only == "dispatcher":
        files = [f for f in files if f.kind in DISPATCHER_KINDS]
        if not files:
            raise OutputError("--only=dispatcher: a single instance serves the user port itself; there is no nginx config")
    return files


def select_artefacts(plan: Plan, only: str) -> list[Artefact]:
    """The artefacts of --only; the dispatcher part of the plan (API keys included) unless only=backends."""
    files = selected_files(plan, only)
    dispatcher = only != "backends"
    if dispatcher:
        plan = with_nginx(plan)
    return [render_file(plan, f, dispatcher=dispatcher) for f in files]


def find_artefact(plan: Plan, emit: str) -> OutputFile:
    """--emit NAME: a kind with one file (nginx, supervisord, prometheus), a file name or a path."""
    every = _unrendered(plan)
    by_path = {f.path: f for f in plan.files}
    matches = [a for a in every if emit in (a.name, a.path)]
    if len(matches) > 1:
        # nginx's conf.d/<name>.conf and supervisord's conf.d/<name>.conf share a file name.
        choices = ", ".join(f"{a.path} (--emit {a.kind if _only_of_kind(every, a) else a.path})" for a in matches)
        raise OutputError(f"--emit={emit!r} matches {len(matches)} files: {choices}; name one")
    if not matches:
        # A kind never selects a secret artefact (the API keys map): that one is printed only by name.
        of_kind = [a for a in every if a.kind == emit and not a.secret]
        if len(of_kind) == 1:
            matches = of_kind
        elif len(of_kind) > 1:
            names = ", ".join(a.name for a in of_kind)
            raise OutputError(f"--emit={emit!r} matches {len(of_kind)} files; name one: {names}")
    if not matches and emit == "nginx" and not plan.dispatcher:
        raise OutputError("--emit='nginx': a single instance has no dispatcher (vLLM serves the user port itself), "
                          "so there is no nginx config; use 2 or more instances for one")
    if not matches:
        # A file name two artefacts share is offered by its path, which is unique.
        names = ", ".join(sorted({a.kind for a in every} | {a.name if sum(b.name == a.name for b in every) == 1
                                                             else a.path for a in every}))
        raise OutputError(f"--emit={emit!r}: no such artefact (choose from: {names})")
    return by_path[matches[0].path]


def _unrendered(plan: Plan) -> list[Artefact]:
    """Every file of the plan without its content: matched by name, kind and mode, nothing is
    rendered (or read) for the files not printed."""
    return [Artefact(f.kind, f.path, "", f.mode) for f in plan.files]


def _only_of_kind(every: list[Artefact], art: Artefact) -> bool:
    return sum(1 for a in every if a.kind == art.kind and not a.secret) == 1 and not art.secret


def render(d: Deployment, *, emit: str | None, output_dir: Path | None, dry_run: bool, only: str, out: TextIO,
           prune: bool = False) -> None:
    from vfgen import manifest
    from vfgen.output import plan_changes, write_tree

    if emit is not None:
        if output_dir is not None or dry_run or prune:
            raise OutputError("--emit prints one file to stdout; it cannot be combined with --output-dir, --dry-run or --prune")
        # The dispatcher part (and the API key file) only when a dispatcher file is printed:
        # a GPU host prints its units without the key file.
        plan = make_plan(d, nginx=False)
        f = find_artefact(plan, emit)
        if only != "all" and f.path not in {s.path for s in selected_files(plan, only)}:
            raise OutputError(f"--emit={emit!r}: {f.path} is not among the files of --only={only}")
        if f.kind in DISPATCHER_KINDS:
            plan = with_nginx(plan)
        art = render_file(plan, f)
        out.write(art.content)
        for secret in (s for s in _unrendered(plan) if s.secret and s.kind == art.kind and not art.secret):
            sys.stderr.write(f"Note: {art.name} includes /{secret.path}, a separate artefact with the API keys: "
                             f"install it with mode 0600 (`--emit {secret.name}`).\n")
        return
    _check_only(only)
    plan = make_plan(d, nginx=only != "backends")
    arts = select_artefacts(plan, only)
    if prune and output_dir is None and not dry_run:
        raise OutputError("--prune removes stale files under --output-dir; give --output-dir (or --dry-run)")
    if dry_run or output_dir is not None:
        root = output_dir or Path("/")
        old = manifest.read(root, d.name)
        stale = manifest.stale_files(root, old, arts, only)
        keep = [s for s in stale if not prune or s.state != "stale"]
        # The first render records the instances it describes (they are what gets started);
        # later renders keep what `vfgen apply` last ran, so apply still sees the difference.
        first = (old is None or not old.instances) and only != "dispatcher"
        from vfgen.apply import instance_records

        new_manifest = manifest.updated(old, d.name, arts, only, keep=keep,
                                        instances=instance_records(plan, arts) if first else None,
                                        backend=d.backend if first else None)
        tree = arts + [new_manifest.artefact()]
        if dry_run:
            for change in plan_changes(root, tree):
                out.write(f"{change.action:9} {oct(change.mode)[2:]} {change.path}\n")
            for s in stale:
                out.write(f"{_stale_action(s, prune, done=False):9} {oct(s.mode or 0)[2:]} {root / s.path}\n")
            return
        for change in write_tree(root, tree):
            out.write(f"{change.action:9} {change.path}\n")
        removed = manifest.remove_stale(root, stale) if prune else []
        for s in stale:
            out.write(f"{_stale_action(s, prune, done=s in removed):9} {root / s.path}\n")
        return
    for art in arts:
        comment = ";" if art.kind == "supervisord" else "#"
        if art.secret:
            out.write(f"{comment} ===== {art.path} ===== (not printed: it holds API keys; use --emit {art.name} or --output-dir)\n")
            continue
        out.write(f"{comment} ===== {art.path} =====\n{art.content}")
        if not art.content.endswith("\n"):
            out.write("\n")


def _stale_action(s, prune: bool, done: bool) -> str:
    """`stale` (kept), `remove` (would be pruned), `removed`; `modified` files are never pruned."""
    if s.state == "modified":
        return "modified"
    if not prune:
        return "stale"
    return "removed" if done else "remove"


def plan_table(plan: Plan) -> str:
    rows = [("INSTANCE", "MODEL", "GPU", "PORT", "SHARE", "START", "AFTER", "LOCK WAIT", "START TIMEOUT", "UNIT TIMEOUT")]
    for i in plan.instances:
        rows.append((i.name, i.served_name, ",".join(i.gpus), str(i.port), i.memory_share, str(i.start_order), ",".join(i.after) or "-",
                     f"{i.lock_timeout}s", f"{i.start_timeout}s", f"{i.unit_start_timeout}s"))
    lines = table_lines(rows)
    lines.append("")
    gpu_rows = [("GPU", "INSTANCES", "TOTAL SHARE", "BUDGET")]
    for g in plan.gpus:
        gpu_rows.append((g.gpu, str(len(g.instances)), g.total, f"{plan.deployment.memory_budget:.2f}"))
    lines += table_lines(gpu_rows)
    if plan.memory:
        from vfgen.memory import format_bytes

        lines.append("")
        mem_rows = [("MODEL", "GPU MEMORY", "NEEDS/INSTANCE", "MINIMUM", "RECOMMENDED SHARE", "INSTANCES THAT FIT")]
        for f in plan.memory:
            mem_rows.append((f.model, format_bytes(f.gpu_bytes), format_bytes(f.need_bytes), format_bytes(f.min_bytes),
                             f"{f.recommended_share:.2f}", str(f.instances_that_fit)))
        lines += table_lines(mem_rows)
        lines += [f"  note ({f.model}): {n}" for f in plan.memory for n in f.notes]
    d = plan.deployment
    for pool in plan.pools:
        if pool.adapters:
            lines.append("")
            lines.append(f"LoRA adapters of {pool.model} (routed to its {len(pool.servers)} backend(s), served by every instance):")
            lines += [f"  {a.name}  parent={a.parent}  root={a.path}" for a in pool.adapters]
    lines.append("")
    if plan.dispatcher:
        lines.append(f"dispatcher: nginx on {d.listen}:{d.port} -> {sum(len(p.servers) for p in plan.pools)} backend(s)"
                     + (", routed by the JSON \"model\" field" if plan.route_by_model else ""))
    else:
        lines.append(f"single instance: vLLM serves {d.listen}:{d.port} itself (no nginx)")
    return "\n".join(lines) + "\n"


def plan_json(plan: Plan) -> dict:
    d = plan.deployment
    return {
        "name": d.name,
        "backend": d.backend,
        "dispatcher": {"listen": d.listen, "port": d.port, "url": plan.dispatcher_url} if plan.dispatcher else None,
        "route_by_model": plan.route_by_model,
        "memory_budget": d.memory_budget,
        "instances": [
            {
                "name": i.name, "model": i.model, "served_name": i.served_name, "index": i.index, "host": i.host,
                "port": i.port, "gpus": list(i.gpus), "memory_share": float(i.memory_share),
                "start_order": i.start_order, "after": list(i.after), "url": i.url,
                # Seconds: waiting for the GPU lock, starting once it is held, systemd's TimeoutStartSec.
                "lock_timeout": i.lock_timeout, "start_timeout": i.start_timeout, "unit_start_timeout": i.unit_start_timeout,
            }
            for i in plan.instances
        ],
        "gpus": [
            {"gpu": g.gpu, "instances": list(g.instances), "shares": [float(s) for s in g.shares], "total": float(g.total)}
            for g in plan.gpus
        ],
        "memory": [
            {"model": f.model, "gpu_bytes": f.gpu_bytes, "need_bytes": f.need_bytes, "min_bytes": f.min_bytes,
             "weight_bytes": f.weight_bytes, "kv_bytes_per_token": f.kv_bytes_per_token,
             "kv_bytes_per_sequence": f.kv_bytes_per_sequence, "max_model_len": f.max_model_len,
             "recommended_share": f.recommended_share, "instances_that_fit": f.instances_that_fit, "notes": list(f.notes)}
            for f in plan.memory
        ],
        "warnings": list(plan.warnings),
        "pools": [
            {"model": p.model, "upstream": p.upstream, "servers": list(p.servers), "cap": p.cap,
             "overflow_cap": p.overflow_cap, "served_names": list(p.served_names),
             "adapters": [{"name": a.name, "root": a.path, "parent": a.parent} for a in p.adapters],
             "route_names": list(p.route_names),
             "last_resort_upstream": p.last_resort_upstream,
             "routing": p.hash_key.routing if p.hash_key else "least_conn",
             "hash_key": dataclasses.asdict(p.hash_key) if p.hash_key else None}
            for p in plan.pools
        ],
    }


def show_plan(d: Deployment, *, as_json: bool, out: TextIO, only: str = "all") -> None:
    """The plan; with the dispatcher's part (which reads the API key file, as render does) unless only=backends."""
    _check_only(only)
    plan = make_plan(d, nginx=only != "backends")
    if as_json:
        out.write(json.dumps(plan_json(plan), indent=2) + "\n")
    else:
        out.write(plan_table(plan))


def health_targets(plan: Plan):
    from vfgen.health import Target

    d = plan.deployment
    targets = [
        Target(name=f"{i.model}/{i.index}", url=i.url, port=i.port, gpus=",".join(i.gpus), expected_model=i.served_name)
        for i in plan.instances
    ]
    if plan.dispatcher_url:
        targets.append(Target(name="dispatcher", url=plan.dispatcher_url, port=d.port, kind="dispatcher"))
    return targets


def health_check(d: Deployment | None, *, urls: list[str], expected_model: str | None, as_json: bool, timeout: float) -> int:
    from vfgen import health

    if urls:
        targets = [health.Target(name=u, url=u.rstrip("/"), expected_model=expected_model) for u in urls]
    elif d is None:
        raise OutputError("give a deployment (MODEL or -f FILE, as for render) or --url URL")
    else:
        targets = health_targets(build_plan(d, nginx=False))
    return health.check(targets, timeout=timeout, as_json=as_json)


def rollout(d: Deployment, *, timeout: float | None, supervisorctl: str | None, systemctl: str | None,
            output_dir: Path | None = None, nginx: str | None = None, drain: bool = True) -> int:
    from vfgen import rollout as roll

    plan = build_plan(d, nginx=False)  # a GPU host restarts its instances without the API key file
    steps = [
        roll.RolloutStep(name=i.unit if d.backend == "systemd" else i.name, url=i.url, expected_model=i.served_name)
        for i in sorted(plan.instances, key=lambda i: (i.start_order, i.name))
    ]
    hooks = _drain_hooks(d, plan, output_dir or Path("/"), nginx) if drain else {}
    return roll.rollout(
        steps,
        backend=d.backend,
        timeout=timeout if timeout is not None else d.timeouts.start,
        supervisorctl=shlex.split(supervisorctl) if supervisorctl else None,
        systemctl=shlex.split(systemctl) if systemctl else None,
        **hooks,
    )


def _drain_hooks(d: Deployment, plan: Plan, root: Path, nginx: str | None) -> dict:
    """drain/served/finish for rollout, through the apply executor, when nginx runs here."""
    from vfgen import apply as ap_mod
    from vfgen import manifest

    old = manifest.read(root, d.name)
    conf = next((f for f in plan.files if f.role == "nginx"), None)
    if old is None or conf is None or conf.path not in old.files:
        sys.stderr.write(f"Note: no drain: no nginx config of {d.name} in the manifest under {root}; a stopping "
                         "instance finishes its in-flight requests (--shutdown-timeout) and nginx retries new ones elsewhere.\n")
        return {}
    plan = with_nginx(plan)
    arts = select_artefacts(plan, "all")
    commands = ap_mod.Commands(systemctl=["systemctl"], supervisorctl=["supervisorctl"],
                               nginx=shlex.split(nginx) if nginx else ["nginx"])
    executor = ap_mod.Executor(root, plan, arts, old, commands, sys.stderr)
    executor.state = dict(executor.new)  # every instance serves, at its rendered address
    by_url = {i.url: i.name for i in plan.instances}

    def drain(step) -> None:
        executor.drain(by_url[step.url], "rollout")

    def served(step) -> None:
        executor.down.discard(by_url[step.url])  # nginx sends it requests again from the next reload

    def finish() -> None:
        executor.down.clear()
        executor.nginx_update("rollout done")
        executor.save_state()

    return {"drain": drain, "served": served, "finish": finish}


def apply(d: Deployment, *, output_dir: Path | None, dry_run: bool, systemctl: str | None, supervisorctl: str | None,
          nginx: str | None, out: TextIO) -> None:
    """Plan the change from what the manifest says runs to the rendered deployment; carry it out unless dry_run."""
    from vfgen import apply as ap_mod
    from vfgen import manifest
    from vfgen.output import plan_changes

    if d.upstream_hosts:
        raise ap_mod.ApplyError("apply changes one host; with upstream_hosts (separate GPU and load-balancer hosts) "
                                "use the Ansible role (docs/ansible.md)")
    plan = make_plan(d)
    arts = select_artefacts(plan, "all")
    root = output_dir or Path("/")
    old = manifest.read(root, d.name)
    had_nginx = old is not None and any(e["kind"] == "nginx" for e in old.files.values())
    if old is not None and old.instances and had_nginx != plan.dispatcher:
        raise ap_mod.ApplyError("apply cannot switch between a single instance serving the port itself and a "
                                "deployment behind nginx: stop the old deployment, then apply the new one")
    new_insts = ap_mod.instances_of(plan, arts)
    old_insts = ap_mod.old_instances(old, d.backend)
    changed = {str(c.path.relative_to(Path(os.path.realpath(root)))): c.action
               for c in plan_changes(root, arts) if c.action != "unchanged"}
    nginx_conf = next((a.path for a in arts if a.kind == "nginx" and not a.secret), None)
    conf = f"etc/supervisor/conf.d/{d.name}.conf" if d.backend == "supervisord" else None
    instance_files = {f"etc/systemd/system/{i.name}.service" for i in [*new_insts, *old_insts]}
    early = [a.path for a in arts if a.kind == "nginx" and a.path != nginx_conf and a.path in changed]
    final = [a.path for a in arts if a.path in changed and a.kind != "nginx" and a.path != conf
             and not (d.backend == "systemd" and a.path in instance_files)]
    stale = [s.path for s in manifest.stale_files(root, old, arts, "all") if s.path not in instance_files]
    ap = ap_mod.plan_apply(old_insts, new_insts, d.memory_budget, start_timeout=d.timeouts.start,
                           dispatcher=plan.dispatcher, backend=d.backend, conf=conf if conf in changed else None,
                           early_files=early, final_files=final, stale=stale, nginx_changed=nginx_conf in changed)
    out.write(ap_mod.format_plan(ap, root))
    out.flush()
    if dry_run:
        return
    commands = ap_mod.Commands(
        systemctl=shlex.split(systemctl) if systemctl else ["systemctl"],
        supervisorctl=shlex.split(supervisorctl) if supervisorctl else ["supervisorctl"],
        nginx=shlex.split(nginx) if nginx else ["nginx"],
    )
    executor = ap_mod.Executor(root, plan, arts, old, commands, out)
    try:
        executor.execute(ap)
    except ap_mod.ApplyError as exc:
        executor.recover()
        done = executor.done
        left = [f"{a.kind} {a.target}" for a in ap.actions][len(done):]
        out.write(f"apply stopped: {exc}\n")
        out.write(f"done: {', '.join(done) if done else 'nothing'}\n")
        out.write(f"not done: {', '.join(left) if left else 'nothing'}\n")
        out.write("the manifest records what runs now; fix the cause and run apply again to continue\n")
        out.flush()
        raise ap_mod.ApplyError(f"apply stopped: {exc}") from None
    out.write("apply complete\n")
