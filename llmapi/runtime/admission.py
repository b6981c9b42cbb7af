"""Admission control: each worker generates for at most `Settings.admission_limit` requests at once.

Each admitted request holds a thread of its gunicorn worker until its generations end (a stream: until
its last event). The limit is always below the worker's threads, so that /health, /ready, /metrics and
the refusals themselves always find a free thread; one request more gets an immediate 503 with
Retry-After instead of a place in a queue. The runner takes one place per HTTP request, before it touches
the model (a cold load included), and gives it back when the request's last generation ends.
"""

from __future__ import annotations

import threading

from llmapi.errors import APIError
from llmapi.metrics import Metrics

RETRY_AFTER_S = 1  # a place frees as soon as any request of this worker ends: retry soon


class Slot:
    """One admitted request's place in its worker; given back once."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self.released = False

    def release(self) -> None:
        """Give the place back (idempotent)."""
        with self._admission.lock:
            if self.released:
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

    def enter(self) -> Slot:
        """Take a place, or raise a 503 at once when every place is taken."""
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
