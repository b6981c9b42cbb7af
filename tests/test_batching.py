"""Continuous batching on the real tiny model: joins, early leaves, seeded lanes, the sampler and the baseline."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
import torch

from llmapi.engine import GenerationRequest, create_engine, sampling
from llmapi.engine.bytelevel import byte_table, fast_decoder
from llmapi.engine.sampling import RowControls, argmax, choose, inverse_cdf, sample
from tests.conftest import run_concurrently

PROMPT = "Artificial Intelligence is"
LONG_PROMPT = " ".join(["tokens prompts and completions"] * 40)


@pytest.fixture(scope="module")
def sharp(tiny_model, tmp_path_factory):
    """An engine on a small random GPT-2 whose greedy text depends on positions and masks.

    The tiny model's two-wide hidden state barely notices a wrong position or mask; this one (64 wide, weights
    drawn 15x wider than GPT-2's initialisation) changes its argmax when either is off, while its top logits stay
    far enough apart that batched rounding cannot swap them.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(tmp_path_factory.mktemp("sharp-gpt2"))
    for item in Path(tiny_model).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, path)
    tiny_config = GPT2Config.from_pretrained(tiny_model)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=tiny_config.vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=tiny_config.bos_token_id,
        eos_token_id=tiny_config.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return create_engine(str(path), threads=1, max_batch_size=8, batch_wait_ms=5, dtype="float32")


def start_long_stream(engine, prompt: str = "Hello"):
    """Submit a long streamed greedy request and wait for its first piece, so that it is decoding."""
    handle = engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=900, stream=True))
    pieces = handle.pieces()
    first = next(pieces)
    assert isinstance(first, str)
    return handle, pieces


def test_batch_rows_joining_a_running_batch_match_alone(sharp):
    joiners = [
        GenerationRequest(prompt=LONG_PROMPT, max_new_tokens=12),  # longer than the running cache: it pads
        GenerationRequest(prompt="x", max_new_tokens=9),  # shorter: the newcomer is padded
        GenerationRequest(prompt=PROMPT, max_new_tokens=10, repetition_penalty=1.3, min_new_tokens=10),
    ]
    alone = [sharp.generate(request) for request in joiners]
    runner, pieces = start_long_stream(sharp)
    joined = [handle.result() for handle in [sharp.submit(request) for request in joiners]]
    runner.cancel()
    ended = list(pieces)[-1]
    assert [r.text for r in joined] == [r.text for r in alone]
    assert [r.completion_tokens for r in joined] == [12, 9, 10]
    assert all(r.timings["batch_size"] > 1 for r in joined)  # they decoded beside the running row
    assert ended.finish_reason == "cancelled"  # the running row was still going when they finished


def test_batch_finished_row_leaves_at_once(sharp):
    runner, pieces = start_long_stream(sharp)
    short = sharp.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=2)).result()
    # The short row's answer arrived while the long one was still decoding: it can still be cancelled.
    runner.cancel()
    ended = list(pieces)[-1]
    assert short.completion_tokens == 2 and short.finish_reason == "length"
    assert short.timings["batch_size"] > 1
    assert ended.finish_reason == "cancelled"
    assert ended.completion_tokens < 900


def test_batch_rows_with_different_controls_match_alone(sharp):
    specs = [
        GenerationRequest(prompt="Hello", max_new_tokens=5, stop=("zz",)),
        GenerationRequest(prompt="The quick brown fox", max_new_tokens=14, min_new_tokens=14),
        GenerationRequest(prompt="Hello", max_new_tokens=11, repetition_penalty=0.7),
        GenerationRequest(prompt=LONG_PROMPT, max_new_tokens=7, do_sample=True, temperature=0.0),
    ]
    alone = [sharp.generate(s) for s in specs]
    together = run_concurrently(lambda i: sharp.generate(specs[i]), len(specs))
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]


def test_batch_seeded_requests_repeat_under_concurrent_load(sharp):
    seeded = GenerationRequest(prompt=PROMPT, max_new_tokens=24, do_sample=True, temperature=0.9, top_k=40, seed=7)
    expected = sharp.generate(seeded).text
    others = [
        GenerationRequest(prompt=f"Other request {i}", max_new_tokens=10 + i, do_sample=i % 2 == 0, temperature=1.2)
        for i in range(6)
    ]
    runner, pieces = start_long_stream(sharp, "Background")
    mixed = [seeded, *others, seeded, seeded]
    results = run_concurrently(lambda i: sharp.generate(mixed[i]), len(mixed))
    runner.cancel()
    list(pieces)
    assert [results[0].text, results[-2].text, results[-1].text] == [expected] * 3
    assert results[0].timings["batch_size"] == 1.0  # a seeded request decodes in a lane of its own


