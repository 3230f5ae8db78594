"""The state machine: which target the kernel steers to, switches, drains, adoption and repair.

The core owns all state and knows nothing of D-Bus, HTTP or systemd. Adapters call its methods
and subscribe to its events through `Observer`. Everything runs in one asyncio event loop, and
every kernel change (switch, drain end, reload, repair) happens in a synchronous method with no
await inside, so changes are serialized without a lock and each one is a single transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from .backends import ApplyError, Backend, Desired, KernelState
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
MAX_WAIT_SECONDS = 24 * 3600


class Observer:
    """Events of the core; adapters override what they need. Called in the event loop."""

    def properties_changed(self, changes: dict) -> None: ...

    def switched(self, old: str, new: str, duration_usec: int) -> None: ...

    def switch_result(self, target: str, result: str, seconds: float | None) -> None:
        """result is ok, refused or failed; target is "invalid" for an unknown name; seconds is
        request → commit, for ok results."""

    def drift_repaired(self) -> None: ...

    def config_changed(self, old: Config, new: Config) -> None: ...


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
    caller: str = "-"  # who asked for it, for the log line of the switch that ends it


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
        self.observers: list[Observer] = []
        self._drain: _Drain | None = None
        self._last_agent_poll = float("-inf")
        self._drain_answers = 0  # "drain" answers the agent gave during the current drain

    # ---- read-only view -------------------------------------------------------------------

    @property
    def draining(self) -> str:
        return self._drain.target if self._drain else ""

    @property
    def targets(self) -> dict[str, int]:
        return {name: t.port for name, t in self.config.targets.items()}

    def agent_answer(self) -> str:
        """The agent-check line for HAProxy now; each call counts as one poll."""
        self._last_agent_poll = self.clock()
        if self._drain:
            self._drain_answers += 1
            if self._drain_answers == 1:
                # Once per drain, so a restarted zddd knows HAProxy has been told.
                try:
                    self._save(self._saved_state())
                except BackendFailure as e:
                    log.warning("event=state_save_failed error=%s", quote(str(e)))
            return "drain"
        if self.active == OFF:
            return "maint"
        return "ready up" if self.health.is_up(self.active) else "down"

    def connection_counts(self) -> dict[str, int]:
        if self.connections is None:
            return {}
        return self.connections.count(self.targets)

    # ---- start: adopt what the kernel has ---------------------------------------------------

    def start(self) -> None:
        """Adopt the kernel's state, or program the saved or initial one. Resumes a saved drain.
        Raises BackendFailure (kernel untouched if the backend cannot run)."""
        try:
            self.backend.probe()
            kernel = self.backend.read(self._desired(None))
        except Exception as e:  # BackendUnavailable, ApplyError: both mean "cannot start"
            raise BackendFailure(str(e)) from None
        saved = self.store.load()
        if kernel is not None and (kernel.intact or kernel.active is not None):
            active = kernel.active or OFF
            how = "adopted"
        elif saved is not None:
            active = saved.draining or saved.target
            how = "restored"
        else:
            active = self.config.initial
            how = "initial"
        if kernel is None or not kernel.intact:
            try:
                self._commit(active, kernel)
            except ApplyError as e:
                raise BackendFailure(f"the kernel refused zddd's table: {e}") from None
        self.active = active
        resume = saved is not None and saved.target == OFF and saved.draining == active
        if resume:
            remaining = max(0.0, saved.drain_deadline - self.wall())
            self._begin_drain(active, remaining, save=False)
            self._drain_answers = int(saved.drain_answered)
            if not saved.drain_answered and self.config.agent_listen is not None:
                # HAProxy may have polled just before zddd went down and may poll again any
                # moment: treat it as polled, so the drain waits (up to AGENT_POLL_WINDOW) until
                # it has been told "drain" before the steering goes.
                self._last_agent_poll = self.clock()
        else:
            self._save(SavedState(active))
        log.info("event=start how=%s target=%s backend=%s%s", how, active, self.backend.name,
                 f" resumed_drain={active}" if resume else "")

    # ---- switches -------------------------------------------------------------------------

    def switch(self, target: str, *, force: bool = False,
               drain_timeout: float | None = None, caller: str = "") -> int:
        """Steer new connections to `target`. Returns the commit time in µs (0 if nothing
        changed or a drain started). Raises InvalidTarget, TargetUnhealthy, BackendFailure."""
        received = self.clock()
        if target not in ALL_TARGETS:
            self._result("invalid", "refused", None)
            log.info("event=switch_refused to=%s reason=invalid_target caller=%s",
                     quote(target), caller or "-")
            raise InvalidTarget(f"unknown target {target!r}; valid targets: "
                                f"{', '.join(ALL_TARGETS)}")
        if drain_timeout is not None and not 0 <= drain_timeout <= MAX_WAIT_SECONDS:
            self._result(target, "refused", None)
            raise InvalidArgument(f"drain timeout {drain_timeout} s is out of range 0-86400")
        old = self.active
        if target != OFF:
            if not force and not self.health.is_up(target):
                self._result(target, "refused", None)
                log.info("event=switch_refused to=%s reason=unhealthy caller=%s", target,
                         caller or "-")
                raise TargetUnhealthy(f"target {target!r} failed its last health probe "
                                      f"({self.health.reason(target)}); use force to switch "
                                      "anyway")
            usec = self._switch_kernel(target)
            self._cancel_drain()
            self._result(target, "ok", self.clock() - received)
            log.info("event=switch from=%s to=%s duration_usec=%d caller=%s",
                     old, target, usec, caller or "-")
            if old != target:
                self._emit_switched(old, target, usec)
            return usec
        # Towards off: drain the active target first, unless told not to.
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        if old == OFF:
            self._result(target, "ok", self.clock() - received)
            return 0
        if force or timeout == 0:
            usec = self._switch_kernel(OFF)
            self._cancel_drain()
            self._result(target, "ok", self.clock() - received)
            log.info("event=switch from=%s to=off duration_usec=%d forced=yes caller=%s",
                     old, usec, caller or "-")
            self._emit_switched(old, OFF, usec)
            return usec
        if self._drain is None:
            self._begin_drain(old, timeout, received=received, caller=caller or "-")
            log.info("event=drain_start target=%s timeout=%s caller=%s", old, timeout,
                     caller or "-")
        elif drain_timeout is not None:
            # Asked again with a timeout of its own: the operator moves the drain's deadline.
            self._drain.deadline = self.clock() + drain_timeout
            self._drain.wall_deadline = self.wall() + drain_timeout
            self._save(self._saved_state())
            log.info("event=drain_deadline target=%s timeout=%s caller=%s", old,
                     drain_timeout, caller or "-")
        return 0

    def _switch_kernel(self, target: str) -> int:
        """Save `target` as the desired state, then commit it to the kernel. On failure the
        kernel and the saved state are left as they were, and BackendFailure is raised."""
        try:
            self._save(SavedState(target))
            current = self.backend.read(self._desired(None))
            return self._commit(target, current)
        except (ApplyError, BackendFailure) as e:
            self._result(target, "failed", None)
            log.error("event=switch_failed to=%s error=%s", target, quote(str(e)))
            try:
                self._save(self._saved_state())
            except BackendFailure:
                pass
            if isinstance(e, BackendFailure):
                raise
            raise BackendFailure(f"the kernel refused the change: {e}") from None

    def _commit(self, target: str, current: KernelState | None) -> int:
        desired = self._desired(None if target == OFF else target)
        plan = self.backend.plan(current, desired)
        started = time.perf_counter()
        self.backend.apply(plan)
        usec = _usec(time.perf_counter() - started)
        changes = {}
        if plan:
            self.last_switch_usec = usec
            changes["LastSwitchUSec"] = usec
        if self.active != target:
            self.active = target
            changes["ActiveTarget"] = target
        if changes:
            self._emit_properties(changes)
        return usec

    def _save(self, state: SavedState) -> None:
        try:
            self.store.save(state)
        except OSError as e:
            # Saving comes before the kernel changes; without it a restart could undo the switch.
            raise BackendFailure(f"cannot save the state to {self.store.path}: "
                                 f"{e.strerror or e}") from None

    def _saved_state(self) -> SavedState:
        if self._drain:
            return SavedState(OFF, self._drain.target, self._drain.wall_deadline,
                              drain_answered=self._drain_answers > 0)
        return SavedState(self.active)

    def _desired(self, active: str | None) -> Desired:
        return Desired.from_config(self.config, active)

    # ---- drains ---------------------------------------------------------------------------

    def _begin_drain(self, target: str, timeout: float, *, save: bool = True,
                     received: float | None = None, caller: str = "-") -> None:
        drain = _Drain(target, self.clock() + timeout, self.wall() + timeout, caller=caller)
        if save:
            self._save(SavedState(OFF, target, drain.wall_deadline))
        self._drain = drain
        self._drain_answers = 0
        self._drain.task = asyncio.get_running_loop().create_task(
            self._run_drain(self._drain, received if received is not None else self.clock()))
        self._emit_properties({"Draining": target})

    def _cancel_drain(self) -> None:
        if self._drain is None:
            return
        drain, self._drain = self._drain, None
        if drain.task is not None and drain.task is not asyncio.current_task():
            drain.task.cancel()
        log.info("event=drain_cancelled target=%s", drain.target)
        self._emit_properties({"Draining": ""})

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
                usec = self._switch_kernel(OFF)
            except BackendFailure:
                # Keep steering and retry: giving up would leave the host half-off.
                await asyncio.sleep(1.0)
                continue
            self._drain = None
            self._result(OFF, "ok", self.clock() - received)
            self._emit_properties({"Draining": ""})
            log.info("event=switch from=%s to=off duration_usec=%d drain=%s drain_sec=%.3f "
                     "caller=%s", drain.target, usec, reason, self.clock() - received,
                     drain.caller)
            self._emit_switched(drain.target, OFF, usec)

    async def wait_drained(self, target: str, timeout: float) -> bool:
        """True once `target` has no established connection and no drain of it is pending;
        False if `timeout` seconds pass first (0 checks once)."""
        if target not in TARGET_NAMES:
            raise InvalidTarget(f"unknown target {target!r}; valid targets: "
                                f"{', '.join(TARGET_NAMES)}")
        if not 0 <= timeout <= MAX_WAIT_SECONDS:
            raise InvalidArgument(f"timeout {timeout} s is out of range 0-86400")
        deadline = self.clock() + timeout
        while True:
            pending = self.draining == target
            if not pending and self.connection_counts().get(target, 0) == 0:
                return True
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(min(DRAIN_POLL_INTERVAL, max(0.0, deadline - self.clock())))

    # ---- reload and repair ----------------------------------------------------------------

    def reload(self, new: Config) -> None:
        """Take over a new config. Raises InvalidConfig (the running one stays) if it changes
        what only a restart can change."""
        blocked = self.config.restart_changes(new)
        if blocked:
            raise InvalidConfig(f"changing {', '.join(blocked)} needs a restart of zddd")
        old = self.config
        self.config = new
        try:
            kernel_target = self._drain.target if self._drain else self.active
            current = self.backend.read(self._desired(None))
            self._commit(kernel_target, current)
        except ApplyError as e:
            self.config = old
            raise BackendFailure(f"the kernel refused the new layout: {e}") from None
        if new.state_file != old.state_file:
            self.store = StateFile(new.state_file)
            self._save(self._saved_state())
        if old.targets != new.targets:
            self._emit_properties({"Targets": self.targets})
        for o in self.observers:
            o.config_changed(old, new)
        log.info("event=reload")

    def reconcile(self) -> bool:
        """Restore the kernel state if someone else changed it. True if a repair was made."""
        expected = self._drain.target if self._drain else self.active
        try:
            current = self.backend.read(self._desired(None))
        except ApplyError as e:
            log.warning("event=read_failed error=%s", quote(str(e)))
            return False
        if current is not None and current.intact and (current.active or OFF) == expected:
            return False
        try:
            self._commit(expected, current)
        except ApplyError as e:
            log.error("event=repair_failed error=%s", quote(str(e)))
            return False
        log.warning("event=drift_repaired target=%s found=%s", expected,
                    "nothing" if current is None else (current.active or OFF))
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
        self._emit_properties({"TargetsUp": {n: self.health.is_up(n) for n in self.targets}})

    # ---- events ---------------------------------------------------------------------------

    def _emit_properties(self, changes: dict) -> None:
        for o in self.observers:
            o.properties_changed(changes)

    def _emit_switched(self, old: str, new: str, usec: int) -> None:
        for o in self.observers:
            o.switched(old, new, usec)

    def _result(self, target: str, result: str, seconds: float | None) -> None:
        for o in self.observers:
            o.switch_result(target, result, seconds)
