"""The real model, SmolLM2-135M-Instruct from its GGUF file, behind a real gunicorn: answers that mean something."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import requests

from llmapi.engine import from_gguf as gguf
from tests.conftest import GGUF_CACHE, KEY, Server, launch, run_concurrently
from tests.ops_helpers import error_of

pytestmark = pytest.mark.slow

SERVED = "smollm2"
CAPITAL = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# Distinct prompts of different lengths, so that a batch pads them and rows join a running batch.
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Python is a programming language that",
    "The largest planet in our solar system is",
]
PARAGRAPH = (
    "The city of Paris is the capital and largest city of France. It is located on the river Seine, in the north"
    " of the country. Paris is known for its museums and monuments, such as the Louvre and the Eiffel Tower, and"
    " millions of tourists visit it every year."
)


def real_env(model: str, **env: str) -> dict[str, str]:
    """A server on the real model as `make run` serves it: the worker layout chosen for it, the shared cache."""
    return {"MODEL_NAME": model, "GGUF_CACHE_DIR": str(GGUF_CACHE), "WEB_CONCURRENCY": "0", "GUNICORN_THREADS": "16",
            "SERVED_MODEL_NAME": SERVED, **env}  # fmt: skip


@pytest.fixture(scope="module")
def real_server(real_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One gunicorn on the real model for the module (one worker: the layout auto chooses for 135M parameters)."""
    running = launch(tmp_path_factory.mktemp("real"), **real_env(real_model))
    assert len(running.wait_workers(1)) == 1
    # The first generation loads (and, on a machine where `make real-model` has not run, converts) the model.
    assert running.post("/generate", {"prompt": "Hi", "max_new_tokens": 1}, timeout=600).status_code == 200
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(real_server: Server) -> Iterator[openai.OpenAI]:
    """The official client, pointed at the real model."""
    with openai.OpenAI(base_url=f"{real_server.url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


def chat(client: openai.OpenAI, messages: list[dict[str, str]], **kwargs) -> openai.types.chat.ChatCompletion:
    """A greedy chat completion."""
    return client.chat.completions.create(model=SERVED, messages=messages, temperature=0, **kwargs)


def test_real_chat_answers_the_capital_of_france(client):
    answer = chat(client, CAPITAL, max_tokens=40).choices[0]
    assert "Paris" in answer.message.content, answer.message.content
    assert answer.finish_reason == "stop"  # the model ended its turn with <|im_end|>, which the server stops on
    assert "<|im_end|>" not in answer.message.content and "<|im_start|>" not in answer.message.content


def test_real_generate_continues_the_capital_of_france(real_server):
    reply = real_server.post("/generate", {"prompt": "The capital of France is", "max_new_tokens": 8})
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["generated_text"]


def test_real_streamed_chat_equals_the_unstreamed_one(client):
    # French asks for accents: multi-byte characters that a byte-level tokenizer splits across tokens.
    messages = [{"role": "user", "content": "Write two sentences in French about the Eiffel Tower."}]
    whole = chat(client, messages, max_tokens=60).choices[0].message.content
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in chat(client, messages, max_tokens=60, stream=True)
        if chunk.choices
    ]
    assert "".join(pieces) == whole
    assert "\ufffd" not in whole


def test_real_batched_greedy_equals_solo(start_server, real_model):
    """In fp32 (DTYPE=float32) a row's text does not depend on its company. In bf16 (the default int4 serves
    the file's 4-bit weights with bf16 activations) a padded row's attention sums in another order and may part at
    a near-tie, as transformers' own batched bf16 does (docs/performance.md, 4-bit weights)."""
    # DTYPE too: where bf16 is native, QUANTIZATION=none alone serves bf16.
    fp32 = start_server(**real_env(real_model, QUANTIZATION="none", DTYPE="float32"))

    def greedy(prompt: str) -> str:
        reply = fp32.post("/generate", {"prompt": prompt, "max_new_tokens": 24, "min_new_tokens": 24})
        assert reply.status_code == 200, reply.text
        return reply.json()["generated_text"]

    solo = [greedy(prompt) for prompt in PROMPTS]
    together = run_concurrently(lambda i: greedy(PROMPTS[i]), len(PROMPTS))
    assert together == solo


