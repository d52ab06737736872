"""Format a Plan into file contents with Jinja2 templates; no decisions are made here.

Templates live in the repository's templates/ folder and ship inside the wheel
as vfgen/templates. The Jinja environment is built once, with StrictUndefined
so a missing value is an error rather than an empty string.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import jinja2

from vfgen import __version__, quoting
from vfgen.config import Deployment, read_api_keys
from vfgen.errors import RenderError
from vfgen.plan import ANY_BACKEND_PATHS, PER_INSTANCE_PATHS, Instance, Plan

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
# Debian's prometheus-nginx-exporter package installs it here.
NGINX_EXPORTER_BIN = "/usr/bin/prometheus-nginx-exporter"
# Whole-string UTF-8 validity (RFC 3629, no surrogates or overlongs), byte by byte: nginx's
# escape=json passes bytes >= 0x80 through unchanged, so a client value logged as it came
# could make the line invalid UTF-8.
VALID_UTF8_REGEX = (
    r"~^(?:[\x00-\x7f]|[\xc2-\xdf][\x80-\xbf]|\xe0[\xa0-\xbf][\x80-\xbf]|[\xe1-\xec\xee\xef][\x80-\xbf]{2}"
    r"|\xed[\x80-\x9f][\x80-\xbf]|\xf0[\x90-\xbf][\x80-\xbf]{2}|[\xf1-\xf3][\x80-\xbf]{3}|\xf4[\x80-\x8f][\x80-\xbf]{2})*$"
)


@dataclass(frozen=True)
class Artefact:
    kind: str  # nginx | nginx-exporter | systemd | supervisord | prometheus | prometheus-rules
    path: str  # relative to the output root, e.g. etc/nginx/conf.d/vllm.conf
    content: str
    mode: int = 0o644

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def secret(self) -> bool:
        """Readable by its owner only (API keys): never printed unless asked for by name."""
        return not self.mode & 0o077


def templates_dir() -> Path:
    packaged = Path(__file__).parent / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    env.filters.update(
        nginx_str=quoting.nginx_str,
        nginx_regex=quoting.nginx_regex,
        nginx_exact_key=quoting.nginx_exact_key,
        nginx_vars=quoting.nginx_vars,
        systemd_exec=quoting.systemd_exec,
        systemd_env=quoting.systemd_env,
        supervisor_command=quoting.supervisor_command,
        yaml_str=quoting.yaml_str,
        rstrip=str.rstrip,
    )
    return env


def render_template(name: str, **context) -> str:
    try:
        return environment().get_template(name).render(version=__version__, **context)
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"{exc.filename or name}:{exc.lineno}: {exc.message}") from exc
    except (jinja2.UndefinedError, quoting.QuotingError, TypeError) as exc:
        raise RenderError(f"{name}:{_template_line(name)}: {exc}") from exc


def _template_line(name: str) -> str:
    """Line of the failing template, found in the traceback Jinja rewrote."""
    tb = sys.exc_info()[2]
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(name):
            line = str(tb.tb_lineno)
        tb = tb.tb_next
    return line


def render_all(plan: Plan, dispatcher: bool = True) -> list[Artefact]:
    """Every artefact of the plan, for both process backends, in a stable order.

    dispatcher=False leaves nginx out, so a GPU host rendering its backends
    needs neither nginx's settings nor the API key file, which lives on the
    load balancer.
    """
    d = plan.deployment
    out: list[Artefact] = []
    mon = plan.monitoring
    if plan.dispatcher and dispatcher:
        out.append(Artefact("nginx", nginx_conf_path(d).lstrip("/"), render_nginx(plan)))
        if d.api_key_file:
            out.append(Artefact("nginx", api_keys_path(d).lstrip("/"), render_api_keys(d), mode=0o600))
        if mon.exporter is not None:
            out.append(Artefact("nginx-exporter", f"etc/systemd/system/{mon.exporter.unit}", render_nginx_exporter(plan)))
    for inst in plan.instances:
        out.append(Artefact("systemd", f"etc/systemd/system/{inst.unit}", render_unit(plan, inst)))
    out.append(Artefact("systemd", f"etc/systemd/system/{plan.target}", render_template("systemd/deployment.target.j2", d=d, plan=plan)))
    out.append(Artefact("supervisord", f"etc/supervisor/conf.d/{d.name}.conf", render_supervisord(plan)))
    out.append(Artefact("prometheus", mon.targets_path, render_prometheus(plan, dispatcher=dispatcher)))
    out.append(Artefact("prometheus-rules", mon.rules_path, render_prometheus_rules(plan)))
    return out


# --- nginx -----------------------------------------------------------------------


def nginx_conf_path(d: Deployment) -> str:
    return f"{d.nginx_dir.rstrip('/')}/conf.d/{d.name}.conf"


def api_keys_path(d: Deployment) -> str:
    """Absolute path of the keys map on the dispatcher host (the conf includes it by this path)."""
    return f"{d.nginx_dir.rstrip('/')}/vfgen/{d.name}-api-keys.map"


def render_api_keys(d: Deployment) -> str:
    """The keys map: mode 0600, included by the world-readable conf, which never holds a key."""
    lines = [
        f"# Rendered by vfgen {__version__} from the API key file of deployment {d.name}; mode 0600, root only.",
        "# Included by the `map $http_authorization` block of the dispatcher conf.",
    ]
    lines += [quoting.nginx_api_key_entry(key) for key in read_api_keys(d)]
    return "\n".join(lines) + "\n"


def _error(code: int, kind: str, message: str, param: str | None = None) -> str:
    return quoting.nginx_json({"error": {"message": message, "type": kind, "param": param, "code": code}})


def render_nginx(plan: Plan) -> str:
    d = plan.deployment
    p = plan.nginx_prefix
    names = ", ".join(n for pool in plan.pools for n in pool.route_names)
    instances = ", ".join(plan.instance_urls)
    errors = {
        "unknown_model": _error(404, "NotFoundError", f"The requested model is not served here. Served models: {names}.", "model"),
        "missing_model": _error(404, "NotFoundError", f'The request names no "model" and this endpoint serves several models: {names}.', "model"),
        "unreadable": _error(400, "BadRequestError", 'The request body could not be inspected for its top-level "model": it is empty, '
                             "not one JSON object, nested too deeply, or too large to inspect.", "model"),
        "ambiguous": _error(400, "BadRequestError", 'The top-level "model" must be one JSON string, given once; this body repeats '
                            "it, gives it another type, or is not valid JSON after it.", "model"),
        "unavailable": _error(503, "ServiceUnavailableError", "No backend can take this request right now (all busy or down). Retry later."),
        "unhealthy": quoting.nginx_json({"status": "unhealthy", "detail": "no backend answers /health"}),
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
    per_instance = [
        (path, _error(404, "NotFoundError", f"{path} {why}; the dispatcher has no single answer. Ask each vLLM instance: "
                      + ", ".join(url + path for url in plan.instance_urls)
                      + (" (nginx's own counters: /nginx_status, from localhost)" if path == "/metrics" else "") + "."))
        for path, why in PER_INSTANCE_PATHS
    ]
    stateful = _error(404, "NotFoundError", "Stored responses live in the one vLLM instance that created them, and this request "
                      f"does not say which; the dispatcher cannot route it. Instances: {instances}.")
    plain_errors = [
        (400, _error(400, "BadRequestError", "Malformed request.")),
        (403, _error(403, "PermissionDeniedError", "Forbidden.")),
        (405, errors["e405"]),
        (408, _error(408, "RequestTimeoutError", "The request was not received in time.")),
        (413, _error(413, "RequestTooLargeError", f"The request body is larger than the limit of {d.max_body_size}.")),
        (414, _error(414, "BadRequestError", "The request URI is too long.")),
        (500, _error(500, "InternalServerError", "Internal error in the dispatcher.")),
    ]
    # `created` is the time of the request, as vLLM answers it: the rendered file stays
    # the same on every render, and the number moves like an instance's.
    models = [_model_card(m) for m in plan.served_models]
    models_json = quoting.nginx_json({"object": "list", "data": models}, numbers={CREATED: f"{p}_now"})
    model_cards = [
        (f"~^/v1/models/{quoting.pcre_literal(m.id)}$", quoting.nginx_json(card, numbers={CREATED: f"{p}_now"}))
        for m, card in zip(plan.served_models, models)
    ]
    key_maps, hash_exprs = _key_maps(plan)
    shape_maps = []
    if any(pool.hash_key and pool.hash_key.routing == "shape" for pool in plan.pools):
        source = "$request_body"
        fields = "|".join(SHAPE_FIELDS)
        for n in range(1, SHAPE_PASSES + 1):
            target = f"{p}_shape" if n == SHAPE_PASSES else f"{p}_shape{n}"
            a, b = f"{plan.capture_prefix}_s{n}a", f"{plan.capture_prefix}_s{n}b"
            shape_maps.append({
                "source": source,
                "target": target,
                "regex": rf'~(?s)^(?<{a}>.*)"(?:{fields})"\s*:\s*"(?:[^"\\]|\\.)*"(?<{b}>.*)$',
                "replacement": f"${{{a}}}${{{b}}}",
            })
            source = f"${target}"
    return render_template(
        "nginx/dispatcher.conf.j2",
        d=d,
        plan=plan,
        p=p,
        listen=_listen(d.listen, d.port),
        routing=plan.routing,
        error_routes=[up for up, _ in plan.routing.errors] if plan.routing else [],
        errors=errors,
        plain_errors=plain_errors,
        models_json=models_json,
        model_cards=model_cards,
        per_instance=per_instance,
        stateful=stateful,
        any_backend_paths=ANY_BACKEND_PATHS,
        error_codes={"unknown_model": 404, "missing_model": 404, "unreadable": 400, "ambiguous": 400},
        shape_maps=shape_maps,
        valid_utf8=VALID_UTF8_REGEX,
        key_maps=key_maps,
        hash_exprs=hash_exprs,
        api_keys_map=api_keys_path(d) if d.api_key_file else None,
        lora=any(pool.lora for pool in plan.pools),
        mon=plan.monitoring,
        log_fields=_log_fields(plan),
        last_resort_after_overflow=any(pool.affinity_upstream and pool.last_resort_upstream for pool in plan.pools),
    )


def _key_maps(plan: Plan) -> tuple[list[dict], dict[str, list[tuple[str, str]]]]:
    """nginx maps that build each prefix/session key, and each pool's `hash` expression (as parts)."""
    p = plan.nginx_prefix
    maps: list[dict] = []
    exprs: dict[str, list[tuple[str, str]]] = {}
    for pool in plan.pools:
        key = pool.hash_key
        if key is None:
            continue
        if key.routing == "shape":
            exprs[pool.model] = [("var", f"{p}_shape")]
            continue
        k = f"{p}_{pool.model.replace('-', '_')}"
        n = str(key.prefix_bytes)
        maps.append({"comment": f"{pool.model}: the first {n} bytes of the first message (or prompt) "
                                "and of the first user message",
                     "source": "$request_body", "target": f"{k}_prefix", "default": [],
                     "entries": [(regex.replace("<N>", n), _captures(value)) for regex, value in KEY_REGEXES]})
        model = [("text", f"{key.model}|")]
        if key.by_request_model and plan.route_by_model:
            model = [("var", f"{p}_model"), ("text", "|")]
        elif key.by_request_model:
            maps.append({"comment": f'{pool.model}: the "model" field (base model or LoRA adapter: caches differ)',
                         "source": "$request_body", "target": f"{k}_model", "default": [],
                         "entries": [(FIELD_REGEX.replace("<N>", "256").replace("<FIELD>", "model"), [("capture", "1")])]})
            model = [("var", f"{k}_model"), ("text", "|")]
        prefix = [*model, ("var", f"{k}_prefix")]
        if key.routing == "prefix":
            exprs[pool.model] = prefix
            continue
        field = f"{k}_{key.session_field}_field"
        maps.append({"comment": f'{pool.model}: the "{key.session_field}" field', "source": "$request_body",
                     "target": field, "default": [],
                     "entries": [(FIELD_REGEX.replace("<N>", n).replace("<FIELD>", quoting.pcre_literal(key.session_field)),
                                  [("capture", "1")])]})
        by_field = f"{k}_session" if key.session_header is None else f"{k}_by_field"
        maps.append({"comment": f'{pool.model}: session by the "{key.session_field}" field, else by prefix',
                     "source": f"${field}", "target": by_field, "default": [("text", "u:"), ("var", field)],
                     "entries": [("", [("text", "p:"), *prefix])]})
        if key.session_header is not None:
            maps.append({"comment": f"{pool.model}: session by header, else by field", "source": f"${key.session_header}",
                         "target": f"{k}_session", "default": [("text", "h:"), ("var", key.session_header)],
                         "entries": [("", [("var", by_field)])]})
        exprs[pool.model] = [("var", f"{k}_session")]
    return maps, exprs


