"""The vectorized sampler: each path follows the softmax law, rows draw independently, greedy is the argmax."""

from __future__ import annotations

import math
import random

import pytest
import torch

from llmapi.engine import sampling
from llmapi.engine.sampling import RowControls, argmax, choose, inverse_cdf, sample
from tests.laws import chi_square_ok, softmax_law

PROMPT = "Artificial Intelligence is"
LONG_PROMPT = " ".join(["tokens prompts and completions"] * 40)


def rows_of(count: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0):
    """Sampled row controls, each with its own seeded generator."""
    return [
        RowControls(False, temperature, top_k, top_p, 1.0, False, set(), torch.Generator().manual_seed(seed + i))
        for i in range(count)
    ]


def draws(scores: torch.Tensor, rows: list[RowControls], steps: int) -> torch.Tensor:
    """Token counts over `steps` draws of every row from the same scores."""
    counts = torch.zeros(scores.numel())
    for _ in range(steps):
        tokens = sample(scores.expand(len(rows), -1).clone(), rows)
        counts += torch.bincount(tokens, minlength=scores.numel()).float()
    return counts


@pytest.mark.parametrize(
    ("vocab", "temperature", "top_k", "top_p", "offset", "flush", "tries"),
    [
        (300, 1.0, 0, 1.0, 0.0, True, None),  # rejection where it succeeds, else the inverse CDF: the mixture
        (300, 1.0, 0, 1.0, 0.0, True, 0),  # the inverse CDF alone
        (300, 1.0, 0, 1.0, 0.0, True, 10_000),  # rejection alone
        (307, 0.6, 0, 1.0, 0.0, True, 0),  # 307 is prime: a padded last block
        (300, 1.0, 5, 1.0, 0.0, True, None),
        (300, 1.0, 0, 0.7, 0.0, True, None),
        (300, 0.8, 0, 1.0, -90.0, True, 0),  # logits far from zero (GPT-2's are): the weights are shifted first
        (300, 0.8, 0, 1.0, -90.0, True, 10_000),
        (300, 1.0, 5, 1.0, 0.0, False, None),  # a CPU that cannot flush denormals: tiny weights are cut instead
        (300, 0.05, 0, 1.0, 0.0, False, 0),
    ],
)
def test_sampler_follows_the_softmax_law(vocab, temperature, top_k, top_p, offset, flush, tries, monkeypatch):
    if not flush:
        monkeypatch.setattr(torch, "set_flush_denormal", lambda on: False)
    if tries is not None:
        monkeypatch.setattr(sampling, "REJECTION_TRIES", tries)
    scores = torch.linspace(-3, 2, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))] + offset
    counts = draws(scores, rows_of(50, temperature=temperature, top_k=top_k, top_p=top_p), 200)
    probs = softmax_law(scores, temperature=temperature, top_k=top_k, top_p=top_p)
    assert counts[probs == 0].sum() == 0  # never a token outside top-k / top-p
    assert chi_square_ok(counts, probs)


def test_sampler_rows_with_different_temperatures_each_follow_their_own_law():
    vocab = 200
    scores = torch.linspace(-2, 2, vocab)
    rows = [row for pair in zip(rows_of(20, temperature=0.5), rows_of(20, temperature=2.0, seed=100)) for row in pair]
    counts = torch.zeros(2, vocab)
    for _ in range(250):
        tokens = sample(scores.expand(len(rows), -1).clone(), rows)
        counts[0] += torch.bincount(tokens[0::2], minlength=vocab).float()
        counts[1] += torch.bincount(tokens[1::2], minlength=vocab).float()
    for group, temperature in enumerate((0.5, 2.0)):
        assert chi_square_ok(counts[group], softmax_law(scores, temperature=temperature))


def test_sampler_takes_rejection_for_flat_rows_and_rests_peaked_ones(monkeypatch):
    vocab = 5000
    flat = torch.randn(vocab, generator=torch.Generator().manual_seed(2)) * 0.01  # a random-weight model's logits
    peaked = torch.full((vocab,), -20.0)
    peaked[:3] = torch.tensor([5.0, 4.0, 3.0])
    calls = []
    real = sampling._inverse_cdf_sample
    monkeypatch.setattr(sampling, "_inverse_cdf_sample", lambda s, rows, p: calls.append(len(rows)) or real(s, rows, p))
    flat_row, peaked_row = rows_of(2)
    for _ in range(sampling.REJECTION_REST + 2):
        tokens = sample(torch.stack([flat, peaked]), [flat_row, peaked_row]).tolist()
        assert tokens[1] in (0, 1, 2)
    # The flat row never needed the inverse CDF; the peaked row took it every step, and tried rejection only on
    # the first step and again once its rest was over.
    assert calls == [1] * (sampling.REJECTION_REST + 2)
    assert flat_row.rejection_rest == 0
    assert peaked_row.rejection_rest == sampling.REJECTION_REST


def test_sampler_row_draws_do_not_depend_on_neighbours():
    scores = torch.randn(1, 2000, generator=torch.Generator().manual_seed(3))
    lone_row = rows_of(1, seed=11)[0]
    alone = [int(sample(scores.clone(), [lone_row])[0]) for _ in range(30)]
    row = rows_of(1, seed=11)[0]
    neighbours = [rows_of(1, temperature=0.3, top_k=7, seed=99)[0], rows_of(1, top_p=0.5, seed=5)[0]]
    together = []
    for _ in range(30):
        batch = torch.cat([torch.randn(1, 2000), scores, torch.randn(1, 2000)])
        together.append(int(sample(batch, [neighbours[0], row, neighbours[1]])[1]))
    assert together == alone


@pytest.mark.parametrize("vocab", [1000, 1009])
def test_sampler_never_picks_a_token_without_weight(vocab):
    log2w = torch.full((4, vocab), -math.inf)
    log2w[:, vocab - 1] = 0.0
    log2w[1, 0] = 0.0
    rng = random.Random(0)
    for uniforms in [[0.0] * 4, [1.0 - 2**-53] * 4] + [[rng.random() for _ in range(4)] for _ in range(200)]:
        tokens = inverse_cdf(log2w, uniforms).tolist()
        assert tokens[0] == tokens[2] == tokens[3] == vocab - 1 and tokens[1] in (0, vocab - 1)


def test_sampler_greedy_rows_beside_sampled_rows_take_the_argmax():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(4))
    greedy = RowControls(True, 1.0, 0, 1.0, 1.0, False, set(), None)
    suppressed = RowControls(True, 1.0, 0, 1.0, 1.0, True, set(), None)
    top = int(logits[1].argmax())
    tokens = choose(logits.clone(), [greedy, suppressed, rows_of(1)[0]], [top])
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] == int(logits[1].topk(2).indices[1])  # its EOS (the argmax) is ruled out


def test_argmax_takes_the_first_of_ties_as_torch_does():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -1.0, -3.0]])
    assert argmax(scores).tolist() == scores.argmax(dim=-1).tolist() == [1, 0, 0]
