"""Prompt-lookup speculation on a copy-heavy workload, in one process, no HTTP: the real model rewriting paragraphs.

`python -m bench.speculation [--model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--clients 1,8,32] [--new-tokens 64]
[--mode ngram] [--tokens 3] [--max-rows 1] [--ngram-max 3] [--ngram-min 2]`: each of N clients sends one chat request
at once ("rewrite this paragraph", a paragraph of its own; a single client sends four, one after the other), greedy,
exactly T new tokens
(min_new_tokens = T, as the server benchmark asks),
first with SPECULATION=off and then with the mode asked for, on the same engine; prints new tokens/s of each, the
speed-up, the draft tokens proposed and accepted, and whether every text was the same. About two minutes on 2 cores.

A single client's text must be identical. With several, rows share a lane and their arithmetic depends on which rows
are in it at each step (which may differ between the two runs), so a text may differ by rounding: counted, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

PARAGRAPHS = [
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its keeper climbed "
    "the narrow stairs to light the lamp, and every morning he wrote the weather in a small blue book.",
    "Our team moved the weekly meeting from Monday to Wednesday, because too many people were travelling at the start "
    "of the week. The agenda stays the same: project updates first, then open questions.",
    "Bread needs only flour, water, salt and yeast, but the time you give it matters more than the ingredients. A slow "
    "rise in a cool kitchen gives a deeper flavour and a more open crumb.",
    "The river flooded twice this spring, and the town council has agreed to build a higher wall along the east bank. "
    "Work will start in June and should be finished before the autumn rains.",
]
ASKS = ["Rewrite this paragraph in simpler words", "Summarise this paragraph", "Rewrite this paragraph, keeping it"]


def prompts(engine: Any, count: int) -> list[str]:
    """`count` chat prompts, each an ask and a paragraph (distinct pairs first, so that the prefix cache gets few)."""
    out = []
    for i in range(count):
        paragraph = PARAGRAPHS[i % len(PARAGRAPHS)]
        ask = ASKS[(i // len(PARAGRAPHS)) % len(ASKS)]
        tag = f" (request {i})" if i >= len(PARAGRAPHS) * len(ASKS) else ""
        message = {"role": "user", "content": f"{ask}{tag}:\n\n{paragraph}"}
        out.append(engine.render_chat([message]))
    return out


def burst(engine: Any, texts: list[str], new_tokens: int, clients: int) -> tuple[float, list[str]]:
    """Send the prompts from `clients` threads at once, each its share one after the other; return the wall time and
    the texts in order."""
    from llmapi.engine import GenerationRequest

    results: list[str] = [""] * len(texts)

    def client(c: int) -> None:
        for i in range(c, len(texts), clients):
            request = GenerationRequest(prompt=texts[i], max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            results[i] = engine.generate(request).text

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - began, results


def measure(engine: Any, clients: int, new_tokens: int, mode: str) -> dict[str, Any]:
    """One burst without speculation and one with `mode`, on the same prompts; their figures side by side."""
    texts = prompts(engine, max(clients, len(PARAGRAPHS)))  # a single client: one paragraph after the other
    figures: dict[str, Any] = {"clients": clients}
    outputs = {}
    for label in ("off", mode):
        engine.speculator.mode = label
        proposed, accepted = engine.speculator.proposed, engine.speculator.accepted
        wall, outputs[label] = burst(engine, texts, new_tokens, clients)
        figures[label] = {
            "tokens_per_s": round(len(texts) * new_tokens / wall, 1),
            "proposed": engine.speculator.proposed - proposed,
            "accepted": engine.speculator.accepted - accepted,
        }
    figures["speedup"] = round(figures[mode]["tokens_per_s"] / figures["off"]["tokens_per_s"], 2)
    figures["same_text"] = sum(a == b for a, b in zip(outputs["off"], outputs[mode]))
    figures["requests"] = len(texts)
    return figures


def table(rows: list[dict[str, Any]], mode: str) -> str:
    """The figures as a Markdown table."""
    lines = [
        f"| clients | off tokens/s | {mode} tokens/s | speed-up | proposed | accepted | same text |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spec = row[mode]
        lines.append(
            f"| {row['clients']} | {row['off']['tokens_per_s']} | {spec['tokens_per_s']} | {row['speedup']}x"
            f" | {spec['proposed']} | {spec['accepted']} | {row['same_text']} of {row['requests']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Load the model once, warm it, and measure each client count."""
    from llmapi.engine import create_engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--gguf-cache", default="models/gguf-cache")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--mode", default="ngram", choices=("ngram", "auto"))
    parser.add_argument("--tokens", type=int, default=3, help="SPECULATIVE_TOKENS")
    parser.add_argument("--max-rows", type=int, default=1, help="SPECULATION_MAX_ROWS")
    parser.add_argument("--ngram-max", type=int, default=3, help="SPECULATION_NGRAM_MAX")
    parser.add_argument("--ngram-min", type=int, default=2, help="SPECULATION_NGRAM_MIN")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core)")
    parser.add_argument("--quantization", default="auto", help="QUANTIZATION (auto: int4 for the Q4_1 file)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.clients.split(",")]
    engine = create_engine(
        args.model,
        torch_threads=args.threads or os.cpu_count() or 1,
        max_batch_size=max(counts),
        gguf_cache_dir=args.gguf_cache,
        quantization=args.quantization,
        speculation=args.mode,
        speculative_tokens=args.tokens,
        speculation_max_rows=args.max_rows,
        speculation_ngram_max=args.ngram_max,
        speculation_ngram_min=args.ngram_min,
    )
    try:
        # Warm-up at the largest count too: the first lane of many rows grows the allocator's pools, which would
        # otherwise be charged to whichever mode runs first.
        for n in sorted({1, max(counts)}):
            burst(engine, prompts(engine, n), 8, n)
        rows = []
        for n in counts:
            print(f"speculation: {n} clients ...", file=sys.stderr)
            rows.append(measure(engine, n, args.new_tokens, args.mode))
    finally:
        engine.close()
    print(json.dumps(rows, indent=1) if args.json else table(rows, args.mode))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
