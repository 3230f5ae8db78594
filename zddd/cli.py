"""zddctl: the command-line client of zddd's D-Bus API.

Exit status: 0 done; 1 refused, failed or timed out (the reason on stderr); 2 usage error.

`zddctl -H [USER@]HOST COMMAND` runs the same command with the zddctl of HOST, over ssh, and
exits with its status: the arguments are checked here first (a usage error is exit 2 without
any connection), ssh failures are exit 1 with a line saying so. The ssh command is
$ZDDCTL_SSH (split like a shell would, default `ssh`), the way systemctl -H takes $SYSTEMD_SSH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import subprocess
import sys
import time

from . import __version__
from .service.dbus import (BUS_NAME, ERROR_PREFIX, INTERFACE, OBJECT_PATH, Message, MessageBus,
                           MessageType, Variant, bus_address)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Long waits are asked for in slices, so no bus or client reply timeout can cut them short.
WAIT_SLICE_USEC = 60 * 1_000_000


class Failure(Exception):
    """Something to report on stderr with exit status 1."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text} is out of range 0-86400 seconds")
    return value


def _ssh_host(text: str) -> str:
    # What ssh gets as its destination: nothing it could read as an option or split apart.
    if not text or text.startswith("-") or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not [USER@]HOST")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zddctl", description="Control zddd, the zero-downtime deployment daemon.",
        epilog="Exit status: 0 done; 1 refused, failed or timed out; 2 usage error.")
    p.add_argument("--version", action="version", version=f"zddctl {__version__}")
    # None, not "system", when not given: -H passes --bus on only when it was asked for.
    p.add_argument("--bus", default=None, metavar="system|session|ADDRESS",
                   help="the D-Bus bus zddd serves on (default: system; with -H, the remote "
                        "host's bus)")
    p.add_argument("-H", "--host", type=_ssh_host, metavar="[USER@]HOST",
                   help="run the command on HOST over ssh (its zddctl, same output and exit "
                        "status; the ssh command is $ZDDCTL_SSH, default ssh)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("status", help="show the active target, drains and targets")
    s.add_argument("--json", action="store_true", help="print JSON")
    s = sub.add_parser("switch", help="steer new connections to main, backup or off",
                       description="Steer new connections to TARGET (main, backup or off). "
                                   "off drains the active target first.")
    s.add_argument("target", metavar="TARGET")
    s.add_argument("--force", action="store_true",
                   help="switch even if the target's probe failed; for off, skip the drain")
    s.add_argument("--wait-drained", nargs="?", type=_seconds, const=-1.0, default=None,
                   metavar="SECONDS",
                   help="then wait until the previously active target has no connection "
                        "(default wait: drain_timeout + 10 s)")
    s = sub.add_parser("wait-drained", help="wait until a target has no connection",
                       description="Wait until TARGET has no established connection and no "
                                   "drain of it is pending.")
    s.add_argument("target", metavar="TARGET")
    s.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="give up after this long (default 30)")
    sub.add_parser("reload", help="make zddd re-read its config file")
    return p


class Client:
    def __init__(self, bus: MessageBus):
        self.bus = bus

    @classmethod
    async def connect(cls, spec: str) -> "Client":
        try:
            bus = await MessageBus(**bus_address(spec)).connect()
        except Exception as e:
            raise Failure(f"cannot connect to the {spec} bus: {e}") from None
        return cls(bus)

    async def call(self, member: str, signature: str = "", body: list | None = None,
                   interface: str = INTERFACE) -> list:
        reply = await self.bus.call(Message(
            destination=BUS_NAME, path=OBJECT_PATH, interface=interface, member=member,
            signature=signature, body=body or []))
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or ""
            text = reply.body[0] if reply.body else name
            if name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                        "org.freedesktop.DBus.Error.NameHasNoOwner"):
                raise Failure("zddd is not running (no owner of org.zddd.Steering1 on the bus)")
            if name == "org.freedesktop.DBus.Error.AccessDenied":
                raise Failure(f"permission denied: {text}")
            short = name[len(ERROR_PREFIX):] if name.startswith(ERROR_PREFIX) else name
            raise Failure(f"{short}: {text}")
        return reply.body

    async def properties(self) -> dict:
        (props,) = await self.call("GetAll", "s", [INTERFACE],
                                   interface="org.freedesktop.DBus.Properties")
        return {k: v.value for k, v in props.items()}

    async def wait_drained(self, target: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1e6))
            (drained,) = await self.call("WaitDrained", "st",
                                         [target, min(remaining, WAIT_SLICE_USEC)])
            if drained:
                return True
            if remaining <= WAIT_SLICE_USEC:
                return False

    async def not_drained(self, target: str, seconds: float) -> str:
        """Why `target` is not drained, for the timeout message."""
        try:
            props = await self.properties()
        except Failure:
            props = {}
        n = int(props.get("Connections", {}).get(target, -1))
        if n == 0 and props.get("Draining") == target:
            return f"{target} is not drained after {seconds:g} s: its drain towards off is pending"
        what = f"{n} connection{'s' if n != 1 else ''}" if n >= 0 else "connections"
        return f"{target} still has {what} after {seconds:g} s"


