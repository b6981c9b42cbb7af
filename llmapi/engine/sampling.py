"""Choose the next token of every row in a batch: greedy, or sampled with per-row controls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class RowControls:
    """The decoding controls and state of one row that the sampler needs."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    suppress_eos: bool
    seen: list[int]
    generator: torch.Generator | None

    @property
    def plain(self) -> bool:
        """Whether argmax of the raw logits is the answer."""
        return self.greedy and self.repetition_penalty == 1.0 and not self.suppress_eos


def choose(logits: torch.Tensor, rows: Sequence[RowControls], eos_ids: Sequence[int]) -> list[int]:
    """Return one token id per row of `logits` ([batch, vocab], float)."""
    tokens = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if not row.plain:
            tokens[i] = _choose_row(logits[i], row, eos_ids)
    return tokens


def _choose_row(scores: torch.Tensor, row: RowControls, eos_ids: Sequence[int]) -> int:
    """Apply penalties and warpers to one row's scores, then pick greedily or sample."""
    if row.repetition_penalty != 1.0 and row.seen:
        ids = torch.tensor(sorted(set(row.seen)), dtype=torch.long)
        picked = scores[ids]
        scores[ids] = torch.where(picked < 0, picked * row.repetition_penalty, picked / row.repetition_penalty)
    if row.suppress_eos and eos_ids:
        scores[list(eos_ids)] = float("-inf")
    if row.greedy:
        return int(scores.argmax())
    scores = scores / row.temperature
    if 0 < row.top_k < scores.numel():
        kth = torch.topk(scores, row.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if row.top_p < 1.0:
        scores = _top_p(scores, row.top_p)
    return exponential_race(torch.softmax(scores, dim=-1), row.generator)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (always at least one)."""
    ordered, order = torch.sort(scores, descending=True)
    probs = torch.softmax(ordered, dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= top_p
    drop[0] = False
    return scores.index_fill(0, order[drop], float("-inf"))


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw from `probs` as argmax(p / E) with E ~ Exponential(1): the same law as multinomial, at argmax cost."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())
