"""The chat workload inside one engine, no HTTP: one worker's share (4 clients), prefix cache and chunks on and off.

`python -m bench.chat_engine [--model models/small-gpt2] [--rounds 2]`: 4 closed-loop clients each send `rounds`
requests of the same 600-token system prompt and a turn of their own (32 new tokens), against an engine with the
prefix cache and chunked prefill (the defaults) and then one without, each after one warm-up request of the system
prompt (the steady state of a chat application); prints JSON with TTFT, inter-token latency (from the engine's
per-token times) and throughput of each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from typing import Any

from bench.chat import text_of
from bench.load import percentile


def clients(engine: Any, system: str, *, label: str, count: int, rounds: int) -> dict[str, Any]:
    """Run `count` clients of `rounds` requests each; return the figures."""
    from llmapi.engine import GenerationRequest

    ttfts: list[float] = []
    gaps: list[float] = []

    def client(c: int) -> None:
        for r in range(rounds):
            prompt = f"{system} Question {c}-{r}-{label}: which tyre?"
            result = engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=32, min_new_tokens=32))
            ttfts.append(result.timings["first_token_s"])
            gaps.extend(b - a for a, b in itertools.pairwise(result.token_times))

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - began
    return {
        "tokens_per_s": count * rounds * 32 / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "itl_p50_s": statistics.median(gaps),
        "itl_p99_s": percentile(gaps, 99),
    }


def main(argv: list[str] | None = None) -> int:
    """Both engines, one after the other, in this process (one torch thread)."""
    from llmapi.config import DEFAULT_PREFIX_CACHE_MB, Settings
    from llmapi.engine import GenerationRequest, create_engine

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/small-gpt2")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    system = text_of(600, args.model)
    chunk = Settings.prefill_chunk_tokens
    out = {}
    for label, cache_mb, chunk_tokens in (("on", DEFAULT_PREFIX_CACHE_MB, chunk), ("off", 0, 0)):
        engine = create_engine(args.model, torch_threads=1, prefix_cache_mb=cache_mb, prefill_chunk_tokens=chunk_tokens)
        engine.generate(GenerationRequest(prompt=f"{system} Warm-up", max_new_tokens=2))  # the steady state
        out[label] = clients(engine, system, label=label, count=4, rounds=args.rounds)
        engine.close()
    out["ttft_p50_off_over_on"] = out["off"]["ttft_p50_s"] / out["on"]["ttft_p50_s"]
    out["tokens_per_s_on_over_off"] = out["on"]["tokens_per_s"] / out["off"]["tokens_per_s"]
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
