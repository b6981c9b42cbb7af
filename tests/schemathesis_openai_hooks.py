"""schemathesis hooks for /v1: the request rules of the OpenAI routes that JSON Schema cannot state.

Imported by the schemathesis hooks module (SCHEMATHESIS_HOOKS) so that its positive cases obey them.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from llmapi.engine.chat import default_template
from llmapi.engine.toolcalls import generic_messages

# The fuzzed server's model (the tiny GPT-2) attends over 1024 positions; a byte-level BPE token is at least
# one byte, so a rendered chat prompt of B UTF-8 bytes is at most B tokens.
CONTEXT_TOKENS = 1024


def _schema(case: schemathesis.Case, name: str) -> dict[str, Any]:
    """Schema `name` of the spec the case was generated from (its limits are the server's)."""
    return case.operation.schema.raw_schema["components"]["schemas"][name]


def completion_fits(case: schemathesis.Case, body: dict[str, Any]) -> bool:
    """prompts x n within the n maximum (OPENAI_MAX_CHOICES)."""
    prompts = body.get("prompt")
    single = not isinstance(prompts, list) or (bool(prompts) and type(prompts[0]) is int)  # text, or one id list
    count = 1 if single else len(prompts)
    return count * (body.get("n") or 1) <= _schema(case, "CompletionRequest")["properties"]["n"]["maximum"]


def _text(content: Any) -> str:
    """A message's content as the server reads it: a string, or its text parts joined with newlines."""
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


def chat_fits(case: schemathesis.Case, body: dict[str, Any]) -> bool:
    """All contents within MAX_PROMPT_CHARS together, and the rendered prompt plus max_tokens within the context."""
    request = _schema(case, "ChatCompletionRequest")["properties"]
    message = _schema(case, request["messages"]["items"]["$ref"].rsplit("/", 1)[-1])["properties"]
    messages = [{**m, "content": _text(m.get("content") or "")} for m in body["messages"]]
    if sum(len(m["content"]) for m in messages) > message["content"]["oneOf"][0]["maxLength"]:
        return False
    new_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or request["max_tokens"]["default"]
    tools = body.get("tools") if body.get("tool_choice") != "none" else None
    prompt = default_template(generic_messages(messages, tools))
    return len(prompt.encode("utf-8")) + new_tokens <= CONTEXT_TOKENS


def _plain_parameters(tool: dict[str, Any]) -> bool:
    """Whether a tool's parameters give a grammar nothing to refuse (a fuzzed JSON schema mostly would)."""
    parameters = tool.get("parameters", tool.get("function", {}).get("parameters"))
    return parameters is None or parameters in ({}, {"type": "object"})


def tools_fit(tools: Any, choice: Any, *, named: str | None, forced_format: bool) -> bool:
    """The tool rules stated in words: unique names, object parameters, a named choice among the tools, no
    choice without tools, no output format with a forced call; and no grammar from a fuzzed schema."""
    tools = tools or []
    functions = [tool.get("function", tool) for tool in tools]
    names = [function.get("name") for function in functions]
    if len(set(names)) < len(names):
        return False
    if any(
        not isinstance(f.get("parameters", {}), dict) or f.get("parameters", {}).get("type", "object") != "object"
        for f in functions
    ):
        return False
    if choice not in (None, "none") and not tools:
        return False
    if named is not None and named not in names:
        return False
    forced = named is not None or choice == "required"
    if forced and forced_format:
        return False
    grammar = forced or any(f.get("strict") for f in functions)
    return not grammar or all(_plain_parameters(tool) for tool in tools)


def messages_fit(messages: list[dict[str, Any]]) -> bool:
    """Each message's fields fit its role: content (null only beside an assistant's calls), calls, call ids."""
    for m in messages:
        role = m.get("role")
        if m.get("content") is None and not (role == "assistant" and m.get("tool_calls")):
            return False
        if (role == "tool") != ("tool_call_id" in m) or (role != "assistant" and "tool_calls" in m):
            return False
    return True


def chat_tools_fit(body: dict[str, Any]) -> bool:
    """The chat's tool rules, and no logprobs with tools."""
    choice = body.get("tool_choice")
    named = choice["function"]["name"] if isinstance(choice, dict) else None
    forced_format = (body.get("response_format") or {}).get("type") not in (None, "text")
    if body.get("tools") and choice != "none" and body.get("logprobs"):
        return False
    return messages_fit(body["messages"]) and tools_fit(
        body.get("tools"), choice, named=named, forced_format=forced_format
    )


def responses_fit(body: dict[str, Any]) -> bool:
    """The Responses rules: the tool rules, no fuzzed schema as text.format, and the input within the context."""
    choice = body.get("tool_choice")
    named = choice.get("name") if isinstance(choice, dict) else None
    text = body.get("text")
    forced_format = isinstance(text, dict)
    if isinstance(text, dict) and (text.get("format") or {}).get("schema"):
        return False
    if not tools_fit(body.get("tools"), choice, named=named, forced_format=forced_format):
        return False
    size = len(str(body.get("input")).encode("utf-8")) + len(str(body.get("instructions") or "")) * 4
    size += len(str(body.get("tools") or "")) * 2
    return size + (body.get("max_output_tokens") or 64) <= CONTEXT_TOKENS


VOCABULARY = 50257  # the fuzzed model's token ids stop below this


def in_vocabulary(bias: Any) -> bool:
    """Whether every token id of a logit_bias is one the fuzzed model has."""
    return not isinstance(bias, dict) or all(key.isascii() and key.isdigit() and int(key) < VOCABULARY for key in bias)


def compiles(response_format: Any) -> bool:
    """Whether a response_format asks for nothing a grammar compiler could refuse: a fuzzed schema mostly is none."""
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return True
    return not (response_format.get("json_schema") or {}).get("schema")


def sampling_fits(body: dict[str, Any]) -> bool:
    """The rules both /v1 routes add in words: min_tokens <= max_tokens, token ids within the vocabulary."""
    top = body.get("max_completion_tokens") or body.get("max_tokens")
    low = body.get("min_tokens")
    if type(low) is int and type(top) is int and low > top:
        return False
    return in_vocabulary(body.get("logit_bias")) and compiles(body.get("response_format"))


def prompt_ids_fit(prompt: Any) -> bool:
    """Whether a token-id prompt's ids are all in the fuzzed model's vocabulary (text prompts always are)."""
    prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], list) else [prompt]
    return all(not isinstance(p, list) or all(type(t) is not int or t < VOCABULARY for t in p) for p in prompts)


