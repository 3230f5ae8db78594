"""A model-based test of zddd's state machine (hypothesis stateful testing) against a real zddd
and the real kernel in a namespace, for every backend.

Random sequences of switches, forced switches, drains (short drain_timeout, with and without a
connection holding them open), reloads, health flaps (a vhost stopped and started), SIGTERM and
SIGKILL restarts, and tampering with the data plane (each backend's own: nft commands on zddd's
table; tc filters, clsact qdiscs and XDP programs detached by hand; pins removed; the sk_lookup
link detached or its socket map emptied; another target written into the `active` map). After
every step, what zddd reports (ActiveTarget, Draining, the state file) must match where the
kernel steers (read without zddd's code), where a fresh connection to 8888 goes
("main"/"backup", or refused for off or for a stopped vhost), and what a simple model of the
contract predicts.

One test per backend (`-k nftables`, `-k sk_lookup`, ...). Bounded by ZDDD_MODEL_EXAMPLES
(default 20 for nftables, 6 for the BPF backends, whose every start compiles with bcc) ×
ZDDD_MODEL_STEPS (default 10): about two minutes each.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from zdddlab import APP_V4, AppLab, HeldConnection, connect_error, http_get, wait_for

EXAMPLES = {"nftables": 20, "tc": 6, "xdp": 6, "sk_lookup": 6}
STEPS = int(os.environ.get("ZDDD_MODEL_STEPS", "10"))
TARGETS = ("main", "backup")
DRAIN_TIMEOUTS = (2.0, 3.0)  # reloads switch between them
E = "org.zddd.Steering1.Error."
SLACK = 1.5  # seconds a drain may overrun its deadline (polling, a loaded machine)


class ZdddModel(RuleBasedStateMachine):
    backend = "nftables"  # each backend's subclass (at the end) names its own

    def __init__(self):
        super().__init__()
        assert os.geteuid() == 0, "the model test needs root (namespaces, nftables)"
        self.tmp = Path(tempfile.mkdtemp(prefix="zt-model-"))
        self.lab = None
        self.held: list[tuple[str, HeldConnection]] = []
        try:
            self.lab = AppLab(self.tmp, backend=self.backend)
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
            kernel = self.z.steered_to()
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

    @rule(choice=st.integers(0, 5))
    def tamper(self, choice):
        how = TAMPERING[self.backend][choice % len(TAMPERING[self.backend])]
        event(f"tamper: {how.__name__}")  # seen with --hypothesis-show-statistics
        how(self)
        # zddd repairs within a few reconcile periods.
        self._settle_drain()
        steering = self.draining or self.active

        def repaired():
            return (self.z.steered_to() == steering and not self._intruder()
                    and self._serves() == (steering if steering != "off" and self.up[steering]
                                           else "refused"))

        wait_for(repaired, 5, f"zddd to repair its data plane after {how.__name__}",
                 interval=0.1)

    def _intruder(self) -> bool:
        if self.backend != "nftables":
            return False
        listing = self.z.nft()
        return any(i["chain"]["name"] == "intruder" for i in listing.get("nftables", [])
                   if "chain" in i)

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


# ---- tampering, per backend ----------------------------------------------------------------

def _nft(*commands: str):
    def tamper(model: ZdddModel) -> None:
        model.lab.app.run("nft", "; ".join(commands))  # one transaction: no repair in between
    tamper.__name__ = commands[0]
    return tamper


def _each_interface(template: str, name: str):
    """`template` run for every interface of the app's namespace ({dev}); failures ignored
    (an interface may have nothing attached)."""
    def tamper(model: ZdddModel) -> None:
        links = json.loads(model.lab.app.run("ip", "-j", "link", "show").stdout)
        script = "; ".join(template.format(dev=link["ifname"]) + " 2>/dev/null"
                           for link in links)
        model.lab.app.run("sh", "-c", script + "; true")
    tamper.__name__ = name
    return tamper


def _pins(*names: str):
    def tamper(model: ZdddModel) -> None:
        root = Path(model.z.config["bpf_pin_dir"])
        for name in names:
            subprocess.run(["rm", "-rf", str(root / name)], check=True)
    tamper.__name__ = "remove pins " + " ".join(names)
    return tamper


def _other_target(pin: str, values: dict[int, int], default: int):
    """Write another target into the `active` map, as a foreign tool would."""
    def tamper(model: ZdddModel) -> None:
        from zddd.kernel import bpf as kbpf

        fd = kbpf.obj_get(str(Path(model.z.config["bpf_pin_dir"]) / pin))
        try:
            now = struct.unpack("=I", kbpf.map_lookup(fd, ZERO, 4))[0]
            kbpf.map_update(fd, ZERO, struct.pack("=I", values.get(now, default)))
        finally:
            os.close(fd)
    tamper.__name__ = "other target in " + pin
    return tamper


def _sk_lookup_detach(model: ZdddModel) -> None:
    """The link stays pinned but no longer attached."""
    from zddd.kernel import bpf as kbpf

    fd = kbpf.obj_get(str(Path(model.z.config["bpf_pin_dir"]) / "sk_lookup_link"))
    try:
        kbpf.link_detach(fd)
    finally:
        os.close(fd)


def _sk_lookup_empty_sockets(model: ZdddModel) -> None:
    """Every listener taken out of the socket map."""
    from zddd.kernel import bpf as kbpf

    fd = kbpf.obj_get(str(Path(model.z.config["bpf_pin_dir"]) / "sk_lookup_sockets"))
    try:
        for key in range(32):
            if kbpf.map_lookup(fd, struct.pack("=I", key), 8):  # deleting an empty one: EINVAL
                kbpf.map_delete(fd, struct.pack("=I", key))
    finally:
        os.close(fd)


ZERO = struct.pack("=I", 0)
# tc/xdp: `active` holds the target's port (0 for off); sk_lookup: the target's place in the
# sorted target names, plus one (backup 1, main 2; 0 for off).
PORT_SWAP = {8080: 80, 80: 8080}
INDEX_SWAP = {1: 2, 2: 1}
TAMPERING = {
    "nftables": [
        _nft("flush map inet zddd steer"),
        _nft("flush map inet zddd steer",
             "add element inet zddd steer { 8888 : goto steer_backup }"),
        _nft("delete table inet zddd"),
        _nft("flush chain inet zddd prerouting"),
        _nft("add chain inet zddd intruder"),
    ],
    "tc": [
        _each_interface("tc filter del dev {dev} ingress", "tc ingress filters deleted"),
        _each_interface("tc filter del dev {dev} egress", "tc egress filters deleted"),
        _each_interface("tc qdisc del dev {dev} clsact", "clsact qdiscs deleted"),
        _pins("tc/active", "tc/flows"),
        _pins("tc"),
        _other_target("tc/active", PORT_SWAP, 8080),
    ],
    "xdp": [
        _each_interface("ip link set dev {dev} xdpgeneric off; ip link set dev {dev} xdp off",
                        "xdp programs detached"),
        _each_interface("tc filter del dev {dev} egress", "tc egress filters deleted"),
        _each_interface("tc qdisc del dev {dev} clsact", "clsact qdiscs deleted"),
        _pins("xdp/active", "xdp/ingress"),
        _pins("xdp"),
        _other_target("xdp/active", PORT_SWAP, 8080),
    ],
    "sk_lookup": [
        _pins("sk_lookup_link"),
        _sk_lookup_detach,
        _sk_lookup_empty_sockets,
        _other_target("sk_lookup_active", INDEX_SWAP, 2),
    ],
}


def _test_case(backend: str):
    model = type(f"ZdddModel_{backend}", (ZdddModel,), {"backend": backend})
    model.TestCase.settings = settings(
        max_examples=int(os.environ.get("ZDDD_MODEL_EXAMPLES", EXAMPLES[backend])),
        stateful_step_count=STEPS, deadline=None, database=None,
        suppress_health_check=list(HealthCheck))
    return model.TestCase


TestModel_nftables = _test_case("nftables")
TestModel_tc = _test_case("tc")
TestModel_xdp = _test_case("xdp")
TestModel_sk_lookup = _test_case("sk_lookup")
