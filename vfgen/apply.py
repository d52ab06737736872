"""`vfgen apply`: change a running single-host deployment into the rendered one, one safe step at a time.

Two parts:

- `plan_apply()` is pure. From the instances vfgen last installed (the manifest) and
  the instances of the new plan it computes the ordered actions as plain data:
  removed instances are drained and stopped first; changed ones are restarted one at
  a time (drain, stop, start, health-gated); new ones are started last. It simulates
  the sum of memory shares on every GPU across that sequence and picks, among the
  changed instances, one whose restart keeps every GPU within the budget (and whose
  port is free). When none fits it says so, stops as few further instances as it
  needs, and states the cost.
- `Executor` carries the actions out with systemctl or supervisorctl and nginx, and
  keeps the manifest true after every step, so a failed apply leaves a record of what
  runs and a second apply continues from there.

Draining: the instance's server is rendered `down` in the nginx config (plan data:
Pool.down), `nginx -t` checks it, nginx reloads, and the instance's own counters
(`vllm:num_requests_running`, `vllm:num_requests_waiting`) must reach 0 with no new
request finishing for a quiet second before it is stopped. No request depends on
vLLM answering 500 during its shutdown and nginx retrying it elsewhere.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import requests

from vfgen import manifest as mf
from vfgen.errors import VfgenError
from vfgen.plan import Plan, build_plan
from vfgen.render import Artefact, render_file, render_nginx

EPS = 1e-9
DRAIN_QUIET_S = 1.0  # no request finished and none in flight for this long: drained
DRAIN_POLL_S = 0.2
RELOAD_SPACING_S = 1.0


class ApplyError(VfgenError):
    """The change cannot be planned, or a step of it failed."""


# --- instance records (manifest) ---------------------------------------------------


@dataclass(frozen=True)
class Inst:
    name: str
    model: str
    gpus: tuple[str, ...]
    share: float
    port: int
    server: str  # host:port as in the nginx upstreams
    url: str
    served_name: str
    start_order: int
    fingerprint: str  # sha256 of its unit file or supervisord program section
    argv: tuple[str, ...]
    # sha256 of the same text with the start-time settings at fixed values: what a RUNNING
    # instance depends on. "" (a manifest written before it existed): the full fingerprint.
    run_fingerprint: str = ""
    start_settings: tuple[tuple[str, int], ...] = ()  # (label, seconds) of those settings, for the reasons

    @property
    def running_fingerprint(self) -> str:
        return self.run_fingerprint or self.fingerprint

    def record(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["gpus"], data["argv"] = list(self.gpus), list(self.argv)
        data["start_settings"] = dict(self.start_settings)
        return data

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> "Inst":
        try:
            return cls(str(data["name"]), str(data["model"]), tuple(str(g) for g in data["gpus"]), float(data["share"]),
                       int(data["port"]), str(data["server"]), str(data["url"]), str(data["served_name"]),
                       int(data["start_order"]), str(data["fingerprint"]), tuple(str(a) for a in data["argv"]),
                       str(data.get("run_fingerprint") or ""),
                       tuple((str(k), int(v)) for k, v in (data.get("start_settings") or {}).items()))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ApplyError(f"the manifest's instance record {data.get('name')!r} is incomplete ({exc!r})") from None


def program_section(conf: str, name: str) -> str:
    """The `[program:NAME]` section of a rendered supervisord conf, up to the next section."""
    header = f"[program:{name}]"
    start = conf.find(header + "\n")
    if start < 0:
        raise ApplyError(f"the rendered supervisord conf has no {header} section")
    end = conf.find("\n[", start + len(header))
    return conf[start:end if end >= 0 else len(conf)]


def _instance_texts(plan: Plan, arts: Iterable[Artefact]) -> dict[str, str]:
    """Each instance's unit file (systemd) or program section (supervisord), as rendered."""
    d = plan.deployment
    by_path = {a.path: a for a in arts}
    out = {}
    for i in plan.instances:
        if d.backend == "systemd":
            art = by_path.get(f"etc/systemd/system/{i.unit}")
            out[i.name] = art.content if art else ""
        else:
            art = by_path.get(f"etc/supervisor/conf.d/{d.name}.conf")
            out[i.name] = program_section(art.content, i.name) if art else ""
    return out


