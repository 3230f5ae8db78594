"""Drive one zddd backend directly, without the daemon, from inside a network namespace.

    ip netns exec NS .venv/bin/python -m zdddlab.driver BACKEND JSON_DESIRED

JSON_DESIRED holds the fields of zddd.backends.Desired, the services either as `services`, a
list of {name, listen_port, ports} mappings, or (one service, "default") as top-level
`listen_port` and `ports` (`ports` as a mapping or as [name, port] pairs); every service starts
off; pin_dir and flow_entries default to /sys/fs/bpf/zddd and 4096. With one service, states
are described as before ({active, intact, problems}); with several as {weights, intact,
problems}, and `flows` keys its counts "service/target". Reads one
JSON command per line on stdin and answers one JSON line on stdout ({"error": ..., "changed":
...} when the command raised; `changed` is ApplyError's). The backend runs in this process, so
it sees the namespace the way zddd would. Commands (key "op"); those marked [desired] take an
optional "desired" mapping of fields that differ from JSON_DESIRED for that command alone:

    probe                    the backend's probe; how long it took, s ("seconds")
    new {source_suffix}      a fresh backend instance (as a restarted zddd); a BPF backend's
                             program source gets `source_suffix` appended (an upgraded package)
    read [desired]           the backend's read: active, intact, problems (None: nothing there)
    switch {target} [service] [desired]  read, plan, apply, as zddd's core does (`service`:
                             the one to switch, default the first): the state before and
                             after, the number of layout steps and their names ("steps"),
                             whether there was a flip and how many stores it is ("flips"),
                             the apply time in µs
    reconcile {target}       repair as the core's reconciler does; whether it repaired
    reconciler {target, interval}  keep reconciling in a thread (until "stop")
    stop                     stop the reconciler thread
    leftover [desired] | remove [desired]
    flows                    flows_steered and flow_table
    count                    established connections per target (by "service/target" with
                             several): on its port, or on a listen port as the backend's
                             flow_attribution says
    listener {target} [service]  the backend's target_problem(service, target)
    weights {weights} [desired]  as switch, with service name -> main weight (null: off) for
                             every service named
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


def desired_of(fields: dict, weights: dict | None = None) -> Desired:
    """A Desired from JSON_DESIRED's fields, every service off but those in `weights`."""
    fields = {"pin_dir": "/sys/fs/bpf/zddd", "flow_entries": 4096, **fields}
    listed = fields.pop("services", None)
    one = {"name": "default", "listen_port": fields.pop("listen_port", None),
           "ports": fields.pop("ports", None)}
    if listed is None:
        listed = [one]
    weights = weights or {}
    fields["services"] = tuple(sorted(
        (ServiceLayout(s["name"], s["listen_port"], tuple(sorted(dict(s["ports"]).items())),
                       weights.get(s["name"])) for s in listed),
        key=lambda s: s.listen_port))
    if fields.get("interfaces") is not None:
        fields["interfaces"] = tuple(fields["interfaces"])
    return Desired(**fields)


def _step_name(step) -> str:
    return type(step).__name__.lower()


