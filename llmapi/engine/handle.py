"""The caller's end of one generation: its events (pieces, then the result or an error) and a way to cancel it."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from llmapi.engine.types import EngineError, GenerationRequest, GenerationResult, Piece


class Handle:
    """One generation as its caller holds it; the engine thread delivers its events with send()."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.cancelled = threading.Event()
        self._events: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()

    def cancel(self) -> None:
        """Ask the engine to stop this generation at the next step."""
        self.cancelled.set()

    def pieces(self) -> Iterator[Piece | GenerationResult]:
        """Yield text pieces as they are generated, then the GenerationResult."""
        while True:
            kind, payload = self._events.get()
            if kind == "error":
                raise payload  # type: ignore[misc]
            yield payload  # type: ignore[misc]
            if kind == "done":
                return

    def result(self) -> GenerationResult:
        """Wait for the generation to end and return its result."""
        for item in self.pieces():
            if isinstance(item, GenerationResult):
                return item
        raise EngineError("generation ended without a result")

    def send(self, kind: str, payload: Piece | GenerationResult | EngineError) -> None:
        """Deliver an event from the engine thread: "piece", then "done" with the result, or "error"."""
        self._events.put((kind, payload))
