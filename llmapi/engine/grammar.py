"""Structured output: a grammar (a JSON schema, JSON mode, or EBNF) enforced by a token mask per row, with xgrammar.

xgrammar compiles the tokenizer once per engine (about 0.8 s for GPT-2's 50,257 tokens, on the first request that
asks for a grammar) and each grammar once, cached by its source (LRU). A row's matcher then gives its allowed
tokens as a bit mask per step, about 4-9 us for a JSON schema on this CPU against llguidance's 24-75 and
outlines-core's 9-95 (`python -m bench.grammar`; docs/performance.md). Rows without a grammar pay nothing, and rows
with and without one share a batch: only the masked rows' logits are touched. JSON is compact
(`any_whitespace=False`: one space after `,` and `:`), so a weak model cannot pad with whitespace until its limit.
xgrammar 0.2.9's JSON strings admit raw control characters (bytes below 0x20), which JSON forbids and parsers
refuse; compact JSON has no place for them at all, so JSON rows also mask every token that holds one.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import xgrammar

from llmapi.engine.types import Grammar, InvalidRequest

XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\]\s+\S+:\d+:\s*")

CACHE_SIZE = 64  # compiled grammars kept, least recently used dropped first


class Matcher:
    """One row's place in its grammar: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, compiled: Any, *, json: bool) -> None:
        # A JSON value ends unambiguously at its closing brace: the row ends there, without spending a step on EOS.
        self._matcher = xgrammar.GrammarMatcher(compiled, terminate_without_stop_token=json)
        self.json = json

    def advance(self, token: int) -> bool:
        """Take the row's chosen token; return whether the grammar is now complete."""
        self._matcher.accept_token(token)
        return self._matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, index: int) -> None:
        """Write the allowed next tokens into row `index` of `bitmask` (int32 words, bit i of word w: token 32w+i)."""
        self._matcher.fill_next_token_bitmask(bitmask, index)


class Grammars:
    """The tokenizer compiled for xgrammar, a cache of compiled grammars, and the per-step masking of a batch."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        # The bit mask of the tokens without a control byte: JSON rows' masks are and-ed with it.
        self._no_control = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
        for token, raw in enumerate(info.decoded_vocab[:vocab_size]):
            if any(byte < 0x20 for byte in raw):
                self._no_control[token // 32] &= ~(1 << (token % 32)) if token % 32 != 31 else 0x7FFFFFFF
        self._cache: OrderedDict[Grammar, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compiled(self, grammar: Grammar) -> Any:
        """The compiled form of `grammar`, from the cache when it was compiled before."""
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return self._cache[grammar]
            compiled = self._compile(grammar)
            self._cache[grammar] = compiled
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            return compiled

    def _compile(self, grammar: Grammar) -> Any:
        """Compile one grammar; a schema or grammar xgrammar refuses is the client's error, naming its field."""
        try:
            if grammar.kind == "json_object":
                return self._compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            if grammar.kind == "json_schema":
                return self._compiler.compile_json_schema(grammar.source, any_whitespace=False, strict_mode=True)
            if grammar.kind == "structural_tag":  # tool calls: tags around JSON arguments (http/openai/tools.py)
                return self._compiler.compile_structural_tag(grammar.source)
            return self._compiler.compile_grammar(grammar.source)
        except (RuntimeError, ValueError, TypeError) as exc:
            what = "grammar" if grammar.kind == "ebnf" else "JSON schema"
            detail = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            # xgrammar's C++ messages start "[hh:mm:ss] /path/of/its/source.cc:line: ": not the client's business.
            detail = XGRAMMAR_PREFIX.sub("", detail)
            raise InvalidRequest(f"The {what} cannot be used: {detail}", param=grammar.param or grammar.kind) from exc

    def matcher(self, grammar: Grammar) -> Matcher:
        """A fresh matcher for one row."""
        return Matcher(self.compiled(grammar), json=grammar.kind in ("json_object", "json_schema"))

    def mask(self, logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> None:
        """Set to -inf, in place, the logits of the tokens each row's grammar forbids (rows with None: untouched)."""
        index = [i for i, matcher in enumerate(matchers) if matcher is not None]
        bitmask = torch.zeros((len(index), (self.vocab_size + 31) // 32), dtype=torch.int32)
        for slot, i in enumerate(index):
            matchers[i].fill(bitmask, slot)  # type: ignore[union-attr]
            if matchers[i].json:  # type: ignore[union-attr]
                bitmask[slot] &= self._no_control
        width = min(logits.shape[-1], self.vocab_size)
        forbidden = unpack_forbidden(bitmask, width, logits.device)
        if logits.shape[-1] > width:  # padded vocabularies: ids past the tokenizer's are never allowed
            logits[index, width:] = float("-inf")
        if len(index) == len(matchers):  # every row: one in-place pass, no copy
            logits[:, :width].masked_fill_(forbidden, float("-inf"))
            return
        for slot, i in enumerate(index):
            logits[i, :width].masked_fill_(forbidden[slot], float("-inf"))


def unpack_forbidden(bitmask: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """[rows, width] booleans, True where a token is forbidden, from [rows, words] int32 bit masks (1 = allowed).

    On the CPU numpy's unpackbits; on another device bit operations there, so that only the small mask moves.
    """
    if device.type == "cpu":
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :width]
        return torch.from_numpy(bits == 0)
    words = bitmask.to(device)
    shifts = torch.arange(32, device=device, dtype=torch.int32)
    return ((words.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :width] == 0
