"""Constrained decoding on CPU: what each library costs per step to mask the tiny model's 50,257-token vocabulary.

For xgrammar, llguidance and outlines-core (those installed): the time to compile the tokenizer and one JSON
schema, then, for batch 1 and 8, the time per decode step to compute every row's allowed tokens and to apply
them to float32 logits, on a walk that picks a random allowed token each step until the JSON is complete.

    .venv/bin/python -m bench.grammar [--model models/tiny-gpt2] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import numpy as np
import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999}, "ok": {"type": "boolean"}},
            "required": ["id", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}


def unpack(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """A [rows, vocab] boolean array from [rows, ceil(vocab / 32)] int32 bit masks (bit i of word w: token 32w+i)."""
    return np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)


class LLGuidance:
    """llguidance: a Rust Earley parser over a token trie; masks computed lazily per step."""

    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: str) -> Any:
        return self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})

    def matcher(self, grammar: Any) -> Any:
        return self.ll.LLMatcher(self.tok, grammar, log_level=0)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bitmask[i].ctypes.data, bitmask.shape[1] * 4)

    def accept(self, matcher: Any, token: int) -> bool:
        matcher.consume_token(token)
        return matcher.is_stopped() or (matcher.is_accepting() and not self._more(matcher))

    @staticmethod
    def _more(matcher: Any) -> bool:
        return True  # keep going until stopped (the walk ends on EOS-only masks)


class XGrammar:
    """xgrammar: a pushdown automaton with a precomputed per-state token cache."""

    name = "xgrammar"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.vocab = vocab

    def compile(self, schema: str) -> Any:
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, grammar: Any) -> Any:
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        tensor = torch.from_numpy(bitmask)
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(tensor, i)

    def accept(self, matcher: Any, token: int) -> bool:
        matcher.accept_token(token)
        return matcher.is_terminated()


class OutlinesCore:
    """outlines-core: the schema as a regex, compiled ahead into a token-level automaton (an index)."""

    name = "outlines-core"

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        import outlines_core

        self.oc = outlines_core
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.vocabulary = None

    def compile(self, schema: str) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(schema, whitespace_pattern="")
        if self.vocabulary is None:
            self.vocabulary = (
                self.oc.Vocabulary.from_pretrained_tokenizer(self.tokenizer)
                if hasattr(self.oc.Vocabulary, "from_pretrained_tokenizer")
                else self._vocabulary()
            )
        return self.oc.Index(regex, self.vocabulary)

    def _vocabulary(self) -> Any:
        eos = self.tokenizer.eos_token_id
        tokens: dict[str, list[int]] = {}
        for token, i in self.tokenizer.get_vocab().items():
            if i != eos:
                tokens.setdefault(token, []).append(i)
        return self.oc.Vocabulary(eos, tokens)

    def matcher(self, grammar: Any) -> Any:
        return self.oc.Guide(grammar)

    def fill(self, matchers: list[Any], bitmask: np.ndarray) -> None:
        bitmask[:] = 0
        for i, guide in enumerate(matchers):
            allowed = np.asarray(guide.get_tokens(), dtype=np.int64)
            np.bitwise_or.at(bitmask[i], allowed // 32, (1 << (allowed % 32)).astype(np.int64).astype(np.int32))

    def accept(self, matcher: Any, token: int) -> bool:
        matcher.advance(token)
        return matcher.is_finished()


def walk(
    lib: Any, grammar: Any, batch: int, steps: int, eos: int, rng: random.Random
) -> tuple[list[float], list[float]]:
    """Per-step fill and apply times (us) of `batch` rows walking the grammar with random allowed tokens."""
    matchers = [lib.matcher(grammar) for _ in range(batch)]
    bitmask = np.zeros((batch, (lib.vocab + 31) // 32), dtype=np.int32)
    logits = torch.randn(batch, lib.vocab)
    fills, applies = [], []
    live = list(range(batch))
    for _ in range(steps):
        if not live:
            break
        started = time.perf_counter()
        lib.fill([matchers[i] for i in live], bitmask)
        filled = time.perf_counter()
        rows = logits[: len(live)].clone()
        allowed = torch.from_numpy(unpack(bitmask[: len(live)], lib.vocab))
        rows.masked_fill_(~allowed, float("-inf"))
        applied = time.perf_counter()
        fills.append((filled - started) * 1e6)
        applies.append((applied - filled) * 1e6)
        choices = rows + torch.rand_like(rows) * 0  # random logits already: the argmax is a random allowed token
        picked = choices.argmax(dim=-1).tolist()
        still = []
        for slot, i in enumerate(live):
            token = picked[slot]
            if token == eos or lib.accept(matchers[i], token):
                continue
            still.append(i)
        live = still
        logits = torch.randn(batch, lib.vocab)
    return fills, applies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/tiny-gpt2")
    parser.add_argument("--steps", type=int, default=60)
    options = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    vocab = AutoConfig.from_pretrained(options.model).vocab_size
    schema = json.dumps(SCHEMA)
    print(f"vocabulary {vocab} tokens, one thread; per step: mean (median) microseconds over the walk")
    for kind in (LLGuidance, XGrammar, OutlinesCore):
        try:
            started = time.perf_counter()
            lib = kind(tokenizer, vocab)
            tokenizer_s = time.perf_counter() - started
            started = time.perf_counter()
            grammar = lib.compile(schema)
            schema_s = time.perf_counter() - started
        except Exception as exc:  # not installed, or cannot take this schema
            print(f"{kind.name:14s} unavailable: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        print(f"{lib.name:14s} tokenizer {tokenizer_s * 1e3:8.1f} ms, schema {schema_s * 1e3:8.1f} ms")
        for batch in (1, 8):
            fills, applies = walk(lib, grammar, batch, options.steps, tokenizer.eos_token_id)
            print(
                f"{'':14s} batch {batch}: mask {statistics.mean(fills):8.1f} ({statistics.median(fills):7.1f}) us,"
                f" apply {statistics.mean(applies):7.1f} ({statistics.median(applies):6.1f}) us, {len(fills)} steps"
            )


if __name__ == "__main__":
    main()
