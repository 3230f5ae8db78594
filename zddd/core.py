"""The state machine: which target the kernel steers to, switches, drains, adoption and repair.

The core owns all state and knows nothing of D-Bus, HTTP or systemd. Adapters call its methods,
read it through one immutable `Snapshot`, and subscribe to its events through `Observer`
(`state_changed(old, new)` with two snapshots, so each adapter derives what it shows; no event
speaks an adapter's vocabulary). Everything runs in one asyncio event loop, and
every kernel change (switch, drain end, reload, repair) happens in a synchronous method with no
await inside, so changes are serialized without a lock and each one is a single transaction.
Observers see one snapshot per transition, published once all of its state is updated (never
`ActiveTarget=off` while `Draining` still names a target): the helpers that change part of the
state (`_commit`, `_begin_drain`, `_cancel_drain`) leave publishing to the transition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .backends import ApplyError, Backend, Desired, KernelState, NewerLayout
from .api import MAX_SECONDS
from .config import ALL_TARGETS, OFF, TARGET_NAMES, Config
from .errors import BackendFailure, InvalidArgument, InvalidConfig, InvalidTarget, TargetUnhealthy
from .logfmt import quote
from .state import SavedState, StateFile

log = logging.getLogger("zddd")

# HAProxy counts as polling the agent if it asked within this window; a drain then waits until
# HAProxy has been told "drain" at least once, so it stops sending before the steering goes.
AGENT_POLL_WINDOW = 10.0
DRAIN_POLL_INTERVAL = 0.05
RECONCILE_INTERVAL = 0.25
# A repair that does not stick (someone keeps changing zddd's objects back, or the kernel shows
# them differently than zddd writes them) is retried less and less often, up to this.
MAX_REPAIR_BACKOFF = 60.0


@dataclass(frozen=True)
class Snapshot:
    """What the core holds at one moment; what every adapter shows is derived from this."""

    active: str  # the target the kernel steers new connections to ("off": none)
    draining: str  # the target being drained towards off, or ""
    backend: str
    listen_port: int
    targets: dict[str, int] = field(default_factory=dict)  # name -> port
    up: dict[str, bool] = field(default_factory=dict)  # name -> last probe passed
    last_switch_usec: int = 0  # the last data-plane commit, apply step alone
    drain_timeout: float = 0.0
    last_switch_timestamp: int = 0  # when the last switch was committed, µs since the epoch
    last_switch_caller: str = ""  # who asked for it (see Steering.switch), "" if never


class Observer:
    """Events of the core; adapters override what they need. Called in the event loop."""

    def state_changed(self, old: Snapshot, new: Snapshot) -> None: ...

    def switched(self, old: str, new: str, duration_usec: int) -> None: ...

    def switch_result(self, target: str, result: str, seconds: float | None) -> None:
        """result is ok, refused or failed; target is "invalid" for an unknown name; seconds is
        request → commit, for ok results."""

    def drift_repaired(self) -> None: ...


class Health(Protocol):
    def is_up(self, target: str) -> bool: ...

    def reason(self, target: str) -> str:
        """Why the last probe gave its result, for refusals."""


class Connections(Protocol):
    def count(self, ports: dict[str, int]) -> dict[str, int]: ...


class AlwaysUp:
    def is_up(self, target: str) -> bool:
        return True

    def reason(self, target: str) -> str:
        return "not probed"


@dataclass
class _Drain:
    target: str
    deadline: float  # monotonic
    wall_deadline: float  # the same moment in wall-clock time, for the state file
    task: asyncio.Task | None = None
    caller: str = ""  # who asked for it: the caller of the switch that ends it


def _usec(seconds: float) -> int:
    return max(0, int(round(seconds * 1e6)))


class Steering:
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
        self.active = OFF
        self.last_switch_usec = 0
        self.last_switch_timestamp = 0
        self.last_switch_caller = ""
        self.observers: list[Observer] = []
        self._drain: _Drain | None = None
        self._last_agent_poll = float("-inf")
        self._drain_answers = 0  # "drain" answers the agent gave during the current drain
        self._published = self.snapshot()
        self._repair_backoff = 0.0  # seconds; 0 while repairs stick
        self._next_repair = float("-inf")
        self._failed_problems: tuple[str, ...] | None = None
        self._read_error: str | None = None

    # ---- read-only view -------------------------------------------------------------------

    @property
    def draining(self) -> str:
        return self._drain.target if self._drain else ""

    @property
    def targets(self) -> dict[str, int]:
        return {name: t.port for name, t in self.config.targets.items()}

    def snapshot(self) -> Snapshot:
        return Snapshot(self.active, self.draining, self.backend.name, self.config.listen_port,
                        self.targets, {n: bool(self.health.is_up(n)) for n in self.targets},
                        self.last_switch_usec, self.config.drain_timeout,
                        self.last_switch_timestamp, self.last_switch_caller)

    def agent_polled(self) -> Snapshot:
        """HAProxy asked the agent; the state to answer from. While draining, the answer tells
        HAProxy to drain: the first one of each drain is saved, so a restarted zddd knows."""
        self._last_agent_poll = self.clock()
        snap = self.snapshot()
        if self._drain:
            self._drain_answers += 1
            if self._drain_answers == 1:
                try:
                    self._save(self._saved_state())
                except BackendFailure as e:
                    log.warning("event=state_save_failed error=%s", quote(str(e)))
        return snap

    def connection_counts(self) -> dict[str, int]:
        """Established connections per target, read from the kernel now (raises OSError)."""
        if self.connections is None:
            return {}
        return self.connections.count(self.targets)

    def flows_steered(self) -> dict[str, int]:
        """New connections the data plane steered, per target, read from the kernel now."""
        return self.backend.flows_steered()

    def flow_table(self) -> tuple[int, int] | None:
        """(entries, capacity) of the backend's flow map, where it has one."""
        return self.backend.flow_table()

    # ---- start: adopt what the kernel has ---------------------------------------------------

    def start(self) -> None:
        """Adopt the kernel's state, or program the saved or initial one. Resumes a saved drain.
        Raises BackendUnavailable or NewerLayout (both with the kernel untouched: no restart
        helps) or BackendFailure."""
        self.backend.probe()  # BackendUnavailable: the config asks for what cannot run here
        try:
            kernel = self.backend.read(self._desired(None))
        except NewerLayout:
            raise
        except ApplyError as e:
            raise BackendFailure(f"cannot read the kernel's state: {e}") from None
        saved = self.store.load()
        if saved is not None:
            self.last_switch_timestamp = saved.last_switch_timestamp
            self.last_switch_caller = saved.last_switch_caller
        if kernel is not None and (kernel.intact or kernel.active is not None):
            active = kernel.active or OFF
            how = "adopted"
        elif saved is not None:
            active = saved.draining or saved.target
            how = "restored"
        else:
            active = self.config.initial
            how = "initial"
        resume = saved is not None and saved.target == OFF and saved.draining == active
        if not resume:
            # Saved before the kernel changes, as for every switch: a crash in between must
            # not leave a restart to undo what the kernel was just given.
            self._save(self._saved_as(active))
        if kernel is None or not kernel.intact:
            if kernel is not None:
                log.warning("event=layout_rebuilt problems=%s", quote("; ".join(kernel.problems)))
            try:
                self._commit(active, kernel)
            except ApplyError as e:
                raise BackendFailure(f"the kernel refused zddd's data plane: {e}") from None
        self.active = active
        if resume:
            assert saved is not None  # resume comes from a saved drain
            remaining = max(0.0, saved.drain_deadline - self.wall())
            self._begin_drain(active, remaining, save=False, caller=saved.drain_caller)
            self._drain_answers = int(saved.drain_answered)
            if not saved.drain_answered and self.config.agent_listen is not None:
                # HAProxy may have polled just before zddd went down and may poll again any
                # moment: treat it as polled, so the drain waits (up to AGENT_POLL_WINDOW) until
                # it has been told "drain" before the steering goes.
                self._last_agent_poll = self.clock()
        self._publish()
        log.info("event=start how=%s target=%s backend=%s%s", how, active, self.backend.name,
                 f" resumed_drain={active}" if resume else "")

    # ---- switches -------------------------------------------------------------------------

    def switch(self, target: str, *, force: bool = False,
               drain_timeout: float | None = None, caller: str = "") -> int:
        """Steer new connections to `target`. Returns the commit time in µs (0 if nothing
        changed or a drain started). Raises InvalidTarget, TargetUnhealthy, BackendFailure.
        `caller` says who asked (e.g. "uid=1000"): logged, and kept as LastSwitchCaller."""
        received = self.clock()
        caller = caller or "-"
        if target not in ALL_TARGETS:
            self._result("invalid", "refused", None)
            log.info("event=switch_refused to=%s reason=invalid_target caller=%s",
                     quote(target), quote(caller))
            raise InvalidTarget(f"unknown target {target!r}; valid targets: "
                                f"{', '.join(ALL_TARGETS)}")
        if drain_timeout is not None and not 0 <= drain_timeout <= MAX_SECONDS:
            self._result(target, "refused", None)
            raise InvalidArgument(f"drain timeout {drain_timeout} s is out of range "
                                  f"0-{MAX_SECONDS}")
        old = self.active
        if target != OFF:
            if not force and not self.health.is_up(target):
                self._result(target, "refused", None)
                log.info("event=switch_refused to=%s reason=unhealthy caller=%s", target,
                         quote(caller))
                raise TargetUnhealthy(f"target {target!r} failed its last health probe "
                                      f"({self.health.reason(target)}); use force to switch "
                                      "anyway")
            usec = self._switch_kernel(target, caller)
            self._cancel_drain()
            self._publish()
            self._result(target, "ok", self.clock() - received)
            log.info("event=switch from=%s to=%s duration_usec=%d caller=%s",
                     old, target, usec, quote(caller))
            if old != target:
                self._emit_switched(old, target, usec)
            return usec
        # Towards off: drain the active target first, unless told not to.
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        if old == OFF:
            self._result(target, "ok", self.clock() - received)
            return 0
        if force or timeout == 0:
            usec = self._switch_kernel(OFF, caller)
            self._cancel_drain()
            self._publish()
            self._result(target, "ok", self.clock() - received)
            log.info("event=switch from=%s to=off duration_usec=%d forced=yes caller=%s",
                     old, usec, quote(caller))
            self._emit_switched(old, OFF, usec)
            return usec
        if self._drain is None:
            self._begin_drain(old, timeout, received=received, caller=caller)
            self._publish()
            log.info("event=drain_start target=%s timeout=%s caller=%s", old, timeout,
                     quote(caller))
        elif drain_timeout is not None:
            # Asked again with a timeout of its own: the operator moves the drain's deadline.
            self._drain.deadline = self.clock() + drain_timeout
            self._drain.wall_deadline = self.wall() + drain_timeout
            self._save(self._saved_state())
            log.info("event=drain_deadline target=%s timeout=%s caller=%s", old,
                     drain_timeout, quote(caller))
        return 0

    def _switch_kernel(self, target: str, caller: str) -> int:
        """Save `target` as the desired state, then commit it to the kernel; a change of target
        becomes the last switch (its time and `caller`). On failure the saved state is put
        back and BackendFailure is raised; the kernel is as it was, or (ApplyError.changed)
        half rebuilt for the reconciler to finish."""
        changes = target != self.active
        stamp = _usec(self.wall()) if changes else self.last_switch_timestamp
        who = caller if changes else self.last_switch_caller
        try:
            self._save(SavedState(target, last_switch_timestamp=stamp, last_switch_caller=who))
            current = self.backend.read(self._desired(None))
            usec = self._commit(target, current)
        except (ApplyError, BackendFailure) as e:
            self._result(target, "failed", None)
            log.error("event=switch_failed to=%s error=%s", target, quote(str(e)))
            try:
                self._save(self._saved_state())
            except BackendFailure:
                pass
            if isinstance(e, BackendFailure):
                raise
            if e.changed:
                # The layout was half rebuilt; the reconciler reads it back and finishes.
                self._next_repair = float("-inf")
            raise BackendFailure(f"the kernel refused the change: {e}") from None
        self.last_switch_timestamp, self.last_switch_caller = stamp, who
        return usec

    def _commit(self, target: str, current: KernelState | None) -> int:
        desired = self._desired(None if target == OFF else target)
        plan = self.backend.plan(current, desired)
        started = time.perf_counter()
        self.backend.apply(plan)
        usec = _usec(time.perf_counter() - started)
        if plan:
            self.last_switch_usec = usec
        self.active = target
        if plan.layout:
            self._read_back(desired)
        return usec

    def _read_back(self, desired: Desired) -> None:
        """After layout steps, let the backend see what it built (what it reports about the
        kernel, e.g. sk_lookup's listener problems, follows its reads). Best-effort: the
        change is committed, and a read that fails now is the reconciler's to retry."""
        try:
            self.backend.read(desired)
        except ApplyError as e:
            log.warning("event=read_back_failed error=%s", quote(str(e)))

    def _save(self, state: SavedState) -> None:
        try:
            self.store.save(state)
        except OSError as e:
            # Saving comes before the kernel changes; without it a restart could undo the switch.
            raise BackendFailure(f"cannot save the state to {self.store.path}: "
                                 f"{e.strerror or e}") from None

    def _saved_state(self) -> SavedState:
        if self._drain:
            return self._saved_as(OFF, self._drain, answered=self._drain_answers > 0)
        return self._saved_as(self.active)

    def _saved_as(self, target: str, drain: _Drain | None = None, *,
                  answered: bool = False) -> SavedState:
        """`target` (and `drain`) as saved state, with the last switch as it stands."""
        return SavedState(target, drain.target if drain else "",
                          drain.wall_deadline if drain else 0.0, drain_answered=answered,
                          drain_caller=drain.caller if drain else "",
                          last_switch_timestamp=self.last_switch_timestamp,
                          last_switch_caller=self.last_switch_caller)

    def _desired(self, active: str | None) -> Desired:
        return Desired.from_config(self.config, active)

    # ---- drains ---------------------------------------------------------------------------

    def _begin_drain(self, target: str, timeout: float, *, save: bool = True,
                     received: float | None = None, caller: str = "") -> None:
        """Start draining `target` towards off (the caller publishes)."""
        drain = _Drain(target, self.clock() + timeout, self.wall() + timeout, caller=caller)
        if save:
            self._save(self._saved_as(OFF, drain))
        self._drain = drain
        self._drain_answers = 0
        self._drain.task = asyncio.get_running_loop().create_task(
            self._run_drain(self._drain, received if received is not None else self.clock()))

    def _cancel_drain(self) -> None:
        """Forget the drain in progress, if any (the caller publishes)."""
        if self._drain is None:
            return
        drain, self._drain = self._drain, None
        if drain.task is not None and drain.task is not asyncio.current_task():
            drain.task.cancel()
        log.info("event=drain_cancelled target=%s", drain.target)

    def _drain_done(self, drain: _Drain) -> str | None:
        """Why the drain may end now, or None to keep waiting."""
        if self.clock() >= drain.deadline:
            return "timeout"
        try:
            if self.connection_counts().get(drain.target, 0) > 0:
                return None
        except Exception as e:  # unknown is not zero: keep waiting (the deadline still holds)
            log.warning("event=count_failed target=%s error=%s", drain.target, quote(str(e)))
            return None
        polled = self.clock() - self._last_agent_poll <= AGENT_POLL_WINDOW
        if polled and self._drain_answers == 0:
            return None
        return "drained"

    async def _run_drain(self, drain: _Drain, received: float) -> None:
        while self._drain is drain:
            reason = self._drain_done(drain)
            if reason is None:
                await asyncio.sleep(DRAIN_POLL_INTERVAL)
                continue
            try:
                usec = self._switch_kernel(OFF, drain.caller or "-")
            except BackendFailure:
                # Keep steering and retry: giving up would leave the host half-off.
                await asyncio.sleep(1.0)
                continue
            self._drain = None
            self._publish()
            self._result(OFF, "ok", self.clock() - received)
            log.info("event=switch from=%s to=off duration_usec=%d drain=%s drain_sec=%.3f "
                     "caller=%s", drain.target, usec, reason, self.clock() - received,
                     quote(drain.caller or "-"))
            self._emit_switched(drain.target, OFF, usec)

    async def wait_drained(self, target: str, timeout: float) -> bool:
        """True once `target` has no established connection and no drain of it is pending;
        False if `timeout` seconds pass first (0 checks once)."""
        if target not in TARGET_NAMES:
            raise InvalidTarget(f"unknown target {target!r}; valid targets: "
                                f"{', '.join(TARGET_NAMES)}")
        if not 0 <= timeout <= MAX_SECONDS:
            raise InvalidArgument(f"timeout {timeout} s is out of range 0-{MAX_SECONDS}")
        deadline = self.clock() + timeout
        while True:
            pending = self.draining == target
            if not pending and self.connection_counts().get(target, 0) == 0:
                return True
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(min(DRAIN_POLL_INTERVAL, max(0.0, deadline - self.clock())))

    # ---- reload and repair ----------------------------------------------------------------

    def check_reload(self, new: Config) -> None:
        """Raise InvalidConfig if `new` changes what only a restart can change."""
        blocked = self.config.restart_changes(new)
        if blocked:
            raise InvalidConfig(f"changing {', '.join(blocked)} needs a restart of zddd")

    def reload(self, new: Config) -> None:
        """Take over a new config, all or nothing: InvalidConfig if it changes what only a
        restart can change, BackendFailure if the state cannot be saved where it now goes or
        the kernel refuses the new layout; in both cases the running config stays."""
        self.check_reload(new)
        old, old_store = self.config, self.store
        if new.state_file != old.state_file:
            store = StateFile(new.state_file)
            try:
                store.save(self._saved_state())
            except OSError as e:
                raise BackendFailure(f"cannot save the state to {store.path}: "
                                     f"{e.strerror or e}") from None
            self.store = store
        self.config = new
        try:
            kernel_target = self._drain.target if self._drain else self.active
            current = self.backend.read(self._desired(None))
            self._commit(kernel_target, current)
        except ApplyError as e:
            self.config, self.store = old, old_store
            self._next_repair = float("-inf")  # put the old layout back if half changed
            raise BackendFailure(f"the kernel refused the new layout: {e}") from None
        self._publish()
        log.info("event=reload")

    def reconcile(self) -> bool:
        """Restore the kernel state if someone else changed it. True if a repair was made.
        A repair that does not stick (the same problems found again) is retried with a growing
        back-off, said once; a different drift found meanwhile is repaired at once: the kernel
        is read on every call, back-off or not."""
        now = self.clock()
        expected = self._drain.target if self._drain else self.active
        try:
            current = self.backend.read(self._desired(None))
        except ApplyError as e:
            if str(e) != self._read_error:  # said once, not four times a second
                log.warning("event=read_failed error=%s", quote(str(e)))
            self._read_error = str(e)
            return False
        self._read_error = None
        if current is not None and current.intact and (current.active or OFF) == expected:
            if self._repair_backoff:
                log.info("event=repair_holds")
            self._repair_backoff, self._failed_problems = 0.0, None
            return False
        found = "nothing" if current is None else (current.active or OFF)
        problems = (("nothing of zddd's",) if current is None
                    else current.problems or (f"steering {found}",))
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
            self._commit(expected, current)
        except ApplyError as e:
            if not self._repair_backoff:  # a refusal that repeats is said once, with the back-off
                log.error("event=repair_failed error=%s", quote(str(e)))
            return False
        self._publish()
        if not self._repair_backoff:
            log.warning("event=drift_repaired target=%s found=%s problems=%s", expected, found,
                        quote("; ".join(problems)))
        for o in self.observers:
            o.drift_repaired()
        return True

    async def run_reconciler(self, interval: float = RECONCILE_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reconcile()

    def close(self) -> None:
        """Stop background work. The kernel state stays exactly as it is."""
        if self._drain and self._drain.task:
            self._drain.task.cancel()

    def health_changed(self, target: str, up: bool) -> None:
        """Called by the health monitor when a target's probe result flips."""
        self._publish()

    # ---- events ---------------------------------------------------------------------------

    def _publish(self) -> None:
        new = self.snapshot()
        old, self._published = self._published, new
        if new != old:
            for o in self.observers:
                o.state_changed(old, new)

    def _emit_switched(self, old: str, new: str, usec: int) -> None:
        for o in self.observers:
            o.switched(old, new, usec)

    def _result(self, target: str, result: str, seconds: float | None) -> None:
        for o in self.observers:
            o.switch_result(target, result, seconds)
