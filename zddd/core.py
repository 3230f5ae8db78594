"""The state machine: which target the kernel steers each service to, switches, drains,
adoption and repair.

The core owns all state and knows nothing of D-Bus, HTTP or systemd. `Steering` is the host:
the config, the one backend (one data plane for every service), the state file, adoption,
reload and repair. Each service is a `ServiceSteering`: its switches and drains. A switch of
one service commits a desired layout in which only that service's weight differs, so the
backend's plan is that one element or store.

Adapters call the core's methods, read it through immutable `Snapshot`s (one per service),
and subscribe to its events through `Observer` (`state_changed(old, new)` with two snapshots
of one service, so each adapter derives what it shows; no event speaks an adapter's
vocabulary). Everything runs in one asyncio event loop, and every kernel change (switch, drain
end, reload, repair) happens in a synchronous method with no await inside, so changes are
serialized without a lock and each one is a single transaction. Observers see one snapshot per
transition, published once all of its state is updated (never `ActiveTarget=off` while
`Draining` still names a target): the helpers that change part of the state (`_commit`,
`_begin_drain`, `_cancel_drain`) leave publishing to the transition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .api import MAX_SECONDS
from .backends import (OLDER_LAYOUT, ApplyError, Backend, Desired, KernelState, NewerLayout,
                       target_weight, weight_target)
from .config import ALL_TARGETS, OFF, SPLIT, TARGET_NAMES, Config, Service
from .errors import BackendFailure, InvalidArgument, InvalidConfig, InvalidTarget, TargetUnhealthy
from .logfmt import quote
from .state import SavedState, StateFile

log = logging.getLogger("zddd")

# HAProxy counts as polling the agent if it asked within this window; a drain then waits until
# HAProxy has been told "drain" at least once, so it stops sending before the steering goes.
AGENT_POLL_WINDOW = 10.0
# How often a drain asks whether connections are left. Each ask is a sock_diag dump, in which
# the kernel walks every established socket of the namespace to find the target's (10,000
# held: about a fifth of a core at 50 ms); 150 ms keeps it to a few percent and still sees a
# drain's end within 200 ms.
DRAIN_POLL_INTERVAL = 0.15
RECONCILE_INTERVAL = 0.25
# A repair that does not stick (someone keeps changing zddd's objects back, or the kernel shows
# them differently than zddd writes them) is retried less and less often, up to this.
MAX_REPAIR_BACKOFF = 60.0
SERVICE_PATH = "/org/zddd/Steering1/service/"
RAMP_MAX_STEP = 1.0  # a ramp moves at least once a second


@dataclass(frozen=True)
class Snapshot:
    """What the core holds for one service at one moment; what every adapter shows is derived
    from this."""

    active: str  # the target the kernel steers new connections to ("off": none)
    draining: str  # the target being drained towards off, or ""
    backend: str
    listen_port: int
    targets: dict[str, int] = field(default_factory=dict)  # name -> port
    up: dict[str, bool] = field(default_factory=dict)  # name -> last probe passed
    last_switch_usec: int = 0  # the last data-plane commit, apply step alone
    drain_timeout: float = 0.0
    last_switch_timestamp: int = 0  # when the last switch was committed, µs since the epoch
    last_switch_caller: str = ""  # who asked for it (see ServiceSteering.switch), "" if never
    service: str = "default"
    weights: dict[str, int] = field(default_factory=dict)  # percent of new connections; 0s: off
    agent_weights: bool = False  # the agent says main's weight: "ready up N%"
    # A ramp in progress: main's weight from and to, its start (µs since the epoch) and its
    # length (µs); None when none.
    ramp: tuple[int, int, int, int] | None = None


class Observer:
    """Events of the core; adapters override what they need. Called in the event loop."""

    def state_changed(self, old: Snapshot, new: Snapshot) -> None:
        """One service's state changed (old.service == new.service)."""

    def switched(self, service: str, old: str, new: str, duration_usec: int) -> None: ...

    def switch_result(self, service: str, target: str, result: str,
                      seconds: float | None) -> None:
        """result is ok, refused or failed; target is "invalid" for an unknown name; seconds is
        request → commit, for ok results."""

    def drift_repaired(self) -> None: ...

    def services_changed(self, added: list[str], removed: list[str]) -> None:
        """A reload added or removed services (the added ones are in Steering.services)."""


class Health(Protocol):
    def is_up(self, service: str, target: str) -> bool: ...

    def reason(self, service: str, target: str) -> str:
        """Why the last probe gave its result, for refusals."""


class Connections(Protocol):
    def count(self, ports: dict, listen_ports: frozenset[int] = frozenset()) -> dict: ...

    def any(self, ports: dict, listen_ports: frozenset[int] = frozenset()) -> bool: ...


class AlwaysUp:
    def is_up(self, service: str, target: str) -> bool:
        return True

    def reason(self, service: str, target: str) -> str:
        return "not probed"


