"""gixy (the nginx security linter, PyPI gixy-ng) finds nothing HIGH in any rendered dispatcher.

Every golden scenario and every edge option (API keys, rate limit, TLS, bounded and
zero overflow queue, affinity, routing by model) is rendered, included from a
minimal nginx.conf as nginx would, and analysed in one gixy run. Two MEDIUM checks
do not apply and are allowed, for the reasons in docs/security.md ("Static
analysis"); anything else gixy reports fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.harness.tools import missing
from tests.scenarios import EXAMPLES, SCENARIOS
from vfgen.cli import app

# plugin -> why it does not apply (kept in step with docs/security.md).
NOT_APPLICABLE = {
    # proxy_pass http://$route names an upstream{} block of this file, never a DNS name.
    "missing_resolver": "variables name upstream blocks",
    # An API endpoint for OpenAI clients, not browsers; HSTS policy belongs to the site.
    "hsts_header": "no browser clients",
}
KEY = "sk-gixy-test-key-0123456789"


def gixy_bin() -> str:
    found = shutil.which("gixy") or os.path.join(os.path.dirname(sys.executable), "gixy")
    if not os.access(found, os.X_OK):
        missing("gixy", "pip install gixy-ng (the test extra)")
    return found


def edge_scenarios(tmp: Path) -> dict[str, list[str]]:
    keys = tmp / "keys"
    keys.write_text(KEY + "\n")
    keys.chmod(0o600)
    tls = ["--tls-certificate", "/etc/ssl/vfgen/cert.pem", "--tls-certificate-key", "/etc/ssl/vfgen/key.pem"]
    return {
        "edge-every-option": ["org/m", "-n", "4", "--api-key-file", str(keys), "--rate-limit", "20r/s", *tls,
                              "--max-queue", "2", "--enable-request-affinity"],
        "edge-no-overflow": ["org/m", "-n", "2", "--max-queue", "0", "--rate-limit", "600r/m", "--rate-limit-burst", "5"],
        "edge-two-models-keys": ["-f", str(EXAMPLES / "two-llms-one-gpu.yaml"), "--api-key-file", str(keys), *tls,
                                 "--rate-limit", "5r/s", "--max-queue", "1"],
    }


def render_dispatcher(name: str, args: list[str], tmp: Path) -> Path:
    """Render into tmp/name with nginx_dir inside it, so the keys map include resolves; return a main nginx.conf."""
    nginx_dir = tmp / name / "nginx"
    out = tmp / name / "out"
    result = CliRunner().invoke(app, ["render", "--only", "dispatcher", "--output-dir", str(out), "--nginx-dir",
                                      str(nginx_dir), "--vfgen-bin", "/usr/local/bin/vfgen", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    shutil.copytree(out / str(nginx_dir).lstrip("/"), nginx_dir)
    main = tmp / name / "nginx.conf"
    main.write_text(f"events {{}}\nhttp {{\n    include {nginx_dir}/conf.d/*.conf;\n}}\n")
    return main


def test_no_rendered_dispatcher_has_a_gixy_finding_that_applies(tmp_path: Path) -> None:
    gixy = gixy_bin()
    scenarios = {n: a for n, a in SCENARIOS.items() if n != "single-instance"} | edge_scenarios(tmp_path)
    mains = {str(render_dispatcher(name, args, tmp_path)): name for name, args in sorted(scenarios.items())}
    result = subprocess.run([gixy, "-f", "json", *mains], capture_output=True, text=True, timeout=300)
    assert "File not found" not in result.stderr, result.stderr
    findings = json.loads(result.stdout or "[]")
    assert {f["path"] for f in findings} <= set(mains), "gixy analysed files it was not given"
    high = [f"{mains[f['path']]}: {f['plugin']}: {f['reason']}" for f in findings if f["severity"] == "HIGH"]
    assert not high, "\n".join(high)
    other = [f"{mains[f['path']]}: {f['severity']} {f['plugin']}: {f['reason']}" for f in findings
             if f["plugin"] not in NOT_APPLICABLE]
    assert not other, "\n".join(other)
    # Only TLS configs can lack HSTS: the allowance must not hide a finding elsewhere.
    assert {mains[f["path"]] for f in findings if f["plugin"] == "hsts_header"} <= {"edge-every-option", "edge-two-models-keys"}


def test_gixy_reports_add_header_inside_if_as_high(tmp_path: Path) -> None:
    """The check above can fail: the fallback as it was rendered before is a HIGH if_is_evil."""
    gixy = gixy_bin()
    conf = tmp_path / "nginx.conf"
    conf.write_text("events {}\nhttp {\n  server {\n    listen 127.0.0.1:8000;\n    location @fallback {\n"
                    "      if ($arg_x = \"\") {\n        add_header Retry-After 1 always;\n        return 503;\n      }\n"
                    "    }\n  }\n}\n")
    result = subprocess.run([gixy, "-f", "json", str(conf)], capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout)
    assert any(f["plugin"] == "if_is_evil" and f["severity"] == "HIGH" for f in findings), findings
