"""POST /tokenize and /detokenize on a fake engine: vLLM's shapes, behind the key, admitted like a generation."""

from __future__ import annotations

import pytest

from tests.conftest import FAKE_CONTEXT, KEY

AUTH = {"x-api-key": KEY}


def test_tokenize_counts_a_prompt_with_special_tokens(client):
    body = client.post("/tokenize", json={"prompt": "ab cde"}, headers=AUTH).get_json()
    assert body == {"count": 3, "max_model_len": FAKE_CONTEXT, "tokens": [0, 2, 3], "token_strs": None}


def test_tokenize_without_special_tokens_and_with_strings(client):
    body = {"prompt": "ab cde", "add_special_tokens": False, "return_token_strs": True}
    answer = client.post("/tokenize", json=body, headers=AUTH).get_json()
    assert answer["tokens"] == [2, 3] and answer["token_strs"] == ["w2", "w3"]


def test_tokenize_renders_chat_messages_like_the_chat_route(client, fake_engine):
    messages = [{"role": "user", "content": "Say hello."}]
    answer = client.post("/tokenize", json={"messages": messages}, headers=AUTH).get_json()
    assert answer["tokens"] == fake_engine.tokenize(fake_engine.render_chat(messages), add_special_tokens=False)


def test_detokenize_reads_ids_back(client):
    assert client.post("/detokenize", json={"tokens": [1, 3]}, headers=AUTH).get_json() == {"prompt": "x xxx"}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"prompt": "a", "extra": 1}, "extra"),
        ("/detokenize", {"tokens": ["a"]}, "tokens.0"),
        ("/detokenize", {"tokens": [-1]}, "tokens.0"),
        ("/detokenize", {"tokens": [1000]}, "tokens"),  # outside the fake's vocabulary
    ],
)
def test_tokens_refused_bodies_are_400_naming_the_field(client, path, body, param):
    response = client.post(path, json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.get_json()["error"]["param"] == param


@pytest.mark.parametrize("path", ["/tokenize", "/detokenize"])
def test_tokens_routes_need_the_key(client, path):
    assert client.post(path, json={"prompt": "a", "tokens": [1]}).status_code == 401
