"""A closed-loop load of several client groups at once, timing streamed tokens: TTFT and inter-token latency.

Run as its own process (`python -m bench.stream_load ...`, JSON on stdout), like bench.load. Each group has a path,
a body, a client count and whether it streams; a body's "{n}" is replaced by a number no other request of the run
gets, so that requests can differ (a distinct user turn) where the body says. A streamed answer is read as
Server-Sent Events: the time of its first piece of text is its time to first token, the gaps between pieces its
inter-token latencies. Only requests that complete inside the window count.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from bench.load import percentile


@dataclass
class Group:
    """Clients that send the same kind of request, and what they saw inside the window."""

    name: str
    path: str
    body: bytes
    clients: int
    stream: bool
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)


LOCK = threading.Lock()
NUMBERS = itertools.count()


def read_stream(response: http.client.HTTPResponse) -> tuple[list[float], int]:
    """Read an SSE answer to its end: the times text arrived, and the completion tokens its usage reported."""
    times: list[float] = []
    tokens = 0
    while line := response.readline():
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        event = json.loads(data)
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        choices = event.get("choices") or []
        if choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content")):
            times.append(time.monotonic())
    return times, tokens or len(times)


def client(url: str, group: Group, key: str, window: tuple[float, float]) -> None:
    """Send the group's requests one after another until the window closes."""
    parts = urlsplit(url)
    headers = {"Content-Type": "application/json", "x-api-key": key, "Connection": "keep-alive"}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start, end = window
    while time.monotonic() < end:
        with LOCK:
            body = group.body.replace(b"{n}", str(next(NUMBERS)).encode())
        sent = time.monotonic()
        try:
            conn.request("POST", group.path, body=body, headers=headers)
            response = conn.getresponse()
            if group.stream and response.status == 200:
                times, tokens = read_stream(response)
            else:
                payload = response.read()
                times, tokens = [], json.loads(payload)["usage"]["completion_tokens"] if response.status == 200 else 0
        except (OSError, http.client.HTTPException, ValueError) as exc:
            conn.close()
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
            if start <= time.monotonic() <= end:
                with LOCK:
                    group.errors[type(exc).__name__] = group.errors.get(type(exc).__name__, 0) + 1
            continue
        done = time.monotonic()
        if not start <= done <= end:
            continue
        with LOCK:
            if response.status != 200:
                group.errors[str(response.status)] = group.errors.get(str(response.status), 0) + 1
                continue
            group.latencies.append(done - sent)
            group.tokens += tokens
            if times:
                group.ttfts.append(times[0] - sent)
                group.gaps += [later - earlier for earlier, later in itertools.pairwise(times)]
    conn.close()


def summary(group: Group, seconds: float) -> dict[str, Any]:
    """The figures of one group."""
    figures: dict[str, Any] = {
        "clients": group.clients,
        "requests": len(group.latencies),
        "errors": sum(group.errors.values()),
        "error_kinds": group.errors,
        "tokens_per_s": group.tokens / seconds,
        "p50_s": percentile(group.latencies, 50),
        "p99_s": percentile(group.latencies, 99),
    }
    for name, values in (("ttft", group.ttfts), ("itl", group.gaps)):
        for q in (50, 90, 99):
            figures[f"{name}_p{q}_s"] = percentile(values, q)
        figures[f"{name}_max_s"] = max(values) if values else None
        figures[f"{name}_count"] = len(values)
    return figures


def run(url: str, groups: list[Group], key: str, *, warmup_s: float, seconds: float) -> dict[str, Any]:
    """Drive every group's clients at once; return each group's figures."""
    begin = time.monotonic()
    window = (begin + warmup_s, begin + warmup_s + seconds)
    threads = [
        threading.Thread(target=client, args=(url, group, key, window))
        for group in groups
        for _ in range(group.clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {group.name: summary(group, seconds) for group in groups}


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.stream_load --url URL --key K --groups JSON --warmup W --seconds S."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="the server's base URL")
    parser.add_argument("--key", required=True)
    parser.add_argument("--groups", required=True, help='JSON list of {"name", "path", "body", "clients", "stream"}')
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    groups = [
        Group(g["name"], g["path"], json.dumps(g["body"]).encode(), g["clients"], g["stream"])
        for g in json.loads(args.groups)
    ]
    print(json.dumps(run(args.url, groups, args.key, warmup_s=args.warmup, seconds=args.seconds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
