"""Admission control and per-generation accounting, wrapped around every EngineService.submit().

Each admitted request holds a thread of its gunicorn worker until its generations end (a stream: until
its last event). A worker admits at most `Settings.admission_limit` requests, always fewer than its
threads, so that /health, /ready, /metrics and the refusals themselves always find a free thread; one
more gets an immediate 503 with Retry-After instead of a place in a queue. The generations one request
starts (a /v1 request with n choices) share its place. A handle that a route leaves unfinished is
cancelled when its response is closed, so that neither its place nor the engine's work leaks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, g, has_request_context

from llmapi.engine.types import GenerationRequest, GenerationResult
from llmapi.errors import APIError
from llmapi.logs import current_request_id
from llmapi.metrics import Metrics

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # a place frees as soon as any request of this worker ends: retry soon
PROMPT_LOG_CHARS = 200


class Slot:
    """One admitted request's place in its worker, held by each of its generations; given back by the last."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._holders = 1
        self.released = False

    def hold(self) -> bool:
        """Hold the place for one more generation; False once it has been given back."""
        with self._admission.lock:
            if self.released:
                return False
            self._holders += 1
            return True

    def release(self) -> None:
        """Let go of the place for one generation; the last one gives it back."""
        with self._admission.lock:
            if self.released:
                return
            self._holders -= 1
            if self._holders > 0:
                return
            self.released = True
            self._admission.count -= 1
        self._admission.metrics.in_flight.dec()


class Admission:
    """Counts this worker's admitted requests and refuses those beyond the limit."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.count = 0
        self.lock = threading.Lock()

    def admit(self) -> Slot:
        """The place of the current request: taken by its first generation, shared by the ones after."""
        if not has_request_context():
            return self.enter()
        slot: Slot | None = g.get("llmapi_slot")
        if slot is None or not slot.hold():
            slot = g.llmapi_slot = self.enter()
        return slot

    def enter(self) -> Slot:
        """Take a new place, or raise a 503 at once when every place is taken."""
        with self.lock:
            full = self.count >= self.limit
            if not full:
                self.count += 1
        if full:
            self.metrics.rejected.labels("overload").inc()
            raise APIError(
                f"The server is at capacity ({self.limit} requests per worker); retry shortly.",
                status=503,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.metrics.in_flight.inc()
        return Slot(self)


class TrackedHandle:
    """An engine handle that records its generation's metrics and log line, and lets go of its place, when it ends."""

    def __init__(
        self, inner: Any, request: GenerationRequest, slot: Slot, metrics: Metrics, *, log_prompts: bool = False
    ) -> None:
        self._inner = inner
        self._request = request
        self._slot = slot
        self._metrics = metrics
        self._log_prompts = log_prompts
        self.ended = False
        self._lock = threading.Lock()
        # Kept for the log line: a route may read the handle from another thread (/v1 merges streams so).
        self._request_id = current_request_id()
        if has_request_context():
            g.setdefault("llmapi_handles", []).append(self)

    def pieces(self) -> Iterator[str | GenerationResult]:
        """Yield the engine's text pieces, then its result, recording the end."""
        try:
            for item in self._inner.pieces():
                if isinstance(item, GenerationResult):
                    self._end(item.finish_reason, item)
                yield item
        except Exception:
            self._end("error")
            raise

    def result(self) -> GenerationResult:
        """Wait for the result, recording the end."""
        try:
            result = self._inner.result()
        except Exception:
            self._end("error")
            raise
        self._end(result.finish_reason, result)
        return result

    def cancel(self) -> None:
        """Stop the generation (the client went away, or the response was closed before the end)."""
        self._inner.cancel()
        self._end("cancelled")

    def _end(self, reason: str, result: GenerationResult | None = None) -> None:
        """Give the place back and record the generation, once."""
        with self._lock:
            if self.ended:
                return
            self.ended = True
        self._slot.release()
        if result is not None:
            self._metrics.observe_result(result)
        else:
            self._metrics.generations.labels(reason).inc()
        line = describe(reason, result, self._request, log_prompts=self._log_prompts)
        log.info("generation ended: %s", line, extra={"request_id": self._request_id or "-"})


def describe(reason: str, result: GenerationResult | None, request: GenerationRequest, *, log_prompts: bool) -> str:
    """One log line about a generation: counts and timings, and the prompt only when LOG_PROMPTS asks."""
    parts = [f"finish_reason={reason}", f"max_new_tokens={request.max_new_tokens}", f"stream={request.stream}"]
    if result is not None:
        parts += [f"prompt_tokens={result.prompt_tokens}", f"completion_tokens={result.completion_tokens}"]
        parts += [f"{name}={value:.3f}" for name, value in sorted(result.timings.items())]
    if log_prompts:
        parts.append(f"prompt={request.prompt[:PROMPT_LOG_CHARS]!r}")
    return " ".join(parts)


def _cancel_leftovers(response: Response) -> Response:
    """after_request: once the response is closed, cancel the generations its route left unfinished."""
    handles: list[TrackedHandle] = g.pop("llmapi_handles", [])
    if handles:

        def cancel() -> None:
            for handle in handles:
                if not handle.ended:
                    handle.cancel()

        response.call_on_close(cancel)
    return response


def init_app(app: Flask) -> None:
    """Tie generations to their responses."""
    app.after_request(_cancel_leftovers)
