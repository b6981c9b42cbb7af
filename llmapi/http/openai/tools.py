"""Tool calling on /v1/chat/completions: the request fields, the plan they make, and the answer's tool_calls.

`tool_choice` "auto" lets the model answer text or `<tool_call>` blocks (engine/toolcalls.py reads them);
"required" and a named function are guaranteed by the engine's grammar (see `plan`): the answer can then only be
calls of the allowed tools, in the same markup, their arguments validating the tools' `parameters`. "none" leaves
the tools out of the prompt. Whichever way, the answer has OpenAI's shape.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from marshmallow import Schema, ValidationError, fields, validates_schema

from llmapi.engine.toolcalls import CLOSE, OPEN, Arguments, CallReader, CallStart, Content, Event, read_all
from llmapi.engine.types import GenerationResult, Grammar, Piece
from llmapi.http.fields import StrictBoolean, schema_source
from llmapi.http.openai.formats import ChatFormat, finish_reason
from llmapi.runtime.runner import Event as RunnerEvent

MAX_TOOLS = 128  # OpenAI's limit
MAX_DESCRIPTION = 4096
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
CHOICES = ("none", "auto", "required")
NO_PARAMETERS = {"type": "object", "properties": {}}


def call_id() -> str:
    """A fresh tool-call id in OpenAI's form."""
    return "call_" + uuid.uuid4().hex[:24]


def _function(index: int, tool: Any) -> dict[str, Any]:
    """One tool, checked: {"type": "function", "function": {name, description?, parameters?, strict?}}."""

    def refuse(where: str, message: str) -> ValidationError:
        path: Any = [message]
        for key in reversed(where.split(".")):
            path = {key: path}
        return ValidationError({index: path})

    if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) != {"type", "function"}:
        raise refuse("type", 'Must be {"type": "function", "function": {...}}.')
    function = tool["function"]
    if not isinstance(function, dict) or set(function) - {"name", "description", "parameters", "strict"}:
        raise refuse("function", "Takes name, description, parameters and strict.")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise refuse("function.name", "Must be 1 to 64 letters, digits, underscores or dashes.")
    if not isinstance(function.get("description", ""), str) or len(function.get("description", "")) > MAX_DESCRIPTION:
        raise refuse("function.description", f"Must be a string of at most {MAX_DESCRIPTION} characters.")
    parameters = function.get("parameters", NO_PARAMETERS)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise refuse("function.parameters", 'Must be a JSON schema of an object ({"type": "object", ...}).')
    try:
        schema_source(parameters)
    except ValidationError as exc:
        raise refuse("function.parameters", exc.messages[0]) from exc
    if function.get("strict") not in (None, True, False):
        raise refuse("function.strict", "Must be a boolean.")
    out = {"name": name, "parameters": parameters}
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("strict"):
        out["strict"] = True
    return {"type": "function", "function": out}


class ToolsField(fields.Field):
    """tools: up to MAX_TOOLS function tools, each with a JSON-schema object as its parameters."""

    flat = False  # the Responses API's tools carry the function's fields beside "type"

    def __init__(self, **kwargs: Any) -> None:
        function: dict[str, Any] = {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "description": {"type": "string", "maxLength": MAX_DESCRIPTION},
                "parameters": {"type": "object", "description": "a JSON schema of an object"},
                "strict": {"type": "boolean", "nullable": True},
            },
            "additionalProperties": False,
        }
        kind = {"type": "string", "enum": ["function"]}
        tool = {
            "type": "object",
            "required": ["type", "function"],
            "properties": {"type": kind, "function": function},
            "additionalProperties": False,
        }
        if self.flat:
            tool = {**function, "required": ["type", "name"], "properties": {"type": kind, **function["properties"]}}
        schema = {"type": "array", "items": tool, "maxItems": MAX_TOOLS, **kwargs.pop("metadata", {})}
        super().__init__(metadata=schema, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> tuple[dict[str, Any], ...]:
        if not isinstance(value, list) or len(value) > MAX_TOOLS:
            raise ValidationError(f"Must be a list of at most {MAX_TOOLS} tools.")
        tools = tuple(_function(index, tool) for index, tool in enumerate(value))
        names = [tool["function"]["name"] for tool in tools]
        if len(set(names)) < len(names):
            raise ValidationError("Two tools have the same name.")
        return tools


class ToolChoiceField(fields.Field):
    """tool_choice: "none", "auto", "required", or {"type": "function", "function": {"name": ...}}."""

    flat = False  # the Responses API names the function beside "type"

    def __init__(self, **kwargs: Any) -> None:
        named: dict[str, Any] = {
            "type": "object",
            "required": ["type", "function"],
            "properties": {
                "type": {"type": "string", "enum": ["function"]},
                "function": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}},
                    "additionalProperties": False,
                },
            },
            "additionalProperties": False,
        }
        if self.flat:
            named = {**named, "required": ["type", "name"], "properties": {"type": named["properties"]["type"]}}
            named["properties"]["name"] = {"type": "string"}
        schema = {"oneOf": [{"type": "string", "enum": list(CHOICES)}, named], "example": "none"}
        schema.update(kwargs.pop("metadata", {}))
        super().__init__(metadata=schema, **kwargs)

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str | dict[str, str]:
        if value in CHOICES:
            return value
        function = value.get("function") if isinstance(value, dict) else None
        if (
            not isinstance(function, dict)
            or value.get("type") != "function"
            or set(value) != {"type", "function"}
            or set(function) != {"name"}
            or not isinstance(function["name"], str)
        ):
            raise ValidationError(
                'Must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.'
            )
        return {"name": function["name"]}