# Start-time settings: read only while an instance starts (the launcher's lock wait and start
# deadline, ExecStartPost's health wait, systemd's TimeoutStartSec). The running fingerprint
# renders them at these fixed values, so a change of them alone restarts nothing.
_FIXED_START_TIMEOUT_S = 1
_FIXED_LOCK_TIMEOUT_S = 0


def _running_texts(plan: Plan) -> dict[str, str]:
    """The instances' texts from the same deployment with the start-time settings fixed."""
    d = plan.deployment
    fixed = dataclasses.replace(d, timeouts=dataclasses.replace(d.timeouts, start=_FIXED_START_TIMEOUT_S,
                                                                 lock=_FIXED_LOCK_TIMEOUT_S))
    # nginx=False: no API key file read; the units and programs do not depend on the dispatcher.
    again = build_plan(fixed, nginx=False)
    role = "unit" if d.backend == "systemd" else "supervisord"
    arts = [render_file(again, f, dispatcher=False) for f in again.files if f.role == role]
    return _instance_texts(again, arts)


def instances_of(plan: Plan, arts: Iterable[Artefact]) -> list[Inst]:
    """The plan's instances with the fingerprints of what was rendered for each."""
    texts = _instance_texts(plan, arts)
    running = _running_texts(plan)
    servers = {name: server for pool in plan.pools
               for name, server in zip((i.name for i in plan.instances_of(pool.model)), pool.servers)}
    out = []
    for i in plan.instances:
        settings = (("lock timeout", i.lock_timeout), ("start timeout", i.start_timeout),
                    ("TimeoutStartSec", i.unit_start_timeout))
        out.append(Inst(i.name, i.model, i.gpus, float(i.memory_share), i.port, servers.get(i.name, f"{i.host}:{i.port}"),
                        i.url, i.served_name, i.start_order, mf.sha256(texts[i.name]), i.vllm_argv,
                        mf.sha256(running[i.name]), settings))
    return out


def instance_records(plan: Plan, arts: Iterable[Artefact]) -> tuple[dict[str, Any], ...]:
    return tuple(i.record() for i in instances_of(plan, arts))


# --- the pure planner -------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    kind: str  # check | drain | stop | remove | write | reload | restart | update | start
    target: str  # instance name, file path, or process manager / nginx
    reason: str
    gpu_totals: tuple[tuple[str, float], ...] = ()  # share sum per GPU once this action is done

    def line(self, root: Path | None = None) -> str:
        shown = self.kind in ("stop", "restart", "start")
        totals = "; ".join(f"GPU {g}: {t:.2f}" for g, t in self.gpu_totals) if shown else ""
        target = str(root / self.target) if root is not None and self.kind in ("write", "remove") else self.target
        return f"{self.kind:8} {target}  ({self.reason}" + (f"; then {totals}" if totals else "") + ")"


