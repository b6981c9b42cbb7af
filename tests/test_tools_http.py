"""Tool calling on /v1/chat/completions with a scripted fake engine, and the Hermes call reader on its own."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from llmapi.engine.chat import default_template
from llmapi.engine.toolcalls import Arguments, CallReader, CallStart, Content, generic_messages, read_all
from llmapi.engine.types import GenerationRequest
from tests.conftest import FakeEngine, FakeHandle
from tests.test_http import assert_error
from tests.test_openai_http import events, post

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class ScriptedHandle(FakeHandle):
    """A generation that answers a fixed text, in small pieces, ending on end-of-sequence."""

    def result(self):
        result = super().result()
        return type(result)(**{**result.__dict__, "finish_reason": "eos"})


class ScriptedEngine(FakeEngine):
    """A fake engine that answers `reply` (in pieces of three characters) and records what it rendered."""

    def __init__(self, reply: str = "") -> None:
        super().__init__()
        self.reply = reply
        self.rendered: list[tuple[Any, Any]] = []

    def submit(self, request: GenerationRequest) -> FakeHandle:
        super().submit(request)
        pieces = [self.reply[i : i + 3] for i in range(0, len(self.reply), 3)]
        return ScriptedHandle(request, pieces)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Any = None) -> str:
        self.rendered.append((messages, tools))
        return default_template(generic_messages(messages, tools))[-40:]  # short: the fake context is 64 words


@pytest.fixture
def scripted() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def app(make_app, scripted):
    return make_app(scripted, served_model_name="tiny", max_new_tokens_limit=48, max_prompt_chars=2000)


def chat(client, **body: Any):
    return post(client, "/chat/completions", {"messages": ASK, "max_tokens": 8, **body})


def test_tools_auto_call_is_answered_in_openai_shape(client, scripted):
    scripted.reply = CALL
    body = chat(client, tools=[WEATHER]).get_json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert scripted.rendered[-1][1] == [WEATHER]


def test_tools_text_around_calls_is_content_without_markup(client, scripted):
    scripted.reply = "Let me look. " + CALL + CALL.replace("Paris", "Rome")
    message = chat(client, tools=[WEATHER]).get_json()["choices"][0]["message"]
    assert message["content"] == "Let me look."
    assert [json.loads(c["function"]["arguments"])["city"] for c in message["tool_calls"]] == ["Paris", "Rome"]
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_tools_parallel_false_keeps_the_first_call(client, scripted):
    scripted.reply = CALL + CALL.replace("Paris", "Rome")
    message = chat(client, tools=[WEATHER], parallel_tool_calls=False).get_json()["choices"][0]["message"]
    assert len(message["tool_calls"]) == 1


def test_tools_stream_deltas_reassemble_to_the_body(client, scripted):
    scripted.reply = "Sure. " + CALL
    whole = chat(client, tools=[WEATHER]).get_json()["choices"][0]
    chunks = events(chat(client, tools=[WEATHER], stream=True))
    assert chunks[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    first = calls[0]
    assert set(first) == {"index", "id", "type", "function"} and first["function"]["name"] == "get_weather"
    assert all(set(call) == {"index", "function"} and set(call["function"]) == {"arguments"} for call in calls[1:])
    assert len(calls) > 2  # the arguments came in pieces
    assert content == whole["message"]["content"]
    assert (
        "".join(call["function"]["arguments"] for call in calls)
        == whole["message"]["tool_calls"][0]["function"]["arguments"]
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert "<tool" not in content


def test_tools_required_and_named_ask_the_engine_for_a_grammar(client, scripted):
    scripted.reply = CALL.replace("Paris", "Oslo")
    body = chat(client, tools=[WEATHER, TIME], tool_choice="required").get_json()
    assert body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
    grammar = scripted.requests[-1].grammar
    assert grammar.kind == "structural_tag" and grammar.param == "tools"
    calls = json.loads(grammar.source)["format"]
    assert calls["type"] == "tags_with_separator" and calls["at_least_one"] and not calls["stop_after_first"]
    assert [tag["begin"] for tag in calls["tags"]] == [
        '<tool_call>\n{"name": "get_weather", "arguments": ',
        '<tool_call>\n{"name": "get_time", "arguments": ',
    ]
    assert calls["tags"][0]["content"]["json_schema"] == WEATHER["function"]["parameters"]

    named = {"type": "function", "function": {"name": "get_weather"}}
    body = chat(client, tools=[WEATHER, TIME], tool_choice=named).get_json()
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    calls = json.loads(scripted.requests[-1].grammar.source)["format"]
    assert len(calls["tags"]) == 1 and calls["stop_after_first"]
    assert scripted.requests[-1].grammar.param == "tools.0.function.parameters"


def test_tools_auto_with_a_strict_tool_holds_calls_to_its_schema(client, scripted):
    scripted.reply = "Fine."
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    chat(client, tools=[strict, TIME])
    free = json.loads(scripted.requests[-1].grammar.source)["format"]
    assert free["type"] == "triggered_tags" and free["triggers"] == ["<tool_call>"]
    assert [tag["content"]["json_schema"] for tag in free["tags"]] == [
        WEATHER["function"]["parameters"],
        {"type": "object"},
    ]
    chat(client, tools=[WEATHER])
    assert scripted.requests[-1].grammar is None


def test_tools_none_renders_no_tools_and_reads_no_calls(client, scripted):
    scripted.reply = "Plain answer."
    message = chat(client, tools=[WEATHER], tool_choice="none").get_json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Plain answer."}
    assert scripted.rendered[-1][1] is None


def test_tools_round_trip_messages_are_accepted(client, scripted):
    scripted.reply = "It is sunny."
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "developer", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    body = post(client, "/chat/completions", {"messages": messages, "tools": [WEATHER], "max_tokens": 4}).get_json()
    assert body["choices"][0]["message"]["content"] == "It is sunny."
    rendered = generic_messages(scripted.rendered[-1][0], [WEATHER])
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.\n\n# Tools")
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered[2]["content"]
    )
    assert rendered[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


def many_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
            "tools.0.function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
            "tools.0.function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools.0.type"),
        ({"tools": many_tools()}, "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages.1.tool_call_id"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls"),
        ({"tools": [WEATHER], "logprobs": True}, "logprobs"),
    ],
)
def test_tools_bad_input_is_a_400_naming_the_field(client, body, param):
    assert_error(chat(client, **body), 400, param=param)


def test_tools_developer_role_is_a_system_message(client, scripted):
    scripted.reply = "ok"
    post(client, "/chat/completions", {"messages": [{"role": "developer", "content": "Be brief."}, *ASK]})
    assert scripted.rendered[-1][0][0] == {"role": "system", "content": "Be brief."}


def summary(events_: list[Any]) -> tuple[str, dict[int, list[str]]]:
    content = "".join(e.text for e in events_ if isinstance(e, Content))
    calls: dict[int, list[str]] = {}
    for event in events_:
        if isinstance(event, CallStart):
            calls[event.index] = [event.name, ""]
        elif isinstance(event, Arguments):
            calls[event.index][1] += event.text
    return content, calls


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CALL, ("", {0: ["get_weather", '{"city": "Paris"}']})),
        ('Hi <tool_call>{"name": "f", "arguments": {"x": "}{"}}</tool_call>', ("Hi", {0: ["f", '{"x": "}{"}']})),
        (
            '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"q": 1}}]</tool_call>',
            ("", {0: ["a", "{}"], 1: ["b", '{"q": 1}']}),
        ),
        ('<tool_call>{"arguments": {"q": 1}, "name": "a"}</tool_call> done', ("done", {0: ["a", '{"q": 1}']})),
        ("<tool_call>not json</tool_call>", ("<tool_call>not json</tool_call>", {})),
        ("a < b and <tool", ("a < b and <tool", {})),
        (
            '<tool_call>\n{"name": "a", "arguments": {"q": [1, 2]}}\n</tool_call>\n' + CALL,
            ("", {0: ["a", '{"q": [1, 2]}'], 1: ["get_weather", '{"city": "Paris"}']}),
        ),
        ('<tool_call>\n{"name": "a", "arguments": {"q": 1', ("", {0: ["a", '{"q": 1']})),
    ],
)
def test_reader_streamed_equals_whole(text, expected):
    assert summary(list(read_all(text))) == expected
    reader = CallReader()
    streamed = [event for char in text for event in reader.feed(char)] + reader.finish()
    assert summary(streamed) == expected


def test_reader_holds_back_a_partial_tag():
    reader = CallReader()
    assert summary(reader.feed("Hello <tool_")) == ("Hello", {})
    assert summary(reader.feed('call>{"name": "f", "arguments": {')) == ("", {0: ["f", "{"]})