@dataclass
class _Drain:
    target: str
    deadline: float  # monotonic
    wall_deadline: float  # the same moment in wall-clock time, for the state file
    task: asyncio.Task | None = None
    caller: str = ""  # who asked for it: the caller of the switch that ends it


@dataclass
class _Ramp:
    """Main's weight moving from `start` to `end` over `seconds` from `wall_start` (wall clock,
    so a restart finds its place)."""

    start: int
    end: int
    wall_start: float
    seconds: float
    task: asyncio.Task | None = None
    caller: str = ""
    was: str = ""  # the active target before it began, for Switched
    received: float = 0.0  # monotonic: when it was asked for

    def at(self, wall: float) -> int:
        done = min(1.0, max(0.0, (wall - self.wall_start) / self.seconds))
        return round(self.start + (self.end - self.start) * done)

    def done(self, wall: float) -> bool:
        return wall - self.wall_start >= self.seconds

    def interval(self) -> float:
        """Seconds between steps: one per point of weight, at least one a second."""
        points = max(1, abs(self.end - self.start))
        return max(0.01, min(RAMP_MAX_STEP, self.seconds / points))


def _usec(seconds: float) -> int:
    return max(0, int(round(seconds * 1e6)))


class ServiceSteering:
    """One service: where the kernel steers its new connections, its switches and drains."""

    def __init__(self, host: "Steering", service: Service):
        self.host = host
        self.service = service
        self.name = service.name
        self.weight: int | None = None  # main's percent the kernel steers by; None: off
        self.last_switch_usec = 0
        self.last_switch_timestamp = 0
        self.last_switch_caller = ""
        self._drain: _Drain | None = None
        self._ramp: _Ramp | None = None
        self._last_agent_poll = float("-inf")
        self._drain_answers = 0  # "drain" answers the agent gave during the current drain
        self._published = self.snapshot()

    # ---- read-only view -------------------------------------------------------------------

    @property
    def listen_port(self) -> int:
        return self.service.listen_port

    @property
    def active(self) -> str:
        return weight_target(self.weight) or OFF

    @property
    def draining(self) -> str:
        return self._drain.target if self._drain else ""

    @property
    def targets(self) -> dict[str, int]:
        return {name: t.port for name, t in self.service.targets.items()}

    def snapshot(self) -> Snapshot:
        weights = ({"main": 0, "backup": 0} if self.weight is None
                   else {"main": self.weight, "backup": 100 - self.weight})
        return Snapshot(self.active, self.draining, self.host.backend.name, self.listen_port,
                        self.targets, {n: bool(self.host.is_up(self.name, n))
                                       for n in self.targets},
                        self.last_switch_usec, self.service.drain_timeout,
                        self.last_switch_timestamp, self.last_switch_caller, self.name, weights,
                        self.service.agent_weights,
                        None if self._ramp is None else (
                            self._ramp.start, self._ramp.end, _usec(self._ramp.wall_start),
                            _usec(self._ramp.seconds)))

    def agent_polled(self) -> Snapshot:
        """HAProxy asked this service's agent; the state to answer from. While draining, the
        answer tells HAProxy to drain: the first one of each drain is saved, so a restarted zddd
        knows."""
        self._last_agent_poll = self.host.clock()
        snap = self.snapshot()
        if self._drain:
            self._drain_answers += 1
            if self._drain_answers == 1:
                try:
                    self.host._save()
                except BackendFailure as e:
                    log.warning("event=state_save_failed error=%s", quote(str(e)))
        return snap

    def connection_counts(self) -> dict[str, int]:
        """Established connections per target, read from the kernel now (raises OSError)."""
        return self.host._count([self]).get(self.name, {})

    def has_connections(self, targets: tuple[str, ...]) -> bool:
        """Whether any of `targets` has an established connection now (the kernel's dump
        stops at the first; raises OSError)."""
        connections = self.host.connections
        if connections is None:
            return False
        # Keyed as the backend attributes connections on the listen port: (service, target).
        ports = {(self.name, t): self.targets[t] for t in targets}
        return connections.any(ports, frozenset((self.listen_port,)))

    def _log(self, event: str, text: str = "") -> str:
        """A log line's start: the event and, with several services, the service."""
        where = "" if self.host.config.single else f" service={self.name}"
        return f"event={event}{where}{' ' + text if text else ''}"

    # ---- switches -------------------------------------------------------------------------

    def switch(self, target: str, *, force: bool = False,
               drain_timeout: float | None = None, ramp: float | None = None,
               caller: str = "") -> int:
        """Steer new connections to `target` (with `ramp` seconds: its weight moves to 100 in
        steps, see set_weights). Returns the commit time in µs (0 if nothing changed or a
        drain or ramp started). Raises InvalidTarget, InvalidArgument, TargetUnhealthy,
        BackendFailure. `caller` says who asked (e.g. "uid=1000"): logged, and kept as
        LastSwitchCaller."""
        host = self.host
        received = host.clock()
        caller = caller or "-"
        if target not in ALL_TARGETS:
            self._result("invalid", "refused", None)
            log.info(self._log("switch_refused", "to=%s reason=invalid_target caller=%s"),
                     quote(target), quote(caller))
            raise InvalidTarget(f"unknown target {target!r}; valid targets: "
                                f"{', '.join(ALL_TARGETS)}")
        if drain_timeout is not None and not 0 <= drain_timeout <= MAX_SECONDS:
            self._result(target, "refused", None)
            raise InvalidArgument(f"drain timeout {drain_timeout} s is out of range "
                                  f"0-{MAX_SECONDS}")
        if ramp is not None and (target == OFF or not 0 <= ramp <= MAX_SECONDS):
            self._result(target, "refused", None)
            raise InvalidArgument(f"ramp {ramp} s is out of range 0-{MAX_SECONDS}"
                                  if target != OFF else "a switch to off cannot ramp: it drains")
        old = self.active
        if target != OFF:
            main = 100 if target == "main" else 0
            self._check_health(self._shares(main, ramp), force, target, caller)
            return self._steer(main, ramp, caller, received)
        # Towards off: drain the active target first, unless told not to.
        self._cancel_ramp()
        timeout = self.service.drain_timeout if drain_timeout is None else drain_timeout
        if old == OFF:
            self._result(target, "ok", host.clock() - received)
            return 0
        if force or timeout == 0:
            usec = self._switch_kernel(None, caller)
            self._cancel_drain()
            self._publish()
            self._result(target, "ok", host.clock() - received)
            log.info(self._log("switch", "from=%s to=off duration_usec=%d forced=yes caller=%s"),
                     old, usec, quote(caller))
            self._emit_switched(old, OFF, usec)
            return usec
        if self._drain is None:
            self._begin_drain(old, timeout, received=received, caller=caller)
            self._publish()
            log.info(self._log("drain_start", "target=%s timeout=%s caller=%s"), old, timeout,
                     quote(caller))
        elif drain_timeout is not None:
            # Asked again with a timeout of its own: the operator moves the drain's deadline.
            self._drain.deadline = host.clock() + drain_timeout
            self._drain.wall_deadline = host.wall() + drain_timeout
            host._save()
            log.info(self._log("drain_deadline", "target=%s timeout=%s caller=%s"), old,
                     drain_timeout, quote(caller))
        return 0

    def set_weights(self, weights: dict[str, int], *, force: bool = False,
                    ramp: float | None = None, caller: str = "") -> int:
        """Split new connections between main and backup by percent (`weights` names both,
        integers summing to 100). Every target given more than 0 must have passed its last
        probe, unless `force`. With `ramp` seconds, the weights move there from the current
        ones in linear steps, at least one a second (from off, from all-backup or all-main:
        the other end); a switch or another set_weights replaces the ramp. Returns the commit
        time in µs (0 when nothing changed or a ramp started). Raises InvalidArgument,
        TargetUnhealthy, BackendFailure."""
        received = self.host.clock()
        caller = caller or "-"
        if (not isinstance(weights, dict) or set(weights) != set(TARGET_NAMES)
                or any(type(w) is not int or not 0 <= w <= 100 for w in weights.values())
                or sum(weights.values()) != 100):
            self._result("weights", "refused", None)
            raise InvalidArgument(f"weights must give main and backup integers 0-100 that "
                                  f"sum to 100, not {weights!r}")
        if ramp is not None and not 0 <= ramp <= MAX_SECONDS:
            self._result("weights", "refused", None)
            raise InvalidArgument(f"ramp {ramp} s is out of range 0-{MAX_SECONDS}")
        main = weights["main"]
        label = weight_target(main) or OFF
        self._check_health(self._shares(main, ramp), force, label, caller)
        return self._steer(main, ramp, caller, received)

    def _ramp_from(self, main: int) -> int:
        """Main's weight a ramp towards `main` starts from: the current one, or from off the
        other end (main from 0, backup from 100, or the reverse)."""
        return self.weight if self.weight is not None else (0 if main > 0 else 100)

    def _shares(self, main: int, ramp: float | None) -> dict[str, int]:
        """The most each target gets on the way to main's weight `main`: with a ramp, whatever
        it gets at either end (a ramp from off to main starts all on backup)."""
        if not ramp:
            return {"main": main, "backup": 100 - main}
        start = self._ramp_from(main)
        return {"main": max(start, main), "backup": 100 - min(start, main)}

    def _check_health(self, weights: dict[str, int], force: bool, label: str,
                      caller: str) -> None:
        if force:
            return
        for target, weight in weights.items():
            if weight > 0 and not self.host.is_up(self.name, target):
                self._result(label, "refused", None)
                log.info(self._log("switch_refused", "to=%s reason=unhealthy caller=%s"),
                         target, quote(caller))
                raise TargetUnhealthy(f"target {target!r} failed its last health probe "
                                      f"({self.host.reason(self.name, target)}); use force "
                                      "to switch anyway")

    def _steer(self, main: int, ramp: float | None, caller: str, received: float) -> int:
        """Commit main's weight `main` now, or start a ramp there (the caller checked it)."""
        old = self.active
        label = weight_target(main) or OFF
        self._cancel_ramp()
        start = self._ramp_from(main)
        if ramp and start != main:  # (a ramp to where the service is changes nothing)
            self._begin_ramp(_Ramp(start, main, self.host.wall(), ramp, caller=caller,
                                   was=old, received=received))
            return 0
        usec = self._switch_kernel(main, caller)
        self._cancel_drain()
        self._publish()
        self._result(label, "ok", self.host.clock() - received)
        log.info(self._log("switch", "from=%s to=%s duration_usec=%d caller=%s%s"),
                 old, label, usec, quote(caller),
                 f" weight_main={main}" if label == SPLIT else "")
        if old != label or label == SPLIT:
            self._emit_switched(old, label, usec)
        return usec

    # ---- ramps ----------------------------------------------------------------------------

    def _begin_ramp(self, ramp: _Ramp) -> None:
        """Take the ramp's first step now and the rest in a task (the state is saved with it,
        so a restart resumes it where it would have been)."""
        self._cancel_drain()
        self._ramp = ramp
        try:
            self.host._save()
        except BackendFailure:
            self._ramp = None
            raise
        log.info(self._log("ramp_start", "from=%d to=%d seconds=%g caller=%s"), ramp.start,
                 ramp.end, ramp.seconds, quote(ramp.caller))
        self._ramp_step(ramp)
        if self._ramp is ramp:
            ramp.task = asyncio.get_running_loop().create_task(self._run_ramp(ramp))

    def _ramp_step(self, ramp: _Ramp) -> None:
        """Commit the weight the ramp has now; at its end, finish it."""
        weight = ramp.at(self.host.wall())
        if weight != self.weight:
            self._switch_kernel(weight, ramp.caller)
        if weight == ramp.end and ramp.done(self.host.wall()):
            self._ramp = None
            self.host._save()
            label = weight_target(weight) or OFF
            self._result(label, "ok", self.host.clock() - ramp.received)
            log.info(self._log("switch", "from=%s to=%s duration_usec=%d caller=%s ramp_sec=%g"),
                     ramp.was, label, self.last_switch_usec, quote(ramp.caller), ramp.seconds)
            self._publish()
            self._emit_switched(ramp.was, label, self.last_switch_usec)
            return
        self._publish()

    async def _run_ramp(self, ramp: _Ramp) -> None:
        while self._ramp is ramp:
            await asyncio.sleep(ramp.interval())
            if self._ramp is not ramp:
                return
            try:
                self._ramp_step(ramp)
            except BackendFailure:
                continue  # logged; the next step tries again

    def _cancel_ramp(self) -> None:
        if self._ramp is None:
            return
        ramp, self._ramp = self._ramp, None
        if ramp.task is not None and ramp.task is not asyncio.current_task():
            ramp.task.cancel()
        log.info(self._log("ramp_replaced", "at=%s to=%d"), self.weight, ramp.end)

    def _switch_kernel(self, weight: int | None, caller: str) -> int:
        """Save `weight` as this service's desired state, then commit it to the kernel; a
        change becomes the last switch (its time and `caller`). On failure the saved state is
        put back and BackendFailure is raised; the kernel is as it was, or
        (ApplyError.changed) half rebuilt for the reconciler to finish."""
        host = self.host
        changes = weight != self.weight
        stamp = _usec(host.wall()) if changes else self.last_switch_timestamp
        who = caller if changes else self.last_switch_caller
        target = weight_target(weight) or OFF
        try:
            host._save({self.name: self._saved_as(weight, stamp=stamp, caller=who)})
            current = host.backend.read(host._desired())
            usec = host._commit({self.name: weight}, current)
        except (ApplyError, BackendFailure) as e:
            self._result(target, "failed", None)
            log.error(self._log("switch_failed", "to=%s error=%s"), target, quote(str(e)))
            try:
                host._save()
            except BackendFailure:
                pass
            if isinstance(e, BackendFailure):
                raise
            if e.changed:
                # The layout was half rebuilt; the reconciler reads it back and finishes.
                host._next_repair = float("-inf")
            raise BackendFailure(f"the kernel refused the change: {e}") from None
        self.last_switch_timestamp, self.last_switch_caller = stamp, who
        return usec

    def saved_state(self) -> SavedState:
        if self._drain:
            return self._saved_as(None, self._drain, answered=self._drain_answers > 0)
        return self._saved_as(self.weight)

    def _saved_as(self, weight: int | None, drain: _Drain | None = None, *,
                  answered: bool = False, stamp: int | None = None,
                  caller: str | None = None) -> SavedState:
        """Main's `weight` (and `drain`) as saved state, with the ramp in progress and the
        last switch as it stands (or as `stamp` and `caller` say)."""
        target = weight_target(weight) or OFF
        ramp = self._ramp
        return SavedState(target, drain.target if drain else "",
                          drain.wall_deadline if drain else 0.0, drain_answered=answered,
                          drain_caller=drain.caller if drain else "",
                          last_switch_timestamp=(self.last_switch_timestamp if stamp is None
                                                 else stamp),
                          last_switch_caller=self.last_switch_caller if caller is None else caller,
                          weight=weight if target == SPLIT and weight is not None else -1,
                          ramp_from=ramp.start if ramp else -1, ramp_to=ramp.end if ramp else -1,
                          ramp_start=ramp.wall_start if ramp else 0.0,
                          ramp_seconds=ramp.seconds if ramp else 0.0)

    # ---- drains ---------------------------------------------------------------------------

    def _begin_drain(self, target: str, timeout: float, *, save: bool = True,
                     received: float | None = None, caller: str = "") -> None:
        """Start draining `target` towards off (the caller publishes)."""
        host = self.host
        drain = _Drain(target, host.clock() + timeout, host.wall() + timeout, caller=caller)
        if save:
            host._save({self.name: self._saved_as(None, drain)})
        self._drain = drain
        self._drain_answers = 0
        self._drain.task = asyncio.get_running_loop().create_task(
            self._run_drain(self._drain, received if received is not None else host.clock()))

    def _cancel_drain(self) -> None:
        """Forget the drain in progress, if any (the caller publishes)."""
        if self._drain is None:
            return
        drain, self._drain = self._drain, None
        if drain.task is not None and drain.task is not asyncio.current_task():
            drain.task.cancel()
        log.info(self._log("drain_cancelled", "target=%s"), drain.target)

    def _drain_done(self, drain: _Drain) -> str | None:
        """Why the drain may end now, or None to keep waiting."""
        clock = self.host.clock
        if clock() >= drain.deadline:
            return "timeout"
        try:
            # A split drains both targets.
            if self.has_connections(TARGET_NAMES if drain.target == SPLIT else (drain.target,)):
                return None
        except Exception as e:  # unknown is not zero: keep waiting (the deadline still holds)
            log.warning(self._log("count_failed", "target=%s error=%s"), drain.target,
                        quote(str(e)))
            return None
        polled = clock() - self._last_agent_poll <= AGENT_POLL_WINDOW
        if polled and self._drain_answers == 0:
            return None
        return "drained"

    async def _run_drain(self, drain: _Drain, received: float) -> None:
        clock = self.host.clock
        while self._drain is drain:
            reason = self._drain_done(drain)
            if reason is None:
                await asyncio.sleep(DRAIN_POLL_INTERVAL)
                continue
            try:
                usec = self._switch_kernel(None, drain.caller or "-")
            except BackendFailure:
                # Keep steering and retry: giving up would leave the host half-off.
                await asyncio.sleep(1.0)
                continue
            self._drain = None
            self._publish()
            self._result(OFF, "ok", clock() - received)
            log.info(self._log("switch", "from=%s to=off duration_usec=%d drain=%s "
                               "drain_sec=%.3f caller=%s"), drain.target, usec, reason,
                     clock() - received, quote(drain.caller or "-"))
            self._emit_switched(drain.target, OFF, usec)

    async def wait_drained(self, target: str, timeout: float) -> bool:
        """True once `target` has no established connection and no drain of it is pending;
        False if `timeout` seconds pass first (0 checks once)."""
        if target not in TARGET_NAMES:
            raise InvalidTarget(f"unknown target {target!r}; valid targets: "
                                f"{', '.join(TARGET_NAMES)}")
        if not 0 <= timeout <= MAX_SECONDS:
            raise InvalidArgument(f"timeout {timeout} s is out of range 0-{MAX_SECONDS}")
        clock = self.host.clock
        deadline = clock() + timeout
        while True:
            pending = self.draining in (target, SPLIT)
            if not pending and not self.has_connections((target,)):
                return True
            if clock() >= deadline:
                return False
            await asyncio.sleep(min(DRAIN_POLL_INTERVAL, max(0.0, deadline - clock())))

    def close(self) -> None:
        for task in (self._drain and self._drain.task, self._ramp and self._ramp.task):
            if task:
                task.cancel()

    # ---- events ---------------------------------------------------------------------------

    def _publish(self) -> None:
        new = self.snapshot()
        old, self._published = self._published, new
        if new != old:
            for o in self.host.observers:
                o.state_changed(old, new)

    def _emit_switched(self, old: str, new: str, usec: int) -> None:
        for o in self.host.observers:
            o.switched(self.name, old, new, usec)

    def _result(self, target: str, result: str, seconds: float | None) -> None:
        for o in self.host.observers:
            o.switch_result(self.name, target, result, seconds)


