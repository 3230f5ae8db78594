"""A model-based test of zddd's state machine (hypothesis stateful testing) against a real zddd
and the real kernel in a namespace.

Random sequences of switches, forced switches, drains (short drain_timeout, with and without a
connection holding them open), reloads, health flaps (a vhost stopped and started), SIGTERM and
SIGKILL restarts, and tampering with the data plane (nft commands on zddd's table). After every
step, what zddd reports (ActiveTarget, Draining, the state file) must match where a fresh
connection to 8888 goes ("main"/"backup", or refused for off or for a stopped vhost) and what a
simple model of the contract predicts.

Bounded by ZDDD_MODEL_EXAMPLES (default 20) × ZDDD_MODEL_STEPS (default 10): about two minutes.
ZDDD_MODEL_BACKEND (default nftables) picks the `backend` config key, so the same model runs
against the other data planes; tampering is nftables-only, and for other backends the kernel is
judged by the traffic alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from zdddlab import APP_V4, AppLab, HeldConnection, connect_error, http_get, wait_for

BACKEND = os.environ.get("ZDDD_MODEL_BACKEND", "nftables")
EXAMPLES = int(os.environ.get("ZDDD_MODEL_EXAMPLES", "20"))
STEPS = int(os.environ.get("ZDDD_MODEL_STEPS", "10"))
TARGETS = ("main", "backup")
DRAIN_TIMEOUTS = (2.0, 3.0)  # reloads switch between them
E = "org.zddd.Steering1.Error."
SLACK = 1.5  # seconds a drain may overrun its deadline (polling, a loaded machine)


class ZdddModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        assert os.geteuid() == 0, "the model test needs root (namespaces, nftables)"
        self.tmp = Path(tempfile.mkdtemp(prefix="zt-model-"))
        self.lab = None
        self.held: list[tuple[str, HeldConnection]] = []
        try:
            self.lab = AppLab(self.tmp, backend=BACKEND)
            self.vhosts = {"main": self.lab.main, "backup": self.lab.backup}
            self.z = self.lab.start_zddd({
                "drain_timeout": DRAIN_TIMEOUTS[0],
                "health": {"interval": 0.1, "timeout": 0.3},
            })
        except BaseException:
            self._close()
            raise
        # The model: what the contract says zddd does.
        self.up = {"main": True, "backup": True}
        self.active = "main"
        self.draining = ""
        self.drain_deadline = 0.0
        self.drain_timeout = DRAIN_TIMEOUTS[0]

    # ---- helpers ------------------------------------------------------------------------------

    def _close(self) -> None:
        for _, conn in self.held:
            conn.close()
        if self.lab is not None:
            self.lab.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def teardown(self) -> None:
        self._close()

    def _fail(self, message: str) -> AssertionError:
        return AssertionError(f"{message}\n--- zddd log (tail) ---\n{self.z.log()[-4000:]}")

    def _serves(self) -> str:
        try:
            return http_get(self.lab.client, APP_V4, 8888, timeout=2)
        except ConnectionError:
            what, _ = connect_error(self.lab.client, APP_V4, 8888)
            return "refused" if what == "ECONNREFUSED" else f"?{what}"

    def _call(self, *args) -> str | None:
        err, _ = self.z.call(*args, timeout=10)
        return err

    def _drain_started(self, old: str) -> None:
        """After a Switch(off) that zddd accepted while steering to `old`."""
        self.draining = old
        self.drain_deadline = time.monotonic() + self.drain_timeout
        if not any(t == old for t, _ in self.held):
            # Nothing holds the drain: it ends at once (no HAProxy polls the agent here).
            wait_for(lambda: self.z.prop("Draining") == "", 3, "an empty drain to end")
            self.active, self.draining = "off", ""

    def _observe(self):
        """One consistent reading of zddd and the kernel: (active, draining, kernel, traffic,
        state file); retried when a drain ended while it was being read."""
        for _ in range(10):
            before = (self.z.prop("ActiveTarget"), self.z.prop("Draining"))
            kernel = self.z.steered_to() if BACKEND == "nftables" else None
            traffic = self._serves()
            state = json.loads(self.z.state_path.read_text())
            after = (self.z.prop("ActiveTarget"), self.z.prop("Draining"))
            if before == after:
                return (*after, kernel, traffic, state)
        raise self._fail("zddd's state kept changing while it was read")

    # ---- rules --------------------------------------------------------------------------------

    @rule(name=st.sampled_from(TARGETS))
    def switch(self, name):
        target = name
        err = self._call("Switch", "s", target)
        if self.up[target]:
            assert err is None, self._fail(f"Switch({target}) failed: {err}")
            self.active, self.draining = target, ""
        else:
            assert err == E + "TargetUnhealthy", self._fail(f"Switch({target}) gave {err}")

    @rule(name=st.sampled_from(TARGETS + ("off",)))
    def force_switch(self, name):
        target = name
        from zddd.service.dbus import Variant

        err = self._call("SwitchWithOptions", "sa{sv}", target, {"force": Variant("b", True)})
        assert err is None, self._fail(f"forced Switch({target}) failed: {err}")
        self.active, self.draining = target, ""

    @rule(hold=st.booleans())
    def drain(self, hold):
        self._settle_drain()
        if hold and len(self.held) < 3:
            # A connection that keeps the drain going to its timeout (over several steps).
            self.hold_a_connection()
        err = self._call("Switch", "s", "off")
        assert err is None, self._fail(f"Switch(off) failed: {err}")
        if self.active != "off" and not self.draining:
            self._drain_started(self.active)

    @precondition(lambda self: len(self.held) < 3)
    @rule()
    def hold_a_connection(self):
        self._settle_drain()
        # During a drain the steering may go any moment: where the connection lands is a race.
        if self.active == "off" or not self.up[self.active] or self.draining:
            return
        self.held.append((self.active, HeldConnection(self.lab.client, APP_V4, 8888)))

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 2))
    def release_a_connection(self, index):
        _, conn = self.held.pop(index % len(self.held))
        conn.close()

    @rule()
    def reload(self):
        self.drain_timeout = DRAIN_TIMEOUTS[self.drain_timeout == DRAIN_TIMEOUTS[0]]
        self.z.config["drain_timeout"] = self.drain_timeout
        self.z.write_config()
        err = self._call("Reload")
        assert err is None, self._fail(f"Reload failed: {err}")

    @rule(name=st.sampled_from(TARGETS))
    def flap(self, name):
        target = name
        if self.up[target]:
            self.vhosts[target].stop()
            # Its connections died with it.
            for conn in [c for t, c in self.held if t == target]:
                conn.close()
            self.held = [(t, c) for t, c in self.held if t != target]
        else:
            self.vhosts[target].start()
        self.up[target] = not self.up[target]
        wait_for(lambda: self.z.prop("TargetsUp")[target] == self.up[target], 3,
                 f"zddd to see {target} {'up' if self.up[target] else 'down'}")

    @rule(sig=st.sampled_from([signal.SIGTERM, signal.SIGKILL]))
    def restart(self, sig):
        self.z.kill(sig)
        self.z.start()

    @precondition(lambda self: BACKEND == "nftables")
    @rule(how=st.sampled_from(["flush-map", "other-element", "delete-table", "flush-hook",
                               "foreign-chain"]))
    def tamper(self, how):
        run = self.lab.app.run
        if how == "flush-map":
            run("nft", "flush", "map", "inet", "zddd", "steer")
        elif how == "other-element":
            # One transaction: zddd's repair must not slip in between the two.
            run("nft", "flush map inet zddd steer; "
                "add element inet zddd steer { 8888 : goto steer_backup }")
        elif how == "delete-table":
            run("nft", "delete", "table", "inet", "zddd")
        elif how == "flush-hook":
            run("nft", "flush", "chain", "inet", "zddd", "prerouting")
        else:
            run("nft", "add", "chain", "inet", "zddd", "intruder")
        # zddd repairs within a few reconcile periods.
        self._settle_drain()
        steering = self.draining or self.active

        def repaired():
            listing = self.z.nft()
            names = {i["chain"]["name"] for i in listing.get("nftables", []) if "chain" in i}
            return (self.z.steered_to() == steering and "intruder" not in names
                    and self._serves() == (steering if steering != "off" and self.up[steering]
                                           else "refused"))

        wait_for(repaired, 5, f"zddd to repair the table after {how}", interval=0.1)

    # ---- the invariant ------------------------------------------------------------------------

    def _settle_drain(self) -> None:
        """Let the model follow a drain that ran out its deadline."""
        if self.draining and time.monotonic() >= self.drain_deadline + SLACK:
            wait_for(lambda: self.z.prop("Draining") == "", 3, "the drain to end")
            self.active, self.draining = "off", ""

    @invariant()
    def reports_match_the_kernel_traffic_and_the_model(self):
        self._settle_drain()
        active, draining, kernel, traffic, state = self._observe()
        where = f"zddd says active={active} draining={draining!r}"
        # What zddd reports agrees with itself and its state file ...
        if draining:
            assert draining == active, self._fail(where)
            assert state == {**state, "target": "off", "draining": active}, self._fail(
                f"{where}; state file {state}")
        else:
            assert state["target"] == active and state.get("draining", "") == "", self._fail(
                f"{where}; state file {state}")
        # ... with the kernel and where a fresh connection goes ...
        if kernel is not None:
            assert kernel == active, self._fail(f"{where}; kernel steers to {kernel}")
        expected = active if active != "off" and self.up[active] else "refused"
        assert traffic == expected, self._fail(f"{where}; a new connection got {traffic}")
        # ... and with the model.
        if self.draining:
            ended = (active, draining) == ("off", "")
            assert (active, draining) == (self.draining, self.draining) or ended, self._fail(
                f"{where}; model: draining {self.draining}")
            if ended:
                assert time.monotonic() >= self.drain_deadline - 0.2 or not any(
                    t == self.draining for t, _ in self.held), self._fail(
                        "the drain ended early with a connection open")
                self.active, self.draining = "off", ""
        else:
            assert (active, draining) == (self.active, ""), self._fail(
                f"{where}; model: active {self.active}")

    @invariant()
    def no_traceback(self):
        assert "Traceback" not in self.z.log(), self._fail("a traceback in zddd's log")


ZdddModel.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None, database=None,
    suppress_health_check=list(HealthCheck))
TestZdddModel = ZdddModel.TestCase
