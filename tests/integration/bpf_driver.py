"""Drives a tc/xdp backend from inside a network namespace, for tests/integration/test_bpf_*.

    python bpf_driver.py            (in the namespace; JSON requests on stdin, one per line)

Each request is {"op": ..., "desired": {...Desired fields...}}; each answer one JSON line,
{"ok": ...} or {"error": "...", "changed": bool}. "new" starts a fresh backend instance (as a
restarted zddd would), so adoption can be tested in one process or across processes.
"""

import json
import sys
import time

from zddd.backends import ApplyError, BackendUnavailable, Desired, backend_class
from zddd.backends.bpf import source_path


def desired_of(d: dict) -> Desired:
    d = dict(d)
    d["ports"] = tuple(tuple(p) for p in d["ports"])
    if d.get("interfaces") is not None:
        d["interfaces"] = tuple(d["interfaces"])
    return Desired(**d)


def summary(state):
    if state is None:
        return None
    return {"active": state.active, "intact": state.intact, "problems": list(state.problems)}


def main():
    backend = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        desired = desired_of(request["desired"]) if "desired" in request else None
        try:
            if op == "new":
                backend = backend_class(request["backend"])()
                if request.get("source_suffix"):
                    # Stands in for an upgraded package: the same maps, other program code.
                    backend._source = source_path().read_bytes() + request[
                        "source_suffix"].encode()
                answer = None
            elif op == "probe":
                started = time.monotonic()
                backend.probe()
                answer = time.monotonic() - started
            elif op == "read":
                answer = summary(backend.read(desired))
            elif op == "sync":
                # What the core does: read, and plan + apply when not intact or not steering
                # where desired.
                before = backend.read(desired)
                plan = backend.plan(before, desired)
                backend.apply(plan)
                answer = {"before": summary(before), "layout": [s[0] for s in plan.layout],
                          "flip": plan.flip is not None,
                          "after": summary(backend.read(desired))}
            elif op == "leftover":
                answer = backend.leftover(desired)
            elif op == "remove":
                backend.remove(desired)
                answer = None
            elif op == "counters":
                answer = {"steered": backend.flows_steered(), "table": backend.flow_table()}
            elif op == "exit":
                break
            else:
                raise ValueError(op)
            print(json.dumps({"ok": answer}), flush=True)
        except (ApplyError, BackendUnavailable) as e:
            print(json.dumps({"error": str(e), "changed": getattr(e, "changed", False)}),
                  flush=True)


if __name__ == "__main__":
    main()
