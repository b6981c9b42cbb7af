"""Live figures of an engine for the status route: recent tokens per second and the loaded model's facts."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from llmapi.engine.loader import LoadedModel

RATE_WINDOW_S = 10


class TokenRate:
    """Count tokens in one-second buckets and report their rate over the last `window_s` seconds (thread-safe)."""

    def __init__(self, window_s: int = RATE_WINDOW_S, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.total = 0
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [whole second, tokens in it], oldest first
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        """Record `tokens` produced now."""
        second = int(self._clock())
        with self._lock:
            self.total += tokens
            if self._buckets and self._buckets[-1][0] == second:
                self._buckets[-1][1] += tokens
            else:
                self._buckets.append([second, tokens])
                self._forget(second)

    def per_second(self) -> float:
        """Tokens per second over the window (the current second included, so a burst shows at once)."""
        second = int(self._clock())
        with self._lock:
            self._forget(second)
            return sum(tokens for _, tokens in self._buckets) / self.window_s

    def _forget(self, second: int) -> None:
        """Drop the buckets that have left the window (the caller holds the lock)."""
        while self._buckets and self._buckets[0][0] <= second - self.window_s:
            self._buckets.popleft()


def model_facts(loaded: LoadedModel) -> dict[str, Any]:
    """What the status route shows of the model: dtype, device and context, as plain values."""
    model = loaded.model
    dtype = getattr(model, "dtype", None)
    device = getattr(model, "device", None)
    return {
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "device": str(device) if device is not None else None,
        "context_length": loaded.context_length,
    }
