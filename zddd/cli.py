"""zddctl: the command-line client of zddd's D-Bus API.

Exit status: 0 done; 1 refused, failed or timed out (the reason on stderr); 2 usage error;
130 interrupted. With --json, every command prints one JSON object on stdout, a failure too:
{"error": NAME, "message": ...}, NAME being the D-Bus error name or a short local one (usage,
no_bus, no_daemon, timeout, ssh, interrupted); the exit status is the same.

`zddctl -H [USER@]HOST COMMAND` runs the same command with the zddctl of HOST, over ssh, and
exits with its status: the arguments are checked here first (a usage error is exit 2 without
any connection), ssh failures are exit 1 with a line saying so. The ssh command is
$ZDDCTL_SSH (split like a shell would, default `ssh`), the way systemctl -H takes $SYSTEMD_SSH.
"""

from __future__ import annotations

# Only what every command needs is imported here: zddctl is run in loops and from scripts, and its
# start-up is its latency (bench/zddctl_startup.py). ssh is imported by -H, the bus client by the
# bus commands; no asyncio, no bus library.
import argparse
import json
import os
import sys
import time

from . import __version__
import re

from .api import (BUS_NAME, ERROR_PREFIX, INTERFACE, MAX_SECONDS, OBJECT_MANAGER, OBJECT_PATH,
                  PROPERTIES, SERVICE_INTERFACE, service_path)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Long waits are asked for in slices, so no bus or client reply timeout can cut them short.
WAIT_SLICE_USEC = 60 * 1_000_000
# --json's names for failures that are not a D-Bus error reply (those keep the D-Bus name).
USAGE, NO_BUS, NO_DAEMON, TIMEOUT, SSH, INTERRUPTED = (
    "usage", "no_bus", "no_daemon", "timeout", "ssh", "interrupted")
NOT_RUNNING = ("org.freedesktop.DBus.Error.ServiceUnknown",
               "org.freedesktop.DBus.Error.NameHasNoOwner")
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"


class Failure(Exception):
    """Something to report with exit status 1: on stderr, or with --json as
    {"error": name, "message": ...} on stdout. `name` is the D-Bus error name, or one of the
    short names above."""

    status = 1  # EXIT_FAILED

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class UsageFailure(Failure):
    """A usage error found only once zddd answered (a service to name): exit status 2."""

    status = 2

    def __init__(self, message: str):
        super().__init__("usage", message)


