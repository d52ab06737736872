"""Compute every port, GPU placement, memory share, start order, command line, file and nginx answer as plain data.

The renderer only formats a Plan: every decision, number and file read lives here
(the API key file is read when the dispatcher is planned, see `with_nginx`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from vfgen import jsonpcre, quoting
from vfgen.config import (DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, Alerts, Deployment, ModelSpec, nginx_size_bytes,
                          read_api_keys)
from vfgen.errors import ConfigError, PlanError


# A launcher whose instance missed its start timeout gives vLLM 10 s to stop on SIGTERM
# (then SIGKILL) and up to 6 s more to reap vLLM's engine processes before it frees the lock.
LOCK_RELEASE_MARGIN_S = 30
# systemd TimeoutStartSec beyond the launcher's own waits: exec, Python start-up, probes.
UNIT_START_MARGIN_S = 60
# uvicorn's --timeout-keep-alive default, which `vllm serve` keeps: idle connections close after it.
VLLM_IDLE_TIMEOUT_S = 5


# nginx hashes variable names into 64-byte buckets (variables_hash_bucket_size, set in
# nginx.conf, not here): a name longer than 46 characters fails `nginx -t`. The longest
# suffix vfgen appends is 24, so a longer deployment name gets a hashed prefix.
NGINX_PREFIX_MAX = 22


@dataclass(frozen=True)
class Instance:
    model: str  # model key
    index: int  # position within its model
    name: str  # unit stem and supervisord program name
    host: str  # bind address
    port: int
    gpus: tuple[str, ...]
    memory_share: str  # formatted for --gpu-memory-utilization
    start_order: int  # instances with the same number start in parallel
    supervisor_priority: int  # supervisord starts lower numbers first: after every vfgen default (100)
    after: tuple[str, ...]  # instances (names) on the same GPUs that start before this one
    after_urls: tuple[str, ...]
    locks: tuple[str, ...]
    url: str  # base URL to probe
    served_name: str  # the name its /v1/models must list
    env: tuple[tuple[str, str], ...]  # CUDA_VISIBLE_DEVICES first, then model, then instance env
    env_file: str | None  # secrets, read at start by systemd (EnvironmentFile=) or the launcher
    vllm_argv: tuple[str, ...]
    start_timeout: int  # seconds to become healthy, counted once it holds its GPU lock(s)
    lock_timeout: int  # seconds it may wait for its lock(s) (and, under supervisord, its predecessor)
    health_timeout: int  # ExecStartPost's health wait: the lock wait plus the start
    unit_start_timeout: int  # systemd TimeoutStartSec: both waits plus a margin to start it
    exec_start: tuple[str, ...] = ()  # systemd ExecStart: the launcher (systemd orders, and sets the env)
    exec_start_post: tuple[str, ...] = ()  # systemd ExecStartPost: the health wait that gates "active"
    supervisor_command: tuple[str, ...] = ()  # supervisord: the launcher, with --after, --env and --env-file
    log_file: str = ""  # supervisord's stdout_logfile

    @property
    def unit(self) -> str:
        return f"{self.name}.service"


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter served by every instance of a pool, as vLLM lists it in /v1/models."""

    name: str  # what clients send as "model"
    path: str  # vLLM's `root`
    parent: str  # vLLM's `parent`: base_model_name, else the model's first served name


@dataclass(frozen=True)
class HashKey:
    """The recipe of the key a pool's hash upstream picks a backend by (`_key_maps` makes its nginx maps).

    shape: the body with its free-text fields cut out. prefix: the model, then
    the first `prefix_bytes` of the conversation's first message (or prompt) and
    of its first user message: one conversation keeps one key over all its
    turns, and conversations that share only a system prompt still differ.
    session: the `session_header` (when set), else the body's `session_field`,
    else the prefix key.
    """

    routing: str  # shape | prefix | session
    consistent: bool  # ring hashing: a full or failed backend's keys go to the next one on the ring
    model: str  # literal part of the key: vLLM's prefix cache is per model
    prefix_bytes: int
    session_header: str | None = None  # nginx variable of the header, e.g. http_x_session_id
    session_field: str | None = None  # JSON field of the body, "user" in the OpenAI API
    # With LoRA adapters, base and adapters share the pool but not their caches: the key
    # then takes the request's "model" instead of the literal model name.
    by_request_model: bool = False


@dataclass(frozen=True)
class Pool:
    """The nginx upstreams of one model."""

    model: str
    upstream: str  # least_conn pool with caps and backup overflow
    affinity_upstream: str | None  # hash upstream tried first (routing shape, prefix or session)
    hash_key: HashKey | None  # its key; None with least_conn
    servers: tuple[str, ...]  # host:port, one per backend instance
    cap: int  # max_conns per server = the model's max batch size
    overflow_cap: int | None  # max_conns of backup entries; None = no cap; 0 = no backup entries
    max_fails: int  # max_fails of the capped entries (passive health check: one failure marks a server failed)
    backup_max_fails: int  # max_fails of the backup entries (0: never marked failed)
    # Every backend once, never marked failed (max_fails=0), tried when the pool has no live
    # server; None in bounded mode (--max-queue), where its own max_conns counters would break the bound.
    last_resort_upstream: str | None
    served_names: tuple[str, ...]
    source: str
    keepalive: int  # idle connections each nginx worker keeps to this pool
    keepalive_timeout: int  # seconds an idle connection to a backend is kept
    adapters: tuple[Adapter, ...] = ()  # LoRA adapters: their names route to this pool too
    lora: bool = False  # instances run with --enable-lora (the load/unload endpoints exist)
    # Servers rendered `down` (no new requests): only while `vfgen apply` drains,
    # restarts or starts them; a normal plan has none.
    down: tuple[str, ...] = ()

    @property
    def route_names(self) -> tuple[str, ...]:
        """Every name nginx sends to this pool: served names and aliases, then adapters."""
        return self.served_names + tuple(a.name for a in self.adapters)


@dataclass(frozen=True)
class Exporter:
    """Debian's prometheus-nginx-exporter reading the dispatcher's stub_status, all on loopback."""

    unit: str  # systemd unit name
    status_listen: str  # nginx's loopback-only stub_status server
    scrape_uri: str  # -nginx.scrape-uri
    listen: str  # -web.listen-address
    target: str  # host:port Prometheus scrapes
    # No const labels: the targets file gives the deployment label (a scraped one would clash with it).
    argv: tuple[str, ...] = ()  # its ExecStart


@dataclass(frozen=True)
class Monitoring:
    """Everything Prometheus and the nginx access log need, as plain data."""

    alerts: Alerts  # thresholds, validated by config
    rules_path: str  # relative to the output root
    targets_path: str
    group: str  # rule group name
    exporter: Exporter | None  # None without a dispatcher or without nginx_exporter
    access_log_path: str | None  # None: nginx.conf's access log (the `default` format)
    log_format: str  # nginx log_format name of the JSON log
    targets: tuple[dict, ...] = ()  # file_sd groups of the vLLM instances
    dispatcher_target: dict | None = None  # the exporter's group, on the dispatcher host only
    rules: tuple[dict, ...] = ()  # alert rules: alert, expr, for, severity, summary, description


@dataclass(frozen=True)
class ServedModel:
    """One entry of the dispatcher's /v1/models (and its /v1/models/{id})."""

    id: str
    root: str  # the model source (an adapter's path), as vLLM reports it
    max_model_len: int | None  # --max-model-len, else what vLLM derives from a local config.json
    upstream: str  # where requests naming it go first
    parent: str | None = None  # a LoRA adapter's base model name


