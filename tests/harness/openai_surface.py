"""Every path vLLM 0.32 serves, sent through a running dispatcher: routed by model, or a clear JSON answer.

The path list is tests/fixtures/vllm-openapi/paths.json (from a real instance's
/openapi.json). What each path should get comes from vfgen's plan tables, so a
path vLLM adds later and vfgen does not handle shows up as "routed" and must
then really reach the named model's backend. Whether a request reached a backend,
and which, is read from nginx's access log ($upstream_addr), so the check works
the same with stand-ins and with real vLLM.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Mapping

from tests.harness.deploy import LiveDeployment
from vfgen.plan import ANY_BACKEND_PATHS, PER_INSTANCE_PATHS

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "vllm-openapi" / "paths.json"
DISPATCHER_HEALTH = ("/health", "/ping")
LOCAL = ("/v1/models",)
STATEFUL_PREFIX = "/v1/responses/"


def vllm_paths() -> dict[str, dict[str, list[str]]]:
    """{"generate": {path: [METHOD...]}, "pooling": {...}} as vLLM 0.32 serves them."""
    data = json.loads(FIXTURE.read_text())
    return {kind: data[kind] for kind in ("generate", "pooling")}


def _upstream(d: LiveDeployment, tag: str) -> str | None:
    """$upstream_addr of the request tagged `tag` (nginx logs after answering: wait, bounded)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in d.nginx_access_log().splitlines():
            if tag in line:
                found = re.search(r'upstream="([^"]*)"', line)
                return found.group(1) if found else None
        time.sleep(0.02)
    raise AssertionError(f"nginx logged no request {tag}")


def check_every_path(d: LiveDeployment, models: Mapping[str, str]) -> list[str]:
    """`models`: served name -> "generate" | "pooling". Returns the problems found (empty: all good)."""
    per_instance = {path for path, _ in PER_INSTANCE_PATHS}
    ports = {name: {int(server.rsplit(":", 1)[1]) for pool in d.plan["pools"] if name in pool["served_names"]
                    for server in pool["servers"]} for name in models}
    all_ports = {b.port for b in d.backends}
    problems = []
    done = set()
    for name, kind in models.items():
        for path, methods in vllm_paths()[kind].items():
            for method in methods:
                concrete = path.replace("{response_id}", "resp_0123")
                routed_by_body = not (concrete in per_instance or concrete in DISPATCHER_HEALTH or concrete in LOCAL
                                      or concrete in ANY_BACKEND_PATHS or concrete.startswith(STATEFUL_PREFIX))
                if (method, concrete) in done and not routed_by_body:
                    continue
                done.add((method, concrete))
                tag = f"probe={uuid.uuid4().hex}"
                body = {"model": name, "prompt": "hi", "input": "hi", "messages": [{"role": "user", "content": "hi"}],
                        "tokens": [1, 2], "max_tokens": 2} if method == "POST" else None
                resp = d.http.request(method, f"{d.url}{concrete}?{tag}", json=body)
                upstream = _upstream(d, tag)
                used = {int(port) for port in re.findall(r":(\d+)(?=[,\s]|$)", upstream or "")}
                what = f"{method} {concrete} (model {name}): {resp.status_code} {resp.text[:160]!r} upstream={upstream}"
                is_json = resp.headers.get("content-type", "").startswith("application/json")
                if concrete in per_instance:
                    urls = [f"{b.url}{concrete}" for b in d.backends]
                    message = resp.json().get("error", {}).get("message", "") if is_json else ""
                    if resp.status_code != 404 or not is_json or used or any(u not in message for u in urls):
                        problems.append(f"per-instance path not answered with a JSON 404 naming each instance: {what}")
                elif concrete in DISPATCHER_HEALTH or concrete in ANY_BACKEND_PATHS:
                    if resp.status_code != 200 or not used or not used <= all_ports:
                        problems.append(f"not answered by a backend: {what}")
                elif concrete in LOCAL:
                    if resp.status_code != 200 or used or name not in resp.text:
                        problems.append(f"not the dispatcher's model list: {what}")
                elif concrete.startswith(STATEFUL_PREFIX):
                    if resp.status_code != 404 or not is_json or used or "Stored responses" not in resp.text:
                        problems.append(f"stateful path without a clear JSON 404: {what}")
                elif not used or not used <= ports[name]:
                    problems.append(f"not routed to a backend of {name}: {what}")
    return problems
