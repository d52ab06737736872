"""Validate a deployment description (CLI flags or a YAML file) into immutable dataclasses.

Both entry points build the same raw mapping, in the deployment-file format,
and go through `parse_deployment`, so the CLI is shorthand for a one-model
file. Every rejected value raises ConfigError naming the field (as the user
wrote it: `--port` on the CLI, `models[1].gpus` in a file) and the value.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from vfgen.errors import ConfigError
from vfgen.memory import DEFAULT_BUDGET as DEFAULT_MEMORY_BUDGET
from vfgen.memory import parse_size
from vfgen.quoting import CONTROL_CHARS as _CONTROL
from vfgen.quoting import ENV_NAME as _ENV_KEY
from vfgen.memory import KV_CACHE_DTYPE_BYTES
# The value vocabularies and error labels the CLI options share (vfgen/options.py).
from vfgen.options import ACCESS_LOGS, BACKENDS, CLI_LABELS, DTYPES, ROUTINGS
from vfgen.quoting import SURROGATES as _SURROGATE  # YAML "\ud800" escapes make them

# Below 5% of a GPU an instance cannot hold even a small encoder plus its
# activations on a 24 GB card; fail instead of starting processes that OOM.
DEFAULT_MIN_SHARE = 0.05
# vllm-factory's dispatcher caps bodies at 1 MiB, too small for batched
# embedding requests; 32 MiB still fits in memory per request.
DEFAULT_MAX_BODY_SIZE = "32m"

# Bytes of the first message (or prompt) and of the first user message in the prefix key.
# Measured (docs/benchmarks.md "Prefix routing"): the cheapest slice of those measured
# (64, 256, 1024, 4096) that holds a first sentence; longer ones spread no better.
DEFAULT_PREFIX_BYTES = 256
# PCRE repeats of one character class are not unrolled, so this is PCRE's own maximum.
MAX_PREFIX_BYTES = 65535
# nginx drops headers with '_' unless underscores_in_headers is on: letters, digits, '-'.
_HEADER = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?")
# Debian's prometheus-nginx-exporter listens here by default; nginx's loopback stub_status next to it.
DEFAULT_NGINX_EXPORTER_PORT = 9113
DEFAULT_NGINX_STATUS_PORT = 9112

# vLLM flags that vfgen computes itself; passing them as extra args would
# silently desynchronise the units from nginx and the memory plan.
MANAGED_VLLM_FLAGS = {
    "--host": "host",
    "--port": "port-start",
    "--served-model-name": "served-model-name",
    "--max-num-seqs": "max-batch-size",
    "--gpu-memory-utilization": "gpu-memory-utilization",
    "--tensor-parallel-size": "tensor-parallel-size",
    "-tp": "tensor-parallel-size",
    "--shutdown-timeout": "shutdown-timeout",
    # LoRA: every instance of a model must serve the same adapters, and nginx routes
    # their names, so vfgen owns these flags (from lora_modules / max_lora_rank ...).
    "--enable-lora": "lora-modules",
    "--no-enable-lora": "lora-modules",
    "--lora-modules": "lora-modules",
    "--max-lora-rank": "max-lora-rank",
    "--max-loras": "max-loras",
    "--max-cpu-loras": "max-cpu-loras",
}
# vLLM flags vfgen emits only when their setting is given: as extra args too they would
# appear twice, and which one wins is up to vLLM's parser.
OPTIONAL_VLLM_FLAGS = {
    "--dtype": "dtype",
    "--max-model-len": "max_model_len",
    "--enforce-eager": "enforce_eager",
    "--io-processor-plugin": "io_processor_plugin",
}
RESERVED_ENV = {
    "CUDA_VISIBLE_DEVICES": "cuda-devices / gpus",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "allow_runtime_lora_updating",
}
# vLLM 0.32 accepts only these --max-lora-rank values (vllm/config/lora.py MaxLoRARanks).
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16  # vLLM's defaults when the flags are not given
DEFAULT_MAX_LORAS = 1
# A Hugging Face repository id (vLLM downloads an adapter that is not a local path).
_HF_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9._-]{1,96}")
# Module names vLLM's implementation of these model types accepts in an adapter
# (their linear layers before vLLM packs q/k/v and gate/up, plus the embeddings).
_LORA_TARGETS = {
    t: frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                  "embed_tokens", "lm_head"})
    for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
}
# vLLM flags that would need GPUs vfgen does not give the instance (CUDA_VISIBLE_DEVICES holds
# tensor_parallel_size GPUs): refused unless their value is 1.
PLACEMENT_VLLM_FLAGS = {
    "--pipeline-parallel-size": "pipeline stages need tensor_parallel_size x pipeline_parallel_size GPUs per instance, "
                                "which vfgen does not place; use tensor_parallel_size",
    "-pp": "pipeline stages need tensor_parallel_size x pipeline_parallel_size GPUs per instance, "
           "which vfgen does not place; use tensor_parallel_size",
    "--data-parallel-size": "run data-parallel replicas as `instances` (each gets its own GPUs, port and nginx entry)",
    "-dp": "run data-parallel replicas as `instances` (each gets its own GPUs, port and nginx entry)",
}
# --kv-cache-dtype values vfgen can size (auto: the model's dtype).
KV_CACHE_DTYPES = ("auto", *KV_CACHE_DTYPE_BYTES)

_SLUG = re.compile(r"[a-z][a-z0-9-]{0,39}")
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # a system user name (useradd's default rule)
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
# No leading '+' (or '-', '@', ':', '!'): as the first word of ExecStart= systemd reads those as prefixes.
_EXECUTABLE = re.compile(r"[A-Za-z0-9._/][A-Za-z0-9._/+-]*")
_RATE = re.compile(r"([1-9][0-9]{0,5})r/([sm])")
# API keys: printable ASCII without space, quote, backslash or '$' (they sit in an nginx string).
_API_KEY = re.compile(r"[!#%-\[\]-~]+")
API_KEY_MIN_LENGTH = 16
API_KEY_MAX_LENGTH = 512
_NGINX_SIZE = re.compile(r"([0-9]{1,9})([kKmM]?)")
# A Prometheus duration of one unit (what `for:` and range selectors take): 30s, 5m, 1h.
_DURATION = re.compile(r"([1-9][0-9]{0,5})([smhd])")


@dataclass(frozen=True)
class Timeouts:
    start: int = 900  # seconds to load a model and answer /health
    shutdown: int = 30  # vLLM --shutdown-timeout: in-flight requests get this long on SIGTERM
    read: int = 3600  # nginx proxy_read_timeout: long generations stream for minutes
    connect: int = 2  # loopback connects are instant; a slow one means a dead backend
    fail: int = 5  # nginx fail_timeout: a failed backend is skipped this long, then probed
    # Seconds an instance may wait for its GPU start lock (and, under supervisord, for the
    # instance before it); None: derived per instance in plan.py from the instances sharing its GPUs.
    lock: int | None = None


@dataclass(frozen=True)
class LoraModule:
    """One LoRA adapter every instance of its model serves (vLLM --lora-modules)."""

    name: str
    path: str  # absolute local directory, or a Hugging Face repository id
    base_model_name: str | None = None  # a served name of the model: its `parent` in /v1/models
    rank: int | None = None  # from adapter_config.json when the path is local
    target_modules: tuple[str, ...] | None = None
    weight_bytes: int | None = None  # size of the adapter's weight files, when local

    @property
    def local(self) -> bool:
        return self.path.startswith("/")


@dataclass(frozen=True)
class Alerts:
    """Thresholds of the rendered Prometheus alert rules (docs/observability.md)."""

    instance_down_for: str = "2m"  # an instance's /metrics unanswered this long
    model_down_for: str = "1m"  # every instance of a model down this long (critical)
    dispatcher_down_for: str = "1m"  # nginx (or its exporter) down this long
    queue_waiting: int = 0  # more requests than this waiting in an instance's vLLM queue ...
    queue_for: str = "10m"  # ... without a break this long: the model needs more capacity
    kv_cache_usage: float = 0.9  # KV cache fuller than this fraction ...
    kv_cache_for: str = "15m"  # ... this long: requests get preempted and recomputed
    restarts: int = 3  # this many restarts of one instance ...
    restarts_window: str = "30m"  # ... within this window: it is crash-looping


@dataclass(frozen=True)
class ModelSpec:
    key: str
    source: str
    served_names: tuple[str, ...]
    instances: int = 1
    gpus: tuple[str, ...] = ("0",)
    tensor_parallel_size: int = 1
    memory_share: float | None = None  # None: auto
    max_batch_size: int = 32
    max_model_len: int | None = None
    dtype: str | None = None
    enforce_eager: bool = False
    io_processor_plugin: str | None = None
    routing: str = "least_conn"  # one of ROUTINGS
    prefix_bytes: int = DEFAULT_PREFIX_BYTES  # prefix and session routing
    session_header: str | None = None  # session routing: header naming the session (else the `user` field)
    extra_args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    instance_env: tuple[tuple[tuple[str, str], ...], ...] = ()
    # KEY=VALUE file for secrets (HF_TOKEN...): read at start, never copied into units or argv.
    env_file: str | None = None
    enable_lora: bool = False  # true with lora_modules; alone, for adapters loaded at runtime
    lora_modules: tuple[LoraModule, ...] = ()
    max_lora_rank: int | None = None  # None: vLLM's default (16)
    max_loras: int | None = None  # None: vLLM's default (1)
    max_cpu_loras: int | None = None  # None: vLLM's default (max_loras)
    # vLLM flags in extra_args that change memory, read for the memory estimate (they still
    # reach vLLM only through extra_args).
    args_max_model_len: int | None = None
    quantization: str | None = None
    kv_cache_dtype: str | None = None

    @property
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.lora_modules)

    @property
    def context_length(self) -> int | None:
        """--max-model-len as vLLM will get it, from the setting or the extra arguments."""
        return self.max_model_len or self.args_max_model_len


@dataclass(frozen=True)
class Deployment:
    name: str
    models: tuple[ModelSpec, ...]
    listen: str = "127.0.0.1"
    port: int = 8000
    port_start: int = 9100
    host: str = "127.0.0.1"
    upstream_hosts: tuple[str, ...] = ()  # empty: the backends are on `host`
    backend: str = "systemd"
    user: str = "vllm"
    vllm_bin: str = "vllm"
    vfgen_bin: str = "vfgen"
    memory_budget: float = DEFAULT_MEMORY_BUDGET
    min_memory_share: float = DEFAULT_MIN_SHARE
    max_body_size: str = DEFAULT_MAX_BODY_SIZE
    max_queue: int | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    lock_dir: str = "/run/vfgen/locks"
    log_dir: str = "/var/log/supervisor"  # exists wherever Debian's supervisor package is installed
    default_model: str | None = None
    gpu_memory_bytes: int | None = None  # per GPU; None: read from nvidia-smi when a model dir is local
    # The edge (nginx): all optional; see docs/security.md.
    nginx_dir: str = "/etc/nginx"  # where nginx's files live on the dispatcher host
    api_key_file: str | None = None  # operator's key file (one per line, mode 0600); read at render time
    tls_certificate: str | None = None
    tls_certificate_key: str | None = None
    rate_limit: str | None = None  # per client address, nginx syntax: 20r/s or 600r/m
    rate_limit_burst: int = 0
    # Instances of LoRA models get VLLM_ALLOW_RUNTIME_LORA_UPDATING: `vfgen lora load`
    # then changes every instance; nginx still refuses the endpoints (docs/lora.md).
    allow_runtime_lora_updating: bool = False
    # Observability (docs/observability.md).
    access_log: str = "default"
    access_log_path: str | None = None  # None: /var/log/nginx/<name>.access.json
    # Off by default: it adds a listener (nginx_status_port) to nginx, and needs the exporter package.
    nginx_exporter: bool = False
    nginx_exporter_port: int = DEFAULT_NGINX_EXPORTER_PORT
    nginx_status_port: int = DEFAULT_NGINX_STATUS_PORT
    alerts: Alerts = field(default_factory=Alerts)
    source: str | None = None
    warnings: tuple[str, ...] = ()  # found while validating (defaults the user should know about)

    @property
    def single_instance(self) -> bool:
        """One model, one instance, all on this host: vLLM serves the user port itself, no nginx."""
        return len(self.models) == 1 and self.models[0].instances == 1 and not self.upstream_hosts

    @property
    def all_served_names(self) -> tuple[str, ...]:
        return tuple(n for m in self.models for n in m.served_names)


# --- entry points ----------------------------------------------------------------


def read_file_mapping(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a deployment YAML file (vLLM --config style: option names as keys)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("--file", source, f"cannot read: {exc.strerror}") from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError("--file", source, str(exc)) from None
    except yaml.YAMLError as exc:
        raise ConfigError("--file", source, f"not valid YAML{_yaml_reason(exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError("--file", source, "must be a mapping with a `models` list")
    return raw


class _DuplicateKey(Exception):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden: that is what merging is for
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen.setdefault(key, line)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise _DuplicateKey(f"duplicate key {_printable(str(key))!r} at line {line} "
                                        f"(first at line {first}); give each key once")
        return super().construct_mapping(node, deep=deep)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """The parser's own reason with line and column, e.g. " at line 3, column 1: found character '\\t' ..."."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    parts = [p for p in (getattr(exc, "context", None), getattr(exc, "problem", None)) if p]
    return where + (": " + "; ".join(parts) if parts else "")