def test_real_json_schema_answer_parses_and_validates(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    answer = chat(
        client,
        [{"role": "user", "content": "Give the capital of France as JSON with the keys city and country."}],
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    value = json.loads(answer.choices[0].message.content)
    jsonschema.validate(value, schema)


def reference_logprobs(folder: str, text: str) -> tuple[list[int], list[float]]:
    """The prompt's tokens and each one's log-probability given the ones before, from transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(text)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    return ids, logprobs.tolist()


def test_real_prompt_logprobs_equal_transformers_and_give_a_sane_perplexity(real_server, start_server, real_model):
    """fp32 (QUANTIZATION=none, DTYPE=float32) serves the conversion as it is: its scores equal transformers'; the
    default (int4, the file's own 4-bit weights) scores the same text within a small perplexity of it."""
    folder = next(path for path in GGUF_CACHE.glob(f"{Path(real_model).stem}-*-float32") if gguf.is_complete(path))
    ids, expected = reference_logprobs(str(folder), PARAGRAPH)
    # DTYPE too: where bf16 is native, QUANTIZATION=none alone serves bf16.
    fp32 = start_server(**real_env(real_model, QUANTIZATION="none", DTYPE="float32"))
    perplexities = {}
    for name, url in (("none", fp32.url), ("auto", real_server.url)):
        with openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as scorer:
            scored = scorer.completions.create(
                model=SERVED, prompt=PARAGRAPH, max_tokens=0, echo=True, logprobs=1, temperature=0
            ).choices[0]
        served = scored.logprobs.token_logprobs
        assert served[0] is None and scored.text == PARAGRAPH and len(served) == len(ids)
        if name == "none":
            assert max(abs(a - b) for a, b in zip(served[1:], expected, strict=True)) < 2e-3
        perplexities[name] = math.exp(-sum(served[1:]) / len(expected))
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF): perplexity {perplexities} over {len(expected)} tokens")
    assert (
        perplexities["none"] < 30
    )  # random weights give about the vocabulary's size (49,152); English text, far below
    assert abs(perplexities["auto"] - perplexities["none"]) < 0.1 * perplexities["none"]


@pytest.mark.parametrize(
    "damage", ["truncated", "not_gguf"], ids=["truncated to its first MiB", "another file named .gguf"]
)
def test_real_broken_gguf_is_a_503_naming_the_file_and_health_stays_up(start_server, real_model, tmp_path, damage):
    broken = tmp_path / "broken.gguf"
    if damage == "truncated":
        broken.write_bytes(Path(real_model).read_bytes()[: 1 << 20])
        reason = "transformers could not read it"
    else:
        broken.write_bytes(b"PK\x03\x04 a zip file, not a model" * 100)
        reason = "not a GGUF file"
    cache = str(tmp_path / "cache")  # one worker: /ready must ask the one that failed
    server = start_server(**real_env(str(broken), GGUF_CACHE_DIR=cache, WEB_CONCURRENCY="1"))
    reply = server.post("/generate", {"prompt": "Hi", "max_new_tokens": 1}, timeout=120)
    message = error_of(reply.json(), 503)["message"]
    assert str(broken) in message and reason in message, message
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    ready = requests.get(server.url + "/ready", timeout=5)
    assert str(broken) in error_of(ready.json(), 503)["message"]
    assert not any(path.name.endswith("-float32") for path in (tmp_path / "cache").glob("*"))


def test_real_second_start_maps_the_conversion_without_converting(real_server, start_server, real_model):
    before = sorted(path.name for path in GGUF_CACHE.iterdir())
    second = start_server(**real_env(real_model))
    reply = second.post("/generate", {"prompt": "The capital of France is", "max_new_tokens": 4}, timeout=300)
    assert reply.status_code == 200, reply.text
    assert "found the conversion of" in second.log() and "converted " not in second.log()
    assert sorted(path.name for path in GGUF_CACHE.iterdir()) == before


def test_real_conversion_is_a_standard_folder_that_stops_on_every_end_of_turn(real_server, real_model):
    folders = [path for path in GGUF_CACHE.glob(f"{Path(real_model).stem}-*") if gguf.is_complete(path)]
    assert folders, list(GGUF_CACHE.iterdir())
    folder = folders[0]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        path.name for path in folder.iterdir()
    }
    vocabulary = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert {vocabulary["<|im_end|>"], vocabulary["<|endoftext|>"]} <= set(eos)
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
    assert not list(GGUF_CACHE.glob(".*.partial"))