@dataclass(frozen=True)
class ModelRouting:
    """How nginx finds the top-level "model" of a body and which upstream serves it.

    nginx evaluates the maps in this order: `body` (key, value) pairs on
    $request_body, the exact key "" (no body in memory) first, then the
    regexes in order, `unreadable` when none matches or PCRE fails at its
    limits; then `routes` (regex over "METHOD:MODEL", upstream), first match
    wins, `unknown` when none does. The markers start with '"', which a
    captured raw JSON string can never do. One map on the body, not two: each
    map lookup copies and hashes the whole value before its regexes run.
    """

    capture: str  # named group holding the raw string value of "model"
    body: tuple[tuple[str, str], ...]
    unreadable: str  # map default: not a JSON object, nested too deep, or over PCRE's limits
    ambiguous: str  # top-level "model" duplicated, not a string, or broken JSON after it
    routes: tuple[tuple[str, str], ...]
    unknown: str  # upstream of the unknown-model answer
    errors: tuple[tuple[str, str], ...]  # (upstream, answer) of every error route

    @property
    def markers(self) -> tuple[str, ...]:
        """Values of the body map that are not a model name."""
        return tuple(value for _, value in self.body if value.startswith('"')) + (self.unreadable,)


@dataclass(frozen=True)
class GpuUsage:
    gpu: str
    instances: tuple[str, ...]
    shares: tuple[str, ...]
    total: str


@dataclass(frozen=True)
class MemoryFit:
    """The memory estimate of one model whose directory is local (see vfgen.memory)."""

    model: str
    gpu_bytes: int
    need_bytes: int  # per instance and GPU, full workload
    min_bytes: int  # weights + overhead + one full-length sequence
    recommended_share: float
    instances_that_fit: int
    notes: tuple[str, ...]
    weight_bytes: int = 0  # per GPU
    kv_bytes_per_token: int = 0  # per GPU
    kv_bytes_per_sequence: int = 0  # one max_model_len-token sequence, per GPU
    max_model_len: int = 0  # the context length estimated


@dataclass(frozen=True)
class Plan:
    deployment: Deployment
    instances: tuple[Instance, ...]
    pools: tuple[Pool, ...]
    gpus: tuple[GpuUsage, ...]
    dispatcher: bool  # render nginx at all (not for a single instance on the user port)
    dispatcher_url: str | None  # where local probes reach nginx (None without a dispatcher)
    route_by_model: bool  # inspect the JSON body for "model" (several models)
    target: str  # systemd target grouping every instance
    nginx_prefix: str  # prefix of nginx variables, which allow only [A-Za-z0-9_]
    # Prefix of regex named captures (they become nginx variables too): PCRE2 allows
    # 32 characters per name, so a hash of the deployment name instead of the name.
    capture_prefix: str
    stop_timeout: int  # TimeoutStopSec / stopwaitsecs: vLLM's drain time plus a margin to exit
    monitoring: Monitoring
    memory: tuple[MemoryFit, ...] = ()
    warnings: tuple[str, ...] = ()
    served_models: tuple[ServedModel, ...] = ()
    routing: ModelRouting | None = None  # None: one model, no body inspection
    # nginx keeps a chunked body's framing in its buffer until the body is complete, so
    # 1-byte chunks ("1\r\nX\r\n") take 6 bytes each; a smaller buffer sends the
    # body to a temp file, where $request_body cannot see it (seen with nginx 1.22).
    body_buffer_bytes: int = 0
    instance_urls: tuple[str, ...] = ()  # every backend as nginx reaches it, for answers that point to them
    files: tuple["OutputFile", ...] = ()  # every file the plan renders, in a stable order
    # The dispatcher's conf as data; None for a single instance, or until `with_nginx`
    # (build_plan(nginx=False): a GPU host, which has no API key file).
    nginx: "Nginx | None" = None
    lock_runtime_dir: str | None = None  # systemd RuntimeDirectory= of the lock dir (under /run), else ReadWritePaths=
    supervisor_user: str | None = None  # supervisord's user= (None: root, supervisord's own user)

    def instances_of(self, model: str) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.model == model)


@dataclass(frozen=True)
class OutputFile:
    """One file the plan renders: what it is, where it goes (relative to the output root), its mode."""

    kind: str  # nginx | nginx-exporter | systemd | supervisord | prometheus | prometheus-rules
    role: str  # which render function writes it: nginx, api-keys, nginx-exporter, unit, target, supervisord, ...
    path: str
    mode: int = 0o644  # 0600: the API keys map
    instance: str | None = None  # the instance of a unit


DISPATCHER_KINDS = ("nginx", "nginx-exporter")  # what a load-balancer host installs


def _in_nginx_dir(d: Deployment, path: str) -> str:
    """A path under nginx_dir, relative to the output root."""
    return f"{d.nginx_dir.rstrip('/')}/{path}".lstrip("/")


def _api_keys_path(d: Deployment) -> str:
    """The keys map on the dispatcher host (the conf includes it by its absolute path)."""
    return _in_nginx_dir(d, f"vfgen/{d.name}-api-keys.map")


def _files(d: Deployment, instances: list[Instance], target: str, mon: "Monitoring", single: bool) -> tuple[OutputFile, ...]:
    out = []
    if not single:
        out.append(OutputFile("nginx", "nginx", _in_nginx_dir(d, f"conf.d/{d.name}.conf")))
        if d.api_key_file:
            # Mode 0600: included by the world-readable conf, which never holds a key.
            out.append(OutputFile("nginx", "api-keys", _api_keys_path(d), mode=0o600))
        if mon.exporter is not None:
            out.append(OutputFile("nginx-exporter", "nginx-exporter", f"etc/systemd/system/{mon.exporter.unit}"))
    out += [OutputFile("systemd", "unit", f"etc/systemd/system/{i.unit}", instance=i.name) for i in instances]
    out.append(OutputFile("systemd", "target", f"etc/systemd/system/{target}"))
    out.append(OutputFile("supervisord", "supervisord", f"etc/supervisor/conf.d/{d.name}.conf"))
    out.append(OutputFile("prometheus", "prometheus", mon.targets_path))
    out.append(OutputFile("prometheus-rules", "prometheus-rules", mon.rules_path))
    return tuple(out)


def local_model_dir(source: str) -> Path | None:
    path = Path(source)
    return path if (path / "config.json").is_file() else None


