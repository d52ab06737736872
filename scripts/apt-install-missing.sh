#!/bin/sh
# Install those of the given Debian packages that are not installed yet; nothing
# (not even `apt-get update`) when all are. Uses sudo when not run as root.
#
# Usage: scripts/apt-install-missing.sh TAG PACKAGE...
#   TAG prefixes the one line it prints, e.g. "install-deps".
set -eu

tag=$1
shift
missing=""
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
[ -n "$missing" ] || exit 0
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "[$tag] apt-get install$missing"
$SUDO apt-get update -q
# $missing unquoted on purpose: one word per package.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
