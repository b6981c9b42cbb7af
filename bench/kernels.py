"""Weight formats on this CPU, in one process: one layer's kernel call, and a plain decode loop over the real model.

`python -m bench.kernels [--threads 2] [--steps | --profile]`: microseconds of one call of fp32, bf16, int4 and
int8 layers of SmolLM2-135M's shapes at 1 and 32 rows (best of 5 rounds of 20 calls); with `--steps`, the median
decode step of the real model (models/SmolLM2-135M-Instruct.Q4_1.gguf, GGUF_CACHE_DIR or models/gguf-cache) in each
format at 1, 8 and 32 rows, in the main thread, through the engine's DecodeStep: its lean pass (engine/lean.py), then
transformers' forward; with `--profile`, only the torch profiler's view of the int4 one-row step as the engine runs
it (the lean pass): operators per step, their time, the heaviest
(docs/performance.md, 4-bit and 8-bit weights). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): attention, k/v, MLP, head
REAL_MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"


def best_call_us(layer: Any, x: Any) -> float:
    """The best of 5 rounds of 20 calls, in microseconds per call."""
    import torch

    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            layer(x)
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(20):
                layer(x)
            best = min(best, (time.perf_counter() - started) / 20)
    return best * 1e6


def kernels() -> None:
    """Print one call's time of each format for each shape at 1 and 32 rows."""
    import torch

    from llmapi.engine.quantize import Int4Linear, Int8Linear

    print("layer (out x in)  rows  " + "  ".join(f"{name:>9}" for name in ("fp32", "bf16", "int4", "int8")) + "  (us)")
    for out, inp in SHAPES:
        fp32 = torch.nn.Linear(inp, out, bias=False)
        layers = {
            "fp32": fp32,
            "bf16": torch.nn.Linear(inp, out, bias=False).to(torch.bfloat16),
            "int4": Int4Linear(fp32.weight, None, group=32, dtype=torch.bfloat16),
            "int8": Int8Linear(fp32.weight, None, dtype=torch.bfloat16),
        }
        for rows in (1, 32):
            times = []
            for name, layer in layers.items():
                x = torch.randn(rows, inp, dtype=torch.float32 if name == "fp32" else torch.bfloat16)
                times.append(best_call_us(layer, x))
            print(f"{out:>6} x {inp:<6}  {rows:>4}  " + "  ".join(f"{t:>9.1f}" for t in times))


PROMPT = "The history of the Roman Empire is long and"


def load_real(quantization: str, dtype: str = "auto") -> Any:
    """The real model in one format, from the GGUF cache (GGUF_CACHE_DIR or models/gguf-cache)."""
    from llmapi.engine.loader import load

    cache_dir = os.environ.get("GGUF_CACHE_DIR", "models/gguf-cache")
    return load(REAL_MODEL, quantization=quantization, dtype=dtype, gguf_cache_dir=cache_dir)


def decoder(loaded: Any, rows: int, lean: bool = True) -> Any:
    """Prefill PROMPT in `rows` rows; return a function that makes one greedy decode step of them through the engine's
    DecodeStep: its lean pass (engine/lean.py) where the model has one and `lean`, else transformers' forward."""
    from types import SimpleNamespace

    import torch
    from transformers import DynamicCache

    from llmapi.engine.lane import Lane
    from llmapi.engine.step import DecodeStep

    step = DecodeStep(loaded.model)
    if not lean:
        step.lean = None
    with torch.inference_mode():
        prompt = torch.tensor([loaded.tokenizer.encode(PROMPT)] * rows)
        out = loaded.model(input_ids=prompt, cache=DynamicCache(), use_cache=True)
    positions = torch.full((rows, 1), prompt.shape[1] - 1)
    lane = Lane([SimpleNamespace(solo=False)] * rows, out.cache, torch.ones_like(prompt), positions, False)
    lane.next_ids = out.logits[:, -1].argmax(-1, keepdim=True)

    def one() -> None:
        with torch.inference_mode():
            lane.next_ids = step(lane).argmax(-1, keepdim=True)

    return one


def median_s(step: Any, count: int, skip: int) -> float:
    """The median seconds of `count` calls of `step`, the first `skip` left out."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    kept = sorted(times[skip:])
    return kept[len(kept) // 2]


def steps(threads: int) -> None:
    """Print the real model's median decode step in each format at 1, 8 and 32 rows, lean and through transformers."""
    import torch

    for quantization, dtype in (("none", "float32"), ("none", "bfloat16"), ("int4", "auto"), ("int8", "auto")):
        loaded = load_real(quantization, dtype)
        torch.set_num_threads(threads)
        for lean in (True, False):
            figures = []
            for rows in (1, 8, 32):
                median = median_s(decoder(loaded, rows, lean), 18, 3)
                figures.append(f"{rows} rows {median * 1000:.1f} ms ({rows / median:.1f} tok/s)")
            name = quantization if quantization != "none" else dtype
            print(f"{name:>8} {'lean' if lean else 'transformers':>12}: " + " | ".join(figures))


def profile(threads: int, steps_profiled: int = 10) -> None:
    """Print where the int4 model's one-row decode step goes: its operators' own time against the step's wall time."""
    import torch
    from torch.profiler import ProfilerActivity

    loaded = load_real("int4")
    torch.set_num_threads(threads)
    step = decoder(loaded, 1)
    plain = median_s(step, 15, 5)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps_profiled):
            step()
    events = prof.key_averages()
    calls = sum(e.count for e in events) / steps_profiled
    own = sum(e.self_cpu_time_total for e in events) / steps_profiled / 1000
    print(
        f"int4, one row: a step {plain * 1000:.1f} ms unprofiled; {calls:.0f} operators a step, {own:.1f} ms of their"
    )
    print("own time under the profiler (which adds its own per call); the heaviest, per step:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        each = e.self_cpu_time_total / max(e.count, 1)
        per_step = e.self_cpu_time_total / steps_profiled / 1000
        print(f"  {e.key:<40} {e.count / steps_profiled:>6.0f} calls  {per_step:>6.2f} ms  ({each:.1f} us each)")


def main(argv: list[str] | None = None) -> int:
    """Kernels, then (with --steps) the real model's steps."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", action="store_true", help="also the real model's decode step in each format")
    parser.add_argument("--profile", action="store_true", help="only the profile of the int4 one-row step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(args.threads)
        return 0
    kernels()
    if args.steps:
        steps(args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
