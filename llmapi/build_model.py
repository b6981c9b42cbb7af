"""Build a small offline GPT-2 model directory: random seeded weights, a locally trained BPE tokenizer."""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Shapes of the public checkpoints these stand in for: sshleifer/tiny-gpt2 and gpt2 (124M).
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 2, "n_layer": 2, "n_head": 2, "n_positions": 1024},
    "small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
}
VOCAB_SIZE = 50257  # GPT-2's vocabulary size, so sampling costs what it costs on the real models
EOS = "<|endoftext|>"

# Real English so that the README's prompts tokenize into sensible pieces.
SEED_TEXT = """\
Artificial Intelligence is the study of machines that learn, reason and act. A language model
predicts the next word of a text from the words before it. Once upon a time there was a small
server that answered questions over HTTP. The quick brown fox jumps over the lazy dog.
Hello, world! How are you today? I am fine, thank you. The weather is nice and the sun is shining.
Python is a programming language. Flask is a web framework. Tokens, prompts and completions.
"""
ONSETS = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl gr br".split()
VOWELS = ["a", "e", "i", "o", "u", "y", "ai", "ea", "ou", "io"]
CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "st"]


@dataclass(frozen=True)
class BuildResult:
    """What was written: the directory and the model's shape."""

    path: Path
    size: str
    parameters: int


def corpus(seed: int, *, words: int = 400_000, lexicon: int = 120_000) -> Iterator[str]:
    """Yield deterministic pseudo-English lines whose Zipf-distributed words fill the BPE vocabulary."""
    rng = random.Random(seed)
    made = {
        "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(rng.randint(1, 3)))
        for _ in range(lexicon)
    }
    vocab = sorted(made)
    rng.shuffle(vocab)
    cumulative, total = [], 0.0
    for rank in range(len(vocab)):
        total += 1.0 / (rank + 1) ** 0.8
        cumulative.append(total)
    for _ in range(20):
        yield SEED_TEXT
    for _ in range(words // 20):
        line = rng.choices(vocab, cum_weights=cumulative, k=20)
        if rng.random() < 0.3:
            line[0] = line[0].capitalize()
        yield " ".join(line) + rng.choice([".", ",", "!", "?", ";", " 42.", " 2026."]) + "\n"


def train_tokenizer(seed: int):
    """Train a byte-level BPE tokenizer like GPT-2's, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        model_max_length=SHAPES["tiny"]["n_positions"],
        clean_up_tokenization_spaces=False,
    )


def build(out: Path, *, size: str = "tiny", seed: int = 0, force: bool = False) -> BuildResult:
    """Write a Hugging Face model directory loadable with AutoModelForCausalLM and AutoTokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out)
    if (out / "config.json").exists() and not force:
        return BuildResult(out, size, -1)
    tokenizer = train_tokenizer(seed)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPES[size],
    )
    model = GPT2LMHeadModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return BuildResult(out, size, sum(p.numel() for p in model.parameters()))


def main(argv: list[str] | None = None) -> int:
    """Command line: llmapi-build-model --size tiny --out models/tiny-gpt2."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", type=Path, help="directory to write (default: models/<size>-gpt2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory has a model")
    args = parser.parse_args(argv)
    out = args.out or Path("models") / f"{args.size}-gpt2"
    result = build(out, size=args.size, seed=args.seed, force=args.force)
    if result.parameters < 0:
        print(f"{out}: already built (use --force to rebuild)", file=sys.stderr)
    else:
        print(f"{out}: built {size_line(result)}", file=sys.stderr)
    return 0


def size_line(result: BuildResult) -> str:
    """Describe a build in a few words."""
    return f"{result.size} GPT-2, {result.parameters:,} parameters"


if __name__ == "__main__":
    raise SystemExit(main())
