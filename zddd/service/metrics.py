"""Prometheus metrics on `[metrics] listen`, with prometheus-client.

Event counters (switches, repairs, durations) are updated from core events. Values that live in
the kernel (connections, flows steered) are read at scrape time by a custom collector, in the
HTTP server's thread, through handles of their own; a failed read counts in
zddd_collection_errors_total instead of failing the scrape.
"""

from __future__ import annotations

import logging
import socket
from http.server import HTTPServer
from threading import Thread

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import MetricsHandler

from .. import __version__
from ..config import ALL_TARGETS, TARGET_NAMES, Endpoint
from ..core import Observer, Steering
from ..logfmt import quote

log = logging.getLogger("zddd")

# From 10 µs (a map update) to a minute (a drain that ran to its timeout).
DURATION_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                    25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RESULTS = ("ok", "refused", "failed")
# Scrapes are served one at a time; a client that stalls holds the server this long at most.
CLIENT_TIMEOUT = 10.0


class _KernelCollector:
    def __init__(self, core: Steering, errors: Counter):
        self.core = core
        self.errors = errors

    def collect(self):
        core = self.core
        active = GaugeMetricFamily("zddd_active_target",
                                   "1 for the target the kernel steers new connections to",
                                   labels=["target"])
        for name in ALL_TARGETS:
            active.add_metric([name], 1.0 if core.active == name else 0.0)
        draining = GaugeMetricFamily("zddd_draining", "1 while a drain of the target runs",
                                     labels=["target"])
        up = GaugeMetricFamily("zddd_target_up", "Last health probe result (1 up, 0 down)",
                               labels=["target"])
        for name in TARGET_NAMES:
            draining.add_metric([name], 1.0 if core.draining == name else 0.0)
            up.add_metric([name], 1.0 if core.health.is_up(name) else 0.0)
        yield from (active, draining, up)

        conns = GaugeMetricFamily("zddd_target_connections",
                                  "Established TCP connections on the target's port",
                                  labels=["target"])
        try:
            for name, n in core.connection_counts().items():
                conns.add_metric([name], float(n))
            yield conns
        except Exception as e:
            self._failed("connections", e)

        flows = CounterMetricFamily("zddd_flows_steered",
                                    "New connections steered to the target by the data plane",
                                    labels=["target"])
        try:
            for name, n in core.backend.flows_steered().items():
                flows.add_metric([name], float(n))
            yield flows
        except Exception as e:
            self._failed("flows_steered", e)

        info = InfoMetricFamily("zddd_build", "zddd's version and data-plane backend")
        info.add_metric([], {"version": __version__, "backend": core.backend.name})
        yield info

    def _failed(self, what: str, e: Exception) -> None:
        self.errors.inc()
        log.warning("event=collection_failed what=%s error=%s", what, quote(e))

    def describe(self):
        return []  # names are fixed; no kernel read just to register


class _Exported:
    """What the endpoint shows: the kernel-side values first, so a read that fails is already
    counted in zddd_collection_errors_total of the same scrape; then the event metrics, without
    the `*_created` series prometheus-client adds (not zddd's contract: they would show up as
    extra gauges named like counters)."""

    def __init__(self, kernel: _KernelCollector, events: CollectorRegistry):
        self.kernel = kernel
        self.events = events

    def collect(self):
        yield from self.kernel.collect()
        for family in self.events.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family

    def describe(self):
        return []


class MetricsServer(Observer):
    """Exports the registry over HTTP from its own thread; `stop` closes the socket."""

    def __init__(self, core: Steering, endpoint: Endpoint):
        events = CollectorRegistry()
        self.switches = Counter("zddd_switches", "Switch requests by target and result",
                                ["target", "result"], registry=events)
        for target in ALL_TARGETS + ("invalid",):
            for result in RESULTS:
                self.switches.labels(target, result)
        self.duration = Histogram("zddd_switch_duration_seconds",
                                  "Switch request received to data plane committed",
                                  ["backend"], buckets=DURATION_BUCKETS, registry=events)
        self.duration.labels(core.backend.name)
        self.backend = core.backend.name
        self.repairs = Counter("zddd_drift_repairs", "Kernel state found changed and restored",
                               registry=events)
        self.errors = Counter("zddd_collection_errors", "Scrape-time reads that failed",
                              registry=events)
        self.registry = CollectorRegistry()
        self.registry.register(_Exported(_KernelCollector(core, self.errors), events))

        handler = MetricsHandler.factory(self.registry)
        handler.timeout = CLIENT_TIMEOUT
        server_class = HTTPServer
        if ":" in endpoint.host:
            server_class = type("V6Server", (HTTPServer,),
                                {"address_family": socket.AF_INET6})
        self.httpd = server_class((endpoint.host, endpoint.port), handler)
        self.core = core
        Thread(target=self._serve, name="metrics", daemon=True).start()
        core.observers.append(self)

    def _serve(self) -> None:
        # One thread serves every scrape, and its kernel handles are opened here, once, while
        # descriptors are plentiful: libnftables exits the whole process when it cannot open
        # the netlink socket of a new context, which a thread per scrape would create each time.
        try:
            self.core.backend.flows_steered()
        except Exception as e:
            log.warning("event=metrics_warmup_failed error=%s", quote(e))
        self.httpd.serve_forever()

    def switch_result(self, target: str, result: str, seconds: float | None) -> None:
        self.switches.labels(target, result).inc()
        if seconds is not None:
            self.duration.labels(self.backend).observe(seconds)

    def drift_repaired(self) -> None:
        self.repairs.inc()

    def stop(self) -> None:
        if self in self.core.observers:
            self.core.observers.remove(self)
        self.httpd.shutdown()
        self.httpd.server_close()
