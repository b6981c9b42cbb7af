"""The /v1 request fields that parse more than a type: prompts, message contents, response_format, and the OpenAI
parameters this server accepts only with a value that asks for nothing."""

from __future__ import annotations

import json
from typing import Any

from marshmallow import ValidationError, fields

from llmapi.engine.types import Grammar
from llmapi.http.fields import MAX_TOKEN_ID, StopField, is_text, schema_source

MAX_SCHEMA_NAME = 64


def same(value: Any, neutral: Any) -> bool:
    """Compare JSON values as JSON does: 0 and 0.0 are equal, but true is not 1."""
    numbers = (int, float)
    if isinstance(value, numbers) and isinstance(neutral, numbers) and bool not in (type(value), type(neutral)):
        return value == neutral
    return type(value) is type(neutral) and value == neutral


class OpenAIStopField(StopField):
    """Like /generate's stop, and an empty list means no stop sequence (as OpenAI's clients may send)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str, ...]:
        if value == []:
            return ()
        return super()._deserialize(value, attr, data, **kwargs)

    def _jsonschema_type_mapping(self) -> dict[str, Any]:
        """The OpenAPI schema of this field: /generate's, with the empty list allowed."""
        schema = super()._jsonschema_type_mapping()
        return {"oneOf": [schema["oneOf"][0], {**schema["oneOf"][1], "minItems": 0}]}


def is_ids(value: Any) -> bool:
    """Whether `value` is a list of token ids (JSON integers, not booleans)."""
    return isinstance(value, list) and bool(value) and all(type(item) is int for item in value)


class PromptField(fields.Field):
    """A prompt, or a list of prompts, as text or token ids: a tuple of non-empty strings or tuples of ids."""

    def __init__(self, *, max_chars: int, max_items: int, **kwargs: Any) -> None:
        text = {"type": "string", "minLength": 1, "maxLength": max_chars}
        many = {"type": "array", "items": text, "minItems": 1, "maxItems": max_items}
        token = {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID}
        ids = {"type": "array", "items": token, "minItems": 1, "maxItems": max_chars}
        many_ids = {"type": "array", "items": ids, "minItems": 1, "maxItems": max_items}
        schemas = [text, many, ids, many_ids]
        super().__init__(metadata={"oneOf": schemas, **kwargs.pop("metadata", {})}, **kwargs)
        self.max_chars = max_chars
        self.max_items = max_items

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[str | tuple[int, ...], ...]:
        if is_ids(value) or (isinstance(value, list) and value and all(is_ids(item) for item in value)):
            return self._ids(value)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not 0 < len(items) <= self.max_items:
            raise ValidationError(
                f"Must be a string, a list of 1 to {self.max_items} strings, a list of token ids or a list of such"
                " lists."
            )
        if not all(isinstance(item, str) and 0 < len(item) <= self.max_chars for item in items):
            raise ValidationError(f"Every prompt must be a string of 1 to {self.max_chars} characters.")
        if not all(is_text(item) for item in items):
            raise ValidationError("Must be valid Unicode text (it has an unpaired surrogate).")
        return tuple(items)

    def _ids(self, value: list[Any]) -> tuple[tuple[int, ...], ...]:
        """Token-id prompts: one list of ids, or a list of them."""
        prompts = [value] if is_ids(value) else value
        if len(prompts) > self.max_items:
            raise ValidationError(f"At most {self.max_items} prompts.")
        for ids in prompts:
            if len(ids) > self.max_chars or not all(0 <= token <= MAX_TOKEN_ID for token in ids):
                raise ValidationError(f"A token-id prompt holds 1 to {self.max_chars} ids, each 0 to {MAX_TOKEN_ID}.")
        return tuple(tuple(ids) for ids in prompts)


