#!/bin/sh
# Provision the load balancer (Debian 12, as root): HAProxy with the shipped
# examples/haproxy/traffic-port.cfg as is (frontend :80, app servers 198.51.100.11 and .12 on
# their port 8888, agent-check on 8889).
#
# ZDDD_SRC is the checkout (default /vagrant, Vagrant's synced folder). Idempotent: a second run
# changes nothing and reloads nothing.
set -eu

ZDDD_SRC="${ZDDD_SRC:-/vagrant}"
. "$ZDDD_SRC/vagrant/common.sh"

apt_install haproxy
cfg="$ZDDD_SRC/examples/haproxy/traffic-port.cfg"
haproxy -c -q -f "$cfg" || die "haproxy -c rejects $cfg"
changed=""
if install_file "$cfg" /etc/haproxy/haproxy.cfg; then
    changed=1
fi
enable_now haproxy
if [ -n "$changed" ]; then
    reload_now haproxy
    say "haproxy reloaded"
fi
say "lb ready: HAProxy on :80"