def build_plan(d: Deployment, gpu_bytes: int | None = None, *, nginx: bool = True) -> Plan:
    """`gpu_bytes` (memory of each GPU) enables the checks against local model configs.

    nginx=False leaves the dispatcher's part out (Plan.nginx stays None), so the API key
    file is not read: a GPU host plans and renders its backends without it.
    """
    placements = _place(d)
    shares = _memory_shares(d, placements)
    memory, warnings = _memory_fits(d, placements, shares, gpu_bytes or d.gpu_memory_bytes)
    warnings = d.warnings + warnings + _secret_warnings(d)
    total = len(placements)
    single = d.single_instance
    ports = _ports(d, total, single)

    instances: list[Instance] = []
    last_on_gpu: dict[str, Instance] = {}
    on_gpu: dict[str, list[int]] = {}
    for n, (model, index, gpus) in enumerate(placements):
        for g in gpus:
            on_gpu.setdefault(g, []).append(n)
    for n, (model, index, gpus) in enumerate(placements):
        host = d.listen if single else d.host
        before = sorted({last_on_gpu[g].name: last_on_gpu[g] for g in gpus if g in last_on_gpu}.items())
        sharing = len({m for g in gpus for m in on_gpu[g]}) - 1  # other instances on its GPUs
        # Each of them may hold the lock once for its whole start, plus the time a start that
        # timed out takes to free the GPU. flock is not FIFO, so no instance is ever "first".
        lock_timeout = d.timeouts.lock if d.timeouts.lock is not None else sharing * (d.timeouts.start + LOCK_RELEASE_MARGIN_S)
        inst = Instance(
            model=model.key,
            index=index,
            name=f"{d.name}-{model.key}-{index}",
            host=host,
            port=ports[n],
            gpus=gpus,
            memory_share=f"{shares[n]:.2f}",
            start_order=(order := 1 + max((b.start_order for _, b in before), default=0)),
            supervisor_priority=100 + order,
            after=tuple(name for name, _ in before),
            after_urls=tuple(b.url for _, b in before),
            locks=tuple(f"{d.lock_dir}/gpu-{g}.lock" for g in sorted(gpus, key=int)),
            url=f"http://{_connect_host(host)}:{ports[n]}",
            served_name=model.served_names[0],
            env=_env(d, model, index, gpus),
            env_file=model.env_file,
            vllm_argv=_vllm_argv(d, model, host, ports[n], f"{shares[n]:.2f}"),
            start_timeout=d.timeouts.start,
            lock_timeout=lock_timeout,
            health_timeout=lock_timeout + d.timeouts.start,
            unit_start_timeout=lock_timeout + d.timeouts.start + UNIT_START_MARGIN_S,
        )
        inst = replace(inst, log_file=f"{d.log_dir}/{inst.name}.log", exec_start=launch_argv(d, inst, supervisord=False),
                       exec_start_post=(d.vfgen_bin, "health", "wait", inst.url, "--model", inst.served_name,
                                        "--timeout", str(inst.health_timeout)),
                       supervisor_command=launch_argv(d, inst, supervisord=True))
        instances.append(inst)
        for g in gpus:
            last_on_gpu[g] = inst

    pools = tuple(_pool(d, m, [i for i in instances if i.model == m.key]) for m in d.models)
    digest = hashlib.sha256(d.name.encode()).hexdigest()[:10]
    prefix = "vfgen_" + d.name.replace("-", "_")
    if len(prefix) > NGINX_PREFIX_MAX:
        prefix = f"vfgen_{digest}"
    capture_prefix = f"vf{digest}"
    route_by_model = len(d.models) > 1
    routing = _model_routing(d, pools, capture_prefix) if route_by_model else None
    _refuse_upstream_clashes(d, pools, routing)
    monitoring = _monitoring(d, single, ports, instances)
    plan = Plan(
        deployment=d,
        instances=tuple(instances),
        pools=pools,
        gpus=_gpu_usage(placements, shares, instances),
        dispatcher=not single,
        dispatcher_url=None if single else f"http://{_connect_host(d.listen)}:{d.port}",
        route_by_model=route_by_model,
        target=f"{d.name}.target",
        nginx_prefix=prefix,
        capture_prefix=capture_prefix,
        stop_timeout=d.timeouts.shutdown + 15,
        monitoring=monitoring,
        memory=memory,
        warnings=warnings,
        served_models=_served_models(d, pools),
        routing=routing,
        body_buffer_bytes=CHUNK_FRAMING_FACTOR * nginx_size_bytes(d.max_body_size) + CHUNK_FRAMING_SLACK,
        instance_urls=tuple(f"http://{server}" for pool in pools for server in pool.servers),
        files=_files(d, instances, f"{d.name}.target", monitoring, single),
        lock_runtime_dir=d.lock_dir[len("/run/"):] if d.lock_dir.startswith("/run/") else None,
        supervisor_user=None if d.user == "root" else d.user,
    )
    return with_nginx(plan) if nginx else plan


def launch_argv(d: Deployment, inst: Instance, *, supervisord: bool) -> tuple[str, ...]:
    """The launcher's command line. Under supervisord it also orders the start (--after)
    and sets the environment, which systemd does itself (After=, Environment=)."""
    argv = [d.vfgen_bin, "launch"]
    for lock in inst.locks:
        argv += ["--lock", lock]
    if supervisord:
        for url in inst.after_urls:
            argv += ["--after", url]
    argv += ["--health-url", inst.url, "--served-model-name", inst.served_name, "--start-timeout", str(inst.start_timeout),
             "--lock-timeout", str(inst.lock_timeout)]
    if supervisord:
        for key, value in inst.env:
            argv += ["--env", f"{key}={value}"]
        if inst.env_file:
            argv += ["--env-file", inst.env_file]
    return (*argv, "--", *inst.vllm_argv)


# Endpoints vLLM 0.32 serves about one instance (its /openapi.json is saved in
# tests/fixtures/vllm-openapi): through the dispatcher they get a JSON 404 naming each instance.
PER_INSTANCE_PATHS = (
    ("/metrics", "is the metrics of one vLLM instance"),
    ("/load", "is the load of one vLLM instance"),
    ("/kv_event_sources", "lists the KV event sources of one vLLM instance"),
    ("/is_scaling_elastic_ep", "asks one vLLM instance about its scaling"),
    ("/scale_elastic_ep", "scales one vLLM instance"),
)
# Answered by any backend (the same vLLM build everywhere).
ANY_BACKEND_PATHS = ("/version",)
# Bytes of chunked framing per body byte at worst (1-byte chunks), and room for the
# last chunk, trailers and what nginx preread with the headers.
CHUNK_FRAMING_FACTOR = 6
CHUNK_FRAMING_SLACK = 4096


def _served_models(d: Deployment, pools: tuple[Pool, ...]) -> tuple[ServedModel, ...]:
    out = []
    for m, pool in zip(d.models, pools):
        length = m.max_model_len or _declared_max_model_len(m)
        first = pool.affinity_upstream or pool.upstream
        # vLLM's order: the base model's names, then its adapters (which carry no max_model_len).
        out += [ServedModel(name, m.source, length, first) for name in pool.served_names]
        out += [ServedModel(a.name, a.path, None, first, a.parent) for a in pool.adapters]
    return tuple(out)


def _declared_max_model_len(m: ModelSpec) -> int | None:
    from vfgen import memory

    model_dir = local_model_dir(m.source)
    if model_dir is None:
        return None
    try:
        return memory.declared_max_model_len(model_dir)
    except ConfigError:
        return None  # an unreadable config.json is reported by the memory checks, not here


def _refuse_upstream_clashes(d: Deployment, pools: tuple[Pool, ...], routing: ModelRouting | None) -> None:
    """Every nginx upstream name once: a model keyed `health` or `x-affinity` would reuse one
    vfgen derives for something else, and nginx refuses a duplicate upstream."""
    owners: dict[str, str] = {f"{d.name}-health": "the dispatcher's /health"}
    for up, _ in routing.errors if routing else ():
        owners[up] = "an error answer"
    for pool in pools:
        for name in (pool.upstream, pool.affinity_upstream, pool.last_resort_upstream):
            if name is None:
                continue
            if name in owners:
                raise PlanError(f"model key {pool.model!r}: its nginx upstream {name!r} is already the upstream of "
                                f"{owners[name]}; give the model another `name`")
            owners[name] = f"model {pool.model!r}"


