"""POST /v1/responses: the stateless subset of OpenAI's Responses API, on the chat path (messages, tools, grammar).

The body's `input` (a string, or message, `function_call` and `function_call_output` items) and `instructions`
become chat messages, its function tools the chat's tools (http/openai/tools.py), its `text.format` the grammar;
the answer's text is read into `message` and `function_call` output items by the same call reader. Nothing is
stored: `previous_response_id` and `store: true` are refused, since a server of independent workers keeps no
conversation state (a client sends the whole conversation each time, as with chat completions).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from marshmallow import Schema, ValidationError, fields, pre_load, validates_schema
from marshmallow.validate import Length, Range

from llmapi.config import Settings
from llmapi.engine.toolcalls import Arguments, CallStart, Content, Event
from llmapi.engine.types import GenerationRequest, GenerationResult, Grammar
from llmapi.http.answer import answer
from llmapi.http.fields import ErrorSchema, StrictBoolean, StrictFloat, StrictInteger, is_text, schema_source
from llmapi.http.jsonbody import Blueprint
from llmapi.http.openai.params import JSON_SCHEMA_PROPERTIES, MAX_SCHEMA_NAME, Unsupported
from llmapi.http.openai.schemas import MAX_MESSAGES, MAX_MODEL_CHARS, MAX_TEMPERATURE, MAX_USER_CHARS
from llmapi.http.openai.tools import MAX_TOOLS, ToolChoiceField, ToolPlan, ToolsField, call_id, plan
from llmapi.http.sse import event_schema
from llmapi.runtime.runner import Event as RunnerEvent

ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text")
EVENTS = event_schema("JSON: one Responses event (its `type`: response.created ... response.completed)")
ERRORS = [
    (400, "Invalid parameters, an unsupported parameter (previous_response_id, store), or too long for the context"),
    (401, "Missing or invalid API key"),
    (404, "Unknown model"),
    (503, "Model unavailable"),
]


def unicode_text(value: str) -> None:
    """Refuse text with an unpaired surrogate (no tokenizer can encode it)."""
    if not is_text(value):
        raise ValidationError("Must be valid Unicode text (it has an unpaired surrogate).")


def _refuse(index: int, key: str, message: str) -> ValidationError:
    return ValidationError({index: {key: [message]}})


def _text(index: int, content: Any) -> str:
    """A message item's content: a string, or a list of input_text / output_text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _refuse(index, "content", "Must be a string or a list of text parts.")
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise _refuse(index, "content", "Only text parts (input_text, output_text) are supported.")
        texts.append(part["text"])
    return "\n".join(texts)


def _item(index: int, item: Any) -> dict[str, Any]:
    """One input item as a chat message (a function call as an assistant's call, its output as a tool message)."""
    if not isinstance(item, dict):
        raise _refuse(index, "type", "Must be an object: a message, a function_call or a function_call_output.")
    kind = item.get("type", "message")
    if kind == "message":
        if item.get("role") not in ROLES:
            raise _refuse(index, "role", f"Must be one of: {', '.join(ROLES)}.")
        role = "system" if item["role"] == "developer" else item["role"]
        return {"role": role, "content": _text(index, item.get("content"))}
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str) or not item[key]:
                raise _refuse(index, key, "Must be a non-empty string.")
        call = {"id": item["call_id"], "type": "function"}
        call["function"] = {"name": item["name"], "arguments": item["arguments"]}
        return {"role": "assistant", "content": "", "tool_calls": [call]}
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str) or not item["call_id"]:
            raise _refuse(index, "call_id", "Must be a non-empty string.")
        output = item.get("output")
        text = output if isinstance(output, str) else _text(index, output)
        return {"role": "tool", "tool_call_id": item["call_id"], "content": text}
    raise _refuse(index, "type", "Only message, function_call and function_call_output items are supported.")


