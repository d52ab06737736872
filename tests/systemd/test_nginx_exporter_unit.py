"""Promise: the rendered NAME-nginx-exporter.service runs Debian's exporter under real systemd 252,
with all of its sandboxing, and serves nginx's numbers read from the loopback stub_status.

The host's /usr/bin/prometheus-nginx-exporter (a static Go binary from Debian's package) is bound
into the container; a 10-line Python server stands in for nginx's stub_status page on the
rendered status port (the live tier reads a real nginx's). The unit is the rendered file,
unchanged. Its user is created as the package's postinst would.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tests.harness.nspawn import booted_container
from tests.harness.tools import require_tool
from tests.harness.waiting import wait_until
from vfgen.cli import app

pytestmark = pytest.mark.systemd

EXPORTER = "/usr/bin/prometheus-nginx-exporter"
STUB = """\
import http.server
BODY = b"Active connections: 3 \\nserver accepts handled requests\\n 17 17 42 \\nReading: 0 Writing: 1 Waiting: 2 \\n"
class Stub(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/stub_status" else 404)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
http.server.HTTPServer(("127.0.0.1", 9112), Stub).serve_forever()
"""
STUB_UNIT = "[Service]\nExecStart=/usr/bin/python3 /opt/stub_status.py\n"


def test_exporter_unit_runs_sandboxed_and_reads_stub_status(rootfs) -> None:
    require_tool("prometheus-nginx-exporter", "prometheus-nginx-exporter")
    result = CliRunner().invoke(app, ["render", "org/m", "-n", "2", "--nginx-exporter", "--emit", "nginx-exporter"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    unit = result.stdout
    assert "-nginx.scrape-uri=http://127.0.0.1:9112/stub_status" in unit

    with booted_container(binds=[EXPORTER], rootfs=rootfs) as c:
        c.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "prometheus"])
        c.write_file("/opt/stub_status.py", STUB)
        c.write_file("/etc/systemd/system/stub.service", STUB_UNIT)
        c.write_file("/etc/systemd/system/vllm-nginx-exporter.service", unit)
        c.systemctl("daemon-reload")
        c.systemctl("start", "stub.service")
        wait_until(lambda: c.run(["curl", "-sf", "http://127.0.0.1:9112/stub_status"], check=False).returncode == 0,
                   timeout=20, what="stub_status up")
        c.systemctl("start", "vllm-nginx-exporter.service")

        def metrics() -> str | None:
            got = c.run(["curl", "-sf", "--max-time", "2", "http://127.0.0.1:9113/metrics"], check=False)
            return got.stdout if got.returncode == 0 else None

        text = wait_until(metrics, timeout=20, what="exporter /metrics")
        assert "\nnginx_up 1\n" in text, c.journal("vllm-nginx-exporter.service")
        assert "\nnginx_connections_accepted 17\n" in text and "\nnginx_http_requests_total 42\n" in text
        shown = c.show("vllm-nginx-exporter.service", "ActiveState", "User", "NRestarts", "IPAddressDeny")
        assert (shown["ActiveState"], shown["User"], shown["NRestarts"]) == ("active", "prometheus", "0"), shown

        # nginx gone: the exporter stays up and says so, which is what VfgenDispatcherDown watches.
        c.systemctl("stop", "stub.service")
        wait_until(lambda: "\nnginx_up 0\n" in (metrics() or ""), timeout=20, what="nginx_up 0")
        assert c.show("vllm-nginx-exporter.service", "ActiveState")["ActiveState"] == "active"
