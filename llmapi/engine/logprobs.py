"""Log-probabilities from the logits a step already computed: the model's raw log-softmax, for the rows that ask.

They come before temperature, penalties, biases and any grammar mask (vLLM's default, "raw logprobs"): what the
model thinks of a token, not how likely this request's sampler was to draw it. Only rows that asked pay: their
logits are copied before the sampler edits them in place, and one logsumexp and one top-k run on that copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from llmapi.engine.bytelevel import byte_table
from llmapi.engine.types import TokenLogprob


class TokenTexts:
    """Each token id's own text and bytes, built once per id (from the byte table on byte-level tokenizers)."""

    def __init__(self, tokenizer: Any, decode: Callable[[Sequence[int]], str]) -> None:
        self._table = byte_table(tokenizer)
        self._decode = decode
        self._cache: dict[int, tuple[str, bytes]] = {}

    def get(self, token_id: int) -> tuple[str, bytes]:
        """The text (a lone part of a character shows as U+FFFD) and the bytes of `token_id`."""
        known = self._cache.get(token_id)
        if known is None:
            if self._table is not None:
                raw = self._table[token_id] if token_id < len(self._table) else b""
                known = (raw.decode("utf-8", "replace"), raw)
            else:
                text = self._decode([token_id])
                known = (text, text.encode("utf-8"))
            self._cache[token_id] = known
        return known

    def entry(self, token_id: int, logprob: float | None, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
        """A TokenLogprob for `token_id`."""
        text, raw = self.get(token_id)
        return TokenLogprob(id=token_id, text=text, raw=raw, logprob=logprob, top=top)


def wanted(rows: Sequence[Any]) -> list[int]:
    """The indexes of the rows (anything with a `.request`) that want their tokens' log-probabilities."""
    return [i for i, row in enumerate(rows) if row.request.logprobs is not None and row.request.max_new_tokens]


def entries(logits: torch.Tensor, chosen: Sequence[int], ks: Sequence[int], texts: TokenTexts) -> list[TokenLogprob]:
    """Each row's chosen token with its log-probability and its `k` most likely alternatives.

    `logits` is [rows, vocab] (float32, untouched by the sampler); `chosen` and `ks` have one item per row.
    """
    norm = logsumexp(logits)
    index = torch.tensor(list(chosen), dtype=torch.long, device=logits.device).unsqueeze(-1)
    picked = (logits.gather(1, index) - norm).squeeze(-1).tolist()
    top_values: list[list[float]] = [[] for _ in chosen]
    top_ids: list[list[int]] = [[] for _ in chosen]
    if max(ks, default=0) > 0:
        values, ids = torch.topk(logits, max(ks), dim=-1)
        top_values, top_ids = (values - norm).tolist(), ids.tolist()
    out = []
    for token, logprob, k, values_row, ids_row in zip(chosen, picked, ks, top_values, top_ids):
        top = tuple(texts.entry(i, v) for i, v in zip(ids_row[:k], values_row[:k]))
        out.append(texts.entry(token, logprob, top))
    return out


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """Each row's log of the sum of exp(logits), [rows, 1]: numpy's on the CPU (about 2.5x torch's there)."""
    if logits.device.type != "cpu":
        return torch.logsumexp(logits, dim=-1, keepdim=True)
    values = logits.numpy()
    peak = values.max(axis=1, keepdims=True)
    peak[~np.isfinite(peak)] = 0.0
    return torch.from_numpy(peak + np.log(np.exp(values - peak).sum(axis=1, keepdims=True)))


class PromptScorer:
    """A prompt's log-probabilities, read chunk by chunk as its prefill computes them.

    Token t is scored under the logits of position t - 1 (the first token has no logprob), which lie in the chunk
    before when t opens a chunk: so only that one column is carried from chunk to chunk, never the whole prompt's
    T x vocab. Fed the whole prompt at once, it scores it as a one-pass prefill does.
    """

    def __init__(self, prompt_ids: Sequence[int], k: int, texts: TokenTexts) -> None:
        self.prompt_ids = prompt_ids
        self.k = k
        self.texts = texts
        self.entries: list[TokenLogprob] = []
        self.carry: torch.Tensor | None = None  # [1, vocab]: the logits of the last position read so far

    def feed(self, logits: torch.Tensor) -> None:
        """Score the prompt's next `len(logits)` tokens, given the logits of their positions ([columns, vocab])."""
        count = logits.shape[0]
        start = len(self.entries)
        if count == 0:
            return
        if self.carry is None:  # the prompt's first token: nothing before it predicts it
            self.entries.append(self.texts.entry(self.prompt_ids[0], None))
            before, tokens = logits[: count - 1], self.prompt_ids[1:count]
        else:
            before, tokens = torch.cat([self.carry, logits[: count - 1]]), self.prompt_ids[start : start + count]
        if len(tokens):
            self.entries.extend(entries(before.float(), tokens, [self.k] * len(tokens), self.texts))
        # A copy, so that the chunk's whole logits are not kept alive by a view of one column.
        self.carry = logits[count - 1 :].to(torch.float32, copy=True)

    def result(self) -> tuple[TokenLogprob, ...]:
        """The entries scored so far: one per prompt token once the whole prompt has been fed."""
        return tuple(self.entries)
