#!/usr/bin/env python3
"""How long zddctl takes, wall clock, from exec to exit: `zddctl --version` and `zddctl status`
against a real zddd (a lab namespace and private bus), next to bare Python's own start-up.

Two ways of running it are measured: the checkout's `.venv/bin/zddctl` (whose editable install
adds an import finder to every start), and the way the Debian package runs it (Debian's
/usr/bin/python3 running the console script's two lines, the package on its path).

    bench/zddctl_startup.py [--runs 20] [--package-root DIR] [--json]

--package-root: where the packaged runs import `zddd` from (default: this checkout), e.g. an
older tree from `git archive c40027d zddd | tar -x -C /tmp/before` to compare before and after
(the venv rows always run this checkout).
Other work on the machine shows in the mean and the max; the median is the figure to compare,
and the CPU time (user + system, mean) is the part of it that load does not inflate.
Runs as root after `make setup`. Exit status: 0 goal met (`zddctl status` median <= 50 ms as
packaged), 1 goal missed, 2 could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
DEBIAN_PYTHON = "/usr/bin/python3"
# What /usr/bin/zddctl of the package runs (a pybuild console script).
PACKAGED = [DEBIAN_PYTHON, "-c", "import sys; from zddd.cli import main; sys.exit(main())"]

GOAL_STATUS_MS = 50.0


def wall_ms(argv: list[str], runs: int, env: dict | None = None) -> dict:
    """Min, median, mean and max wall time, and mean CPU time, of `runs` runs of argv (after
    one warm-up run)."""
    times, cpu = [], []
    for i in range(runs + 1):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        # cwd "/": `python -c` puts the working directory before PYTHONPATH on sys.path.
        r = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                           cwd="/")
        elapsed = (time.perf_counter() - started) * 1000
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.decode()}")
        if i:
            times.append(elapsed)
            cpu.append((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                       * 1000)
    return {"min": min(times), "median": statistics.median(times),
            "mean": statistics.mean(times), "max": max(times), "cpu": statistics.mean(cpu)}


def measure(bus_address: str, runs: int, package_root: Path = REPO) -> dict:
    packaged_env = {**os.environ, "PYTHONPATH": str(package_root)}
    bus = ["--bus", bus_address]
    cases = {
        "python -c pass (Debian)": ([DEBIAN_PYTHON, "-c", "pass"], None),
        "python -c pass (venv)": ([str(VENV_BIN / "python"), "-c", "pass"], None),
        "zddctl --version (packaged)": ([*PACKAGED, "--version"], packaged_env),
        "zddctl status (packaged)": ([*PACKAGED, *bus, "status"], packaged_env),
        "zddctl --version (venv)": ([str(VENV_BIN / "zddctl"), "--version"], None),
        "zddctl status (venv)": ([str(VENV_BIN / "zddctl"), *bus, "status"], None),
    }
    return {name: wall_ms(argv, runs, env) for name, (argv, env) in cases.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--package-root", type=Path, default=REPO)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    try:
        from zdddlab import AppLab

        with AppLab(prefix="bench") as lab:
            lab.start_zddd()
            results = measure(lab.bus.address, args.runs, args.package_root)
    except Exception as e:
        print(f"zddctl_startup: cannot run: {e}", file=sys.stderr)
        return 2
    status = results["zddctl status (packaged)"]["median"]
    met = status <= GOAL_STATUS_MS
    if args.json:
        print(json.dumps({"runs": args.runs, "ms": results, "goal_status_ms": GOAL_STATUS_MS,
                          "goal_met": met}, indent=2))
    else:
        print(f"over {args.runs} runs (ms)       wall: min  median    mean     max     cpu")
        for name, r in results.items():
            print(f"  {name:<32} " + "  ".join(f"{r[k]:6.1f}" for k in r))
        print(f"goal: zddctl status (packaged) median <= {GOAL_STATUS_MS:g} ms: "
              f"{'met' if met else 'MISSED'} ({status:.1f} ms)")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
