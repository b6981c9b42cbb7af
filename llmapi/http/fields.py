"""Marshmallow schemas of every request and response; every request limit is declared here or in config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields, validates_schema
from marshmallow.validate import Length, Range

from llmapi.config import Settings

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1_000_000
MAX_REPETITION_PENALTY = 100.0


class StrictInteger(fields.Integer):
    """An integer that refuses strings, floats and booleans."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictFloat(fields.Float):
    """A JSON number that refuses strings, booleans, NaN and infinities."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._deserialize(value, attr, data, **kwargs)


class StrictBoolean(fields.Boolean):
    """true or false, nothing that merely looks like them."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bool:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


def is_text(value: str) -> bool:
    """Whether `value` is Unicode text; JSON escapes can smuggle in lone surrogates, which no tokenizer takes."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Text(fields.String):
    """A string of real Unicode text (no unpaired surrogates)."""

    default_error_messages = {"surrogate": "Must be valid Unicode text (it has an unpaired surrogate)."}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if not is_text(text):
            raise self.make_error("surrogate")
        return text


class StopField(fields.Field):
    """A stop sequence or a list of them, normalised to a tuple of non-empty strings."""

    default_error_messages = {
        "invalid": f"Must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings"
        f" of at most {MAX_STOP_CHARS} characters."
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not 0 < len(items) <= MAX_STOP_SEQUENCES:
            raise self.make_error("invalid")
        if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS and is_text(s) for s in items):
            raise self.make_error("invalid")
        return tuple(items)

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        """The OpenAPI schema of this field (docs.field_attributes reads it)."""
        text = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
        return {"oneOf": [text, {"type": "array", "items": text, "minItems": 1, "maxItems": MAX_STOP_SEQUENCES}]}


class UsageSchema(Schema):
    """Token accounting of one response."""

    prompt_tokens = fields.Integer(required=True, metadata={"description": "tokens in the prompt"})
    completion_tokens = fields.Integer(required=True, metadata={"description": "tokens generated"})
    total_tokens = fields.Integer(required=True)


class GenerateResponseSchema(Schema):
    """The answer to POST /generate."""

    generated_text = fields.String(
        required=True, metadata={"description": "prompt + continuation, or the continuation alone"}
    )
    finish_reason = fields.String(
        required=True, metadata={"description": "length, eos, stop or timeout", "example": "length"}
    )
    stop_sequence = fields.String(allow_none=True, metadata={"description": "the stop sequence that matched"})
    usage = fields.Nested(UsageSchema, required=True)
    model = fields.String(required=True)
    seed = fields.Integer(allow_none=True, metadata={"description": "the seed used; send it back to reproduce"})


class ErrorDetailSchema(Schema):
    """The inside of every error body."""

    message = fields.String(required=True)
    type = fields.String(required=True, metadata={"example": "invalid_request_error"})
    param = fields.String(allow_none=True)
    code = fields.Integer(required=True, metadata={"example": 422})


class ErrorSchema(Schema):
    """Every error answered by the service."""

    error = fields.Nested(ErrorDetailSchema, required=True)


class HealthSchema(Schema):
    """The liveness answer."""

    status = fields.String(required=True, metadata={"example": "ok"})


class ReadySchema(Schema):
    """The readiness answer."""

    status = fields.String(required=True, metadata={"example": "ready"})
    model = fields.String(required=True, metadata={"description": "the model this worker has loaded"})
    dtype = fields.String(metadata={"description": "what the model computes in (DTYPE)", "example": "bfloat16"})
    device = fields.String(metadata={"description": "where the model runs (DEVICE)", "example": "cpu"})


@dataclass(frozen=True)
class Schemas:
    """The request schemas built for one app's limits."""

    generate: type[Schema]


def build(settings: Settings) -> Schemas:
    """Make the request schemas with the limits in `settings` baked in (so the OpenAPI spec shows them)."""

    class GenerateRequestSchema(Schema):
        """The body of POST /generate."""

        prompt = Text(
            required=True,
            validate=Length(min=1, max=settings.max_prompt_chars),
            metadata={"example": "Artificial Intelligence is"},
        )
        max_new_tokens = StrictInteger(
            load_default=settings.max_new_tokens_default,
            validate=Range(min=1, max=settings.max_new_tokens_limit),
            metadata={"example": 40},
        )
        min_new_tokens = StrictInteger(
            load_default=0,
            validate=Range(min=0, max=settings.max_new_tokens_limit),
            metadata={"description": "end-of-sequence is suppressed until this many; must not exceed max_new_tokens"},
        )
        do_sample = StrictBoolean(
            metadata={"description": "sample instead of greedy; implied by temperature, top_p or top_k"}
        )
        temperature = StrictFloat(validate=Range(min=0, max=MAX_TEMPERATURE), metadata={"description": "0 = greedy"})
        top_p = StrictFloat(validate=Range(min=0, max=1, min_inclusive=False))
        top_k = StrictInteger(validate=Range(min=0, max=MAX_TOP_K), metadata={"description": "0 = no top-k"})
        repetition_penalty = StrictFloat(
            load_default=1.0, validate=Range(min=0, max=MAX_REPETITION_PENALTY, min_inclusive=False)
        )
        seed = StrictInteger(validate=Range(min=0, max=MAX_SEED), metadata={"description": "fixes the sampling"})
        stop = StopField(metadata={"description": f"up to {MAX_STOP_SEQUENCES} sequences that end generation"})
        return_full_text = StrictBoolean(load_default=True, metadata={"description": "prepend the prompt"})
        timeout_ms = StrictInteger(
            load_default=settings.timeout_default_ms,
            validate=Range(min=1, max=settings.timeout_max_ms),
            metadata={"description": "deadline; on expiry the text so far is returned with finish_reason timeout"},
        )
        stream = StrictBoolean(load_default=False, metadata={"description": "answer with Server-Sent Events"})

        @validates_schema
        def _min_below_max(self, data: dict[str, Any], **kwargs: Any) -> None:
            if data.get("min_new_tokens", 0) > data.get("max_new_tokens", 0):
                raise ValidationError("must not exceed max_new_tokens.", "min_new_tokens")

    return Schemas(generate=GenerateRequestSchema)
