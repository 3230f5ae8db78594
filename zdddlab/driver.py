"""Drive one zddd backend directly, without the daemon, from inside a network namespace.

    ip netns exec NS .venv/bin/python -m zdddlab.driver BACKEND JSON_DESIRED

JSON_DESIRED describes a zddd.backends.Desired without the weights, in one of two forms: the
single-service one (`listen_port` and `ports`: one service named "default") or
`services` (name -> {listen_port, ports}); `ports` as a mapping or as [name, port] pairs;
pin_dir and flow_entries default to /sys/fs/bpf/zddd and 4096. Reads one JSON command per line
on stdin and answers one JSON line on stdout ({"error": ..., "changed": ...} when the command
raised; `changed` is ApplyError's). The backend runs in this process, so it sees the namespace
the way zddd would. Every service starts off; what the driver last asked for is what
`reconcile` repairs towards. Commands (key "op"); those marked [desired] take an optional
"desired" mapping of fields that differ from JSON_DESIRED for that command alone; [service]
ones an optional "service" (default: the only one, or "default"):

    probe                    the backend's probe; how long it took, s ("seconds")
    new {source_suffix}      a fresh backend instance (as a restarted zddd); a BPF backend's
                             program source gets `source_suffix` appended (an upgraded package)
    read [desired]           the backend's read: {active, intact, problems} in the single form,
                             {weights, intact, problems} in the services form (None: nothing)
    switch {target | weight} [service] [desired]  read, plan, apply, as zddd's core does: the
                             state before and after, the number of layout steps and their
                             names ("steps"), how many services the flip stores ("flips", and
                             "flip": whether there was one), the apply time in µs
    reconcile {target}       repair as the core's reconciler does; whether it repaired
    reconciler {target, interval}  keep reconciling in a thread (until "stop")
    stop                     stop the reconciler thread
    leftover [desired] | remove [desired]
    flows                    flows_steered (by target in the single form, "service/target" in
                             the services form) and flow_table
    count                    established connections per target (per "service/target")
    listener {target} [service]  the backend's target_problem
    flips {n} [service]      n switches main/backup; the apply time of each, µs

Tests (tests/integration/test_sk_lookup.py, test_bpf_dataplane.py) and the bench use it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from zddd.backends import Desired, ServiceLayout, backend_class, target_weight, weight_target
from zddd.kernel.sock_diag import TCP_ESTABLISHED, as_flow, dump_sockets

from .base import VENV_BIN


class DriverError(RuntimeError):
    """The backend raised: the message names the command; `changed` is ApplyError's (False when
    nothing of the plan took effect)."""

    def __init__(self, message: str, changed: bool = False):
        super().__init__(message)
        self.changed = changed


class DriverClient:
    """The other end: starts this script with `popen` (e.g. a NetNS's, so it runs in that
    namespace) and sends it commands; `client(op, **args)` returns the answer or raises
    DriverError with the backend's error."""

    def __init__(self, popen, backend: str, desired: dict, prefix: tuple[str, ...] = (),
                 python: str = str(VENV_BIN / "python")):
        import subprocess

        self.proc = popen(*prefix, python, "-m", "zdddlab.driver", backend,
                          json.dumps(desired), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            self.close()
            raise RuntimeError("the backend driver did not start")

    def __call__(self, op: str, **args):
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the backend driver died during {op}")
        answer = json.loads(line)
        if "error" in answer:
            raise DriverError(f"{op}: {answer['error']}", answer.get("changed", False))
        return answer

    def close(self) -> None:
        self.proc.close()


SINGLE = "default"


def desired_of(fields: dict, weights: dict[str, int | None] | None = None) -> Desired:
    """A Desired from JSON_DESIRED's fields, every service at its weight in `weights` (a
    service not named is off)."""
    fields = {"pin_dir": "/sys/fs/bpf/zddd", "flow_entries": 4096, **fields}
    services = fields.pop("services", None)
    if services is None:
        services = {SINGLE: {"listen_port": fields.pop("listen_port"),
                             "ports": fields.pop("ports")}}
    weights = weights or {}
    layouts = tuple(sorted(
        (ServiceLayout(name, spec["listen_port"], tuple(sorted(dict(spec["ports"]).items())),
                       weights.get(name)) for name, spec in services.items()),
        key=lambda s: s.listen_port))
    if fields.get("interfaces") is not None:
        fields["interfaces"] = tuple(fields["interfaces"])
    return Desired(layouts, **fields)


def _step_name(step) -> str:
    return type(step).__name__.lower()


class Driver:
    def __init__(self, backend: str, desired: dict):
        self.backend_name = backend
        self.fields = desired
        self.single = "services" not in desired
        self.weights: dict[str, int | None] = {}
        self.desired = desired_of(desired)
        self.lock = threading.Lock()
        self.reconciler: threading.Thread | None = None
        self.stopping = threading.Event()
        self.repairs = 0
        self.op_new()

    def _desired(self, overrides: dict | None = None) -> Desired:
        fields = {**self.fields, **overrides} if overrides else self.fields
        return desired_of(fields, self.weights)

    def _service(self, service: str | None) -> str:
        if service is not None:
            return service
        names = [s.name for s in self.desired.services]
        return names[0] if len(names) == 1 else SINGLE

    def _state(self, desired: Desired | None = None):
        return self.backend.read(desired or self._desired())

    def _describe(self, state) -> dict | None:
        if state is None:
            return None
        if self.single:
            return {"active": weight_target(state.weights.get(SINGLE)), "intact": state.intact,
                    "problems": list(state.problems)}
        return {"weights": state.weights, "intact": state.intact,
                "problems": list(state.problems)}

    def _key(self, service: str, target: str) -> str:
        return target if self.single else f"{service}/{target}"

    def op_probe(self) -> dict:
        started = time.perf_counter()
        self.backend.probe()
        return {"seconds": time.perf_counter() - started}

    def op_new(self, source_suffix: str | None = None) -> dict:
        self.backend = backend_class(self.backend_name)()
        if source_suffix:
            from zddd.backends.rewrite import source_path

            self.backend._source = source_path().read_bytes() + source_suffix.encode()
        return {}

    def op_read(self, desired: dict | None = None) -> dict:
        return {"state": self._describe(self._state(self._desired(desired)))}

    def op_switch(self, target: str | None = None, weight: int | None = None,
                  service: str | None = None, desired: dict | None = None) -> dict:
        name = self._service(service)
        self.weights[name] = weight if weight is not None else target_weight(target)
        wanted = self._desired(desired)
        current = self._state(wanted)
        plan = self.backend.plan(current, wanted)
        started = time.perf_counter()
        self.backend.apply(plan)
        usec = (time.perf_counter() - started) * 1e6
        flips = plan.flip if isinstance(plan.flip, tuple) else (
            () if plan.flip is None else (plan.flip,))
        return {"layout": len(plan.layout), "steps": [_step_name(s) for s in plan.layout],
                "flip": plan.flip is not None, "flips": len(flips), "usec": usec,
                "before": self._describe(current), "after": self._describe(self._state(wanted))}

    def op_reconcile(self, target: str | None = None, weights: dict | None = None) -> dict:
        if weights is not None:
            self.weights = dict(weights)
        elif self.single:
            self.weights = {SINGLE: target_weight(target)}
        wanted = self._desired()
        current = self._state(wanted)
        if current is not None and current.intact and current.weights == {
                s.name: s.weight for s in wanted.services}:
            return {"repaired": False}
        plan = self.backend.plan(current, wanted)
        self.backend.apply(plan)
        self.repairs += 1
        if plan.layout:
            # As the core does: read back after a layout change, best effort (what health
            # sees of the backend comes from its reads).
            try:
                self._state(wanted)
            except Exception:  # the next round reads again
                pass
        return {"repaired": True, "before": self._describe(current)}

    def op_reconciler(self, target: str | None = None, interval: float = 0.25) -> dict:
        def loop():
            while not self.stopping.wait(interval):
                with self.lock:
                    try:
                        self.op_reconcile(target)
                    except Exception as e:  # keep going, as the core does
                        print(json.dumps({"reconcile_error": str(e)}), file=sys.stderr)

        self.stopping.clear()
        self.reconciler = threading.Thread(target=loop, daemon=True)
        self.reconciler.start()
        return {}

    def op_stop(self) -> dict:
        self.stopping.set()
        if self.reconciler is not None:
            self.reconciler.join()
        return {"repairs": self.repairs}

    def op_leftover(self, desired: dict | None = None) -> dict:
        return {"leftover": self.backend.leftover(self._desired(desired))}

    def op_remove(self, desired: dict | None = None) -> dict:
        self.backend.remove(self._desired(desired))
        return {}

    def op_flows(self) -> dict:
        table = self.backend.flow_table()
        steered = {self._key(*key) if isinstance(key, tuple) else key: n
                   for key, n in self.backend.flows_steered().items()}
        return {"steered": steered, "table": list(table) if table else None}

    def op_count(self) -> dict:
        """Established connections per (service, target): on the target's port, or on the
        listen port and attributed to it by the backend."""
        desired = self._desired()
        counts = {self._key(s.name, t): 0 for s in desired.services for t, _ in s.ports}
        targets = desired.by_target_port()
        listens = desired.by_listen_port()
        attribute = self.backend.flow_attribution()
        steered = []
        for sock in dump_sockets(sorted(set(targets) | set(listens)), 1 << TCP_ESTABLISHED):
            if sock.local_port in targets:
                service, target = targets[sock.local_port]
                counts[self._key(service.name, target)] += 1
            elif sock.local_port in listens and attribute is not None:
                steered.append(as_flow(sock.family, sock.local_addr.ljust(16, b"\0"),
                                       sock.local_port, sock.remote_addr.ljust(16, b"\0"),
                                       sock.remote_port))
        if steered:
            for key in attribute(steered):
                if key is not None and self._key(*key) in counts:
                    counts[self._key(*key)] += 1
        return {"counts": counts}

    def op_listener(self, target: str, service: str | None = None) -> dict:
        return {"problem": self.backend.target_problem(self._service(service), target)}

    def op_flips(self, n: int, service: str | None = None) -> dict:
        name = self._service(service)
        times = []
        for i in range(n):
            self.weights[name] = 100 if i % 2 else 0
            wanted = self._desired()
            plan = self.backend.plan(self._state(wanted), wanted)
            started = time.perf_counter()
            self.backend.apply(plan)
            times.append((time.perf_counter() - started) * 1e6)
        return {"usec": times}


def main() -> None:
    # Answers go to the original stdout; anything a library prints there (bcc and LLVM write
    # diagnostics to fd 1) goes to stderr instead, so it cannot break the protocol.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = answers
    driver = Driver(sys.argv[1], json.loads(sys.argv[2]))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command.pop("op")
        try:
            with driver.lock if op != "stop" else _nolock():
                answer = getattr(driver, f"op_{op}")(**command)
        except Exception as e:
            answer = {"error": f"{type(e).__name__}: {e}",
                      "changed": getattr(e, "changed", False)}
        print(json.dumps(answer), flush=True)


class _nolock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