def _model_routing(d: Deployment, pools: tuple[Pool, ...], capture_prefix: str) -> ModelRouting:
    capture = f"{capture_prefix}_m"
    patterns = jsonpcre.body_patterns(capture)
    unreadable, ambiguous, empty = '"unreadable', '"ambiguous', '"empty'
    unknown, missing = f"{d.name}-unknown-model", f"{d.name}-missing-model"
    unreadable_up, ambiguous_up = f"{d.name}-unreadable-body", f"{d.name}-ambiguous-model"
    routes: list[tuple[str, str]] = []
    default_route = None
    for pool in pools:
        first = pool.affinity_upstream or pool.upstream
        for served in pool.route_names:
            key = f"~^[A-Z]+:{quoting.json_string_pcre(served)}$"
            if not quoting.nginx_regex_fits(key):  # a very long name: the escapes encoders emit only
                key = f"~^[A-Z]+:{quoting.json_string_pcre(served, every_escape=False)}$"
            routes.append((key, first))
            if served == d.default_model:
                default_route = first
    no_model = default_route or missing
    routes += [
        ("~^[A-Z]+:$", no_model),
        ('~^[A-Z]+:"ambiguous$', ambiguous_up),
        ('~^[A-Z]+:"unreadable$', unreadable_up),
        # No body (or, never expected, one nginx kept in a temp file): reads may omit the model.
        ('~^(GET|HEAD|OPTIONS|DELETE):"empty$', no_model),
        ('~^[A-Z]+:"empty$', unreadable_up),
    ]  # anything else names a model nobody serves: `unknown`
    return ModelRouting(
        capture=capture,
        body=(("", empty), (f"~{patterns.model}", f"${capture}"), (f"~{patterns.model_key}", ambiguous),
              (f"~{patterns.no_model}", "")),
        unreadable=unreadable,
        ambiguous=ambiguous,
        routes=tuple(routes),
        unknown=unknown,
        errors=((unknown, "unknown_model"), (missing, "missing_model"), (unreadable_up, "unreadable"),
                (ambiguous_up, "ambiguous")),
    )


def _monitoring(d: Deployment, single: bool, ports: list[int], instances: list[Instance]) -> Monitoring:
    exporter = None
    if d.nginx_exporter and not single:
        # Loopback only, whatever `listen` is: Prometheus runs on the host it watches, and
        # no TLS, API key or rate limit of the client-facing server gets in the way.
        status, port = d.nginx_status_port, d.nginx_exporter_port
        for name, value in (("nginx_status_port", status), ("nginx_exporter_port", port)):
            if value == d.port:
                raise PlanError(f"{name}={value} is the dispatcher's port; choose another")
            if not d.upstream_hosts and value in ports:
                raise PlanError(f"{name}={value} lies inside the backend port range {ports[0]}-{ports[-1]}; choose another")
        if status == port:
            raise PlanError(f"nginx_status_port={status} is also nginx_exporter_port; choose two ports")
        exporter = Exporter(
            unit=f"{d.name}-nginx-exporter.service",
            status_listen=f"127.0.0.1:{status}",
            scrape_uri=f"http://127.0.0.1:{status}/stub_status",
            listen=f"127.0.0.1:{port}",
            target=f"127.0.0.1:{port}",
        )
        exporter = replace(exporter, argv=(NGINX_EXPORTER_BIN, f"-nginx.scrape-uri={exporter.scrape_uri}",
                                           f"-web.listen-address={exporter.listen}"))
    return Monitoring(
        alerts=d.alerts,
        rules_path=f"etc/prometheus/rules/{d.name}.yml",
        targets_path=f"etc/prometheus/file_sd/{d.name}.json",
        group=f"vfgen-{d.name}",
        exporter=exporter,
        access_log_path=(d.access_log_path or f"/var/log/nginx/{d.name}.access.json") if d.access_log == "json" else None,
        log_format="vfgen_" + d.name.replace("-", "_") + "_json",
        targets=_targets(d, instances),
        dispatcher_target=None if exporter is None else {
            "targets": [exporter.target],
            "labels": {"deployment": d.name, "component": "dispatcher", "instance_name": f"{d.name}-dispatcher"},
        },
        rules=_rules(d, d.alerts, exporter),
    )


def _place(d: Deployment) -> list[tuple[ModelSpec, int, tuple[str, ...]]]:
    """Instance k of a model takes the k-th group of tensor_parallel_size GPUs, round robin."""
    out = []
    for m in d.models:
        tp = m.tensor_parallel_size
        groups = [m.gpus[i : i + tp] for i in range(0, len(m.gpus), tp)]
        for k in range(m.instances):
            out.append((m, k, tuple(groups[k % len(groups)])))
    return out


def _floor2(x: float) -> float:
    # Round down so shares on a GPU never add up past the budget.
    return math.floor(x * 100 + 1e-9) / 100


def _memory_shares(d: Deployment, placements) -> list[float]:
    explicit: dict[str, float] = {}
    auto_count: dict[str, int] = {}
    for m, _, gpus in placements:
        for g in gpus:
            if m.memory_share is None:
                auto_count[g] = auto_count.get(g, 0) + 1
            else:
                explicit[g] = explicit.get(g, 0.0) + m.memory_share
    for g, used in explicit.items():
        if used > d.memory_budget + 1e-9:
            raise PlanError(_budget_error(d, placements, f"GPU {g}: explicit gpu-memory-utilization shares add up to {used:.2f}, over the budget {d.memory_budget:.2f}"))
    auto_share = {g: _floor2((d.memory_budget - explicit.get(g, 0.0)) / c) for g, c in auto_count.items()}
    shares = []
    for m, k, gpus in placements:
        share = m.memory_share if m.memory_share is not None else min(auto_share[g] for g in gpus)
        if share < d.min_memory_share - 1e-9:
            raise PlanError(_budget_error(
                d, placements,
                f"{m.key} instance {k} would get gpu-memory-utilization {share:.2f}, below the floor {d.min_memory_share:.2f} (min_memory_share, docs/memory.md); "
                "use fewer instances, more GPUs, or set memory shares explicitly",
            ))
        shares.append(share)
    return shares


def _memory_fits(d: Deployment, placements, shares, gpu_bytes: int | None):
    """Estimate local models; an auto share too small to start is an error, an explicit one a warning."""
    from vfgen import memory
    from vfgen.errors import ConfigError

    local = [(m, local_model_dir(m.source)) for m in d.models]
    warnings = [f"{m.key}: model path {m.source} does not exist on this machine; vLLM will fail to start unless "
                "it exists on the GPU host" for m, found in local if found is None and m.source.startswith("/")
                and not Path(m.source).exists()]
    local = [(m, found) for m, found in local if found is not None]
    if local and not gpu_bytes:
        return (), tuple(warnings) + ("GPU size unknown: memory not checked; pass --gpu-memory (e.g. 80GiB)",)
    fits = []
    for m, model_dir in local:
        try:
            mem = memory.estimate(
                model_dir, dtype=m.dtype or "auto", max_num_seqs=m.max_batch_size, max_model_len=m.context_length,
                tensor_parallel_size=m.tensor_parallel_size, enforce_eager=m.enforce_eager,
                pooling=True if _runner_is_pooling(m.extra_args) else None,
                quantization=m.quantization, kv_cache_dtype=m.kv_cache_dtype,
            )
        except ConfigError as exc:
            raise PlanError(f"{m.key}: {exc}") from None
        if m.enable_lora:
            mem = _with_lora(memory, mem, model_dir, m)
        fit = memory.instances_that_fit(mem, gpu_bytes, d.memory_budget)
        fits.append(MemoryFit(m.key, gpu_bytes, mem.total_bytes, mem.min_bytes, memory.recommend_share(mem, gpu_bytes),
                              fit, mem.notes, mem.weight_bytes, mem.kv_bytes_per_token, mem.kv_bytes_per_sequence,
                              mem.max_model_len))
        share = min(s for (pm, _, _), s in zip(placements, shares) if pm is m)
        given = frozenset(["--max-model-len"] * bool(m.context_length) + ["--kv-cache-dtype"] * bool(m.kv_cache_dtype))
        problem = memory.share_warning(mem, gpu_bytes, share, given)
        if problem and m.memory_share is None:
            raise PlanError(_budget_error(d, placements, f"{m.key}: the auto share {share:.2f} cannot start it: {problem}"))
        if problem:
            warnings.append(f"{m.key}: {problem}")
            continue
        per_gpu = max(sum(1 for pm, _, gpus in placements if pm is m and g in gpus) for g in m.gpus)
        if per_gpu > fit:
            warnings.append(f"{m.key}: {per_gpu} instance(s) planned per GPU, but only {fit} fit with room for the full workload "
                            f"({m.max_batch_size} sequences of {mem.max_model_len} tokens at share "
                            f"{memory.recommend_share(mem, gpu_bytes):.2f}); each gets {share:.2f}, so vLLM will run "
                            "fewer sequences at once than max_batch_size")
    return tuple(fits), tuple(warnings)


