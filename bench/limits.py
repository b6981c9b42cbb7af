"""The limits in one process, no HTTP: transformers' generate, the bare forward-pass floor, and our engine."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

PROMPT = "Artificial Intelligence is"


def timed(func: Callable[[], Any], *, repeats: int, budget_s: float) -> float:
    """Run `func` up to `repeats` times (at least twice, within about `budget_s`) and return the median seconds."""
    func()  # warm-up: first calls allocate and pick kernels
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - started < budget_s):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batch_inputs(tokenizer: Any, batch: int) -> tuple[Any, Any]:
    """The benchmark prompt repeated `batch` times: ids and attention mask (no padding needed)."""
    encoded = tokenizer([PROMPT] * batch, return_tensors="pt")
    return encoded.input_ids, encoded.attention_mask


def numpy_argmax(logits: Any) -> Any:
    """Greedy choice with numpy's SIMD argmax (torch's CPU argmax over 50,257 logits costs several times more)."""
    import torch

    return torch.from_numpy(logits.numpy().argmax(axis=-1))


def torch_argmax(logits: Any) -> Any:
    """Greedy choice with torch.argmax."""
    return logits.argmax(dim=-1)


def floor_loop(model: Any, input_ids: Any, new_tokens: int, argmax: Callable[[Any], Any] = numpy_argmax) -> None:
    """The forward-pass floor: prefill, then one bare forward pass per token with the KV cache, greedy argmax."""
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    for _ in range(new_tokens - 1):
        next_ids = argmax(out.logits[:, -1, :]).unsqueeze(-1)
        out = model(input_ids=next_ids, cache=out.cache, use_cache=True)
    argmax(out.logits[:, -1, :])


def generate_call(model: Any, input_ids: Any, mask: Any, new_tokens: int, pad_id: int, *, sampled: bool) -> None:
    """One `model.generate` producing exactly `new_tokens` per row, greedy or sampled at temperature 0.8."""
    options: dict[str, Any] = {"temperature": 0.8, "top_k": 0, "top_p": 1.0} if sampled else {}
    model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_id,
        do_sample=sampled,
        **options,
    )


def engine_rate(engine: Any, clients: int, new_tokens: int, *, sampled: bool, seconds: float) -> dict[str, float]:
    """Closed-loop load on our engine from `clients` threads for about `seconds`: tokens/s and latency."""
    from llmapi.engine import GenerationRequest

    extra = {"do_sample": True, "temperature": 0.8} if sampled else {}
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **extra)
    engine.generate(request)  # warm-up
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client() -> None:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            result = engine.generate(request)
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += result.completion_tokens

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": tokens[0] / elapsed, "p50_s": statistics.median(latencies), "requests": len(latencies)}


def model_rates(
    model: Any, ids: Any, mask: Any, pad_id: int, new_tokens: int, repeats: int, budget: float
) -> dict[str, float]:
    """The floor (both argmax kinds) and generate (greedy, sampled) on one batch, as new tokens/s."""
    batch = ids.shape[0]
    calls: dict[str, Callable[[], Any]] = {
        "floor": lambda: floor_loop(model, ids, new_tokens),
        "floor_torch_argmax": lambda: floor_loop(model, ids, new_tokens, torch_argmax),
        "generate_greedy": lambda: generate_call(model, ids, mask, new_tokens, pad_id, sampled=False),
        "generate_sampled": lambda: generate_call(model, ids, mask, new_tokens, pad_id, sampled=True),
    }
    row: dict[str, float] = {}
    for name, call in calls.items():
        seconds = timed(call, repeats=repeats, budget_s=budget)
        row[name] = batch * new_tokens / seconds
        row[name + "_s"] = seconds
    return row


def measure_model(path: str, *, threads: int, batches: tuple[int, ...], new_tokens: int, quick: bool) -> dict:
    """Every in-process limit of the model at `path` with `threads` torch threads, as new tokens/s."""
    import torch

    from llmapi.engine import create_engine

    torch.set_num_threads(threads)
    engine = create_engine(path, torch_threads=threads, max_batch_size=max(batches))
    model, tokenizer, pad_id = engine.loaded.model, engine.loaded.tokenizer, engine.loaded.pad_id
    repeats, budget = (3, 2.0) if quick else (7, 6.0)
    figures: dict[str, Any] = {"threads": threads, "load_s": engine.loaded.load_seconds}
    with torch.inference_mode():
        for batch in batches:
            ids, mask = batch_inputs(tokenizer, batch)
            figures[f"batch{batch}"] = model_rates(model, ids, mask, pad_id, new_tokens, repeats, budget)
    for batch in batches:
        row = figures[f"batch{batch}"]
        for name, sampled, tries in (
            ("engine_greedy", False, None),
            ("engine_sampled", True, None),
            # The benchmark models' logits are nearly flat, so their rows take the sampler's rejection path; a
            # trained model's peaked rows take the inverse CDF. Forcing it shows what those would cost here.
            ("engine_sampled_inverse_cdf", True, 0),
        ):
            with rejection_tries(tries):
                rate = engine_rate(engine, batch, new_tokens, sampled=sampled, seconds=2.0 if quick else 6.0)
            row[name] = rate["tokens_per_s"]
            row[name + "_p50_s"] = rate["p50_s"]
    return figures


@contextmanager
def rejection_tries(tries: int | None) -> Iterator[None]:
    """Run the block with the sampler's REJECTION_TRIES set to `tries` (None: unchanged)."""
    from llmapi.engine import sampling

    saved = sampling.REJECTION_TRIES
    if tries is not None:
        sampling.REJECTION_TRIES = tries
    try:
        yield
    finally:
        sampling.REJECTION_TRIES = saved


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m bench.limits --model DIR --threads N [--quick]; JSON on stdout."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    figures = measure_model(
        args.model, threads=args.threads, batches=(1, 8), new_tokens=args.new_tokens, quick=args.quick
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
