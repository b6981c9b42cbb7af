"""End to end: the official `openai` client against a real gunicorn serving the real tiny model on /v1."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import openai
import pytest

from llmapi.engine.chat import default_template
from tests.conftest import KEY, Server, run_concurrently

pytestmark = pytest.mark.slow

SERVED = "tiny-gpt2"
PROMPT = "Artificial Intelligence is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
GREEDY_STREAM = {"model": SERVED, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}


# Two workers; 9 threads, so that one worker may admit all 8 concurrent requests below.
SERVER_ENV = {"SERVED_MODEL_NAME": SERVED, "WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "9"}


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    """The official client, pointed at the server: the README's few lines."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        yield client


def greedy(client: openai.OpenAI, prompt: str, **kwargs) -> str:
    """The greedy completion of `prompt`."""
    return client.completions.create(model=SERVED, prompt=prompt, temperature=0, **kwargs).choices[0].text


def test_openai_client_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [SERVED]


def test_openai_client_completion(client, tokenizer):
    completion = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=12, temperature=0)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.model == SERVED
    (choice,) = completion.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert completion.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert completion.usage.completion_tokens == 12
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12


def test_openai_client_completion_stream_adds_up(client, tokenizer):
    chunks = list(client.completions.create(prompt=PROMPT, max_tokens=12, **GREEDY_STREAM))
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == greedy(client, PROMPT, max_tokens=12)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert len({c.id for c in chunks}) == 1
    assert usage_chunk.choices == []
    assert usage_chunk.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert usage_chunk.usage.completion_tokens == 12


def test_openai_client_chat_renders_the_default_template(client):
    chat = client.chat.completions.create(model=SERVED, messages=MESSAGES, max_tokens=10, temperature=0)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    (choice,) = chat.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    # GPT-2 has no chat template: the chat is the completion of the documented default rendering.
    rendered = default_template(MESSAGES)
    assert choice.message.content == greedy(client, rendered, max_tokens=10)
    assert (
        chat.usage.prompt_tokens
        == client.completions.create(model=SERVED, prompt=rendered, max_tokens=1).usage.prompt_tokens
    )


def test_openai_client_chat_stream_adds_up(client):
    *chunks, usage_chunk = list(client.chat.completions.create(messages=MESSAGES, max_tokens=10, **GREEDY_STREAM))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (
        text
        == client.chat.completions.create(messages=MESSAGES, max_tokens=10, temperature=0, model=SERVED)
        .choices[0]
        .message.content
    )
    assert chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.usage.completion_tokens == 10


def test_openai_client_n_gives_reproducible_distinct_choices(client):
    many = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=8, n=3, seed=41)
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.text for c in many.choices]
    assert len(set(texts)) == 3
    # Choice i samples with seed + i: each one can be reproduced alone.
    alone = [client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=8, seed=41 + i) for i in range(3)]
    assert [a.choices[0].text for a in alone] == texts
    assert many.usage.completion_tokens == 24


def test_openai_client_seed_reproduces_under_concurrency(client):
    def sample(i: int) -> str:
        seed = 7 if i % 2 == 0 else 8
        chat = client.chat.completions.create(
            model=SERVED, messages=MESSAGES, max_tokens=12, seed=seed, temperature=0.9
        )
        return chat.choices[0].message.content

    texts = run_concurrently(sample, 8)
    assert len(set(texts[0::2])) == 1 and len(set(texts[1::2])) == 1
    assert texts[0] != texts[1]