class Formatter(argparse.HelpFormatter):
    """argparse's, with the terminal's width from os: argparse asks shutil, which costs
    zddctl's every start imports of bz2, lzma and more (argparse makes a formatter per option)."""

    def __init__(self, prog: str, **kw):
        try:
            width = int(os.environ["COLUMNS"])
        except (KeyError, ValueError):
            try:
                width = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                width = 80
        super().__init__(prog, width=width - 2, **kw)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are JSON on stdout when --json was asked for."""

    json_errors = False

    def __init__(self, *args, **kw):
        super().__init__(*args, formatter_class=Formatter, **kw)

    def error(self, message: str):
        if Parser.json_errors:
            print(json.dumps({"error": USAGE, "message": f"{self.prog}: {message}"}))
            sys.exit(EXIT_USAGE)
        super().error(message)


def wants_json(argv: list[str]) -> bool:
    """--json among the options (not after "--", where it would be a target name)."""
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} is out of range 0-{MAX_SECONDS} seconds")
    return value


SERVICE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
TARGETS = ("main", "backup")
SPLIT = "split"  # ActiveTarget while both targets get new connections


def _service(text: str) -> str:
    if not SERVICE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a service name "
                                         "([a-z][a-z0-9_]{0,31})")
    return text


def _weight(text: str) -> tuple[str, int]:
    target, eq, value = text.partition("=")
    if not eq or target not in TARGETS:
        raise argparse.ArgumentTypeError(f"{text!r} is not main=PERCENT or backup=PERCENT")
    if not value.isdigit() or int(value) > 100:
        raise argparse.ArgumentTypeError(f"{text!r}: the percent must be an integer 0-100")
    return target, int(value)


def weights_of(pairs: list[tuple[str, int]]) -> dict[str, int]:
    """main=N [backup=M] as both targets' percents: an omitted target gets the rest. Raises
    ValueError (a usage error) if a target is given twice or the percents do not sum to 100."""
    given: dict[str, int] = {}
    for target, value in pairs:
        if target in given:
            raise ValueError(f"{target} is given twice")
        given[target] = value
    if len(given) == 1:
        (target, value), = given.items()
        other = TARGETS[1 - TARGETS.index(target)]
        given[other] = 100 - value
    if sum(given.values()) != 100:
        raise ValueError(f"main={given['main']} and backup={given['backup']} do not sum to 100")
    return {t: given[t] for t in TARGETS}


def _ssh_host(text: str) -> str:
    # What ssh gets as its destination: nothing it could read as an option or split apart.
    if not text or text.startswith("-") or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not [USER@]HOST")
    return text


JSON_HELP = "print JSON on stdout, errors too ({\"error\": NAME, \"message\": ...})"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="zddctl", description="Control zddd, the zero-downtime deployment daemon.",
        epilog="Exit status: 0 done; 1 refused, failed or timed out; 2 usage error; "
               "130 interrupted.")
    p.add_argument("--version", action="version", version=f"zddctl {__version__}")
    # None, not "system", when not given: -H passes --bus on only when it was asked for.
    p.add_argument("--bus", default=None, metavar="system|session|ADDRESS",
                   help="the D-Bus bus zddd serves on (default: system; with -H, the remote "
                        "host's bus)")
    p.add_argument("-H", "--host", type=_ssh_host, metavar="[USER@]HOST",
                   help="run the command on HOST over ssh (its zddctl, same output and exit "
                        "status; the ssh command is $ZDDCTL_SSH, default ssh)")
    p.add_argument("-s", "--service", type=_service, metavar="NAME",
                   help="the service to act on; switch, weights and wait-drained need it when "
                        "zddd steers several (status: show only this one)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kw) -> argparse.ArgumentParser:
        s = sub.add_parser(name, **kw)
        # SUPPRESS: not given after the command, the global --json's value stands.
        s.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=JSON_HELP)
        return s

    command("status", help="show each service's active target, weights, drain, last switch and "
                           "targets")
    command("services", help="list the services zddd steers, one name a line")
    s = command("switch", help="steer new connections to main, backup or off",
                description="Steer new connections to TARGET (main, backup or off). "
                            "off drains the active target first.")
    s.add_argument("target", metavar="TARGET")
    s.add_argument("--force", action="store_true",
                   help="switch even if the target's probe failed; for off, skip the drain")
    s.add_argument("--wait-drained", nargs="?", type=_seconds, const=-1.0, default=None,
                   metavar="SECONDS",
                   help="then wait until the previously active target has no connection "
                        "and, for off, the drain has ended (default wait: drain_timeout + 10 s)")
    s.add_argument("--ramp", type=_seconds, default=None, metavar="SECONDS",
                   help="move the target's weight to 100 %% in steps over this long (main or "
                        "backup)")
    s = command("wait-drained", help="wait until a target has no connection",
                description="Wait until TARGET has no established connection and no "
                            "drain of it is pending.")
    s.add_argument("target", metavar="TARGET")
    s.add_argument("--timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="give up after this long (default 30)")
    s = command("weights", help="split a service's new connections between main and backup",
                description="Give main and backup each a percent of the service's new "
                            "connections (established ones keep their target). A target left "
                            "out gets the rest: `weights main=10` is main=10 backup=90.")
    s.add_argument("weights", nargs="+", type=_weight, metavar="TARGET=PERCENT",
                   help="main=N and/or backup=M, integers summing to 100")
    s.add_argument("--ramp", type=_seconds, default=None, metavar="SECONDS",
                   help="reach them from the current weights in steps over this long")
    s.add_argument("--force", action="store_true",
                   help="even if a target given more than 0 failed its probe")
    command("reload", help="make zddd re-read its config file")
    return p


class Client:
    """zddd over one bus connection: the Manager's object, or the object of the service
    `select` chose, which the per-service calls go to."""

    def __init__(self, spec: str):
        from .busclient import ConnectError, Connection

        try:
            self.bus = Connection(spec)
        except ConnectError as e:
            raise Failure(NO_BUS, f"cannot connect to the {spec} bus: {e}") from None
        self.path, self.interface = OBJECT_PATH, INTERFACE
        self._manager: dict | None = None

    def manager(self) -> dict:
        """The Manager's properties (read once): Backend, Services and, with one service,
        that service's."""
        if self._manager is None:
            (self._manager,) = self.call("GetAll", "s", [INTERFACE], interface=PROPERTIES,
                                         path=OBJECT_PATH)
        return self._manager

    def services(self) -> list[str] | None:
        """The services' names; None from a zddd before services (it steers one)."""
        names = self.manager().get("Services")
        return None if names is None else list(names)

    def select(self, service: str | None) -> None:
        """Aim the per-service calls at `service`, or with None at the only one. A usage
        error (exit 2) if zddd has no such service, or several and none was named."""
        names = self.services()
        if service is None:
            if names is not None and len(names) > 1:
                raise UsageFailure(f"zddd steers {len(names)} services: name one with "
                                   f"-s/--service: {', '.join(names)}")
            return  # the Manager acts on the only service
        if names is None:
            if service == "default":
                return
            raise UsageFailure(f"no service {service!r}: this zddd steers one service, default")
        if service not in names:
            raise UsageFailure(f"no service {service!r}; zddd steers: {', '.join(names)}")
        self.path, self.interface = service_path(service), SERVICE_INTERFACE

    def close(self) -> None:
        self.bus.close()

    def call(self, member: str, signature: str = "", body: list | None = None,
             interface: str | None = None, path: str | None = None) -> list:
        """Call `member` on the selected object (its interface unless another is named)."""
        from .busclient import BusError, ConnectError

        try:
            return self.bus.call(BUS_NAME, path or self.path, interface or self.interface,
                                 member, signature, body or [])
        except ConnectError as e:
            raise Failure(NO_BUS, str(e)) from None
        except BusError as e:
            if e.name in NOT_RUNNING:
                raise Failure(NO_DAEMON, "zddd is not running (no owner of "
                                         f"{BUS_NAME} on the bus)") from None
            if e.name == ACCESS_DENIED:
                raise Failure(e.name, f"permission denied: {e.text}") from None
            short = e.name.removeprefix(ERROR_PREFIX)
            raise Failure(e.name, f"{short}: {e.text}") from None

    def properties(self) -> dict:
        """The selected object's properties (the Manager's, or the service's)."""
        if self.path == OBJECT_PATH:
            return self.manager()
        (props,) = self.call("GetAll", "s", [self.interface], interface=PROPERTIES)
        return props

    def all_services(self) -> dict[str, dict]:
        """Every service's properties, by name, in one call."""
        (objects,) = self.call("GetManagedObjects", interface=OBJECT_MANAGER, path=OBJECT_PATH)
        return {props["Name"]: props for props in
                (ifaces.get(SERVICE_INTERFACE) for ifaces in objects.values()) if props}

    def wait_drained(self, target: str, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1e6))
            (drained,) = self.call("WaitDrained", "st",
                                   [target, min(remaining, WAIT_SLICE_USEC)])
            if drained:
                return True
            if remaining <= WAIT_SLICE_USEC:
                return False

    def not_drained(self, target: str, seconds: float) -> Failure:
        """Why `target` is not drained, as the timeout's Failure."""
        try:
            props = self.properties()
        except Failure:
            props = {}
        n = connection_count(props, target)
        if n == 0 and props.get("Draining") == target:
            text = f"{target} is not drained after {seconds:g} s: its drain towards off is pending"
        else:
            what = "connections" if n is None else f"{n} connection{'s' if n != 1 else ''}"
            text = f"{target} still has {what} after {seconds:g} s"
        return Failure(TIMEOUT, text)


