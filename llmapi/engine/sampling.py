"""Choose the next token of every row in a batch: greedy or sampled, per-row controls applied as batch tensor ops.

Costs on this CPU, 8 rows x 50,257 logits, one thread: torch.argmax ~340 us, numpy's argmax ~28 us; torch.exp
~340 us, torch.exp2 ~120 us, and twice that when its results underflow to denormals, unless denormals are
flushed to zero. A sampled row draws its uniform numbers from its own generator (two per rejection try, one for
the inverse CDF), so its draws do not depend on its neighbours; an exponential race would need 50,257 of them per
row and step. Every pass over the [batch, vocab] scores costs ~25 us at batch 8, so the sampler makes as few as it can:
numpy's max, one multiply, exp2 and the block sums; the rest works on [batch, blocks] and [batch, BLOCK].

Logits on a GPU take `choose_on_device`, in torch alone: nothing leaves the device but the chosen tokens (the
engine's one copy per step), and the rows' uniform numbers, drawn from the same per-row CPU generators, go the
other way, so that a seed gives the same draws on either device.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

BLOCK = 256  # tokens per inverse-CDF block: the last block of a vocabulary is padded with zero weights
LOG2_E = 1.0 / math.log(2.0)
MIN_LOG2 = -126.0  # 2**-126 is float32's smallest normal number: weights below it are far below rounding anyway
# Rows whose largest log2-weight is within +-SAFE_PEAK need no shift: their total stays far below float32's
# overflow (vocab x 2**64), and the weights that flush to zero (below 2**-126) are 2**-62 of the largest.
SAFE_PEAK = 64.0
UNIFORMS_PER_DRAW = 64  # uniform numbers a row takes from its generator at a time
# Rejection from a uniform proposal (see `sample`): tries per row and step before the inverse CDF takes over,
# and how many steps a row whose tries all failed goes straight to the inverse CDF before trying again.
REJECTION_TRIES = 4
REJECTION_REST = 32


@dataclass
class RowControls:
    """The decoding controls and state of one row that the sampler needs."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    suppress_eos: bool
    seen: set[int]  # token ids of the prompt and output, kept only for a repetition penalty
    generator: torch.Generator | None
    uniforms: list[float] = field(default_factory=list)  # drawn from `generator` ahead, next one last
    rejection_rest: int = 0  # steps left before this row tries rejection sampling again
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's logit_bias)
    min_p: float = 0.0
    counts: dict[int, int] = field(default_factory=dict)  # generated token -> times, kept only for the two penalties

    @property
    def counted(self) -> bool:
        """Whether this row keeps counts of its generated tokens (for a frequency or presence penalty)."""
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def plain(self) -> bool:
        """Whether argmax of the raw logits is the answer."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and not self.suppress_eos
            and not self.bias
            and not (self.counted and self.counts)
        )

    def uniform(self) -> float:
        """The row's next uniform number in [0, 1), from its own generator (drawn in bulk: one call per 64)."""
        if not self.uniforms:
            self.uniforms = torch.rand(UNIFORMS_PER_DRAW, generator=self.generator, dtype=torch.float64).tolist()
            self.uniforms.reverse()
        return self.uniforms.pop()

    def saw(self, token: int) -> None:
        """Remember a generated token for the repetition penalty."""
        if self.repetition_penalty != 1.0:
            self.seen.add(token)
        if self.counted:
            self.counts[token] = self.counts.get(token, 0) + 1


