"""Keep-alive HTTP clients that count every outcome, for nginx-reload tests and measurements.

`Clients(kind, make, count)` runs `count` threads of one client kind against a deployment
until `stop()`; each outcome is counted: ok (and whether the response said
`Connection: close`), or failed by its error text. The kinds:

- `raw_keepalive(port)`: `http.client`, one kept-alive connection per thread, reused until
  the server says close; an error is counted and never retried (the connection is then
  replaced);
- `requests_session(url)`: `requests.Session` with its default adapter (urllib3 does not
  retry a POST);
- `httpx2_client(url, seen)`: httpx2 (the openai SDK's HTTP library) with no retries;
- `openai_sdk(url, seen, max_retries)`: the official `openai` SDK; `max_retries=None`
  keeps the SDK's own default (2).

`seen` counts the transport errors under the httpx2 clients, by type: for the SDK,
the connection errors it retried (or, with max_retries=0, raised).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

BODY = {"model": "m", "prompt": "hi", "max_tokens": 4}

Maker = Callable[["Clients"], Callable[[], None]]


class Clients:
    """`count` threads of one client kind sending completions until stop()."""

    def __init__(self, kind: str, make: Maker, count: int) -> None:
        self.kind = kind
        self.ok = 0
        self.closes = 0  # ok responses that said Connection: close
        self.failed: Counter = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=make(self), daemon=True, name=f"{kind}-{k}") for k in range(count)]
        for thread in self.threads:
            thread.start()

    def count(self, ok: bool, what: str = "", close: bool = False) -> None:
        with self.lock:
            if ok:
                self.ok += 1
                self.closes += close
            else:
                self.failed[what[:160]] += 1

    @property
    def failures(self) -> int:
        with self.lock:
            return sum(self.failed.values())

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(40)
        assert not any(t.is_alive() for t in self.threads), f"{self.kind} clients did not stop"

    def summary(self) -> str:
        return (f"{self.kind}: {self.ok} ok ({self.closes} said Connection: close), "
                f"{self.failures} failed {dict(self.failed)}")

    def record(self) -> dict[str, Any]:
        return {"client": self.kind, "ok": self.ok, "connection_close": self.closes, "failed": self.failures,
                "errors": dict(self.failed)}


def raw_keepalive(port: int, body: dict = BODY) -> Maker:
    payload = json.dumps(body).encode()

    def make(clients: Clients) -> Callable[[], None]:
        def run() -> None:
            conn = None
            while not clients.stopping.is_set():
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                try:
                    conn.request("POST", "/v1/completions", body=payload, headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    clients.count(False, f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = None
                    continue
                close = resp.will_close  # the server said close (or spoke HTTP/1.0)
                clients.count(resp.status == 200, f"HTTP {resp.status}", close=close)
                if close:
                    conn.close()
                    conn = None
            if conn is not None:
                conn.close()
        return run
    return make


def requests_session(url: str, body: dict = BODY) -> Maker:
    def make(clients: Clients) -> Callable[[], None]:
        def run() -> None:
            import requests

            session = requests.Session()
            session.trust_env = False
            while not clients.stopping.is_set():
                try:
                    resp = session.post(f"{url}/v1/completions", json=body, timeout=30)
                except requests.RequestException as exc:
                    clients.count(False, f"{type(exc).__name__}: {exc}")
                    continue
                clients.count(resp.status_code == 200, f"HTTP {resp.status_code}",
                              close=resp.headers.get("connection", "").lower() == "close")
            session.close()
        return run
    return make


def _counting_httpx2(seen: Counter, lock: threading.Lock):
    import httpx2

    class CountingTransport(httpx2.HTTPTransport):
        def handle_request(self, request):
            try:
                return super().handle_request(request)
            except httpx2.TransportError as exc:
                with lock:
                    seen[type(exc).__name__] += 1
                raise

    return httpx2.Client(transport=CountingTransport(), trust_env=False, timeout=30)


def httpx2_client(url: str, seen: Counter, lock: threading.Lock, body: dict = BODY) -> Maker:
    def make(clients: Clients) -> Callable[[], None]:
        def run() -> None:
            import httpx2

            client = _counting_httpx2(seen, lock)
            while not clients.stopping.is_set():
                try:
                    resp = client.post(f"{url}/v1/completions", json=body)
                except httpx2.HTTPError as exc:
                    clients.count(False, f"{type(exc).__name__}: {exc}")
                    continue
                clients.count(resp.status_code == 200, f"HTTP {resp.status_code}")
            client.close()
        return run
    return make


def openai_sdk(url: str, seen: Counter, lock: threading.Lock, max_retries: int | None = None,
               body: dict = BODY) -> Maker:
    def make(clients: Clients) -> Callable[[], None]:
        def run() -> None:
            import openai

            options = {} if max_retries is None else {"max_retries": max_retries}
            sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="none", http_client=_counting_httpx2(seen, lock), **options)
            while not clients.stopping.is_set():
                try:
                    done = sdk.completions.create(**body)
                except openai.APIError as exc:
                    clients.count(False, f"{type(exc).__name__}: {exc}")
                    continue
                clients.count(bool(done.choices))
            sdk.close()
        return run
    return make


def reload_nginx(d) -> None:
    """What `vfgen apply` runs for each of its reloads, `<--nginx command> -s reload`, on a LiveDeployment."""
    argv = [d.nginx_bin, "-c", str(d.root / "nginx.conf"), "-p", str(d.run_dir), "-s", "reload"]
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"nginx -s reload exited {result.returncode}: {result.stderr}")


def set_http_directive(d, directive: str) -> None:
    """Add `directive` to the `http {}` block of a LiveDeployment's nginx.conf (reload to apply)."""
    conf = d.root / "nginx.conf"
    conf.write_text(conf.read_text().replace("http {\n", f"http {{\n    {directive}\n", 1))
