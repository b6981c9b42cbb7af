"""schemathesis hooks for /v1: the request rules of the OpenAI routes that JSON Schema cannot state.

Imported by the schemathesis hooks module (SCHEMATHESIS_HOOKS) so that its positive cases obey them.
"""

from __future__ import annotations

from typing import Any

import schemathesis

from llmapi.engine.chat import default_template

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
    messages = [{"role": m["role"], "content": _text(m["content"])} for m in body["messages"]]
    if sum(len(m["content"]) for m in messages) > message["content"]["oneOf"][0]["maxLength"]:
        return False
    new_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or request["max_tokens"]["default"]
    return len(default_template(messages).encode("utf-8")) + new_tokens <= CONTEXT_TOKENS


VOCABULARY = 50257  # the fuzzed model's token ids stop below this


def in_vocabulary(bias: Any) -> bool:
    """Whether every token id of a logit_bias is one the fuzzed model has."""
    return not isinstance(bias, dict) or all(key.isdigit() and int(key) < VOCABULARY for key in bias)


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
        )
    if case.path == "/tokenize":
        return "prompt" in body or "messages" in body
    if case.path == "/detokenize":
        return all(not isinstance(token, int) or token < VOCABULARY for token in body.get("tokens") or [])
    return True
