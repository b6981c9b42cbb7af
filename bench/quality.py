"""Each dtype and quantization against a base (fp32, or bf16) on one model: greedy next-token agreement, the largest
logit difference, and the perplexity of a fixed text.

`python -m bench.quality [--model models/small-gpt2] [--base float32] [--variants bfloat16,int8,int4]`: the base
continues each of a fixed set of prompts greedily by `--new-tokens`; every variant then predicts the next token at
every position of those same sequences (teacher-forced, one forward pass per prompt), and the table gives how often
its argmax agrees with the base's and the largest difference of any logit, absolute and as a share of the base's
logit range at that position, and each one's perplexity on PARAGRAPH. The model may be a GGUF file (the real one:
`--model models/SmolLM2-135M-Instruct.Q4_1.gguf --base bfloat16`). JSON last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

PROMPTS = [
    "Artificial Intelligence is",
    "The quick brown fox",
    "Once upon a time",
    "In the beginning",
    "The capital of France is",
    "def main():",
    "Hello, my name is",
    "The weather today",
    "Water boils at",
    "The history of the Roman Empire",
    "Machine learning models",
    "She opened the door and",
    "1, 2, 3, 4,",
    "The best way to learn",
    "According to the report,",
    "import numpy as np",
]


PARAGRAPH = (
    "The city of Paris is the capital and largest city of France. It is located on the river Seine, in the north"
    " of the country. Paris is known for its museums and monuments, such as the Louvre and the Eiffel Tower, and"
    " millions of tourists visit it every year. The history of the Roman Empire spans more than a thousand years,"
    " from the founding of the city to the fall of Constantinople."
)


def load_variants(path: str, names: list[str]) -> dict[str, Any]:
    """The model at `path` once per variant: a dtype (float32, bfloat16, float16) or a quantization (int8, int4)."""
    from llmapi.engine.loader import load
    from llmapi.engine.quantize import MODES

    cache = os.environ.get("GGUF_CACHE_DIR", "models/gguf-cache")
    return {
        name: load(path, quantization=name, gguf_cache_dir=cache)
        if name in MODES
        else load(path, dtype=name, gguf_cache_dir=cache)
        for name in names
    }


def reference(loaded: Any, new_tokens: int) -> list[Any]:
    """fp32's greedy continuation of every prompt (prompt ids and new ids, one tensor per prompt)."""
    import torch

    sequences = []
    for prompt in PROMPTS:
        ids = torch.tensor([loaded.tokenizer.encode(prompt)])
        out = loaded.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=loaded.pad_id,
        )
        sequences.append(out)
    return sequences


def compare(base: Any, other: Any, sequences: list[Any]) -> dict[str, float]:
    """Agreement of the argmax at every position, and the largest logit differences, against `base`."""
    agree = total = 0
    worst = worst_share = 0.0
    for ids in sequences:
        a = base.model(input_ids=ids).logits[0].float()
        b = other.model(input_ids=ids).logits[0].float()
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        diff = (a - b).abs().amax(-1)
        worst = max(worst, float(diff.max()))
        worst_share = max(worst_share, float((diff / (a.amax(-1) - a.amin(-1))).max()))
    return {"agreement": agree / total, "positions": total, "max_logit_diff": worst, "max_diff_of_range": worst_share}


def perplexity(loaded: Any, text: str = PARAGRAPH) -> float:
    """exp of the mean negative log-likelihood of `text`'s tokens after its first, teacher-forced."""
    import torch

    ids = torch.tensor([loaded.tokenizer.encode(text)])
    logits = loaded.model(input_ids=ids).logits[0, :-1].float()
    nll = -torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None]).mean()
    return math.exp(float(nll))


def main(argv: list[str] | None = None) -> int:
    """Load every variant, compare each with fp32, print the table."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--model", default="models/small-gpt2")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--base", default="float32", help="the variant the others are compared with")
    parser.add_argument("--variants", default="bfloat16,float16,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [args.base, *[name for name in args.variants.split(",") if name != args.base]]
    with torch.inference_mode():
        models = load_variants(args.model, names)
        base = models[args.base]
        sequences = reference(base, args.new_tokens)
        rows = {name: compare(base, models[name], sequences) for name in names[1:]}
        perplexities = {name: perplexity(model) for name, model in models.items()}
    print(f"{args.model}: {len(PROMPTS)} prompts x (prompt + {args.new_tokens} greedy tokens of {args.base})")
    print(f"{args.base:10} perplexity {perplexities[args.base]:.3f}")
    print(
        f"{'variant':10} {'argmax agrees':>14} {'positions':>10} {'max |logit diff|':>17} {'of logit range':>15}"
        f" {'perplexity':>11}"
    )
    for name, r in rows.items():
        print(
            f"{name:10} {r['agreement']:>14.1%} {r['positions']:>10} {r['max_logit_diff']:>17.4f}"
            f" {r['max_diff_of_range']:>15.2%} {perplexities[name]:>11.3f}"
        )
    print(json.dumps({"model": args.model, "base": args.base, "new_tokens": args.new_tokens, "rows": rows,
                      "perplexity": perplexities}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