def load_file(path: str | Path) -> Deployment:
    return parse_deployment(read_file_mapping(path), source=str(path))


def parse_deployment(raw: Mapping[str, Any], source: str | None = None, cli_fields: frozenset[str] = frozenset()) -> Deployment:
    """Validate a raw mapping (file or CLI) into a Deployment.

    `cli_fields`: keys (`port`, `timeouts.start`) that came from command-line flags on top of
    the file `source`; their errors name the flag, not the file.
    """
    v = _Validator(source, cli_fields)
    data = v.normalise(raw, "", _GLOBAL_KEYS)
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise v.error("models", models_raw, "must be a non-empty list of models")
    models = tuple(_parse_model(v, m, i) for i, m in enumerate(models_raw))
    _check_unique(v, models)

    timeouts_raw = v.normalise(data.get("timeouts") or {}, "timeouts.", _TIMEOUT_KEYS)
    timeouts = Timeouts(
        # A lock wait of 0 is valid: take the lock at once or fail.
        **{k: v.integer(f"timeouts.{k}", val, low=0 if k == "lock" else 1, high=86400) for k, val in timeouts_raw.items()}
    )
    default_model = data.get("default_model")
    warnings: list[str] = []
    if data.get("vfgen_bin") is not None:
        vfgen_bin = v.executable("vfgen_bin", data["vfgen_bin"])
    else:
        vfgen_bin, problem = default_vfgen_bin()
        warnings += [problem] if problem else []
    gpu_memory = None if data.get("gpu_memory") is None else v.size("gpu_memory", data["gpu_memory"])
    if gpu_memory is not None:
        from vfgen.memory import size_reading

        warnings += [f"{v.label('gpu_memory')}: {note}" for note in [size_reading(str(data["gpu_memory"]))] if note]
    deployment = Deployment(
        name=v.slug("name", data.get("name", "vllm")),
        models=models,
        listen=v.address("listen", data.get("listen", "127.0.0.1")),
        port=v.port("port", data.get("port", 8000)),
        port_start=v.port("port_start", data.get("port_start", 9100)),
        host=v.address("host", data.get("host", "127.0.0.1")),
        upstream_hosts=tuple(
            v.address(f"upstream_hosts[{i}]", h) for i, h in enumerate(v.str_list("upstream_hosts", data.get("upstream_hosts", [])))
        ),
        backend=v.choice("backend", data.get("backend", "systemd"), BACKENDS),
        user=v.user("user", data.get("user", "vllm")),
        vllm_bin=v.executable("vllm_bin", data.get("vllm_bin", "vllm")),
        vfgen_bin=vfgen_bin,
        memory_budget=v.fraction("memory_budget", data.get("memory_budget", DEFAULT_MEMORY_BUDGET)),
        min_memory_share=v.fraction("min_memory_share", data.get("min_memory_share", DEFAULT_MIN_SHARE)),
        max_body_size=v.nginx_size("max_body_size", data.get("max_body_size", DEFAULT_MAX_BODY_SIZE)),
        max_queue=None if data.get("max_queue") is None else v.integer("max_queue", data["max_queue"], low=0, high=100000),
        timeouts=timeouts,
        lock_dir=v.safe_path("lock_dir", data.get("lock_dir", "/run/vfgen/locks")),
        log_dir=v.safe_path("log_dir", data.get("log_dir", "/var/log/supervisor")),
        default_model=None if default_model is None else v.served_name("default_model", default_model),
        gpu_memory_bytes=gpu_memory,
        allow_runtime_lora_updating=v.boolean("allow_runtime_lora_updating", data.get("allow_runtime_lora_updating", False)),
        source=source,
        warnings=tuple(warnings),
        **_edge(v, data),
        **_observability(v, data),
    )
    if deployment.default_model is not None and deployment.default_model not in deployment.all_served_names:
        raise v.error("default_model", default_model, f"is not a served name (served: {', '.join(deployment.all_served_names)})")
    _check_single_host(v, deployment)
    _check_routing(v, deployment)
    _check_edge(v, deployment)
    _check_runtime_lora(v, deployment)
    if deployment.single_instance and deployment.access_log != "default":
        raise v.error("access_log", deployment.access_log,
                      "needs the nginx dispatcher, but a single instance serves the port itself; use 2 or more instances")
    if deployment.single_instance and deployment.nginx_exporter:
        raise v.error("nginx_exporter", True,
                      "needs the nginx dispatcher, but a single instance serves the port itself; use 2 or more instances")
    return deployment


