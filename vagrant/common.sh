# Shared by provision-app.sh and provision-lb.sh (sourced, not run). POSIX sh, Debian 12, root.
# Every step checks before it acts, so a second run changes nothing.

say() { echo "provision: $*"; }
die() { echo "provision: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root"
[ -d "$ZDDD_SRC/examples" ] || die "$ZDDD_SRC is not a zddd checkout (set ZDDD_SRC)"

export DEBIAN_FRONTEND=noninteractive
# Keep the admin's version of a conffile (e.g. /etc/zddd/zddd.toml written below) on reinstall.
APT_OPTS="-y -q --no-install-recommends"
APT_OPTS="$APT_OPTS -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"

# apt-get update at most once per run, and only when something is to be installed. A failed
# update (no network) is not fatal: the lists at hand may still have what is needed.
apt_update_once() {
    [ -z "${APT_UPDATED:-}" ] || return 0
    APT_UPDATED=1
    apt-get update -q || say "apt-get update failed; trying with the package lists at hand"
}

# apt_install PKG...: installs those not installed yet.
apt_install() {
    missing=""
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    say "installing$missing"
    apt_update_once
    # shellcheck disable=SC2086
    apt-get install $APT_OPTS $missing
}

# install_file SRC DEST [MODE]: copies SRC to DEST unless DEST has the same content.
# Succeeds (0) when it changed DEST, fails (1) when DEST was already right: use it in an `if`.
install_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        return 1
    fi
    install -D -m "${3:-0644}" "$1" "$2"
    say "installed $2"
}

# enable_now UNIT: enabled at boot and running.
enable_now() {
    systemctl is-enabled --quiet "$1" || systemctl enable --quiet "$1"
    systemctl is-active --quiet "$1" || systemctl start "$1"
}

# reload_now UNIT: reload (or restart) it and return once it is running again. A Type=notify
# service such as HAProxy says RELOADING=1 when the reload job has already returned, and stays
# "reloading" until its new worker says READY=1; whoever runs provisioning next expects "active".
reload_now() {
    systemctl reload-or-restart "$1"
    tries=0
    while [ "$(systemctl is-active "$1")" != active ]; do
        tries=$((tries + 1))
        [ "$tries" -le 100 ] || die "$1 is $(systemctl is-active "$1") 10 s after its reload"
        sleep 0.1
    done
}
