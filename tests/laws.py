"""The sampling laws the sampler tests check draws against, written once."""

from __future__ import annotations

import math

import torch


def softmax_law(scores: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """The probabilities of softmax(scores / temperature), cut to the top-k and then to the top-p, renormalised."""
    expected_scores = scores / temperature
    if top_k:
        kth = expected_scores.topk(top_k).values[-1]
        expected_scores = expected_scores.masked_fill(expected_scores < kth, -math.inf)
    probs = torch.softmax(expected_scores, dim=-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(0) - ordered < top_p
        probs = torch.zeros_like(probs).index_fill(0, order[keep], 1.0) * probs
        probs = probs / probs.sum()
    return probs


def chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether counts follow probs: chi-square within five standard deviations (a wrong law is far beyond)."""
    expected = probs * counts.sum()
    bins = expected > 5
    chi2 = float((((counts - expected) ** 2) / expected)[bins].sum())
    dof = int(bins.sum()) - 1
    return chi2 < dof + 5 * math.sqrt(2 * dof)
