"""POST /v1/embeddings: its schema, its answer (floats or base64), and its route on the /v1 blueprint.

Each input is one row of the engine's queue (engine/embed.py): admitted and batched like the generations, one
forward pass of the model's base per batch, its last hidden states pooled by EMBEDDINGS_POOLING and normalized.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

from marshmallow import Schema, fields
from marshmallow.validate import Length, OneOf

from llmapi.config import Settings
from llmapi.engine.types import EmbeddingRequest, EmbeddingResult
from llmapi.http.fields import ErrorSchema
from llmapi.http.jsonbody import Blueprint
from llmapi.http.openai.params import PromptField, Unsupported
from llmapi.http.openai.schemas import MAX_MODEL_CHARS, MAX_USER_CHARS
from llmapi.runtime import runner
from llmapi.runtime.service import engine_service

MAX_INPUTS = 256  # inputs per request (OpenAI allows 2048; each is a row of the engine's queue here)
ERRORS = [
    (400, "Invalid parameters, an unsupported parameter, or an input too long for the context"),
    (401, "Missing or invalid API key"),
    (404, "Unknown model"),
    (503, "Model unavailable"),
]


def request_schema(settings: Settings) -> type[Schema]:
    """The body of POST /v1/embeddings, with this app's limits."""

    class EmbeddingRequestSchema(Schema):
        """The body of POST /v1/embeddings."""

        model = fields.String(
            allow_none=True,
            validate=Length(min=1, max=MAX_MODEL_CHARS),
            metadata={"description": "the id /v1/models lists; optional", "example": settings.served_model},
        )
        input = PromptField(
            required=True,
            max_chars=settings.max_prompt_chars,
            max_items=MAX_INPUTS,
            metadata={"description": "a string, a list of strings, token ids or a list of lists of token ids"},
        )
        encoding_format = fields.String(
            load_default="float",
            validate=OneOf(["float", "base64"]),
            metadata={"description": "float: a list of numbers; base64: little-endian float32 bytes"},
        )
        dimensions = Unsupported()  # the model's hidden size is the only one; truncating needs a trained model
        user = fields.String(
            allow_none=True, validate=Length(max=MAX_USER_CHARS), metadata={"description": "accepted, not used"}
        )

    return EmbeddingRequestSchema


class EmbeddingSchema(Schema):
    """One input's embedding."""

    object = fields.String(required=True, metadata={"example": "embedding"})
    index = fields.Integer(required=True)
    embedding = fields.Raw(required=True, metadata={"description": "a list of floats, or a base64 string"})


class EmbeddingUsageSchema(Schema):
    """Tokens read: every input's."""

    prompt_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class EmbeddingResponseSchema(Schema):
    """POST /v1/embeddings."""

    object = fields.String(required=True, metadata={"example": "list"})
    data = fields.List(fields.Nested(EmbeddingSchema), required=True)
    model = fields.String(required=True)
    usage = fields.Nested(EmbeddingUsageSchema, required=True)


def encoded(vector: tuple[float, ...], encoding: str) -> list[float] | str:
    """A vector as floats, or as base64 of little-endian float32 (what OpenAI's clients decode)."""
    if encoding == "float":
        return list(vector)
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def body(results: list[EmbeddingResult], model: str, encoding: str) -> dict[str, Any]:
    """The whole answer."""
    data = [
        {"object": "embedding", "index": index, "embedding": encoded(result.embedding, encoding)}
        for index, result in enumerate(results)
    ]
    tokens = sum(result.prompt_tokens for result in results)
    return {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def register(blp: Blueprint, settings: Settings, served_model: Any, validation_status: int) -> None:
    """Add POST /embeddings to the /v1 blueprint (its error dialect is the blueprint's)."""
    example = {"input": ["The cat sat on the mat.", "A dog barked."]}

    def embeddings(args: dict[str, Any]) -> dict[str, Any]:
        """Embed a string, or each of a list of strings or of token-id lists.

        Each embedding is the model's last hidden states pooled (EMBEDDINGS_POOLING: mean by default, or the last
        token's) and L2-normalized. An input longer than the model's context is a 400 naming it (`input.3`).
        """
        model = served_model(args, settings)
        inputs = args["input"]
        requests = [
            EmbeddingRequest(
                text=item if isinstance(item, str) else "",
                ids=None if isinstance(item, str) else tuple(item),
                pooling=settings.embeddings_pooling,
                param="input" if len(inputs) == 1 else f"input.{index}",
            )
            for index, item in enumerate(inputs)
        ]
        return body(runner.embed(engine_service(), requests), model, args["encoding_format"])

    view: Any = embeddings
    for status, description in ERRORS:
        view = blp.alt_response(status, schema=ErrorSchema, description=description)(view)
    view = blp.response(200, EmbeddingResponseSchema)(view)
    view = blp.arguments(request_schema(settings)(), error_status_code=validation_status, example=example)(view)
    blp.route("/embeddings", methods=["POST"])(view)
