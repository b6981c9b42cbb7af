"""Log-probabilities from the batching engine: the model's raw log-softmax, for the rows that ask, in any batch."""

from __future__ import annotations

import pytest
import torch

from llmapi.engine import GenerationRequest
from llmapi.engine.types import GenerationResult, Piece, TokenLogprob
from llmapi.http.openai.formats import ChatFormat, CompletionFormat
from tests.conftest import run_concurrently

PROMPT = "Artificial Intelligence is"
TOLERANCE = 1e-4


def log_softmax(engine, ids: list[int]) -> torch.Tensor:
    """transformers' own forward pass over `ids`: [len(ids), vocab] log-probabilities, float32."""
    with torch.inference_mode():
        logits = engine.loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(dim=-1)


def test_logprobs_greedy_token_is_the_max_of_transformers_log_softmax(sharp):
    result = sharp.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=8, logprobs=3))
    prompt = sharp.encode(PROMPT)
    generated = [entry.id for entry in result.logprobs]
    assert len(generated) == result.completion_tokens == 8
    expected = log_softmax(sharp, prompt + generated)[len(prompt) - 1 : -1]
    for entry, row in zip(result.logprobs, expected):
        assert entry.id == int(row.argmax())
        assert entry.logprob == pytest.approx(float(row.max()), abs=TOLERANCE)
        values, ids = row.topk(3)
        assert [alt.id for alt in entry.top] == ids.tolist()
        assert [alt.logprob for alt in entry.top] == pytest.approx(values.tolist(), abs=TOLERANCE)
        assert entry.text == sharp.decode([entry.id]) and entry.raw == entry.text.encode()


def test_logprobs_come_before_temperature(sharp):
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=6, do_sample=True, temperature=0.3, seed=5, logprobs=0)
    result = sharp.generate(request)
    prompt = sharp.encode(PROMPT)
    ids = [entry.id for entry in result.logprobs]
    expected = log_softmax(sharp, prompt + ids)[len(prompt) - 1 : -1]
    for entry, row in zip(result.logprobs, expected):
        assert entry.logprob == pytest.approx(float(row[entry.id]), abs=TOLERANCE)
        assert entry.top == ()


def test_logprobs_prompt_scoring_in_a_batch_with_other_rows(sharp):
    """Rows that score their prompt (each prefilled alone) share a lane with rows that do not; all get what they
    asked, and the score-only row leaves after its prefill."""
    prompts = [PROMPT, "The quick brown fox jumps", "Hello"]
    requests = [
        GenerationRequest(prompt=prompts[0], max_new_tokens=0, prompt_logprobs=1, logprobs=1),
        GenerationRequest(prompt=prompts[1], max_new_tokens=3, prompt_logprobs=0),
        GenerationRequest(prompt=prompts[2], max_new_tokens=4),
    ]
    scored, generated, plain = run_concurrently(lambda i: sharp.generate(requests[i]), 3)
    assert scored.text == "" and scored.completion_tokens == 0 and scored.logprobs == ()
    for result, prompt in ((scored, prompts[0]), (generated, prompts[1])):
        ids = sharp.encode(prompt)
        expected = log_softmax(sharp, ids)
        assert [entry.id for entry in result.prompt_logprobs] == ids
        assert result.prompt_logprobs[0].logprob is None
        for j in range(1, len(ids)):
            assert result.prompt_logprobs[j].logprob == pytest.approx(float(expected[j - 1, ids[j]]), abs=TOLERANCE)
    assert len(scored.prompt_logprobs[1].top) == 1 and generated.prompt_logprobs[1].top == ()
    assert generated.completion_tokens == 3 and generated.logprobs is None
    assert plain.prompt_logprobs is None and plain.logprobs is None and plain.completion_tokens == 4


def test_logprobs_token_id_prompt_scores_like_its_text(sharp):
    ids = tuple(sharp.encode(PROMPT))
    by_text = sharp.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=3, prompt_logprobs=0, logprobs=0))
    by_ids = sharp.generate(
        GenerationRequest(prompt="", prompt_ids=ids, max_new_tokens=3, prompt_logprobs=0, logprobs=0)
    )
    assert by_ids.prompt_text == PROMPT and by_text.prompt_text is None
    assert by_ids.prompt_logprobs == by_text.prompt_logprobs and by_ids.text == by_text.text


def test_logprobs_stream_with_their_pieces(sharp):
    handle = sharp.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=10, logprobs=2, stream=True))
    pieces = list(handle.pieces())
    result = pieces.pop()
    assert all(isinstance(piece, Piece) for piece in pieces)
    assert tuple(entry for piece in pieces for entry in piece.logprobs) == result.logprobs
    assert "".join(piece.text for piece in pieces) == result.text


def entry(text: str, logprob: float | None, top: tuple[TokenLogprob, ...] = ()) -> TokenLogprob:
    return TokenLogprob(id=0, text=text, raw=text.encode(), logprob=logprob, top=top)


def result_with(logprobs: tuple[TokenLogprob, ...], prompt_logprobs: tuple[TokenLogprob, ...] | None = None):
    text = "".join(e.text for e in logprobs)
    return GenerationResult(text, "length", 2, len(logprobs), "m", logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def test_logprobs_completion_shape_is_openai_legacy_with_echo():
    prompt = (entry("Hi", None), entry(" there", -1.5, (entry(" you", -0.5),)))
    generated = (entry("!", -0.25, (entry("!", -0.25), entry(".", -2.0))),)
    fmt = CompletionFormat("m", ["Hi there"], n=1, echo=True, logprobs=2)
    choice = fmt.body([result_with(generated, prompt)])["choices"][0]
    assert choice["text"] == "Hi there!"
    assert choice["logprobs"] == {
        "tokens": ["Hi", " there", "!"],
        "token_logprobs": [None, -1.5, -0.25],
        "top_logprobs": [None, {" you": -0.5, " there": -1.5}, {"!": -0.25, ".": -2.0}],
        "text_offset": [0, 2, 8],
    }


def test_logprobs_chat_shape_is_openai_content_list():
    generated = (entry("é", -0.5, (entry("é", -0.5),)),)
    body = ChatFormat("m", n=1, logprobs=True).body([result_with(generated)])
    raw = list("é".encode())
    assert body["choices"][0]["logprobs"] == {
        "content": [
            {
                "token": "é",
                "logprob": -0.5,
                "bytes": raw,
                "top_logprobs": [{"token": "é", "logprob": -0.5, "bytes": raw}],
            }
        ]
    }
    assert ChatFormat("m", n=1).body([result_with(generated)])["choices"][0]["logprobs"] is None