class Driver:
    def __init__(self, backend: str, desired: dict):
        self.backend_name = backend
        self.fields = desired
        self.desired = desired_of(desired)
        self.lock = threading.Lock()
        self.reconciler: threading.Thread | None = None
        self.stopping = threading.Event()
        self.repairs = 0
        self.op_new()

    def _desired(self, overrides: dict | None) -> Desired:
        return desired_of({**self.fields, **overrides}) if overrides else self.desired

    def _state(self, desired: Desired | None = None):
        return self.backend.read(desired or self.desired)

    def _describe(self, state) -> dict | None:
        if state is None:
            return None
        if len(self.desired.services) == 1:
            weight = state.weights.get(self.desired.services[0].name)
            return {"active": weight_target(weight), "intact": state.intact,
                    "problems": list(state.problems)}
        return {"weights": state.weights, "intact": state.intact,
                "problems": list(state.problems)}

    def _service(self, service: str | None) -> str:
        return service or self.desired.services[0].name

    def _wanted(self, desired: Desired, weights: dict) -> Desired:
        for name, weight in weights.items():
            desired = desired.with_weight(name, weight)
        return desired

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

    def op_switch(self, target: str | None, desired: dict | None = None,
                  service: str | None = None) -> dict:
        return self.op_weights({self._service(service): target_weight(target)}, desired)

    def op_weights(self, weights: dict, desired: dict | None = None) -> dict:
        wanted = self._desired(desired)
        current = self._state(wanted)
        # Services not named keep what the kernel holds (the core's saved state).
        held = dict(current.weights) if current is not None else {}
        plan = self.backend.plan(current, self._wanted(wanted, {**held, **weights}))
        started = time.perf_counter()
        self.backend.apply(plan)
        usec = (time.perf_counter() - started) * 1e6
        # sk_lookup's flip is a tuple of stores, one per service that changes.
        flips = (len(plan.flip) if isinstance(plan.flip, tuple)
                 else int(plan.flip is not None))
        return {"layout": len(plan.layout), "steps": [_step_name(s) for s in plan.layout],
                "flip": plan.flip is not None, "flips": flips, "usec": usec,
                "before": self._describe(current), "after": self._describe(self._state(wanted))}

    def op_reconcile(self, target: str | None) -> dict:
        current = self._state()
        name = self._service(None)
        if current is not None and current.intact and \
                current.weights.get(name) == target_weight(target):
            return {"repaired": False}
        held = dict(current.weights) if current is not None else {}
        plan = self.backend.plan(current, self._wanted(
            self.desired, {**held, name: target_weight(target)}))
        self.backend.apply(plan)
        self.repairs += 1
        if plan.layout:
            # As the core does: read back after a layout change, best effort (what health
            # sees of the backend comes from its reads).
            try:
                self._state()
            except Exception:  # the next round reads again
                pass
        return {"repaired": True, "before": self._describe(current)}

    def op_reconciler(self, target: str | None, interval: float = 0.25) -> dict:
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
        steered = self.backend.flows_steered()
        one = len(self.desired.services) == 1
        return {"steered": {target if one else f"{service}/{target}": n
                            for (service, target), n in steered.items()},
                "table": list(table) if table else None}

    def op_count(self) -> dict:
        desired = self.desired
        one = len(desired.services) == 1

        def key(service: str, target: str) -> str:
            return target if one else f"{service}/{target}"

        counts = {key(s.name, t): 0 for s in desired.services for t, _ in s.ports}
        targets, listens = desired.by_target_port(), desired.by_listen_port()
        attribute = self.backend.flow_attribution()
        steered = []
        for sock in dump_sockets(sorted(set(targets) | set(listens)), 1 << TCP_ESTABLISHED):
            if sock.local_port in targets:
                service, target = targets[sock.local_port]
                counts[key(service.name, target)] += 1
            elif sock.local_port in listens and attribute is not None:
                steered.append(as_flow(sock.family, sock.local_addr.ljust(16, b"\0"),
                                       sock.local_port, sock.remote_addr.ljust(16, b"\0"),
                                       sock.remote_port))
        for found in attribute(steered) if steered else ():
            if found is not None and key(*found) in counts:
                counts[key(*found)] += 1
        return {"counts": counts}

    def op_listener(self, target: str, service: str | None = None) -> dict:
        return {"problem": self.backend.target_problem(self._service(service), target)}

    def op_flips(self, n: int, service: str | None = None) -> dict:
        name = self._service(service)
        times = []
        for i in range(n):
            current = self._state()
            held = dict(current.weights) if current is not None else {}
            plan = self.backend.plan(current, self._wanted(
                self.desired, {**held, name: 100 if i % 2 else 0}))
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
