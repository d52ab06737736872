#!/usr/bin/env bash
# Install what the Ansible test tier (tests/ansible, marker "ansible") needs on
# a Debian 12 host, and cache what its containers need offline.
#
#   1. ansible-core and ansible-lint (pinned) into this Python, plus hatchling
#      so the tests can build the vfgen wheel without a package index.
#   2. A wheelhouse of vfgen's runtime dependencies (the containers have no
#      network; the role installs vfgen with --no-index --find-links).
#   3. A local apt repository with the Debian packages the role installs on a
#      bare host (python3-venv, and python3-apt that Ansible's apt module
#      needs), version-matched to the python3.11 of the test rootfs.
#
# Idempotent: a second run checks a marker and exits in about a second.
# Needs root (apt-get) and the systemd tier's rootfs (built here if missing).
#
#   VFGEN_ANSIBLE_CACHE  cache directory (default ~/.cache/vfgen/ansible-tier)
#   FORCE=1              rebuild the cache even when the marker matches
set -euo pipefail
cd "$(dirname "$0")/.."

ANSIBLE_CORE_VERSION=2.19.14  # the last ansible-core that runs on Python 3.11 (2.20 needs 3.12)
ANSIBLE_LINT_VERSION=26.10.1
HATCHLING_VERSION=1.33.0
PYTHON="${PYTHON:-python3}"
CACHE="${VFGEN_ANSIBLE_CACHE:-$HOME/.cache/vfgen/ansible-tier}"
# What the role installs on a bare Debian host (python3-venv, python3-packaging), and python3-apt, which
# Ansible's apt module needs; their dependencies are resolved against the rootfs.
APT_PACKAGES="python3-venv python3-packaging python3-apt"

if [ "$(id -u)" -ne 0 ]; then
    echo "$0: run as root (apt-get, and the tests themselves boot containers)" >&2
    exit 1
fi

echo "[install-ansible-tier] pip install ansible-core==$ANSIBLE_CORE_VERSION ansible-lint==$ANSIBLE_LINT_VERSION hatchling==$HATCHLING_VERSION"
"$PYTHON" -m pip install -q --disable-pip-version-check \
    "ansible-core==$ANSIBLE_CORE_VERSION" "ansible-lint==$ANSIBLE_LINT_VERSION" "hatchling==$HATCHLING_VERSION"

if ! command -v dpkg-scanpackages >/dev/null; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends dpkg-dev
fi

ROOTFS=$("$PYTHON" -c 'from tests.harness.nspawn import ensure_rootfs; print(ensure_rootfs())')
PY_VERSION=$(dpkg-query --admindir="$ROOTFS/var/lib/dpkg" -W -f='${Version}' python3.11)
DEPS=$("$PYTHON" - <<'EOF'
import tomllib
print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
EOF
)
SCRIPT_HASH=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
WANT_MARKER="python3.11=$PY_VERSION deps=$DEPS script=$SCRIPT_HASH"
MARKER="$CACHE/marker"

if [ "${FORCE:-0}" != 1 ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT_MARKER" ]; then
    echo "[install-ansible-tier] cache $CACHE is complete (marker matches); nothing to do"
    exit 0
fi

rm -rf "$CACHE.tmp"
mkdir -p "$CACHE.tmp/wheels" "$CACHE.tmp/apt"

echo "[install-ansible-tier] wheelhouse of vfgen's dependencies: $DEPS"
# shellcheck disable=SC2086  # DEPS is a list of requirement words
"$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$CACHE.tmp/wheels" $DEPS

echo "[install-ansible-tier] apt packages for the containers: $APT_PACKAGES (python3.11 $PY_VERSION)"
apt-get update -q >/dev/null
mkdir -p "$CACHE.tmp/apt/partial"
# Resolve against the rootfs's dpkg status, so exactly what a bare container lacks
# is downloaded; python3.11-venv must match the rootfs's python3.11 exactly.
# shellcheck disable=SC2086  # APT_PACKAGES is a list of package names
apt-get -q -y --no-install-recommends \
    -o Dir::State::status="$ROOTFS/var/lib/dpkg/status" -o Dir::Cache::archives="$CACHE.tmp/apt" \
    -o Debug::NoLocking=1 install --download-only $APT_PACKAGES "python3.11-venv=$PY_VERSION" >"$CACHE.tmp/apt-get.log" 2>&1 || {
    cat "$CACHE.tmp/apt-get.log" >&2
    exit 1
}
rm -rf "$CACHE.tmp/apt/partial" "$CACHE.tmp/apt/lock" "$CACHE.tmp/apt-get.log"
(cd "$CACHE.tmp/apt" && dpkg-scanpackages --multiversion . /dev/null 2>/dev/null >Packages)

echo "$WANT_MARKER" >"$CACHE.tmp/marker"
rm -rf "$CACHE"
mv "$CACHE.tmp" "$CACHE"
echo "[install-ansible-tier] done: $CACHE ($(du -sh "$CACHE" | cut -f1))"
