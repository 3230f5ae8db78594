#!/usr/bin/env python3
"""Hold one canary step and watch it: ask Prometheus's HTTP API (/api/v1/query) the abort query
every INTERVAL seconds for SECONDS. Exit 0 when the step was held and the query never returned a
sample; exit 1 with a one-line message on stdout naming the host, the step and the value of the
first sample when it returned any (the role then aborts the canary); exit 2 when Prometheus could
not be asked ERRORS times in a row (an unwatched canary is not a passed one).

Without a query (an empty string) the step is only held (a timed canary).

    canary_watch.py PROMETHEUS_URL QUERY SECONDS INTERVAL HOST STEP [ERRORS]
"""
from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request


def ask(base: str, query: str, timeout: float) -> list[dict]:
    """The samples the instant query returns (a vector's or a scalar's)."""
    url = base.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        body = json.load(answer)
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType', '')}: {body.get('error', body)}")
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [{"metric": {}, "value": data["result"]}]
    if data["resultType"] == "matrix":
        return [{"metric": s["metric"], "value": s["values"][-1]} for s in data["result"]]
    return list(data["result"])


def describe(sample: dict) -> str:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.get("metric", {}).items()))
    return f"{sample['value'][1]}" + (f" {{{labels}}}" if labels else "")


def main(argv: list[str]) -> int:
    if len(argv) not in (7, 8):
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 64
    base, query, seconds, interval, host, step = argv[1:7]
    errors_allowed = int(argv[7]) if len(argv) == 8 else 3
    seconds_f, interval_f = float(seconds), max(0.2, float(interval))
    end = time.monotonic() + seconds_f
    errors = 0
    asked = 0
    while True:
        if query:
            try:
                samples = ask(base, query, timeout=max(1.0, interval_f))
                errors = 0
                asked += 1
            except (OSError, ValueError, KeyError, urllib.error.URLError) as e:
                errors += 1
                if errors >= errors_allowed:
                    print(f"{host}: canary step main={step}% not watched: Prometheus at {base} "
                          f"could not be asked {errors} times in a row ({e})")
                    return 2
                samples = []
            if samples:
                more = f" (and {len(samples) - 1} more samples)" if len(samples) > 1 else ""
                print(f"{host}: canary step main={step}% aborted: the abort query returned "
                      f"{describe(samples[0])}{more}; query: {query}")
                return 1
        left = end - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(interval_f if query else left, left))
    watched = f"the abort query asked {asked} times, no sample" if query else "no abort query"
    print(f"{host}: canary step main={step}% held {seconds_f:g} s ({watched})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
