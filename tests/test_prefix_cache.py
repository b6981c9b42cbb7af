"""Prefix caching and chunked prefill: the same greedy text with them as without, the seed promise, and the queue."""

from __future__ import annotations

import time

import pytest
import torch

from llmapi.engine import GenerationRequest, create_engine
from llmapi.engine.prefix_cache import PrefixCache, block_keys
from tests.conftest import run_concurrently

SYSTEM = " ".join(["You are a careful assistant: answer in one short sentence."] * 6)
LONG = " ".join(["tokens prompts and completions"] * 60)


@pytest.fixture(scope="module")
def cached(sharp_model: str):
    """The sharp model with a prefix cache and no chunking."""
    return create_engine(sharp_model, torch_threads=1, batch_wait_ms=5, dtype="float32", prefix_cache_mb=64)


@pytest.fixture(scope="module")
def chunked(sharp_model: str):
    """The sharp model reading prompts 16 tokens per step, with a prefix cache."""
    return create_engine(
        sharp_model, torch_threads=1, batch_wait_ms=5, dtype="float32", prefix_cache_mb=64, prefill_chunk_tokens=16
    )


def chats(count: int, *, tail: str = "") -> list[GenerationRequest]:
    """Requests sharing the system prompt, each with its own turn."""
    return [
        GenerationRequest(prompt=f"{SYSTEM}{tail} User {i}: tell me about {i}.", max_new_tokens=8) for i in range(count)
    ]


def test_prefix_cache_keys_name_the_whole_prefix():
    same_block = [7] * 16
    assert block_keys([1] * 16 + same_block)[1] != block_keys([2] * 16 + same_block)[1]
    assert block_keys(list(range(40))) == block_keys(list(range(32)))  # only full blocks have keys
    assert len(block_keys(list(range(40)))) == 2


def test_prefix_cache_evicts_least_recently_used_within_its_bytes():
    block = torch.zeros((2, 2, 1, 16, 4))  # 1 KiB of float32
    cache = PrefixCache(3 / 1024)  # three blocks
    first, second = list(range(32)), list(range(100, 132))
    cache.store(first, torch.cat([block, block], dim=3))
    cache.store(second, torch.cat([block, block], dim=3))
    assert cache.stats().bytes <= cache.capacity_bytes
    assert cache.lookup([*second, 0])[0] == 32  # the newest chain is whole
    assert cache.lookup([*first, 0])[0] == 16  # the oldest lost its tail first, its head still serves
    assert cache.known(first) == 16


def test_prefix_cache_greedy_text_matches_without_it(sharp, cached):
    shared = chats(4) + chats(2, tail=" Be kind.")  # the second group diverges in the middle of a block
    alone = [sharp.generate(r).text for r in shared]
    cold = [cached.generate(r) for r in shared]
    warm = run_concurrently(lambda i: cached.generate(shared[i]), len(shared))
    assert [r.text for r in cold] == alone
    assert [r.text for r in warm] == alone
    ids = [cached.encode(r.prompt) for r in shared]
    for i in range(1, len(shared)):  # the full blocks of the longest prefix shared with an earlier prompt
        common = max(shared_length(ids[i], ids[j]) for j in range(i))
        assert cold[i].cached_tokens == common // 16 * 16 > 0
    assert cold[0].cached_tokens == 0


def shared_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two prompts share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_prefix_cache_fully_cached_prompt_recomputes_its_last_token(sharp, cached):
    prompt_ids = cached.encode(SYSTEM)
    request = GenerationRequest(prompt=SYSTEM, max_new_tokens=6)
    cached.generate(request)
    again = cached.generate(request)
    assert again.text == sharp.generate(request).text
    assert again.cached_tokens == (len(prompt_ids) - 1) // 16 * 16


def test_prefix_cache_under_eviction_pressure_keeps_text_and_bounds(sharp, sharp_model):
    small = create_engine(
        sharp_model, torch_threads=1, batch_wait_ms=5, dtype="float32", prefix_cache_mb=0.05
    )  # a few blocks
    try:
        requests = [GenerationRequest(prompt=f"{i} {SYSTEM} {i}", max_new_tokens=5) for i in range(6)] + chats(3)
        for request in requests:
            assert small.generate(request).text == sharp.generate(request).text
            stats = small.queue_stats()
            assert 0 < stats.prefix_cache_bytes <= stats.prefix_cache_capacity_bytes
        assert small.prefix_cache.stats().evicted_blocks > 0
    finally:
        small.close()


def test_prefix_cache_rows_joining_a_running_batch_match_alone(sharp, cached):
    joiners = chats(3, tail=" Join.")
    alone = [sharp.generate(r).text for r in joiners]
    cached.generate(joiners[0])  # the prefix is cached now
    runner = cached.submit(GenerationRequest(prompt="Hello", max_new_tokens=900, stream=True))
    pieces = runner.pieces()
    next(pieces)
    joined = [h.result() for h in [cached.submit(r) for r in joiners]]
    runner.cancel()
    list(pieces)
    assert [r.text for r in joined] == alone
    assert all(r.cached_tokens > 0 and r.timings["batch_size"] > 1 for r in joined)


