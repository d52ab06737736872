#!/bin/sh
# Install what the systemd test tier (tests/systemd, marker "systemd") needs
# on a Debian 12 host: systemd-nspawn to boot the container, debootstrap to
# build its rootfs, nsenter (util-linux) to run commands inside.
#
# Usage: scripts/install-systemd-tier.sh [--prebuild]
#   --prebuild  also build the cached rootfs now (about a minute) instead of
#               on the first test run.
set -eu

if [ "$(id -u)" -ne 0 ]; then
    echo "$0: run as root (apt-get, and the tests themselves need root)" >&2
    exit 1
fi

"$(dirname "$0")/apt-install-missing.sh" install-systemd-tier systemd-container debootstrap \
    debian-archive-keyring util-linux iproute2 curl

if [ "${1:-}" = "--prebuild" ]; then
    cd "$(dirname "$0")/.."
    "${PYTHON:-python3}" -c 'from tests.harness.nspawn import ensure_rootfs; print(ensure_rootfs())'
fi
