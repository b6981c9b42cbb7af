"""The mixed workload inside one engine, no HTTP: short streams while long prompts arrive, and where a slow step goes.

`python -m bench.mixed_engine [--model models/small-gpt2] [--seconds 60] [--threads 2] [--chunk 64] [--lanes 2,1]`:
6 clients stream 64 new tokens from short prompts while 2 clients send 900-token prompts that share nothing (8 new
tokens), against one engine with lanes kept apart (the default) and then one whose long rows merge into the streams'
lane (`MAX_SHARED_LANES=1`, as before); prints the streams' inter-token latency (p50, p90, p99, as the client sees
pieces), their time to first token (p50, p99), and the slowest engine steps with the time spent in each part of
them. JSON on the last line. For the real model pass its converted folder (models/gguf-cache/...-float32).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.chat import text_of
from bench.load import percentile

# The engine's parts, timed apart: _prefill holds the next two, and both it and _step hold postprocess.run.
PARTS = ("_prefill", "_store_prefixes", "_place", "_step", "postprocess.run")


def instrument(engine: Any) -> list[tuple[float, dict[str, float]]]:
    """Time the engine's parts per loop iteration; return the list it fills with (end, seconds per part)."""
    steps: list[tuple[float, dict[str, float]]] = []
    current: dict[str, float] = {}

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - started

        return run

    for name in PARTS:
        *path, attribute = name.split(".")
        holder = functools.reduce(getattr, path, engine)
        setattr(holder, attribute, timed(name, getattr(holder, attribute)))
    publish = engine._publish

    def mark() -> None:
        steps.append((time.perf_counter(), dict(current)))
        current.clear()
        publish()

    engine._publish = mark
    return steps


def run(
    model: str, *, threads: int, chunk: int, seconds: float, lanes: int, quantization: str = "none"
) -> dict[str, Any]:
    """One engine under the mixed workload for `seconds`; the streams' gaps and the slowest steps."""
    from llmapi.engine import GenerationRequest, create_engine
    from llmapi.engine import lane as lane_policy
    from llmapi.engine.types import Piece

    lane_policy.MAX_SHARED_LANES = lanes
    engine = create_engine(
        model,
        torch_threads=threads,
        max_batch_size=32,
        prefix_cache_mb=512,
        prefill_chunk_tokens=chunk,
        dtype="auto",
        quantization=quantization,
    )
    long = text_of(900, model)
    steps = instrument(engine)
    stop = time.monotonic() + seconds
    measure_from = time.monotonic() + min(5.0, seconds / 4)  # after a warm-up
    gaps: list[float] = []
    firsts: list[float] = []

    def stream(i: int) -> None:
        for n in range(10**6):
            if time.monotonic() > stop:
                return
            request = GenerationRequest(prompt=f"Stream {i} {n}: once upon a time", max_new_tokens=64, stream=True)
            last, sent = None, time.perf_counter()
            for piece in engine.submit(request).pieces():
                now = time.perf_counter()
                if isinstance(piece, Piece):
                    if time.monotonic() > measure_from:
                        if last is None:
                            firsts.append(now - sent)
                        else:
                            gaps.append(now - last)
                    last = now

    def prompts(i: int) -> None:
        for n in range(10**6):
            if time.monotonic() > stop:
                return
            engine.submit(GenerationRequest(prompt=f"Request {i} {n}. {long}", max_new_tokens=8)).result()

    workers = [threading.Thread(target=stream, args=(i,)) for i in range(6)]
    workers += [threading.Thread(target=prompts, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    engine.close()
    durations = [(b[0] - a[0], b[1]) for a, b in itertools.pairwise(steps)]
    slowest = sorted(durations, key=lambda step: -step[0])[:8]
    gaps.sort()
    firsts.sort()
    return {
        "shared_lanes": lanes,
        "gaps": len(gaps),
        "itl_p50_ms": 1000 * percentile(gaps, 50),
        "itl_p90_ms": 1000 * percentile(gaps, 90),
        "itl_p99_ms": 1000 * percentile(gaps, 99),
        "ttft_p50_ms": 1000 * percentile(firsts, 50),
        "ttft_p99_ms": 1000 * percentile(firsts, 99),
        "slowest_steps": [{"ms": 1000 * d, **{k: round(1000 * v) for k, v in parts.items()}} for d, parts in slowest],
    }


def main(argv: list[str] | None = None) -> int:
    """Lanes apart, then one lane, in one run; print both."""
    parser = argparse.ArgumentParser(prog="python -m bench.mixed_engine", description=__doc__)
    parser.add_argument("--model", default="models/small-gpt2")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--lanes", default="2,1", help="MAX_SHARED_LANES of each run (2: the default)")
    parser.add_argument("--quantization", default="none", help="QUANTIZATION (int4: the real model's default)")
    args = parser.parse_args(argv)
    results = []
    for lanes in [int(n) for n in args.lanes.split(",")]:
        figures = run(
            args.model,
            threads=args.threads,
            chunk=args.chunk,
            seconds=args.seconds,
            lanes=lanes,
            quantization=args.quantization,
        )
        results.append(figures)
        print(
            f"shared lanes at most {lanes}: streams' ITL p50 {figures['itl_p50_ms']:.0f} ms, p90"
            f" {figures['itl_p90_ms']:.0f}, p99 {figures['itl_p99_ms']:.0f} (p99 / p50"
            f" {figures['itl_p99_ms'] / figures['itl_p50_ms']:.2f}, {figures['gaps']} gaps); TTFT p50"
            f" {figures['ttft_p50_ms']:.0f} ms, p99 {figures['ttft_p99_ms']:.0f}; slowest steps:"
        )
        for step in figures["slowest_steps"]:
            print("   ", ", ".join(f"{k} {v:.0f}" for k, v in step.items()), "ms")
    print(json.dumps({"threads": args.threads, "chunk": args.chunk, "runs": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
