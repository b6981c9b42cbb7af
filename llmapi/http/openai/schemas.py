"""Marshmallow schemas of the OpenAI-compatible API (/v1): requests with our limits, responses in OpenAI's form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, pre_load, validates_schema
from marshmallow.validate import Length, OneOf, Range

from llmapi.config import Settings
from llmapi.engine.chat import ROLES
from llmapi.engine.types import Grammar
from llmapi.http.fields import (
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TOKEN_ID,
    MAX_TOP_K,
    PenaltiesSchema,
    StopField,
    StrictBoolean,
    StrictFloat,
    StrictInteger,
    UsageSchema,
    is_text,
    schema_source,
)
from llmapi.http.openai.messages import message_schema
from llmapi.http.openai.tools import ToolCallSchema, ToolsSchema
from llmapi.http.sse import event_schema

MAX_MESSAGES = 256
MAX_MODEL_CHARS = 256
MAX_USER_CHARS = 256
MAX_TEMPERATURE = 2.0  # OpenAI's documented range (/generate follows transformers' wider one)
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI's legacy API
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions' top_logprobs
MAX_SCHEMA_NAME = 64
CHUNK_EVENT_SCHEMA = event_schema("JSON: a chunk (or an error object), or `[DONE]` at the end")


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


class ResponseFormatField(fields.Field):
    """response_format: text, json_object (any JSON object) or json_schema; loads as a Grammar, or None for text."""

    def __init__(self, **kwargs: Any) -> None:
        kinds = {"type": "string", "enum": ["text", "json_object", "json_schema"]}
        json_schema = {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "maxLength": MAX_SCHEMA_NAME},
                "description": {"type": "string"},
                "schema": {"type": "object", "description": "the JSON schema the answer must validate against"},
                "strict": {"type": "boolean", "nullable": True},
            },
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


class StreamOptionsSchema(Schema):
    """stream_options: what a stream carries besides the text."""

    include_usage = StrictBoolean(
        allow_none=True, metadata={"description": "send a last chunk with usage (and empty choices)"}
    )
    include_obfuscation = Unsupported(False)


class MessageSchema(Schema):
    """One chat message."""

    role = fields.String(required=True, validate=OneOf(ROLES, error="Must be one of: system, user, assistant."))
    content = fields.Raw(required=True)  # replaced per app by a ContentField with the configured limit


class ModelSchema(Schema):
    """One model served."""

    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"example": "model"})
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)


class ModelListSchema(Schema):
    """GET /v1/models."""

    object = fields.String(required=True, metadata={"example": "list"})
    data = fields.List(fields.Nested(ModelSchema), required=True)


class CompletionChoiceSchema(Schema):
    """One completion."""

    index = fields.Integer(required=True, metadata={"description": "prompt index x n + choice index"})
    text = fields.String(required=True)
    logprobs = fields.Raw(
        allow_none=True,
        metadata={
            "description": "with `logprobs`: `tokens`, `token_logprobs`, `top_logprobs` (a dict per position) and"
            " `text_offset` (into `text`); the model's raw log-softmax, before temperature, penalties and biases"
        },
    )
    finish_reason = fields.String(required=True, metadata={"description": "stop, length or timeout"})


class ResponseHeadSchema(Schema):
    """What every /v1 completion body carries besides its choices."""

    id = fields.String(required=True, metadata={"example": "cmpl-8f2c..."})
    object = fields.String(required=True, metadata={"example": "text_completion"})
    created = fields.Integer(required=True, metadata={"description": "Unix time"})
    model = fields.String(required=True)
    choices = fields.List(fields.Dict(), required=True)  # each kind declares its own; declared here for the order
    usage = fields.Nested(UsageSchema, required=True, metadata={"description": "each prompt once, every choice"})


class CompletionResponseSchema(ResponseHeadSchema):
    """POST /v1/completions."""

    choices = fields.List(fields.Nested(CompletionChoiceSchema), required=True)


class ChatMessageOutSchema(Schema):
    """The assistant's reply."""

    role = fields.String(required=True, metadata={"example": "assistant"})
    content = fields.String(required=True, allow_none=True, metadata={"description": "null when only tools are called"})
    tool_calls = fields.List(fields.Nested(ToolCallSchema), metadata={"description": "the calls, when any"})


