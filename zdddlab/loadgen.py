"""`python -m zdddlab.loadgen --url URL --out FILE [--workers N] [--interval S]`: the lab's load
generator, started by Lab.loadgen inside a client namespace.

Each worker sends one request per new connection (Connection: close), so every request is a new
flow that zddd steers, and appends one JSON line per finished request to FILE: {"t": start
(CLOCK_MONOTONIC, shared by all namespaces), "d": seconds, "ok": bool, "body": answer or error}.
SIGTERM/SIGINT stop it after the requests in flight; it stops by itself after --duration.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time


def _loadgen_worker(url: str, interval: float, stopping: threading.Event, out, lock) -> None:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    while not stopping.is_set():
        started = time.monotonic()
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=5)
        try:
            conn.request("GET", parts.path or "/", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read().decode(errors="replace").strip()
            ok = resp.status == 200
            if not ok:
                body = f"HTTP {resp.status}: {body[:60]}"
        except (OSError, http.client.HTTPException) as e:
            ok, body = False, f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        line = json.dumps({"t": started, "d": round(time.monotonic() - started, 6), "ok": ok,
                           "body": body})
        with lock:
            out.write(line + "\n")
            out.flush()
        pause = interval - (time.monotonic() - started)
        if pause > 0:
            stopping.wait(pause)


def loadgen_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m zdddlab.loadgen")
    p.add_argument("--url", required=True)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--interval", type=float, default=0.01,
                   help="seconds between request starts per worker")
    p.add_argument("--out", required=True)
    p.add_argument("--duration", type=float, default=600,
                   help="stop by itself after this long (bounded load)")
    args = p.parse_args(argv)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stopping.set())
    signal.signal(signal.SIGINT, lambda *a: stopping.set())
    lock = threading.Lock()
    with open(args.out, "w") as out:
        threads = [threading.Thread(target=_loadgen_worker,
                                    args=(args.url, args.interval, stopping, out, lock))
                   for _ in range(args.workers)]
        for t in threads:
            t.start()
        stopping.wait(args.duration)
        stopping.set()
        for t in threads:
            t.join()
    return 0


if __name__ == "__main__":
    sys.exit(loadgen_main(sys.argv[1:]))