def status_dict(props: dict) -> dict:
    up, conns = props.get("TargetsUp", {}), props.get("Connections", {})
    return {
        "active_target": props["ActiveTarget"],
        "draining": props["Draining"],
        "backend": props["Backend"],
        "listen_port": props["ListenPort"],
        "last_switch_usec": props["LastSwitchUSec"],
        "targets": {name: {"port": port, "up": bool(up.get(name, False)),
                           "connections": int(conns.get(name, 0))}
                    for name, port in sorted(props["Targets"].items())},
    }


def format_status(st: dict) -> str:
    lines = [
        f"active target: {st['active_target']}",
        f"draining:      {st['draining'] or '-'}",
        f"backend:       {st['backend']}",
        f"listen port:   {st['listen_port']}",
        f"last switch:   {st['last_switch_usec']} µs (data-plane commit)",
        "targets:",
    ]
    for name, t in st["targets"].items():
        lines.append(f"  {name:<7} port {t['port']:<5} {'up' if t['up'] else 'DOWN':<4} "
                     f"{t['connections']} connection{'s' if t['connections'] != 1 else ''}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    client = await Client.connect(args.bus or "system")
    try:
        if args.command == "status":
            st = status_dict(await client.properties())
            print(json.dumps(st, indent=2) if args.json else format_status(st))
        elif args.command == "reload":
            await client.call("Reload")
            print("zddd reloaded its config")
        elif args.command == "wait-drained":
            if not await client.wait_drained(args.target, args.timeout):
                raise Failure(await client.not_drained(args.target, args.timeout))
            print(f"{args.target} is drained")
        elif args.command == "switch":
            await switch(client, args)
    finally:
        client.bus.disconnect()
    return EXIT_OK


async def switch(client: Client, args: argparse.Namespace) -> None:
    props = await client.properties()
    previous = props.get("ActiveTarget", "")
    if args.force:
        await client.call("SwitchWithOptions", "sa{sv}",
                          [args.target, {"force": Variant("b", True)}])
    else:
        await client.call("Switch", "s", [args.target])
    if args.target == "off" and previous == "off":
        print("already off: nothing to drain")
    elif args.target == "off" and not args.force:
        print(f"draining {previous or 'the active target'} towards off")
    else:
        print(f"switched to {args.target}")
    if args.wait_drained is None or previous in ("", "off", args.target):
        return
    wait = args.wait_drained
    if wait < 0:
        wait = props["DrainTimeoutUSec"] / 1e6 + 10
    if not await client.wait_drained(previous, wait):
        raise Failure(await client.not_drained(previous, wait))
    print(f"{previous} is drained")


def remote_argv(args: argparse.Namespace) -> list[str]:
    """The zddctl command line that -H runs on the remote host: the parsed command, spelled out
    in full (no abbreviations left to a remote zddctl of another version), without -H."""
    argv = ["zddctl"]
    if args.bus is not None:
        argv += ["--bus", args.bus]
    argv.append(args.command)
    if args.command == "status" and args.json:
        argv.append("--json")
    elif args.command == "switch":
        if args.force:
            argv.append("--force")
        if args.wait_drained is not None:
            argv.append("--wait-drained" if args.wait_drained < 0
                        else f"--wait-drained={args.wait_drained!r}")
    elif args.command == "wait-drained":
        argv.append(f"--timeout={args.timeout!r}")
    if args.command in ("switch", "wait-drained"):
        # "--": a target that starts with "-" reaches zddd as given (and is its InvalidTarget).
        argv += ["--", args.target]
    return argv


# ssh's own failures (cannot connect, authentication, host key) are its exit status 255; a shell
# that cannot find a command exits 127 (126: found but not executable).
SSH_FAILED = 255
COMMAND_NOT_FOUND = (126, 127)


def run_remote(args: argparse.Namespace) -> int:
    try:
        ssh = shlex.split(os.environ.get("ZDDCTL_SSH", "")) or ["ssh"]
    except ValueError as e:
        raise Failure(f"ZDDCTL_SSH cannot be split into words: {e}") from None
    # -n: stdin stays ours (a `while read host` loop keeps its input); -T: no terminal, so the
    # output is byte for byte the remote zddctl's; -x -a: no X11 or agent forwarding. ssh joins
    # the remote command into one string for the remote shell: every word is quoted.
    argv = [*ssh, "-n", "-T", "-x", "-a", "--", args.host, shlex.join(remote_argv(args))]
    try:
        rc = subprocess.run(argv).returncode
    except OSError as e:
        raise Failure(f"cannot run {ssh[0]}: {e.strerror or e}") from None
    if rc in (EXIT_OK, EXIT_FAILED, EXIT_USAGE):
        return rc
    if rc == SSH_FAILED:
        raise Failure(f"ssh to {args.host} failed (its reason is above)")
    if rc in COMMAND_NOT_FOUND:
        raise Failure(f"{args.host} could not run zddctl (exit {rc}): is zddd installed there?")
    if rc < 0:
        raise Failure(f"ssh to {args.host} was killed by signal {-rc}")
    raise Failure(f"zddctl on {args.host} exited {rc}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.host is not None:
            return run_remote(args)
        return asyncio.run(run(args))
    except Failure as e:
        print(f"zddctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
