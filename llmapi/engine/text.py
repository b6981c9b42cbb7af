"""Incremental, UTF-8-safe detokenizing and stop-sequence matching on decoded text."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalDecoder:
    """Turn token ids into text piece by piece, never splitting a character across pieces."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # tokens before this index are already fully rendered
        self._read = 0

    def push(self, token_id: int) -> str:
        """Add one token and return the text it completes (may be empty while a character is partial)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever text is still held back at the end of generation."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        """Decode from the last stable point; a trailing U+FFFD means bytes of a character are missing."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""


class StopMatcher:
    """Find the earliest stop sequence in a growing text, and how much of its end could still start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, start: int) -> tuple[int, str] | None:
        """Return (index, stop) of the earliest stop that ends at or after `start`, else None."""
        if not self.stops:
            return None
        window = max(0, start - self._longest + 1)
        best: tuple[int, str] | None = None
        for stop in self.stops:
            at = text.find(stop, window)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def held_back(self, text: str) -> int:
        """Count the trailing characters that are a prefix of some stop and so must not be sent yet."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0
