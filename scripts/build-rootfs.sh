#!/bin/sh
# Build the Debian bookworm minbase rootfs that the systemd test tier boots
# with systemd-nspawn.
#
# Usage: scripts/build-rootfs.sh DEST
#
# The rootfs is built in a temporary directory next to DEST and renamed into
# place only when complete, so a crash never leaves a half-built DEST.
# The mirror is read from /etc/apt/sources.list.d/debian.sources (the first
# URIs line of the stanza whose Suites include "bookworm"); override it with
# VFGEN_DEBIAN_MIRROR. Must run as root. Concurrent callers are serialised
# with flock on DEST.lock; the loser finds DEST built and returns.
#
# When PACKAGES changes, bump ROOTFS_VERSION in tests/harness/nspawn.py so
# every machine rebuilds its cache.
set -eu

PACKAGES="systemd,systemd-sysv,dbus,python3,curl,iproute2,nginx-light,procps"
SUITE="bookworm"

if [ "$#" -ne 1 ]; then
    echo "usage: $0 DEST" >&2
    exit 2
fi
DEST=$1

if [ "$(id -u)" -ne 0 ]; then
    echo "$0: debootstrap needs root" >&2
    exit 1
fi
DEBOOTSTRAP=$(command -v debootstrap || echo /usr/sbin/debootstrap)
if [ ! -x "$DEBOOTSTRAP" ]; then
    echo "$0: debootstrap is missing (apt-get install debootstrap, or scripts/install-systemd-tier.sh)" >&2
    exit 1
fi
PARENT=$(dirname "$DEST")
mkdir -p "$PARENT"
exec 9>"$DEST.lock"
flock 9
if [ -e "$DEST" ]; then
    echo "$0: $DEST already exists; nothing to do" >&2
    exit 0
fi

mirror_from_sources() {
    # deb822: stanzas separated by blank lines; pick the stanza whose Suites
    # list the plain suite name (not bookworm-security).
    awk -v suite="$SUITE" '
        BEGIN { RS = ""; FS = "\n" }
        {
            uris = ""; match_suite = 0
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, u, /[ \t]+/); uris = u[1] }
                if ($i ~ /^Suites:/) {
                    n = split($i, s, /[ \t]+/)
                    for (j = 2; j <= n; j++) if (s[j] == suite) match_suite = 1
                }
            }
            if (match_suite && uris != "") { print uris; exit }
        }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true
}

remove_build_dir() {
    # debootstrap mounts /proc, /sys, ... inside its target; a killed build can
    # leave them. Unmount deepest first, then never cross into another file system.
    awk -v dir="$1" '$5 == dir || index($5, dir "/") == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r mount_point; do umount -l "$mount_point" || true; done
    rm -rf --one-file-system "$1"
}

MIRROR=${VFGEN_DEBIAN_MIRROR:-$(mirror_from_sources)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

# Leftovers of builds that were killed (we hold the lock, so none is running).
for stale in "$PARENT/.build-$(basename "$DEST")".*; do
    [ -d "$stale" ] && remove_build_dir "$stale"
done
WORK=$(mktemp -d "$PARENT/.build-$(basename "$DEST").XXXXXX")
trap 'remove_build_dir "$WORK"' EXIT
trap 'exit 130' INT TERM

echo "building $SUITE rootfs in $WORK from $MIRROR" >&2
"$DEBOOTSTRAP" --variant=minbase --include="$PACKAGES" "$SUITE" "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 40 "$WORK/debootstrap.log" >&2
    exit 1
}

ROOT=$WORK/rootfs
# Tests start the services they need; nginx must not grab port 80 at boot.
rm -f "$ROOT/etc/systemd/system/multi-user.target.wants/nginx.service"
# A predictable hostname; machine-id stays empty so nspawn assigns one per boot.
echo vfgen-test >"$ROOT/etc/hostname"
: >"$ROOT/etc/machine-id"
# Lets tests/harness/nspawn.py notice a cache built from an older package list.
echo "packages=$PACKAGES" >"$ROOT/etc/vfgen-rootfs"
# Nothing inside the container can reach a package index anyway.
rm -rf "$ROOT/var/cache/apt/archives/"*.deb "$ROOT/var/lib/apt/lists/"* 2>/dev/null || true

mv "$ROOT" "$DEST"
echo "rootfs ready at $DEST" >&2
