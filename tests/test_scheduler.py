"""Scheduling by tokens, fairly: admission within MAX_PREFILL_TOKENS, requests taking turns, a step's prefill budget,
and prompts scored chunk by chunk as they would be in one pass."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmapi.engine import GenerationRequest, create_engine
from llmapi.engine.config import EngineConfig
from llmapi.engine.handle import Handle
from llmapi.engine.logprobs import PromptScorer
from llmapi.engine.prefix_cache import PrefixCache
from llmapi.engine.scheduler import Scheduler
from llmapi.engine.sequence import Row
from llmapi.engine.text import IncrementalDecoder

LONG = " ".join(["tokens prompts and completions"] * 40)  # about 160 tokens


def scheduler(**options) -> Scheduler:
    """A scheduler without a model: no prefix cache, no batch wait, prompts read 64 tokens per step."""
    config = EngineConfig(model_name="none", **{"batch_wait_ms": 0, "prefill_chunk_tokens": 64, **options})
    return Scheduler(config, PrefixCache(0), model_name="none", pad_id=0, device="cpu")


def row(tokens: int, group: int, submitted: float, **request) -> Row:
    """A row of `tokens` prompt tokens, one choice of request `group`."""
    handle = Handle(GenerationRequest(prompt="", max_new_tokens=4, group=group, **request))
    return Row(handle, list(range(1, tokens + 1)), IncrementalDecoder(lambda ids: ""), submitted)


def test_admission_takes_rows_by_prompt_tokens_one_request_at_a_time():
    """A request of four long prompts gets one in, then the later short request's, then its second: the budget
    (1,000 tokens) is then spent, and the rest wait."""
    plan = scheduler(max_prefill_tokens=1000)
    heavy = [row(600, group=1, submitted=i) for i in range(4)]
    light = row(10, group=2, submitted=10)
    for each in [*heavy, light]:
        plan.add(each)
    (taken,) = plan.admit()
    assert taken == [heavy[0], light, heavy[1]]
    assert list(plan.waiting) == heavy[2:] and plan.waiting_tokens == 1200
    plan.start_prefill(taken)
    assert plan.admit() == []  # 1,210 tokens admitted and unread: over the budget
    assert plan.prefill_tokens() == 1200 + 1210


def test_admission_always_takes_one_prompt_however_long():
    plan = scheduler(max_prefill_tokens=100)
    huge = row(900, group=1, submitted=0)
    plan.add(huge)
    assert plan.admit() == [[huge]]


def test_step_prefill_budget_lets_requests_take_turns():
    """While a row decodes, a step reads at most a chunk (64 tokens) of prompts: the long jobs of one request
    alternate with another's, a short newcomer gets the next step, and leftovers of the budget go to what fits."""
    plan = scheduler(max_prefill_tokens=10_000)
    first = [row(200, group=1, submitted=i) for i in range(2)]
    second = row(200, group=2, submitted=5)
    plan.start_prefill([*first, second])
    plan.lanes = [SimpleNamespace(rows=["decoding"])]
    served = []
    for _ in range(3):
        (job,) = plan.prefills_due()
        served.append(job.rows[0])
        job.offset += job.chunk  # as if read
    assert served == [first[0], second, first[0]]  # request 1 (older), request 2, then request 1 again
    short = row(10, group=3, submitted=20)
    plan.start_prefill([short])
    due = plan.prefills_due()
    assert [job.rows[0] for job in due] == [short]  # never served: first; a 64-token chunk no longer fits
    assert sum(job.next_cost() for job in due) <= 64


def test_short_prompts_are_packed_in_jobs_of_one_chunk_and_scoring_rows_alone():
    plan = scheduler()
    shorts = [row(20, group=1, submitted=i) for i in range(5)]
    scoring = row(30, group=2, submitted=9, prompt_logprobs=1)
    plan.start_prefill([*shorts, scoring])
    sizes = sorted((len(job.rows), job.all_logits) for job in plan.prefilling)
    assert sizes == [(1, True), (2, False), (3, False)]  # 3 x 20 <= 64 < 4 x 20
    assert all(job.next_cost() <= 64 for job in plan.prefilling)


def test_nothing_decoding_every_job_reads():
    plan = scheduler()
    plan.start_prefill([row(200, group=g, submitted=g) for g in range(3)])
    assert len(plan.prefills_due()) == 3


@pytest.mark.parametrize("cuts", [[1], [3, 7], [5, 5, 5, 5], [2, 11, 1], [19]])
def test_prompt_scorer_fed_in_pieces_scores_as_in_one(cuts):
    torch.manual_seed(0)
    logits = torch.randn(21, 50)
    prompt = torch.randint(0, 50, (21,)).tolist()
    texts = SimpleNamespace(entry=lambda i, lp, top=(): (i, lp, tuple(top)))
    whole = PromptScorer(prompt, 2, texts)
    whole.feed(logits)
    pieces = PromptScorer(prompt, 2, texts)
    start = 0
    for cut in [*cuts, len(prompt)]:
        pieces.feed(logits[start : min(start + cut, len(prompt))])
        start = min(start + cut, len(prompt))
    assert pieces.result() == whole.result()
    assert len(whole.result()) == len(prompt) and whole.result()[0][1] is None
    expected = torch.log_softmax(logits, -1)
    assert whole.result()[5][1] == pytest.approx(float(expected[4, prompt[5]]), abs=1e-5)


@pytest.fixture(scope="module")
def unchunked(sharp_model: str):
    """The sharp model reading every prompt at once."""
    engine = create_engine(sharp_model, torch_threads=1, batch_wait_ms=5, dtype="float32")
    yield engine
    engine.close()


@pytest.mark.parametrize("chunk", [1, 7, 16, 33, 64])
def test_chunked_prompt_scoring_equals_one_pass(sharp_model, unchunked, chunk):
    """A prompt scored in chunks (odd sizes that split it anywhere), with the prefix cache on and warm with its
    head, gets the log-probabilities and the top tokens of a one-pass prefill, and then the same text."""
    engine = create_engine(
        sharp_model,
        torch_threads=1,
        batch_wait_ms=5,
        dtype="float32",
        prefix_cache_mb=16,
        prefill_chunk_tokens=chunk,
    )
    try:
        engine.generate(GenerationRequest(prompt=LONG + " warm the cache", max_new_tokens=2))
        scoring = GenerationRequest(prompt=LONG + " and then some.", max_new_tokens=3, prompt_logprobs=3)
        chunked, plain = engine.generate(scoring), unchunked.generate(scoring)
    finally:
        engine.close()
    assert len(chunked.prompt_logprobs) == chunked.prompt_tokens > 100
    assert chunked.prompt_logprobs[0].logprob is None and chunked.text == plain.text
    for mine, theirs in zip(chunked.prompt_logprobs[1:], plain.prompt_logprobs[1:]):
        assert mine.id == theirs.id and mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t.id for t in mine.top] == [t.id for t in theirs.top]
