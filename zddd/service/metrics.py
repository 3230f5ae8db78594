"""Prometheus metrics on `[metrics] listen`, with prometheus-client's registry and text format.

Event counters (switches, repairs, durations) are updated from core events. Every per-service
metric has the label `service` (`default` in the single-service config form). Values that live in
the kernel (connections, flows steered, the flow map's fill) are read at scrape time by a custom
collector, in one pass for all services; a failed read counts in zddd_collection_errors_total
instead of failing the scrape.
The endpoint is served from the event loop like the agent: every client is read with a deadline
and a size limit, so a slow or idle client cannot hold the endpoint for anyone else.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.registry import Collector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..config import ALL_TARGETS, TARGET_NAMES
from ..core import Observer, Snapshot, Steering
from ..logfmt import quote
from .listener import Listener
from .view import DEFAULT, CoreView

log = logging.getLogger("zddd")

# From 10 µs (a map update) to a minute (a drain that ran to its timeout).
DURATION_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                    25e-3, 50e-3, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RESULTS = ("ok", "refused", "failed")
# The core's target labels of switch results: the targets, "split" (weights between them),
# "invalid" (an unknown target) and "weights" (weights that cannot be).
SWITCH_TARGETS = ALL_TARGETS + ("split", "invalid", "weights")
# A client has this long to send its request and take the answer.
CLIENT_TIMEOUT = 10.0
MAX_REQUEST_BYTES = 8192
# Past this many connections still sending their request, the oldest of them is dropped, so
# idle connections can never keep a real scrape out.
MAX_PENDING = 2048


def _weights(snap: Snapshot) -> dict[str, int]:
    """Percent of new connections per target (a core before weights: all to the active one)."""
    weights = getattr(snap, "weights", None)
    if weights:
        return dict(weights)
    return {name: 100 if name == snap.active else 0 for name in TARGET_NAMES}


class _KernelCollector:
    """Every service's state, read at scrape time in one pass: a snapshot per service, and one
    kernel read each for the connection counts and the flows steered of all services."""

    def __init__(self, core: CoreView, errors: Counter):
        self.core = core
        self.errors = errors

    def collect(self):
        core = self.core
        snaps = {name: svc.snapshot() for name, svc in core.services().items()}
        per_service = ["service", "target"]
        active = GaugeMetricFamily("zddd_active_target",
                                   "1 for the target the kernel steers new connections to",
                                   labels=per_service)
        draining = GaugeMetricFamily("zddd_draining", "1 while a drain of the target runs",
                                     labels=per_service)
        up = GaugeMetricFamily("zddd_target_up", "Last health probe result (1 up, 0 down)",
                               labels=per_service)
        weight = GaugeMetricFamily("zddd_target_weight",
                                   "Percent of the service's new connections the target gets "
                                   "(0-100; 0 for both when off)", labels=per_service)
        stamp = GaugeMetricFamily("zddd_last_switch_timestamp_seconds",
                                  "When the service's last switch was committed, seconds since "
                                  "the epoch (0: never)", labels=["service"])
        for service, snap in snaps.items():
            for name in ALL_TARGETS:
                active.add_metric([service, name], 1.0 if snap.active == name else 0.0)
            shares = _weights(snap)
            for name in TARGET_NAMES:
                draining.add_metric([service, name], 1.0 if snap.draining == name else 0.0)
                up.add_metric([service, name], 1.0 if snap.up.get(name) else 0.0)
                weight.add_metric([service, name], float(shares.get(name, 0)))
            stamp.add_metric([service], snap.last_switch_timestamp / 1e6)
        yield from (active, draining, up, weight, stamp)

        conns = GaugeMetricFamily("zddd_target_connections",
                                  "Established TCP connections on the target's port",
                                  labels=per_service)
        try:
            for service, counts in sorted(core.connection_counts().items()):
                for name, n in sorted(counts.items()):
                    conns.add_metric([service, name], float(n))
            yield conns
        except Exception as e:
            self._failed("connections", e)

        flows = CounterMetricFamily("zddd_flows_steered",
                                    "New connections steered to the target by the data plane",
                                    labels=per_service)
        try:
            for (service, name), n in sorted(core.flows_steered().items()):
                flows.add_metric([service, name], float(n))
            yield flows
        except Exception as e:
            self._failed("flows_steered", e)

        try:
            table = core.flow_table()
            if table is not None:
                yield GaugeMetricFamily("zddd_flow_entries",
                                        "Flows in the BPF flow map now", value=table[0])
                yield GaugeMetricFamily("zddd_flow_capacity",
                                        "Size of the BPF flow map (bpf_flow_entries)",
                                        value=table[1])
        except Exception as e:
            self._failed("flow_table", e)

        info = InfoMetricFamily("zddd_build", "zddd's version and data-plane backend")
        info.add_metric([], {"version": __version__, "backend": core.backend_name()})
        yield info

    def _failed(self, what: str, e: Exception) -> None:
        self.errors.inc()
        log.warning("event=collection_failed what=%s error=%s", what, quote(e))

    def describe(self):
        return []  # names are fixed; no kernel read just to register


class _Exported(Collector):
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


class MetricsServer(Listener, Observer):
    """The registry, fed by core events; `bind` then `serve` exports it over HTTP."""

    def __init__(self, core: Steering):
        super().__init__()
        view = CoreView(core)
        backend = view.backend_name()
        events = CollectorRegistry()
        self.switches = Counter("zddd_switches", "Switch requests by service, target and result",
                                ["service", "target", "result"], registry=events)
        for service in view.services():
            self._add_service(service)
        # One histogram for all services: a commit's time is the backend's and does not depend
        # on the service (SPEC: it does not grow with their number); per service it would be
        # 24 series more for each.
        self.duration = Histogram("zddd_switch_duration_seconds",
                                  "Switch request received to data plane committed",
                                  ["backend"], buckets=DURATION_BUCKETS, registry=events)
        self.duration.labels(backend)
        self.backend = backend
        self.repairs = Counter("zddd_drift_repairs", "Kernel state found changed and restored",
                               registry=events)
        self.errors = Counter("zddd_collection_errors", "Scrape-time reads that failed",
                              registry=events)
        self.registry = CollectorRegistry()
        self.registry.register(_Exported(_KernelCollector(view, self.errors), events))
        self.core = core
        self._pending: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._rendered: bytes | None = None
        core.observers.append(self)

    async def serve(self) -> None:
        await self._serve(self._handle, limit=MAX_REQUEST_BYTES)

    def render(self) -> bytes:
        """The exposition now. Scrapes answered in the same turn of the event loop (a burst of
        clients) share one rendering; the next turn renders afresh, so nothing is stale."""
        if self._rendered is None:
            self._rendered = generate_latest(self.registry)
            try:
                asyncio.get_running_loop().call_soon(self._fresh)
            except RuntimeError:  # no loop (called directly): nothing to share with
                rendered, self._rendered = self._rendered, None
                return rendered
        return self._rendered

    def _fresh(self) -> None:
        self._rendered = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._pending) >= MAX_PENDING:
            oldest = next(iter(self._pending))
            self._pending.pop(oldest)
            oldest.transport.abort()
        self._pending[writer] = None
        try:
            async with asyncio.timeout(CLIENT_TIMEOUT):
                request = await self._head(reader)
                self._pending.pop(writer, None)
                status, body, ctype = self._answer(request)
                head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
                writer.write(head.encode() + body)
                await writer.drain()
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):
            pass  # a client that does not speak HTTP in time gets nothing more
        except Exception:
            log.exception("event=metrics_failed")
        finally:
            self._pending.pop(writer, None)
            writer.close()

    def _answer(self, request: bytes) -> tuple[str, bytes, str]:
        parts = request.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return "400 Bad Request", b"bad request\n", "text/plain"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
        if target != b"/metrics":
            return "404 Not Found", b"see /metrics\n", "text/plain"
        body = self.render()
        return "200 OK", b"" if method == b"HEAD" else body, CONTENT_TYPE_LATEST

    @staticmethod
    async def _head(reader: asyncio.StreamReader) -> bytes:
        """The request line, after reading the headers up to the blank line (bounded by the
        reader's limit per line and MAX_REQUEST_BYTES in all)."""
        first = (await reader.readline()).rstrip(b"\r\n")
        total = len(first)
        while True:
            line = await reader.readline()
            total += len(line)
            if total > MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            if line in (b"\r\n", b"\n", b""):
                return first

    def _add_service(self, service: str) -> None:
        for target in SWITCH_TARGETS:
            for result in RESULTS:
                self.switches.labels(service, target, result)

    def services_changed(self, added: list[str], removed: list[str]) -> None:
        """A reload added or removed services: their counters start at 0 or go away."""
        for service in removed:
            for target in SWITCH_TARGETS:
                for result in RESULTS:
                    try:
                        self.switches.remove(service, target, result)
                    except KeyError:
                        pass
        for service in added:
            self._add_service(service)

    def switch_result(self, *event) -> None:
        # (service, target, result, seconds); a core of one service leaves the service out.
        service, target, result, seconds = event if len(event) == 4 else (DEFAULT, *event)
        self.switches.labels(service, target, result).inc()
        if seconds is not None:
            self.duration.labels(self.backend).observe(seconds)

    def drift_repaired(self) -> None:
        self.repairs.inc()

    async def stop(self) -> None:
        if self in self.core.observers:
            self.core.observers.remove(self)
        await super().stop()