class InputField(fields.Field):
    """input: a string (one user message), or a list of message, function_call and function_call_output items."""

    def __init__(self, *, max_chars: int, **kwargs: Any) -> None:
        text = {"type": "string", "minLength": 1}
        part = {
            "type": "object",
            "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": list(TEXT_PARTS)}, "text": {"type": "string"}},
        }
        content = {"oneOf": [{"type": "string"}, {"type": "array", "items": part}]}
        message = {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "type": {"type": "string", "enum": ["message"]},
                "role": {"enum": list(ROLES)},
                "content": content,
            },
        }
        call = {
            "type": "object",
            "required": ["type", "call_id", "name", "arguments"],
            "properties": {"type": {"enum": ["function_call"]}, "call_id": text, "name": text, "arguments": text},
        }
        output = {
            "type": "object",
            "required": ["type", "call_id", "output"],
            "properties": {"type": {"enum": ["function_call_output"]}, "call_id": text, "output": {"type": "string"}},
        }
        item = {"oneOf": [message, call, output], "description": "a message, function_call or function_call_output"}
        many = {"type": "array", "items": item, "minItems": 1, "maxItems": MAX_MESSAGES}
        text = {"type": "string", "minLength": 1, "maxLength": max_chars}
        super().__init__(metadata={"oneOf": [text, many], **kwargs.pop("metadata", {})}, **kwargs)
        self.max_chars = max_chars

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> list[dict[str, Any]]:
        if isinstance(value, str) and value:
            messages = [{"role": "user", "content": value}]
        elif isinstance(value, list) and 0 < len(value) <= MAX_MESSAGES:
            messages = []
            for index, item in enumerate(value):
                message = _item(index, item)
                previous = messages[-1] if messages else None
                if message.get("tool_calls") and previous and previous.get("tool_calls"):
                    previous["tool_calls"] += message["tool_calls"]  # parallel calls: one assistant turn
                else:
                    messages.append(message)
        else:
            raise ValidationError(f"Must be a non-empty string or a list of 1 to {MAX_MESSAGES} items.")
        if sum(len(message["content"]) for message in messages) > self.max_chars:
            raise ValidationError(f"The contents together exceed {self.max_chars} characters.")
        if not is_text(json.dumps(messages, ensure_ascii=False)):
            raise ValidationError("Must be valid Unicode text (it has an unpaired surrogate).")
        return messages


