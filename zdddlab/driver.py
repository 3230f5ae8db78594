"""Drive one zddd backend directly, without the daemon, from inside a network namespace.

    ip netns exec NS .venv/bin/python -m zdddlab.driver BACKEND JSON_DESIRED

Reads one JSON command per line on stdin and answers one JSON line on stdout ({"error": ...}
when the command raised). The backend runs in this process, so it sees the namespace the way
zddd would. Commands (key "op"):

    probe | read | leftover | remove | flows | new (a fresh backend instance)
    switch {target}          read, plan, apply, as zddd's core does; the plan's size and time
    reconcile {target}       repair as the core's reconciler does; whether it repaired
    reconciler {target, interval}  keep reconciling in a thread (until "stop")
    stop                     stop the reconciler thread
    count                    established connections per target (ConnectionCounter)
    listener {target}        the backend's listener_problem(target), if it has one
    flips {n}                n switches main/backup; the apply time of each, µs

Tests (tests/integration/test_sk_lookup.py) and the bench use it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from zddd.backends import Desired, backend_class
from zddd.connections import ConnectionCounter

from .base import VENV_BIN


class DriverClient:
    """The other end: starts this script with `popen` (e.g. a NetNS's, so it runs in that
    namespace) and sends it commands; `client(op, **args)` returns the answer or raises
    RuntimeError with the backend's error."""

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
            raise RuntimeError(f"{op}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


class Driver:
    def __init__(self, backend: str, desired: dict):
        self.backend_name = backend
        self.desired = Desired(desired["listen_port"], tuple(sorted(
            (name, port) for name, port in desired["ports"].items())), None,
            pin_dir=desired.get("pin_dir", "/sys/fs/bpf/zddd"),
            flow_entries=desired.get("flow_entries", 4096))
        self.lock = threading.Lock()
        self.reconciler: threading.Thread | None = None
        self.stopping = threading.Event()
        self.repairs = 0
        self.new()

    def new(self) -> dict:
        self.backend = backend_class(self.backend_name)()
        return {}

    def _state(self):
        return self.backend.read(self.desired)

    @staticmethod
    def _describe(state) -> dict | None:
        if state is None:
            return None
        return {"active": state.active, "intact": state.intact, "problems": list(state.problems)}

    def op_probe(self) -> dict:
        self.backend.probe()
        return {}

    def op_new(self) -> dict:
        return self.new()

    def op_read(self) -> dict:
        return {"state": self._describe(self._state())}

    def op_switch(self, target: str | None) -> dict:
        current = self._state()
        plan = self.backend.plan(current, self.desired.steering(target))
        started = time.perf_counter()
        self.backend.apply(plan)
        usec = (time.perf_counter() - started) * 1e6
        return {"layout": len(plan.layout), "flip": plan.flip is not None, "usec": usec,
                "before": self._describe(current)}

    def op_reconcile(self, target: str | None) -> dict:
        current = self._state()
        if current is not None and current.intact and current.active == target:
            return {"repaired": False}
        plan = self.backend.plan(current, self.desired.steering(target))
        self.backend.apply(plan)
        self.repairs += 1
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

    def op_leftover(self) -> dict:
        return {"leftover": self.backend.leftover(self.desired)}

    def op_remove(self) -> dict:
        self.backend.remove(self.desired)
        return {}

    def op_flows(self) -> dict:
        table = self.backend.flow_table()
        return {"steered": self.backend.flows_steered(), "table": list(table) if table else None}

    def op_count(self) -> dict:
        attribute = getattr(self.backend, "attribute_flows", None)
        counter = ConnectionCounter(listen_port=self.desired.listen_port, attribute=attribute)
        return {"counts": counter.count(dict(self.desired.ports))}

    def op_listener(self, target: str) -> dict:
        problem = getattr(self.backend, "listener_problem", None)
        return {"problem": problem(target) if problem else None}

    def op_flips(self, n: int) -> dict:
        times = []
        for i in range(n):
            plan = self.backend.plan(self._state(),
                                     self.desired.steering("main" if i % 2 else "backup"))
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
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


class _nolock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