def _captures(value: str) -> list[tuple[str, str]]:
    """"$1|$2" as nginx_vars parts."""
    parts: list[tuple[str, str]] = []
    for i, piece in enumerate(value.split("|")):
        parts += [("text", "|")] * bool(i) + [("capture", piece.lstrip("$"))]
    return parts


# A placeholder number in JSON that nginx_json replaces by the request-time variable.
CREATED = -1796


def _model_card(m) -> dict:
    card = {"id": m.id, "object": "model", "created": CREATED, "owned_by": "vllm", "root": m.root, "parent": m.parent}
    if m.max_model_len is not None:
        card["max_model_len"] = m.max_model_len
    card["permission"] = []
    return card


def _listen(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# --- systemd / supervisord ---------------------------------------------------------


def launch_argv(plan: Plan, inst: Instance, *, supervisord: bool) -> list[str]:
    d = plan.deployment
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
    return argv + ["--", *inst.vllm_argv]


def render_unit(plan: Plan, inst: Instance) -> str:
    d = plan.deployment
    lock_runtime_dir = d.lock_dir[len("/run/"):] if d.lock_dir.startswith("/run/") else None
    return render_template(
        "systemd/instance.service.j2",
        d=d,
        plan=plan,
        inst=inst,
        exec_start=launch_argv(plan, inst, supervisord=False),
        exec_start_post=[d.vfgen_bin, "health", "wait", inst.url, "--model", inst.served_name, "--timeout", str(inst.health_timeout)],
        stop_timeout=plan.stop_timeout,
        lock_runtime_dir=lock_runtime_dir,
    )


def render_supervisord(plan: Plan) -> str:
    programs = [
        {"inst": inst, "command": launch_argv(plan, inst, supervisord=True), "priority": inst.supervisor_priority}
        for inst in plan.instances
    ]
    return render_template(
        "supervisord/deployment.conf.j2", d=plan.deployment, plan=plan, programs=programs,
        stop_timeout=plan.stop_timeout,
    )


# --- observability -----------------------------------------------------------------
# The JSON access log: one object per request. Values nginx takes from the
# client are carried only through `valid UTF-8` maps (see the template), so
# escape=json output is always valid JSON in UTF-8.


def _log_fields(plan: Plan) -> list[tuple[str, str]]:
    p = plan.nginx_prefix
    fields = [
        ("time", "$time_iso8601"),
        ("request_id", "$request_id"),
        ("remote_addr", "$remote_addr"),
        ("method", "$request_method"),
        ("uri", f"${p}_log_uri"),
        ("user_agent", f"${p}_log_user_agent"),
        ("route", f"${p}_route"),
    ]
    if plan.route_by_model:
        fields.append(("model", f"${p}_log_model"))
    fields += [
        ("status", "$status"),
        ("bytes_sent", "$bytes_sent"),
        ("body_bytes_sent", "$body_bytes_sent"),
        ("request_length", "$request_length"),
        ("request_time", "$request_time"),
        # Every backend tried, in order ("a, b" after a retry), with each one's status and time.
        ("upstream_addr", "$upstream_addr"),
        ("upstream_status", "$upstream_status"),
        ("upstream_connect_time", "$upstream_connect_time"),
        ("upstream_response_time", "$upstream_response_time"),
    ]
    return fields


def render_nginx_exporter(plan: Plan) -> str:
    exporter = plan.monitoring.exporter
    # No const labels: the targets file gives the deployment label (a scraped one would clash with it).
    argv = [NGINX_EXPORTER_BIN, f"-nginx.scrape-uri={exporter.scrape_uri}", f"-web.listen-address={exporter.listen}"]
    return render_template("systemd/nginx-exporter.service.j2", d=plan.deployment, plan=plan, exporter=exporter, argv=argv)


def render_prometheus(plan: Plan, dispatcher: bool = True) -> str:
    d = plan.deployment
    targets = [
        {
            "targets": [inst.url.split("://", 1)[1]],
            "labels": {
                "deployment": d.name,
                "component": "vllm",
                "model": inst.served_name,
                "instance_name": inst.name,
                "gpu": ",".join(inst.gpus),
            },
        }
        for inst in plan.instances
    ]
    exporter = plan.monitoring.exporter
    if exporter is not None and dispatcher:
        targets.append({
            "targets": [exporter.target],
            "labels": {"deployment": d.name, "component": "dispatcher", "instance_name": f"{d.name}-dispatcher"},
        })
    return render_template("prometheus/targets.json.j2", targets=targets)


def render_prometheus_rules(plan: Plan) -> str:
    mon = plan.monitoring
    a = mon.alerts
    deployment = quoting.promql_str(plan.deployment.name)
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
    if mon.exporter is not None:
        rules.append({
            "alert": "VfgenDispatcherDown",
            # nginx_up is 0 when the exporter cannot read stub_status; up is 0 when the exporter itself is gone.
            "expr": f"(nginx_up{{{nginx}}} == 0) or (up{{{nginx}}} == 0)",
            "for": a.dispatcher_down_for,
            "severity": "critical",
            "summary": "the nginx dispatcher of deployment {{ $labels.deployment }} is down",
            "description": (
                "No client request reaches any model. Look at: systemctl status nginx; nginx -t; the nginx error "
                f"log; systemctl status {mon.exporter.unit} (the exporter that reads its /nginx_status)."
            ),
        })
    return render_template("prometheus/rules.yml.j2", d=plan.deployment, group=mon.group, rules=rules)


def _number(value: float) -> str:
    return f"{value:g}"
