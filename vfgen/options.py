"""The one table of command-line options: flag, config key, error label, help, default, panel.

Every deployment option of `vfgen render`, `plan`, `health check`, `rollout`, `apply` and
`lora load/unload` (and render's own output options) is declared here once, as an `Option`.
Everything else is generated from this table:

- the typer parameters of those commands (`vfgen.cli` turns each `Option` into an
  `Annotated[..., typer.Option(...)]` parameter);
- the CLI -> config mapping (`Option.scope` and `Option.key`: which key of the deployment
  file a flag sets, at the top level, in the one model, or under `timeouts`);
- the error labels of `vfgen.config` (`CLI_LABELS`: a field that came from a flag is named
  by that flag, `--cuda-devices` rather than `gpus`);
- the README's options table (`python -m vfgen.options --markdown`, compared by
  tests/unit/test_options.py).

This module is pure data at the bottom of the layers: it imports nothing from vfgen (config
imports its labels and value vocabularies) and not typer, so validation does not load the
CLI framework.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

# --- value vocabularies (config validates deployment files against the same tuples) ---------

DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# How nginx picks a model's backend (docs: README "Routing"). `shape` is the old
# enable_request_affinity; `prefix` and `session` keep a conversation on one backend
# so vLLM's prefix cache hits, with bounded load (max_conns, then least_conn overflow).
ROUTINGS = ("least_conn", "shape", "prefix", "session")
BACKENDS = ("systemd", "supervisord")
# nginx access log: `default` leaves logging to nginx.conf; `json` writes one JSON object per request.
ACCESS_LOGS = ("default", "json")
# `render --only`: every file, the instances' units only, or the nginx side only.
ONLY = ("all", "backends", "dispatcher")

# Help panels, in the order `--help` and the README show them.
PANELS = ("Deployment", "Instances", "vLLM", "LoRA", "Routing", "Edge", "Timeouts", "Observability", "Output")

SCOPES = ("global", "model", "timeouts")


@dataclass(frozen=True)
class Option:
    """One command-line option (or argument) and where its value goes."""

    name: str  # the Python parameter name the commands receive
    help: str  # one sentence for --help; the README row uses it too
    panel: str  # one of PANELS
    type: type = str  # str, int, float, bool (a flag) or Path
    repeat: bool = False  # may be given several times (a list)
    short: str | None = None  # "-n"
    flag: str | None = None  # the long flag, when it is not --name-with-dashes
    argument: bool = False  # positional (MODEL, the arguments after --)
    scope: str | None = None  # which part of the deployment file it sets (SCOPES); None: the CLI's own
    key: str | None = None  # the key it sets in that scope, when it is not `name`
    label: str | None = None  # how errors name it, when it is not the long flag (arguments)
    default: str | None = None  # the value config (or the command) uses when absent, as written
    default_note: str | None = None  # a computed default, in words (not a literal value)
    metavar: str | None = None
    choices: tuple[str, ...] | None = None  # refused by the parser (usage error, exit 2) otherwise
    commands: tuple[str, ...] | None = None  # None: every deployment command
    readme: str = ""  # more words for the README row, after the help sentence
    file_okay: bool = True  # for Path options
    dir_okay: bool = True

    def __post_init__(self) -> None:
        assert self.panel in PANELS, self.panel
        assert self.scope is None or self.scope in SCOPES, self.scope
        assert not (self.default and self.default_note), self.name

    @property
    def long(self) -> str | None:
        if self.argument:
            return None
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def flags(self) -> tuple[str, ...]:
        """The spellings the parser accepts, long first."""
        return () if self.argument else tuple(f for f in (self.long, self.short) if f)

    @property
    def error_label(self) -> str:
        return self.label or self.long or self.metavar or self.name

    @property
    def config_key(self) -> str | None:
        return None if self.scope is None else self.key or self.name

    @property
    def field(self) -> str | None:
        """The config field as `vfgen.config` spells it for a CLI deployment (`timeouts.start`)."""
        if self.scope is None:
            return None
        return f"timeouts.{self.config_key}" if self.scope == "timeouts" else self.config_key

    @property
    def shown_default(self) -> str | None:
        return self.default or self.default_note

    @property
    def is_flag(self) -> bool:
        return self.type is bool

    def absent(self):
        """The value a command receives when the user did not type the option.

        Deployment options are None (False for flags) so only typed values reach the config,
        where the defaults live; a command's own option gets its default.
        """
        if self.is_flag:
            return False
        if self.scope is None and self.commands is not None and self.default is not None:
            return self.type(self.default)
        return None

    def help_text(self) -> str:
        """The --help text (choices show in the metavar, `<systemd|supervisord>`)."""
        default = f" [default: {self.shown_default}]" if self.shown_default and not self.is_flag else ""
        return self.help + default


_G, _M, _T = "global", "model", "timeouts"

OPTIONS: tuple[Option, ...] = (
    # --- Deployment ---------------------------------------------------------------------
    Option("model", "Hugging Face id or local path of the model (or use -f).", "Deployment", argument=True,
           metavar="MODEL", scope=_M, label="MODEL"),
    Option("file", "Deployment YAML file (several models); the global options override its keys.", "Deployment",
           type=Path, short="-f", dir_okay=False),
    Option("name", "Deployment name: prefix of units, upstreams and files.", "Deployment", scope=_G, default="vllm"),
    Option("backend", "Process manager of the instances.", "Deployment", scope=_G, default="systemd", choices=BACKENDS),
    Option("user", "System user the instances run as.", "Deployment", scope=_G, default="vllm"),
    Option("vllm_bin", "Path of the vllm executable the units run.", "Deployment", scope=_G, default="vllm"),
    Option("vfgen_bin", "Path of this vfgen executable as the units should call it (`vfgen launch`, "
           "`vfgen health wait`).", "Deployment", scope=_G,
           default_note="vfgen if systemd's search path has it, else this vfgen's absolute path",
           readme="systemd looks a bare name up only in `/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`, "
                  "so a venv's vfgen is written as its absolute path, and vfgen warns when it finds neither."),
    Option("lock_dir", "Directory of the per-GPU start locks.", "Deployment", scope=_G, default="/run/vfgen/locks"),
    Option("log_dir", "supervisord log directory (must exist).", "Deployment", scope=_G, default="/var/log/supervisor"),
    Option("upstream_host", "Address of a GPU host running the backends (repeat); renders a remote load balancer.",
           "Deployment", repeat=True, scope=_G, key="upstream_hosts"),
    # --- Instances ----------------------------------------------------------------------
    Option("instances", "vLLM instances of the model.", "Instances", type=int, short="-n", scope=_M, default="1"),
    Option("max_batch_size", "--max-num-seqs of each instance, and its max_conns cap in nginx.", "Instances",
           type=int, scope=_M, default="32"),
    Option("port_start", "First backend port; instances use consecutive ports.", "Instances", type=int, scope=_G,
           default="9100"),
    Option("host", "Address the backends bind to.", "Instances", scope=_G, default="127.0.0.1"),
    Option("gpu_memory_utilization", "Per-instance memory share, or auto = budget / instances on the GPU, rounded down.",
           "Instances", scope=_M, default_note="auto"),
    Option("memory_budget", "Share of each GPU all instances may use together.", "Instances", type=float, scope=_G,
           default="0.92"),
    Option("gpu_memory", "Memory of each GPU (e.g. 80GiB or 81920MiB; GB means 10^9 bytes) to check shares against "
           "local model dirs.", "Instances", scope=_G, default_note="nvidia-smi, if present",
           readme="Binary units as nvidia-smi counts; `80GB` means 80×10^9 bytes = 74.51 GiB, and vfgen says so."),
    Option("cuda_devices", "GPU ids for the instances, comma-separated; instances are spread round robin.",
           "Instances", scope=_M, key="gpus", default="0"),
    Option("tensor_parallel_size", "GPUs per instance.", "Instances", type=int, scope=_M, default="1"),
    Option("env", "Environment variable of every instance (repeatable). Lands in the unit or conf file: no secrets.",
           "Instances", repeat=True, short="-e", metavar="KEY=VALUE", scope=_M),
    Option("env_file", "KEY=VALUE file read when an instance starts, for secrets such as HF_TOKEN; keep it mode 0600.",
           "Instances", scope=_M),
    # --- vLLM ---------------------------------------------------------------------------
    Option("vllm_args", "Arguments after -- go to every `vllm serve` unchanged.", "vLLM", argument=True, repeat=True,
           metavar="[-- VLLM_ARGS...]", scope=_M, key="extra_args", label="arguments after --"),
    Option("served_model_name", "Name clients use (repeat for aliases).", "vLLM", repeat=True, scope=_M,
           default_note="MODEL"),
    Option("dtype", "vLLM --dtype.", "vLLM", scope=_M, choices=DTYPES, default_note="vLLM's, auto"),
    Option("enforce_eager", "vLLM --enforce-eager (no CUDA graphs).", "vLLM", type=bool, scope=_M),
    Option("io_processor_plugin", "vLLM --io-processor-plugin.", "vLLM", scope=_M),
    Option("max_model_len", "vLLM --max-model-len.", "vLLM", type=int, scope=_M, default_note="the model's"),
    # --- LoRA ---------------------------------------------------------------------------
    Option("lora_module", "LoRA adapter every instance serves; NAME routes to the model (repeatable; docs/lora.md).",
           "LoRA", repeat=True, metavar="NAME=PATH", scope=_M, key="lora_modules"),
    Option("enable_lora", "vLLM --enable-lora without adapters at start (implied by --lora-module).", "LoRA",
           type=bool, scope=_M),
    Option("max_lora_rank", "vLLM --max-lora-rank: the largest adapter rank.", "LoRA", type=int, scope=_M,
           default_note="vLLM's, 16"),
    Option("max_loras", "vLLM --max-loras: adapters in one batch (GPU slots).", "LoRA", type=int, scope=_M,
           default_note="vLLM's, 1"),
    Option("max_cpu_loras", "vLLM --max-cpu-loras: adapters cached in CPU memory.", "LoRA", type=int, scope=_M,
           default_note="--max-loras"),
    Option("allow_runtime_lora_updating", "Let `vfgen lora load/unload` change adapters on the (loopback-only) "
           "instances; nginx still refuses those calls.", "LoRA", type=bool, scope=_G),
    # --- Routing (the nginx dispatcher) -------------------------------------------------
    Option("port", "Port clients connect to (nginx, or vLLM itself with one instance).", "Routing", type=int,
           scope=_G, default="8000"),
    Option("listen", "Address the dispatcher binds to (0.0.0.0 to expose).", "Routing", scope=_G, default="127.0.0.1"),
    Option("routing", "How nginx picks a backend: least connections, same JSON shape, same conversation start "
           "(prefix) or same session.", "Routing", scope=_M, choices=ROUTINGS, default="least_conn",
           readme="See [Routing](#routing-least_conn-shape-prefix-session)."),
    Option("prefix_bytes", "prefix/session routing: bytes of the first message and of the first user message in "
           "the key.", "Routing", type=int, scope=_M, default="256"),
    Option("session_header", "session routing: request header naming the session (e.g. X-Session-ID); else the "
           "OpenAI `user` field, else the prefix.", "Routing", scope=_M),
    Option("enable_request_affinity", "Old name of --routing shape: same JSON shape -> same backend while it has room.",
           "Routing", type=bool, scope=_M),
    Option("max_queue", "Requests each backend may hold beyond its cap; past that clients get 503 + Retry-After.",
           "Routing", type=int, scope=_G, default_note="unbounded"),
    Option("max_body_size", "Largest request body, nginx size syntax; larger bodies get 413 JSON.", "Routing",
           scope=_G, default="32m"),
    # --- Edge (what nginx checks before a request reaches a backend) ---------------------
    Option("nginx_dir", "nginx's directory on the dispatcher host; the API keys map is included from there.", "Edge",
           scope=_G, default="/etc/nginx"),
    Option("api_key_file", "File of API keys, one per line, not world-readable; nginx answers 401 JSON without one.",
           "Edge", scope=_G, default_note="no keys"),
    Option("tls_certificate", "TLS certificate (PEM) for the dispatcher (TLS 1.2/1.3 only); needs "
           "--tls-certificate-key.", "Edge", scope=_G),
    Option("tls_certificate_key", "TLS private key (PEM) for the dispatcher.", "Edge", scope=_G),
    Option("rate_limit", "Requests per client address, e.g. 20r/s or 600r/m; past it 429 JSON.", "Edge", scope=_G,
           default_note="none"),
    Option("rate_limit_burst", "Requests over --rate-limit a client may send at once.", "Edge", type=int, scope=_G,
           default_note="one second's worth"),
    # --- Timeouts -----------------------------------------------------------------------
    Option("start_timeout", "Seconds an instance may take to become healthy, counted once it holds its GPU start lock.",
           "Timeouts", type=int, scope=_T, key="start", default="900"),
    Option("lock_timeout", "Seconds an instance may wait for its GPU start lock; `vfgen plan` shows it per instance.",
           "Timeouts", type=int, scope=_T, key="lock",
           default_note="(instances sharing its GPUs - 1) x (start timeout + 30)"),
    Option("shutdown_timeout", "vLLM --shutdown-timeout: seconds in-flight requests get on stop.", "Timeouts",
           type=int, scope=_T, key="shutdown", default="30"),
    Option("read_timeout", "nginx proxy_read_timeout in seconds.", "Timeouts", type=int, scope=_T, key="read",
           default="3600"),
    Option("fail_timeout", "Seconds nginx skips a failed backend.", "Timeouts", type=int, scope=_T, key="fail",
           default="5"),
    # --- Observability ------------------------------------------------------------------
    Option("access_log", "nginx access log: nginx.conf's, or one JSON object per request (backends tried, times, "
           "X-Request-Id).", "Observability", scope=_G, choices=ACCESS_LOGS, default="default"),
    Option("access_log_path", "File of the JSON access log.", "Observability", scope=_G,
           default_note="/var/log/nginx/NAME.access.json"),
    Option("nginx_exporter", "Render a prometheus-nginx-exporter unit, nginx's loopback stub_status for it, and its "
           "scrape target.", "Observability", type=bool, scope=_G),
    Option("nginx_exporter_port", "Loopback port of the prometheus-nginx-exporter unit.", "Observability", type=int,
           scope=_G, default="9113"),
    Option("nginx_status_port", "Loopback port of nginx's stub_status for the exporter.", "Observability", type=int,
           scope=_G, default="9112"),
    # --- Output (render's own) ----------------------------------------------------------
    Option("emit", "Print one artefact to stdout: nginx, supervisord, prometheus (targets), prometheus-rules, "
           "nginx-exporter, a file name or a path.", "Output", metavar="NAME", commands=("render",),
           readme="A name two files share (`<name>.conf`) is refused."),
    Option("output_dir", "Write the tree (DIR/etc/systemd/system/..., DIR/etc/nginx/conf.d/...) under DIR, "
           "atomically.", "Output", type=Path, short="-o", metavar="DIR", file_okay=False, commands=("render",)),
    Option("dry_run", "List what would be created or changed under --output-dir (default /), and `stale` files; "
           "write nothing.", "Output", type=bool, commands=("render",)),
    Option("prune", "Delete `stale` files: written there by vfgen before (see its manifest), no longer rendered, "
           "unchanged since.", "Output", type=bool, commands=("render",)),
    Option("only", "backends: the instances' units only; dispatcher: nginx only (e.g. on a load-balancer host). "
           "With --emit, the file must be one of those. `vfgen plan --only backends` (a GPU host) does not read "
           "the API key file.", "Output", choices=ONLY, default="all", commands=("render", "plan")),
)

BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
# The options every deployment command takes (render, plan, health check, rollout, apply, lora).
DEPLOYMENT: tuple[Option, ...] = tuple(o for o in OPTIONS if o.commands is None)
# Options whose value lands in the deployment mapping config validates.
TO_CONFIG: tuple[Option, ...] = tuple(o for o in OPTIONS if o.scope is not None)
# Config field (as vfgen.config names it for a CLI deployment) -> how an error names it.
CLI_LABELS: dict[str, str] = {o.field: o.error_label for o in TO_CONFIG}
assert len(CLI_LABELS) == len(TO_CONFIG), "two options set the same config field"


def for_command(command: str) -> tuple[Option, ...]:
    """The table's options of `command` (render, plan, ...), in table order."""
    return tuple(o for o in OPTIONS if o.commands is None or command in o.commands)


