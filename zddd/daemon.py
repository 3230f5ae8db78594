"""zddd, the daemon: config, core, adapters, signals and the event loop.

Start-up order is part of the contract: the config is validated before anything touches the
kernel; the data plane is programmed or adopted and every target probed once before the bus name
is requested and READY is sent, so a client that can reach zddd finds it working.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Awaitable, Callable

from . import __version__
from .backends import BackendUnavailable, Desired, NewerLayout, backend_class, make_backend
from .config import BACKENDS, DEFAULT_PATH, Config, ConfigError, Endpoint, load
from .connections import ConnectionCounter
from .core import Observer, Snapshot, Steering
from .errors import BackendFailure, InvalidConfig
from .health import HealthMonitor
from .logfmt import quote
from .service import dbus as dbus_service
from .service.agent import AgentResponder
from .service.listener import Listener
from .service.metrics import MetricsServer
from .service.notify import Notifier
from .state import StateFile

if TYPE_CHECKING:
    from dbus_fast.aio import MessageBus

log = logging.getLogger("zddd")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG: the unit does not restart on it (RestartPreventExitStatus)
# An abstract socket name is per network namespace, and so is the data plane zddd owns (the
# nftables table, the sk_lookup link, the tc/XDP attachments); it goes when its holder dies.
LOCK_NAME = b"\0zddd/data-plane"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"level={record.levelname.lower()} {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zddd",
        description="Zero-downtime deployment daemon: steers the listen port (default 8888) "
                    "to the main or backup vhost, or to nothing, and serves org.zddd.Steering1 "
                    "on D-Bus. Runs in the foreground.",
        epilog="Exit status: 0 stopped; 1 a failure a restart may fix; 2 usage error; 78 a "
               "configuration to fix (the unit does not restart on it). See zddd(8).")
    p.add_argument("--config", metavar="PATH",
                   help="TOML config (default /etc/zddd/zddd.toml; built-in defaults if that "
                        "file does not exist)")
    p.add_argument("--bus", default="system", metavar="system|session|ADDRESS",
                   help="the D-Bus bus to serve on (default: system)")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--check-config", action="store_true",
                      help="parse and validate the config as a start would, then exit: 0 "
                           "valid, 78 invalid (the key at fault on stderr). Touches nothing: "
                           "no kernel, no bus, no state file, no listening socket.")
    once.add_argument("--remove-data-plane", action="store_true",
                      help="remove everything zddd has in the kernel (every backend's objects "
                           "in this network namespace and bpf_pin_dir) and its saved state, "
                           "then exit; zddd must be stopped. Connections it steers break.")
    p.add_argument("--version", action="version", version=f"zddd {__version__}")
    return p.parse_args(argv)


class DataPlaneLock:
    """One zddd per data plane: held for the process' life, released by the kernel when it
    exits however it exits."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.bind(LOCK_NAME)
            self.sock.listen(1)
        except OSError as e:
            self.sock.close()
            raise RuntimeError(f"another zddd{self._holder()} holds this network namespace's "
                               "data plane; one zddd per network namespace") from e

    @staticmethod
    def _holder() -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(LOCK_NAME)
                pid, _, _ = struct.unpack("3i", s.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                return f" (pid {pid})"
        except OSError:
            return ""

    def close(self) -> None:
        self.sock.close()


class Listeners:
    """The agent and metrics endpoints of one config, bound together or not at all. Built for a
    reload, it takes over from `current` each listener whose endpoint stays, so only the ones
    that move are bound anew (binding an unchanged port again would find it taken)."""

    def __init__(self, core: Steering, config: Config, current: "Listeners | None" = None):
        # A role is "metrics", or "agent" and a service's name ("agent" alone in the
        # single-service form): one agent per service that has one.
        self.endpoints = self.wanted(config)
        self.servers: dict[str, Listener] = {}
        self._fresh: list[str] = []  # the roles bound here, not taken over
        try:
            for role, endpoint in self.endpoints.items():
                if endpoint is None:
                    continue
                if current is not None and current.endpoints.get(role) == endpoint:
                    self.servers[role] = current.servers[role]
                    continue
                server = (MetricsServer(core) if role == "metrics"
                          else AgentResponder(_polled(core, role)))
                self.servers[role] = server
                self._fresh.append(role)
                try:
                    server.bind(endpoint)
                except OSError as e:
                    key = ("metrics.listen" if role == "metrics" else
                           config.service_key(role.partition(":")[2] or "default",
                                              "agent.listen"))
                    raise InvalidConfig(f"{key}: cannot listen on {endpoint}: "
                                        f"{e.strerror or e}") from None
        except BaseException:
            self.discard(core)
            raise

    @staticmethod
    def wanted(config: Config) -> dict[str, Endpoint | None]:
        """The endpoints a config asks for, by role."""
        wanted = {_agent_role(config, s.name): s.agent_listen for s in config.services.values()}
        wanted["metrics"] = config.metrics_listen
        return wanted

    def discard(self, core: Steering) -> None:
        """Close the sockets bound here that never served (a failed start or reload)."""
        for role in self._fresh:
            server = self.servers[role]
            if isinstance(server, Observer) and server in core.observers:
                core.observers.remove(server)
            server.discard()

    async def serve(self) -> None:
        for role in self._fresh:
            await self.servers[role].serve()

    async def stop(self, successor: "Listeners | None" = None) -> None:
        """Stop every listener, except those `successor` took over."""
        for role, server in self.servers.items():
            if successor is None or successor.servers.get(role) is not server:
                await server.stop()


def _agent_role(config: Config, service: str) -> str:
    return "agent" if config.single else f"agent:{service}"


def _polled(core: Steering, role: str) -> Callable[[], Snapshot]:
    """The agent of the service `role` names asks the core (looked up at each poll: the
    service of a reload's new listener exists only once the reload is taken over)."""
    name = role.partition(":")[2] or None
    return lambda: core.service(name).agent_polled()


class Coalesced:
    """Runs `job` on request, one run at a time: requests that come while it runs collapse into
    one more run after it (tuned's way with SIGHUP), so a burst of signals neither piles up
    tasks nor runs reloads side by side."""

    def __init__(self, job: Callable[[], Awaitable[None]]):
        self.job = job
        self.runs = 0
        self._task: asyncio.Task | None = None
        self._again = False

    def request(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._again = False
            self.runs += 1
            await self.job()
            if not self._again:
                return

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class Daemon(Observer):
    def __init__(self, args: argparse.Namespace, config: Config):
        self.args = args
        self.config = config
        self.notifier = Notifier()
        backend = make_backend(config)
        self.health = HealthMonitor(config, gate=backend.target_problem)
        connections = ConnectionCounter(self.health.probe_ports,
                                        attribute=backend.flow_attribution())
        self.core = Steering(config, backend, StateFile(config.state_file), health=self.health,
                             connections=connections)
        self.health.on_change = self.core.health_changed
        self.core.observers.append(self)
        self.listeners: Listeners | None = None
        self.bus: MessageBus | None = None
        self._stop = asyncio.Event()
        self._reloads = Coalesced(self._reload_logged)
        self._reloading = asyncio.Lock()
        self._bus_lost = False
        self._tasks: list[asyncio.Task] = []

    def status(self) -> str:
        """systemd's STATUS: "steering main (nftables)", or each service's with several."""
        shown = []
        for name, svc in self.core.services.items():
            draining = f", draining {svc.draining}" if svc.draining else ""
            where = "" if self.config.single else f"{name} "
            shown.append(f"{where}{svc.active}{draining}")
        return f"steering {'; '.join(shown)} ({self.core.backend.name})"

    # ---- Observer: keep systemd's STATUS in step with the core ----

    def state_changed(self, old: Snapshot, new: Snapshot) -> None:
        if (old.active, old.draining) != (new.active, new.draining):
            self.notifier.status(self.status())

    # ---- reload: all or nothing ----

    async def reload(self) -> None:
        """Re-read the config file and take it over whole: the new listeners are bound and the
        kernel and state file follow, or InvalidConfig/BackendFailure is raised and the running
        config, listeners and data plane stay as they were. One reload at a time (SIGHUP and
        D-Bus Reload may come together): a reload that moves listeners awaits."""
        async with self._reloading:
            await self._reload()

    async def _reload(self) -> None:
        try:
            new = load(self.args.config)
            self.core.check_reload(new)
        except (ConfigError, InvalidConfig) as e:
            log.error("event=reload_refused error=%s", quote(str(e)))
            raise InvalidConfig(f"invalid config: {e}" if isinstance(e, ConfigError)
                                else str(e)) from None
        old = self.config
        moved = Listeners.wanted(old) != Listeners.wanted(new)
        fresh = None
        if moved:
            # The old listeners keep their ports until the new ones are bound, so a reload may
            # not move one endpoint onto the other's port; that needs a restart.
            try:
                fresh = Listeners(self.core, new, self.listeners)
            except InvalidConfig as e:
                log.error("event=reload_refused error=%s", quote(str(e)))
                raise
        try:
            self.core.reload(new)
        except (InvalidConfig, BackendFailure) as e:
            log.error("event=reload_refused error=%s", quote(str(e)))
            if fresh is not None:
                fresh.discard(self.core)
            raise
        self.config = new
        self.health.reconfigure(new)
        if set(new.services) - set(old.services):
            await self.health.probe_all()  # the services added get their first probe now
        if fresh is not None:
            old_listeners, self.listeners = self.listeners, fresh
            await fresh.serve()
            if old_listeners is not None:
                await old_listeners.stop(fresh)
        self.notifier.reloaded(self.status())

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except Exception as e:
            log.error("event=reload_failed error=%s", quote(str(e)))

    # ---- run ----

    def _refuse_other_data_planes(self) -> None:
        """Another backend's data plane steering beside this one would fight it; zddd does
        not guess which connections may break, the operator decides."""
        desired = Desired.from_config(self.config, {})
        for name in BACKENDS:
            if name == self.config.backend:
                continue
            try:
                found = backend_class(name)().leftover(desired)
            except BackendUnavailable:
                continue
            if found:
                raise InvalidConfig(
                    f"the {name} data plane of an earlier zddd is still in the kernel ({found}); "
                    f"backend is now {self.config.backend!r}. To change backend without "
                    "breaking connections, start zddd with the old backend and run `zddctl "
                    "switch off --wait-drained` first; then stop it and run `zddd "
                    "--remove-data-plane`, which removes it (connections it steers break)")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            lock = DataPlaneLock()
        except RuntimeError as e:
            log.error("event=start_refused error=%s", quote(str(e)))
            return EXIT_FAILURE
        try:
            return await self._run(loop)
        finally:
            lock.close()

    async def _run(self, loop: asyncio.AbstractEventLoop) -> int:
        try:
            self._refuse_other_data_planes()
            self.listeners = Listeners(self.core, self.config)
        except InvalidConfig as e:
            log.error("event=start_refused error=%s", quote(str(e)))
            return EXIT_CONFIG
        try:
            self.core.start()
        except (BackendUnavailable, NewerLayout) as e:
            log.error("event=start_refused error=%s", quote(str(e)))
            self.listeners.discard(self.core)
            return EXIT_CONFIG
        except BackendFailure as e:
            log.error("event=start_failed error=%s", quote(str(e)))
            self.listeners.discard(self.core)
            return EXIT_FAILURE
        await self.health.probe_all()
        await self.listeners.serve()
        try:
            self.bus = await dbus_service.serve(self.core, self.args.bus, self.reload)
        except Exception as e:
            log.error("event=bus_failed bus=%s error=%s", quote(self.args.bus), quote(str(e)))
            await self._shutdown()
            return EXIT_FAILURE
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reloads.request)
        self._tasks = [loop.create_task(c) for c in (
            self.health.run(), self.core.run_reconciler(), self.notifier.watchdog(),
            self._watch_bus())]
        self.notifier.ready(self.status())
        log.info("event=ready version=%s backend=%s target=%s bus=%s", __version__,
                 self.core.backend.name, self._targets(), quote(self.args.bus))
        await self._stop.wait()
        self.notifier.stopping()
        log.info("event=stop target=%s data_plane=unchanged", self._targets())
        await self._shutdown()
        return EXIT_FAILURE if self._bus_lost else 0

    def _targets(self) -> str:
        """Where each service steers, for the log: "main", or "web:main,api:off"."""
        if self.config.single:
            return self.core.service().active
        return ",".join(f"{n}:{s.active}" for n, s in self.core.services.items())

    async def _watch_bus(self) -> None:
        # dbus-fast raises the error that broke the connection (EOFError when the bus daemon
        # goes away) instead of returning: both mean the bus is lost.
        try:
            assert self.bus is not None
            await self.bus.wait_for_disconnect()
            error = ""
        except Exception as e:
            error = f" error={type(e).__name__}"
        # Without the bus zddd cannot be controlled; exit non-zero so systemd restarts it.
        log.error("event=bus_lost%s", error)
        self._bus_lost = True
        self._stop.set()

    async def _shutdown(self) -> None:
        self._reloads.cancel()
        for task in self._tasks:
            task.cancel()
        self.core.close()
        if self.listeners is not None:
            await self.listeners.stop()
        if self.bus is not None:
            self.bus.disconnect()


def remove_data_plane(config: Config) -> int:
    """`zddd --remove-data-plane`: every backend's objects and the saved state go."""
    try:
        lock = DataPlaneLock()
    except RuntimeError as e:
        print(f"zddd: {e}; stop it first (systemctl stop zddd)", file=sys.stderr)
        return EXIT_FAILURE
    desired = Desired.from_config(config, {})
    failed = False
    try:
        for name in BACKENDS:
            try:
                backend = backend_class(name)()
                found = backend.leftover(desired)
                if found:
                    backend.remove(desired)
                    print(f"removed the {name} data plane: {found}")
            except BackendUnavailable:
                continue
            except Exception as e:
                print(f"zddd: cannot remove the {name} data plane: {e}", file=sys.stderr)
                failed = True
        try:
            Path(config.state_file).unlink()
            print(f"removed the saved state {config.state_file}")
        except FileNotFoundError:
            pass
    finally:
        lock.close()
    return EXIT_FAILURE if failed else 0


def _raise_fd_limit() -> None:
    """Up to the hard limit (systemd's default soft limit is 1024): a thousand agent or metrics
    clients at once must not starve zddd of descriptors for the kernel and the bus."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _load_or_say_why(path: str | None) -> Config | None:
    """The config, or None after one line on stderr naming the key at fault."""
    try:
        return load(path)
    except ConfigError as e:
        print(f"zddd: invalid config: {e}", file=sys.stderr)
        return None


def check_config(path: str | None) -> int:
    """`zddd --check-config`: the start's own validation, and nothing a start does after it."""
    if _load_or_say_why(path) is None:
        return EXIT_CONFIG
    if path is None and not Path(DEFAULT_PATH).exists():
        print(f"zddd: no {DEFAULT_PATH}: the built-in defaults are valid")
    else:
        print(f"zddd: {path or DEFAULT_PATH}: valid config")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_config:
        return check_config(args.config)
    _raise_fd_limit()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    config = _load_or_say_why(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.remove_data_plane:
        return remove_data_plane(config)
    try:
        daemon = Daemon(args, config)
    except BackendUnavailable as e:
        # A backend this machine cannot run is a configuration to change, not a fault to
        # restart on.
        print(f"zddd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    sys.exit(main())