def test_batch_timings_report_the_batch(sharp):
    results = run_concurrently(lambda i: sharp.generate(GenerationRequest(prompt=f"Row {i}", max_new_tokens=8)), 6)
    for result in results:
        assert set(result.timings) == {"queue_s", "first_token_s", "total_s", "batch_size"}
        assert 1.0 <= result.timings["batch_size"] <= 8


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
    assert counts[probs == 0].sum() == 0  # never a token outside top-k / top-p
    expected = probs * counts.sum()
    bins = expected > 5
    chi2 = float((((counts - expected) ** 2) / expected)[bins].sum())
    dof = int(bins.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)  # five standard deviations: a wrong law is far beyond


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
        expected = torch.softmax(scores / temperature, dim=-1) * counts[group].sum()
        bins = expected > 5
        chi2 = float((((counts[group] - expected) ** 2) / expected)[bins].sum())
        dof = int(bins.sum()) - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof)


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


def test_bytelevel_decoder_equals_the_tokenizer(engine):
    tokenizer = engine.loaded.tokenizer
    slow = engine.decode
    fast = fast_decoder(tokenizer, slow)
    assert fast is not slow
    rng = random.Random(5)
    special = tokenizer.all_special_ids
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 20))] + rng.sample(special, 1)
        assert fast(ids) == slow(ids)
    text = "Héllo wörld — 日本語 ✓ 🎉"
    assert fast(tokenizer.encode(text)) == text


def test_bytelevel_decoder_falls_back_for_other_tokenizers():
    class NotByteLevel:
        backend_tokenizer = type("Backend", (), {"decoder": object()})()

    def decode(ids):
        return "".join(map(str, ids))

    assert byte_table(NotByteLevel()) is None
    assert fast_decoder(NotByteLevel(), decode) is decode


@pytest.fixture(scope="module")
def simple_engine(sharp):
    """The baseline engine (ENGINE_MODE=simple) on the same model as `sharp`."""
    return create_engine(sharp.model_name, threads=1, mode="simple", dtype="float32")


def test_simple_mode_greedy_matches_the_batch_engine(simple_engine, sharp):
    for prompt, tokens in ((PROMPT, 12), ("Hello", 5), (LONG_PROMPT, 9)):
        request = GenerationRequest(prompt=prompt, max_new_tokens=tokens)
        baseline, batched = simple_engine.generate(request), sharp.generate(request)
        assert baseline.text == batched.text
        assert baseline.completion_tokens == batched.completion_tokens
        assert baseline.prompt_tokens == batched.prompt_tokens
        assert baseline.finish_reason == "length"


def test_simple_mode_seed_reproduces_and_stop_cuts(simple_engine):
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=16, do_sample=True, temperature=0.9, seed=3)
    first, second = simple_engine.generate(request), simple_engine.generate(request)
    assert first.text == second.text and first.seed == 3
    stop = first.text[4:7]
    cut = simple_engine.generate(
        GenerationRequest(prompt=PROMPT, max_new_tokens=16, do_sample=True, temperature=0.9, seed=3, stop=(stop,))
    )
    assert cut.finish_reason == "stop" and cut.stop_sequence == stop
    assert cut.text == first.text[: first.text.index(stop)]


def test_simple_mode_streams_one_piece_then_the_result(simple_engine):
    handle = simple_engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=6, stream=True))
    items = list(handle.pieces())
    assert len(items) == 2 and items[0] == items[1].text


def test_engine_close_fails_waiting_requests_and_refuses_new_ones(tiny_model):
    from llmapi.engine import EngineError

    engine = create_engine(tiny_model, threads=1)
    handle = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=900, stream=True))
    pieces = handle.pieces()
    next(pieces)
    engine.close()
    with pytest.raises(EngineError, match="shut down"):
        list(pieces)
    with pytest.raises(EngineError, match="shut down"):
        engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=2))