def test_prefix_cache_keeps_the_seed_promise(cached):
    seeded = GenerationRequest(prompt=SYSTEM + " Once", max_new_tokens=10, do_sample=True, temperature=0.9, seed=7)
    first = cached.generate(seeded)
    cached.generate(GenerationRequest(prompt=SYSTEM + " Once more", max_new_tokens=2))  # warm the shared prefix
    under_load = run_concurrently(lambda i: cached.generate(seeded if i == 0 else chats(4)[i]), 4)[0]
    assert under_load.text == first.text
    assert under_load.cached_tokens == 0  # a seeded row never starts from another request's arithmetic


def test_prefix_cache_off_caches_nothing(engine):
    engine.generate(GenerationRequest(prompt=SYSTEM, max_new_tokens=2))
    result = engine.generate(GenerationRequest(prompt=SYSTEM, max_new_tokens=2))
    assert result.cached_tokens == 0 and engine.queue_stats().prefix_cache_bytes == 0


def test_chunked_prefill_matches_one_pass(sharp, chunked):
    requests = [GenerationRequest(prompt=LONG, max_new_tokens=8), *chats(2, tail=" " + LONG[:200])]
    alone = [sharp.generate(r).text for r in requests]
    assert [chunked.generate(r).text for r in requests] == alone  # chunked, the first time
    assert [r.text for r in run_concurrently(lambda i: chunked.generate(requests[i]), 3)] == alone  # and cached


def test_chunked_prefill_interleaves_decode_steps(chunked):
    fresh = " ".join(["words that nobody sent before"] * 60)  # nothing of it is cached
    long_ids = len(chunked.encode(fresh))
    runner_sent = time.monotonic()
    runner = chunked.submit(GenerationRequest(prompt="Hello", max_new_tokens=900, stream=True))
    pieces = runner.pieces()
    next(pieces)
    long_sent = time.monotonic()
    long = chunked.generate(GenerationRequest(prompt=fresh, max_new_tokens=2))
    runner.cancel()
    ended = list(pieces)[-1]
    first_long = long_sent + long.timings["first_token_s"]
    during = [t for t in ended.token_times if long_sent < runner_sent + t < first_long]
    assert len(during) >= long_ids // 16 - 2  # the running row kept decoding, a step per chunk


def test_chunked_prefill_stops_between_chunks_on_deadline_and_cancel(chunked):
    prompt = " ".join(["a long prompt that takes many chunks"] * 60)  # about 780 tokens: 49 chunks
    timed = chunked.generate(GenerationRequest(prompt=prompt + " timed", max_new_tokens=4, timeout_s=0.01))
    assert timed.finish_reason == "timeout" and timed.completion_tokens == 0
    handle = chunked.submit(GenerationRequest(prompt=prompt + " cancelled", max_new_tokens=4))
    handle.cancel()
    assert handle.result().finish_reason == "cancelled"
    assert chunked.generate(GenerationRequest(prompt="Hello", max_new_tokens=3)).completion_tokens == 3


def test_engine_stats_count_the_queue_and_the_cache(cached):
    seen = []
    cached.on_stats = seen.append
    try:
        cached.generate(chats(1, tail=" Stats.")[0])
        cached.generate(chats(1, tail=" Stats.")[0])
        deadline = time.monotonic() + 5
        while seen[-1].decoding and time.monotonic() < deadline:  # the step after the last row left publishes it
            time.sleep(0.01)
    finally:
        cached.on_stats = None
    assert any(s.decoding == 1 for s in seen)
    assert seen[-1].decoding == 0 and seen[-1].waiting == 0
    assert seen[-1].prefix_hit_tokens > 0 and seen[-1].prefix_cache_bytes > 0


def test_prompt_scoring_rows_bypass_the_cache_and_score_in_chunks_as_without_them(sharp, chunked):
    """A row that scores its prompt (echo + logprobs) reads it all, in chunks: the same logprobs with the cache warm."""
    warm = [chunked.submit(request) for request in chats(2, tail=" " + LONG)]
    for handle in warm:
        handle.result()
    scoring = GenerationRequest(prompt=f"{SYSTEM} {LONG} User 0: tell me about 0.", max_new_tokens=2, prompt_logprobs=1)
    plain, cached = sharp.generate(scoring), chunked.generate(scoring)
    assert cached.cached_tokens == 0 and cached.text == plain.text
    assert len(cached.prompt_logprobs) == cached.prompt_tokens > 16 * 3
    assert [entry.logprob for entry in cached.prompt_logprobs[1:]] == pytest.approx(
        [entry.logprob for entry in plain.prompt_logprobs[1:]], abs=1e-4
    )
    assert cached.prompt_logprobs[0].logprob is None


def test_prefix_cache_keeps_greedy_text_in_bfloat16(sharp_model):
    """The cache stores and rebuilds KV in the model's own dtype: bf16 text with it equals bf16 text without it."""
    plain = create_engine(sharp_model, torch_threads=1, batch_wait_ms=5, dtype="bfloat16")
    cached = create_engine(sharp_model, torch_threads=1, batch_wait_ms=5, dtype="bfloat16", prefix_cache_mb=64)
    try:
        requests = chats(3)
        expected = [plain.generate(request).text for request in requests]
        first = cached.generate(requests[0])
        rest = [cached.generate(request) for request in requests[1:]]
        assert [first.text, *(result.text for result in rest)] == expected
        assert all(result.cached_tokens > 0 for result in rest)
    finally:
        plain.close()
        cached.close()
