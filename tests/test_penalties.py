"""Penalties, biases and min_p in the sampler: each changes the law exactly as defined, and nothing else."""

from __future__ import annotations

import pytest
import torch

from llmapi.engine import GenerationRequest, sampling
from llmapi.engine.sampling import RowControls, choose, sample
from llmapi.engine.types import InvalidRequest
from tests.laws import chi_square_ok

VOCAB = 12


def controls(*, greedy: bool = True, seed: int = 0, **options) -> RowControls:
    """A row's controls: greedy (so the sampler leaves the adjusted logits in place) unless told otherwise."""
    generator = None if greedy else torch.Generator().manual_seed(seed)
    return RowControls(greedy, 1.0, 0, 1.0, 1.0, False, set(), generator, **options)


def adjusted(logits: torch.Tensor, rows: list[RowControls]) -> torch.Tensor:
    """The logits the sampler draws from: `choose` works in place, and a greedy batch only adjusts them."""
    work = logits.clone()
    choose(work, rows, eos_ids=[])
    return work


def test_frequency_and_presence_penalties_subtract_as_openai_defines():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    row = controls(frequency_penalty=0.5, presence_penalty=-0.25)
    for token in (2, 2, 2, 7):
        row.saw(token)
    expected = logits.clone()
    expected[1, 2] -= 3 * 0.5 - 0.25  # count x frequency + presence, once the token appeared at all
    expected[1, 7] -= 1 * 0.5 - 0.25
    result = adjusted(logits, [controls(), row, controls(frequency_penalty=1.0)])  # the third has seen nothing
    assert torch.equal(result, expected)


def test_logit_bias_adds_to_its_tokens_only():
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(1))
    expected = logits.clone()
    expected[0, 3] += 100.0
    expected[0, 4] -= 2.5
    result = adjusted(logits, [controls(bias={3: 100.0, 4: -2.5}), controls()])
    assert torch.equal(result, expected)
    assert choose(logits.clone(), [controls(bias={3: 100.0}), controls()], [])[0] == 3


def test_penalties_count_only_generated_tokens_of_their_own_row():
    row = controls(presence_penalty=1.0)
    assert row.counts == {} and row.plain  # nothing generated yet: plain argmax, no work
    row.saw(5)
    assert row.counts == {5: 1} and not row.plain


@pytest.mark.parametrize(("tries", "top_k"), [(None, 0), (0, 0), (10_000, 0), (None, VOCAB)])
def test_min_p_keeps_tokens_at_least_min_p_times_the_most_likely(tries, top_k, monkeypatch):
    """Rejection, the inverse CDF and their mixture all draw from the softmax renormalised over the kept tokens."""
    if tries is not None:
        monkeypatch.setattr(sampling, "REJECTION_TRIES", tries)
    scores = torch.linspace(-2.0, 1.0, VOCAB)
    temperature, min_p = 0.8, 0.3
    rows = [controls(greedy=False, seed=i, min_p=min_p) for i in range(200)]
    for row in rows:
        row.temperature, row.top_k = temperature, top_k
    counts = torch.zeros(VOCAB)
    for _ in range(100):
        tokens = sample(scores.expand(len(rows), -1).clone(), rows)
        counts += torch.bincount(tokens, minlength=VOCAB).float()
    probs = torch.softmax(scores / temperature, dim=-1)
    probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    probs = probs / probs.sum()
    assert counts[probs == 0].sum() == 0 and (probs == 0).any()
    assert chi_square_ok(counts, probs)


def test_frequency_penalty_changes_the_sampled_law_as_defined():
    scores = torch.linspace(-1.0, 1.0, VOCAB)
    rows = [controls(greedy=False, seed=i, frequency_penalty=1.5) for i in range(200)]
    for row in rows:
        row.saw(VOCAB - 1)
        row.saw(VOCAB - 1)
    counts = torch.zeros(VOCAB)
    for _ in range(100):
        tokens = choose(scores.expand(len(rows), -1).clone(), rows, [])
        counts += torch.bincount(torch.tensor(tokens), minlength=VOCAB).float()
    expected = scores.clone()
    expected[-1] -= 2 * 1.5
    assert chi_square_ok(counts, torch.softmax(expected, dim=-1))


def test_engine_logit_bias_forces_a_token(engine):
    target = engine.encode(" banana")[0]
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=4, logit_bias=((target, 100.0),)))
    assert result.text == engine.decode([target]) * 4


def test_engine_refuses_logit_bias_outside_the_vocabulary(engine):
    with pytest.raises(InvalidRequest) as info:
        engine.submit(GenerationRequest(prompt="Hello", max_new_tokens=2, logit_bias=((10**6, 1.0),)))
    assert info.value.param == "logit_bias"


def test_engine_presence_penalty_stops_a_repeat(engine):
    plain = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=6))
    ids = engine.encode(plain.text)
    assert len(set(ids)) < len(ids)  # the tiny model repeats itself greedily
    penalised = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=6, presence_penalty=2.0))
    ids = engine.encode(penalised.text)
    assert len(set(ids)) == len(ids) == 6


@pytest.mark.parametrize("path", [choose, sampling.choose_on_device])
def test_both_sampler_paths_apply_penalties_and_biases_alike(path):
    """The GPU path (run here on CPU tensors) adjusts the logits exactly as the CPU path does."""
    logits = torch.linspace(-1.0, 1.0, VOCAB).expand(3, -1).clone()
    rows = [
        controls(frequency_penalty=0.5, presence_penalty=0.25, counts={VOCAB - 1: 2}),
        controls(bias={0: 5.0}),
        controls(),
    ]
    work = logits.clone()
    tokens = path(work, rows, [])
    expected = logits.clone()
    expected[0, VOCAB - 1] -= 2 * 0.5 + 0.25
    expected[1, 0] += 5.0
    assert torch.allclose(work, expected)
    assert [int(t) for t in tokens] == [int(expected[i].argmax()) for i in range(3)]


def test_device_sampler_path_keeps_min_p(monkeypatch):
    """min_p on the torch-only path: no token below min_p times the most likely is ever drawn."""
    scores = torch.linspace(-2.0, 1.0, VOCAB)
    rows = [controls(greedy=False, seed=i, min_p=0.3) for i in range(200)]
    tokens = sampling.choose_on_device(scores.expand(len(rows), -1).clone(), rows, [])
    probs = torch.softmax(scores, dim=-1)
    assert bool((probs[tokens] >= 0.3 * probs.max()).all())