@dataclass(frozen=True)
class ApplyPlan:
    actions: tuple[Action, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    added: tuple[str, ...]
    unchanged: tuple[str, ...]
    budget: float
    peak: tuple[tuple[str, float], ...]  # highest share sum per GPU over the whole sequence
    notes: tuple[str, ...] = ()  # unsafe orders and other costs, said before anything runs
    updated: tuple[str, ...] = ()  # only start-time settings changed: files rewritten, not restarted

    @property
    def empty(self) -> bool:
        return not self.actions


def _diff(old: Inst, new: Inst) -> str:
    parts = []
    if abs(old.share - new.share) > EPS:
        parts.append(f"share {old.share:.2f} -> {new.share:.2f}")
    if old.port != new.port:
        parts.append(f"port {old.port} -> {new.port}")
    if old.gpus != new.gpus:
        parts.append(f"GPU {','.join(old.gpus)} -> {','.join(new.gpus)}")
    if old.argv != new.argv:
        if len(old.argv) == len(new.argv):
            # Same shape: name each changed value by the flag before it.
            for k, (a, b) in enumerate(zip(old.argv, new.argv)):
                if a != b:
                    flag = old.argv[k - 1] if k and old.argv[k - 1].startswith("-") and not a.startswith("-") else ""
                    parts.append(f"{flag} {a} -> {b}".strip())
        else:
            gone = [a for a in old.argv if a not in new.argv]
            came = [a for a in new.argv if a not in old.argv]
            parts.append("vLLM args " + (" ".join([*(f"-{a}" for a in gone), *(f"+{a}" for a in came)]) or "reordered"))
    return ", ".join(parts) or "unit/program settings changed"


def _start_diff(old: Inst, new: Inst) -> str:
    before = dict(old.start_settings)
    parts = [f"{label} {before[label]} -> {value} s" for label, value in new.start_settings
             if label in before and before[label] != value]
    return ", ".join(parts) or "start-time settings"


def plan_apply(old: Iterable[Inst], new: Iterable[Inst], budget: float, *, start_timeout: float = 0.0,
               dispatcher: bool = True, backend: str = "systemd", conf: str | None = None,
               early_files: Iterable[str] = (), final_files: Iterable[str] = (), stale: Iterable[str] = (),
               nginx_changed: bool = False) -> ApplyPlan:
    """The ordered actions from `old` (running) to `new`.

    `conf`: the supervisord conf path when it changed (written and reread first);
    `early_files`: files the transitional nginx configs include (the API keys map), written first;
    `final_files`: other changed files written at the end; `stale`: files removed at the end.
    """
    old_by = {i.name: i for i in old}
    new_list = sorted(new, key=lambda i: (i.start_order, i.name))
    new_by = {i.name: i for i in new_list}
    removed = sorted((i for n, i in old_by.items() if n not in new_by), key=lambda i: (-i.start_order, i.name))
    differs = [i for i in new_list if i.name in old_by and old_by[i.name].fingerprint != i.fingerprint]
    # What a running instance depends on is the same: only values read while it starts changed.
    updated = [i for i in differs if old_by[i.name].running_fingerprint == i.running_fingerprint]
    changed = [i for i in differs if i not in updated]
    added = [i for i in new_list if i.name not in old_by]
    unchanged = [i.name for i in new_list if i.name in old_by and old_by[i.name].fingerprint == i.fingerprint]

    running: dict[str, Inst] = dict(old_by)
    peak: dict[str, float] = {}
    actions: list[Action] = []
    notes: list[str] = []

    def totals(extra: Inst | None = None) -> dict[str, float]:
        t: dict[str, float] = {}
        for i in [*running.values(), *([extra] if extra else [])]:
            for g in i.gpus:
                t[g] = t.get(g, 0.0) + i.share
        return t

    def record(kind: str, target: str, reason: str) -> None:
        t = totals()
        for g, v in t.items():
            peak[g] = max(peak.get(g, 0.0), v)
        actions.append(Action(kind, target, reason, tuple(sorted(t.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0))))

    def fits(inst: Inst) -> bool:
        t = totals(inst)
        if any(t.get(g, 0.0) > budget + EPS for g in inst.gpus):
            return False
        return all(r.port != inst.port for n, r in running.items() if n != inst.name)

    for g, v in totals().items():
        peak[g] = v
    for path in early_files:
        record("write", path, "the nginx config includes it")
    busy = bool(removed or changed or added or early_files or nginx_changed)
    over = {g: v for g, v in totals().items() if v > budget + EPS}
    if over:
        notes.append("the running shares already exceed the budget " + f"{budget:.2f}: "
                     + ", ".join(f"GPU {g} {v:.2f}" for g, v in sorted(over.items())) + "; the stops below bring them under it")
    if dispatcher and busy:
        record("check", "nginx", "nginx -t on the new config before anything changes; the running one is put back")
    if backend == "supervisord" and (conf or removed or changed or added or updated):
        if conf:
            record("write", conf, "every program's new settings; supervisord keeps running the old ones until `update NAME`")
        record("reload", "supervisord", "supervisorctl reread: load the conf without touching a program")
    for inst in removed:
        if dispatcher:
            record("drain", inst.name, "removed from the deployment: nginx sends it no new request")
        del running[inst.name]
        how = "disable, delete the unit" if backend == "systemd" else "supervisorctl update drops the program"
        record("stop", inst.name, f"removed; frees {inst.share:.2f} on GPU {','.join(inst.gpus)}; then {how}")

    pending = list(changed)
    stopped_early: list[Inst] = []  # stopped to make room; started with the new config later
    while pending:
        pick = next((i for i in pending if fits_after_stop(i, running, fits)), None)
        if pick is None:
            pick = pending[0]
            victims = []
            for other in [*reversed(pending[1:])]:
                if fits_after_stop(pick, running, fits):
                    break
                victims.append(other)
                if dispatcher:
                    record("drain", other.name, f"no safe in-place order: makes room for {pick.name}")
                del running[other.name]
                record("stop", other.name, f"no safe in-place order: stopped until it can start at {other.share:.2f}")
                pending.remove(other)
                stopped_early.append(other)
            if not fits_after_stop(pick, running, fits):
                raise ApplyError(f"no order of restarts keeps every GPU within the budget {budget:.2f}: {pick.name} at "
                                 f"{pick.share:.2f} does not fit even with every other changed instance stopped")
            models = sorted({v.model for v in victims} | {pick.model})
            notes.append(
                f"no safe in-place order for {pick.name}: restarting it at {pick.share:.2f} next to the running shares "
                f"would exceed the budget {budget:.2f}; {len(victims) + 1} instance(s) ({', '.join([pick.name] + [v.name for v in victims])}) "
                f"of {', '.join(models)} are down together, for up to {len(victims) + 1} health-gated start(s)"
                + (f" of at most {start_timeout:g}s each" if start_timeout else ""))
        pending.remove(pick)
        old_inst = old_by[pick.name]
        if dispatcher:
            record("drain", pick.name, "changed: nginx sends it no new request while it restarts")
        del running[pick.name]
        running[pick.name] = pick
        how = "stop, write unit, daemon-reload, start" if backend == "systemd" else "stop, supervisorctl update, start"
        record("restart", pick.name, f"changed: {_diff(old_inst, pick)}; {how}, healthy before the next")
    for inst in [*stopped_early, *added]:
        if not fits(inst):
            raise ApplyError(f"{inst.name} at {inst.share:.2f} does not fit on GPU {','.join(inst.gpus)} "
                             f"(budget {budget:.2f}) after the other changes")
        running[inst.name] = inst
        why = "new instance" if inst in added else f"stopped earlier to make room; now at {inst.share:.2f}"
        record("start", inst.name, f"{why}; healthy before the next")
    for inst in updated:
        how = ("unit rewritten, takes effect at its next start (daemon-reload below)" if backend == "systemd" else
               "conf rewritten and reread; supervisord keeps the old start settings until the program's next "
               "`update` (a manual `supervisorctl update` would restart it)")
        record("update", inst.name, f"only start-time settings changed ({_start_diff(old_by[inst.name], inst)}): "
                                    f"{how}; no restart")

    for path in final_files:
        record("write", path, "changed, no process depends on it")
    for path in stale:
        record("remove", path, "stale: vfgen wrote it, the deployment no longer has it")
    if backend == "systemd" and (removed or changed or added or updated or final_files or stale):
        record("reload", "systemd", "systemctl daemon-reload, enable the target")
    if dispatcher and (busy or final_files or stale):
        record("reload", "nginx", "the final config: nginx -t, then reload")

    models_after = {i.model for i in new_list}
    for model in sorted(models_after):
        members = [i for i in new_list if i.model == model]
        if len(members) == 1 and members[0] in changed:
            notes.append(f"{model} has one instance: it serves nothing while {members[0].name} restarts")
    if not dispatcher and changed:
        notes.append("no dispatcher (a single instance serves the port itself): requests fail while it restarts")
    return ApplyPlan(tuple(actions), tuple(i.name for i in removed), tuple(i.name for i in changed),
                     tuple(i.name for i in added), tuple(unchanged), budget,
                     tuple(sorted(peak.items())), tuple(notes), tuple(i.name for i in updated))


def fits_after_stop(inst: Inst, running: dict[str, Inst], fits: Callable[[Inst], bool]) -> bool:
    """Whether `inst` fits once its own old process (if running) is stopped."""
    own = running.pop(inst.name, None)
    try:
        return fits(inst)
    finally:
        if own is not None:
            running[inst.name] = own


# --- draining -----------------------------------------------------------------------


def _metric_sums(text: str, names: tuple[str, ...]) -> dict[str, float]:
    sums = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        metric = line.split("{", 1)[0].split(" ", 1)[0]
        if metric in sums:
            try:
                sums[metric] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return sums


_DRAIN_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:request_success_total")


def wait_drained(url: str, timeout: float, session: requests.Session | None = None) -> tuple[bool, str]:
    """Until the instance has nothing in flight and finished no request for DRAIN_QUIET_S; bounded."""
    http = session or requests.Session()
    deadline = time.monotonic() + timeout
    last_done: float | None = None
    quiet_since: float | None = None
    detail = ""
    while True:
        try:
            resp = http.get(f"{url}/metrics", timeout=2.0)
            resp.raise_for_status()
        except requests.RequestException as exc:
            return True, f"its /metrics does not answer ({type(exc).__name__}): nothing in flight"
        m = _metric_sums(resp.text, _DRAIN_METRICS)
        busy = m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"]
        done = m["vllm:request_success_total"]
        now = time.monotonic()
        if busy or done != last_done:
            quiet_since = None if busy else now
        elif quiet_since is None:
            quiet_since = now
        last_done = done
        detail = f"{busy:g} request(s) in flight"
        if quiet_since is not None and now - quiet_since >= DRAIN_QUIET_S:
            return True, "idle"
        if now >= deadline:
            return False, detail
        time.sleep(DRAIN_POLL_S)


# --- the executor ---------------------------------------------------------------------


@dataclass
class Commands:
    systemctl: list[str]
    supervisorctl: list[str]
    nginx: list[str] | None  # None: no dispatcher on this host


class StepFailed(ApplyError):
    pass


class Executor:
    """Runs an ApplyPlan against this host; every step is said as it happens."""

    def __init__(self, root: Path, plan: Plan, arts: list[Artefact], old: mf.Manifest | None, commands: Commands,
                 out: TextIO, runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
        self.root, self.plan, self.arts, self.old = root, plan, arts, old
        self.d = plan.deployment
        self.cmd, self.out, self.runner = commands, out, runner
        self.new = {i.name: i for i in instances_of(plan, arts)}
        self.state: dict[str, Inst] = {i.name: i for i in old_instances(old, self.d.backend)}
        self.written: dict[str, Artefact] = {}  # what this apply wrote, for the manifest
        self.files = dict(old.files) if old else {}
        self.down: set[str] = set()  # instance names nginx must send nothing to
        self.last_reload = -RELOAD_SPACING_S
        self.first_install = not self.state  # no instance of this deployment was running
        self.done: list[str] = []
        self.http = requests.Session()
        self.http.trust_env = False
        self.nginx_art = next((a for a in arts if a.kind == "nginx" and a.path.endswith(f"/conf.d/{self.d.name}.conf")), None)

    # -- helpers
    def say(self, message: str) -> None:
        self.out.write(message + "\n")
        self.out.flush()

    def run(self, argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
        self.say(f"  $ {shlex.join(argv)}")
        try:
            result = self.runner(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise StepFailed(f"{what}: `{shlex.join(argv)}` did not finish within {timeout:g}s") from None
        except OSError as exc:
            raise StepFailed(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from None
        if result.returncode != 0 or "ERROR" in (result.stdout or ""):
            tail = " | ".join(line.strip() for line in ((result.stderr or "") + (result.stdout or "")).strip().splitlines()[-6:])
            raise StepFailed(f"{what}: `{shlex.join(argv)}` exited {result.returncode}" + (f": {tail}" if tail else ""))
        return result

    def write(self, arts: list[Artefact]) -> None:
        from vfgen.output import write_tree

        for art in arts:
            self.files[art.path] = {"sha256": mf.sha256(art.content), "kind": art.kind}
        write_tree(self.root, [*arts, self._manifest().artefact()])

    def _manifest(self) -> mf.Manifest:
        records = tuple(self.state[n].record() for n in sorted(self.state, key=lambda n: (self.state[n].start_order, n)))
        return mf.Manifest(self.d.name, dict(sorted(self.files.items())), records, self.d.backend)

    def save_state(self) -> None:
        self.write([])

    # -- nginx
    def transitional_nginx(self) -> str:
        """The new plan's nginx with each server where its instance listens now, `down` while it must get nothing."""
        pools = []
        for pool in self.plan.pools:
            servers, down = [], []
            for inst in self.plan.instances_of(pool.model):
                current = self.state.get(inst.name)  # None: not running (new, or stopped to come back)
                address = current.server if current is not None else self.new[inst.name].server
                servers.append(address)
                if current is None or inst.name in self.down:
                    down.append(address)
            pools.append(dataclasses.replace(pool, servers=tuple(servers), down=tuple(down)))
        return render_nginx(dataclasses.replace(self.plan, pools=tuple(pools)))

    def nginx_update(self, why: str) -> None:
        if self.nginx_art is None or self.cmd.nginx is None:
            return
        content = self.transitional_nginx()
        target = self.root / self.nginx_art.path
        previous = target.read_text(encoding="utf-8") if target.exists() else None
        if previous == content:
            return
        art = dataclasses.replace(self.nginx_art, content=content)
        # Reloads far apart: a connection a client opens right after one reload, accepted by a
        # worker that the next reload retires before it read the request, is closed unanswered.
        wait = self.last_reload + RELOAD_SPACING_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        self.write([art])
        try:
            self.run([*self.cmd.nginx, "-t"], 60, f"nginx -t ({why})")
        except StepFailed:
            if previous is not None:
                self.write([dataclasses.replace(self.nginx_art, content=previous)])
                self.say(f"  nginx config restored to the one nginx runs: {target}")
            raise
        try:
            self.run([*self.cmd.nginx, "-s", "reload"], 60, f"nginx reload ({why})")
        except StepFailed as exc:
            if not self.first_install:
                raise
            # Nothing of this deployment ran before, so nothing can lose a request; nginx may
            # simply not be running yet.
            self.say(f"  nginx did not reload ({exc}); start nginx to serve the deployment")
        self.last_reload = time.monotonic()

    def check_nginx(self) -> None:
        """`nginx -t` with the final config in place, then the previous file back: nothing reloads."""
        if self.nginx_art is None or self.cmd.nginx is None:
            return
        target = self.root / self.nginx_art.path
        previous = target.read_text(encoding="utf-8") if target.exists() else None
        self.write([self.nginx_art])
        try:
            self.run([*self.cmd.nginx, "-t"], 60, "nginx -t (the new config)")
        finally:
            if previous is not None:
                self.write([dataclasses.replace(self.nginx_art, content=previous)])

    def drain(self, name: str, why: str) -> None:
        self.down.add(name)
        self.nginx_update(f"drain {name}")
        if self.cmd.nginx is None or self.nginx_art is None:
            return
        inst = self.state[name]
        ok, detail = wait_drained(inst.url, timeout=self.d.timeouts.shutdown + 5.0, session=self.http)
        self.say(f"  {name}: " + ("drained" if ok else f"still busy after {self.d.timeouts.shutdown + 5}s ({detail}); "
                                  "stopping: vLLM finishes in-flight requests for --shutdown-timeout"))

    # -- process managers
    def health(self, inst: Inst) -> None:
        from vfgen.health import wait

        if wait([inst.url], model=inst.served_name, timeout=float(self.d.timeouts.start), out=self.out) != 0:
            # Stopped again, so what runs matches the manifest (it was not recorded as running).
            try:
                self.stop(inst.name)
                again = "; stopped it again, nginx keeps it down"
            except StepFailed as exc:
                again = f"; stopping it again failed too: {exc}"
            raise StepFailed(f"{inst.name} did not become healthy within {self.d.timeouts.start}s ({inst.url}){again}")

    def stop(self, name: str) -> None:
        if self.d.backend == "systemd":
            unit = f"{name}.service"
            self.run([*self.cmd.systemctl, "stop", unit], self.d.timeouts.shutdown + 60, f"stop {name}")
        else:
            result = self.runner([*self.cmd.supervisorctl, "stop", name], capture_output=True, text=True,
                                 timeout=self.d.timeouts.shutdown + 60)
            self.say(f"  $ {shlex.join([*self.cmd.supervisorctl, 'stop', name])}")
            text = (result.stdout or "") + (result.stderr or "")
            if result.returncode != 0 and "not running" not in text and "no such process" not in text.lower():
                raise StepFailed(f"stop {name}: supervisorctl exited {result.returncode}: {text.strip()}")

    def start(self, inst: Inst) -> None:
        """Start `inst` with its new config (unit file / program section already on disk)."""
        if self.d.backend == "systemd":
            unit = f"{inst.name}.service"
            self.write([self._art(f"etc/systemd/system/{unit}")])
            self.run([*self.cmd.systemctl, "daemon-reload"], 120, "daemon-reload")
            self.run([*self.cmd.systemctl, "enable", unit], 60, f"enable {inst.name}")
            self.run([*self.cmd.systemctl, "start", unit], self.d.timeouts.start + 120, f"start {inst.name}")
        else:
            # reread happened once; `update NAME` re-creates just this program, and autostart starts it.
            self.run([*self.cmd.supervisorctl, "update", inst.name], 120, f"start {inst.name}")
        self.health(inst)

    def _art(self, path: str) -> Artefact:
        art = next((a for a in self.arts if a.path == path), None)
        if art is None:
            raise ApplyError(f"nothing rendered at {path}")
        return art

    # -- the run
    def execute(self, ap: ApplyPlan) -> None:
        for action in ap.actions:
            self.say(f"- {action.line(self.root)}")
            name = action.target
            if action.kind == "drain":
                self.drain(name, action.reason)
            elif action.kind == "stop":
                self.stop(name)
                self.state.pop(name, None)
                self.save_state()
                if name not in self.new:  # removed for good
                    self._forget_instance(name)
                    self.save_state()
            elif action.kind in ("restart", "start"):
                inst = self.new[name]
                if action.kind == "restart" and name in self.state:
                    self.stop(name)
                    self.state.pop(name)
                    self.save_state()
                self.start(inst)
                self.state[name] = inst
                self.down.discard(name)
                self.save_state()
                # nginx serves it from the next reload on (the next drain's, or the final one):
                # one reload per step, never two back to back (see nginx_update).
            elif action.kind == "update":
                # No stop, no start: the new unit file (systemd; the daemon-reload action loads it)
                # or the reread conf (supervisord) applies at the instance's next start.
                if self.d.backend == "systemd":
                    self.write([self._art(f"etc/systemd/system/{name}.service")])
                self.state[name] = self.new[name]
                self.save_state()
            elif action.kind == "write":
                self.write([self._art(name)])
            elif action.kind == "remove":
                self._remove_file(name)
                self.save_state()
            elif action.kind == "reload":
                self._reload(name)
            elif action.kind == "check":
                self.check_nginx()
            else:
                raise ApplyError(f"unknown action {action.kind!r}")
            self.done.append(f"{action.kind} {name}")

    def recover(self) -> None:
        """After a failed step: let nginx serve every instance that runs healthy (best effort)."""
        if not any(step.split()[0] in ("drain", "stop", "restart", "start") for step in self.done):
            return  # nginx still runs the config it had before the apply
        try:
            self.nginx_update("serve what is healthy after the failure")
            self.save_state()
        except VfgenError as exc:
            self.say(f"  could not update nginx after the failure: {exc}")

    def _reload(self, what: str) -> None:
        if what == "supervisord":
            self.run([*self.cmd.supervisorctl, "reread"], 60, "supervisorctl reread")
        elif what == "systemd":
            self.run([*self.cmd.systemctl, "daemon-reload"], 120, "daemon-reload")
            self.run([*self.cmd.systemctl, "enable", self.plan.target], 60, f"enable {self.plan.target}")
        elif what == "nginx":
            self.nginx_update("final")
            self.save_state()

    def _remove_file(self, path: str) -> None:
        """Delete `path` only while it holds what vfgen wrote there (the manifest's hash)."""
        entry = self.files.get(path)
        target = self.root / path
        if not target.exists():
            self.files.pop(path, None)
            return
        if entry and mf.sha256(target.read_text(encoding="utf-8", errors="replace")) == entry["sha256"]:
            target.unlink()
            self.files.pop(path)
            self.say(f"  removed {target}")
        else:
            self.say(f"  kept {target}: changed since vfgen wrote it")

    def _forget_instance(self, name: str) -> None:
        """A removed instance: disable and delete its unit (systemd), or drop the program (supervisord)."""
        if self.d.backend == "systemd":
            unit = f"{name}.service"
            self.run([*self.cmd.systemctl, "disable", unit], 60, f"disable {name}")
            self._remove_file(f"etc/systemd/system/{unit}")
            self.run([*self.cmd.systemctl, "daemon-reload"], 120, "daemon-reload")
        else:
            self.run([*self.cmd.supervisorctl, "update", name], 120, f"remove program {name}")


def old_instances(old: mf.Manifest | None, backend: str) -> list[Inst]:
    if old is None or not old.instances:
        return []
    if old.backend and old.backend != backend:
        raise ApplyError(f"the running deployment {old.deployment!r} uses {old.backend}, the new one {backend}: "
                         "apply cannot move instances between process managers; stop the old deployment first")
    return [Inst.from_record(r) for r in old.instances]


def format_plan(ap: ApplyPlan, root: Path | None = None) -> str:
    lines = [f"note: {note}" for note in ap.notes]
    lines += [action.line(root) for action in ap.actions]
    peak = ", ".join(f"GPU {g} {v:.2f}" for g, v in ap.peak)
    lines.append(f"summary: {len(ap.removed)} removed, {len(ap.changed)} changed, {len(ap.updated)} updated, "
                 f"{len(ap.added)} new, "
                 f"{len(ap.unchanged)} unchanged; peak share sum {peak or '-'} (budget {ap.budget:.2f})")
    return "\n".join(lines) + "\n"
