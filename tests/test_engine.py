"""The engine on the real offline tiny model through transformers."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from llmapi.engine import ContextLengthExceeded, GenerationRequest, create_engine

PROMPT = "Artificial Intelligence is"


def hf_generate(engine, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy continuation ids from transformers' own generate."""
    tokenizer, model = engine.loaded.tokenizer, engine.loaded.model
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=engine.loaded.pad_id
        )
    return out[0, inputs.input_ids.shape[1] :].tolist()


def test_engine_greedy_matches_transformers_generate(engine):
    result = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=12))
    expected = hf_generate(engine, PROMPT, 12)
    assert result.text == engine.decode(expected)
    assert result.completion_tokens == len(expected) == 12
    assert result.finish_reason == "length"


def test_engine_counts_prompt_tokens_with_the_tokenizer(engine):
    result = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=3))
    assert result.prompt_tokens == len(engine.loaded.tokenizer(PROMPT).input_ids)
    assert result.total_tokens == result.prompt_tokens + 3


@pytest.mark.parametrize("max_new_tokens", [1, 7, 33])
def test_engine_generates_exactly_max_new_tokens(engine, max_new_tokens):
    result = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=max_new_tokens))
    assert result.completion_tokens == max_new_tokens


def test_engine_refuses_more_than_the_context(engine):
    with pytest.raises(ContextLengthExceeded) as info:
        engine.submit(GenerationRequest(prompt="hello " * 1000, max_new_tokens=100))
    assert info.value.context_length == 1024


@pytest.fixture(scope="module")
def eos_engine(tiny_model, tmp_path_factory):
    """The tiny model with its EOS id set to the token greedy decoding produces first, so it ends at once."""
    probe = create_engine(tiny_model, torch_threads=1)
    first = hf_generate(probe, PROMPT, 1)[0]
    path = Path(tmp_path_factory.mktemp("eos-model"))
    shutil.copytree(tiny_model, path, dirs_exist_ok=True)
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = first
    (path / "generation_config.json").write_text(json.dumps(config))
    return create_engine(str(path), torch_threads=1)


def test_engine_stops_at_eos(eos_engine):
    result = eos_engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=20))
    if result.finish_reason != "eos":
        pytest.fail(f"expected eos, got {result}")
    assert result.completion_tokens == 1  # the EOS token counts: it was generated
    assert result.text == ""  # but it is not text


def test_engine_min_new_tokens_suppresses_eos(eos_engine):
    result = eos_engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=6, min_new_tokens=6))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 6


def test_engine_stop_sequence_cuts_the_text(engine):
    full = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=20)).text
    stop = full[5:9]
    result = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=20, stop=(stop,)))
    assert result.finish_reason == "stop"
    assert result.stop_sequence == stop
    assert result.text == full[: full.index(stop)]
    assert result.completion_tokens < 20


def test_engine_stop_sequence_spanning_tokens(engine):
    request = GenerationRequest(prompt="Hello", max_new_tokens=16, do_sample=True, seed=3)
    full = engine.generate(request)
    ids = engine.loaded.tokenizer.encode(full.text)
    first = engine.decode(ids[:1])
    stop = full.text[len(first) - 1 : len(first) + 2]  # last char of token 1 + first chars of token 2
    cut = engine.generate(GenerationRequest(prompt="Hello", max_new_tokens=16, do_sample=True, seed=3, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_engine_seed_reproduces_sampling(engine):
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.95, seed=42)
    first, second = engine.generate(request), engine.generate(request)
    assert first.text == second.text
    assert first.seed == 42
    other = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=16, do_sample=True, seed=43))
    assert other.text != first.text


def test_engine_returns_the_seed_it_drew(engine):
    request = GenerationRequest(prompt=PROMPT, max_new_tokens=10, do_sample=True)
    first = engine.generate(request)
    again = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=10, do_sample=True, seed=first.seed))
    assert first.seed is not None and again.text == first.text


def test_engine_stream_pieces_add_up_to_the_text(engine):
    handle = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=20, do_sample=True, seed=1, stream=True))
    items = list(handle.pieces())
    result = items[-1]
    assert "".join(item.text for item in items[:-1]) == result.text
    assert len(items) > 2


def test_engine_stream_never_sends_a_stop_sequence(engine):
    full = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=20, do_sample=True, seed=9)).text
    stop = full[6:10]
    handle = engine.submit(
        GenerationRequest(prompt=PROMPT, max_new_tokens=20, do_sample=True, seed=9, stop=(stop,), stream=True)
    )
    items = list(handle.pieces())
    streamed = "".join(item.text for item in items[:-1])
    assert streamed == items[-1].text == full[: full.index(stop)]


def test_engine_batched_greedy_equals_single(engine):
    prompts = ["Hello", "The quick brown fox jumps over the", "a b c d e f g", PROMPT, "Python is", "x"]
    singles = [engine.generate(GenerationRequest(prompt=p, max_new_tokens=10)).text for p in prompts]
    handles = [engine.submit(GenerationRequest(prompt=p, max_new_tokens=10)) for p in prompts]
    results = [h.result() for h in handles]
    assert [r.text for r in results] == singles
    assert max(r.timings["batch_size"] for r in results) > 1


def test_engine_rows_keep_their_own_parameters(engine):
    specs = [
        GenerationRequest(prompt="Hello", max_new_tokens=3),
        GenerationRequest(prompt="Hello", max_new_tokens=12, do_sample=True, seed=5, temperature=0.7),
        GenerationRequest(prompt="Hello", max_new_tokens=8, repetition_penalty=1.5),
    ]
    alone = [engine.generate(s) for s in specs]
    together = [h.result() for h in [engine.submit(s) for s in specs]]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.completion_tokens for r in together] == [3, 12, 8]


def test_engine_timeout_returns_text_so_far(engine):
    result = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=1000 - 10, timeout_s=0.05))
    assert result.finish_reason == "timeout"
    assert 0 <= result.completion_tokens < 990


def test_engine_cancel_stops_generation_early(engine):
    handle = engine.submit(GenerationRequest(prompt=PROMPT, max_new_tokens=1000 - 10, stream=True))
    pieces = handle.pieces()
    next(pieces)
    handle.cancel()
    result = [item for item in pieces][-1]
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < 990


def test_engine_timings_are_reported(engine):
    start = time.monotonic()
    result = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=4))
    assert 0 <= result.timings["queue_s"] <= result.timings["first_token_s"] <= result.timings["total_s"]
    assert result.timings["total_s"] <= time.monotonic() - start


@pytest.mark.parametrize("temperature", [1e-300, 1e-9, 1e-6])
def test_engine_tiny_temperature_is_greedy_not_nan(engine, temperature):
    sampled = engine.generate(
        GenerationRequest(prompt=PROMPT, max_new_tokens=8, do_sample=True, temperature=temperature)
    )
    greedy = engine.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=8))
    assert sampled.finish_reason == "length"
    assert sampled.text == greedy.text