def test_openai_client_stop_cuts_the_text(client):
    full = greedy(client, PROMPT, max_tokens=20)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    completion = client.completions.create(model=SERVED, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert completion.choices[0].text == full[: full.index(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_openai_client_prompt_list_is_prompt_major(client):
    prompts = [PROMPT, "Once upon a time"]
    completion = client.completions.create(model=SERVED, prompt=prompts, max_tokens=6, n=2, temperature=0)
    texts = [c.text for c in completion.choices]
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    assert texts == [greedy(client, prompts[0], max_tokens=6)] * 2 + [greedy(client, prompts[1], max_tokens=6)] * 2


def test_openai_client_wrong_key_is_authentication_error(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=SERVED, prompt=PROMPT)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_openai_client_over_long_is_bad_request(client, tokenizer):
    prompt = "hello " * 1000
    prompt_tokens = len(tokenizer.encode(prompt))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED, prompt=prompt, max_tokens=100)
    message = info.value.body["message"]
    assert f"maximum context length is 1024 tokens. However, you requested {prompt_tokens + 100} tokens" in message
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError, match="in the messages"):
        client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": prompt}], max_tokens=100)


def test_openai_client_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


@pytest.mark.parametrize(
    ("create", "kwargs", "param"),
    [
        ("completions", {"prompt": PROMPT, "logprobs": 9}, "logprobs"),
        ("completions", {"prompt": PROMPT, "suffix": " The end."}, "suffix"),
        (
            "chat",
            {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f f"}}]},
            "tools.0.function.name",
        ),
        ("chat", {"messages": MESSAGES, "response_format": {"type": "xml"}}, "response_format"),
        ("chat", {"messages": MESSAGES, "max_tokens": 10_000}, "max_tokens"),
    ],
)
def test_openai_client_unsupported_or_invalid_is_bad_request(client, create, kwargs, param):
    endpoint = client.completions if create == "completions" else client.chat.completions
    with pytest.raises(openai.BadRequestError) as info:
        endpoint.create(model=SERVED, **kwargs)
    assert info.value.body["param"] == param


def test_openai_curl_with_bearer(server):
    out = subprocess.run(
        ["curl", "-sS", f"{server.url}/v1/chat/completions", "-H", "Content-Type: application/json",
         "-H", f"Authorization: Bearer {KEY}",
         "-d", '{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 5}'],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["choices"][0]["message"]["role"] == "assistant"


def test_openai_client_deadline_is_finish_reason_timeout(start_server, tiny_model):
    # A 1 ms deadline passes before decoding starts: the client gets what there is, honestly labelled.
    server = start_server(MODEL_NAME=tiny_model, GENERATION_TIMEOUT_MS="1", WEB_CONCURRENCY="1")
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        completion = client.completions.create(model=tiny_model, prompt=PROMPT, max_tokens=500)
    assert completion.choices[0].finish_reason == "timeout"
    assert completion.usage.completion_tokens < 500


def test_scoring_cut_by_the_deadline_is_an_error_never_a_partial_200(start_server, tiny_model):
    # What lm-evaluation-harness sends: echo, logprobs, max_tokens 0; long prompts and a deadline far too short.
    server = start_server(MODEL_NAME=tiny_model, GENERATION_TIMEOUT_MS="1", WEB_CONCURRENCY="1")
    prompts = [" ".join(["tokens prompts and completions"] * 150)] * 8
    body = {"model": tiny_model, "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0}
    response = server.post("/v1/completions", body)
    assert response.status_code == 503, response.text[:300]
    error = response.json()["error"]
    assert "deadline" in error["message"] and error["type"] == "timeout"


def test_generation_cut_by_the_deadline_keeps_its_text_and_says_timeout(start_server, tiny_model):
    # Unlike scoring, a generation past its deadline is a 200 with the text so far, in both APIs, streamed or not.
    server = start_server(MODEL_NAME=tiny_model, GENERATION_TIMEOUT_MS="20", WEB_CONCURRENCY="1")
    generate = server.post("/generate", {"prompt": "Hello", "max_new_tokens": 512, "min_new_tokens": 512})
    assert generate.status_code == 200 and generate.json()["finish_reason"] == "timeout"
    body = {"prompt": "Hello", "max_new_tokens": 512, "min_new_tokens": 512, "stream": True}
    streamed = server.post("/generate", body, stream=True)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("}")
    assert '"finish_reason": "timeout"' in streamed.text.replace('":"', '": "')
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        messages = [{"role": "user", "content": "Hello"}]
        chat = client.chat.completions.create(model=tiny_model, messages=messages, max_tokens=512)
        assert chat.choices[0].finish_reason == "timeout"
        chunks = list(client.chat.completions.create(model=tiny_model, messages=messages, max_tokens=512, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["timeout"]
