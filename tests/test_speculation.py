"""Prompt-lookup speculation (engine/speculation.py): drafts, greedy text equal to plain decoding's, sampled rows on
the same draws, every control, lanes of several rows, the counters and their metrics, the real model's rewrite."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.speculation import ASKS, PARAGRAPHS  # the benchmark's copy-heavy workload
from llmapi.engine import GenerationRequest, create_engine
from llmapi.engine.sequence import Drafting
from llmapi.engine.speculation import MISSES_BEFORE_REST, REST_STEPS, Speculator, propose
from llmapi.engine.types import EngineStats, Grammar, Piece
from tests.conftest import GGUF_CACHE, run_concurrently
from tests.ops_helpers import sample

SEED_PROMPT = "The cat sat on the mat and"


@pytest.fixture(scope="module")
def plain(tiny_model: str):
    """The tiny model without speculation: the reference every speculating engine must match."""
    engine = create_engine(tiny_model, torch_threads=1, batch_wait_ms=20)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def spec(tiny_model: str):
    """The tiny model speculating: 4 draft tokens, lanes of up to 4 rows."""
    engine = create_engine(
        tiny_model, torch_threads=1, batch_wait_ms=20, speculation="ngram", speculative_tokens=4, speculation_max_rows=4
    )
    yield engine
    engine.close()


def copy_prompt(engine, prompt: str = SEED_PROMPT, tokens: int = 40) -> str:
    """A prompt that holds the model's own greedy continuation twice, so that its lookups find what it says next."""
    said = prompt + engine.generate(GenerationRequest(prompt=prompt, max_new_tokens=tokens)).text
    return f"{said}\n\n{said}\n\n{prompt}"


class CountingStep:
    """A DecodeStep that counts its plain and verification passes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.plain = 0
        self.verified = 0

    def __call__(self, lane):
        self.plain += 1
        return self.inner(lane)

    def verify(self, lane, drafts):
        self.verified += 1
        return self.inner.verify(lane, drafts)


def test_propose_takes_what_followed_the_latest_longest_match():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3], tokens=2, ngram_max=3, ngram_min=1) == [7, 8]  # "2 3" twice
    assert propose([5, 1, 2, 6, 1, 2], tokens=3, ngram_max=3, ngram_min=2) == [6, 1, 2]
    assert propose([5, 1, 2, 6, 1, 4], tokens=3, ngram_max=3, ngram_min=2) == []  # "6 1 4", "1 4": never before
    assert propose([5, 1, 2, 6, 1, 4], tokens=3, ngram_max=3, ngram_min=1) == []  # "4": never before
    assert propose([4, 7, 4], tokens=3, ngram_max=3, ngram_min=1) == [7, 4]  # what there is after it
    assert propose([4, 4, 4, 4, 4], tokens=3, ngram_max=2, ngram_min=1) == [4, 4, 4]  # a full draft, not the last
    assert propose([1, 2], tokens=0, ngram_max=3, ngram_min=1) == []


def fake_row(ids: list[int], *, max_new_tokens: int = 100, generated: int = 0) -> SimpleNamespace:
    """What Speculator reads of a Row."""
    return SimpleNamespace(
        prompt_ids=ids,
        decoder=SimpleNamespace(ids=[]),
        generated=generated,
        request=SimpleNamespace(max_new_tokens=max_new_tokens),
        drafting=Drafting(),
    )


def test_drafts_stop_before_the_last_token_and_skip_lanes_they_do_not_fit():
    speculator = Speculator("ngram", tokens=4, ngram_max=3, ngram_min=1, max_rows=1)
    assert speculator.draft(fake_row([3, 4, 5, 6, 7, 3], max_new_tokens=10, generated=7)) == [4, 5]
    assert speculator.draft(fake_row([3, 4, 5, 6, 7, 3], max_new_tokens=10, generated=9)) == []
    lane = SimpleNamespace(rows=[fake_row([3, 4, 3])], cache=None)  # no DynamicCache (a sliding window's): plain
    assert speculator.drafts(lane) is None
    assert Speculator("off", tokens=4, ngram_max=3, ngram_min=1, max_rows=1).drafts(lane) is None


def test_auto_rests_a_row_whose_drafts_keep_missing():
    speculator = Speculator("auto", tokens=4, ngram_max=3, ngram_min=1, max_rows=1)
    row = fake_row([3, 4, 5, 3])
    for _ in range(MISSES_BEFORE_REST):
        draft = speculator.draft(row)
        assert draft == [4, 5, 3]
        speculator.record([row], [draft], [0])
    assert [speculator.draft(row) for _ in range(REST_STEPS)] == [[]] * REST_STEPS
    assert speculator.draft(row) == [4, 5, 3]
    speculator.record([row], [[4, 5, 3]], [2])  # a hit forgives the misses
    speculator.record([row], [[4, 5, 3]], [0])
    assert row.drafting.misses == 1 and row.drafting.rest == 0
    assert (speculator.proposed, speculator.accepted, speculator.passes) == (15, 2, 5)


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_greedy_text_equals_plain_decoding_and_drafts_are_accepted(model, request):
    path = request.getfixturevalue(f"{model}_model")  # the small one is built on first use
    plain = create_engine(path, torch_threads=1)
    spec = create_engine(path, torch_threads=1, speculation="ngram", speculative_tokens=5)
    try:
        request = GenerationRequest(prompt=copy_prompt(plain), max_new_tokens=48)
        expected = plain.generate(request)
        spec.step = counting = CountingStep(spec.step)
        got = spec.generate(request)
    finally:
        plain.close()
        spec.close()
    assert got.text == expected.text and got.completion_tokens == expected.completion_tokens == 48
    stats = spec.queue_stats()
    assert 0 < stats.speculative_accepted_tokens <= stats.speculative_proposed_tokens
    assert counting.verified > 0
    # The prefill's token, one per pass, and every accepted draft token: nothing else.
    assert got.completion_tokens == 1 + counting.plain + counting.verified + stats.speculative_accepted_tokens
    assert len(got.token_times) == got.completion_tokens


CONTROLS = [
    {"repetition_penalty": 1.3},
    {"frequency_penalty": 0.5, "presence_penalty": 0.3},
    {"min_new_tokens": 30, "logit_bias": ((50256, -1.0), (11, 2.0))},
    {"stop": (" dif dif dif",)},
    {"logprobs": 2},
    {"max_new_tokens": 7},
    {"grammar": Grammar("json_object")},
]


@pytest.mark.parametrize("controls", CONTROLS, ids=lambda c: next(iter(c)))
def test_every_control_gives_plain_decodings_text(plain, spec, controls):
    options = {"max_new_tokens": 30, **controls}
    request = GenerationRequest(prompt=copy_prompt(plain), **options)
    expected, got = plain.generate(request), spec.generate(request)
    assert (got.text, got.finish_reason, got.completion_tokens) == (
        expected.text,
        expected.finish_reason,
        expected.completion_tokens,
    )
    assert got.logprobs == expected.logprobs or _close(got.logprobs, expected.logprobs)


def _close(a, b) -> bool:
    """Log-probabilities equal to rounding (a pass of several positions rounds a little differently)."""
    return [t.id for t in a] == [t.id for t in b] and all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a, b))


def test_a_seeded_sampled_row_makes_the_same_draws(plain, spec):
    """Every new token takes one choice from the row's generator, in order, speculating or not: the same seed gives
    the same text, so the distribution is plain decoding's; a cool temperature has its drafts accepted."""
    prompt = copy_prompt(plain)
    before = spec.queue_stats().speculative_accepted_tokens
    for temperature, top_p in ((1.0, 1.0), (0.8, 0.9), (1e-4, 1.0)):  # the tiny model's logits are nearly flat
        request = GenerationRequest(
            prompt=prompt, max_new_tokens=30, do_sample=True, temperature=temperature, top_p=top_p, seed=7
        )
        assert spec.generate(request).text == plain.generate(request).text
    assert spec.queue_stats().speculative_accepted_tokens > before


