"""Promise: a real Prometheus with vfgen's targets file and alert rules sees an outage and its end.

A rendered deployment (2 instances of model m, 1 of model n) runs under nginx and
supervisord with stand-in backends; Debian's prometheus-nginx-exporter runs with the
arguments of the rendered unit. A real Prometheus (Debian's package, on a free
loopback port, 1 s scrape and evaluation interval) reads the rendered file_sd list and
rules, with the `for:` windows shortened through the deployment's `alerts:` settings.
Everything is asserted through Prometheus's HTTP API:

1. every target (3 instances and the exporter) is up, and no alert is active;
2. kill -9 of one stand-in (held down by its hold file when supervisord restarts it):
   VfgenInstanceDown fires for it, with the targets file's labels; VfgenModelDown does not;
3. every instance of model m stopped: VfgenModelDown fires (critical) for both, not for n;
4. the instances come back: both alerts resolve and every target is up again.
"""

from __future__ import annotations

import shlex
import signal
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness.deploy import LiveDeployment, wait_until
from tests.harness.procs import free_port, wait_port
from tests.harness.tools import require_tool

pytestmark = pytest.mark.live

WINDOW = "2s"  # every `for:` of the test deployment
ALERT_TIMEOUT = 30.0  # 1 s scrapes, 2 s windows: seen firing in about 4 s


