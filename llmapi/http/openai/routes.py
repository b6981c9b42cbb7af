"""The OpenAI-compatible API: /v1/models, /v1/completions and /v1/chat/completions, on the same engine."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from flask import Response
from flask_smorest import Blueprint
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException

from llmapi.config import Settings
from llmapi.engine.chat import ChatTemplateError
from llmapi.engine.types import ContextLengthExceeded, EngineError, GenerationRequest, GenerationResult
from llmapi.errors import APIError, error_body, from_engine_error, from_http_exception, respond, validation_error
from llmapi.http.fields import MAX_SEED, ErrorSchema
from llmapi.http.generate import SSE_HEADERS, sse
from llmapi.http.hooks import require_api_key, require_json
from llmapi.http.openai.schemas import (
    CHUNK_EVENT_SCHEMA,
    ChatCompletionResponseSchema,
    CompletionResponseSchema,
    ModelListSchema,
    build,
)
from llmapi.runtime.service import HandleLike, engine_service

log = logging.getLogger(__name__)

# OpenAI names two endings: "stop" (the model ended, or a stop sequence matched) and "length" (max_tokens).
# A deadline is neither, and calling it either would tell a client that its text is complete or that a
# larger max_tokens would help. "timeout" says what happened; OpenAI's clients pass unknown reasons through.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "timeout": "timeout"}
DONE = "data: [DONE]\n\n"
_END = object()  # marks the end of one choice's events in merged()


def finish_reason(result: GenerationResult) -> str:
    """Name the way a generation ended as OpenAI does."""
    return FINISH_REASONS.get(result.finish_reason, result.finish_reason)


class CompletionFormat:
    """How /v1/completions writes its choices, in a body and in stream chunks."""

    prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def __init__(self, prompts: Sequence[str], *, echo: bool) -> None:
        self.prompts = prompts  # the prompt of each choice, prompt-major
        self.echo = echo

    def _choice(self, index: int, text: str, reason: str | None) -> dict[str, Any]:
        """One choice object."""
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """A finished choice."""
        prefix = self.prompts[index] if self.echo else ""
        return self._choice(index, prefix + result.text, finish_reason(result))

    def opening(self, index: int) -> dict[str, Any] | None:
        """The first chunk of a streamed choice: the prompt when echoing."""
        return self._choice(index, self.prompts[index], None) if self.echo else None

    def delta(self, index: int, text: str) -> dict[str, Any]:
        """A chunk of new text."""
        return self._choice(index, text, None)

    def closing(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The last chunk of a streamed choice."""
        return self._choice(index, "", finish_reason(result))


class ChatFormat:
    """How /v1/chat/completions writes its choices, in a body and in stream chunks."""

    prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """A finished choice."""
        message = {"role": "assistant", "content": result.text}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason(result)}

    def opening(self, index: int) -> dict[str, Any]:
        """The first chunk of a streamed choice carries the role."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, text: str) -> dict[str, Any]:
        """A chunk of new text."""
        return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def closing(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The last chunk of a streamed choice."""
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason(result)}


Format = CompletionFormat | ChatFormat


def choice_seed(seed: int | None, index: int) -> int | None:
    """Give choice `index` of a prompt the seed `seed + index`, so each choice can be reproduced alone."""
    return None if seed is None else (seed + index) % (MAX_SEED + 1)


def choice_requests(prompts: Sequence[str], args: dict[str, Any], settings: Settings) -> list[GenerationRequest]:
    """One engine request per choice, prompt-major (choice index = prompt index x n + i)."""
    return [
        GenerationRequest(
            prompt=prompt,
            max_new_tokens=args["max_tokens"],
            do_sample=True,  # OpenAI samples unless temperature is 0, which GenerationRequest.greedy honours
            temperature=args["temperature"],
            top_p=args["top_p"],
            seed=choice_seed(args.get("seed"), i),
            stop=args.get("stop", ()),
            timeout_s=settings.timeout_default_ms / 1000.0,
            stream=args["stream"],
        )
        for prompt in prompts
        for i in range(args["n"])
    ]


def context_error(exc: ContextLengthExceeded, where: str) -> APIError:
    """Say, in OpenAI's words, by how much a request overflows the context."""
    requested = exc.prompt_tokens + exc.max_new_tokens
    return APIError(
        f"This model's maximum context length is {exc.context_length} tokens. However, you requested {requested}"
        f" tokens ({exc.prompt_tokens} in the {where}, {exc.max_new_tokens} in the completion)."
        f" Please reduce the length of the {where} or completion.",
        status=400,
        param=where,
    )