def test_streamed_pieces_add_up_to_the_text(plain, spec):
    request = GenerationRequest(prompt=copy_prompt(plain), max_new_tokens=40, stream=True)
    items = list(spec.submit(request).pieces())
    result = items[-1]
    assert "".join(item.text for item in items if isinstance(item, Piece)) == result.text
    assert result.text == plain.generate(request).text


def test_rows_of_one_lane_accept_different_counts_and_each_matches_alone(plain, spec):
    prompts = [copy_prompt(plain), "Artificial Intelligence is", copy_prompt(plain, "Once upon a time"), "x"]
    requests = [GenerationRequest(prompt=p, max_new_tokens=24 + 4 * i) for i, p in enumerate(prompts)]
    alone = [plain.generate(request) for request in requests]
    together = run_concurrently(lambda i: spec.generate(requests[i]), len(requests))
    assert [r.text for r in together] == [r.text for r in alone]
    assert any(r.timings["batch_size"] > 1 for r in together)


def test_speculation_counters_reach_the_metrics(make_app):
    app = make_app()
    metrics = app.extensions["llmapi.metrics"]
    metrics.observe_engine(EngineStats(speculative_proposed_tokens=10, speculative_accepted_tokens=6))
    metrics.observe_engine(EngineStats(speculative_proposed_tokens=25, speculative_accepted_tokens=9))
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert sample(text, "llmapi_speculative_proposed_tokens_total") == 25
    assert sample(text, "llmapi_speculative_accepted_tokens_total") == 9


ASK = ASKS[0]
PARAGRAPH = (
    "The old lighthouse stood at the edge of the cliff for more than a hundred years. Every night its keeper climbed "
    "the narrow stairs to light the lamp, and every morning he wrote the weather in a small blue book. Ships passing "
    "the rocks trusted the light, and the village below trusted the keeper."
)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_real_model_rewrites_a_paragraph_with_the_same_text_and_accepted_drafts(real_model, quantization):
    # int4 computes in bf16, where a pass of several positions would round attention otherwise than a plain step
    # (attention.py): two of bench.speculation's four rewrites turned a word before each fed position
    # attended alone.
    engine = create_engine(
        real_model, torch_threads=2, gguf_cache_dir=str(GGUF_CACHE), speculation="off", quantization=quantization,
        speculative_tokens=3,
    )  # fmt: skip
    paragraphs = [PARAGRAPH, *(PARAGRAPHS[1:] if quantization == "int4" else [])]
    try:
        requests = [
            GenerationRequest(
                prompt=engine.render_chat([{"role": "user", "content": f"{ASK}:\n\n{paragraph}"}]),
                max_new_tokens=64,
                min_new_tokens=64,
            )
            for paragraph in paragraphs
        ]
        expected = [engine.generate(request).text for request in requests]
        engine.speculator.mode = "ngram"
        got = [engine.generate(request).text for request in requests]
    finally:
        engine.close()
    assert got == expected
    assert 0 < engine.speculator.accepted <= engine.speculator.proposed
