"""Per-generation accounting: each handle records its metrics and one log line when its generation ends."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from llmapi.engine.types import GenerationRequest, GenerationResult, Handle, Piece
from llmapi.logs import current_request_id
from llmapi.metrics import Metrics

log = logging.getLogger(__name__)
PROMPT_LOG_CHARS = 200


class TrackedHandle:
    """An engine handle that records its generation's metrics and log line, and calls `on_end`, once, at its end."""

    def __init__(
        self,
        inner: Handle,
        request: GenerationRequest,
        metrics: Metrics,
        *,
        on_end: Callable[[], None],
        log_prompts: bool = False,
    ) -> None:
        self._inner = inner
        self._request = request
        self._metrics = metrics
        self._on_end = on_end
        self._log_prompts = log_prompts
        self.ended = False
        self._lock = threading.Lock()
        # Kept for the log line: the runner may read the handle from another thread (it merges n choices so).
        self._request_id = current_request_id()

    def pieces(self) -> Iterator[Piece | GenerationResult]:
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
        """Stop the generation (the client went away, or a sibling choice failed); harmless once it has ended."""
        self._inner.cancel()
        self._end("cancelled")

    def _end(self, reason: str, result: GenerationResult | None = None) -> None:
        """Record the generation and tell the owner, once."""
        with self._lock:
            if self.ended:
                return
            self.ended = True
        self._on_end()
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
