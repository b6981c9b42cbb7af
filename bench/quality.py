"""Each dtype (and int8) against fp32 on one model: greedy next-token agreement and the largest logit difference.

`python -m bench.quality [--model models/small-gpt2]`: fp32 continues each of a fixed set of prompts greedily by
`--new-tokens`; every variant then predicts the next token at every position of those same fp32 sequences
(teacher-forced, one forward pass per prompt), and the table gives how often its argmax agrees with fp32's and the
largest difference of any logit, absolute and as a share of fp32's logit range at that position. JSON last.
"""

from __future__ import annotations

import argparse
import json
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


def load_variants(path: str, names: list[str]) -> dict[str, Any]:
    """The model at `path` once per variant: float32, bfloat16, float16, int8."""
    from llmapi.engine.loader import load

    return {
        name: load(path, dtype="float32", quantization="int8") if name == "int8" else load(path, dtype=name)
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


def main(argv: list[str] | None = None) -> int:
    """Load every variant, compare each with fp32, print the table."""
    import torch

    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--model", default="models/small-gpt2")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--variants", default="bfloat16,float16,int8")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["float32", *args.variants.split(",")]
    with torch.inference_mode():
        models = load_variants(args.model, names)
        sequences = reference(models["float32"], args.new_tokens)
        rows = {name: compare(models["float32"], models[name], sequences) for name in names[1:]}
    print(f"{args.model}: {len(PROMPTS)} prompts x (prompt + {args.new_tokens} fp32 greedy tokens), against fp32")
    print(f"{'variant':10} {'argmax agrees':>14} {'positions':>10} {'max |logit diff|':>17} {'of logit range':>15}")
    for name, r in rows.items():
        print(
            f"{name:10} {r['agreement']:>14.1%} {r['positions']:>10} {r['max_logit_diff']:>17.4f}"
            f" {r['max_diff_of_range']:>15.2%}"
        )
    print(json.dumps({"model": args.model, "new_tokens": args.new_tokens, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
