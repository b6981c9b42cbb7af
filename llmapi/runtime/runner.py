"""THE generation path: every route's generations start here, inside one admission slot per HTTP request.

`start()` takes the place first, then loads the model if this worker has not yet (counted as waiting),
renders a chat into its prompt, and submits one engine request per choice. The `Generation` it returns
gives back either every result or one merged event stream, cancels what is still running in one place,
and gives the place back when its last generation ends.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from llmapi.engine.types import (
    EmbeddingRequest,
    EmbeddingResult,
    EngineLike,
    GenerationRequest,
    GenerationResult,
    Piece,
)
from llmapi.runtime.admission import Slot
from llmapi.runtime.service import EngineService
from llmapi.runtime.tracking import TrackedHandle

Event = tuple[int, Piece | GenerationResult]  # (choice index, a text piece or the choice's result)
_END = object()  # marks the end of one choice's events in Generation.events()
_GROUPS = itertools.count(1)  # numbers the HTTP requests: the engine's scheduler lets them take turns


class Generation:
    """The generations of one HTTP request: its place in the worker and a handle per choice."""

    def __init__(self, slot: Slot) -> None:
        self._slot = slot
        self._lock = threading.Lock()
        self._open = 1  # the starter's own hold, so that a choice that ends early cannot free the place
        self.handles: list[TrackedHandle] = []

    def hold(self) -> None:
        """Count one more running choice."""
        with self._lock:
            self._open += 1

    def let_go(self) -> None:
        """Count one choice (or the starter) as done; the last gives the place back."""
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            self._slot.release()

    def results(self) -> list[GenerationResult]:
        """Wait for every choice (they decode together); if one fails, stop the others."""
        try:
            return [handle.result() for handle in self.handles]
        except BaseException:
            self.cancel()
            raise

    def events(self) -> Iterator[Event]:
        """Yield (choice index, text piece or result) from every choice as each arrives."""
        if len(self.handles) == 1:  # the usual case needs no thread
            yield from ((0, item) for item in self.handles[0].pieces())
            return
        events: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        for index, handle in enumerate(self.handles):
            threading.Thread(target=_pump, args=(index, handle, events), name="llmapi-choice", daemon=True).start()
        running = len(self.handles)
        while running:
            index, item = events.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item

    def cancel(self) -> None:
        """Stop every choice still running: the one cancel path (client gone, a choice failed, start failed)."""
        for handle in self.handles:
            handle.cancel()


def _pump(index: int, handle: TrackedHandle, events: queue.SimpleQueue[tuple[int, Any]]) -> None:
    """Forward one choice's pieces, result or error to the reader, then mark its end."""
    try:
        for item in handle.pieces():
            events.put((index, item))
    except BaseException as exc:  # re-raised by the reader, in the request's thread
        events.put((index, exc))
    finally:
        events.put((index, _END))


def start(
    service: EngineService,
    requests: Sequence[GenerationRequest],
    *,
    messages: Sequence[Mapping[str, Any]] | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> Generation:
    """Admit the request, then (inside its place) load, render the chat (and its tools) into the prompt, and
    submit every choice."""
    generation = Generation(service.admission.enter())
    try:
        engine = service.engine()
        group = next(_GROUPS)  # every choice of this request takes its turns as one
        if messages is not None:
            prompt = engine.render_chat(messages, tools) if tools else engine.render_chat(messages)
            requests = [replace(request, prompt=prompt) for request in requests]
        requests = [replace(request, group=group) for request in requests]
        for request in requests:
            inner = engine.submit(request)
            generation.hold()
            handle = TrackedHandle(
                inner, request, service.metrics, on_end=generation.let_go, log_prompts=service.settings.log_prompts
            )
            generation.handles.append(handle)
    except BaseException:
        generation.cancel()
        raise
    finally:
        generation.let_go()
    return generation


@contextmanager
def admitted(service: EngineService) -> Iterator[EngineLike]:
    """The engine for a request that only needs its tokenizer: admitted like a generation (it may load the model)."""
    slot = service.admission.enter()
    try:
        yield service.engine()
    finally:
        slot.release()


def embed(service: EngineService, requests: Sequence[EmbeddingRequest]) -> list[EmbeddingResult]:
    """Admit the request, then queue every input in the engine (batched with whatever else it is given) and wait."""
    with admitted(service) as engine:
        rows = [engine.embed(request) for request in requests]  # type: ignore[attr-defined]
        return [row.result() for row in rows]
