"""Field types and schemas every API shares: strict JSON types, text, stop sequences, usage, the error shape."""

from __future__ import annotations

import json
from typing import Any

from marshmallow import Schema, ValidationError, fields
from marshmallow.validate import Range

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1
# Limits of every JSON body, checked by llmapi.http.jsonbody before any schema sees it: no field of ours nests
# deeper than a few levels or needs a number of more than 20 digits (MAX_SEED has 19).
MAX_JSON_DEPTH = 64
MAX_NUMBER_DIGITS = 100


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


class ErrorDetailSchema(Schema):
    """The inside of every error body."""

    message = fields.String(required=True)
    type = fields.String(required=True, metadata={"example": "invalid_request_error"})
    param = fields.String(allow_none=True)
    code = fields.Integer(required=True, metadata={"example": 422})


class ErrorSchema(Schema):
    """Every error answered by the service."""

    error = fields.Nested(ErrorDetailSchema, required=True)


MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TOKEN_ID = 2**31 - 1
MAX_SCHEMA_CHARS = 32_768  # a JSON schema or grammar, as sent


class LogitBiasField(fields.Field):
    """OpenAI's logit_bias: token id (a JSON object key, so a string of digits) -> bias in [-100, 100]."""

    default_error_messages = {
        "invalid": f"Must be an object of at most {MAX_LOGIT_BIAS} token ids (as strings) to numbers in [-100, 100]."
    }

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[tuple[int, float], ...]:
        if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
            raise self.make_error("invalid")
        out = []
        for key, bias in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) <= MAX_TOKEN_ID):
                raise self.make_error("invalid")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise self.make_error("invalid")
            out.append((int(key), float(bias)))
        return tuple(out)

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        """The OpenAPI schema of this field (docs.field_attributes reads it)."""
        return {
            "type": "object",
            "maxProperties": MAX_LOGIT_BIAS,
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "description": "token id -> bias added to its logit before sampling (-100 bans it, 100 forces it)",
        }


def schema_source(schema: Any) -> str:
    """A JSON schema as the canonical JSON text the engine compiles (and caches by); refuse what is not one."""
    if not isinstance(schema, dict):
        raise ValidationError("Must be a JSON schema (an object).")
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_SCHEMA_CHARS:
        raise ValidationError(f"The schema is longer than {MAX_SCHEMA_CHARS} characters as JSON.")
    return text


MAX_PENALTY = 2.0  # frequency_penalty and presence_penalty: OpenAI's range, -2 to 2, on every API
MAX_TOP_K = 1_000_000  # top_k on every API
MAX_REPETITION_PENALTY = 100.0  # repetition_penalty (CTRL's) on every API


class PenaltiesSchema(Schema):
    """OpenAI's frequency and presence penalties and logit_bias: the same fields on /generate and on /v1."""

    frequency_penalty = StrictFloat(
        load_default=0.0,
        validate=Range(min=-MAX_PENALTY, max=MAX_PENALTY),
        metadata={"description": "subtracted from a generated token's logit once per time it was generated"},
    )
    presence_penalty = StrictFloat(
        load_default=0.0,
        validate=Range(min=-MAX_PENALTY, max=MAX_PENALTY),
        metadata={"description": "subtracted once from the logit of every token already generated"},
    )
    logit_bias = LogitBiasField()
