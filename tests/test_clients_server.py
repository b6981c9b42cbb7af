"""What real clients ask of a real gunicorn: logprobs and prompt scoring, structured output, penalties, tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from pydantic import BaseModel, Field

from tests.conftest import KEY, Server

pytestmark = pytest.mark.slow

SERVED = "tiny-gpt2"
PROMPT = "Artificial Intelligence is"
MESSAGES = [{"role": "user", "content": "Describe a pet."}]
SERVER_ENV = {"SERVED_MODEL_NAME": SERVED, "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "4"}
AUTH = {"x-api-key": KEY}


class Pet(BaseModel):
    """Only enums, bounded integers and booleans: even the tiny model's greedy walk ends soon."""

    kind: Literal["cat", "dog", "bird"]
    legs: int = Field(ge=0, le=8)
    indoor: bool
    toys: list[Literal["ball", "rope"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def test_client_reads_completion_logprobs(client):
    choice = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == choice.text
    for value, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert value == max(top.values()) and len(top) <= 3  # greedy: the chosen is the most likely
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(4)]


def test_client_scores_a_prompt_with_echo_and_max_tokens_0(client, tokenizer):
    choice = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0
    ).choices[0]
    ids = tokenizer(PROMPT).input_ids
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(value < 0 for value in choice.logprobs.token_logprobs[1:])


def test_client_streams_completion_logprobs(client):
    stream = client.completions.create(
        model=SERVED, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0, stream=True
    )
    tokens = [
        token for chunk in stream for choice in chunk.choices if choice.logprobs for token in choice.logprobs.tokens
    ]
    whole = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0)
    assert tokens == whole.choices[0].logprobs.tokens


def test_client_reads_chat_logprobs_in_a_body_and_a_stream(client):
    options = {"model": SERVED, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True}
    content = client.chat.completions.create(**options, top_logprobs=3).choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob == entry.top_logprobs[0].logprob for entry in content)
    assert all(bytes(entry.bytes).decode() == entry.token for entry in content)
    streamed = [
        entry.token
        for chunk in client.chat.completions.create(**options, stream=True)
        for choice in chunk.choices
        if choice.logprobs
        for entry in choice.logprobs.content
    ]
    assert streamed == [entry.token for entry in content]


def test_client_parses_a_json_schema_answer_into_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model=SERVED, messages=MESSAGES, response_format=Pet, max_tokens=60, temperature=0
    )
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_json_object_mode_on_completions(client):
    choice = client.completions.create(
        model=SERVED, prompt="{", max_tokens=120, seed=1, extra_body={"response_format": {"type": "json_object"}}
    ).choices[0]
    if choice.finish_reason != "length":
        assert isinstance(json.loads(choice.text), dict)


def test_invalid_schema_is_400_naming_response_format(server):
    body = {
        "messages": MESSAGES,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}},
    }
    response = requests.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_generate_details_and_json_schema(server):
    schema = Pet.model_json_schema()
    body = {"prompt": "Pet:", "max_new_tokens": 60, "details": True, "top_n_tokens": 2, "json_schema": schema}
    answer = requests.post(f"{server.url}/generate", json={**body, "return_full_text": False}, headers=AUTH, timeout=30)
    answer = answer.json()
    jsonschema.validate(json.loads(answer["generated_text"]), schema)
    details = answer["details"]
    assert details["generated_tokens"] >= len(details["tokens"]) > 0
    assert "".join(token["text"] for token in details["tokens"]) == answer["generated_text"]
    assert all(len(top) == 2 for top in details["top_tokens"])
    bad = requests.post(f"{server.url}/generate", json={**body, "json_schema": {"type": 5}}, headers=AUTH, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "json_schema"


def test_penalties_and_bias_reach_the_engine(client, tokenizer):
    banned = tokenizer.encode(
        client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=1, temperature=0).choices[0].text
    )
    choice = client.completions.create(
        model=SERVED,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0,
        frequency_penalty=2.0,
        logit_bias={str(banned[0]): -100},
    ).choices[0]
    ids = tokenizer.encode(choice.text)
    assert banned[0] not in ids and len(set(ids)) == len(ids)


def test_tokenize_and_detokenize_match_the_tokenizer(server, tokenizer):
    counted = requests.post(f"{server.url}/tokenize", json={"prompt": PROMPT}, headers=AUTH, timeout=30).json()
    assert counted["tokens"] == tokenizer(PROMPT).input_ids and counted["count"] == len(counted["tokens"])
    assert counted["max_model_len"] == 1024
    chat = requests.post(f"{server.url}/tokenize", json={"messages": MESSAGES}, headers=AUTH, timeout=30).json()
    assert chat["count"] > counted["count"]
    text = requests.post(f"{server.url}/detokenize", json={"tokens": counted["tokens"]}, headers=AUTH, timeout=30)
    assert text.json() == {"prompt": PROMPT}
    assert requests.post(f"{server.url}/tokenize", json={"prompt": PROMPT}, timeout=30).status_code == 401