# systemd resolves a bare ExecStart= command in this fixed list, not in anyone's PATH
# (systemd.exec(5), "Command lines"); a venv or pipx directory is never on it.
SYSTEMD_SEARCH_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def default_vfgen_bin() -> tuple[str, str | None]:
    """`vfgen` when systemd finds it by name, else the running vfgen's absolute path; or a warning."""
    if any(os.access(os.path.join(d, "vfgen"), os.X_OK) for d in SYSTEMD_SEARCH_PATH):
        return "vfgen", None
    candidates = [sys.argv[0]] if os.path.basename(sys.argv[0]) == "vfgen" else []
    # Under `python -m` or a test runner, the console script beside the interpreter (a venv's bin/).
    candidates.append(os.path.join(os.path.dirname(sys.executable), "vfgen"))
    for candidate in candidates:
        path = os.path.abspath(candidate)
        if os.path.isfile(path) and os.access(path, os.X_OK) and _EXECUTABLE.fullmatch(path):
            return path, None
    return "vfgen", ("`vfgen` is not on systemd's search path (" + ":".join(SYSTEMD_SEARCH_PATH) + ") and the running "
                     "vfgen was not found: the units call bare `vfgen` and will fail to start (\"Command vfgen is not "
                     "executable\"); pass --vfgen-bin /absolute/path/to/vfgen")


