#!/bin/sh
# Kernel headers for bcc, for `make setup` on development and CI machines.
#
# bcc compiles zddd's BPF programs at start against /lib/modules/$(uname -r)/build. A Debian
# server running Debian's kernel gets them from linux-headers-$(uname -r). These machines run a
# kernel with no headers package, so the newest Debian headers stand in: networking programs
# use only stable UAPI structures and BTF-free helpers, and were checked to compile and load.
# Nothing is done when the running kernel already has its build directory.
set -eu
release=$(uname -r)
moddir=/lib/modules/$release
[ -e "$moddir/build/include" ] && exit 0
if apt-cache show "linux-headers-$release" >/dev/null 2>&1; then
    dpkg -s "linux-headers-$release" >/dev/null 2>&1 ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$release"
    exit 0
fi
dpkg -s linux-headers-amd64 >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-headers-amd64
amd64=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
common=${amd64%-amd64}-common
[ -d "$amd64" ] && [ -d "$common" ] || { echo "bpf-headers: no Debian headers found" >&2; exit 1; }
mkdir -p "$moddir"
ln -sfn "$amd64" "$moddir/build"
ln -sfn "$common" "$moddir/source"
echo "bpf-headers: $moddir/build -> $amd64 (stand-in headers for bcc)"