class ToolsSchema(Schema):
    """The tool fields of a chat request (mixed into its schema)."""

    tools = ToolsField(metadata={"description": f"function tools the model may call (at most {MAX_TOOLS})"})
    tool_choice = ToolChoiceField(
        metadata={"description": "none, auto (the default with tools), required, or one named function"}
    )
    parallel_tool_calls = StrictBoolean(
        load_default=True, metadata={"description": "false: at most one call per answer"}
    )

    @validates_schema
    def _choice_names_a_tool(self, data: dict[str, Any], **kwargs: Any) -> None:
        tools = data.get("tools") or ()
        choice = data.get("tool_choice", "auto" if tools else "none")
        names = {tool["function"]["name"] for tool in tools}
        if isinstance(choice, dict) and choice["name"] not in names:
            raise ValidationError(f"names the function `{choice['name']}`, which is not in tools.", "tool_choice")
        if choice != "none" and not tools:
            raise ValidationError("is only allowed when tools are given.", "tool_choice")
        if tools and choice != "none" and data.get("logprobs"):
            raise ValidationError(
                "logprobs are not served with tools; send tool_choice none or no logprobs.", "logprobs"
            )
        if (isinstance(choice, dict) or choice == "required") and data.get("response_format") is not None:
            raise ValidationError("response_format cannot be combined with a forced tool call.", "response_format")


@dataclass(frozen=True)
class ToolPlan:
    """What a request's tool fields ask for: the tools to render, whether calls are read, the grammar if any."""

    tools: tuple[dict[str, Any], ...] = ()
    choice: str = "none"  # none, auto, required, or "named"
    parallel: bool = True
    grammar: Grammar | None = field(default=None)

    @property
    def active(self) -> bool:
        """Whether the answer may hold calls."""
        return bool(self.tools) and self.choice != "none"

    @property
    def rendered(self) -> list[dict[str, Any]] | None:
        """The tools the prompt lists (none for tool_choice none)."""
        return list(self.tools) if self.active else None

    def reader(self) -> CallReader:
        """A fresh reader of one choice's text."""
        return CallReader(parallel=self.parallel)


def plan(args: dict[str, Any]) -> ToolPlan:
    """The tool plan of a validated chat request.

    The grammar is xgrammar's structural tag: each call is `<tool_call>\n{"name": "<tool>", "arguments": ` then
    JSON validating the tool's parameters, then `}\n</tool_call>`, the very markup the prompt asks for. "required"
    allows only calls (at least one; one when parallel_tool_calls is false) and a named function only its call;
    "auto" leaves the model free until it opens a call, then holds the call to a tool's shape, its arguments to
    the tool's parameters when the tool is `strict` (to any JSON object otherwise). The answer is read back by the
    same reader whichever way.
    """
    tools = tuple(args.get("tools") or ())
    choice = args.get("tool_choice", "auto" if tools else "none")
    parallel = args["parallel_tool_calls"]
    if not tools or choice == "none":
        return ToolPlan(tools, "none", parallel=parallel)
    functions = [tool["function"] for tool in tools]
    if choice == "auto":
        if not any(function.get("strict") for function in functions):
            return ToolPlan(tools, "auto", parallel=parallel)
        tags = [_tag(function, strict=bool(function.get("strict"))) for function in functions]
        free = {"type": "triggered_tags", "triggers": [OPEN], "tags": tags, "stop_after_first": not parallel}
        return ToolPlan(tools, "auto", parallel=parallel, grammar=_grammar(free, "tools"))
    if choice == "required":
        tags = [_tag(function) for function in functions]
        return ToolPlan(tools, "required", parallel=parallel, grammar=_grammar(_calls(tags, parallel), "tools"))
    index = next(i for i, function in enumerate(functions) if function["name"] == choice["name"])
    grammar = _grammar(_calls([_tag(functions[index])], False), f"tools.{index}.function.parameters")
    return ToolPlan(tools, "named", parallel=parallel, grammar=grammar)


