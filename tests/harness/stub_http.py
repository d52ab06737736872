"""A tiny configurable stand-in for a vLLM HTTP server, for unit tests.

Two ways to use it:

* In-process: `with StubServer() as stub:` serves on 127.0.0.1 (random port) from a
  thread. Change `stub.health_status`, `stub.models`, `stub.models_status` or
  `stub.delay` at any time; the next request sees the new values. "Down" is simply
  a port nobody listens on (`free_port()`), or a stopped stub.

* As a child process (the "vllm" a launcher wraps):
  `python -m tests.harness.stub_http --port P --model NAME [--ready-after S]
  [--exit-after S --exit-code N] [--on-sigterm exit0|ignore] [--record FILE]
  [--record-env KEY]`. It binds the port only after --ready-after seconds (a real
  vLLM refuses connections while it loads), and appends JSON lines to --record:
  {"event": "start"|"ready"|"sigterm", "t": time.time(), "pid": ...}; "ready" is
  written when it first answers /v1/models with its model listed, and "start" also
  holds the recorded environment variables and the files the process has open.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: "_StubHTTPServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        stub = self.server.stub
        if stub.delay:
            time.sleep(stub.delay)
        if self.path == "/health":
            self._reply(stub.health_status, b"")
        elif self.path == "/v1/models":
            data = [{"id": name, "object": "model", "owned_by": "stub"} for name in stub.models]
            self._reply(stub.models_status, json.dumps({"object": "list", "data": data}).encode())
            if data and stub.models_status == 200:
                stub.on_models_listed()
        else:
            self._reply(404, b'{"error": "not found"}')

    def _reply(self, status: int, body: bytes) -> None:
        self.server.stub.requests.append((self.path, dict(self.headers)))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


class _StubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    stub: "StubServer"


class StubServer:
    """A stub vLLM server on 127.0.0.1; attributes are read on every request."""

    def __init__(self, port: int = 0, models: list[str] | None = None, health_status: int = 200) -> None:
        self.health_status = health_status
        self.models: list[str] = ["stub"] if models is None else list(models)
        self.models_status = 200
        self.delay = 0.0
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers) of every request
        self._httpd = _StubHTTPServer(("127.0.0.1", port), _Handler)
        self._httpd.stub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def on_models_listed(self) -> None:
        """Hook for the child-process mode (records the first healthy answer)."""

    def start(self) -> "StubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "StubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _record(path: str | None, event: str, **extra: object) -> None:
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **extra}) + "\n")


def _open_files() -> list[str]:
    """What this process has open (to prove a launcher passed no lock fd down)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return found


def read_records(path: str) -> list[dict]:
    """The JSON lines a child-mode stub wrote to its --record file (none if it never started)."""
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[], help="served model name (repeatable)")
    parser.add_argument("--ready-after", type=float, default=0.0, help="seconds before the port is bound")
    parser.add_argument("--exit-after", type=float, default=None, help="exit (crash) after this many seconds")
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--on-sigterm", choices=("exit0", "ignore"), default="exit0")
    parser.add_argument("--record", default=None, help="append JSON event lines to this file")
    parser.add_argument("--record-env", action="append", default=[], help="environment variable to record at start")
    args = parser.parse_args(argv)

    def on_sigterm(signum: int, frame: object) -> None:
        _record(args.record, "sigterm")
        if args.on_sigterm == "exit0":
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    _record(args.record, "start", ppid=os.getppid(), env={key: os.environ.get(key) for key in args.record_env},
            fds=_open_files())
    if args.exit_after is not None:
        threading.Timer(args.exit_after, lambda: os._exit(args.exit_code)).start()
    time.sleep(args.ready_after)

    stub = StubServer(port=args.port, models=args.model or ["stub"])
    listed: list[bool] = []
    listed_lock = threading.Lock()

    def on_models_listed() -> None:
        with listed_lock:
            if not listed:
                listed.append(True)
                _record(args.record, "ready")

    stub.on_models_listed = on_models_listed  # type: ignore[method-assign]
    stub._httpd.serve_forever(poll_interval=0.05)
    return 0


if __name__ == "__main__":
    sys.exit(main())
