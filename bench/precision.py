"""bf16 against fp32 (and weight-only int8) by model size, in one process: where DTYPE=auto's threshold comes from.

`python -m bench.precision [--threads 1]` builds random GPT-2s from 100K to 124M parameters (no tokenizer: the
vocabulary is GPT-2's 50,257), times the forward-pass floor (prefill, then one forward pass per token with the KV
cache, greedy argmax over fp32 logits) at batch 1 and 8 in each dtype, interleaved so that every ratio compares
the same minutes, and prints new tokens/s and the ratio to fp32. JSON on the last line.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Any

# (name, n_embd, n_layer, n_head): the offline tiny and small models and two between them.
SHAPES = [
    ("tiny", 2, 2, 2),
    ("0.8M", 16, 2, 2),
    ("1.6M", 32, 2, 4),
    ("3M", 64, 2, 4),
    ("16M", 256, 4, 4),
    ("small", 768, 12, 12),
]


def floor(model: Any, batch: int, new_tokens: int) -> None:
    """Prefill a 4-token prompt and decode `new_tokens` greedily, fp32 logits as the engine samples them."""
    import torch

    ids = torch.randint(0, 50_000, (batch, 4), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    for _ in range(new_tokens - 1):
        next_ids = out.logits[:, -1, :].float().argmax(dim=-1, keepdim=True)
        out = model(input_ids=next_ids, cache=out.cache, use_cache=True)


def variants(n_embd: int, n_layer: int, n_head: int, *, int8: bool, gelu: bool = False) -> dict[str, Any]:
    """The same random model in fp32, bf16 and (if asked) weight-only int8; with `gelu`, each also with the fused GELU.

    transformers builds GPT-2 with its Python NewGELUActivation; the service's loader swaps in torch's fused one
    (loader.fuse_tanh_gelu), so the unfused variants are what a plain transformers loop runs.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmapi.engine.quantize import quantize_weights

    torch.manual_seed(0)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, vocab_size=50_257)
    fp32 = GPT2LMHeadModel(config).eval()
    models = {"float32": fp32, "bfloat16": copy.deepcopy(fp32).to(torch.bfloat16)}
    if int8:
        models["int8"] = copy.deepcopy(fp32)
        quantize_weights(models["int8"], "int8")
        models["int8"].to(torch.bfloat16)
    if gelu:
        from llmapi.engine.loader import fuse_tanh_gelu

        for name in list(models):
            models[f"{name}+gelu"] = copy.deepcopy(models[name])
            fuse_tanh_gelu(models[f"{name}+gelu"])
    return models


def measure(models: dict[str, Any], batch: int, new_tokens: int, rounds: int) -> dict[str, float]:
    """Median new tokens/s of each model, the models taking turns `rounds` times after one warm-up each."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            floor(model, batch, 4)
        for _ in range(rounds):
            for name, model in models.items():
                started = time.perf_counter()
                floor(model, batch, new_tokens)
                times[name].append(time.perf_counter() - started)
    return {name: batch * new_tokens / statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    """Time every shape in every dtype and print the table."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    parser.add_argument("--int8", action="store_true", help="also weight-only int8 (QUANTIZATION=int8)")
    parser.add_argument("--gelu", action="store_true", help="also each with torch's fused GELU (as the loader does)")
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    wanted = set(args.shapes.split(","))
    results: dict[str, Any] = {"threads": args.threads, "new_tokens": args.new_tokens, "rows": []}
    print(f"new tokens/s, T = {args.new_tokens}, {args.threads} torch thread(s); x = against fp32 in the same run")
    for name, n_embd, n_layer, n_head in SHAPES:
        if name not in wanted:
            continue
        models = variants(n_embd, n_layer, n_head, int8=args.int8, gelu=args.gelu)
        parameters = sum(p.numel() for p in models["float32"].parameters())
        for batch in (int(b) for b in args.batches.split(",")):
            rates = measure(models, batch, args.new_tokens, args.rounds)
            cells = "  ".join(f"{k} {v:8.1f} (x{v / rates['float32']:.2f})" for k, v in rates.items())
            print(f"{name:6} {parameters:>12,} params  batch {batch}:  {cells}", flush=True)
            results["rows"].append({"shape": name, "parameters": parameters, "batch": batch, **rates})
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
