#!/bin/sh
# Provision a zddd app server (Debian 12, as root):   provision-app.sh NAME
#
#   - nginx-light with the shipped vhosts: main on :8080, backup on :80 (Debian's default site
#     removed), each serving a page "NAME main" / "NAME backup" and the /healthz file the vhosts
#     answer for;
#   - zddd from the newest $ZDDD_SRC/dist/zddd_*_all.deb (`make deb` on the host), installed with
#     apt, configured with examples/zddd.toml (listen port 8888, http:/healthz probes, agent on
#     8889 for HAProxy's agent-check).
#
# ZDDD_SRC is the checkout (default /vagrant, Vagrant's synced folder). Idempotent: a second run
# changes nothing and restarts nothing; pages already there (e.g. deployed releases) are kept.
set -eu

NAME="${1:?usage: provision-app.sh NAME}"
ZDDD_SRC="${ZDDD_SRC:-/vagrant}"
. "$ZDDD_SRC/vagrant/common.sh"
# Before anything is changed: the package comes from the host's `make deb`.
# shellcheck disable=SC2012  # ls -v: the newest version last; the names are zddd_<version>_all.deb
deb="$(ls -v "$ZDDD_SRC"/dist/zddd_*_all.deb 2>/dev/null | tail -n 1 || true)"
[ -n "$deb" ] || die "no $ZDDD_SRC/dist/zddd_*_all.deb: run 'make deb' in the checkout first"
# zddd depends on the zddctl of its own version, which `make deb` builds beside it.
client="${deb%/*}/zddctl_${deb##*/zddd_}"
[ -e "$client" ] || die "no $client beside $deb: run 'make deb' in the checkout again"

# ---- nginx: the two vhosts ----
apt_install nginx-light
nginx_changed=""
for vhost in main backup; do
    site="/etc/nginx/sites-available/app-$vhost"
    link="/etc/nginx/sites-enabled/app-$vhost"
    if install_file "$ZDDD_SRC/examples/nginx/$vhost.conf" "$site"; then
        nginx_changed=1
    fi
    if [ "$(readlink "$link" || true)" != "../sites-available/app-$vhost" ]; then
        ln -sfn "../sites-available/app-$vhost" "$link"
        nginx_changed=1
    fi
    # A first release, only where there is none: a re-run never overwrites a deployed one.
    dir="/srv/app/$vhost"
    if [ ! -e "$dir/current" ]; then
        mkdir -p "$dir/releases/provisioned"
        printf '%s %s\n' "$NAME" "$vhost" > "$dir/releases/provisioned/index.html"
        echo ok > "$dir/releases/provisioned/healthz"
        ln -sfn releases/provisioned "$dir/current"
        say "created $dir/current (\"$NAME $vhost\")"
    fi
done
# Debian's default site listens on :80 too, where the backup vhost is.
if [ -e /etc/nginx/sites-enabled/default ] || [ -L /etc/nginx/sites-enabled/default ]; then
    rm -f /etc/nginx/sites-enabled/default
    nginx_changed=1
fi
if [ -n "$nginx_changed" ]; then
    nginx -t -q
    reload_now nginx
    say "nginx reloaded"
fi
enable_now nginx

# ---- zddd ----
# The same version may be rebuilt with other contents: a checksum of what was installed decides.
stamp=/var/lib/zddd-provision/installed-deb.sha256
sum="$(cat "$deb" "$client" | sha256sum | cut -d' ' -f1)"
zddd_changed=""
if ! dpkg-query -W -f='${Status}\n' zddd 2>/dev/null | grep -q 'install ok installed' \
        || [ "$(cat "$stamp" 2>/dev/null || true)" != "$sum" ]; then
    say "installing $deb"
    apt_update_once
    # shellcheck disable=SC2086
    apt-get install $APT_OPTS --reinstall "$deb" "$client"
    mkdir -p "${stamp%/*}"
    echo "$sum" > "$stamp"
    zddd_changed=1
fi
if install_file "$ZDDD_SRC/examples/zddd.toml" /etc/zddd/zddd.toml; then
    zddd_changed=1
fi
enable_now zddd
if [ -n "$zddd_changed" ]; then
    # A restart adopts the kernel's steering; reload would refuse a change of listen_port.
    systemctl restart zddd
    say "zddd restarted"
fi
say "$NAME ready: zddd steers :8888 to the main vhost (\`zddctl switch backup\` flips it)"
