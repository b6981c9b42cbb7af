"""What log-probabilities and grammars cost per decode step, and what requests without them pay.

For each model and batch size (1 and 8 rows decoding together, greedy), the milliseconds per decode step of
rows that are plain, that ask for logprobs with 5 alternatives, that follow bench.grammar's JSON schema, and of
a batch where half the rows ask for both. A step's time is (total - first token) / (tokens - 1) of each row,
the median over repeats. `plain` also runs on any other checkout (PYTHONPATH=DIR, `--only plain`), so that
the plain rows of this code and of the code before it can be compared on the same machine.

    .venv/bin/python -m bench.features [--models tiny,small] [--tokens 48] [--repeats 5]
    .venv/bin/python -m bench.features --parts    # each feature's own work per step, apart from the model
    .venv/bin/python -m bench.features --hooks    # what a plain lane pays for the hooks
    PYTHONPATH=/tmp/base .venv/bin/python -m bench.features --only plain
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"tiny": ROOT / "models" / "tiny-gpt2", "small": ROOT / "models" / "small-gpt2"}
PROMPT = "Artificial Intelligence is"
KINDS = ("plain", "logprobs", "grammar", "mixed")


def requests_of(kind: str, batch: int, tokens: int) -> list[Any]:
    """The batch's engine requests for one kind."""
    from llmapi.engine import GenerationRequest

    base = {"prompt": PROMPT, "max_new_tokens": tokens, "min_new_tokens": tokens}
    if kind == "plain":
        return [GenerationRequest(**base) for _ in range(batch)]
    from bench.grammar import SCHEMA
    from llmapi.engine.types import Grammar

    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    both = {"logprobs": 5, "grammar": grammar}
    extra = {"logprobs": {"logprobs": 5}, "grammar": {"grammar": grammar}, "mixed": both}[kind]
    rows = [GenerationRequest(**base, **extra) for _ in range(batch)]
    if kind == "mixed":
        rows = [row if i % 2 else GenerationRequest(**base) for i, row in enumerate(rows)]
    return rows


def step_ms(engine: Any, requests: list[Any]) -> float:
    """Mean ms per decode step over the rows of one batch, submitted together."""
    results: list[Any] = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    steps = [
        (r.timings["total_s"] - r.timings["first_token_s"]) / (r.completion_tokens - 1) * 1e3
        for r in results
        if r.completion_tokens > 1
    ]
    return statistics.mean(steps)


def hook_us(batch: int = 8, repeats: int = 20_000) -> float:
    """Microseconds per step that a lane of plain rows spends in the hooks this feature added to postprocess."""
    import timeit
    from types import SimpleNamespace

    from llmapi.engine import logprobs

    rows = [SimpleNamespace(request=request, grammar=None) for request in requests_of("plain", batch, 8)]

    def hooks() -> None:
        logprobs.wanted(rows)
        any(row.grammar is not None for row in rows)
        for row in rows:
            row.request.max_new_tokens == 0  # noqa: B015 - the score-only check each row pays
            row.request.logprobs is not None  # noqa: B015 - whether its piece carries logprobs

    return timeit.timeit(hooks, number=repeats) / repeats * 1e6


def parts_us(model: Path, batch: int, repeats: int = 50) -> dict[str, float]:
    """Microseconds per step of the work each feature adds for `batch` rows, apart from the forward pass.

    The cost depends on the vocabulary and the batch, not on the model's size: logprobs (copy the rows'
    logits, logsumexp, top-5), a grammar's mask at the start of the JSON and inside a string (where most
    tokens stay allowed), with bench.grammar's schema.
    """
    import time

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from bench.grammar import SCHEMA
    from llmapi.engine import logprobs
    from llmapi.engine.grammar import Grammars
    from llmapi.engine.types import Grammar

    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    texts = logprobs.TokenTexts(tokenizer, tokenizer.decode)
    logits = torch.randn(batch, vocab)
    index = list(range(batch))

    def timed(action: Any) -> float:
        action()
        started = time.perf_counter()
        for _ in range(repeats):
            action()
        return (time.perf_counter() - started) / repeats * 1e6

    chosen = logits.argmax(dim=-1).tolist()
    out = {"logprobs": timed(lambda: logprobs.entries(logits[index], chosen, [5] * batch, texts))}
    grammars = Grammars(tokenizer, vocab)
    grammar = Grammar("json_schema", json.dumps(SCHEMA))
    fresh = [grammars.matcher(grammar) for _ in range(batch)]
    out["mask, JSON start"] = timed(lambda: grammars.mask(logits.clone(), fresh))
    inside = [grammars.matcher(grammar) for _ in range(batch)]
    for matcher in inside:
        for token in tokenizer.encode('{"name": "ab'):
            matcher.advance(token)
    out["mask, in a string"] = timed(lambda: grammars.mask(logits.clone(), inside))
    out["clone (in both)"] = timed(lambda: logits.clone())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=KINDS)
    parser.add_argument("--hooks", action="store_true", help="only time the hooks a plain lane of 8 rows pays")
    parser.add_argument("--parts", action="store_true", help="only time each feature's own work per step")
    options = parser.parse_args()
    if options.hooks:
        print(f"hooks of a plain lane of 8 rows: {hook_us():.2f} us per step")
        return
    if options.parts:
        print("us per step, apart from the forward pass (vocabulary 50,257; one thread)")
        for batch in (1, 8):
            parts = parts_us(MODELS["tiny"], batch)
            print(f"batch {batch}: " + ", ".join(f"{name} {value:.0f}" for name, value in parts.items()))
        return
    from llmapi.engine import create_engine

    kinds = [options.only] if options.only else list(KINDS)
    print(f"ms per decode step, greedy, {options.tokens} new tokens, median of {options.repeats}; one thread")
    print("| model | batch | " + " | ".join(kinds) + " |")
    print("|---|---:|" + "---:|" * len(kinds))
    for name in options.models.split(","):
        engine = create_engine(str(MODELS[name]), torch_threads=1, max_batch_size=8, batch_wait_ms=20)
        for batch in (1, 8):
            cells = []
            for kind in kinds:
                step_ms(engine, requests_of(kind, batch, options.tokens))  # warm: compile the grammar, fill caches
                times = [step_ms(engine, requests_of(kind, batch, options.tokens)) for _ in range(options.repeats)]
                cells.append(f"{statistics.median(times):.2f}")
            print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)
        engine.close()


if __name__ == "__main__":
    main()