def argmax(scores: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest score, the first one on ties (numpy's SIMD argmax; torch's is ~10x slower)."""
    return torch.from_numpy(scores.numpy().argmax(axis=-1))


def choose(logits: torch.Tensor, rows: Sequence[RowControls], eos_ids: Sequence[int]) -> torch.Tensor:
    """Return one token id per row of `logits` ([batch, vocab], float32; modified in place), on its device."""
    if logits.device.type != "cpu":
        return choose_on_device(logits, rows, eos_ids)
    if all(row.plain for row in rows):
        return argmax(logits)
    adjust(logits, rows)
    tokens = [0] * len(rows)
    for greedy in (True, False):
        index = [i for i, row in enumerate(rows) if row.greedy == greedy]
        if not index:
            continue
        part, group = _subset(logits, rows, index)
        picked = _greedy(part, group, eos_ids) if greedy else sample(part, group, eos_ids)
        for i, token in zip(index, picked.tolist()):
            tokens[i] = token
    return torch.tensor(tokens)


def adjust(logits: torch.Tensor, rows: Sequence[RowControls]) -> None:
    """Apply each row's repetition penalty, frequency and presence penalties and logit_bias, in place."""
    penalised = [i for i, row in enumerate(rows) if row.repetition_penalty != 1.0 and row.seen]
    if penalised:
        apply_repetition_penalty(logits, [rows[i] for i in penalised], penalised)
    counted = [i for i, row in enumerate(rows) if row.counted and row.counts]
    if counted:
        apply_frequency_presence(logits, [rows[i] for i in counted], counted)
    biased = [i for i, row in enumerate(rows) if row.bias]
    if biased:
        apply_logit_bias(logits, [rows[i] for i in biased], biased)


def choose_on_device(logits: torch.Tensor, rows: Sequence[RowControls], eos_ids: Sequence[int]) -> torch.Tensor:
    """`choose` in torch operations alone, for logits on a GPU (it runs on CPU tensors too, for the tests).

    Greedy rows take the argmax; sampled rows the inverse CDF over the whole vocabulary (one cumsum, one
    searchsorted), which on a GPU costs less than rejection's per-row scalar reads would.
    """
    device = logits.device
    if all(row.plain for row in rows):
        return logits.argmax(dim=-1)
    adjust(logits, rows)
    suppressed = [i for i, row in enumerate(rows) if row.suppress_eos]
    if suppressed and eos_ids:
        row_index = torch.tensor(suppressed, device=device).unsqueeze(-1)
        logits[row_index, torch.tensor(list(eos_ids), device=device)] = -math.inf
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.greedy]
    if sampled:
        part, group = _subset(logits, rows, sampled)
        tokens[torch.tensor(sampled, device=device)] = _device_sample(part, group)
    return tokens


def truncate(log2w: torch.Tensor, rows: Sequence[RowControls]) -> torch.Tensor:
    """Drop the tokens each row's top-k, top-p and min_p leave out (weights -inf), on either sampling path."""
    top_k = [row.top_k if 0 < row.top_k < log2w.shape[-1] else 0 for row in rows]
    if any(top_k):
        log2w = _top_k(log2w, top_k)
    top_p = [row.top_p for row in rows]
    if any(p < 1.0 for p in top_p):
        log2w = _top_p(log2w, top_p)
    min_p = [row.min_p for row in rows]
    if any(min_p):
        log2w = _min_p(log2w, min_p)
    return log2w


def _device_sample(scores: torch.Tensor, rows: Sequence[RowControls]) -> torch.Tensor:
    """Draw one token per row by inverse CDF after temperature, top-k and top-p, in torch on `scores`' device."""
    device = scores.device
    scale = torch.tensor([LOG2_E / row.temperature for row in rows], device=device).unsqueeze(-1)
    log2w = (scores - scores.amax(dim=-1, keepdim=True)) * scale
    log2w = truncate(log2w, rows)
    cdf = torch.exp2(log2w).cumsum(dim=-1)
    uniforms = torch.tensor([row.uniform() for row in rows], dtype=cdf.dtype, device=device)
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=scores.shape[-1] - 1)


def _subset(
    scores: torch.Tensor, rows: Sequence[RowControls], index: list[int]
) -> tuple[torch.Tensor, list[RowControls]]:
    """The scores and controls of the rows at `index`: `scores` itself when that is every row, else a copy."""
    part = scores if len(index) == len(rows) else scores[torch.tensor(index, device=scores.device)]
    return part, [rows[i] for i in index]


def _greedy(scores: torch.Tensor, rows: Sequence[RowControls], eos_ids: Sequence[int]) -> torch.Tensor:
    """Argmax per row, with end-of-sequence ruled out for rows still under min_new_tokens."""
    suppress_eos(scores, rows, eos_ids)
    return argmax(scores)


def suppress_eos(scores: torch.Tensor, rows: Sequence[RowControls], eos_ids: Sequence[int]) -> None:
    """Set the end-of-sequence scores of rows that may not end yet to -inf."""
    index = [i for i, row in enumerate(rows) if row.suppress_eos]
    if index and eos_ids:
        scores.numpy()[np.ix_(index, list(eos_ids))] = -np.inf


def apply_repetition_penalty(logits: torch.Tensor, rows: Sequence[RowControls], index: Sequence[int]) -> None:
    """Divide positive (multiply negative) scores of tokens each row has seen by its penalty, as CTRL does."""
    ids = [torch.tensor(sorted(row.seen), dtype=torch.long) for row in rows]
    counts = torch.tensor([len(t) for t in ids])
    device = logits.device
    row_index = torch.repeat_interleave(torch.tensor(index), counts).to(device)
    col_index = torch.cat(ids).to(device)
    penalty = torch.repeat_interleave(torch.tensor([row.repetition_penalty for row in rows]), counts).to(device)
    picked = logits[row_index, col_index]
    logits[row_index, col_index] = torch.where(picked < 0, picked * penalty, picked / penalty)