def _edge(v: "_Validator", data: Mapping[str, Any]) -> dict[str, Any]:
    """The optional nginx edge settings: API keys, TLS, per-client rate limit."""
    def path(key: str) -> str | None:
        return None if data.get(key) is None else v.safe_path(key, data[key])

    edge: dict[str, Any] = {
        "nginx_dir": v.safe_path("nginx_dir", data.get("nginx_dir", "/etc/nginx")),
        "api_key_file": path("api_key_file"),
        "tls_certificate": path("tls_certificate"),
        "tls_certificate_key": path("tls_certificate_key"),
    }
    if (edge["tls_certificate"] is None) != (edge["tls_certificate_key"] is None):
        missing = "tls_certificate_key" if edge["tls_certificate_key"] is None else "tls_certificate"
        given = "tls_certificate" if missing == "tls_certificate_key" else "tls_certificate_key"
        raise v.error(missing, None, f"is required with {v.label(given)}: give both the certificate and its key, or neither")
    rate = data.get("rate_limit")
    if rate is not None:
        text = v.text("rate_limit", rate)
        match = _RATE.fullmatch(text)
        if not match:
            raise v.error("rate_limit", rate, "must be requests per second or minute per client, like 20r/s or 600r/m")
        edge["rate_limit"] = text
        # Default burst: about one second of traffic, so a client's short spike is not refused.
        per_second = int(match.group(1)) if match.group(2) == "s" else -(-int(match.group(1)) // 60)
        edge["rate_limit_burst"] = per_second
    if data.get("rate_limit_burst") is not None:
        if rate is None:
            raise v.error("rate_limit_burst", data["rate_limit_burst"], f"needs {v.label('rate_limit')}")
        edge["rate_limit_burst"] = v.integer("rate_limit_burst", data["rate_limit_burst"], low=0, high=100000)
    return edge


def _observability(v: "_Validator", data: Mapping[str, Any]) -> dict[str, Any]:
    """Access log, nginx exporter and alert thresholds."""
    alerts_raw = v.normalise(data.get("alerts") or {}, "alerts.", _ALERT_KEYS)
    alerts: dict[str, Any] = {}
    for key, val in alerts_raw.items():
        name = f"alerts.{key}"
        if key == "queue_waiting":
            alerts[key] = v.integer(name, val, low=0, high=10**6)
        elif key == "restarts":
            alerts[key] = v.integer(name, val, low=1, high=1000)
        elif key == "kv_cache_usage":
            alerts[key] = v.fraction(name, val)
        else:
            alerts[key] = v.duration(name, val)
    return {
        "access_log": v.choice("access_log", data.get("access_log", "default"), ACCESS_LOGS),
        "access_log_path": None if data.get("access_log_path") is None else v.safe_path("access_log_path", data["access_log_path"]),
        "nginx_exporter": v.boolean("nginx_exporter", data.get("nginx_exporter", False)),
        "nginx_exporter_port": v.port("nginx_exporter_port", data.get("nginx_exporter_port", DEFAULT_NGINX_EXPORTER_PORT)),
        "nginx_status_port": v.port("nginx_status_port", data.get("nginx_status_port", DEFAULT_NGINX_STATUS_PORT)),
        "alerts": Alerts(**alerts),
    }


def _check_single_host(v: "_Validator", d: Deployment) -> None:
    """A single instance binds `listen`; a `host` of its own would be silently ignored."""
    if d.single_instance and d.host not in ("127.0.0.1", d.listen):
        raise v.error("host", d.host, f"a single instance serves the user port on {v.label('listen')} itself and "
                      f"has no backend address; set {v.label('listen')} instead, or use 2 or more instances")


def _check_routing(v: "_Validator", d: Deployment) -> None:
    """Routing is nginx's job: a single instance serving the port itself has no nginx to route."""
    m = d.models[0]
    if d.single_instance and m.routing != "least_conn":
        p = "models[0]." if v.source is not None else ""
        raise v.error(f"{p}routing", m.routing, "needs the nginx dispatcher, but a single instance serves the port "
                      "itself; use 2 or more instances")


def _check_edge(v: "_Validator", d: Deployment) -> None:
    """The edge only protects what cannot be reached around it."""
    features = [k for k in ("api_key_file", "tls_certificate", "rate_limit") if getattr(d, k) is not None]
    if not features:
        return
    if d.single_instance:
        raise v.error(features[0], getattr(d, features[0]),
                      "needs the nginx dispatcher, but a single instance serves the port itself; use 2 or more instances")
    if not d.upstream_hosts and not _is_loopback(d.host):
        raise v.error(
            "host", d.host,
            f"backends on a non-loopback address could be reached around nginx, bypassing {', '.join(v.label(f) for f in features)}; "
            "keep them on 127.0.0.1 (or use upstream_hosts with a firewall, see docs/security.md)",
        )


def _check_runtime_lora(v: "_Validator", d: Deployment) -> None:
    """Runtime adapter loading is for the operator on the host: instances reachable from loopback only."""
    if not d.allow_runtime_lora_updating:
        return
    if not any(m.enable_lora for m in d.models):
        raise v.error("allow_runtime_lora_updating", True, "no model serves LoRA adapters; give a model "
                      f"{v.label('lora_modules')} or {v.label('enable_lora')}")
    if d.upstream_hosts:
        raise v.error("allow_runtime_lora_updating", True, "backends on other hosts (upstream_hosts) would accept "
                      "adapter loads from the network; runtime loading needs the backends on this host's loopback")
    address, field_name = (d.listen, "listen") if d.single_instance else (d.host, "host")
    if not _is_loopback(address):
        raise v.error(field_name, address, "with allow_runtime_lora_updating every client that reaches an instance "
                      "could load or unload adapters on it; keep the instances on 127.0.0.1")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def read_api_keys(d: Deployment) -> tuple[str, ...]:
    """The keys of `d.api_key_file`, validated. Errors name the file and line, never the key."""
    assert d.api_key_file is not None
    v = _Validator(d.source)
    path = d.api_key_file

    def bad(reason: str) -> ConfigError:
        return v.error("api_key_file", path, reason)

    limit = 1024 * 1024
    try:
        # O_NOFOLLOW: a symlink planted in the key file's place is refused, not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise bad("is not a regular file")
        if info.st_mode & 0o007:
            raise bad(f"is accessible to every user (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
        chunks = []
        while sum(map(len, chunks)) <= limit and (chunk := os.read(fd, 65536)):
            chunks.append(chunk)
    except OSError as exc:
        raise bad(f"cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise bad("is larger than 1 MiB")
    keys: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip(b" \t\r")
        if not line or line.startswith(b"#"):
            continue
        try:
            key = line.decode("ascii")
        except UnicodeDecodeError:
            raise bad(f"line {number}: a key must be printable ASCII") from None
        if not _API_KEY.fullmatch(key):
            raise bad(f"line {number}: a key must be printable ASCII without spaces, quotes, backslashes or '$'")
        if not API_KEY_MIN_LENGTH <= len(key) <= API_KEY_MAX_LENGTH:
            raise bad(f"line {number}: a key must be {API_KEY_MIN_LENGTH} to {API_KEY_MAX_LENGTH} characters long (it has {len(key)})")
        if key in keys:
            raise bad(f"line {number}: same key as line {keys[key]}")
        keys[key] = number
    if not keys:
        raise bad("contains no keys (one per line; lines starting with # are comments)")
    return tuple(keys)


# --- file schema -----------------------------------------------------------------

_GLOBAL_KEYS = {
    "name", "models", "listen", "port", "port_start", "host", "upstream_hosts", "backend", "user",
    "vllm_bin", "vfgen_bin", "memory_budget", "min_memory_share", "max_body_size", "max_queue",
    "timeouts", "lock_dir", "log_dir", "default_model", "gpu_memory",
    "nginx_dir", "api_key_file", "tls_certificate", "tls_certificate_key", "rate_limit", "rate_limit_burst",
    "allow_runtime_lora_updating",
    "access_log", "access_log_path", "nginx_exporter", "nginx_exporter_port", "nginx_status_port", "alerts",
}
_ALERT_KEYS = set(Alerts.__dataclass_fields__)
_TIMEOUT_KEYS = {"start", "shutdown", "read", "connect", "fail", "lock"}
_MODEL_KEYS = {
    "model", "name", "served_model_name", "aliases", "instances", "gpus", "tensor_parallel_size",
    "gpu_memory_utilization", "max_batch_size", "max_model_len", "dtype", "enforce_eager",
    "io_processor_plugin", "enable_request_affinity", "extra_args", "env", "instance_env", "env_file",
    "enable_lora", "lora_modules", "max_lora_rank", "max_loras", "max_cpu_loras",
    "routing", "prefix_bytes", "session_header",
}
_LORA_KEYS = {"name", "path", "base_model_name"}


def _parse_model(v: "_Validator", raw: Any, index: int) -> ModelSpec:
    p = v.model_prefix(index)
    if not isinstance(raw, dict):
        raise v.error(f"models[{index}]", raw, "must be a mapping")
    data = v.normalise(raw, p, _MODEL_KEYS)
    if "model" not in data:
        raise v.error(f"{p}model", None, "is required (a Hugging Face id or a local path)")
    source = v.model_source(f"{p}model", data["model"])
    served = v.str_list(f"{p}served_model_name", data.get("served_model_name", [source]))
    aliases = v.str_list(f"{p}aliases", data.get("aliases", []))
    names = tuple(v.served_name(f"{p}served_model_name", n) for n in served) + tuple(
        v.served_name(f"{p}aliases", n) for n in aliases
    )
    if not served:
        raise v.error(f"{p}served_model_name", served, "needs at least one name")
    key = v.slug(f"{p}name", data["name"]) if "name" in data else _derive_key(source)

    instances = v.integer(f"{p}instances", data.get("instances", 1), low=1, high=256)
    tp = v.integer(f"{p}tensor_parallel_size", data.get("tensor_parallel_size", 1), low=1, high=64)
    gpus = v.gpus(f"{p}gpus", data.get("gpus", ["0"]))
    if len(gpus) % tp:
        raise v.error(f"{p}gpus", ",".join(gpus), f"{len(gpus)} GPU(s) cannot be split into groups of tensor_parallel_size={tp}")

    share_raw = data.get("gpu_memory_utilization", "auto")
    share = None if share_raw in (None, "auto") else v.fraction(f"{p}gpu_memory_utilization", share_raw, auto=True)

    env_raw = data.get("env") or {}
    if not isinstance(env_raw, dict):
        raise v.error(f"{p}env", env_raw, "must be a mapping of NAME: value")
    env = tuple(v.env_pair(f"{p}env", k, val) for k, val in env_raw.items())
    inst_env_raw = data.get("instance_env") or []
    if not isinstance(inst_env_raw, list) or len(inst_env_raw) not in (0, instances):
        raise v.error(f"{p}instance_env", inst_env_raw, f"must be a list of {instances} mappings, one per instance")
    for i, e in enumerate(inst_env_raw):
        if e is not None and not isinstance(e, dict):
            raise v.error(f"{p}instance_env[{i}]", e, "must be a mapping of NAME: value (one mapping per instance)")
    instance_env = tuple(
        tuple(v.env_pair(f"{p}instance_env[{i}]", k, val) for k, val in (e or {}).items())
        for i, e in enumerate(inst_env_raw)
    )
    dtype = data.get("dtype")
    extra_args = v.extra_args(f"{p}extra_args", data.get("extra_args", []))
    spec = ModelSpec(
        key=key,
        source=source,
        served_names=names,
        instances=instances,
        gpus=gpus,
        tensor_parallel_size=tp,
        memory_share=share,
        max_batch_size=v.integer(f"{p}max_batch_size", data.get("max_batch_size", ModelSpec.max_batch_size), low=1, high=100000),
        max_model_len=None if data.get("max_model_len") is None else v.integer(f"{p}max_model_len", data["max_model_len"], low=1, high=10**8),
        dtype=None if dtype is None else v.choice(f"{p}dtype", dtype, DTYPES),
        enforce_eager=v.boolean(f"{p}enforce_eager", data.get("enforce_eager", False)),
        io_processor_plugin=None if data.get("io_processor_plugin") is None else v.token(f"{p}io_processor_plugin", data["io_processor_plugin"]),
        **_routing(v, p, data),
        extra_args=extra_args,
        env=env,
        instance_env=instance_env,
        env_file=None if data.get("env_file") is None else v.safe_path(f"{p}env_file", data["env_file"]),
        **_lora_settings(v, data, p, names, source),
        **_memory_args(v, f"{p}extra_args", extra_args),
    )
    for arg in spec.extra_args:
        setting = OPTIONAL_VLLM_FLAGS.get(arg.split("=", 1)[0])
        if setting and getattr(spec, setting):
            raise v.error(f"{p}extra_args", arg, f"{arg.split('=', 1)[0]} is already set by the "
                          f"`{setting.replace('_', '-')}` setting; give it once")
    return spec


def _lora_settings(v: "_Validator", data: Mapping[str, Any], p: str, names: tuple[str, ...], source: str) -> dict[str, Any]:
    """lora_modules and the LoRA limits of one model, each adapter checked against its files."""
    raw = data.get("lora_modules") or []
    if not isinstance(raw, list):
        raise v.error(f"{p}lora_modules", raw, "must be a list of {name, path} mappings (or NAME=PATH strings)")
    rank = None if data.get("max_lora_rank") is None else v.integer(f"{p}max_lora_rank", data["max_lora_rank"], 1, 512)
    if rank is not None and rank not in LORA_RANKS:
        raise v.error(f"{p}max_lora_rank", rank, f"vLLM accepts only {', '.join(map(str, LORA_RANKS))}")
    loras = None if data.get("max_loras") is None else v.integer(f"{p}max_loras", data["max_loras"], 1, 1024)
    cpu = None if data.get("max_cpu_loras") is None else v.integer(f"{p}max_cpu_loras", data["max_cpu_loras"], 1, 100000)
    if cpu is not None and cpu < (loras or DEFAULT_MAX_LORAS):
        raise v.error(f"{p}max_cpu_loras", cpu, f"must be at least max_loras ({loras or DEFAULT_MAX_LORAS}): "
                      "vLLM keeps every adapter of a batch in its CPU cache too")
    enable = v.boolean(f"{p}enable_lora", data.get("enable_lora", bool(raw)))
    if raw and not enable:
        raise v.error(f"{p}enable_lora", False, f"{v.label(f'{p}lora_modules')} needs LoRA enabled; remove one of them")
    if not enable:
        for key, value in (("max_lora_rank", rank), ("max_loras", loras), ("max_cpu_loras", cpu)):
            if value is not None:
                raise v.error(f"{p}{key}", value, f"needs {v.label(f'{p}lora_modules')} or {v.label(f'{p}enable_lora')}")
    base_targets = _lora_targets_of(source)
    modules = []
    for i, item in enumerate(raw):
        where = f"{p}lora_modules[{i}]" if v.source is not None else "lora_modules"
        modules.append(_lora_module(v, item, where, names, rank or DEFAULT_MAX_LORA_RANK, base_targets))
    return {"enable_lora": enable, "lora_modules": tuple(modules), "max_lora_rank": rank,
            "max_loras": loras, "max_cpu_loras": cpu}


def _lora_module(v: "_Validator", item: Any, where: str, served: tuple[str, ...], max_rank: int,
                 base_targets: tuple[str, frozenset[str]] | None) -> LoraModule:
    sub = (lambda key: f"{where}.{key}") if v.source is not None else (lambda key: where)
    if isinstance(item, str):  # NAME=PATH, as on the CLI and in vLLM's own flag
        if "=" not in item:
            raise v.error(where, item, "must be NAME=PATH")
        name, path = item.split("=", 1)
        item = {"name": name, "path": path}
    data = v.normalise(item, f"{where}.", _LORA_KEYS)
    for key in ("name", "path"):
        if key not in data:
            raise v.error(sub(key), None, "is required")
    name = v.served_name(sub("name"), data["name"])
    path = _lora_path(v, sub("path"), data["path"])
    base = data.get("base_model_name")
    if base is not None and base not in served:
        raise v.error(sub("base_model_name"), base, f"must be a served name of this model ({', '.join(served)}); "
                      "vLLM would silently list another parent")
    module = LoraModule(name=name, path=path, base_model_name=base)
    if module.local:
        module = _read_adapter(v, sub("path"), module)
        _check_adapter_fits(v, sub("path"), module, max_rank, base_targets)
    return module


def _check_adapter_fits(v: "_Validator", field_name: str, module: LoraModule, max_rank: int,
                        base_targets: tuple[str, frozenset[str]] | None) -> None:
    """vLLM refuses (at start, or at load) an adapter above max_lora_rank or targeting unknown modules."""
    if module.rank is not None and module.rank > max_rank:
        fitting = min((r for r in LORA_RANKS if r >= module.rank), default=None)
        raise v.error(field_name, module.path, f"adapter rank r={module.rank} is above max_lora_rank={max_rank}; vLLM refuses "
                      "to load it" + (f" (set max_lora_rank to at least {fitting})" if fitting else " (vLLM's limit is 512)"))
    if base_targets is not None and module.target_modules:
        model_type, known = base_targets
        unknown = [t for t in module.target_modules if t.rsplit(".", 1)[-1] not in known]
        if unknown:
            raise v.error(field_name, module.path, f"targets {', '.join(unknown)}, which a {model_type} model does not have "
                          f"(it has {', '.join(sorted(known))}); vLLM refuses to load it")


def runtime_adapter(d: Deployment, model: ModelSpec, name: str, path: str | None) -> LoraModule:
    """An adapter for `vfgen lora load NAME PATH` (path None: unload), checked like lora_modules."""
    v = _Validator("")  # labels as written (NAME, PATH: the command's arguments), no file prefix
    adapter_name = v.served_name("NAME", name)
    declared = {a.name: m.key for m in d.models for a in m.lora_modules}
    if adapter_name in d.all_served_names:
        raise ConfigError("NAME", name, "is a served name or alias; an adapter needs a name of its own")
    if adapter_name in declared:
        raise ConfigError("NAME", name, f"is declared in lora_modules of model {declared[adapter_name]!r}: every "
                          "instance loads it at start; change it there and re-render instead")
    if path is None:
        return LoraModule(name=adapter_name, path="")
    module = LoraModule(name=adapter_name, path=_lora_path(v, "PATH", path))
    if not module.local:
        return module
    module = _read_adapter(v, "PATH", module)
    max_rank = model.max_lora_rank or DEFAULT_MAX_LORA_RANK
    _check_adapter_fits(v, "PATH", module, max_rank, _lora_targets_of(model.source))
    return module


def _lora_path(v: "_Validator", name: str, value: Any) -> str:
    text = v.text(name, value)
    if text.startswith("/"):
        return v.safe_path(name, text)
    if text.startswith((".", "~")) or os.path.exists(text):
        raise v.error(name, value, "is a relative path; give the absolute path (instances start in another directory)")
    # The Hub forbids '--' and '..' in ids; a '..' would also read as a relative path to vLLM.
    if not _HF_REPO.fullmatch(text) or ".." in text or "--" in text:
        raise v.error(name, value, "must be an absolute local path or a Hugging Face repository id (org/name)")
    return text


def _read_adapter(v: "_Validator", name: str, module: LoraModule) -> LoraModule:
    """Rank, target modules and weight size from a local adapter directory (PEFT format)."""
    import json

    directory = Path(module.path)
    if not directory.is_dir():
        raise v.error(name, module.path, "does not exist or is not a directory")
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise v.error(name, module.path, "holds no adapter_config.json (not a PEFT LoRA adapter directory)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise v.error(name, module.path, f"adapter_config.json is unreadable or not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise v.error(name, module.path, "adapter_config.json must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise v.error(name, module.path, f"adapter_config.json has peft_type {config['peft_type']!r}; vLLM serves LORA adapters")
    rank = config.get("r")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise v.error(name, module.path, f"adapter_config.json has r={rank!r}; it must be a positive integer")
    targets = config.get("target_modules")
    # A string is a PEFT regex or "all-linear": nothing to compare module by module.
    target_modules = tuple(str(t) for t in targets) if isinstance(targets, list) else None
    weights = [f for f in sorted(directory.iterdir()) if f.name.startswith("adapter_model.") and f.is_file()]
    return LoraModule(name=module.name, path=module.path, base_model_name=module.base_model_name, rank=rank,
                      target_modules=target_modules,
                      weight_bytes=sum(f.stat().st_size for f in weights) if weights else None)


def _lora_targets_of(source: str) -> tuple[str, frozenset[str]] | None:
    """(model_type, module names) when the base model's config.json is local and its type is known."""
    import json

    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # not local (or not readable): the memory estimate reports unusable configs
    model_type = config.get("model_type") if isinstance(config, dict) else None
    known = _LORA_TARGETS.get(model_type) if isinstance(model_type, str) else None
    return (model_type, known) if known else None


def _routing(v: "_Validator", p: str, data: Mapping[str, Any]) -> dict[str, Any]:
    """routing, prefix_bytes, session_header; enable_request_affinity is the old spelling of routing: shape."""
    affinity = v.boolean(f"{p}enable_request_affinity", data.get("enable_request_affinity", False))
    routing = "shape" if affinity else "least_conn"
    if data.get("routing") is not None:
        routing = v.choice(f"{p}routing", data["routing"], ROUTINGS)
        if affinity and routing != "shape":
            raise v.error(f"{p}enable_request_affinity", True, f"means {v.label(f'{p}routing')} shape, "
                          f"which contradicts {v.label(f'{p}routing')} {routing}; give one of them")
    out: dict[str, Any] = {"routing": routing}
    if data.get("prefix_bytes") is not None:
        if routing not in ("prefix", "session"):
            raise v.error(f"{p}prefix_bytes", data["prefix_bytes"], f"needs {v.label(f'{p}routing')} prefix or session "
                          f"(routing is {routing})")
        out["prefix_bytes"] = v.integer(f"{p}prefix_bytes", data["prefix_bytes"], low=16, high=MAX_PREFIX_BYTES)
    if data.get("session_header") is not None:
        if routing != "session":
            raise v.error(f"{p}session_header", data["session_header"], f"needs {v.label(f'{p}routing')} session "
                          f"(routing is {routing})")
        header = v.text(f"{p}session_header", data["session_header"])
        if not _HEADER.fullmatch(header):
            raise v.error(f"{p}session_header", data["session_header"], "must be an HTTP header name of letters, digits "
                          "and '-' (nginx ignores headers with '_'), at most 64 characters")
        out["session_header"] = header
    return out


def vllm_arg(args: tuple[str, ...], *flags: str) -> tuple[str, str] | None:
    """(argument as written, value) of the first of `flags` in `args` (`--flag V` or `--flag=V`)."""
    for i, arg in enumerate(args):
        for flag in flags:
            if arg == flag:
                return arg, args[i + 1] if i + 1 < len(args) else ""
            if arg.startswith(flag + "="):
                return arg, arg[len(flag) + 1:]
    return None


def _memory_args(v: "_Validator", name: str, args: tuple[str, ...]) -> dict[str, Any]:
    """The extra arguments the memory estimate must honour, validated."""
    out: dict[str, Any] = {}
    found = vllm_arg(args, "--max-model-len")
    if found is not None:
        if not re.fullmatch(r"[1-9][0-9]{0,8}", found[1]):
            raise v.error(name, found[0] if "=" in found[0] else f"{found[0]} {found[1]}",
                          "--max-model-len must be a whole number of tokens here: vfgen sizes the KV cache from it")
        out["args_max_model_len"] = int(found[1])
    found = vllm_arg(args, "--quantization", "-q")
    if found is not None:
        out["quantization"] = found[1]
    found = vllm_arg(args, "--kv-cache-dtype")
    if found is not None:
        if found[1] not in KV_CACHE_DTYPES:
            raise v.error(name, found[0] if "=" in found[0] else f"{found[0]} {found[1]}",
                          f"--kv-cache-dtype must be one of: {', '.join(KV_CACHE_DTYPES)}")
        out["kv_cache_dtype"] = found[1]
    return out


def _printable(text: str) -> str:
    """`text` for a field label: quoted and escaped when it holds control characters."""
    return repr(text) if _CONTROL.search(text) or _SURROGATE.search(text) else text


def _derive_key(source: str) -> str:
    base = source.rstrip("/").rsplit("/", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9]+", "-", base).strip("-")
    if not slug or not slug[0].isalpha():
        slug = "m-" + slug if slug else "model"
    return slug[:40].rstrip("-")


def _check_unique(v: "_Validator", models: tuple[ModelSpec, ...]) -> None:
    keys: dict[str, int] = {}
    names: dict[str, str] = {}  # served name or adapter name -> where it was defined
    for i, m in enumerate(models):
        p = v.model_prefix(i)
        if m.key in keys:
            raise v.error(f"{p}name", m.key, f"same unit name as models[{keys[m.key]}]; set a distinct `name`")
        keys[m.key] = i
        for n in m.served_names:
            if n in names:
                owner = "this model" if names[n] == f"models[{i}]" else names[n]
                raise v.error(f"{p}served_model_name", n, f"already served by {owner}; give each name once")
            names[n] = f"models[{i}]"
    # Adapters after every served name: vLLM refuses an adapter named like a base model,
    # and nginx routes each name to exactly one pool.
    for i, m in enumerate(models):
        for j, a in enumerate(m.lora_modules):
            field_name = f"models[{i}].lora_modules[{j}].name" if v.source is not None else "lora_modules"
            if a.name in names:
                owner = names[a.name]
                what = f"the adapter {v.label(owner)}" if "lora_modules" in owner else \
                    f"a served name or alias of {owner}" if v.source is not None else "a served name"
                raise v.error(field_name, a.name, f"already used by {what}; adapter names must be unique among every name nginx routes")
            names[a.name] = f"models[{i}].lora_modules[{j}]" if v.source is not None else "lora_modules"


class _Validator:
    """Field checks that raise ConfigError with the field spelled as the user wrote it."""

    def __init__(self, source: str | None, cli_fields: frozenset[str] = frozenset()):
        self.source = source
        self.cli_fields = cli_fields

    def model_prefix(self, index: int) -> str:
        """`models[1].` in a file; nothing on the CLI, which has one model and flags for its fields."""
        return f"models[{index}]." if self.source is not None else ""

    def _from_cli(self, name: str) -> bool:
        return self.source is None or re.sub(r"\[\d+\]$", "", name) in self.cli_fields

    def label(self, name: str) -> str:
        if self._from_cli(name):  # CLI: show the option name
            base = re.sub(r"\[\d+\]$", "", name)
            if base.startswith("env."):
                return f"{CLI_LABELS['env']} {base[4:]}"
            # A field no option sets (min_memory_share, aliases ...) keeps its file name.
            return CLI_LABELS.get(base, base)
        return name

    def error(self, name: str, value: Any, reason: str) -> ConfigError:
        # A flag given on top of -f FILE is the command line's fault, not the file's.
        return ConfigError(self.label(name), value, reason, None if self._from_cli(name) else self.source)

    def normalise(self, raw: Any, prefix: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(raw, Mapping):
            raise self.error(prefix.rstrip(".") or "file", raw, "must be a mapping")
        out: dict[str, Any] = {}
        spelled: dict[str, str] = {}
        for k, val in raw.items():
            key = str(k).replace("-", "_")
            if key not in allowed:
                raise self.error(f"{prefix}{_printable(str(k))}", val, f"unknown key (known: {', '.join(sorted(allowed))})")
            if key in out:
                raise self.error(f"{prefix}{_printable(str(k))}", val, f"same key as {_printable(spelled[key])!r} (dashes and "
                                 "underscores are the same); give it once")
            out[key] = val
            spelled[key] = str(k)
        return out

    def text(self, name: str, value: Any) -> str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise self.error(name, value, "must be a string")
        text = str(value)
        if _CONTROL.search(text):
            raise self.error(name, value, "contains a control character (newline, tab, NUL ...)")
        if _SURROGATE.search(text):
            raise self.error(name, value, "is not valid Unicode text (lone surrogate)")
        return text

    def integer(self, name: str, value: Any, low: int, high: int) -> int:
        if isinstance(value, bool):
            raise self.error(name, value, "must be a whole number")
        try:
            number = int(str(value).strip(), 10) if isinstance(value, str) else value
        except ValueError:
            raise self.error(name, value, "must be a whole number") from None
        if not isinstance(number, int):
            raise self.error(name, value, "must be a whole number")
        if not low <= number <= high:
            raise self.error(name, value, f"must be between {low} and {high}")
        return number

    def port(self, name: str, value: Any) -> int:
        return self.integer(name, value, 1, 65535)

    def fraction(self, name: str, value: Any, auto: bool = False) -> float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or not 0.0 < number <= 1.0:
            raise self.error(name, value, "must be a number in (0, 1], or `auto`" if auto else "must be a number in (0, 1]")
        return number

    def boolean(self, name: str, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        raise self.error(name, value, "must be true or false")

    def choice(self, name: str, value: Any, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.error(name, value, f"must be one of: {', '.join(choices)}")
        return value

    def slug(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not _SLUG.fullmatch(text):
            raise self.error(name, value, "must be lowercase letters, digits and '-', starting with a letter (max 40)")
        return text

    def user(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not USER_NAME.fullmatch(text):
            raise self.error(name, value, "is not a valid system user name")
        return text

    def address(self, name: str, value: Any) -> str:
        text = self.text(name, value).strip("[]")
        if "%" in text:
            # Python accepts any text as an IPv6 zone ("fe80::1%eth0"); nginx accepts none.
            raise self.error(name, value, "IPv6 zone indexes (%...) are not supported")
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            pass
        if _HOSTNAME.fullmatch(text):
            return text
        raise self.error(name, value, "must be an IP address or a host name")

    def executable(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not _EXECUTABLE.fullmatch(text):
            raise self.error(name, value, "must be a command name or path of letters, digits and ._/+- (no spaces, not starting with + or -)")
        return text

    def safe_path(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not _SAFE_PATH.fullmatch(text) or any(part in ("", ".", "..") for part in text.split("/")[1:]) and text != "/":
            raise self.error(name, value, "must be an absolute path of letters, digits and ._/+-, "
                                          "normalised (no '//', '.', '..' or trailing '/')")
        return text

    def nginx_size(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not _NGINX_SIZE.fullmatch(text) or int(_NGINX_SIZE.fullmatch(text).group(1)) == 0:
            raise self.error(name, value, "must be a size like 512k, 32m or 1048576")
        return text.lower()

    def duration(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not _DURATION.fullmatch(text):
            raise self.error(name, value, "must be a Prometheus duration: a whole number and one unit of s, m, h or d (30s, 5m, 1h)")
        return text

    def size(self, name: str, value: Any) -> int:

        try:
            return parse_size(self.text(name, value))
        except ConfigError as exc:
            raise self.error(name, value, exc.reason) from None

    def token(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not text or text.startswith("-") or " " in text:
            raise self.error(name, value, "must be a single word not starting with '-'")
        return text

    def model_source(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not text.strip():
            raise self.error(name, value, "must not be empty")
        if text.startswith("-"):
            raise self.error(name, value, "must not start with '-' (vllm would read it as an option)")
        return text

    def served_name(self, name: str, value: Any) -> str:
        text = self.text(name, value)
        if not text or text != text.strip():
            raise self.error(name, value, "must be non-empty with no leading or trailing spaces")
        bad = sorted({c for c in text if c in '"\\$'})
        if bad:
            raise self.error(
                name, value,
                f"contains {' '.join(bad)}; served names appear inside nginx and JSON strings, where these cannot be carried safely"
                + (" (it defaults to the model path: pass --served-model-name)" if self.source is None else ""),
            )
        if text.startswith("-"):
            raise self.error(name, value, "must not start with '-'")
        if len(text.encode()) > 256:
            raise self.error(name, value, "is longer than 256 bytes")
        return text

    def str_list(self, name: str, value: Any) -> list[str]:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list):
            raise self.error(name, value, "must be a string or a list of strings")
        return [self.text(f"{name}[{i}]", item) for i, item in enumerate(value)]

    def gpus(self, name: str, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
        out = []
        for item in items:
            text = str(item).strip()
            if not re.fullmatch(r"[0-9]{1,3}", text):
                raise self.error(name, value, f"GPU id {text!r} is not a non-negative integer")
            out.append(str(int(text)))
        if not out:
            raise self.error(name, value, "needs at least one GPU id")
        if len(set(out)) != len(out):
            raise self.error(name, value, "lists a GPU twice")
        return tuple(out)

    def env_pair(self, name: str, key: Any, value: Any) -> tuple[str, str]:
        key = str(key)
        if not _ENV_KEY.fullmatch(key):
            raise self.error(name, key, "environment variable names are letters, digits and '_', not starting with a digit")
        if key in RESERVED_ENV:
            raise self.error(f"{name}.{key}", value, f"is set by vfgen from {RESERVED_ENV[key]}")
        if isinstance(value, bool):
            value = "1" if value else "0"
        return key, self.text(f"{name}.{key}", value)

    def extra_args(self, name: str, value: Any) -> tuple[str, ...]:
        args = self.str_list(name, value)
        for arg in args:
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_VLLM_FLAGS:
                raise self.error(name, arg, f"{flag} is set by vfgen; use the `{MANAGED_VLLM_FLAGS[flag]}` setting instead")
        for flag, why in PLACEMENT_VLLM_FLAGS.items():
            found = vllm_arg(tuple(args), flag)
            if found is not None and found[1] != "1":
                shown = found[0] if "=" in found[0] else f"{found[0]} {found[1]}"
                raise self.error(name, shown, f"{flag} is not supported: {why}")
        return tuple(args)


def parse_env_option(items: list[str]) -> dict[str, str]:
    """`--env KEY=VALUE` occurrences into a mapping (validated later with the rest)."""
    env: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("--env", item, "must be KEY=VALUE")
        key, value = item.split("=", 1)
        env[key] = value
    return env


def nginx_size_bytes(size: str) -> int:
    match = _NGINX_SIZE.fullmatch(size)
    assert match, size
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
