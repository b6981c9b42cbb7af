"""Tool calls, /v1/responses and /v1/embeddings on a real gunicorn serving the real instruct model, through the
clients agents use: the official `openai` client, LangChain (`langchain-openai`) and the OpenAI Agents SDK."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import GGUF_CACHE, KEY, Server, launch

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city's name"}},
            "required": ["city"],
        },
    },
}
CONVERT = {
    "type": "function",
    "function": {
        "name": "convert_currency",
        "description": "Convert an amount of money from one currency to another.",
        "parameters": {
            "type": "object",
            "properties": {
                "amount": {"type": "number"},
                "from_currency": {"type": "string"},
                "to_currency": {"type": "string"},
            },
            "required": ["amount", "from_currency", "to_currency"],
        },
    },
}
TOOLS = [WEATHER, CONVERT]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "Tell me the current weather in Tokyo."}]


@pytest.fixture(scope="module")
def real_server(real_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One gunicorn worker on the real model for the whole module."""
    env = {"MODEL_NAME": real_model, "GGUF_CACHE_DIR": str(GGUF_CACHE), "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "4",
           "MAX_BATCH_SIZE": "8"}  # fmt: skip
    running = launch(tmp_path_factory.mktemp("agents"), **env)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def oai(real_server: Server) -> openai.OpenAI:
    """The official client, pointed at the server."""
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(oai: openai.OpenAI) -> str:
    """The served model's id."""
    return oai.models.list().data[0].id


def valid_calls(calls: Any) -> list[tuple[str, dict[str, Any]]]:
    """Check every call's shape and that its arguments validate its tool's parameters; return (name, args)."""
    assert calls, "no tool call"
    assert len({call.id for call in calls}) == len(calls)
    out = []
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        out.append((call.function.name, arguments))
    return out


def chat(oai: openai.OpenAI, model: str, **options: Any) -> Any:
    """One greedy chat completion with the tools."""
    body = {"model": model, "messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 64, **options}
    return oai.chat.completions.create(**body)


def test_real_required_answers_a_valid_call(oai, model):
    choice = chat(oai, model, tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    ((name, arguments),) = valid_calls(choice.message.tool_calls)
    assert name == "get_weather" and "tokyo" in arguments["city"].lower()


def test_real_named_function_is_called(oai, model):
    named = {"type": "function", "function": {"name": "convert_currency"}}
    choice = chat(oai, model, tool_choice=named).choices[0]
    ((name, _),) = valid_calls(choice.message.tool_calls)
    assert name == "convert_currency" and choice.finish_reason == "tool_calls"


def test_real_auto_answers_text_or_valid_calls_without_markup(oai, model):
    message = chat(oai, model, tool_choice="auto").choices[0].message
    if message.tool_calls:
        valid_calls(message.tool_calls)
    if message.content is not None:
        assert "<tool_call>" not in message.content and "</tool_call>" not in message.content
    assert message.content or message.tool_calls


def test_real_none_answers_text(oai, model):
    choice = chat(oai, model, tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.message.content and choice.finish_reason != "tool_calls"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_real_streamed_calls_reassemble_to_the_unstreamed_answer(oai, model, tool_choice):
    whole = chat(oai, model, tool_choice=tool_choice).choices[0].message.tool_calls
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in chat(oai, model, tool_choice=tool_choice, stream=True):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        assert not choice.delta.content
        for delta in choice.delta.tool_calls or ():
            if delta.id:  # a call's first delta: its index, id, type and name
                assert delta.type == "function" and delta.function.name and delta.index not in calls
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            calls[delta.index]["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (call.function.name, call.function.arguments) for call in whole
    ]


def test_real_two_turn_tool_round_trip(oai, model):
    first = chat(oai, model, tool_choice="required").choices[0].message
    (call,) = first.tool_calls
    messages = [
        {"role": "developer", "content": "You are a helpful assistant."},
        *ASK,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
    ]
    answer = oai.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0, max_tokens=40)
    choice = answer.choices[0]
    assert choice.message.content and "<tool_call>" not in choice.message.content


def test_real_parallel_calls_where_asked(oai, model):
    ask = [{"role": "user", "content": "What is the weather in Paris and in London?"}]
    many = chat(oai, model, messages=ask, tool_choice="required", max_tokens=96).choices[0].message.tool_calls
    valid_calls(many)
    one = chat(oai, model, messages=ask, tool_choice="required", parallel_tool_calls=False).choices[0]
    assert len(valid_calls(one.message.tool_calls)) == 1


def too_many_tools() -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f"tool_{i}"}} for i in range(129)]


