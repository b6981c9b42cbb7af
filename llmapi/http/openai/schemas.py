"""Marshmallow schemas of the OpenAI-compatible API (/v1): requests with our limits, responses in OpenAI's form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, pre_load, validates_schema
from marshmallow.validate import Length, OneOf, Range

from llmapi.config import Settings
from llmapi.engine.chat import ROLES
from llmapi.http.fields import (
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_TOP_K,
    PenaltiesSchema,
    StrictBoolean,
    StrictFloat,
    StrictInteger,
    UsageSchema,
)
from llmapi.http.openai.messages import message_schema
from llmapi.http.openai.params import ContentField, OpenAIStopField, PromptField, ResponseFormatField, Unsupported
from llmapi.http.openai.tools import ToolCallSchema, ToolsSchema
from llmapi.http.sse import event_schema

MAX_MESSAGES = 256
MAX_MODEL_CHARS = 256
MAX_USER_CHARS = 256
MAX_TEMPERATURE = 2.0  # OpenAI's documented range (/generate follows transformers' wider one)
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI's legacy API
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions' top_logprobs
CHUNK_EVENT_SCHEMA = event_schema("JSON: a chunk (or an error object), or `[DONE]` at the end")


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


class ChoiceSchema(Schema):
    """What every choice carries: its index, its tokens' log-probabilities when asked, how it ended."""

    index = fields.Integer(required=True)
    logprobs = fields.Raw(allow_none=True)
    finish_reason = fields.String(required=True, metadata={"description": "stop, length or timeout"})


def logprobs_field(shape: str) -> fields.Raw:
    """A choice's logprobs, `shape` saying what it holds when asked for."""
    raw = "the model's raw log-softmax, before temperature, penalties and biases"
    return fields.Raw(allow_none=True, metadata={"description": f"{shape}; {raw}"})


class CompletionChoiceSchema(ChoiceSchema):
    """One completion."""

    class Meta:
        fields = ("index", "text", "logprobs", "finish_reason")  # in OpenAI's order

    index = fields.Integer(required=True, metadata={"description": "prompt index x n + choice index"})
    text = fields.String(required=True)
    logprobs = logprobs_field(
        "with `logprobs`: `tokens`, `token_logprobs`, `top_logprobs` (a dict per position) and `text_offset` (into"
        " `text`)"
    )


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


class ChatChoiceSchema(ChoiceSchema):
    """One chat completion."""

    class Meta:
        fields = ("index", "message", "logprobs", "finish_reason")  # in OpenAI's order

    message = fields.Nested(ChatMessageOutSchema, required=True)
    logprobs = logprobs_field("with `logprobs: true`: `content`, a list of {token, logprob, bytes, top_logprobs}")


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
    sampling = sampling_schema(settings)
    return OpenAISchemas(completion=completion_schema(settings, sampling), chat=chat_schema(settings, sampling))


def max_tokens_field(settings: Settings, *, least: int, **metadata: Any) -> StrictInteger:
    """max_tokens: at least `least` (0: score the prompt only), at most MAX_NEW_TOKENS_LIMIT."""
    limit = settings.max_new_tokens_limit
    return StrictInteger(
        allow_none=True,
        load_default=settings.max_new_tokens_default,
        validate=Range(min=least, max=limit),
        metadata={"example": min(16, limit), **metadata},
    )


class SamplingChecks(PenaltiesSchema):
    """The checks /v1/completions and /v1/chat/completions share (their fields: sampling_schema)."""

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


def sampling_schema(settings: Settings) -> type[Schema]:
    """The parameters /v1/completions and /v1/chat/completions share, with this app's limits."""
    limit, choices = settings.max_new_tokens_limit, settings.openai_max_choices

    class SamplingSchema(SamplingChecks):
        """The parameters /v1/completions and /v1/chat/completions share."""

        model = fields.String(
            allow_none=True,
            validate=Length(min=1, max=MAX_MODEL_CHARS),
            metadata={"description": "the id /v1/models lists; optional", "example": settings.served_model},
        )
        max_tokens = max_tokens_field(settings, least=1)
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

    return SamplingSchema


class CompletionChecks(Schema):
    """The checks of a /v1/completions body (its fields: completion_schema)."""

    max_choices = 1  # OPENAI_MAX_CHOICES, set per app

    @validates_schema
    def _choices_fit(self, data: dict[str, Any], **kwargs: Any) -> None:
        if len(data.get("prompt", ())) * data.get("n", 1) > self.max_choices:
            raise ValidationError(f"prompts x n must be at most {self.max_choices}.", "n")

    @validates_schema
    def _zero_needs_echo(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("max_tokens") == 0 and not data.get("echo"):
            raise ValidationError("0 is allowed only with echo: true (score the prompt).", "max_tokens")
        if data.get("echo") and data.get("stream") and "logprobs" in data:
            raise ValidationError("echo with logprobs is not served in a stream; send stream: false.", "stream")
        if data.get("echo") and data.get("stream") and any(not isinstance(p, str) for p in data.get("prompt", ())):
            raise ValidationError("echo of a token-id prompt is not served in a stream.", "stream")


def completion_schema(settings: Settings, sampling: type[Schema]) -> type[Schema]:
    """The body of POST /v1/completions, with this app's limits."""

    class CompletionRequestSchema(CompletionChecks, sampling):  # type: ignore[valid-type,misc]
        """The body of POST /v1/completions."""

        max_choices = settings.openai_max_choices
        prompt = PromptField(
            required=True,
            max_chars=settings.max_prompt_chars,
            max_items=settings.openai_max_choices,
            metadata={"example": "Artificial Intelligence is"},
        )
        max_tokens = max_tokens_field(
            settings, least=0, description="0 only with echo: score the prompt, generate nothing"
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

    return CompletionRequestSchema


class ChatChecks(Schema):
    """The checks of a /v1/chat/completions body (its fields: chat_schema)."""

    max_prompt_chars = 1  # MAX_PROMPT_CHARS, set per app

    @validates_schema
    def _messages_fit(self, data: dict[str, Any], **kwargs: Any) -> None:
        if sum(len(message["content"]) for message in data.get("messages", ())) > self.max_prompt_chars:
            raise ValidationError(f"The contents together exceed {self.max_prompt_chars} characters.", "messages")

    @validates_schema
    def _top_needs_logprobs(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("top_logprobs") and not data.get("logprobs"):
            raise ValidationError("needs logprobs: true.", "top_logprobs")

    @post_load
    def _newer_name_wins(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        if "max_completion_tokens" in data:
            data["max_tokens"] = data.pop("max_completion_tokens")
        return data


def chat_schema(settings: Settings, sampling: type[Schema]) -> type[Schema]:
    """The body of POST /v1/chat/completions, with this app's limits."""
    limit = settings.max_new_tokens_limit

    # One chat message (http/openai/messages.py), its content limited like a prompt.
    ChatMessageSchema = message_schema(ContentField(max_chars=settings.max_prompt_chars, allow_none=True))

    class ChatCompletionRequestSchema(ChatChecks, sampling, ToolsSchema):  # type: ignore[valid-type,misc]
        """The body of POST /v1/chat/completions."""

        max_prompt_chars = settings.max_prompt_chars
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

    return ChatCompletionRequestSchema
