"""POST /tokenize and POST /detokenize in vLLM's shapes: count a prompt's (or a chat's) tokens, or read ids back.

They use the engine's own tokenizer (the one generation uses, with its chat template and its lock), through
admission like any generation: in a serving worker the model is loaded by then anyway, and a tokenizer loaded
on its own would be a second copy whose quirks (added tokens, the template, the pad token) could drift from the
one the model really sees. A worker's first request of either kind therefore loads the model, counted as waiting.
"""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint
from marshmallow import Schema, ValidationError, fields, validates_schema
from marshmallow.validate import Length, Range

from llmapi.config import Settings
from llmapi.engine.types import InvalidRequest
from llmapi.errors import refusal
from llmapi.http.fields import MAX_TOKEN_ID, ErrorSchema, StrictBoolean, StrictInteger, Text
from llmapi.http.hooks import require_api_key, require_json
from llmapi.http.openai.params import ContentField
from llmapi.http.openai.schemas import MAX_MESSAGES, MAX_MODEL_CHARS, MessageSchema
from llmapi.runtime.runner import admitted
from llmapi.runtime.service import engine_service

VALIDATION_STATUS = 400  # vLLM's routes, vLLM's dialect
MAX_DETOKENIZE_IDS = 1 << 16


class TokenizeResponseSchema(Schema):
    """The answer to POST /tokenize."""

    count = fields.Integer(required=True, metadata={"description": "how many tokens"})
    max_model_len = fields.Integer(required=True, metadata={"description": "the model's context, in tokens"})
    tokens = fields.List(fields.Integer(), required=True)
    token_strs = fields.List(fields.String(), allow_none=True, metadata={"description": "with return_token_strs"})


class DetokenizeResponseSchema(Schema):
    """The answer to POST /detokenize."""

    prompt = fields.String(required=True)


def schemas(settings: Settings) -> tuple[type[Schema], type[Schema]]:
    """The two bodies' schemas, with this server's limits."""

    class TokenizeMessageSchema(MessageSchema):
        """One chat message to tokenize."""

        content = ContentField(required=True, max_chars=settings.max_prompt_chars)

    class TokenizeRequestSchema(Schema):
        """POST /tokenize: a `prompt`, or chat `messages` (rendered with the model's chat template); with both, the
        prompt, as vLLM reads such a body."""

        model = fields.String(validate=Length(min=1, max=MAX_MODEL_CHARS), metadata={"description": "optional"})
        prompt = Text(validate=Length(max=settings.max_prompt_chars), metadata={"example": "Hello world"})
        messages = fields.List(fields.Nested(TokenizeMessageSchema), validate=Length(min=1, max=MAX_MESSAGES))
        add_special_tokens = StrictBoolean(
            metadata={"description": "add the tokenizer's special tokens (default: true for prompt, false for chat)"}
        )
        return_token_strs = StrictBoolean(load_default=False, metadata={"description": "each token's string too"})

        @validates_schema
        def _an_input(self, data: dict[str, Any], **kwargs: Any) -> None:
            if "prompt" not in data and "messages" not in data:
                raise ValidationError("send prompt or messages.", "prompt")

    class DetokenizeRequestSchema(Schema):
        """POST /detokenize: token ids to turn back into text."""

        model = fields.String(validate=Length(min=1, max=MAX_MODEL_CHARS), metadata={"description": "optional"})
        tokens = fields.List(
            StrictInteger(validate=Range(min=0, max=MAX_TOKEN_ID)),
            required=True,
            validate=Length(max=MAX_DETOKENIZE_IDS),
            metadata={"example": [15496, 995]},
        )

    return TokenizeRequestSchema, DetokenizeRequestSchema


def create_blueprint(settings: Settings) -> Blueprint:
    """Build the /tokenize and /detokenize blueprint."""
    tokenize_schema, detokenize_schema = schemas(settings)
    blp = Blueprint("tokens", __name__, description="Count and read tokens with the served model's tokenizer.")
    blp.before_request(require_api_key)
    blp.before_request(require_json)
    blp.register_error_handler(InvalidRequest, refusal(VALIDATION_STATUS))

    @blp.route("/tokenize", methods=["POST"])
    @blp.arguments(tokenize_schema(), error_status_code=VALIDATION_STATUS)
    @blp.response(200, TokenizeResponseSchema)
    @blp.alt_response(400, schema=ErrorSchema, description="Invalid parameters")
    @blp.alt_response(503, schema=ErrorSchema, description="Model unavailable or at capacity")
    def tokenize(args: dict[str, Any]) -> dict[str, Any]:
        """Tokenize a prompt, or chat messages as the chat route renders them, and count the tokens."""
        with admitted(engine_service()) as engine:
            if "prompt" not in args:
                messages = [{"role": m["role"], "content": m["content"]} for m in args["messages"]]
                text, special = engine.render_chat(messages), args.get("add_special_tokens", False)
            else:
                text, special = args["prompt"], args.get("add_special_tokens", True)
            ids = engine.tokenize(text, add_special_tokens=special)
            strings = engine.token_strings(ids) if args["return_token_strs"] else None
            return {"count": len(ids), "max_model_len": engine.context_length, "tokens": ids, "token_strs": strings}

    @blp.route("/detokenize", methods=["POST"])
    @blp.arguments(detokenize_schema(), error_status_code=VALIDATION_STATUS)
    @blp.response(200, DetokenizeResponseSchema)
    @blp.alt_response(400, schema=ErrorSchema, description="Invalid parameters or a token id outside the vocabulary")
    @blp.alt_response(503, schema=ErrorSchema, description="Model unavailable or at capacity")
    def detokenize(args: dict[str, Any]) -> dict[str, Any]:
        """Turn token ids back into text (special tokens left out)."""
        with admitted(engine_service()) as engine:
            token = engine.outside(args["tokens"])
            if token is not None:
                raise InvalidRequest(
                    f"Token {token} is outside this model's vocabulary ({engine.vocab_size} tokens).", param="tokens"
                )
            return {"prompt": engine.decode(args["tokens"])}

    return blp