def submit_all(requests: Sequence[GenerationRequest], *, where: str) -> list[HandleLike]:
    """Queue every choice; if one cannot be queued, cancel those that were."""
    service = engine_service()
    handles: list[HandleLike] = []
    try:
        for request in requests:
            handles.append(service.submit(request))
    except BaseException as exc:
        cancel(handles)
        if isinstance(exc, ContextLengthExceeded):
            raise context_error(exc, where) from exc
        raise
    return handles


def cancel(handles: Sequence[HandleLike]) -> None:
    """Stop every generation still running."""
    for handle in handles:
        handle.cancel()


def collect(handles: Sequence[HandleLike]) -> list[GenerationResult]:
    """Wait for every choice (they decode together); if one fails, stop the others."""
    try:
        return [handle.result() for handle in handles]
    except BaseException:
        cancel(handles)
        raise


def usage(results: Sequence[GenerationResult], n: int) -> dict[str, int]:
    """Count each prompt once and every choice's completion, as OpenAI does."""
    prompt = sum(result.prompt_tokens for result in results[::n])
    completion = sum(result.completion_tokens for result in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def merged(handles: Sequence[HandleLike]) -> Iterator[tuple[int, str | GenerationResult]]:
    """Yield (choice index, text piece or result) from every handle as each arrives."""
    if len(handles) == 1:  # the usual case needs no thread
        yield from ((0, item) for item in handles[0].pieces())
        return
    events: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
    for index, handle in enumerate(handles):
        threading.Thread(target=_pump, args=(index, handle, events), name="llmapi-choice", daemon=True).start()
    running = len(handles)
    while running:
        index, item = events.get()
        if item is _END:
            running -= 1
        elif isinstance(item, BaseException):
            raise item
        else:
            yield index, item


def _pump(index: int, handle: HandleLike, events: queue.SimpleQueue[tuple[int, Any]]) -> None:
    """Forward one handle's pieces, result or error to the reader, then mark its end."""
    try:
        for item in handle.pieces():
            events.put((index, item))
    except BaseException as exc:  # re-raised by the reader, in the request's thread
        events.put((index, exc))
    finally:
        events.put((index, _END))


def in_band_error(exc: Exception) -> dict[str, Any]:
    """The error event of a stream that failed after it started (its 200 status is already sent)."""
    if isinstance(exc, EngineError):
        failure = from_engine_error(exc)
    else:
        log.exception("stream failed")
        failure = APIError("The server had an unexpected error.", status=500)
    return error_body(failure.message, status=failure.status, param=failure.param)


def stream_chunks(
    fmt: Format, handles: Sequence[HandleLike], head: dict[str, Any], *, n: int, include_usage: bool
) -> Iterator[str]:
    """Yield OpenAI's chunks as text arrives, the usage chunk if asked, then [DONE]; errors in-band; hang-ups cancel."""
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    results: list[Any] = [None] * len(handles)
    try:
        for index in range(len(handles)):
            if (opening := fmt.opening(index)) is not None:
                yield sse({**head, "choices": [opening], **extra})
        for index, item in merged(handles):
            if isinstance(item, GenerationResult):
                results[index] = item
                yield sse({**head, "choices": [fmt.closing(index, item)], **extra})
            elif item:
                yield sse({**head, "choices": [fmt.delta(index, item)], **extra})
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(results, n)})
    except Exception as exc:
        yield sse(in_band_error(exc))
    finally:
        # Runs on normal end and when the server closes the generator because the client went away.
        cancel(handles)
    yield DONE


def answer(fmt: Format, handles: Sequence[HandleLike], args: dict[str, Any], model: str) -> Any:
    """Answer with the whole body, or with a stream of chunks when asked."""
    head = {"id": fmt.prefix + uuid.uuid4().hex, "object": fmt.object, "created": int(time.time()), "model": model}
    if args["stream"]:
        include_usage = bool((args.get("stream_options") or {}).get("include_usage"))
        chunk_head = {**head, "object": fmt.chunk_object}
        chunks = stream_chunks(fmt, handles, chunk_head, n=args["n"], include_usage=include_usage)
        return Response(chunks, mimetype="text/event-stream", headers=SSE_HEADERS)
    results = collect(handles)
    choices = [fmt.choice(index, result) for index, result in enumerate(results)]
    return {**head, "choices": choices, "usage": usage(results, args["n"])}


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