def _with_lora(memory, mem, model_dir: Path, m: ModelSpec):
    extra, notes = memory.lora_bytes(
        model_dir, dtype=m.dtype or "auto", max_lora_rank=m.max_lora_rank or DEFAULT_MAX_LORA_RANK,
        max_loras=m.max_loras or DEFAULT_MAX_LORAS, tensor_parallel_size=m.tensor_parallel_size,
        adapter_bytes=tuple(a.weight_bytes for a in m.lora_modules if a.weight_bytes),
    )
    return replace(mem, overhead_bytes=mem.overhead_bytes + extra, total_bytes=mem.total_bytes + extra,
                   min_bytes=mem.min_bytes + extra, notes=mem.notes + notes)


def _runner_is_pooling(args: tuple[str, ...]) -> bool:
    return "--runner=pooling" in args or any(a == "--runner" and b == "pooling" for a, b in zip(args, args[1:]))


def _budget_error(d: Deployment, placements, headline: str) -> str:
    rows = {}
    for m, k, gpus in placements:
        for g in gpus:
            share = "auto" if m.memory_share is None else f"{m.memory_share:.2f}"
            rows.setdefault(g, []).append(f"{m.key}/{k}={share}")
    table = "\n".join(f"  GPU {g}: {', '.join(r)}" for g, r in sorted(rows.items(), key=lambda kv: int(kv[0])))
    return f"{headline}\nper-GPU placement (budget {d.memory_budget:.2f} per GPU):\n{table}"


def _ports(d: Deployment, total: int, single: bool) -> list[int]:
    if single:
        return [d.port]
    last = d.port_start + total - 1
    if last > 65535:
        raise PlanError(f"port_start={d.port_start}: {total} backend ports would run past 65535 (to {last})")
    if not d.upstream_hosts and d.port_start <= d.port <= last:
        raise PlanError(f"port={d.port} lies inside the backend port range {d.port_start}-{last}; move --port or --port-start")
    return list(range(d.port_start, last + 1))


def _connect_host(host: str) -> str:
    """Where to connect to reach something bound on `host`."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.is_unspecified:
        return "127.0.0.1" if ip.version == 4 else "[::1]"
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _env(d: Deployment, m: ModelSpec, index: int, gpus: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    env = [("CUDA_VISIBLE_DEVICES", ",".join(gpus))]
    if d.allow_runtime_lora_updating and m.enable_lora:
        # Registers /v1/load_lora_adapter and /v1/unload_lora_adapter on the instance.
        env.append(("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True"))
    env += list(m.env)
    if m.instance_env:
        env += list(m.instance_env[index])
    return tuple(env)


_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|(^|_)(API_)?KEY$", re.IGNORECASE)


def _secret_warnings(d: Deployment) -> tuple[str, ...]:
    keys = sorted({k for m in d.models for k, _ in (*m.env, *(p for e in m.instance_env for p in e))
                   if _SECRET_NAME.search(k)})
    if not keys:
        return ()
    return (f"env {', '.join(keys)} look{'s' if len(keys) == 1 else ''} like a secret; env values are written "
            "into the rendered unit or supervisord files (world-readable) and the supervisord command lines. "
            "Put secrets in an env_file (--env-file) instead.",)


def _vllm_argv(d: Deployment, m: ModelSpec, host: str, port: int, share: str) -> tuple[str, ...]:
    argv = [d.vllm_bin, "serve", m.source, "--host", host, "--port", str(port), "--served-model-name", *m.served_names,
            "--max-num-seqs", str(m.max_batch_size), "--gpu-memory-utilization", share,
            "--shutdown-timeout", str(d.timeouts.shutdown)]
    if m.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(m.tensor_parallel_size)]
    if m.dtype:
        argv += ["--dtype", m.dtype]
    if m.enforce_eager:
        argv.append("--enforce-eager")
    if m.io_processor_plugin:
        argv += ["--io-processor-plugin", m.io_processor_plugin]
    if m.max_model_len:
        argv += ["--max-model-len", str(m.max_model_len)]
    return tuple(argv) + _lora_argv(m) + m.extra_args


def _lora_argv(m: ModelSpec) -> tuple[str, ...]:
    """vLLM's LoRA flags: the same on every instance, so each serves every adapter."""
    if not m.enable_lora:
        return ()
    argv = ["--enable-lora"]
    if m.lora_modules:
        argv.append("--lora-modules")
        for a in m.lora_modules:
            # vLLM reads an item with '=' and no ',' as NAME=PATH (split at the first '='),
            # anything else as JSON, which also carries base_model_name.
            if a.base_model_name is None and "=" not in a.name and "," not in a.name + a.path:
                argv.append(f"{a.name}={a.path}")
            else:
                item = {"name": a.name, "path": a.path}
                if a.base_model_name is not None:
                    item["base_model_name"] = a.base_model_name
                argv.append(json.dumps(item, ensure_ascii=False))
    for flag, value in (("--max-lora-rank", m.max_lora_rank), ("--max-loras", m.max_loras),
                        ("--max-cpu-loras", m.max_cpu_loras)):
        if value is not None:
            argv += [flag, str(value)]
    return tuple(argv)


def _pool(d: Deployment, m: ModelSpec, instances: list[Instance]) -> Pool:
    hosts = [_connect_host(h) for h in d.upstream_hosts] or [None]
    servers = tuple(f"{h or _connect_host(i.host)}:{i.port}" for h in hosts for i in instances)
    upstream = f"{d.name}-{m.key}"
    return Pool(
        model=m.key,
        upstream=upstream,
        affinity_upstream=f"{upstream}-affinity" if m.routing != "least_conn" else None,
        hash_key=_hash_key(m),
        servers=servers,
        cap=m.max_batch_size,
        overflow_cap=d.max_queue,
        # One failed request (refused connect, 5xx before any byte) takes a server out for
        # fail_timeout: the next request goes elsewhere instead of failing the same way.
        max_fails=1,
        # Bounded overflow has no last-resort pool, so its capped backups must stay usable after
        # an outage marked every server failed: they are never marked failed, and a dead backend
        # costs an overflow request one refused connect (docs/operations.md, Recovery).
        backup_max_fails=1 if d.max_queue is None else 0,
        # '_' cannot occur in a model key or deployment name, so this never names another pool.
        last_resort_upstream=f"{upstream}_last_resort" if d.max_queue is None else None,
        served_names=m.served_names,
        source=m.source,
        # Enough idle connections to reuse one per in-flight request; capped so a
        # large pool cannot exhaust the backends' file descriptors.
        keepalive=min(m.max_batch_size * len(servers), 512),
        # vLLM (uvicorn) closes idle connections after 5 s; nginx drops its own first, so a
        # request is never written to a connection the backend is closing.
        keepalive_timeout=VLLM_IDLE_TIMEOUT_S - 1,
        adapters=tuple(Adapter(a.name, a.path, a.base_model_name or m.served_names[0]) for a in m.lora_modules),
        lora=m.enable_lora,
    )


