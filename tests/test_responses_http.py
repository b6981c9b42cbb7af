"""POST /v1/responses with a scripted fake engine: the response object, its events, tools, refusals."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.test_http import assert_error
from tests.test_openai_http import events, post
from tests.test_tools_http import CALL, ScriptedEngine

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def scripted() -> ScriptedEngine:
    return ScriptedEngine()


@pytest.fixture
def app(make_app, scripted):
    return make_app(scripted, served_model_name="tiny", max_new_tokens_limit=48, max_prompt_chars=2000)


def respond(client, **body: Any):
    return post(client, "/responses", {"input": "Weather in Paris?", "max_output_tokens": 8, **body})


def test_responses_text_answer_in_openai_shape(client, scripted):
    scripted.reply = "Hello there."
    body = respond(client, instructions="Be brief.").get_json()
    assert body["object"] == "response" and body["id"].startswith("resp_") and body["status"] == "completed"
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"] == [{"type": "output_text", "text": "Hello there.", "annotations": [], "logprobs": []}]
    assert set(body["usage"]) >= {"input_tokens", "output_tokens", "total_tokens"}
    messages, _ = scripted.rendered[-1]
    assert messages[0] == {"role": "system", "content": "Be brief."}


def test_responses_function_call_items(client, scripted):
    scripted.reply = CALL
    body = respond(client, tools=[WEATHER]).get_json()
    (item,) = body["output"]
    assert item["type"] == "function_call" and item["name"] == "get_weather"
    assert item["call_id"].startswith("call_") and json.loads(item["arguments"]) == {"city": "Paris"}
    assert body["tools"][0]["name"] == "get_weather"


def test_responses_input_items_become_the_conversation(client, scripted):
    scripted.reply = "Sunny."
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    respond(client, input=items, tools=[WEATHER])
    messages, tools = scripted.rendered[-1]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert tools[0]["function"]["name"] == "get_weather"


def test_responses_stream_events_in_order(client, scripted):
    scripted.reply = "Sure. " + CALL
    stream = events(respond(client, tools=[WEATHER], stream=True))
    kinds = [event["type"] for event in stream]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [event["sequence_number"] for event in stream] == list(range(len(stream)))
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.delta"):
        assert kind in kinds
    assert "response.function_call_arguments.delta" in kinds and "response.output_item.done" in kinds
    text = "".join(e["delta"] for e in stream if e["type"] == "response.output_text.delta")
    arguments = "".join(e["delta"] for e in stream if e["type"] == "response.function_call_arguments.delta")
    final = stream[-1]["response"]["output"]
    assert text == final[0]["content"][0]["text"] == "Sure."
    assert arguments == final[1]["arguments"]


def test_responses_text_format_is_a_grammar(client, scripted):
    scripted.reply = '{"a": 1}'
    text = {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}}
    respond(client, text=text)
    assert scripted.requests[-1].grammar.param == "text.format"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": ""}, "input"),
        ({"max_output_tokens": 49}, "max_output_tokens"),
    ],
)
def test_responses_bad_input_is_a_400_naming_the_field(client, body, param):
    assert_error(respond(client, **body), 400, param=param)