class ContentField(fields.Field):
    """A message's content: a string, or a list of text parts joined with newlines."""

    def __init__(self, *, max_chars: int, **kwargs: Any) -> None:
        text = {"type": "string", "maxLength": max_chars}
        part = {
            "type": "object",
            "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": text},
            "additionalProperties": False,
        }
        super().__init__(metadata={"oneOf": [text, {"type": "array", "items": part}]}, **kwargs)
        self.max_chars = max_chars

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        if isinstance(value, list):
            value = "\n".join(self._part_text(part) for part in value)
        if not isinstance(value, str):
            raise ValidationError("Must be a string or a list of text parts.")
        if len(value) > self.max_chars:
            raise ValidationError(f"Longer than {self.max_chars} characters.")
        if not is_text(value):
            raise ValidationError("Must be valid Unicode text (it has an unpaired surrogate).")
        return value

    @staticmethod
    def _part_text(part: Any) -> str:
        """Return the text of one {"type": "text", "text": ...} part; other kinds (images, audio) are refused."""
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"}:
            raise ValidationError('Only text content parts ({"type": "text", "text": "..."}) are supported.')
        if not isinstance(part["text"], str):
            raise ValidationError("A text part's text must be a string.")
        return part["text"]


class Unsupported(fields.Field):
    """An OpenAI parameter this server does not implement: accepted only with a value that asks for nothing."""

    def __init__(self, *neutral: Any, **kwargs: Any) -> None:
        allowed = " or ".join(["null", *(json.dumps(value) for value in neutral)])
        self.hint = f"Not supported by this server; leave it out (accepted: {allowed})."
        metadata = {"description": self.hint, "enum": [None, *neutral]}
        super().__init__(allow_none=True, metadata=metadata, **kwargs)
        self.neutral = neutral

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not any(same(value, ok) for ok in self.neutral):
            raise ValidationError(self.hint)
        return value


# A json_schema format's fields as the OpenAPI document shows them (response_format here, text.format in
# /v1/responses, which adds its "type").
JSON_SCHEMA_PROPERTIES = {
    "name": {"type": "string", "maxLength": MAX_SCHEMA_NAME},
    "description": {"type": "string"},
    "schema": {"type": "object", "description": "the JSON schema the answer must validate against"},
    "strict": {"type": "boolean", "nullable": True},
}


class ResponseFormatField(fields.Field):
    """response_format: text, json_object (any JSON object) or json_schema; loads as a Grammar, or None for text."""

    def __init__(self, **kwargs: Any) -> None:
        kinds = {"type": "string", "enum": ["text", "json_object", "json_schema"]}
        json_schema = {
            "type": "object",
            "required": ["name"],
            "properties": JSON_SCHEMA_PROPERTIES,
            "additionalProperties": False,
        }
        schema = {
            "type": "object",
            "required": ["type"],
            "properties": {"type": kinds, "json_schema": json_schema},
            "additionalProperties": False,
            "description": "constrain the output: JSON mode, or JSON validating a schema (enforced token by token)",
        }
        super().__init__(metadata=schema, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Grammar | None:
        if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
            raise ValidationError('Must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", ...}.')
        kind = value["type"]
        if set(value) - {"type", "json_schema"}:
            raise ValidationError("response_format takes type and json_schema.")
        spec = value.get("json_schema")
        if "json_schema" in value or kind == "json_schema":  # checked whatever the type, as the spec declares it
            _check_json_schema(spec)
        if kind == "text":
            return None
        if kind == "json_object":
            return Grammar("json_object")
        try:
            return Grammar("json_schema", schema_source(spec.get("schema", {})))
        except ValidationError as exc:
            raise ValidationError(f"json_schema.schema: {exc.messages[0]}") from exc


def _check_json_schema(spec: Any) -> None:
    """Refuse a json_schema object that its declared shape (name required, four fields) does not allow."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or len(spec["name"]) > MAX_SCHEMA_NAME:
        raise ValidationError(f"json_schema must be an object with a name of at most {MAX_SCHEMA_NAME} characters.")
    if set(spec) - {"name", "description", "schema", "strict"}:
        raise ValidationError("json_schema takes name, description, schema and strict.")
    if not isinstance(spec.get("description", ""), str):
        raise ValidationError("json_schema.description must be a string.")
    if not isinstance(spec.get("schema", {}), dict):
        raise ValidationError("json_schema.schema must be an object.")
    if spec.get("strict") not in (None, True, False):
        raise ValidationError("json_schema.strict must be a boolean.")
