"""The per-process engine as a Flask extension: loaded lazily, once, by the first admitted generation."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, current_app

from llmapi.config import Settings
from llmapi.engine.config import EngineConfig
from llmapi.engine.types import EngineLike, ModelUnavailable
from llmapi.metrics import Metrics
from llmapi.runtime.admission import Admission

log = logging.getLogger(__name__)
EXTENSION = "llmapi.engine"


EngineFactory = Callable[[Settings], EngineLike]


def load_engine(settings: Settings) -> EngineLike:
    """Load the configured model into a new engine (imports torch)."""
    from llmapi.engine import start_engine

    return start_engine(EngineConfig.from_settings(settings))


class EngineService:
    """Holds this process's engine; the first caller loads it while concurrent callers wait."""

    def __init__(self, settings: Settings, factory: EngineFactory = load_engine, *, metrics: Metrics) -> None:
        self.settings = settings
        self._factory = factory
        self.metrics = metrics
        self.admission = Admission(settings.admission_limit, metrics)
        self._engine: EngineLike | None = None
        self._lock = threading.Lock()
        self._failure: ModelUnavailable | None = None
        self._failed_at = float("-inf")
        self._attempts = 0

    def init_app(self, app: Flask) -> None:
        """Register in app.extensions."""
        app.extensions[EXTENSION] = self

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded in this process."""
        return self._engine is not None

    @property
    def placement(self) -> dict[str, str]:
        """The loaded model's device and dtype (empty before it loads, or from an engine that cannot say)."""
        return dict(self._engine.placement) if self._engine is not None else {}

    @property
    def loading(self) -> bool:
        """Whether a load is under way in this process."""
        return self._lock.locked() and self._engine is None

    @property
    def failure(self) -> str | None:
        """Why the last load failed, if it did and nothing loaded since."""
        return str(self._failure) if self._failure and not self._engine else None

    def stats(self) -> dict[str, Any] | None:
        """The engine's live figures, or None while no model is loaded here (this never loads one)."""
        return self._engine.stats() if self._engine is not None else None

    def get(self) -> EngineLike:
        """Return the engine, loading it on first use; raise ModelUnavailable if that fails."""
        engine = self._engine
        if engine is not None:
            return engine
        seen = self._attempts
        with self._lock:
            if self._engine is not None:
                return self._engine
            # Callers that waited on a failed load share its outcome, and nobody retries too soon.
            if self._failure is not None and (self._attempts != seen or self._retry_pending()):
                raise self._failure
            return self._load()

    def engine(self) -> EngineLike:
        """Return the engine for an admitted request, counted as waiting while the model loads."""
        with self._waiting():
            return self.get()

    @contextmanager
    def _waiting(self) -> Iterator[None]:
        """Count the request as waiting while the model loads (at once when it is loaded)."""
        if self._engine is not None:
            yield
            return
        self.metrics.waiting.inc()
        try:
            yield
        finally:
            self.metrics.waiting.dec()

    def warm(self) -> None:
        """Start loading the model in the background, unless it is loaded, loading or failed too recently."""
        if self._engine is not None or self._lock.locked() or self._retry_pending():
            return
        threading.Thread(target=self._warm, name="llmapi-warmup", daemon=True).start()

    def _warm(self) -> None:
        """Load the model; a failure is logged by _load and reported by /ready."""
        try:
            self.get()
        except ModelUnavailable:
            pass

    def _retry_pending(self) -> bool:
        """Whether the last load failed less than MODEL_RETRY_SECONDS ago."""
        return self._failure is not None and time.monotonic() - self._failed_at < self.settings.model_retry_seconds

    def _load(self) -> EngineLike:
        """Load the model under the lock, remembering a failure."""
        self._attempts += 1
        started = time.perf_counter()
        name = self.settings.model_name
        try:
            self._engine = self._factory(self.settings)
        except Exception as exc:
            self._failed_at = time.monotonic()
            reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            self._failure = ModelUnavailable(
                f"The model {name!r} could not be loaded: {reason}",
                retry_at=self._failed_at + self.settings.model_retry_seconds,
            )
            log.error("pid=%d model load failed: %s: %s", os.getpid(), type(exc).__name__, reason)
            self.metrics.observe_load(None)
            raise self._failure from exc
        self._failure = None
        self._engine.on_stats = self.metrics.observe_engine  # the batching engine reports its queue and prefix cache
        seconds = time.perf_counter() - started
        log.info("pid=%d loaded model %s in %.2fs", os.getpid(), name, seconds)
        self.metrics.observe_load(seconds, placement=self.placement)
        return self._engine


def engine_service() -> EngineService:
    """The current app's engine service."""
    return current_app.extensions[EXTENSION]