def completion_rules(body: dict[str, Any]) -> bool:
    """max_tokens 0 only with echo; no echo with logprobs or token ids in a stream; ids in the vocabulary."""
    if body.get("max_tokens") == 0 and not body.get("echo"):
        return False
    prompt = body.get("prompt")
    if body.get("echo") and body.get("stream") and (body.get("logprobs") is not None or isinstance(prompt, list)):
        return False
    return prompt_ids_fit(prompt)


def positive_body(case: schemathesis.Case) -> dict[str, Any] | None:
    """The JSON object body of a case meant to be valid (None for negative cases and other bodies)."""
    positive = case.meta is None or case.meta.generation.mode.is_positive
    return case.body if positive and isinstance(case.body, dict) else None


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: schemathesis.Case) -> bool:
    """Drop positive /v1 cases that break a rule the spec can state only in words."""
    body = positive_body(case)
    if body is None:
        return True
    if case.path == "/v1/completions":
        return completion_fits(case, body) and sampling_fits(body) and completion_rules(body)
    if case.path == "/v1/chat/completions":
        return (
            chat_fits(case, body)
            and sampling_fits(body)
            and not (body.get("top_logprobs") and not body.get("logprobs"))
            and chat_tools_fit(body)
        )
    if case.path == "/v1/embeddings":
        inputs = body.get("input")
        many = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        return prompt_ids_fit(inputs) and all(len(str(item).encode("utf-8")) <= CONTEXT_TOKENS for item in many)
    if case.path == "/v1/responses":
        return responses_fit(body)
    if case.path == "/tokenize":
        return "prompt" in body or "messages" in body
    if case.path == "/detokenize":
        return all(not isinstance(token, int) or token < VOCABULARY for token in body.get("tokens") or [])
    return True