def _hash_key(m: ModelSpec) -> HashKey | None:
    if m.routing == "least_conn":
        return None
    session = m.routing == "session"
    header = m.session_header.lower().replace("-", "_") if session and m.session_header else None
    return HashKey(
        routing=m.routing,
        # shape keeps plain hashing (its spread is measured in tests/live/test_affinity.py);
        # conversations need the ring, so that a backend's death moves only its own keys.
        consistent=m.routing != "shape",
        model=m.key,
        prefix_bytes=m.prefix_bytes,
        session_header=f"http_{header}" if header else None,
        session_field="user" if session else None,
        by_request_model=m.enable_lora and m.routing != "shape",
    )


def _gpu_usage(placements, shares, instances) -> tuple[GpuUsage, ...]:
    per: dict[str, list[tuple[str, float]]] = {}
    for (m, k, gpus), share, inst in zip(placements, shares, instances):
        for g in gpus:
            per.setdefault(g, []).append((inst.name, share))
    return tuple(
        GpuUsage(
            gpu=g,
            instances=tuple(n for n, _ in rows),
            shares=tuple(f"{s:.2f}" for _, s in rows),
            total=f"{sum(s for _, s in rows):.2f}",
        )
        for g, rows in sorted(per.items(), key=lambda kv: int(kv[0]))
    )


# --- the nginx dispatcher ----------------------------------------------------------
# Everything render writes into the dispatcher conf, as plain data: names, answers,
# maps, routes. The API key file is read here (config validates it), and only when
# the dispatcher is planned: a GPU host renders its units without it.

# Free-text fields cut out of the affinity shape; one map strips one
# occurrence, and three maps cover typical requests (text + labels, a prompt).
SHAPE_FIELDS = ("text", "input", "prompt", "content", "query")
SHAPE_PASSES = 3
# Prefix and session keys: one regex on the body per request, the first that matches
# wins. A slice is a bounded, possessive repeat of one character class ([^"]): PCRE does
# not unroll it (any bound up to 65535 compiles) and nothing backtracks into it. It ends
# at the JSON string's end or at its first escaped quote, so every turn of a conversation
# gives the same key. `content` may be a string or a list of {"type":"text","text":...}.
_CONTENT = r'"content"\s*:\s*(?:\[\s*\{[^{}]*?"text"\s*:\s*)?"'
_SLICE = r'([^"]{0,<N>}+)'
KEY_REGEXES = (
    # A system (or developer) prompt, then the first user message: conversations that share
    # one system prompt still differ. Found when "role" is written before "content", as SDKs do.
    # The rest of the system string is skipped by possessive runs (a lazy .*? would step
    # byte by byte: measured 2x the CPU); the user message must follow it directly.
    (r'~(?s)"messages"\s*:\s*\[\s*\{\s*"role"\s*:\s*"(?:system|developer)"\s*,\s*' + _CONTENT + _SLICE
     + r'(?:(?:(?<=\\).)?(?:[^"\\]++|\\.)*+"(?:\s*\}\s*\])?\s*\}\s*,\s*\{\s*"role"\s*:\s*"user"\s*,\s*'
     + _CONTENT + _SLICE + ")?", "$1|$2"),
    # Any other first message (the user's own, or another key order).
    (r'~(?s)"messages"\s*:\s*\[\s*\{[^{}]*?' + _CONTENT + _SLICE, "$1"),
    (r'~(?s)"prompt"\s*:\s*(?:\[\s*)?"' + _SLICE, "$1"),
    (r'~(?s)"prompt"\s*:\s*\[\s*([0-9][0-9,\s]{0,<N>}+)', "$1"),  # token ids
)
# The OpenAI `user` field (session routing).
FIELD_REGEX = r'~(?s)"<FIELD>"\s*:\s*"([^"]{1,<N>}+)'
# Whole-string UTF-8 validity (RFC 3629, no surrogates or overlongs), byte by byte: nginx's
# escape=json passes bytes >= 0x80 through unchanged, so a client value logged as it came
# could make the line invalid UTF-8.
VALID_UTF8_REGEX = (
    r"~^(?:[\x00-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    r"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})*$"
)
# A placeholder number in JSON that quoting.nginx_json replaces by the request-time variable.
CREATED = -1796

Parts = tuple[tuple[str, str], ...]  # quoting.nginx_vars parts: ("text", "a|"), ("var", "name"), ("capture", "1")


@dataclass(frozen=True)
class Answer:
    """A JSON answer nginx gives itself: status code and body (render writes it with nginx_json)."""

    code: int
    body: dict


@dataclass(frozen=True)
class ShapeMap:
    """One pass that cuts a free-text value out of the body: `target` = `source` without it."""

    source: str  # nginx variable name
    target: str
    regex: str
    replacement: Parts


@dataclass(frozen=True)
class KeyMap:
    """A map that builds part of a prefix/session key; `entries` are (regex or "", value) pairs."""

    comment: str
    source: str  # nginx variable name
    target: str
    default: Parts
    entries: tuple[tuple[str, Parts], ...]


@dataclass(frozen=True)
class Nginx:
    """The dispatcher conf (and its API keys map) as plain data."""

    listen: str  # the `listen` address:port ([v6]:port)
    health_upstream: str  # every backend once, for /health, /ping and /version
    error_upstreams: tuple[str, ...]  # upstreams of the error routes (one `down` server each)
    default_route: str | None  # one model: the upstream every request goes to first
    answers: dict[str, Answer]  # nginx's own JSON answers, by what they answer
    fallback_answers: tuple[tuple[str, Answer], ...]  # (error route upstream, its answer) in @fallback
    plain_errors: tuple[Answer, ...]  # error_page of every location, one named location each
    per_instance: tuple[tuple[str, Answer], ...]  # vLLM paths about one instance: a 404 naming each
    stateful: Answer  # /v1/responses/{id}: lives in one unknown instance
    any_backend_paths: tuple[str, ...]
    models_list: dict | None  # /v1/models (several models); `created` is CREATED
    model_cards: tuple[tuple[str, dict], ...]  # (regex on $uri, card) of /v1/models/{id}
    json_numbers: dict[int, str]  # placeholder number -> nginx variable holding it per request
    shape_maps: tuple[ShapeMap, ...]
    key_maps: tuple[KeyMap, ...]
    hash_keys: dict[str, Parts]  # pool model -> its hash upstream's key
    lora: bool  # some pool serves LoRA: refuse the runtime load/unload endpoints
    last_resort_after_overflow: bool  # some affinity route falls back twice
    log_fields: tuple[tuple[str, str], ...]  # JSON access log: (key, nginx variable name)
    valid_utf8: str
    api_keys_path: str | None  # absolute path of the keys map (None: no api_key_file)
    api_keys: tuple[str, ...] = ()  # read from api_key_file, validated by config


def with_nginx(plan: "Plan") -> "Plan":
    """The plan with its dispatcher part: the only step that reads the API key file."""
    if not plan.dispatcher or plan.nginx is not None:
        return plan
    return replace(plan, nginx=_nginx(plan))


