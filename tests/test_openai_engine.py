"""Chat rendering (default template, a tokenizer's own), and /v1 in-process on the real engine."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from llmapi.engine.chat import ChatTemplateError, default_template, render
from llmapi.engine.types import GenerationRequest
from tests.conftest import KEY

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Two\nlines"},
]
# A ChatML-like template that, like Llama's, writes the BOS token itself and checks the roles.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% if loop.first and m['role'] == 'assistant' %}{{ raise_exception('Conversation must start with a user') }}"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def tokenizer(tiny_model: str):
    """A fresh copy of the tiny model's tokenizer (which has no chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_chat_default_template_is_role_lines_then_assistant():
    assert default_template(MESSAGES) == (
        "System: Be brief.\nUser: Hello\nAssistant: Hi.\nUser: Two\nlines\nAssistant:"
    )


def test_chat_without_a_template_uses_the_default(tokenizer):
    assert not tokenizer.chat_template
    assert render(tokenizer, MESSAGES) == default_template(MESSAGES)


def test_chat_uses_the_tokenizer_template(tokenizer):
    tokenizer.chat_template = TEMPLATE
    text = render(tokenizer, MESSAGES[:2])
    # GPT-2's tokenizer adds no BOS when encoding, so the template's own BOS stays.
    assert text == (
        f"{tokenizer.bos_token}<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_drops_the_template_bos_when_encoding_adds_one(tokenizer):
    from tokenizers.processors import TemplateProcessing

    tokenizer.chat_template = TEMPLATE
    bos = tokenizer.bos_token_id
    # Make encoding add a BOS, as Llama's tokenizer does.
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)]
    )
    assert tokenizer("")["input_ids"] == [bos]
    text = render(tokenizer, MESSAGES[:2])
    assert text.startswith("<|im_start|>system")
    assert tokenizer(text)["input_ids"].count(bos) == 1


def test_chat_template_refusal_is_a_chat_template_error(tokenizer):
    tokenizer.chat_template = TEMPLATE
    with pytest.raises(ChatTemplateError, match="must start with a user"):
        render(tokenizer, [{"role": "assistant", "content": "Hi."}])


def test_chat_broken_template_is_not_blamed_on_the_client(tokenizer):
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }"
    with pytest.raises(Exception) as info:
        render(tokenizer, MESSAGES)
    assert not isinstance(info.value, ChatTemplateError)


def test_chat_engine_renders_with_its_tokenizer(engine):
    assert engine.render_chat(MESSAGES) == default_template(MESSAGES)


class Recording:
    """The real engine, keeping the handle of every generation it starts."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.model_name = engine.model_name
        self.placement = engine.placement
        self.on_stats = None
        self.handles: list[Any] = []

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    def submit(self, request: GenerationRequest) -> Any:
        handle = self.engine.submit(request)
        self.handles.append(handle)
        return handle

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self.engine.render_chat(messages)


def test_chat_stream_hang_up_stops_the_real_generation(make_app, engine):
    recording = Recording(engine)
    client = make_app(recording).test_client()
    body = {"messages": MESSAGES, "max_tokens": 500, "stream": True}
    response = client.post("/v1/chat/completions", json=body, headers={"x-api-key": KEY}, buffered=False)
    chunks = iter(response.response)
    first, second = next(chunks), next(chunks)
    assert json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "content" in json.loads(second[6:])["choices"][0]["delta"]
    response.close()  # what gunicorn does when the client goes away
    (handle,) = recording.handles
    result = handle.result()
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < 500
