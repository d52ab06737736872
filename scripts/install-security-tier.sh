#!/bin/sh
# Install what the security tier (tests/security) needs beyond scripts/install-deps.sh
# on a Debian 12 host: openssl, to make the self-signed certificate the TLS
# tests serve. nginx, systemd-analyze and the nspawn rootfs come from the other
# install scripts; hypothesis, crossplane and supervisor from the `test` extra.
set -eu

PACKAGES="openssl"
missing=""
for pkg in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi
