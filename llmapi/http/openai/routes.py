"""The OpenAI-compatible API: /v1/models, /v1/completions and /v1/chat/completions, on the one runner."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from flask import Response, request
from marshmallow import Schema

from llmapi.config import Settings
from llmapi.engine.chat import ChatTemplateError
from llmapi.engine.types import ContextLengthExceeded, GenerationRequest, InvalidRequest
from llmapi.errors import APIError, refusal, respond
from llmapi.http.answer import answer
from llmapi.http.fields import MAX_SEED, ErrorSchema
from llmapi.http.hooks import require_api_key, require_json
from llmapi.http.jsonbody import Blueprint  # JSON bodies parsed with limits
from llmapi.http.openai import embeddings, responses
from llmapi.http.openai.formats import ChatFormat, CompletionFormat
from llmapi.http.openai.messages import chat_messages
from llmapi.http.openai.schemas import (
    CHUNK_EVENT_SCHEMA,
    ChatCompletionResponseSchema,
    CompletionResponseSchema,
    ModelListSchema,
    build,
)
from llmapi.http.openai.tools import ToolChatFormat
from llmapi.http.openai.tools import plan as tool_plan

# This API's error dialect, declared once: a refused body is OpenAI's 400 (/generate answers 422), and a
# request too long for the context names the part the client can shorten.
VALIDATION_STATUS = 400
# The engine names a grammar it refused by its kind; OpenAI's clients know it as response_format.
RENAMED = {kind: "response_format" for kind in ("json_object", "json_schema", "ebnf")}
CONTEXT_PARAM = {"openai.completions": "prompt", "openai.chat_completions": "messages", "openai.responses": "input"}
ERRORS = [
    (400, "Invalid parameters, an unsupported parameter, or too long for the context"),
    (401, "Missing or invalid API key"),
    (404, "Unknown model"),
    (503, "Model unavailable"),
]


def context_too_long(exc: ContextLengthExceeded) -> Response:
    """Say, in OpenAI's words, by how much a request overflows the context."""
    where = CONTEXT_PARAM.get(request.endpoint or "", "prompt")
    requested = exc.prompt_tokens + exc.max_new_tokens
    message = (
        f"This model's maximum context length is {exc.context_length} tokens. However, you requested {requested}"
        f" tokens ({exc.prompt_tokens} in the {where}, {exc.max_new_tokens} in the completion)."
        f" Please reduce the length of the {where} or completion."
    )
    return respond(APIError(message, status=400, param=where))


def chat_refused(exc: ChatTemplateError) -> Response:
    """The model's chat template refused the conversation: the client's 400."""
    return respond(APIError(str(exc), status=400, param="messages"))


def register_errors(blp: Blueprint) -> None:
    """Install this API's error dialect on its blueprint."""
    blp.register_error_handler(ContextLengthExceeded, context_too_long)
    blp.register_error_handler(ChatTemplateError, chat_refused)
    blp.register_error_handler(InvalidRequest, refusal(VALIDATION_STATUS, RENAMED))


def choice_seed(seed: int | None, index: int) -> int | None:
    """Give choice `index` of a prompt the seed `seed + index`, so each choice can be reproduced alone."""
    return None if seed is None else (seed + index) % (MAX_SEED + 1)


def choice_requests(
    prompts: Sequence[str | tuple[int, ...]],
    args: dict[str, Any],
    settings: Settings,
    *,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
) -> list[GenerationRequest]:
    """One engine request per choice, prompt-major (choice index = prompt index x n + i)."""
    return [
        GenerationRequest(
            prompt=prompt if isinstance(prompt, str) else "",
            prompt_ids=None if isinstance(prompt, str) else prompt,
            max_new_tokens=args["max_tokens"],
            min_new_tokens=args["min_tokens"],
            do_sample=True,  # OpenAI samples unless temperature is 0, which GenerationRequest.greedy honours
            temperature=args["temperature"],
            top_p=args["top_p"],
            top_k=max(args["top_k"], 0),  # vLLM's -1 means all, as 0 does here
            min_p=args["min_p"],
            repetition_penalty=args["repetition_penalty"],
            frequency_penalty=args["frequency_penalty"],
            presence_penalty=args["presence_penalty"],
            logit_bias=args.get("logit_bias", ()),
            seed=choice_seed(args.get("seed"), i),
            stop=args.get("stop", ()),
            timeout_s=settings.timeout_default_ms / 1000.0,
            stream=args["stream"],
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=args.get("response_format"),
        )
        for prompt in prompts
        for i in range(args["n"])
    ]


def include_usage(args: dict[str, Any]) -> bool:
    """Whether a stream ends with a usage chunk."""
    return bool((args.get("stream_options") or {}).get("include_usage"))