def connection_count(props: dict, target: str) -> int | None:
    """The target's established connections, or None where zddd could not count them (the
    entry missing or -1)."""
    n = props.get("Connections", {}).get(target)
    return None if n is None or n < 0 else int(n)


def status_dict(props: dict) -> dict:
    """SPEC's keys for one service, from its properties (the Manager's of its one service)."""
    up = props.get("TargetsUp", {})
    return {
        "active_target": props["ActiveTarget"],
        "draining": props["Draining"],
        "backend": props["Backend"],
        "listen_port": props["ListenPort"],
        "last_switch_usec": props["LastSwitchUSec"],
        # None: a zddd older than these properties.
        "last_switch_timestamp_usec": props.get("LastSwitchTimestamp"),
        "last_switch_caller": props.get("LastSwitchCaller"),
        "targets": {name: {"port": port, "up": bool(up.get(name, False)),
                           "connections": connection_count(props, name)}
                    for name, port in sorted(props["Targets"].items())},
    }


def service_dict(props: dict) -> dict:
    """One service's entry of `services` in status --json: the keys of one service without
    the backend, and its weights (None from a zddd before weights)."""
    st = status_dict({"Backend": None, **props})
    del st["backend"]
    weights = props.get("Weights")
    st["weights"] = None if weights is None else {t: weights.get(t, 0) for t in TARGETS}
    st["ramp"] = ramp_dict(props.get("Ramp"))
    return st