class ResponseToolsField(ToolsField):
    """tools: function tools in the Responses shape ({"type": "function", "name", "parameters", ...})."""

    flat = True

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, list) or len(value) > MAX_TOOLS:
            raise ValidationError(f"Must be a list of at most {MAX_TOOLS} tools.")
        nested = []
        for index, tool in enumerate(value):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise _refuse(index, "type", "Only function tools are supported.")
            nested.append({"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}})
        return super()._deserialize(nested, attr, data, **kwargs)


class ResponseToolChoiceField(ToolChoiceField):
    """tool_choice: "none", "auto", "required", or {"type": "function", "name": ...}."""

    flat = True

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str | dict[str, str]:
        if isinstance(value, dict) and set(value) == {"type", "name"}:
            value = {"type": value["type"], "function": {"name": value["name"]}}
        return super()._deserialize(value, attr, data, **kwargs)


class TextField(fields.Field):
    """text: {"format": {"type": "text"}}, json_object, or {"type": "json_schema", "name", "schema", "strict"}."""

    def __init__(self, **kwargs: Any) -> None:
        plain = {
            "type": "object",
            "required": ["type"],
            "properties": {"type": {"type": "string", "enum": ["text", "json_object"]}},
            "additionalProperties": False,
        }
        json_schema = {
            "type": "object",
            "required": ["type", "name"],
            "properties": {"type": {"type": "string", "enum": ["json_schema"]}, **JSON_SCHEMA_PROPERTIES},
            "additionalProperties": False,
        }
        schema = {
            "type": "object",
            "properties": {"format": {"oneOf": [plain, json_schema]}},
            "additionalProperties": False,
            "description": "the output's format, enforced token by token as response_format",
        }
        super().__init__(metadata=schema, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Grammar | None:
        if not isinstance(value, dict) or set(value) - {"format"}:
            raise ValidationError('Must be {"format": {...}}.')
        spec = value.get("format") or {"type": "text"}
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "text" and set(spec) == {"type"}:
            return None
        if kind == "json_object" and set(spec) == {"type"}:
            return Grammar("json_object", param="text.format")
        if kind != "json_schema" or set(spec) - {"type", "name", "schema", "strict", "description"}:
            raise ValidationError("format must be text, json_object, or json_schema with name, schema and strict.")
        if spec.get("strict") not in (None, True, False) or not isinstance(spec.get("description", ""), str):
            raise ValidationError("format must be text, json_object, or json_schema with name, schema and strict.")
        if not isinstance(spec.get("name"), str) or len(spec["name"]) > MAX_SCHEMA_NAME:
            raise ValidationError(f"format.name must be a string of at most {MAX_SCHEMA_NAME} characters.")
        return Grammar("json_schema", schema_source(spec.get("schema")), param="text.format")


def request_schema(settings: Settings) -> type[Schema]:
    """The body of POST /v1/responses, with this app's limits."""
    limit = settings.max_new_tokens_limit

    class ResponseRequestSchema(Schema):
        """The body of POST /v1/responses."""

        model = fields.String(
            allow_none=True,
            validate=Length(min=1, max=MAX_MODEL_CHARS),
            metadata={"description": "the id /v1/models lists; optional", "example": settings.served_model},
        )
        input = InputField(required=True, max_chars=settings.max_prompt_chars)
        instructions = fields.String(
            allow_none=True,
            validate=[Length(max=settings.max_prompt_chars), unicode_text],
            metadata={"description": "a system message in front of the input"},
        )
        tools = ResponseToolsField(metadata={"description": "function tools (the Responses shape)"})
        tool_choice = ResponseToolChoiceField(allow_none=True)
        parallel_tool_calls = StrictBoolean(allow_none=True, load_default=True)
        max_output_tokens = StrictInteger(
            allow_none=True, load_default=settings.max_new_tokens_default, validate=Range(min=1, max=limit)
        )
        temperature = StrictFloat(allow_none=True, load_default=1.0, validate=Range(min=0, max=MAX_TEMPERATURE))
        top_p = StrictFloat(allow_none=True, load_default=1.0, validate=Range(min=0, max=1, min_inclusive=False))
        stream = StrictBoolean(allow_none=True, load_default=False)
        text = TextField(allow_none=True)
        user = fields.String(allow_none=True, validate=Length(max=MAX_USER_CHARS))
        # Stateless: nothing to continue from, nothing kept (see the module's docstring).
        previous_response_id = Unsupported()
        store = Unsupported(False)
        conversation = Unsupported()
        background = Unsupported(False)
        include = Unsupported([])
        truncation = Unsupported("disabled")
        reasoning = Unsupported()
        metadata = Unsupported({})
        service_tier = Unsupported("auto", "default")

        @pre_load
        def _null_is_absent(self, data: Any, **kwargs: Any) -> Any:
            # As on chat: an optional parameter sent as null is not sent (its default applies).
            if not isinstance(data, dict):
                return data
            return {key: value for key, value in data.items() if value is not None or key == "input"}

        @validates_schema
        def _choice_names_a_tool(self, data: dict[str, Any], **kwargs: Any) -> None:
            names = {tool["function"]["name"] for tool in data.get("tools") or ()}
            choice = data.get("tool_choice")
            if isinstance(choice, dict) and choice["name"] not in names:
                raise ValidationError(f"names the function `{choice['name']}`, which is not in tools.", "tool_choice")
            if choice not in (None, "none") and not names:
                raise ValidationError("is only allowed when tools are given.", "tool_choice")
            if (isinstance(choice, dict) or choice == "required") and data.get("text") is not None:
                raise ValidationError("text.format cannot be combined with a forced tool call.", "text")

    return ResponseRequestSchema


def conversation(args: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages of a request: its instructions, then its input."""
    instructions = args.get("instructions")
    return ([{"role": "system", "content": instructions}] if instructions else []) + args["input"]


def tool_plan(args: dict[str, Any]) -> ToolPlan:
    """The request's tool plan, as the chat route makes it."""
    tools = args.get("tools") or ()
    choice = args.get("tool_choice") or ("auto" if tools else "none")
    parallel = args.get("parallel_tool_calls", True) is not False
    return plan({"tools": tools, "tool_choice": choice, "parallel_tool_calls": parallel})


class ResponsesFormat:
    """/v1/responses: a response object, or its stream of typed events (no [DONE])."""

    done = None

    def __init__(self, model: str, args: dict[str, Any], tools: ToolPlan) -> None:
        self.tools = tools
        self.sequence = 0
        self.head: dict[str, Any] = {
            "id": "resp_" + uuid.uuid4().hex,
            "object": "response",
            "created_at": int(time.time()),
            "model": model,
            "status": "in_progress",
            "error": None,
            "incomplete_details": None,
            "instructions": args.get("instructions"),
            "max_output_tokens": args["max_output_tokens"],
            "parallel_tool_calls": tools.parallel,
            "temperature": args["temperature"],
            "top_p": args["top_p"],
            "tool_choice": _choice_out(args.get("tool_choice"), tools),
            "tools": [{"type": "function", **tool["function"]} for tool in tools.tools],
            "text": {"format": {"type": "text"}},
            "previous_response_id": None,
            "store": False,
            "truncation": "disabled",
            "metadata": {},
            "output": [],
            "usage": None,
        }

    def _read(self, text: str) -> list[Event]:
        """The whole text as the reader's events (all content when no call can be made)."""
        if not self.tools.active:
            return [Content(text)] if text else []
        reader = self.tools.reader()
        return reader.feed(text) + reader.finish()

    def body(self, results: Sequence[GenerationResult]) -> dict[str, Any]:
        """The response object, its output items read from the text."""
        (result,) = results
        items: list[dict[str, Any]] = []
        for event in self._read(result.text):
            self._add(items, event)
        return self._finished(items, result)

    def _add(self, items: list[dict[str, Any]], event: Event) -> None:
        """Grow the output items by one reader event."""
        if isinstance(event, Content):
            if not items or items[-1]["type"] != "message":
                items.append(_message(""))
            items[-1]["content"][0]["text"] += event.text
        elif isinstance(event, CallStart):
            items.append(_call(event.name))
        else:
            items[-1]["arguments"] += event.text

    def _finished(self, items: list[dict[str, Any]], result: GenerationResult) -> dict[str, Any]:
        """The response object once generation ended."""
        for item in items:
            item["status"] = "completed"
        incomplete = result.finish_reason in ("length", "timeout")
        usage = {
            "input_tokens": result.prompt_tokens,
            "input_tokens_details": {"cached_tokens": result.cached_tokens},
            "output_tokens": result.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": result.total_tokens,
        }
        details = {"reason": "max_output_tokens"} if result.finish_reason == "length" else None
        status = "incomplete" if incomplete else "completed"
        return {**self.head, "status": status, "incomplete_details": details, "output": items, "usage": usage}

    def events(self, events: Iterator[RunnerEvent]) -> Iterator[dict[str, Any]]:
        """response.created and .in_progress, each item's added/delta/done events, then response.completed."""
        yield self._event("response.created", response=self.head)
        yield self._event("response.in_progress", response=self.head)
        reader = self.tools.reader() if self.tools.active else None
        items: list[dict[str, Any]] = []
        for _, item in events:
            if isinstance(item, GenerationResult):
                said = reader.finish() if reader else []
            else:
                said = reader.feed(item.text) if reader else ([Content(item.text)] if item.text else [])
            for event in said:
                yield from self._stream(items, event)
            if isinstance(item, GenerationResult):
                if items:
                    yield from self._close(items)
                yield self._event("response.completed", response=self._finished(items, item))

    def _stream(self, items: list[dict[str, Any]], event: Event) -> Iterator[dict[str, Any]]:
        """The events of one reader event: a new item when it starts one (closing the last), then its delta."""
        opens = isinstance(event, CallStart) or (
            isinstance(event, Content) and (not items or items[-1]["type"] != "message")
        )
        if opens and items:
            yield from self._close(items)
        if opens:
            self._add(items, Content("") if isinstance(event, Content) else event)
            added = {**items[-1], "content": []} if items[-1]["type"] == "message" else items[-1]
            yield self._event("response.output_item.added", output_index=len(items) - 1, item=_copy(added))
            if items[-1]["type"] == "message":
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                yield self._event("response.content_part.added", **self._at(items), content_index=0, part=part)
        if isinstance(event, Content):
            self._add(items, event)
            yield self._event(
                "response.output_text.delta", **self._at(items), content_index=0, delta=event.text, logprobs=[]
            )
        elif isinstance(event, Arguments):
            self._add(items, event)
            yield self._event("response.function_call_arguments.delta", **self._at(items), delta=event.text)

    def _close(self, items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The done events of the last item."""
        item = items[-1]
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            yield self._event(
                "response.output_text.done", **self._at(items), content_index=0, text=part["text"], logprobs=[]
            )
            yield self._event("response.content_part.done", **self._at(items), content_index=0, part=_copy(part))
        else:
            yield self._event("response.function_call_arguments.done", **self._at(items), arguments=item["arguments"])
        yield self._event("response.output_item.done", output_index=len(items) - 1, item=_copy(item))

    @staticmethod
    def _at(items: list[dict[str, Any]]) -> dict[str, Any]:
        return {"item_id": items[-1]["id"], "output_index": len(items) - 1}

    def _event(self, kind: str, **fields_: Any) -> dict[str, Any]:
        """One typed event with the next sequence number."""
        event = {"type": kind, "sequence_number": self.sequence, **fields_}
        self.sequence += 1
        return event


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    """A snapshot of an item as it stands (later deltas must not change an event already written)."""
    if item["type"] == "message":
        return {**item, "content": [dict(part) for part in item["content"]]}
    return dict(item)


def _message(text: str) -> dict[str, Any]:
    """An assistant message item."""
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": "msg_" + uuid.uuid4().hex,
        "type": "message",
        "role": "assistant",
        "status": "in_progress",
        "content": [part],
    }


def _call(name: str) -> dict[str, Any]:
    """A function_call item."""
    return {
        "id": "fc_" + uuid.uuid4().hex,
        "type": "function_call",
        "call_id": call_id(),
        "name": name,
        "arguments": "",
        "status": "in_progress",
    }


def _choice_out(choice: Any, tools: ToolPlan) -> Any:
    """tool_choice as the response object states it."""
    if isinstance(choice, dict):
        return {"type": "function", "name": choice["name"]}
    return choice or ("auto" if tools.tools else "none")


class ResponseObjectSchema(Schema):
    """POST /v1/responses: the response object (its output items as OpenAI defines them)."""

    id = fields.String(required=True, metadata={"example": "resp_8f2c..."})
    object = fields.String(required=True, metadata={"example": "response"})
    created_at = fields.Integer(required=True)
    model = fields.String(required=True)
    status = fields.String(required=True, metadata={"description": "completed, or incomplete (max_output_tokens)"})
    error = fields.Raw(allow_none=True)
    incomplete_details = fields.Raw(allow_none=True)
    instructions = fields.String(allow_none=True)
    max_output_tokens = fields.Integer(allow_none=True)
    parallel_tool_calls = fields.Boolean()
    temperature = fields.Float(allow_none=True)
    top_p = fields.Float(allow_none=True)
    tool_choice = fields.Raw()
    tools = fields.List(fields.Dict())
    text = fields.Dict()
    previous_response_id = fields.String(allow_none=True)
    store = fields.Boolean()
    truncation = fields.String()
    metadata = fields.Dict()
    output = fields.List(fields.Dict(), required=True, metadata={"description": "message and function_call items"})
    usage = fields.Dict(allow_none=True, metadata={"description": "input_tokens, output_tokens, total_tokens"})


def register(blp: Blueprint, settings: Settings, served_model: Any, validation_status: int) -> None:
    """Add POST /responses to the /v1 blueprint (its error dialect is the blueprint's)."""
    example = {"input": "Say hello.", "max_output_tokens": min(16, settings.max_new_tokens_limit)}

    def responses(args: dict[str, Any]) -> Any:
        """Answer `input` (and `instructions`) with the model's chat template, statelessly.

        With `"stream": true` the answer is `text/event-stream`: `data: {event}` with OpenAI's event types,
        from `response.created` to `response.completed` (no `[DONE]`).
        """
        model = served_model(args, settings)
        tools = tool_plan(args)
        request = GenerationRequest(
            prompt="",
            max_new_tokens=args["max_output_tokens"],
            do_sample=True,
            temperature=args["temperature"],
            top_p=args["top_p"],
            timeout_s=settings.timeout_default_ms / 1000.0,
            stream=args["stream"],
            grammar=tools.grammar or args.get("text"),
        )
        fmt = ResponsesFormat(model, args, tools)
        return answer([request], fmt, stream=args["stream"], messages=conversation(args), tools=tools.rendered)

    view: Any = responses
    for status, description in ERRORS:
        view = blp.alt_response(status, schema=ErrorSchema, description=description)(view)
    view = blp.alt_response(200, schema=EVENTS, content_type="text/event-stream")(view)
    view = blp.response(200, ResponseObjectSchema)(view)
    view = blp.arguments(request_schema(settings)(), error_status_code=validation_status, example=example)(view)
    blp.route("/responses", methods=["POST"])(view)