def served_model(args: dict[str, Any], settings: Settings) -> str:
    """Check the model a request names (if any) against the one served; 404 like OpenAI otherwise."""
    name = args.get("model")
    if name is not None and name != settings.served_model:
        raise APIError(
            f"The model `{name}` does not exist; this server serves the model listed at /v1/models.",
            status=404,
            type="invalid_request_error",
            param="model",
        )
    return settings.served_model


def create_blueprint(settings: Settings) -> Blueprint:
    """Build the /v1 blueprint with the request limits of `settings`."""
    schemas = build(settings)
    max_tokens = min(16, settings.max_new_tokens_limit)  # examples within this server's limits
    examples = {
        "completion": {"prompt": "Artificial Intelligence is", "max_tokens": max_tokens},
        "chat": {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens},
    }
    card = {"id": settings.served_model, "object": "model", "created": int(time.time()), "owned_by": "llmapi"}
    blp = Blueprint("openai", __name__, url_prefix="/v1", description="OpenAI-compatible API on the same engine.")
    blp.before_request(require_api_key)
    blp.before_request(require_json)
    register_errors(blp)

    def generation_route(path: str, schema: Schema, response: type[Schema], example: dict[str, Any]) -> Any:
        """Register a POST generation route: its body's schema, its answers (a body or a stream), its errors."""

        def register(view: Any) -> Any:
            for status, description in ERRORS:
                view = blp.alt_response(status, schema=ErrorSchema, description=description)(view)
            view = blp.alt_response(200, schema=CHUNK_EVENT_SCHEMA, content_type="text/event-stream")(view)
            view = blp.response(200, response)(view)
            # An instance, not a class: webargs would otherwise build (and deep-copy the fields of) one per request.
            view = blp.arguments(schema, error_status_code=VALIDATION_STATUS, example=example)(view)
            return blp.route(path, methods=["POST"])(view)

        return register

    @blp.route("/models", methods=["GET"])
    @blp.response(200, ModelListSchema)
    @blp.alt_response(401, schema=ErrorSchema, description="Missing or invalid API key")
    def list_models() -> dict[str, Any]:
        """List the served model (loads nothing)."""
        return {"object": "list", "data": [card]}

    @generation_route("/completions", schemas.completion(), CompletionResponseSchema, examples["completion"])
    def completions(args: dict[str, Any]) -> Any:
        """Complete a prompt, or each of a list of prompts, `n` times.

        With `"stream": true` the answer is `text/event-stream`: `data: {chunk}` events of object
        `text_completion`, each carrying one choice's new text, then `data: [DONE]`.
        """
        model = served_model(args, settings)
        # A token-id prompt's text is the engine's to decode: the echo takes it from the result.
        prompts = [prompt if isinstance(prompt, str) else "" for prompt in args["prompt"] for _ in range(args["n"])]
        logprobs = args.get("logprobs")
        fmt = CompletionFormat(
            model, prompts, n=args["n"], echo=args["echo"], logprobs=logprobs, include_usage=include_usage(args)
        )
        scored = logprobs if args["echo"] else None
        requests = choice_requests(args["prompt"], args, settings, logprobs=logprobs, prompt_logprobs=scored)
        return answer(requests, fmt, stream=args["stream"])

    @generation_route("/chat/completions", schemas.chat(), ChatCompletionResponseSchema, examples["chat"])
    def chat_completions(args: dict[str, Any]) -> Any:
        """Answer a conversation, rendered with the model's chat template (or the default one).

        With `"stream": true` the answer is `text/event-stream`: `data: {chunk}` events of object
        `chat.completion.chunk` (the first of each choice carries the role, then `delta.content`
        pieces, then the finish_reason), then `data: [DONE]`.
        """
        model = served_model(args, settings)
        messages = chat_messages(args["messages"])
        logprobs = args.get("top_logprobs", 0) if args["logprobs"] else None
        fmt = ChatFormat(model, n=args["n"], logprobs=logprobs is not None, include_usage=include_usage(args))
        requests = choice_requests([""], args, settings, logprobs=logprobs)
        tools = tool_plan(args)  # tool calling: http/openai/tools.py
        if tools.active:
            fmt = ToolChatFormat(model, tools, n=args["n"], include_usage=include_usage(args))
            requests = [replace(request, grammar=tools.grammar or request.grammar) for request in requests]
        return answer(requests, fmt, stream=args["stream"], messages=messages, tools=tools.rendered)

    embeddings.register(blp, settings, served_model, VALIDATION_STATUS)  # POST /v1/embeddings
    responses.register(blp, settings, served_model, VALIDATION_STATUS)  # POST /v1/responses
    return blp
