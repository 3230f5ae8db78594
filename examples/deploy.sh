#!/bin/sh
# Zero-downtime deploy of the main vhost on one zddd host.
#
#   deploy.sh COMMAND [ARGS...]
#
# 1. steers new connections to the backup vhost and waits until the main vhost has no
#    connection left (requests in flight finish on the release they started on);
# 2. runs COMMAND to deploy the main vhost, which now gets no traffic;
# 3. waits until the main vhost answers its health URL and zddd's own probe agrees;
# 4. steers new connections back to main.
#
# Example: deploy.sh sh -c 'rsync -a --delete build/ /srv/app/main/releases/42/ &&
#                           ln -sfn releases/42 /srv/app/main/current'
#
# Roll several hosts one after another (the backup vhosts carry the traffic meanwhile, so
# HAProxy sees no change). If any step fails the host stays on backup, still serving, and the
# script exits non-zero: fix the release, then run `zddctl switch main` or this script again.
#
# Environment: ZDDD_BUS (system|session|ADDRESS, default system), ZDDCTL (default zddctl),
# MAIN_HEALTH_URL (default http://127.0.0.1:8080/healthz), DRAIN_WAIT and UP_WAIT (seconds,
# default 120 and 60).
set -eu

if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]   (COMMAND deploys the main vhost)" >&2
    exit 2
fi

ZDDCTL="${ZDDCTL:-zddctl}"
ZDDD_BUS="${ZDDD_BUS:-system}"
MAIN_HEALTH_URL="${MAIN_HEALTH_URL:-http://127.0.0.1:8080/healthz}"
DRAIN_WAIT="${DRAIN_WAIT:-120}"
UP_WAIT="${UP_WAIT:-60}"

ctl() { "$ZDDCTL" --bus "$ZDDD_BUS" "$@"; }
say() { echo "deploy: $*"; }

# 1. zddctl refuses (exit 1, TargetUnhealthy) if the backup vhost is not healthy: then nothing
#    has changed and we stop here. --wait-drained returns once main has no established
#    connection, or fails after DRAIN_WAIT seconds (the host is then on backup already).
say "switching to backup and waiting for main to drain"
ctl switch backup --wait-drained="$DRAIN_WAIT"

# 2. The deploy itself. From here on, a failure leaves the host on backup.
trap 'say "FAILED: the host stays on backup; run \`zddctl switch main\` once main is fixed" >&2' EXIT
say "deploying: $*"
"$@"

# 3. Wait for the application, then for zddd's probe: `switch main` is refused with
#    TargetUnhealthy until zddd has seen main pass, so retrying it is the wait.
say "waiting for main to answer $MAIN_HEALTH_URL"
deadline=$(( $(date +%s) + UP_WAIT ))
until curl -fsS -o /dev/null --max-time 2 "$MAIN_HEALTH_URL"; do
    [ "$(date +%s)" -lt "$deadline" ] || { say "main did not come up in ${UP_WAIT}s" >&2; exit 1; }
    sleep 0.5
done

# 4. Back to main. Connections on the backup vhost finish there.
until out=$(ctl switch main 2>&1); do
    case "$out" in
        *TargetUnhealthy*) ;;  # zddd's next probe has not run yet
        *) echo "$out" >&2; exit 1 ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || { echo "$out" >&2; exit 1; }
    sleep 0.5
done
trap - EXIT
say "done: main serves the new release"
