"""Continuous batching on the real tiny model: joins, early leaves, seeded lanes, timings, shutdown."""

from __future__ import annotations

import pytest

from llmapi.engine import GenerationRequest, create_engine
from llmapi.engine.types import GenerationResult, Piece
from tests.conftest import run_concurrently

PROMPT = "Artificial Intelligence is"
LONG_PROMPT = " ".join(["tokens prompts and completions"] * 40)


def start_long_stream(engine, prompt: str = "Hello"):
    """Submit a long streamed greedy request and wait for its first piece, so that it is decoding."""
    handle = engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=900, stream=True))
    pieces = handle.pieces()
    first = next(pieces)
    assert isinstance(first, Piece)
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


def same_or_parted_at_a_tie(alone: GenerationResult, together: GenerationResult) -> bool:
    """The same tokens, or the same up to a position where alone's two likeliest tokens were tied (to 1e-4 in log
    probability) and each run took one of them: there a row's company may tip the choice by a rounding."""
    a, b = [t.id for t in alone.logprobs], [t.id for t in together.logprobs]
    if a == b:
        return True
    k = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    first, second = alone.logprobs[k].top[:2]
    return abs(first.logprob - second.logprob) < 1e-4 and {a[k], b[k]} == {first.id, second.id}


def test_batch_a_far_longer_row_decodes_in_a_lane_apart_and_matches_alone(sharp):
    """A prompt of ~900 tokens among short streams would pad each of them to its length: it gets a lane of its own
    (one row in its forward passes), a short newcomer still joins the streams, and every text matches alone (or
    parts from it only where two tokens were tied: the sharp model's 300-token streams met one on an AVX-512 CPU)."""
    streams = [
        GenerationRequest(prompt=f"Stream {i}", max_new_tokens=300, min_new_tokens=300, stream=True, logprobs=2)
        for i in range(3)
    ]
    long = GenerationRequest(
        prompt=" ".join(["tokens prompts and completions"] * 170), max_new_tokens=12, stream=True, logprobs=2
    )
    short = GenerationRequest(prompt=PROMPT, max_new_tokens=8, min_new_tokens=8, logprobs=2)
    alone = [sharp.generate(request) for request in [*streams, long, short]]
    assert len(sharp.prompt_ids(long)) > 800
    handles = [sharp.submit(request) for request in streams]
    for handle in handles:  # every stream decoding before the long prompt arrives
        assert isinstance(next(handle.pieces()), Piece)
    late = [sharp.submit(long)]
    assert isinstance(next(late[0].pieces()), Piece)  # decoding (its own prefill: not batched with the next one)
    late.append(sharp.submit(short))
    results = [handle.result() for handle in [*handles, *late]]
    assert all(same_or_parted_at_a_tie(a, r) for a, r in zip(alone, results, strict=True))
    assert [r.text for r in results[3:]] == [r.text for r in alone[3:]]  # the long row and the newcomer: no tie
    assert results[3].timings["batch_size"] == 1.0  # the long row: alone in its lane
    assert results[4].timings["batch_size"] > 1.0  # the short one: merged into the streams' lane


def test_lanes_are_kept_apart_only_when_merging_would_double_the_cells_read():
    import torch

    from llmapi.engine.lane import MIN_PADDING_CELLS, Lane, apart, padding_cells

    class Row:
        solo = False

    def lane(rows: int, width: int) -> Lane:
        mask = torch.ones((rows, width), dtype=torch.long)
        return Lane([Row() for _ in range(rows)], None, mask, mask[:, -1:], padded=False)

    assert padding_cells(lane(6, 70), lane(1, 900)) == 7 * 900 - 6 * 70 - 900
    assert apart(lane(6, 70), lane(1, 900))  # streams and a long prompt
    assert not apart(lane(8, 620), lane(1, 640))  # chat turns behind one system prompt
    assert not apart(lane(1, 10), lane(1, 40))  # far more than double, but a few cells: one pass is cheaper
    width = (MIN_PADDING_CELLS + 40) // 4  # 4 rows of 10 and one of `width` add 4 x width - 40 cells
    assert not apart(lane(4, 10), lane(1, width - 1)) and apart(lane(4, 10), lane(1, width))


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


def test_engine_close_fails_waiting_requests_and_refuses_new_ones(tiny_model):
    from llmapi.engine import EngineError

    engine = create_engine(tiny_model, torch_threads=1)
    handle = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=900, stream=True))
    pieces = handle.pieces()
    next(pieces)
    engine.close()
    with pytest.raises(EngineError, match="shut down"):
        list(pieces)
    with pytest.raises(EngineError, match="shut down"):
        engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=2))