def _listen(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _nginx(plan: "Plan") -> Nginx:
    d = plan.deployment
    routing = plan.routing
    answers = _answers(plan)
    return Nginx(
        listen=_listen(d.listen, d.port),
        health_upstream=f"{d.name}-health",
        error_upstreams=tuple(up for up, _ in routing.errors) if routing else (),
        default_route=None if routing else (plan.pools[0].affinity_upstream or plan.pools[0].upstream),
        answers=answers,
        fallback_answers=tuple((up, answers[kind]) for up, kind in routing.errors) if routing else (),
        plain_errors=_plain_errors(d, answers),
        per_instance=tuple(
            (path, _error(404, "NotFoundError", f"{path} {why}; the dispatcher has no single answer. Ask each vLLM instance: "
                          + ", ".join(url + path for url in plan.instance_urls)
                          + (" (nginx's own counters: /nginx_status, from localhost)" if path == "/metrics" else "") + "."))
            for path, why in PER_INSTANCE_PATHS
        ),
        stateful=_error(404, "NotFoundError", "Stored responses live in the one vLLM instance that created them, and this request "
                        f"does not say which; the dispatcher cannot route it. Instances: {', '.join(plan.instance_urls)}."),
        any_backend_paths=ANY_BACKEND_PATHS,
        # `created` is the time of the request, as vLLM answers it: the rendered file stays
        # the same on every render, and the number moves like an instance's.
        models_list={"object": "list", "data": [_model_card(m) for m in plan.served_models]} if plan.route_by_model else None,
        model_cards=tuple((f"~^/v1/models/{quoting.pcre_literal(m.id)}$", _model_card(m)) for m in plan.served_models)
        if plan.route_by_model else (),
        json_numbers={CREATED: f"{plan.nginx_prefix}_now"},
        shape_maps=_shape_maps(plan),
        key_maps=_key_maps(plan),
        hash_keys=_hash_keys(plan),
        lora=any(pool.lora for pool in plan.pools),
        last_resort_after_overflow=any(pool.affinity_upstream and pool.last_resort_upstream for pool in plan.pools),
        log_fields=_log_fields(plan),
        valid_utf8=VALID_UTF8_REGEX,
        api_keys_path="/" + _api_keys_path(d) if d.api_key_file else None,
        api_keys=read_api_keys(d) if d.api_key_file else (),
    )


def _error(code: int, kind: str, message: str, param: str | None = None) -> Answer:
    return Answer(code, {"error": {"message": message, "type": kind, "param": param, "code": code}})


def _answers(plan: "Plan") -> dict[str, Answer]:
    d = plan.deployment
    names = ", ".join(n for pool in plan.pools for n in pool.route_names)
    return {
        "unknown_model": _error(404, "NotFoundError", f"The requested model is not served here. Served models: {names}.", "model"),
        "missing_model": _error(404, "NotFoundError", f'The request names no "model" and this endpoint serves several models: {names}.', "model"),
        "unreadable": _error(400, "BadRequestError", 'The request body could not be inspected for its top-level "model": it is empty, '
                             "not one JSON object, nested too deeply, or too large to inspect.", "model"),
        "ambiguous": _error(400, "BadRequestError", 'The top-level "model" must be one JSON string, given once; this body repeats '
                            "it, gives it another type, or is not valid JSON after it.", "model"),
        "unavailable": _error(503, "ServiceUnavailableError", "No backend can take this request right now (all busy or down). Retry later."),
        "unhealthy": Answer(503, {"status": "unhealthy", "detail": "no backend answers /health"}),
        "timeout": _error(504, "GatewayTimeoutError", "The backend did not answer in time."),
        "e405": _error(405, "MethodNotAllowedError", "Method not allowed."),
        "unauthorized": _error(401, "AuthenticationError", "Missing or invalid API key. Send it as the header `Authorization: Bearer <key>`."),
        "rate_limited": _error(429, "RateLimitError", "Too many requests from this client. Retry later."),
        "lora_runtime": _error(403, "PermissionDeniedError", (
            "Loading or unloading LoRA adapters through the dispatcher is refused: the call would reach one "
            "instance only, and the instances would then disagree. Declare adapters in lora_modules and re-render"
            + (", or run `vfgen lora load` / `vfgen lora unload` on the host, which changes every instance."
               if d.allow_runtime_lora_updating else "."))),
        "no_such_model": _error(404, "NotFoundError", f"The model does not exist. Served models: {names}.", "model"),
    }


def _plain_errors(d: Deployment, answers: dict[str, Answer]) -> tuple[Answer, ...]:
    return (
        _error(400, "BadRequestError", "Malformed request."),
        _error(403, "PermissionDeniedError", "Forbidden."),
        answers["e405"],
        _error(408, "RequestTimeoutError", "The request was not received in time."),
        _error(413, "RequestTooLargeError", f"The request body is larger than the limit of {d.max_body_size}."),
        _error(414, "BadRequestError", "The request URI is too long."),
        _error(500, "InternalServerError", "Internal error in the dispatcher."),
    )


def _model_card(m: ServedModel) -> dict:
    card = {"id": m.id, "object": "model", "created": CREATED, "owned_by": "vllm", "root": m.root, "parent": m.parent}
    if m.max_model_len is not None:
        card["max_model_len"] = m.max_model_len
    card["permission"] = []
    return card


def _shape_maps(plan: "Plan") -> tuple[ShapeMap, ...]:
    if not any(pool.hash_key and pool.hash_key.routing == "shape" for pool in plan.pools):
        return ()
    p = plan.nginx_prefix
    maps = []
    source = "request_body"
    fields = "|".join(SHAPE_FIELDS)
    for n in range(1, SHAPE_PASSES + 1):
        target = f"{p}_shape" if n == SHAPE_PASSES else f"{p}_shape{n}"
        a, b = f"{plan.capture_prefix}_s{n}a", f"{plan.capture_prefix}_s{n}b"
        maps.append(ShapeMap(source, target, rf'~(?s)^(?<{a}>.*)"(?:{fields})"\s*:\s*"(?:[^"\\]|\\.)*"(?<{b}>.*)$',
                             (("var", a), ("var", b))))
        source = target
    return tuple(maps)


def _key_prefix(plan: "Plan", pool: Pool) -> str:
    return f"{plan.nginx_prefix}_{pool.model.replace('-', '_')}"


def _prefix_key(plan: "Plan", pool: Pool) -> Parts:
    """The prefix key's parts: the model (literal, or the request's with LoRA), then the prefix."""
    key, k = pool.hash_key, _key_prefix(plan, pool)
    model: Parts = (("text", f"{key.model}|"),)
    if key.by_request_model:
        model = (("var", f"{plan.nginx_prefix}_model" if plan.route_by_model else f"{k}_model"), ("text", "|"))
    return (*model, ("var", f"{k}_prefix"))


def _key_maps(plan: "Plan") -> tuple[KeyMap, ...]:
    """nginx maps that build each prefix/session key."""
    maps: list[KeyMap] = []
    for pool in plan.pools:
        key = pool.hash_key
        if key is None or key.routing == "shape":
            continue
        k = _key_prefix(plan, pool)
        n = str(key.prefix_bytes)
        maps.append(KeyMap(f"{pool.model}: the first {n} bytes of the first message (or prompt) and of the first user message",
                           "request_body", f"{k}_prefix", (),
                           tuple((regex.replace("<N>", n), _captures(value)) for regex, value in KEY_REGEXES)))
        if key.by_request_model and not plan.route_by_model:
            maps.append(KeyMap(f'{pool.model}: the "model" field (base model or LoRA adapter: caches differ)',
                               "request_body", f"{k}_model", (),
                               ((FIELD_REGEX.replace("<N>", "256").replace("<FIELD>", "model"), (("capture", "1"),)),)))
        if key.routing == "prefix":
            continue
        field = f"{k}_{key.session_field}_field"
        maps.append(KeyMap(f'{pool.model}: the "{key.session_field}" field', "request_body", field, (),
                           ((FIELD_REGEX.replace("<N>", n).replace("<FIELD>", quoting.pcre_literal(key.session_field)),
                             (("capture", "1"),)),)))
        by_field = f"{k}_session" if key.session_header is None else f"{k}_by_field"
        maps.append(KeyMap(f'{pool.model}: session by the "{key.session_field}" field, else by prefix', field, by_field,
                           (("text", "u:"), ("var", field)), (("", (("text", "p:"), *_prefix_key(plan, pool))),)))
        if key.session_header is not None:
            maps.append(KeyMap(f"{pool.model}: session by header, else by field", key.session_header, f"{k}_session",
                               (("text", "h:"), ("var", key.session_header)), (("", (("var", by_field),)),)))
    return tuple(maps)


def _hash_keys(plan: "Plan") -> dict[str, Parts]:
    """Each hash upstream's key, as nginx_vars parts."""
    keys: dict[str, Parts] = {}
    for pool in plan.pools:
        if pool.hash_key is None:
            continue
        if pool.hash_key.routing == "shape":
            keys[pool.model] = (("var", f"{plan.nginx_prefix}_shape"),)
        elif pool.hash_key.routing == "prefix":
            keys[pool.model] = _prefix_key(plan, pool)
        else:
            keys[pool.model] = (("var", f"{_key_prefix(plan, pool)}_session"),)
    return keys


def _captures(value: str) -> Parts:
    """"$1|$2" as nginx_vars parts."""
    parts: list[tuple[str, str]] = []
    for i, piece in enumerate(value.split("|")):
        parts += [("text", "|")] * bool(i) + [("capture", piece.lstrip("$"))]
    return tuple(parts)


# The JSON access log: one object per request. Values nginx takes from the client are
# carried only through `valid UTF-8` maps (see the template), so escape=json output is
# always valid JSON in UTF-8.
def _log_fields(plan: "Plan") -> tuple[tuple[str, str], ...]:
    p = plan.nginx_prefix
    fields = [
        ("time", "time_iso8601"),
        ("request_id", "request_id"),
        ("remote_addr", "remote_addr"),
        ("method", "request_method"),
        ("uri", f"{p}_log_uri"),
        ("user_agent", f"{p}_log_user_agent"),
        ("route", f"{p}_route"),
    ]
    if plan.route_by_model:
        fields.append(("model", f"{p}_log_model"))
    fields += [
        ("status", "status"),
        ("bytes_sent", "bytes_sent"),
        ("body_bytes_sent", "body_bytes_sent"),
        ("request_length", "request_length"),
        ("request_time", "request_time"),
        # Every backend tried, in order ("a, b" after a retry), with each one's status and time.
        ("upstream_addr", "upstream_addr"),
        ("upstream_status", "upstream_status"),
        ("upstream_connect_time", "upstream_connect_time"),
        ("upstream_response_time", "upstream_response_time"),
    ]
    return tuple(fields)


# --- Prometheus --------------------------------------------------------------------

# Debian's prometheus-nginx-exporter package installs it here.
NGINX_EXPORTER_BIN = "/usr/bin/prometheus-nginx-exporter"


def _targets(d: Deployment, instances: list[Instance]) -> tuple[dict, ...]:
    """file_sd groups of the vLLM instances (the dispatcher's exporter is Monitoring.dispatcher_target)."""
    return tuple(
        {
            "targets": [inst.url.split("://", 1)[1]],
            "labels": {"deployment": d.name, "component": "vllm", "model": inst.served_name,
                       "instance_name": inst.name, "gpu": ",".join(inst.gpus)},
        }
        for inst in instances
    )


def _number(value: float) -> str:
    return f"{value:g}"


def _rules(d: Deployment, a: Alerts, exporter: Exporter | None) -> tuple[dict, ...]:
    """The alert rules, each a dict of the rule file's fields (`for` None: fire at once)."""
    deployment = quoting.promql_str(d.name)
    vllm = f"deployment={deployment}, component=\"vllm\""
    nginx = f"deployment={deployment}, component=\"dispatcher\""
    unit = "{{ $labels.instance_name }}.service"
    rules = [
        {
            "alert": "VfgenInstanceDown",
            "expr": f"up{{{vllm}}} == 0",
            "for": a.instance_down_for,
            "severity": "warning",
            "summary": "vLLM instance {{ $labels.instance_name }} (model {{ $labels.model }}, GPU {{ $labels.gpu }}) is down",
            "description": (
                "Prometheus cannot read {{ $labels.instance }}/metrics; nginx sends its requests to the other "
                f"instances. Look at: systemctl status {unit}; journalctl -u {unit} (supervisord: "
                "supervisorctl status {{ $labels.deployment }}:{{ $labels.instance_name }} and its log)."
            ),
        },
        {
            "alert": "VfgenModelDown",
            # One alert per instance, only while no instance of the same model is up.
            "expr": f"(up{{{vllm}}} == 0) unless on (deployment, model) (up{{{vllm}}} == 1)",
            "for": a.model_down_for,
            "severity": "critical",
            "summary": "every instance of model {{ $labels.model }} is down",
            "description": (
                "Clients asking for {{ $labels.model }} get 503. Look at: systemctl status "
                "{{ $labels.deployment }}.target and the journal of each instance (journalctl -u "
                f"{unit}); a GPU fault or a bad model upgrade takes all instances at once."
            ),
        },
        {
            "alert": "VfgenQueueLong",
            "expr": f"vllm:num_requests_waiting{{{vllm}}} > {a.queue_waiting}",
            "for": a.queue_for,
            "severity": "warning",
            "summary": "requests wait in the queue of {{ $labels.instance_name }} (model {{ $labels.model }})",
            "description": (
                f"vLLM's scheduler queue has held more than {a.queue_waiting} waiting request(s) for {a.queue_for} "
                "({{ $value }} now): the model gets more traffic than its instances serve. Look at: "
                "vllm:num_requests_running and vllm:e2e_request_latency_seconds of the model's instances; "
                "add instances, or raise max_batch_size if the KV cache has room."
            ),
        },
        {
            "alert": "VfgenKvCacheHigh",
            "expr": f"vllm:kv_cache_usage_perc{{{vllm}}} > {_number(a.kv_cache_usage)}",
            "for": a.kv_cache_for,
            "severity": "warning",
            "summary": "KV cache of {{ $labels.instance_name }} (model {{ $labels.model }}) is {{ $value | humanizePercentage }} full",
            "description": (
                f"The KV cache has stayed above {_number(a.kv_cache_usage)} for {a.kv_cache_for}: vLLM preempts "
                "and recomputes requests. Look at: rate(vllm:num_preemptions_total[5m]); lower max_batch_size "
                "or max_model_len, or give the instance a larger gpu_memory_utilization share."
            ),
        },
        {
            "alert": "VfgenInstanceRestarting",
            "expr": f"changes(process_start_time_seconds{{{vllm}}}[{a.restarts_window}]) >= {a.restarts}",
            "for": None,
            "severity": "warning",
            "summary": "vLLM instance {{ $labels.instance_name }} (model {{ $labels.model }}) restarted {{ $value }} times in "
                       + a.restarts_window,
            "description": (
                f"It is crash-looping. Look at: journalctl -u {unit} for the exit reason (out of memory, CUDA "
                f"error, a failed health wait) and systemctl show -p NRestarts {unit}."
            ),
        },
    ]
    if exporter is not None:
        rules.append({
            "alert": "VfgenDispatcherDown",
            # nginx_up is 0 when the exporter cannot read stub_status; up is 0 when the exporter itself is gone.
            "expr": f"(nginx_up{{{nginx}}} == 0) or (up{{{nginx}}} == 0)",
            "for": a.dispatcher_down_for,
            "severity": "critical",
            "summary": "the nginx dispatcher of deployment {{ $labels.deployment }} is down",
            "description": (
                "No client request reaches any model. Look at: systemctl status nginx; nginx -t; the nginx error "
                f"log; systemctl status {exporter.unit} (the exporter that reads its /nginx_status)."
            ),
        })
    return tuple(rules)
