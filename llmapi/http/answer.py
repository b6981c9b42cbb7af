"""The one way a generation route answers: start the runner, then a body or one event stream.

A route validates its body, builds its engine requests and its Format, and returns `answer(...)`. The
stream's in-band errors and its cancel-on-hang-up live here once, for every API.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

from flask import Response

from llmapi.engine.types import GenerationRequest, GenerationResult
from llmapi.errors import APIError, in_band
from llmapi.http.sse import SSE_HEADERS, sse
from llmapi.runtime import runner
from llmapi.runtime.service import engine_service


class Format(Protocol):
    """How one API writes its results: a whole body, or the JSON events of a stream (then `done`, if any)."""

    done: str | None

    def body(self, results: Sequence[GenerationResult]) -> dict[str, Any]: ...
    def events(self, events: Iterator[runner.Event]) -> Iterator[dict[str, Any]]: ...


def answer(
    requests: Sequence[GenerationRequest],
    fmt: Format,
    *,
    stream: bool,
    messages: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> Response | dict[str, Any]:
    """Run `requests` (one per choice; a chat's `messages` and `tools` are rendered into their prompt) and answer in
    `fmt`."""
    generation = runner.start(engine_service(), requests, messages=messages, tools=tools)
    if not stream:
        results = generation.results()
        _refuse_cut_scoring(requests, results)
        return fmt.body(results)
    response = Response(_stream(generation, fmt), mimetype="text/event-stream", headers=SSE_HEADERS)
    # The one cancel path: the server closes the response when the stream ends or the client hangs up,
    # even when no event was ever sent (a generator's own `finally` would not run then).
    response.call_on_close(generation.cancel)
    return response


def _refuse_cut_scoring(requests: Sequence[GenerationRequest], results: Sequence[GenerationResult]) -> None:
    """A scoring answer (the prompt's logprobs, nothing generated) cut by the deadline is an error, not a 200.

    A scoring client reads log-probabilities, not finish_reason: part of its prompts scored, silently, would corrupt
    an evaluation. A generation cut by the deadline keeps its partial text and says `timeout` instead.
    """
    scoring = any(r.max_new_tokens == 0 and r.prompt_logprobs is not None for r in requests)
    if scoring and any(result.finish_reason == "timeout" for result in results):
        raise APIError(
            "The generation deadline (GENERATION_TIMEOUT_MS, or the request's timeout_ms) passed before every "
            "prompt was scored; no partial scores are returned. Send fewer or shorter prompts, or a longer deadline.",
            status=503,
            type="timeout",
        )


def _stream(generation: runner.Generation, fmt: Format) -> Iterator[str]:
    """Yield the events of `fmt`; a failure after the 200 went out becomes an error event in the one shape."""
    try:
        for event in fmt.events(generation.events()):
            yield sse(event)
    except Exception as exc:
        generation.cancel()  # a failed choice stops its siblings at once, not when the response closes
        yield sse(in_band(exc))
    if fmt.done is not None:
        yield sse(fmt.done)
