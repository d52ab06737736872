"""The edge options against a running nginx in front of stand-in vLLM backends.

API keys: 401 JSON in OpenAI's format (with `WWW-Authenticate: Bearer`) for a
missing, wrong or differently-cased key, 200 with a right one, /health open,
no key in the world-readable conf, the keys map 0600. Rate limit: 429 JSON per
client address. TLS: TLS 1.2/1.3 with the configured suites only, TLS 1.1
refused, no session tickets.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.harness.procs import ProcessGroup, free_port_range, wait_port
from tests.harness.tls import self_signed_certificate
from tests.harness.tools import require_tool
from vfgen import config
from vfgen.output import write_tree
from vfgen.plan import build_plan
from vfgen.render import render_all

pytestmark = pytest.mark.live

KEYS = ["sk-vfgen-test-Key-0001-AbCdEfGhIjKl", "second-key:with/odd+chars~!#%&*()[]{}|;<>?"]


@dataclass
class Edge:
    url: str
    port: int
    nginx_dir: Path
    conf: Path
    keys_map: Path | None
    deployment: config.Deployment


def _fake_vllm(procs: ProcessGroup, port: int, names: tuple[str, ...], log: Path) -> None:
    with open(log, "wb") as stderr:  # the child keeps its own copy of the descriptor
        procs.start([sys.executable, "-m", "vfgen.testing.fake_vllm", "serve", names[0], "--host", "127.0.0.1",
                     "--port", str(port), "--served-model-name", *names],
                    stdout=subprocess.DEVNULL, stderr=stderr)


def start_edge(tmp: Path, procs: ProcessGroup, extra: dict[str, Any], scheme: str = "http") -> Edge:
    """Render a two-model deployment with `extra` edge options, start its backends and nginx."""
    nginx = require_tool("nginx", "nginx-light")
    port = free_port_range(5)
    nginx_dir = tmp / "nginx"
    raw = {
        "name": "edge", "port": port, "port_start": port + 1, "nginx_dir": str(nginx_dir),
        "models": [{"model": "org/alpha", "name": "alpha", "instances": 2}, {"model": "org/beta", "name": "beta"}],
        **extra,
    }
    deployment = config.parse_deployment(raw, source="edge.yaml")
    plan = build_plan(deployment)
    arts = [a for a in render_all(plan) if a.kind == "nginx"]
    assert all(("/" + a.path).startswith(str(nginx_dir) + "/") for a in arts)
    write_tree(Path("/"), arts)  # every path is under nginx_dir (asserted above)
    for inst in plan.instances:
        model = next(m for m in deployment.models if m.key == inst.model)
        _fake_vllm(procs, inst.port, model.served_names, tmp / f"{inst.name}.log")
    run = tmp / "run"
    run.mkdir()
    conf = nginx_dir / "conf.d" / "edge.conf"
    main = tmp / "nginx.conf"
    main.write_text(
        f"worker_processes 1;\ndaemon off;\npid {run}/nginx.pid;\nerror_log {tmp}/nginx-error.log;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    client_body_temp_path {run}/body;\n    proxy_temp_path {run}/proxy;\n"
        f"    include {conf};\n}}\n"
    )
    check = subprocess.run([nginx, "-t", "-q", "-p", str(run), "-c", str(main)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    procs.start([nginx, "-p", str(run), "-c", str(main)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port, timeout=15)
    for inst in plan.instances:
        wait_port("127.0.0.1", inst.port, timeout=30)
    keys_map = nginx_dir / "vfgen" / "edge-api-keys.map" if deployment.api_key_file else None
    return Edge(f"{scheme}://127.0.0.1:{port}", port, nginx_dir, conf, keys_map, deployment)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text("# operator's keys\n" + "\n".join(KEYS) + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as c:
        yield c


def completion(model: str = "org/alpha") -> dict[str, Any]:
    return {"model": model, "prompt": "hello", "max_tokens": 2}


def assert_openai_error(resp: httpx.Response, code: int, kind: str) -> None:
    assert resp.status_code == code, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == kind and body["error"]["code"] == code and body["error"]["message"]


# --- API keys ---------------------------------------------------------------------------


def test_api_keys_gate_every_route_but_health(tmp_path: Path, procs, key_file: Path, client: httpx.Client) -> None:
    edge = start_edge(tmp_path, procs, {"api_key_file": str(key_file)})
    url = edge.url

    missing = client.post(f"{url}/v1/completions", json=completion())
    assert_openai_error(missing, 401, "AuthenticationError")
    assert missing.headers["www-authenticate"] == "Bearer"
    for bad in ("Bearer wrong-key-0123456789abcdef", f"Bearer {KEYS[0].lower()}", f"Bearer {KEYS[0]}x",
                f"Basic {KEYS[0]}", KEYS[0], f"Bearer  {KEYS[0]}"):
        assert_openai_error(client.post(f"{url}/v1/completions", json=completion(), headers={"Authorization": bad}),
                            401, "AuthenticationError")
    assert_openai_error(client.get(f"{url}/v1/models"), 401, "AuthenticationError")  # nginx's own JSON answer
    assert_openai_error(client.get(f"{url}/anything/else"), 401, "AuthenticationError")

    for key in KEYS:
        ok = client.post(f"{url}/v1/completions", json=completion(), headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and ok.json()["model"] == "org/alpha", ok.text
    # The scheme is case-insensitive (RFC 9110); the key is not (checked above).
    assert client.post(f"{url}/v1/completions", json=completion("org/beta"),
                       headers={"Authorization": f"bearer {KEYS[0]}"}).status_code == 200
    models = client.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEYS[1]}"})
    assert [m["id"] for m in models.json()["data"]] == ["org/alpha", "org/beta"]

    # /health stays open for load balancers and probes.
    assert client.get(f"{url}/health").status_code == 200

    # A body over the limit is refused when the location is chosen, before the key check: 413 JSON.
    big = client.post(f"{url}/v1/completions", content=b"x" * (33 * 1024 * 1024), headers={"Content-Type": "application/json"})
    assert_openai_error(big, 413, "RequestTooLargeError")

    # Where the keys are, and are not.
    conf_text = edge.conf.read_text()
    assert not any(key in conf_text for key in KEYS)
    assert f'include "{edge.keys_map}";' in conf_text
    assert stat.S_IMODE(os.stat(edge.conf).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(edge.keys_map).st_mode) == 0o600
    map_text = edge.keys_map.read_text()
    assert all(key.split(":")[0] in map_text.replace("\\", "") for key in KEYS)


def test_requests_without_a_key_are_answered_before_the_rate_limit(tmp_path: Path, procs, key_file: Path, client) -> None:
    """The key check runs in the rewrite phase, limit_req after it: 401s never count against a client."""
    edge = start_edge(tmp_path, procs, {"api_key_file": str(key_file), "rate_limit": "1r/m", "rate_limit_burst": 0})
    codes = [client.post(f"{edge.url}/v1/completions", json=completion()).status_code for _ in range(5)]
    assert codes == [401] * 5
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    first = client.post(f"{edge.url}/v1/completions", json=completion(), headers=auth)
    assert first.status_code == 200
    assert_openai_error(client.post(f"{edge.url}/v1/completions", json=completion(), headers=auth), 429, "RateLimitError")


# --- rate limit ---------------------------------------------------------------------------


def test_rate_limit_is_per_client_and_answers_429_json(tmp_path: Path, procs, client: httpx.Client) -> None:
    edge = start_edge(tmp_path, procs, {"rate_limit": "1r/m", "rate_limit_burst": 2})
    codes = []
    for _ in range(6):
        resp = client.post(f"{edge.url}/v1/completions", json=completion())
        codes.append(resp.status_code)
        if resp.status_code == 429:
            assert_openai_error(resp, 429, "RateLimitError")
            assert resp.headers["retry-after"] == "1"
    # One request plus a burst of two, then refusals (1r/m: no slot frees up during the test).
    assert codes == [200, 200, 200, 429, 429, 429], codes
    # Another client address has its own budget (127.0.0.2 is loopback too).
    other = httpx.Client(timeout=10.0, trust_env=False, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with other:
        assert other.post(f"{edge.url}/v1/completions", json=completion()).status_code == 200
    # /health is not rate limited.
    assert all(client.get(f"{edge.url}/health").status_code == 200 for _ in range(5))


# --- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


def handshake(port: int, cert: Path, *, version: ssl.TLSVersion, ciphers: str | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.minimum_version = ctx.maximum_version = version
    if ciphers:
        ctx.set_ciphers(ciphers)
    if version < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer it at all; the server must refuse
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return ctx.wrap_socket(sock, server_hostname="127.0.0.1")
    except Exception:
        sock.close()
        raise


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_serves_modern_protocols_only(tmp_path: Path, procs, certificate, key_file: Path) -> None:
    cert, key = certificate
    edge = start_edge(tmp_path, procs, {"tls_certificate": str(cert), "tls_certificate_key": str(key),
                                        "api_key_file": str(key_file)}, scheme="https")
    with httpx.Client(timeout=10.0, trust_env=False, verify=ssl.create_default_context(cafile=str(cert))) as tls_client:
        assert tls_client.get(f"{edge.url}/health").status_code == 200
        ok = tls_client.post(f"{edge.url}/v1/completions", json=completion(), headers={"Authorization": f"Bearer {KEYS[0]}"})
        assert ok.status_code == 200
        assert_openai_error(tls_client.post(f"{edge.url}/v1/completions", json=completion()), 401, "AuthenticationError")
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        with handshake(edge.port, cert, version=version) as tls:
            assert tls.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
            if version == ssl.TLSVersion.TLSv1_2:
                # ssl_session_tickets off: the server hands out no ticket.
                tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert tls.recv(100).startswith(b"HTTP/1.1 200")
                assert not tls.session.has_ticket
    for version in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1):
        with pytest.raises(ssl.SSLError):
            handshake(edge.port, cert, version=version).close()
    # Only the forward-secret AEAD suites of the profile: a CBC suite is refused on TLS 1.2.
    with pytest.raises(ssl.SSLError):
        handshake(edge.port, cert, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-AES128-SHA").close()
    with handshake(edge.port, cert, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305") as tls:
        assert tls.cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"
    # Plain HTTP on the TLS port gets nginx's 400, not the API.
    with httpx.Client(timeout=5.0, trust_env=False) as plain:
        assert plain.get(f"http://127.0.0.1:{edge.port}/health").status_code == 400
