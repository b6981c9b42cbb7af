"""Tool calls in the Hermes format: the generic tool prompt, a conversation's calls as text, and the reader.

A model whose chat template takes `tools` gets them through its template. Any other model gets the one generic
rendering below, the format vLLM and llama.cpp use for ChatML models (Hermes, Qwen): the tools as JSON lines
inside `<tools></tools>` in the system message, each call the model makes as `<tool_call>{"name": ...,
"arguments": {...}}</tool_call>`, and each tool's answer back in a user turn inside `<tool_response>`. The reader
(`CallReader`) takes the model's text piece by piece and splits it into content and calls, holding back any text
that could still become a `<tool_call>` tag, so that call markup never reaches the content.

Plain Python (no torch): the HTTP side reads calls with it, the engine's chat rendering writes them with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"

TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The generic system-prompt text that lists `tools` (OpenAI's tool objects) for a model without tool support."""
    return TOOL_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def call_text(call: Mapping[str, Any]) -> str:
    """One call of an assistant message (OpenAI's shape) as the markup the model is asked to write."""
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"])
    except (TypeError, ValueError):
        arguments = function["arguments"]  # not JSON: shown as the client sent it
    body = json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def generic_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, str]]:
    """Plain {role, content} messages for any template: tools in the system message, calls and answers as text.

    The tool prompt joins the first system message (after its text) or becomes one; an assistant's calls follow
    its content; consecutive tool answers share one user turn, each inside <tool_response></tool_response>.
    """
    out: list[dict[str, str]] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            answer = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_answers") == "yes":
                out[-1]["content"] += "\n" + answer
            else:
                out.append({"role": "user", "content": answer, "tool_answers": "yes"})
            continue
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(call_text(call) for call in message["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        out.append({"role": role, "content": content})
    for message in out:
        message.pop("tool_answers", None)
    if tools:
        prompt = tool_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that takes tools: calls' arguments as objects, as Hugging Face templates expect."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call["function"])
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except (TypeError, ValueError):
                    pass
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        out.append(message)
    return out


# What a reader reports, in order: text of the content, a call's start (its name), a piece of a call's arguments.
@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    name: str


@dataclass(frozen=True)
class Arguments:
    index: int
    text: str


Event = Content | CallStart | Arguments

# `{"name": "f", "arguments": ` (or "parameters", as some models write), in a list or not: arguments that stream.
HEADER = re.compile(r'\s*\[?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
NEXT = re.compile(r"\s*\}\s*,?\s*")  # after a call's arguments: its closing brace, and a comma before the next


class ValueEnd:
    """Finds where one JSON value ends, fed a piece at a time (strings and escapes respected)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False

    def feed(self, text: str) -> int | None:
        """Take `text`; return the offset just past the value's end within it, or None if it goes on."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
                continue
            if not self.started and char.isspace():
                continue
            self.started = True
            if char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
            elif self.depth == 0 and (char in ",}]" or char.isspace()):
                return i  # a bare number, true, false or null ended
        return None


class CallReader:
    """Splits a model's text into content and tool calls, piece by piece: the same events whole or streamed.

    A call whose name comes first (as the prompt and the grammar write it) streams its arguments as they arrive;
    any other block is read whole at its end, and a block that holds no valid call is given back as content, as
    the model wrote it. Whitespace around blocks is dropped. With `parallel` false only the first call is kept.
    """

    def __init__(self, *, parallel: bool = True) -> None:
        self.parallel = parallel
        self.calls = 0  # calls started so far; the current one is calls - 1
        self.buffer = ""
        self.pending_space = ""  # content's trailing whitespace, held until we know no call follows it
        self.value = ValueEnd()
        self.state = "text"

    def feed(self, piece: str) -> list[Event]:
        """Take the next piece of text; return what can be said for sure so far."""
        return self._run(piece, final=False)

    def finish(self) -> list[Event]:
        """The text has ended: say what is left (a block never closed is read as far as it goes)."""
        return self._run("", final=True)

    def _run(self, piece: str, *, final: bool) -> list[Event]:
        self.buffer += piece
        events: list[Event] = []
        while getattr(self, f"_{self.state}")(events, final):
            pass
        if self.parallel:
            return events
        return [event for event in events if isinstance(event, Content) or event.index == 0]

    def _start(self, events: list[Event], name: str) -> None:
        events.append(CallStart(self.calls, name))
        self.calls += 1
        self.value = ValueEnd()

    # Each state consumes what it can of the buffer and returns whether another state may go on from there.

    def _text(self, events: list[Event], final: bool) -> bool:
        at = self.buffer.find(OPEN)
        if at >= 0:
            text, self.pending_space = (self.pending_space + self.buffer[:at]).rstrip(), ""
            if text:
                events.append(Content(text))
            self.buffer, self.state = self.buffer[at + len(OPEN) :], "call"
            return True
        keep = 0 if final else _partial_tag(self.buffer)
        text = self.pending_space + self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(self.buffer) - keep :]
        stripped = text if final else text.rstrip()
        self.pending_space = text[len(stripped) :]
        if stripped:
            events.append(Content(stripped))
        return False

    def _call(self, events: list[Event], final: bool) -> bool:
        match = HEADER.match(self.buffer)
        if match:
            self._start(events, json.loads(f'"{match.group(1)}"'))
            self.buffer, self.state = self.buffer[match.end() :], "arguments"
            return True
        end = self.buffer.find(CLOSE)
        if end < 0 and not final:
            return False
        block, self.buffer = (self.buffer[:end], self.buffer[end + len(CLOSE) :]) if end >= 0 else (self.buffer, "")
        calls = parse_block(block)
        if calls is None:  # no call after all: the model's text, as it wrote it
            events.append(Content(f"{OPEN}{block}{CLOSE if end >= 0 else ''}"))
        for name, arguments in calls or ():
            self._start(events, name)
            events.append(Arguments(self.calls - 1, arguments))
        self.state = "after"
        return True

    def _arguments(self, events: list[Event], final: bool) -> bool:
        if not self.value.started:  # the value's leading whitespace is not part of the arguments
            self.buffer = self.buffer.lstrip()
        end = self.value.feed(self.buffer)
        text = self.buffer if end is None else self.buffer[:end]
        if text:
            events.append(Arguments(self.calls - 1, text))
        self.buffer = "" if end is None else self.buffer[end:]
        if end is None and not final:
            return False
        self.state = "between"
        return True

    def _between(self, events: list[Event], final: bool) -> bool:
        """After a call's arguments: its closing brace, then another call, the block's end, or the text's end."""
        match = NEXT.match(self.buffer)
        rest = self.buffer[match.end() :] if match else self.buffer
        if HEADER.match(rest):
            self.buffer, self.state = rest, "call"
            return True
        end = self.buffer.find(CLOSE)
        if end >= 0:
            self.buffer, self.state = self.buffer[end + len(CLOSE) :], "after"
            return True
        if final:
            self.buffer, self.state = "", "after"
            return True
        return False

    def _after(self, events: list[Event], final: bool) -> bool:
        """After a block: drop the whitespace that follows it, then read text again."""
        self.buffer = self.buffer.lstrip()
        if not self.buffer and not final:
            return False
        self.state = "text"
        return True


def parse_block(block: str) -> list[tuple[str, str]] | None:
    """The (name, arguments as JSON text) of the calls in one block's text, or None if it holds no valid call."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append((item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls or None


def _partial_tag(text: str) -> int:
    """How many characters at the end of `text` could be the start of an opening tag (to hold back)."""
    for size in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


def read_all(text: str, *, parallel: bool = True) -> Iterator[Event]:
    """Every event of a whole text (what a body answers; a stream's events concatenate to the same)."""
    reader = CallReader(parallel=parallel)
    yield from reader.feed(text)
    yield from reader.finish()