def _scatter_index(
    keys: Sequence[Sequence[int]], index: Sequence[int], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, column) indexes of every row's listed token ids, for one gather or scatter over the batch."""
    lengths = torch.tensor([len(k) for k in keys], device=device)
    rows = torch.repeat_interleave(torch.tensor(list(index), device=device), lengths)
    cols = torch.tensor([token for k in keys for token in k], dtype=torch.long, device=device)
    return rows, cols


def apply_frequency_presence(logits: torch.Tensor, rows: Sequence[RowControls], index: Sequence[int]) -> None:
    """Subtract count x frequency_penalty + presence_penalty from each generated token's logit (OpenAI's rule)."""
    keys = [list(row.counts) for row in rows]
    row_index, col_index = _scatter_index(keys, index, logits.device)
    counts = torch.tensor([n for row in rows for n in row.counts.values()], dtype=logits.dtype, device=logits.device)
    lengths = [len(k) for k in keys]
    frequency = torch.tensor(
        [row.frequency_penalty for row, n in zip(rows, lengths) for _ in range(n)], dtype=logits.dtype
    ).to(logits.device)
    presence = torch.tensor(
        [row.presence_penalty for row, n in zip(rows, lengths) for _ in range(n)], dtype=logits.dtype
    ).to(logits.device)
    logits[row_index, col_index] -= counts * frequency + presence


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[RowControls], index: Sequence[int]) -> None:
    """Add each row's logit_bias to the logits of its tokens."""
    keys = [list(row.bias) for row in rows]
    row_index, col_index = _scatter_index(keys, index, logits.device)
    bias = torch.tensor([b for row in rows for b in row.bias.values()], dtype=logits.dtype).to(logits.device)
    logits[row_index, col_index] += bias


def sample(scores: torch.Tensor, rows: Sequence[RowControls], eos_ids: Sequence[int] = ()) -> torch.Tensor:
    """Draw one token per row after temperature, top-k and top-p, each row from its own generator.

    A row with neither top-k nor top-p first tries rejection sampling from a uniform proposal: a token drawn
    uniformly is kept with probability weight / largest weight. That is the exact law at the cost of one pass
    (the rows' maxima), and it succeeds quickly when the distribution is flat (high temperature, random
    weights). Rows whose tries all fail (a peaked distribution: a trained model's, mostly) take the inverse
    CDF, which is exact too, so the mixture of the two is exactly the law. Whether a row tries depends only on
    its own past, so its draws still never depend on its neighbours.
    """
    suppress_eos(scores, rows, eos_ids)
    values = scores.numpy()
    peak = values.max(axis=1)  # numpy's SIMD max: torch.amax is slower here
    tokens = [-1] * len(rows)
    rest = []
    for i, row in enumerate(rows):
        token = _reject(values[i], float(peak[i]), row)
        if token is None:
            rest.append(i)
        else:
            tokens[i] = token
    if rest:
        part, group = _subset(scores, rows, rest)
        for i, token in zip(rest, _inverse_cdf_sample(part, group, peak[rest]).tolist()):
            tokens[i] = token
    return torch.tensor(tokens)


def _reject(values: np.ndarray, peak: float, row: RowControls) -> int | None:
    """A token by rejection from a uniform proposal, or None when the row should take the inverse CDF."""
    if row.top_k or row.top_p < 1.0:
        return None
    if row.rejection_rest:
        row.rejection_rest -= 1
        return None
    scale = LOG2_E / row.temperature
    vocab = len(values)
    for _ in range(REJECTION_TRIES):
        token = int(row.uniform() * vocab)
        ratio = 2.0 ** ((float(values[token]) - peak) * scale)  # p(token) / p(most likely), after temperature
        # min_p keeps tokens at least min_p times as likely as the most likely one: the rest are never accepted.
        if row.uniform() < ratio and ratio >= row.min_p:
            return token
    row.rejection_rest = REJECTION_REST
    return None


def _inverse_cdf_sample(scores: torch.Tensor, rows: Sequence[RowControls], peak: np.ndarray) -> np.ndarray:
    """Draw one token per row by inverse CDF after temperature, top-k and top-p."""
    log2w = log2_weights_(scores, [row.temperature for row in rows], peak)
    log2w = truncate(log2w, rows)
    return inverse_cdf(log2w, [row.uniform() for row in rows])