class Prometheus:
    """Prometheus's HTTP API."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.http = httpx.Client(timeout=5.0, trust_env=False)

    def get(self, path: str, **params: str) -> Any:
        reply = self.http.get(f"{self.url}{path}", params=params)
        reply.raise_for_status()
        body = reply.json()
        assert body["status"] == "success", body
        return body["data"]

    def targets(self) -> list[dict[str, Any]]:
        return self.get("/api/v1/targets", state="active")["activeTargets"]

    def alerts(self, state: str | None = None) -> list[dict[str, Any]]:
        found = self.get("/api/v1/alerts")["alerts"]
        return [a for a in found if state is None or a["state"] == state]

    def firing(self, name: str) -> set[str]:
        """instance_name of every firing alert called `name`."""
        return {a["labels"]["instance_name"] for a in self.alerts("firing") if a["labels"]["alertname"] == name}


def start_exporter(d: LiveDeployment, procs, root: Path) -> int:
    """prometheus-nginx-exporter exactly as the rendered unit runs it."""
    require_tool("prometheus-nginx-exporter", "prometheus-nginx-exporter")
    unit = (d.out / "etc/systemd/system" / f"{d.name}-nginx-exporter.service").read_text()
    line = next(l for l in unit.splitlines() if l.startswith("ExecStart="))
    assert "%" not in line and "$" not in line  # no systemd specifiers for shlex to mistake
    argv = shlex.split(line[len("ExecStart="):])
    listen = next(a for a in argv if a.startswith("-web.listen-address=")).split("=", 1)[1]
    with open(root / "exporter.log", "wb") as log:
        procs.start(argv, stdout=log, stderr=subprocess.STDOUT)
    port = int(listen.rsplit(":", 1)[1])
    wait_port("127.0.0.1", port)
    return port


def start_prometheus(d: LiveDeployment, procs, root: Path) -> Prometheus:
    binary = require_tool("prometheus", "prometheus")
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(d.out / "etc/prometheus/rules" / f"{d.name}.yml")],
        "scrape_configs": [{
            "job_name": "vfgen",
            "file_sd_configs": [{"files": [str(d.out / "etc/prometheus/file_sd" / f"{d.name}.json")]}],
        }],
    }))
    check = subprocess.run([require_tool("promtool", "prometheus"), "check", "config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    with open(root / "prometheus.log", "wb") as log:
        procs.start([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(port)
    wait_until(lambda: _ready(prom), timeout=30, what="Prometheus ready")
    return prom


def _ready(prom: Prometheus) -> bool:
    try:
        return prom.http.get(f"{prom.url}/-/ready").status_code == 200
    except httpx.HTTPError:
        return False


def test_instance_and_model_down_fire_and_resolve(live_deploy, procs, tmp_path):
    holds = {name: tmp_path / f"hold-{name}" for name in ("m-0", "m-1", "n-0")}
    d = live_deploy({
        "models": [
            {"model": "org/m", "served_model_name": "m", "instances": 2, "gpus": [0, 1],
             "instance_env": [{"VFGEN_FAKE_HOLD_FILE": str(holds["m-0"])}, {"VFGEN_FAKE_HOLD_FILE": str(holds["m-1"])}]},
            {"model": "org/n", "served_model_name": "n", "instances": 1, "gpus": [2],
             "instance_env": [{"VFGEN_FAKE_HOLD_FILE": str(holds["n-0"])}]},
        ],
        "nginx_exporter": True, "nginx_exporter_port": free_port(), "nginx_status_port": free_port(),
        "alerts": {"instance_down_for": WINDOW, "model_down_for": WINDOW, "dispatcher_down_for": WINDOW},
    })
    started = time.monotonic()

    def mark(what: str) -> None:
        print(f"\n{time.monotonic() - started:5.1f}s {what}")

    m0, m1, n0 = d.backends
    assert [b.program for b in d.backends] == ["live-m-0", "live-m-1", "live-n-0"]
    start_exporter(d, procs, tmp_path)
    prom = start_prometheus(d, procs, tmp_path)

    # 1. Every target up: the three instances and the exporter, with the targets file's labels.
    def all_up() -> list[dict[str, Any]] | None:
        targets = prom.targets()
        return targets if len(targets) == 4 and all(t["health"] == "up" for t in targets) else None

    targets = wait_until(all_up, timeout=ALERT_TIMEOUT, what="every target up")
    by_name = {t["labels"]["instance_name"]: t["labels"] for t in targets}
    assert by_name["live-m-1"] == {"job": "vfgen", "instance": f"127.0.0.1:{m1.port}", "deployment": "live",
                                   "component": "vllm", "model": "m", "instance_name": "live-m-1", "gpu": "1"}
    assert by_name["live-dispatcher"]["component"] == "dispatcher"
    nginx_up = prom.get("/api/v1/query", query='nginx_up{deployment="live"}')["result"]
    assert [r["value"][1] for r in nginx_up] == ["1"], nginx_up  # the exporter reads the rendered stub_status
    assert prom.alerts() == []
    mark("every target up")

    # 2. kill -9 one stand-in; supervisord restarts it, and the hold file keeps the new one from listening.
    holds["m-0"].touch()
    victim = d.vllm_pid(m0)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: prom.firing("VfgenInstanceDown") == {"live-m-0"}, timeout=ALERT_TIMEOUT,
               what="VfgenInstanceDown firing for live-m-0 only")
    alert = next(a for a in prom.alerts("firing") if a["labels"]["alertname"] == "VfgenInstanceDown")
    assert {k: alert["labels"][k] for k in ("deployment", "model", "instance_name", "gpu", "severity")} == {
        "deployment": "live", "model": "m", "instance_name": "live-m-0", "gpu": "0", "severity": "warning"}
    assert "systemctl status live-m-0.service" in alert["annotations"]["description"]
    assert prom.firing("VfgenModelDown") == set(), "model m still has live-m-1"
    mark("instance down fired")

    # 3. Every instance of model m stopped: critical, per instance, and nothing for n.
    d.supervisorctl("stop", d.program(m0), d.program(m1))
    wait_until(lambda: prom.firing("VfgenModelDown") == {"live-m-0", "live-m-1"}, timeout=ALERT_TIMEOUT,
               what="VfgenModelDown firing for both instances of m")
    model_alerts = [a for a in prom.alerts("firing") if a["labels"]["alertname"] == "VfgenModelDown"]
    assert {(a["labels"]["model"], a["labels"]["severity"]) for a in model_alerts} == {("m", "critical")}
    assert prom.firing("VfgenInstanceDown") == {"live-m-0", "live-m-1"}
    mark("model down fired")

    # 4. Back: both alerts resolve, every target is up again.
    holds["m-0"].unlink()
    d.supervisorctl("start", d.program(m0), d.program(m1))
    d.wait_healthy()
    mark("instances healthy again")
    wait_until(lambda: all_up() and not prom.alerts(), timeout=ALERT_TIMEOUT,
               what="every target up and no alert active")
    assert prom.firing("VfgenModelDown") == prom.firing("VfgenInstanceDown") == set()
    mark("both resolved")