def unset() -> dict[str, object]:
    """Every deployment option as a command receives it when nothing was typed."""
    return {o.name: o.absent() for o in DEPLOYMENT}


def markdown(command: str = "render") -> str:
    """The README's options table of `command`, one bold row per panel."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    opts = for_command(command)
    for panel in PANELS:
        in_panel = [o for o in opts if o.panel == panel]
        if not in_panel:
            continue
        rows.append(f"| **{panel}** | | |")
        for o in in_panel:
            if o.argument:
                spelled = o.metavar.strip("[]") if o.metavar else o.name
            else:
                spelled = ", ".join(sorted(o.flags, key=len)) + (f" {o.metavar}" if o.metavar else "")
            if o.is_flag:
                default = "off"
            else:
                default = o.shown_default or ""
            meaning = o.help
            if o.choices:
                meaning += " One of: " + ", ".join(f"`{c}`" for c in o.choices) + "."
            if o.readme:
                meaning += " " + o.readme
            rows.append(f"| `{spelled}` | {default.replace('|', '/')} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


README_BEGIN = "<!-- options table: generated from vfgen/options.py by `make readme-options`; tests/unit/test_options.py compares -->\n"
README_END = "<!-- end of options table -->\n"


def with_table(readme: str) -> str:
    """`readme` with the text between README_BEGIN and README_END replaced by `markdown()`."""
    start = readme.index(README_BEGIN) + len(README_BEGIN)
    return readme[:start] + markdown() + readme[readme.index(README_END, start):]


def main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(markdown())
        return 0
    if len(argv) == 2 and argv[0] == "--write-readme":
        path = Path(argv[1])
        path.write_text(with_table(path.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    print("usage: python -m vfgen.options --markdown | --write-readme README.md", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
