"""The baseline engine (ENGINE_MODE=simple): the same greedy text as the batching engine, seeds, stops, streams."""

from __future__ import annotations

import pytest

from llmapi.engine import GenerationRequest, create_engine

PROMPT = "Artificial Intelligence is"
LONG_PROMPT = " ".join(["tokens prompts and completions"] * 40)


@pytest.fixture(scope="module")
def simple_engine(sharp):
    """The baseline engine (ENGINE_MODE=simple) on the same model as `sharp`."""
    return create_engine(sharp.model_name, torch_threads=1, engine_mode="simple", dtype="float32")


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
    assert len(items) == 2 and items[0].text == items[1].text


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"logprobs": 0}, "logprobs"),
        ({"prompt_logprobs": 1}, "logprobs"),
        ({"max_new_tokens": 0}, "max_tokens"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1.0}, "presence_penalty"),
        ({"logit_bias": ((1, 2.0),)}, "logit_bias"),
        ({"min_p": 0.1}, "min_p"),
    ],
)
def test_simple_mode_refuses_what_only_the_batch_engine_does(simple_engine, options, param):
    from llmapi.engine.types import InvalidRequest

    with pytest.raises(InvalidRequest) as info:
        simple_engine.submit(GenerationRequest(**{"prompt": PROMPT, "max_new_tokens": 4, **options}))
    assert info.value.param == param