class Steering:
    """The host: every service of one network namespace, in one data plane."""

    def __init__(self, config: Config, backend: Backend, store: StateFile, *,
                 health: Health | None = None, connections: Connections | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.config = config
        self.backend = backend
        self.store = store
        self.health: Health = health or AlwaysUp()
        self.connections = connections
        self.clock = clock
        self.wall = wall
        self.observers: list[Observer] = []
        self.services: dict[str, ServiceSteering] = {
            name: ServiceSteering(self, service) for name, service in config.services.items()}
        self._repair_backoff = 0.0  # seconds; 0 while repairs stick
        self._next_repair = float("-inf")
        self._failed_problems: tuple[str, ...] | None = None
        self._read_error: str | None = None

    # ---- services -------------------------------------------------------------------------

    def service(self, name: str | None = None) -> ServiceSteering:
        """The service named, or with None the only one (InvalidArgument with several)."""
        if name is None:
            if len(self.services) == 1:
                return next(iter(self.services.values()))
            objects = ", ".join(SERVICE_PATH + n for n in self.services)
            raise InvalidArgument(f"this zddd steers {len(self.services)} services: name one "
                                  f"(objects {objects})")
        try:
            return self.services[name]
        except KeyError:
            raise InvalidArgument(f"no service {name!r}; services: "
                                  f"{', '.join(self.services)}") from None

    @property
    def single(self) -> bool:
        return self.config.single

    # The single-service view, for one service (InvalidArgument with several).

    def switch(self, target: str, **kw) -> int:
        return self.service().switch(target, **kw)

    async def wait_drained(self, target: str, timeout: float) -> bool:
        return await self.service().wait_drained(target, timeout)

    def snapshot(self) -> Snapshot:
        return self.service().snapshot()

    def agent_polled(self) -> Snapshot:
        return self.service().agent_polled()

    @property
    def active(self) -> str:
        return self.service().active

    @property
    def draining(self) -> str:
        return self.service().draining

    @property
    def last_switch_usec(self) -> int:
        return self.service().last_switch_usec

    @property
    def last_switch_timestamp(self) -> int:
        return self.service().last_switch_timestamp

    @property
    def targets(self) -> dict[str, int]:
        return self.service().targets

    # ---- reads ----------------------------------------------------------------------------

    def is_up(self, service: str, target: str) -> bool:
        return self.health.is_up(service, target)

    def reason(self, service: str, target: str) -> str:
        return self.health.reason(service, target)

    def connection_counts(self) -> dict[str, dict[str, int]]:
        """Established connections per target of every service, in one read of the kernel
        (raises OSError)."""
        return self._count(list(self.services.values()))

    def _count(self, services: list[ServiceSteering]) -> dict[str, dict[str, int]]:
        if self.connections is None:
            return {s.name: {} for s in services}
        ports = {(s.name, t): port for s in services for t, port in s.targets.items()}
        found = self.connections.count(ports, frozenset(s.listen_port for s in services))
        counts: dict[str, dict[str, int]] = {s.name: {} for s in services}
        for (name, target), n in found.items():
            counts[name][target] = n
        return counts

    def flows_steered(self) -> dict[tuple[str, str], int]:
        """New connections the data plane steered, per (service, target), read now."""
        return self.backend.flows_steered()

    def flow_table(self) -> tuple[int, int] | None:
        """(entries, capacity) of the backend's flow map, where it has one."""
        return self.backend.flow_table()

    # ---- start: adopt what the kernel has ---------------------------------------------------

    def start(self) -> None:
        """Adopt the kernel's state, or program the saved or initial one, service by service.
        Resumes saved drains. Raises BackendUnavailable or NewerLayout (both with the kernel
        untouched: no restart helps) or BackendFailure."""
        self.backend.probe()  # BackendUnavailable: the config asks for what cannot run here
        try:
            kernel = self.backend.read(self._desired())
        except NewerLayout:
            raise
        except ApplyError as e:
            raise BackendFailure(f"cannot read the kernel's state: {e}") from None
        saved = self.store.load() or {}
        hows, resumes = {}, {}
        for name, svc in self.services.items():
            mine = saved.get(name)
            if mine is not None:
                svc.last_switch_timestamp = mine.last_switch_timestamp
                svc.last_switch_caller = mine.last_switch_caller
            if (kernel is not None and name in kernel.weights
                    and (kernel.intact or kernel.weights[name] is not None)):
                svc.weight = kernel.weights[name]
                hows[name] = "adopted"
            elif mine is not None:
                svc.weight = (mine.weight if mine.target == SPLIT
                              else target_weight(mine.draining or mine.target))
                hows[name] = "restored"
            else:
                svc.weight = target_weight(svc.service.initial)
                hows[name] = "initial"
            resumes[name] = (mine is not None and mine.target == OFF
                             and bool(mine.draining) and mine.draining == svc.active)
            if mine is not None and mine.ramp_to >= 0:
                # Resumed below: its first step commits where it would be now. The weight
                # stays what the kernel (or the saved step) has until then, so that step
                # sees the difference and commits it (set here, the kernel would keep the
                # weight of before the restart until the reconciler called it drift).
                svc._ramp = _Ramp(mine.ramp_from, mine.ramp_to, mine.ramp_start,
                                  mine.ramp_seconds, caller=mine.last_switch_caller,
                                  was=weight_target(mine.ramp_from) or OFF,
                                  received=self.clock())
        # Saved before the kernel changes, as for every switch: a crash in between must not
        # leave a restart to undo what the kernel was just given. A saved drain stays saved.
        self._save({name: saved[name] for name, resume in resumes.items() if resume})
        # (a resumed ramp is saved as it stands now, with its start and end)
        if kernel is None or not kernel.intact:
            if kernel is not None and any(p.startswith(OLDER_LAYOUT) for p in kernel.problems):
                log.info("event=layout_upgraded problems=%s", quote("; ".join(kernel.problems)))
            elif kernel is not None:
                log.warning("event=layout_rebuilt problems=%s", quote("; ".join(kernel.problems)))
            try:
                self._commit({}, kernel)
            except ApplyError as e:
                raise BackendFailure(f"the kernel refused zddd's data plane: {e}") from None
        for name, svc in self.services.items():
            if resumes[name]:
                mine = saved[name]
                remaining = max(0.0, mine.drain_deadline - self.wall())
                svc._begin_drain(svc.active, remaining, save=False, caller=mine.drain_caller)
                svc._drain_answers = int(mine.drain_answered)
                if not mine.drain_answered and svc.service.agent_listen is not None:
                    # HAProxy may have polled just before zddd went down and may poll again
                    # any moment: treat it as polled, so the drain waits (up to
                    # AGENT_POLL_WINDOW) until it has been told "drain" before the steering goes.
                    svc._last_agent_poll = self.clock()
            ramp = svc._ramp
            if ramp is not None:
                svc._ramp = None
                svc._begin_ramp(ramp)
            svc._publish()
            log.info(svc._log("start", "how=%s target=%s backend=%s%s%s"), hows[name],
                     svc.active, self.backend.name,
                     f" resumed_drain={svc.active}" if resumes[name] else "",
                     f" resumed_ramp={ramp.end}" if ramp is not None else "")

    # ---- the kernel -----------------------------------------------------------------------

    def _desired(self, weights: dict[str, int | None] | None = None) -> Desired:
        """The layout with every service's current weight, or the ones `weights` gives."""
        now = {name: svc.weight for name, svc in self.services.items()}  # a drain keeps steering
        return Desired.from_config(self.config, {**now, **(weights or {})})

    def _commit(self, weights: dict[str, int | None], current: KernelState | None) -> int:
        """Plan and apply the layout with `weights` changed; the services take the weights."""
        desired = self._desired(weights)
        plan = self.backend.plan(current, desired)
        started = time.perf_counter()
        self.backend.apply(plan)
        usec = _usec(time.perf_counter() - started)
        for name, weight in weights.items():
            self.services[name].weight = weight
        if plan:
            # The last commit's time: the services switched, or all after a layout change.
            for name in weights or (self.services if self.single else ()):
                self.services[name].last_switch_usec = usec
        if plan.layout:
            self._read_back(desired)
        return usec if plan else 0

    def _read_back(self, desired: Desired) -> None:
        """After layout steps, let the backend see what it built (what it reports about the
        kernel, e.g. sk_lookup's listener problems, follows its reads). Best-effort: the
        change is committed, and a read that fails now is the reconciler's to retry."""
        try:
            self.backend.read(desired)
        except ApplyError as e:
            log.warning("event=read_back_failed error=%s", quote(str(e)))

    def _save(self, changes: dict[str, SavedState] | None = None) -> None:
        """Save every service's state, with `changes` in place of theirs."""
        states = {name: svc.saved_state() for name, svc in self.services.items()}
        states.update(changes or {})
        try:
            self.store.save(states)
        except OSError as e:
            # Saving comes before the kernel changes; without it a restart could undo the switch.
            raise BackendFailure(f"cannot save the state to {self.store.path}: "
                                 f"{e.strerror or e}") from None

    # ---- reload and repair ----------------------------------------------------------------

    def check_reload(self, new: Config) -> None:
        """Raise InvalidConfig if `new` changes what only a restart can change, or removes a
        service that is not off."""
        blocked = self.config.restart_changes(new)
        if blocked:
            raise InvalidConfig(f"changing {', '.join(blocked)} needs a restart of zddd")
        for name, svc in self.services.items():
            if name not in new.services and (svc.active != OFF or svc.draining):
                raise InvalidConfig(f"service {name!r} is removed but steers {svc.active}: "
                                    f"switch it off first (zddctl -s {name} switch off "
                                    "--wait-drained)")

    def reload(self, new: Config) -> None:
        """Take over a new config, all or nothing: InvalidConfig if it changes what only a
        restart can change, BackendFailure if the state cannot be saved where it now goes or
        the kernel refuses the new layout; in both cases the running config stays. Services
        added start at their `initial`; removed ones (off) leave the data plane."""
        self.check_reload(new)
        old, old_store, old_services = self.config, self.store, self.services
        added = [n for n in new.services if n not in old_services]
        removed = [n for n in old_services if n not in new.services]
        services = {}
        for name, service in new.services.items():
            svc = old_services.get(name) or ServiceSteering(self, service)
            if name in added:
                svc.weight = target_weight(service.initial)
            services[name] = svc
        self.config, self.services = new, services
        try:
            if new.state_file != old.state_file:
                self.store = StateFile(new.state_file)
            self._save()
            current = self.backend.read(self._desired())
            self._commit({}, current)
        except (ApplyError, BackendFailure) as e:
            self.config, self.store, self.services = old, old_store, old_services
            self._next_repair = float("-inf")  # put the old layout back if half changed
            if isinstance(e, BackendFailure):
                raise
            raise BackendFailure(f"the kernel refused the new layout: {e}") from None
        for name, svc in services.items():
            svc.service = new.services[name]
        if added or removed:
            for o in self.observers:
                o.services_changed(added, removed)
        for svc in services.values():
            svc._publish()
        log.info("event=reload%s%s", f" added={','.join(added)}" if added else "",
                 f" removed={','.join(removed)}" if removed else "")

    def reconcile(self) -> bool:
        """Restore the kernel state if someone else changed it. True if a repair was made.
        A repair that does not stick (the same problems found again) is retried with a growing
        back-off, said once; a different drift found meanwhile is repaired at once: the kernel
        is read on every call, back-off or not."""
        now = self.clock()
        desired = self._desired()
        try:
            current = self.backend.read(desired)
        except ApplyError as e:
            if str(e) != self._read_error:  # said once, not four times a second
                log.warning("event=read_failed error=%s", quote(str(e)))
            self._read_error = str(e)
            return False
        self._read_error = None
        expected = {s.name: s.weight for s in desired.services}
        if current is not None and current.intact and current.weights == expected:
            if self._repair_backoff:
                log.info("event=repair_holds")
            self._repair_backoff, self._failed_problems = 0.0, None
            return False
        def state(weights: dict[str, int | None]) -> str:
            """Services' targets for the log: "main" alone, or "web:main,api:off"."""
            shown = {n: weight_target(weights.get(n)) or OFF for n in expected}
            if len(shown) == 1:
                return next(iter(shown.values()))
            return ",".join(f"{n}:{t}" for n, t in shown.items())

        if current is None:
            problems: tuple[str, ...] = ("nothing of zddd's",)
            found = "nothing"
        else:
            differ = [n for n in expected if current.weights.get(n, -1) != expected[n]]
            found = state(current.weights)
            problems = current.problems or tuple(
                f"{'' if len(expected) == 1 else n + ' '}steering "
                f"{weight_target(current.weights.get(n)) or OFF}" for n in differ)
        if problems != self._failed_problems:
            self._repair_backoff = 0.0  # a new drift, not the last repair failing to hold
        elif now < self._next_repair:
            return False
        else:
            if not self._repair_backoff:
                log.warning("event=repair_not_holding problems=%s retry=backoff max_sec=%g",
                            quote("; ".join(problems)), MAX_REPAIR_BACKOFF)
            self._repair_backoff = min(MAX_REPAIR_BACKOFF,
                                       max(2 * self._repair_backoff, 2 * RECONCILE_INTERVAL))
        self._failed_problems = problems
        self._next_repair = now + self._repair_backoff
        try:
            self._commit({}, current)
        except ApplyError as e:
            if not self._repair_backoff:  # a refusal that repeats is said once, with the back-off
                log.error("event=repair_failed error=%s", quote(str(e)))
            return False
        for svc in self.services.values():
            svc._publish()
        if not self._repair_backoff:
            log.warning("event=drift_repaired target=%s found=%s problems=%s", state(expected),
                        found, quote("; ".join(problems)))
        for o in self.observers:
            o.drift_repaired()
        return True

    async def run_reconciler(self, interval: float = RECONCILE_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reconcile()

    def close(self) -> None:
        """Stop background work. The kernel state stays exactly as it is."""
        for svc in self.services.values():
            svc.close()

    def health_changed(self, service: str, target: str, up: bool) -> None:
        """Called by the health monitor when a target's probe result flips."""
        svc = self.services.get(service)
        if svc is not None:
            svc._publish()