def log2_weights_(scores: torch.Tensor, temperatures: Sequence[float], peak: np.ndarray) -> torch.Tensor:
    """Turn scores into base-2 log-weights in place: scores / temperature / ln 2, shifted into exp2's safe range.

    The shift (minus each row's largest value) costs a pass over the batch, so it is made only when some row's
    largest value (`peak`, before scaling) falls outside [-SAFE_PEAK, SAFE_PEAK], as logits centred near zero
    never do.
    """
    scale = np.float32(LOG2_E) / np.asarray(temperatures, dtype=np.float32)
    if (scale == scale[0]).all():
        scores.mul_(float(scale[0]))
    else:
        scores.mul_(torch.from_numpy(scale).unsqueeze(-1))
    peak = peak * scale
    if not (np.abs(peak) <= SAFE_PEAK).all():
        scores.sub_(torch.from_numpy(peak).unsqueeze(-1))
    return scores


def _top_k(log2w: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Keep each row's k highest weights (k = 0: keep all)."""
    kept = torch.topk(log2w, max(top_k), dim=-1).values
    ks = torch.tensor(top_k, device=log2w.device)
    kth = kept.gather(1, (ks - 1).clamp(min=0).unsqueeze(-1))
    kth[ks == 0] = float("-inf")
    return log2w.masked_fill(log2w < kth, float("-inf"))


def _top_p(log2w: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Keep each row's smallest set of tokens whose probability mass reaches its top_p (always at least one)."""
    ordered, order = torch.sort(log2w, dim=-1, descending=True)
    probs = torch.softmax(ordered * math.log(2.0), dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= torch.tensor(top_p, dtype=probs.dtype, device=probs.device).unsqueeze(-1)
    drop[:, 0] = False
    return log2w.scatter(1, order, ordered.masked_fill(drop, float("-inf")))


def _min_p(log2w: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Keep the tokens at least min_p times as likely as each row's most likely one (min_p = 0: keep all)."""
    floor = torch.tensor([math.log2(p) if p > 0 else -math.inf for p in min_p], dtype=log2w.dtype)
    threshold = log2w.amax(dim=-1, keepdim=True) + floor.to(log2w.device).unsqueeze(-1)
    return log2w.masked_fill(log2w < threshold, float("-inf"))


def inverse_cdf(log2w: torch.Tensor, uniforms: Sequence[float]) -> np.ndarray:
    """Draw per row from the weights 2**log2w with one uniform number in [0, 1) per row: the law of
    torch.multinomial.

    The weights are summed in blocks of BLOCK tokens, the block is found on the blocks' cumulative sum, then the
    token on the cumulative sum inside that block alone.
    """
    rows, vocab = log2w.shape
    blocks = -(-vocab // BLOCK)
    padded = log2w.new_empty((rows, blocks * BLOCK))
    padded[:, vocab:] = 0.0
    weights = padded[:, :vocab]
    with _flushed_denormals() as flushed:
        if not flushed:  # exp2 of numbers that underflow to denormals is slow: weights that small count as 0
            log2w = log2w.masked_fill(log2w < MIN_LOG2, -math.inf)
        torch.exp2(log2w, out=weights)
    block_cdf = padded.view(rows, blocks, BLOCK).sum(dim=-1).numpy().cumsum(axis=1)
    target = _below(np.asarray(uniforms, dtype=np.float32) * block_cdf[:, -1], block_cdf[:, -1])
    block = (block_cdf <= target[:, None]).sum(axis=1)  # searchsorted, right side, for every row at once
    each = np.arange(rows)
    target -= np.where(block > 0, block_cdf[each, block - 1], np.float32(0))
    inner = padded.numpy().reshape(rows, blocks, BLOCK)[each, block].cumsum(axis=1)
    offset = (inner <= _below(target, inner[:, -1])[:, None]).sum(axis=1)
    return block * BLOCK + offset


@contextmanager
def _flushed_denormals() -> Iterator[bool]:
    """Flush denormal floats to zero in this thread for the block (a per-thread CPU flag); yield whether it took."""
    flushed = torch.set_flush_denormal(True)
    try:
        yield flushed
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _below(value: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Clamp `value` strictly below `limit`, so that rounding never picks a token past the last one with weight."""
    return np.minimum(value, np.nextafter(limit, np.float32(0)))