def render_chat(messages: Sequence[dict[str, str]]) -> str:
    """Render the conversation into a prompt with the model's template; its refusals are the client's 400."""
    try:
        return engine_service().render_chat([{"role": m["role"], "content": m["content"]} for m in messages])
    except ChatTemplateError as exc:
        raise APIError(str(exc), status=400, param="messages") from exc


def bad_request(exc: HTTPException) -> Response:
    """Describe this blueprint's invalid fields with a 400, as OpenAI does (/generate answers 422)."""
    if isinstance(getattr(exc, "exc", None), ValidationError):  # webargs' validation failure, not bad JSON
        failure = validation_error(exc.data["messages"])  # type: ignore[attr-defined]
        return respond(APIError(failure.message, status=400, param=failure.param))
    return respond(from_http_exception(exc))


def create_blueprint(app_settings: Settings) -> Blueprint:
    """Build the /v1 blueprint with the request limits of `app_settings`."""
    schemas = build(app_settings)
    max_tokens = min(16, app_settings.max_new_tokens_limit)  # examples within this server's limits
    examples = {
        "completion": {"prompt": "Artificial Intelligence is", "max_tokens": max_tokens},
        "chat": {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens},
    }
    card = {"id": app_settings.served_model, "object": "model", "created": int(time.time()), "owned_by": "llmapi"}
    blp = Blueprint("openai", __name__, url_prefix="/v1", description="OpenAI-compatible API on the same engine.")
    blp.before_request(require_api_key)
    blp.before_request(require_json)
    blp.register_error_handler(400, bad_request)
    errors = [
        (400, "Invalid parameters, an unsupported parameter, or too long for the context"),
        (401, "Missing or invalid API key"),
        (404, "Unknown model"),
        (503, "Model unavailable"),
    ]

    def documented(view: Any) -> Any:
        """Document the error answers of a generation route."""
        for status, description in errors:
            view = blp.alt_response(status, schema=ErrorSchema, description=description)(view)
        return view

    @blp.route("/models", methods=["GET"])
    @blp.response(200, ModelListSchema)
    @blp.alt_response(401, schema=ErrorSchema, description="Missing or invalid API key")
    def list_models() -> dict[str, Any]:
        """List the served model (loads nothing)."""
        return {"object": "list", "data": [card]}

    @blp.route("/completions", methods=["POST"])
    # Instances, not classes: webargs would otherwise build (and deep-copy the fields of) one per request.
    @blp.arguments(schemas.completion(), error_status_code=400, example=examples["completion"])
    @blp.response(200, CompletionResponseSchema)
    @blp.alt_response(200, schema=CHUNK_EVENT_SCHEMA, content_type="text/event-stream")
    @documented
    def completions(args: dict[str, Any]) -> Any:
        """Complete a prompt, or each of a list of prompts, `n` times.

        With `"stream": true` the answer is `text/event-stream`: `data: {chunk}` events of object
        `text_completion`, each carrying one choice's new text, then `data: [DONE]`.
        """
        model = served_model(args, app_settings)
        prompts = [prompt for prompt in args["prompt"] for _ in range(args["n"])]
        handles = submit_all(choice_requests(args["prompt"], args, app_settings), where="prompt")
        return answer(CompletionFormat(prompts, echo=args["echo"]), handles, args, model)

    @blp.route("/chat/completions", methods=["POST"])
    @blp.arguments(schemas.chat(), error_status_code=400, example=examples["chat"])
    @blp.response(200, ChatCompletionResponseSchema)
    @blp.alt_response(200, schema=CHUNK_EVENT_SCHEMA, content_type="text/event-stream")
    @documented
    def chat_completions(args: dict[str, Any]) -> Any:
        """Answer a conversation, rendered with the model's chat template (or the default one).

        With `"stream": true` the answer is `text/event-stream`: `data: {chunk}` events of object
        `chat.completion.chunk` (the first of each choice carries the role, then `delta.content`
        pieces, then the finish_reason), then `data: [DONE]`.
        """
        model = served_model(args, app_settings)
        prompt = render_chat(args["messages"])
        handles = submit_all(choice_requests([prompt], args, app_settings), where="messages")
        return answer(ChatFormat(), handles, args, model)

    return blp