def bad_parameters(parameters: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"tools": bad_parameters("a string")}, "tools.0.function.parameters"),
        ({"tools": bad_parameters({"type": "array"})}, "tools.0.function.parameters"),
        ({"tool_choice": {"type": "function", "function": {"name": "not_a_tool"}}}, "tool_choice"),
        ({"messages": [*ASK, {"role": "tool", "content": "21 C"}]}, "messages.1.tool_call_id"),
        ({"tools": too_many_tools()}, "tools"),
        (
            {
                "tools": bad_parameters({"type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}),
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_real_bad_tool_input_is_a_400_naming_the_field(oai, model, options, param):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(oai, model, **options)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"


def test_real_responses_text_and_stream(oai, model):
    response = oai.responses.create(model=model, input="Say hello.", instructions="Be brief.", max_output_tokens=16)
    assert response.status in ("completed", "incomplete") and response.output_text
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    kinds, text = [], ""
    with oai.responses.stream(model=model, input="Say hello.", max_output_tokens=16) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert text and final.output_text == text


def test_real_responses_function_tool(oai, model):
    tools = [{"type": "function", **WEATHER["function"]}]
    response = oai.responses.create(model=model, input=ASK[0]["content"], tools=tools, tool_choice="required")
    (call,) = [item for item in response.output if item.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    follow = oai.responses.create(
        model=model,
        input=[
            *ASK,
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
        ],
        tools=tools,
        max_output_tokens=32,
    )
    assert follow.output_text or any(item.type == "function_call" for item in follow.output)
    stream_kinds = [
        event.type
        for event in oai.responses.create(
            model=model, input=ASK[0]["content"], tools=tools, tool_choice="required", stream=True
        )
    ]
    assert "response.function_call_arguments.delta" in stream_kinds and stream_kinds[-1] == "response.completed"


def test_real_responses_refuse_state(oai, model):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.responses.create(model=model, input="hi", previous_response_id="resp_123")
    assert caught.value.body["param"] == "previous_response_id"


TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "Stock markets fell sharply on Monday."]


def test_real_embeddings_float_base64_and_batched_equals_solo(oai, model):
    batched = oai.embeddings.create(model=model, input=TEXTS)
    assert [item.index for item in batched.data] == [0, 1, 2] and batched.usage.prompt_tokens > 0
    solo = [oai.embeddings.create(model=model, input=text).data[0].embedding for text in TEXTS]
    for item, alone in zip(batched.data, solo):
        assert item.embedding == pytest.approx(alone, abs=1e-3)  # bf16 on some CPUs: rounding, not a change
        assert sum(x * x for x in item.embedding) == pytest.approx(1.0, abs=1e-3)
    raw = oai.with_options().embeddings.with_raw_response.create(model=model, input=TEXTS[0], encoding_format="base64")
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(solo[0])}f", base64.b64decode(encoded))
    assert list(decoded) == pytest.approx(solo[0], abs=1e-6)


def test_real_embedding_past_the_context_names_its_input(oai, model, real_server):
    too_long = [[1] * 9000]
    body = real_server.post("/v1/embeddings", {"input": [[1, 2], *too_long]})
    assert body.status_code == 400 and body.json()["error"]["param"] == "input.1"


def test_real_langchain_tools_and_structured_output(real_server, model):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    llm = ChatOpenAI(model=model, base_url=real_server.url + "/v1", api_key=KEY, temperature=0, max_tokens=64)
    bound = llm.bind_tools([WEATHER, CONVERT], tool_choice="get_weather")
    (call,) = bound.invoke(ASK[0]["content"]).tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], SCHEMAS["get_weather"])
    required = llm.bind_tools([WEATHER, CONVERT], tool_choice="any").invoke("Convert 100 dollars to euros.")
    assert required.tool_calls and all(c["name"] in SCHEMAS for c in required.tool_calls)

    class Weather(BaseModel):
        """The weather in a city."""

        city: str
        temperature_c: int

    answer = llm.with_structured_output(Weather, method="function_calling").invoke("It is 21 C in Paris.")
    assert isinstance(answer, Weather)


def test_real_langchain_embeddings(real_server, model):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model=model, base_url=real_server.url + "/v1", api_key=KEY, check_embedding_ctx_length=False
    )
    documents = embeddings.embed_documents(TEXTS)
    query = embeddings.embed_query("Which city is the capital of France?")
    assert len(documents) == 3 and len(query) == len(documents[0])


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_real_agents_sdk_runs_a_tool_to_its_final_answer(real_server, model, api):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    client = openai.AsyncOpenAI(base_url=real_server.url + "/v1", api_key=KEY, max_retries=0)
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is sunny and 21 C in {city}."

    if api == "responses":
        llm: Any = agents.OpenAIResponsesModel(model=model, openai_client=client)
    else:
        llm = agents.OpenAIChatCompletionsModel(model=model, openai_client=client)
    agent = agents.Agent(
        name="weather",
        instructions="Answer questions about the weather with the get_weather tool.",
        tools=[get_weather],
        model=llm,
        # The first turn must call the tool; the SDK then resets tool_choice to auto for the final answer.
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=48),
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert calls and isinstance(result.final_output, str) and result.final_output
