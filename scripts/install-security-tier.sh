#!/bin/sh
# Install what the security tier (tests/security) needs beyond scripts/install-deps.sh
# on a Debian 12 host: openssl, to make the self-signed certificate the TLS
# tests serve. nginx, systemd-analyze and the nspawn rootfs come from the other
# install scripts; hypothesis, crossplane and supervisor from the `test` extra.
set -eu

"$(dirname "$0")/apt-install-missing.sh" install-security-tier openssl
