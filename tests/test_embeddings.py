"""/v1/embeddings: the HTTP layer on a fake engine, and the engine's embedding rows on the tiny model."""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

import pytest

from llmapi.engine.types import EmbeddingRequest, EmbeddingResult, InvalidRequest
from tests.conftest import FakeEngine
from tests.test_http import assert_error
from tests.test_openai_http import post


@dataclass
class Done:
    """An embedding already computed."""

    value: EmbeddingResult

    def result(self) -> EmbeddingResult:
        return self.value


class EmbeddingEngine(FakeEngine):
    """A fake engine that embeds each input as (words, 1) and keeps the requests; 10 words at most."""

    def __init__(self) -> None:
        super().__init__()
        self.embedded: list[EmbeddingRequest] = []

    def embed(self, request: EmbeddingRequest) -> Done:
        size = len(request.ids) if request.ids is not None else len(request.text.split())
        if size > 10:
            raise InvalidRequest(f"{request.param} is too long", param=request.param)
        self.embedded.append(request)
        return Done(EmbeddingResult((float(size), 1.0), size))


@pytest.fixture
def app(make_app):
    return make_app(EmbeddingEngine(), served_model_name="tiny", max_prompt_chars=200)


def test_embeddings_answer_in_openai_shape(client):
    body = post(client, "/embeddings", {"input": ["one two", "three"], "model": "tiny"}).get_json()
    assert body["object"] == "list" and body["model"] == "tiny"
    assert body["data"] == [
        {"object": "embedding", "index": 0, "embedding": [2.0, 1.0]},
        {"object": "embedding", "index": 1, "embedding": [1.0, 1.0]},
    ]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_embeddings_base64_is_little_endian_float32(client):
    body = post(client, "/embeddings", {"input": "one two", "encoding_format": "base64"}).get_json()
    assert struct.unpack("<2f", base64.b64decode(body["data"][0]["embedding"])) == (2.0, 1.0)


def test_embeddings_take_token_ids_and_the_pooling_setting(make_app):
    engine = EmbeddingEngine()
    client = make_app(engine, embeddings_pooling="last").test_client()
    body = post(client, "/embeddings", {"input": [[1, 2, 3], [4]]}).get_json()
    assert [d["embedding"][0] for d in body["data"]] == [3.0, 1.0]
    assert [r.ids for r in engine.embedded] == [(1, 2, 3), (4,)]
    assert {r.pooling for r in engine.embedded} == {"last"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ["short", "a b c d e f g h i j k"]}, "input.1"),
        ({"input": "a b c d e f g h i j k"}, "input"),
        ({"input": "x", "dimensions": 2}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({}, "input"),
        ({"input": "x", "model": "other"}, "model"),
    ],
)
def test_embeddings_bad_input_is_refused_naming_the_field(client, body, param):
    status = 404 if param == "model" else 400
    assert_error(post(client, "/embeddings", body), status, param=param)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return ["The cat sat on the mat.", "A dog barked loudly at the mailman this morning, twice.", "Hi"]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_engine_embeddings_batched_equal_solo_and_are_normalized(engine, texts, pooling):
    rows = [engine.embed(EmbeddingRequest(text=text, pooling=pooling)) for text in texts]  # queued together
    batched = [row.result() for row in rows]
    solo = [engine.embed(EmbeddingRequest(text=text, pooling=pooling)).result() for text in texts]
    for together, alone in zip(batched, solo):
        assert together.prompt_tokens == alone.prompt_tokens
        assert together.embedding == pytest.approx(alone.embedding, abs=1e-5)
        assert sum(x * x for x in together.embedding) == pytest.approx(1.0, abs=1e-5)


def test_engine_embedding_too_long_names_its_input(engine):
    ids = tuple([1] * (engine.context_length + 1))
    with pytest.raises(InvalidRequest) as caught:
        engine.embed(EmbeddingRequest(ids=ids, param="input.2"))
    assert caught.value.param == "input.2"


def test_engine_embeds_while_it_generates(engine):
    from llmapi.engine.types import GenerationRequest

    handle = engine.submit(GenerationRequest(prompt="Hello", max_new_tokens=8))
    vector: Any = engine.embed(EmbeddingRequest(text="Hello")).result()
    assert handle.result().completion_tokens == 8 and len(vector.embedding) > 0
