"""A throwaway self-signed certificate for 127.0.0.1 / localhost, made by the real openssl."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.harness.tools import require_tool


def self_signed_certificate(where: Path) -> tuple[Path, Path]:
    """(certificate, key) in `where`; the key is mode 0600 as an operator would keep it."""
    openssl = require_tool("openssl", "openssl")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True, timeout=60)
    key.chmod(0o600)
    return cert, key