def _tag(function: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """The structural tag of one call of `function`: its arguments held to its parameters (or any object)."""
    schema = function["parameters"] if strict else {"type": "object"}
    content = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
    begin = f'{OPEN}\n{{"name": {json.dumps(function["name"])}, "arguments": '
    return {"type": "tag", "begin": begin, "content": content, "end": f"}}\n{CLOSE}"}


def _calls(tags: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """Calls only: at least one; one when `parallel` is false.

    No separator between calls: after `</tool_call>` a newline invited SmolLM2-135M-Instruct to open call after
    call (4 of 6 of bench/agents.py's prompts repeated calls, 2 ran out of tokens), while with end-of-sequence
    or `<tool_call>` itself as the only ways on, all 6 ended after one call (greedy).
    """
    return {
        "type": "tags_with_separator",
        "tags": tags,
        "separator": "",
        "at_least_one": True,
        "stop_after_first": not parallel,
    }


def _grammar(format_: dict[str, Any], param: str) -> Grammar:
    """The engine's grammar for a structural tag, named after the request field a refusal should name."""
    return Grammar("structural_tag", json.dumps({"type": "structural_tag", "format": format_}), param=param)


@dataclass(frozen=True)
class Said(Piece):
    """A reader's event passed through the base format's event loop as a piece (its text a mark, so that the loop,
    which skips empty pieces, hands it to delta())."""

    event: Event | None = None


def said(event: Event) -> Said:
    """Wrap a reader's event for the base format's loop."""
    return Said(text="\x00", event=event)


class ToolChatFormat(ChatFormat):
    """/v1/chat/completions with tools: content and tool_calls read from the model's text, whole or streamed."""

    def __init__(self, model: str, tools: ToolPlan, *, n: int, include_usage: bool = False) -> None:
        super().__init__(model, n=n, include_usage=include_usage)
        self.plan = tools
        self._ids: dict[tuple[int, int], str] = {}  # (choice, call index) -> the call's id in a stream
        self._called: set[int] = set()

    def choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """A finished choice: content (null when empty) and the calls it made."""
        events = list(read_all(result.text, parallel=self.plan.parallel))
        content = "".join(event.text for event in events if isinstance(event, Content))
        calls: dict[int, dict[str, Any]] = {}
        for event in events:
            if isinstance(event, CallStart):
                calls[event.index] = {"id": call_id(), "type": "function", "function": {"name": event.name}}
                calls[event.index]["function"]["arguments"] = ""
            elif isinstance(event, Arguments):
                calls[event.index]["function"]["arguments"] += event.text
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if calls:
            message["tool_calls"] = list(calls.values())
        return {
            "index": index,
            "message": message,
            "logprobs": None,
            "finish_reason": self._reason(result, bool(calls)),
        }

    def events(self, events: Iterator[RunnerEvent]) -> Iterator[dict[str, Any]]:
        """The base stream, on the reader's events instead of the raw pieces."""
        return super().events(self._read(events))

    def _read(self, events: Iterator[RunnerEvent]) -> Iterator[RunnerEvent]:
        """Feed each choice's pieces to its reader; pass on what it says, and the result after its last words."""
        readers = [self.plan.reader() for _ in range(self.choices)]
        for index, item in events:
            heard = readers[index].finish() if isinstance(item, GenerationResult) else readers[index].feed(item.text)
            for event in heard:
                yield index, said(event)
            if isinstance(item, GenerationResult):
                yield index, item

    def delta(self, index: int, piece: Piece) -> dict[str, Any]:
        """A chunk of content, a call's start (index, id, type, name) or a piece of its arguments."""
        event = piece.event if isinstance(piece, Said) else Content(piece.text)
        if isinstance(event, Content):
            delta: dict[str, Any] = {"content": event.text}
        elif isinstance(event, CallStart):
            self._called.add(index)
            self._ids[index, event.index] = call_id()
            function = {"name": event.name, "arguments": ""}
            delta = {"tool_calls": [{"index": event.index, "id": self._ids[index, event.index], "type": "function"}]}
            delta["tool_calls"][0]["function"] = function
        else:
            delta = {"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def closing(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The last chunk of a streamed choice: tool_calls when it made any."""
        reason = self._reason(result, index in self._called)
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}

    @staticmethod
    def _reason(result: GenerationResult, called: bool) -> str:
        """tool_calls when the model made calls and ended on its own; otherwise the usual reason."""
        return "tool_calls" if called and result.finish_reason in ("eos", "stop") else finish_reason(result)


class FunctionCallSchema(Schema):
    """A call's function: its name and its arguments as a JSON string."""

    name = fields.String(required=True)
    arguments = fields.String(required=True, metadata={"description": "JSON text of the arguments"})


class ToolCallSchema(Schema):
    """One tool call of an assistant message."""

    id = fields.String(required=True, metadata={"example": "call_8f2c..."})
    type = fields.String(required=True, metadata={"example": "function"})
    function = fields.Nested(FunctionCallSchema, required=True)