def ramp_dict(ramp) -> dict | None:
    """A ramp in progress from the Ramp property (main from, to, start µs, length µs), or
    None (none, or a zddd before ramps)."""
    if not ramp or not ramp[3]:
        return None
    start, to, started, length = ramp
    return {"main_from": start, "main_to": to, "started_usec": started,
            "seconds": length / 1e6}


def status_of(client: Client, service: str | None) -> dict:
    """status --json. One service: SPEC's keys and `services` (name -> its keys and weights);
    several: `backend` and `services`. A zddd before services: SPEC's keys alone."""
    manager = client.manager()
    names = client.services()
    if service is not None:
        client.select(service)
        props = {**client.properties(), "Backend": manager["Backend"]}
        return {**status_dict(props), "services": {service: service_dict(props)}}
    if names is None:
        return status_dict(manager)
    if len(names) == 1:
        return {**status_dict(manager), "services": {names[0]: service_dict(manager)}}
    found = client.all_services()
    return {"backend": manager["Backend"],
            "services": {name: service_dict(found[name]) for name in names if name in found}}


def _ago(seconds: float) -> str:
    for unit, size in (("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if unit == 'day' and n != 1 else ''} ago"
    return f"{max(0, int(seconds))} s ago"


def format_last_switch(st: dict, now: float) -> str:
    commit = f"data-plane commit {st['last_switch_usec']} µs"
    stamp = st["last_switch_timestamp_usec"]
    if stamp is None:  # an older zddd: only the commit time is known
        return f"{st['last_switch_usec']} µs (data-plane commit)"
    if stamp == 0:
        return "never"
    when = stamp / 1e6
    text = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(when))
    by = f" by {st['last_switch_caller']}" if st["last_switch_caller"] else ""
    return f"{text} ({_ago(now - when)}){by}, {commit}"


def format_weights(weights: dict) -> str:
    return ", ".join(f"{t} {weights[t]} %" for t in TARGETS)


def format_service(st: dict, now: float, indent: str = "") -> list[str]:
    """The lines of one service's status."""
    lines = [f"active target: {st['active_target']}",
             f"draining:      {st['draining'] or '-'}"]
    if st.get("backend") is not None:
        lines.append(f"backend:       {st['backend']}")
    lines.append(f"listen port:   {st['listen_port']}")
    if st.get("weights") is not None:
        lines.append(f"weights:       {format_weights(st['weights'])}")
    ramp = st.get("ramp")
    if ramp:
        left = max(0.0, ramp["started_usec"] / 1e6 + ramp["seconds"] - now)
        lines.append(f"ramp:          main {ramp['main_from']} % \u2192 {ramp['main_to']} % over "
                     f"{ramp['seconds']:g} s, {left:.0f} s left")
    lines += [f"last switch:   {format_last_switch(st, now)}", "targets:"]
    for name, t in st["targets"].items():
        n = t["connections"]
        count = "connections unknown" if n is None else \
            f"{n} connection{'s' if n != 1 else ''}"
        lines.append(f"  {name:<7} port {t['port']:<5} {'up' if t['up'] else 'DOWN':<4} {count}")
    return [indent + line for line in lines]


def format_status(st: dict, now: float | None = None) -> str:
    """status for people: one service as before services, or every service under its name."""
    now = time.time() if now is None else now
    services = st.get("services", {})
    if "active_target" in st:  # one service
        (name, one), = services.items() if len(services) == 1 else ((None, {}),)
        lines = [f"service:       {name}"] if name not in (None, "default") else []
        return "\n".join(lines + format_service(
            {**st, "weights": one.get("weights"), "ramp": one.get("ramp")}, now))
    lines = [f"backend:       {st['backend']}"]
    for name, one in services.items():
        lines += ["", f"service {name}:"] + format_service(one, now, "  ")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """A bus command: what it did on stdout (a line per step, or one JSON object)."""
    client = Client(args.bus or "system")
    try:
        if args.command == "status":
            st = status_of(client, args.service)
            print(json.dumps(st, indent=2) if args.json else format_status(st))
        elif args.command == "services":
            names = client.services() or ["default"]
            if args.json:
                print(json.dumps({"services": names}))
            else:
                print("\n".join(names))
        elif args.command == "reload":
            client.call("Reload", path=OBJECT_PATH, interface=INTERFACE)
            say(args, "zddd reloaded its config", {"reloaded": True})
        elif args.command == "wait-drained":
            client.select(args.service)
            if not client.wait_drained(args.target, args.timeout):
                raise client.not_drained(args.target, args.timeout)
            say(args, f"{args.target} is drained", {"target": args.target, "drained": True})
        elif args.command == "switch":
            client.select(args.service)
            switch(client, args)
        elif args.command == "weights":
            client.select(args.service)
            set_weights(client, args)
    finally:
        client.close()


def say(args: argparse.Namespace, text: str | None, data: dict | None = None) -> None:
    """A line for people, or with --json the command's one JSON object (when `data` is given)."""
    if not args.json and text is not None:
        print(text, flush=True)
    elif args.json and data is not None:
        print(json.dumps(data))


def switch(client: Client, args: argparse.Namespace) -> None:
    props = client.properties()
    previous = props.get("ActiveTarget", "")
    options: dict = {}
    if args.force:
        options["force"] = ("b", True)
    if args.ramp is not None:
        options["ramp_usec"] = ("t", int(round(args.ramp * 1e6)))
    if options:
        client.call("SwitchWithOptions", "sa{sv}", [args.target, options])
    else:
        client.call("Switch", "s", [args.target])
    result = {"target": args.target, "previous": previous, "result": "switched",
              "drained": None}
    if args.target == "off" and previous == "off":
        text, result["result"] = "already off: nothing to drain", "already_off"
    elif args.target == "off" and not args.force:
        text, result["result"] = f"draining {previous or 'the active target'} towards off", \
            "draining"
    elif args.ramp:
        text, result["result"] = f"ramping to {args.target} over {args.ramp:g} s", "ramping"
    else:
        text = f"switched to {args.target}"
    say(args, text)
    # From a split both targets had new connections: each one that is not the new target is
    # drained (for off, both).
    drain = [t for t in TARGETS if t != args.target] if previous == SPLIT else [previous]
    drain = [t for t in drain if t not in ("", "off", args.target)]
    if args.wait_drained is not None and drain:
        wait = args.wait_drained
        if wait < 0:
            wait = props["DrainTimeoutUSec"] / 1e6 + 10
        deadline = time.monotonic() + wait
        for target in drain:
            if not client.wait_drained(target, max(0.0, deadline - time.monotonic())):
                raise client.not_drained(target, wait)
            say(args, f"{target} is drained")
        result["drained"] = drain[0] if len(drain) == 1 else drain
    say(args, None, result)


def set_weights(client: Client, args: argparse.Namespace) -> None:
    weights = weights_of(args.weights)
    options: dict = {}
    if args.force:
        options["force"] = ("b", True)
    if args.ramp is not None:
        options["ramp_usec"] = ("t", int(round(args.ramp * 1e6)))
    client.call("SetWeights", "a{su}a{sv}", [weights, options])
    ramp = f", ramping over {args.ramp:g} s" if args.ramp else ""
    say(args, f"weights set: {format_weights(weights)}{ramp}",
        {"weights": weights, "ramp_seconds": args.ramp, "service": args.service})


def remote_argv(args: argparse.Namespace) -> list[str]:
    """The zddctl command line that -H runs on the remote host: the parsed command, spelled out
    in full (no abbreviations left to a remote zddctl of another version), without -H."""
    argv = ["zddctl"]
    if args.bus is not None:
        argv += ["--bus", args.bus]
    if args.service is not None:
        argv += ["--service", args.service]
    argv.append(args.command)
    if args.json:
        argv.append("--json")
    if args.command == "switch":
        if args.force:
            argv.append("--force")
        if args.ramp is not None:
            argv.append(f"--ramp={args.ramp!r}")
        if args.wait_drained is not None:
            argv.append("--wait-drained" if args.wait_drained < 0
                        else f"--wait-drained={args.wait_drained!r}")
    elif args.command == "wait-drained":
        argv.append(f"--timeout={args.timeout!r}")
    elif args.command == "weights":
        if args.force:
            argv.append("--force")
        if args.ramp is not None:
            argv.append(f"--ramp={args.ramp!r}")
        argv += ["--", *(f"{t}={n}" for t, n in args.weights)]
    if args.command in ("switch", "wait-drained"):
        # "--": a target that starts with "-" reaches zddd as given (and is its InvalidTarget).
        argv += ["--", args.target]
    return argv


# ssh's own failures (cannot connect, authentication, host key) are its exit status 255; a shell
# that cannot find a command exits 127 (126: found but not executable).
SSH_FAILED = 255
COMMAND_NOT_FOUND = (126, 127)


def run_remote(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    try:
        ssh = shlex.split(os.environ.get("ZDDCTL_SSH", "")) or ["ssh"]
    except ValueError as e:
        raise Failure(SSH, f"ZDDCTL_SSH cannot be split into words: {e}") from None
    # -n: stdin stays ours (a `while read host` loop keeps its input); -T: no terminal, so the
    # output is byte for byte the remote zddctl's; -x -a: no X11 or agent forwarding. ssh joins
    # the remote command into one string for the remote shell: every word is quoted.
    argv = [*ssh, "-n", "-T", "-x", "-a", "--", args.host, shlex.join(remote_argv(args))]
    try:
        rc = subprocess.run(argv).returncode
    except OSError as e:
        raise Failure(SSH, f"cannot run {ssh[0]}: {e.strerror or e}") from None
    if rc in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED):
        return rc
    if rc == SSH_FAILED:
        raise Failure(SSH, f"ssh to {args.host} failed (its reason is above)")
    if rc in COMMAND_NOT_FOUND:
        raise Failure(SSH, f"{args.host} could not run zddctl (exit {rc}): is zddd installed "
                           "there?")
    if rc < 0:
        raise Failure(SSH, f"ssh to {args.host} was killed by signal {-rc}")
    raise Failure(SSH, f"zddctl on {args.host} exited {rc}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    Parser.json_errors = wants_json(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "weights":
        try:
            weights_of(args.weights)
        except ValueError as e:
            parser.error(f"weights: {e}")
    try:
        if args.host is not None:
            return run_remote(args)
        run(args)
        return EXIT_OK
    except Failure as e:
        return fail(args, e.name, str(e), e.status)
    except KeyboardInterrupt:
        return fail(args, INTERRUPTED, "interrupted", EXIT_INTERRUPTED)


def fail(args: argparse.Namespace, name: str, message: str, status: int) -> int:
    if args.json:
        print(json.dumps({"error": name, "message": message}))
    else:
        print(f"zddctl: {message}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
