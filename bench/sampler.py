"""What choosing the next tokens costs per decoding step, by path, in one process: `python -m bench.sampler`.

Prints microseconds per step (one `choose` call on [batch, vocab] float32 logits, one thread) for greedy rows, for
sampled rows whose rejection tries succeed, and for sampled rows that take the inverse CDF, on two kinds of logits:
`flat` (a random-weight model's: nearly equal) and `peaked` (a trained model's shape: a few tokens far above the
rest). The forward pass of the tiny model at batch 8 takes about 700 us here, the small model's about 80 ms.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

VOCAB = 50257  # GPT-2's


def logits(kind: str, batch: int) -> Any:
    """[batch, VOCAB] float32 logits of the given kind, seeded."""
    import torch

    generator = torch.Generator().manual_seed(0)
    if kind == "flat":
        return torch.randn(batch, VOCAB, generator=generator) * 0.01
    # Logits like GPT-2's: a spread of about 3 around -80, and a few tokens 10-20 above the crowd.
    scores = torch.randn(batch, VOCAB, generator=generator) * 3.0 - 80.0
    top = torch.randint(VOCAB, (batch, 20), generator=generator)
    scores.scatter_(1, top, -60.0 + 10.0 * torch.rand(batch, 20, generator=generator))
    return scores


def per_step_us(call: Callable[[], Any], seconds: float) -> float:
    """Microseconds per call, after a warm-up, over about `seconds`."""
    for _ in range(20):
        call()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        call()
        count += 1
    return (time.perf_counter() - started) / count * 1e6


def measure(seconds: float) -> dict[str, float]:
    """Microseconds per step for each path, logits kind and batch size."""
    import torch

    from llmapi.engine import tuning

    torch.set_num_threads(1)
    tuning.keep_freed_memory()  # as the engine does
    figures: dict[str, float] = {}
    for kind in ("flat", "peaked"):
        for batch in (1, 8):
            source = logits(kind, batch)
            for path, greedy, rejection in PATHS:
                figures[f"{kind}/{batch}/{path}"] = step_us(source, greedy=greedy, rejection=rejection, seconds=seconds)
    return figures


PATHS = (("greedy", True, True), ("sampled", False, True), ("sampled, inverse CDF only", False, False))


def step_us(source: Any, *, greedy: bool, rejection: bool, seconds: float) -> float:
    """Microseconds of one `choose` on a copy of `source` (temperature 0.8, EOS ruled out as under min_new_tokens)."""
    import torch

    from bench.limits import rejection_tries
    from llmapi.engine.sampling import RowControls, choose

    work = source.clone()
    rows = [
        RowControls(greedy, 0.8, 0, 1.0, 1.0, True, set(), None if greedy else torch.Generator())
        for _ in range(len(source))
    ]
    with rejection_tries(None if rejection else 0):
        # The copy stands for the fresh logits every step brings; it is timed apart and taken off.
        total = per_step_us(lambda: choose(work.copy_(source), rows, [VOCAB - 1]), seconds)
    return total - per_step_us(lambda: work.copy_(source), seconds / 4)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.sampler [--seconds S]; a table, then JSON on the last line."""
    parser = argparse.ArgumentParser(prog="python -m bench.sampler", description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="per figure")
    args = parser.parse_args(argv)
    figures = measure(args.seconds)
    print(f"{'logits':8} {'batch':>5}  {'greedy':>8}  {'sampled':>8}  {'sampled, inverse CDF only':>26}  (us per step)")
    for kind in ("flat", "peaked"):
        for batch in (1, 8):
            row = [figures[f"{kind}/{batch}/{path}"] for path in ("greedy", "sampled", "sampled, inverse CDF only")]
            print(f"{kind:8} {batch:5}  {row[0]:8.0f}  {row[1]:8.0f}  {row[2]:26.0f}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
