"""Promise: `access_log: json` writes one valid JSON object (in UTF-8) per request, naming every
backend tried, with nginx's request id, which the backend also received as X-Request-Id.

Under real nginx with stand-in backends (2 instances of model m, 1 of model n):
- a request's line carries its route, model, status, backend, times and sizes, and its
  request_id is the X-Request-Id the backend saw (not the one the client sent);
- after one instance of m is killed (kill -9, held down), the request that nginx retried
  logs both backends in upstream_addr, in order, with upstream_status "502, 200";
- requests with hostile values (quotes, backslashes, control bytes, JSON fragments, bytes
  that are not UTF-8) in headers, path and "model" each give exactly one line that
  parses as strict UTF-8 JSON, and valid values come back unchanged.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.harness.deploy import raw_request, wait_until

pytestmark = pytest.mark.live


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every line, strictly: UTF-8 and one JSON object each."""
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the log ends with a newline"
    records = []
    for raw in lines[:-1]:
        record = json.loads(raw.decode("utf-8"))
        assert isinstance(record, dict), raw
        records.append(record)
    return records


def requests_logged(path: Path) -> list[dict[str, Any]]:
    """The lines of this test's requests: the harness polls /health while it waits."""
    return [record for record in read_log(path) if record["uri"] != "/health"]


def new_lines(path: Path, before: int, count: int) -> list[dict[str, Any]]:
    """The `count` lines after the first `before`: nginx writes a line after the reply is sent."""
    wait_until(lambda: len(requests_logged(path)) >= before + count, timeout=10, what=f"{count} new log lines")
    lines = requests_logged(path)[before:]
    assert len(lines) == count, lines
    return lines


def request(port: int, head: bytes, body: bytes = b"") -> int:
    if body:
        head += b"\r\nContent-Type: application/json\r\nContent-Length: %d" % len(body)
    status, _, _ = raw_request(port, head + b"\r\nHost: localhost\r\nConnection: close\r\n\r\n" + body)
    return status


def test_json_access_log(live_deploy, tmp_path):
    log = tmp_path / "access.json"
    hold = tmp_path / "hold-m-0"
    d = live_deploy({
        "models": [
            {"model": "org/m", "served_model_name": "m", "instances": 2, "gpus": [0, 1],
             "instance_env": [{"VFGEN_FAKE_HOLD_FILE": str(hold)}, {}]},
            {"model": "org/n", "served_model_name": "n", "instances": 1, "gpus": [2]},
        ],
        "access_log": "json",
        "access_log_path": str(log),
    })
    m0, m1, n0 = d.backends

    # One plain request: every field, and the id joins the two logs.
    before = len(requests_logged(log))
    reply = d.http.post(f"{d.url}/v1/completions", json={"model": "n", "prompt": "hi"},
                        headers={"X-Request-Id": "client-chosen", "User-Agent": "test/1"})
    assert reply.status_code == 200
    [line] = new_lines(log, before, 1)
    assert set(line) == {"time", "request_id", "remote_addr", "method", "uri", "user_agent", "route", "model", "status",
                         "bytes_sent", "body_bytes_sent", "request_length", "request_time", "upstream_addr",
                         "upstream_status", "upstream_connect_time", "upstream_response_time"}
    assert (line["method"], line["uri"], line["user_agent"], line["route"], line["model"], line["status"]) == (
        "POST", "/v1/completions", "test/1", "live-n", "n", "200")
    assert (line["upstream_addr"], line["upstream_status"]) == (f"127.0.0.1:{n0.port}", "200")
    assert re.fullmatch(r"[0-9a-f]{32}", line["request_id"]), line
    assert re.fullmatch(r"\d+\.\d{3}", line["request_time"]) and re.fullmatch(r"\d+\.\d{3}", line["upstream_response_time"])
    assert int(line["bytes_sent"]) > int(line["body_bytes_sent"]) == len(reply.content)
    seen = [a["request_id"] for a in d.stats(n0)["arrivals"]]
    assert seen[-1] == line["request_id"], "the backend got nginx's id as X-Request-Id, not the client's"

    # A retried request names both backends, in the order nginx tried them.
    hold.touch()  # the restarted stand-in does not listen until this file goes
    os.kill(d.vllm_pid(m0), signal.SIGKILL)
    before = len(requests_logged(log))
    statuses = [d.http.post(f"{d.url}/v1/completions", json={"model": "m", "prompt": str(i)}).status_code
                for i in range(6)]
    assert statuses == [200] * 6
    lines = new_lines(log, before, 6)
    retried = [entry for entry in lines if "," in entry["upstream_addr"]]
    assert retried, [entry["upstream_addr"] for entry in lines]
    for entry in retried:
        assert entry["upstream_addr"] == f"127.0.0.1:{m0.port}, 127.0.0.1:{m1.port}", entry
        assert entry["upstream_status"] == "502, 200" and entry["status"] == "200", entry
        assert len(entry["upstream_response_time"].split(", ")) == 2, entry
    hold.unlink()
    wait_until(lambda: d.backend_ready(m0), timeout=30, what="m-0 back")

    # Hostile values: one strict-JSON line each; valid text comes back exactly.
    hostile = [
        # (request head, body, expected uri, expected user agent, expected model or None)
        (b'POST /v1/completions HTTP/1.1\r\nUser-Agent: a"b\\c\x01\x1b[31m\x7f"},{"x":1\r\nX-Request-Id: "}\\',
         b'{"model": "m", "prompt": "q"}', "/v1/completions", 'a"b\\c\x01\x1b[31m\x7f"},{"x":1', "m"),
        (b"POST /v1/completions HTTP/1.1\r\nUser-Agent: \xff\xfe\xc3\x28 not UTF-8",
         b'{"model": "\xff\xfe\\" evil"}', "/v1/completions", "(not UTF-8)", "(not UTF-8)"),
        (b"POST /v1/completions HTTP/1.1\r\nUser-Agent: caf\xc3\xa9 \xe2\x82\xac",
         b'{"model": "m\\\\\\"\\u00e4\xc3\xa4", "prompt": "q"}', "/v1/completions", "caf\u00e9 \u20ac",
         'm\\\\\\"\\u00e4\u00e4'),
        (b'GET /v1/models?q="a\\b"&u=\xc3\xa4 HTTP/1.1\r\nUser-Agent: ok', b"", '/v1/models?q="a\\b"&u=\u00e4', "ok", None),
        (b"GET /v1/models/\xff\xfe?q=\xc0\xaf HTTP/1.1\r\nUser-Agent: ok", b"", "(not UTF-8)", "ok", None),
        # nginx refuses a control byte in the request line (400) and logs the request with empty fields.
        (b"GET /v1/models?\x01\x7f HTTP/1.1\r\nUser-Agent: ok", b"", "", "", None),
        (b"GET /v1/models HTTP/1.1\r\nUser-Agent:", b"", "/v1/models", "", ""),
    ]
    before = len(requests_logged(log))
    statuses = [request(d.port, head, body) for head, body, *_ in hostile]
    lines = new_lines(log, before, len(hostile))
    # Two workers write their lines when each request ends: match lines by (uri, user_agent), unique here.
    by_key = {(entry["uri"], entry["user_agent"]): entry for entry in lines}
    assert len(by_key) == len(hostile), lines
    for (head, body, uri, agent, model), status in zip(hostile, statuses):
        entry = by_key[(uri, agent)]
        assert entry["status"] == str(status), (head, entry)
        if model is not None:
            assert entry["model"] == model, (head, entry)
        assert re.fullmatch(r"[0-9a-f]{32}", entry["request_id"]), entry
    print(f"\nhostile requests: statuses {statuses}")
