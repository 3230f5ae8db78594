"""zddd, the daemon: config, core, adapters, signals and the event loop.

Start-up order is part of the contract: the config is validated before anything touches the
kernel; the data plane is programmed or adopted and every target probed once before the bus name
is requested and READY is sent, so a client that can reach zddd finds it working.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__
from .backends import make_backend, BackendUnavailable
from .config import ConfigError, Config, load
from .connections import ConnectionCounter
from .core import Observer, Steering
from .errors import BackendFailure, InvalidConfig
from .health import HealthMonitor
from .logfmt import quote
from .service import dbus as dbus_service
from .service.agent import AgentResponder
from .service.notify import Notifier
from .state import StateFile

log = logging.getLogger("zddd")

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # EX_CONFIG: the unit does not restart on it (RestartPreventExitStatus)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"level={record.levelname.lower()} {record.getMessage()}" + (
            "\n" + self.formatException(record.exc_info) if record.exc_info else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="zddd",
        description="Zero-downtime deployment daemon: steers the listen port (default 8888) "
                    "to the main or backup vhost, or to nothing, and serves org.zddd.Steering1 "
                    "on D-Bus. Runs in the foreground.")
    p.add_argument("--config", metavar="PATH",
                   help="TOML config (default /etc/zddd/zddd.toml; built-in defaults if that "
                        "file does not exist)")
    p.add_argument("--bus", default="system", metavar="system|session|ADDRESS",
                   help="the D-Bus bus to serve on (default: system)")
    p.add_argument("--version", action="version", version=f"zddd {__version__}")
    return p.parse_args(argv)


class Daemon(Observer):
    def __init__(self, args: argparse.Namespace, config: Config):
        self.args = args
        self.config = config
        self.notifier = Notifier()
        self.health = HealthMonitor(config)
        self.core = Steering(config, make_backend(config), StateFile(config.state_file),
                             health=self.health,
                             connections=ConnectionCounter(self.health.probe_ports))
        self.health.on_change = self.core.health_changed
        self.core.observers.append(self)
        self.agent: AgentResponder | None = None
        self.metrics = None
        self.bus = None
        self._stop = asyncio.Event()
        self._reload_pending = False
        self._bus_lost = False
        self._tasks: list[asyncio.Task] = []

    def status(self) -> str:
        draining = f", draining {self.core.draining}" if self.core.draining else ""
        return f"steering {self.core.active}{draining} ({self.core.backend.name})"

    # ---- Observer: keep systemd's STATUS and the adapters in step with the core ----

    def properties_changed(self, changes: dict) -> None:
        if "ActiveTarget" in changes or "Draining" in changes:
            self.notifier.status(self.status())

    def config_changed(self, old: Config, new: Config) -> None:
        self.health.reconfigure(new)
        self.config = new
        if old.agent_listen != new.agent_listen or old.metrics_listen != new.metrics_listen:
            asyncio.get_running_loop().create_task(self._restart_listeners(old, new))

    async def _restart_listeners(self, old: Config, new: Config) -> None:
        if old.agent_listen != new.agent_listen:
            await self._stop_agent()
            await self._start_agent(new)
        if old.metrics_listen != new.metrics_listen:
            self._stop_metrics()
            self._start_metrics(new)

    # ---- adapters ----

    async def _start_agent(self, config: Config) -> None:
        if config.agent_listen is None:
            return
        self.agent = AgentResponder(self.core.agent_answer)
        try:
            await self.agent.start(config.agent_listen)
        except OSError as e:
            self.agent = None
            log.error("event=agent_failed listen=%s error=%s", config.agent_listen,
                      quote(e.strerror))

    async def _stop_agent(self) -> None:
        if self.agent is not None:
            await self.agent.stop()
            self.agent = None

    def _start_metrics(self, config: Config) -> None:
        if config.metrics_listen is None:
            return
        from .service.metrics import MetricsServer

        try:
            self.metrics = MetricsServer(self.core, config.metrics_listen)
        except OSError as e:
            log.error("event=metrics_failed listen=%s error=%s", config.metrics_listen,
                      quote(e.strerror))

    def _stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None

    # ---- reload ----

    def reload(self) -> None:
        """Re-read the config file and hand it to the core; raises InvalidConfig (keeping the
        running config) if it is invalid or needs a restart."""
        try:
            new = load(self.args.config)
        except ConfigError as e:
            log.error("event=reload_refused error=%s", quote(str(e)))
            raise InvalidConfig(f"invalid config: {e}") from None
        try:
            self.core.reload(new)
        except InvalidConfig as e:
            log.error("event=reload_refused error=%s", quote(str(e)))
            raise
        self.notifier.reloaded(self.status())

    def _sighup(self) -> None:
        # Repeated SIGHUPs while a reload is queued collapse into that one reload.
        if self._reload_pending:
            return
        self._reload_pending = True

        def run() -> None:
            self._reload_pending = False
            try:
                self.reload()
            except Exception as e:
                log.error("event=reload_failed error=%s", quote(str(e)))

        asyncio.get_running_loop().call_soon(run)

    # ---- run ----

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            self.core.start()
        except BackendFailure as e:
            log.error("event=start_failed error=%s", quote(str(e)))
            return EXIT_FAILURE
        await self.health.probe_all()
        await self._start_agent(self.config)
        self._start_metrics(self.config)
        try:
            self.bus = await dbus_service.serve(self.core, self.args.bus, self.reload)
        except Exception as e:
            log.error("event=bus_failed bus=%s error=%s", self.args.bus, quote(str(e)))
            await self._shutdown()
            return EXIT_FAILURE
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        self._tasks = [loop.create_task(c) for c in (
            self.health.run(), self.core.run_reconciler(), self.notifier.watchdog(),
            self._watch_bus())]
        self.notifier.ready(self.status())
        log.info("event=ready version=%s backend=%s target=%s bus=%s", __version__,
                 self.core.backend.name, self.core.active, self.args.bus)
        await self._stop.wait()
        self.notifier.stopping()
        log.info("event=stop target=%s data_plane=unchanged", self.core.active)
        await self._shutdown()
        return EXIT_FAILURE if self._bus_lost else 0

    async def _watch_bus(self) -> None:
        # dbus-fast raises the error that broke the connection (EOFError when the bus daemon
        # goes away) instead of returning: both mean the bus is lost.
        try:
            await self.bus.wait_for_disconnect()
            error = ""
        except Exception as e:
            error = f" error={type(e).__name__}"
        # Without the bus zddd cannot be controlled; exit non-zero so systemd restarts it.
        log.error("event=bus_lost%s", error)
        self._bus_lost = True
        self._stop.set()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.core.close()
        await self._stop_agent()
        self._stop_metrics()
        if self.bus is not None:
            self.bus.disconnect()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"zddd: invalid config: {e}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        daemon = Daemon(args, config)
    except BackendUnavailable as e:
        print(f"zddd: {e}", file=sys.stderr)
        return EXIT_FAILURE
    return asyncio.run(daemon.run())


if __name__ == "__main__":
    sys.exit(main())