class ChatChoiceSchema(Schema):
    """One chat completion."""

    index = fields.Integer(required=True)
    message = fields.Nested(ChatMessageOutSchema, required=True)
    logprobs = fields.Raw(
        allow_none=True,
        metadata={
            "description": "with `logprobs: true`: `content`, a list of {token, logprob, bytes, top_logprobs}; the"
            " model's raw log-softmax, before temperature, penalties and biases"
        },
    )
    finish_reason = fields.String(required=True, metadata={"description": "stop, length or timeout"})


class ChatCompletionResponseSchema(ResponseHeadSchema):
    """POST /v1/chat/completions: `id` chatcmpl-..., `object` chat.completion."""

    choices = fields.List(fields.Nested(ChatChoiceSchema), required=True)


@dataclass(frozen=True)
class OpenAISchemas:
    """The /v1 request schemas built for one app's limits."""

    completion: type[Schema]
    chat: type[Schema]


def build(settings: Settings) -> OpenAISchemas:
    """Make the /v1 request schemas with the limits in `settings` baked in (so the OpenAPI spec shows them)."""
    limit, choices = settings.max_new_tokens_limit, settings.openai_max_choices

    class SamplingSchema(PenaltiesSchema):
        """The parameters /v1/completions and /v1/chat/completions share."""

        model = fields.String(
            allow_none=True,
            validate=Length(min=1, max=MAX_MODEL_CHARS),
            metadata={"description": "the id /v1/models lists; optional", "example": settings.served_model},
        )
        max_tokens = StrictInteger(
            allow_none=True,
            load_default=settings.max_new_tokens_default,
            validate=Range(min=1, max=limit),
            metadata={"example": min(16, limit)},
        )
        temperature = StrictFloat(
            allow_none=True,
            load_default=1.0,
            validate=Range(min=0, max=MAX_TEMPERATURE),
            metadata={"description": "0 = greedy"},
        )
        top_p = StrictFloat(allow_none=True, load_default=1.0, validate=Range(min=0, max=1, min_inclusive=False))
        n = StrictInteger(
            allow_none=True,
            load_default=1,
            validate=Range(min=1, max=choices),
            metadata={"description": f"choices per prompt; prompts x n at most {choices}"},
        )
        stop = OpenAIStopField(allow_none=True)
        seed = StrictInteger(
            allow_none=True,
            validate=Range(min=0, max=MAX_SEED),
            metadata={"description": "choice i of each prompt samples with seed + i"},
        )
        stream = StrictBoolean(allow_none=True, load_default=False)
        stream_options = fields.Nested(
            StreamOptionsSchema,
            allow_none=True,
            metadata={"description": "no effect without stream: bodies carry usage"},
        )
        user = fields.String(
            allow_none=True, validate=Length(max=MAX_USER_CHARS), metadata={"description": "accepted, not used"}
        )
        # vLLM's extra sampling parameters
        top_k = StrictInteger(
            load_default=0,
            validate=Range(min=-1, max=MAX_TOP_K),
            metadata={"description": "sample from the k most likely tokens; 0 or -1: all (vLLM's extra)"},
        )
        min_p = StrictFloat(
            load_default=0.0,
            validate=Range(min=0, max=1),
            metadata={"description": "drop tokens less than min_p times as likely as the most likely (vLLM's extra)"},
        )
        repetition_penalty = StrictFloat(
            load_default=1.0,
            validate=Range(min=0, max=MAX_REPETITION_PENALTY, min_inclusive=False),
            metadata={"description": "CTRL's penalty on prompt and generated tokens; 1 = none (vLLM's extra)"},
        )
        min_tokens = StrictInteger(
            load_default=0,
            validate=Range(min=0, max=limit),
            metadata={"description": "end-of-sequence suppressed until this many tokens (vLLM's extra)"},
        )

        @validates_schema
        def _min_below_max(self, data: dict[str, Any], **kwargs: Any) -> None:
            top = data.get("max_completion_tokens", data.get("max_tokens", 0))
            if data.get("min_tokens", 0) > top:
                raise ValidationError("must not exceed max_tokens.", "min_tokens")

        @pre_load
        def _null_is_absent(self, data: Any, **kwargs: Any) -> Any:
            # OpenAI's API treats an optional parameter sent as null as not sent; so do we.
            if not isinstance(data, dict):
                return data
            return {key: value for key, value in data.items() if value is not None or key in ("prompt", "messages")}

    class CompletionRequestSchema(SamplingSchema):
        """The body of POST /v1/completions."""

        prompt = PromptField(
            required=True,
            max_chars=settings.max_prompt_chars,
            max_items=choices,
            metadata={"example": "Artificial Intelligence is"},
        )
        max_tokens = StrictInteger(
            allow_none=True,
            load_default=settings.max_new_tokens_default,
            validate=Range(min=0, max=limit),
            metadata={"example": min(16, limit), "description": "0 only with echo: score the prompt, generate nothing"},
        )
        echo = StrictBoolean(
            load_default=False,
            allow_none=True,
            metadata={"description": "prepend the prompt; with logprobs, its tokens are scored too (the first: null)"},
        )
        best_of = Unsupported(1)  # no server-side ranking of candidates
        suffix = Unsupported("")
        logprobs = StrictInteger(
            validate=Range(min=0, max=MAX_COMPLETION_LOGPROBS),
            metadata={"description": "log-probability of each token, and of this many most likely alternatives"},
        )
        response_format = ResponseFormatField()

        @validates_schema
        def _choices_fit(self, data: dict[str, Any], **kwargs: Any) -> None:
            if len(data.get("prompt", ())) * data.get("n", 1) > choices:
                raise ValidationError(f"prompts x n must be at most {choices}.", "n")

        @validates_schema
        def _zero_needs_echo(self, data: dict[str, Any], **kwargs: Any) -> None:
            if data.get("max_tokens") == 0 and not data.get("echo"):
                raise ValidationError("0 is allowed only with echo: true (score the prompt).", "max_tokens")
            if data.get("echo") and data.get("stream") and "logprobs" in data:
                raise ValidationError("echo with logprobs is not served in a stream; send stream: false.", "stream")
            if data.get("echo") and data.get("stream") and any(not isinstance(p, str) for p in data.get("prompt", ())):
                raise ValidationError("echo of a token-id prompt is not served in a stream.", "stream")

    # One chat message (http/openai/messages.py), its content limited like a prompt.
    ChatMessageSchema = message_schema(ContentField(max_chars=settings.max_prompt_chars, allow_none=True))

    class ChatCompletionRequestSchema(SamplingSchema, ToolsSchema):
        """The body of POST /v1/chat/completions."""

        messages = fields.List(
            fields.Nested(ChatMessageSchema),
            required=True,
            validate=Length(min=1, max=MAX_MESSAGES),
            metadata={"example": [{"role": "user", "content": "Say hello."}]},
        )
        max_completion_tokens = StrictInteger(
            allow_none=True,
            validate=Range(min=1, max=limit),
            metadata={"description": "max_tokens under its newer name; wins when both are sent"},
        )
        logprobs = StrictBoolean(
            load_default=False, metadata={"description": "return each generated token's log-probability"}
        )
        top_logprobs = StrictInteger(
            validate=Range(min=0, max=MAX_TOP_LOGPROBS),
            metadata={"description": "with logprobs: this many most likely alternatives per position"},
        )
        functions = Unsupported([])
        function_call = Unsupported("none")
        response_format = ResponseFormatField()
        modalities = Unsupported(["text"])
        audio = Unsupported()
        prediction = Unsupported()
        reasoning_effort = Unsupported()
        web_search_options = Unsupported()
        store = Unsupported(False)
        metadata = Unsupported({})
        service_tier = Unsupported("auto", "default")

        @validates_schema
        def _messages_fit(self, data: dict[str, Any], **kwargs: Any) -> None:
            if sum(len(message["content"]) for message in data.get("messages", ())) > settings.max_prompt_chars:
                raise ValidationError(
                    f"The contents together exceed {settings.max_prompt_chars} characters.", "messages"
                )

        @validates_schema
        def _top_needs_logprobs(self, data: dict[str, Any], **kwargs: Any) -> None:
            if data.get("top_logprobs") and not data.get("logprobs"):
                raise ValidationError("needs logprobs: true.", "top_logprobs")

        @post_load
        def _newer_name_wins(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            if "max_completion_tokens" in data:
                data["max_tokens"] = data.pop("max_completion_tokens")
            return data

    return OpenAISchemas(completion=CompletionRequestSchema, chat=ChatCompletionRequestSchema)
