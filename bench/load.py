"""A closed-loop HTTP load generator: N clients on keep-alive connections, each sending its next request on an answer.

Run as its own process (`python -m bench.load ...`, JSON on stdout) so that its CPU use is measured apart from
the server's and the driver's. Only requests that complete inside the measuring window count; the window opens
after a warm-up, so that a slow server's first, queued answers do not count as steady state.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Tally:
    """What the clients saw inside the window, shared by the client threads under a lock."""

    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, latency: float, tokens: int) -> None:
        """Count a successful answer."""
        with self.lock:
            self.latencies.append(latency)
            self.tokens += tokens

    def error(self, kind: str) -> None:
        """Count a failed request by kind (an HTTP status or an exception name)."""
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1


def client(url: str, body: bytes, headers: dict[str, str], window: tuple[float, float], tally: Tally) -> None:
    """Send requests one after another until the window closes; count those that complete inside it."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    start, end = window
    while time.monotonic() < end:
        sent = time.monotonic()
        try:
            conn.request("POST", parts.path, body=body, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            done = time.monotonic()
            if start <= done <= end:
                tally.error(type(exc).__name__)
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
            continue
        done = time.monotonic()
        if not start <= done <= end:
            continue
        if status == 200:
            tally.ok(done - sent, json.loads(payload)["usage"]["completion_tokens"])
        else:
            tally.error(str(status))
    conn.close()


def run(url: str, body: dict[str, Any], key: str, *, clients: int, warmup_s: float, seconds: float) -> dict[str, Any]:
    """Drive `clients` closed-loop clients; return throughput, latency percentiles, errors and own CPU use."""
    encoded = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "x-api-key": key, "Connection": "keep-alive"}
    tally = Tally()
    begin = time.monotonic()
    window = (begin + warmup_s, begin + warmup_s + seconds)
    threads = [threading.Thread(target=client, args=(url, encoded, headers, window, tally)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, window[0] - time.monotonic()))
    cpu_window = os.times()
    time.sleep(max(0.0, window[1] - time.monotonic()))
    cpu_end = os.times()
    for thread in threads:
        thread.join()
    own_cpu = (cpu_end.user + cpu_end.system) - (cpu_window.user + cpu_window.system)
    return summary(tally, seconds, clients, own_cpu)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by the nearest-rank method, or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary(tally: Tally, seconds: float, clients: int, own_cpu: float) -> dict[str, Any]:
    """Turn a tally into the figures the report prints."""
    lat = tally.latencies
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(lat),
        "errors": sum(tally.errors.values()),
        "error_kinds": tally.errors,
        "requests_per_s": len(lat) / seconds,
        "tokens_per_s": tally.tokens / seconds,
        "tokens_per_request": tally.tokens / len(lat) if lat else 0.0,
        "p50_s": percentile(lat, 50),
        "p90_s": percentile(lat, 90),
        "p99_s": percentile(lat, 99),
        "max_s": max(lat) if lat else None,
        "mean_s": statistics.fmean(lat) if lat else None,
        "loadgen_cpu_s": own_cpu,
        "loadgen_cores": own_cpu / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.load --url URL --key K --body JSON --clients N --seconds S."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--body", required=True, help="the JSON body every request sends")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    result = run(
        args.url, json.loads(args.body), args.key, clients=args.clients, warmup_s=args.warmup, seconds=args.seconds
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
