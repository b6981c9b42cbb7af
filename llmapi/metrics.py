"""Prometheus metrics: the registry, summed over every gunicorn worker through prometheus_client's files.

Its route, GET /metrics, lives in http/metrics.py."""

from __future__ import annotations

import itertools
import time
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

from llmapi.config import Settings
from llmapi.engine.types import EngineStats, GenerationResult

EXTENSION = "llmapi.metrics"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5)


class Metrics:
    """This process's metric objects; in multiprocess mode their values live in PROMETHEUS_MULTIPROC_DIR."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = settings.metrics_dir
        if self.directory and not getattr(prometheus_values.ValueClass, "_multiprocess", False):
            # prometheus_client picks where values live when it is first imported, and the gunicorn master
            # imported it (through llmapi) before its on_starting hook set the directory: choose again here,
            # in the worker, before the first metric exists.
            prometheus_values.ValueClass = prometheus_values.MultiProcessValue()
        self.registry = CollectorRegistry(auto_describe=True)
        self._define()
        self.capacity.set(settings.admission_limit)
        self.connection_capacity.set(settings.max_connections)

    def _define(self) -> None:
        """Declare every metric (names as Prometheus' conventions ask: unit suffixes, _total for counters)."""
        reg = {"registry": self.registry, "namespace": "llmapi"}
        self.requests = Counter("http_requests", "HTTP requests answered", ["method", "route", "status"], **reg)
        self.latency = Histogram(
            "http_request_duration_seconds",
            "time from request to the end of the response (streams included)",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        live = {"multiprocess_mode": "livesum", **reg}
        self.in_flight = Gauge("requests_in_flight", "generating requests admitted and not finished", **live)
        self.waiting = Gauge("requests_waiting", "admitted generations waiting for the model to load", **live)
        self.capacity = Gauge("admission_capacity", "generating requests the live workers admit at once", **live)
        self.rejected = Counter("requests_rejected", "generating requests refused", ["reason"], **reg)
        self.generations = Counter("generations", "generations ended, by finish reason", ["finish_reason"], **reg)
        self.prompt_tokens = Counter("prompt_tokens", "prompt tokens of finished generations", **reg)
        self.new_tokens = Counter("generated_tokens", "new tokens generated", **reg)
        self.first_token = Histogram(
            "time_to_first_token_seconds", "from submission to the first new token", buckets=LATENCY_BUCKETS, **reg
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "from submission to the start of its prefill (admitted into the batch)",
            buckets=LATENCY_BUCKETS,
            **reg,
        )
        self.generation_time = Histogram(
            "generation_duration_seconds", "from submission to the last token", buckets=LATENCY_BUCKETS, **reg
        )
        self.batch_size = Histogram(
            "batch_size", "sequences in the batch a request joined", buckets=BATCH_BUCKETS, **reg
        )
        self.model_load = Histogram(
            "model_load_duration_seconds", "successful model loads", buckets=LATENCY_BUCKETS, **reg
        )
        self.model_load_failures = Counter("model_load_failures", "failed model loads", **reg)
        self.models_loaded = Gauge("models_loaded", "workers with their model loaded", **live)
        # Written by the gunicorn worker's main loop (llmapi/gunicorn/worker.py), which reads requests first.
        self.connections = Gauge(
            "connections", "open client connections: reading, active (on a thread), idle, closing", ["state"], **live
        )
        self.connection_capacity = Gauge("connection_capacity", "open connections the live workers allow", **live)
        self.connection_limit_reached = Counter(
            "connection_limit_reached", "times a worker stopped accepting at MAX_CONNECTIONS", **reg
        )
        self.connections_refused = Counter(
            "connections_refused",
            "requests answered and closed before they reached the app (read_timeout, head_too_large, body_too_large)",
            ["reason"],
            **reg,
        )
        self.model_info = Gauge(
            "model_info",
            "workers with their model loaded, by the dtype and device it runs in",
            ["dtype", "device"],
            **live,
        )
        self._define_engine(reg, live)

    def _define_engine(self, reg: dict[str, Any], live: dict[str, Any]) -> None:
        """The engine's queue, its prefix cache and the per-token latency (named as vLLM names its own)."""
        self.inter_token = Histogram(
            "inter_token_latency_seconds",
            "between consecutive new tokens of a generation",
            buckets=TOKEN_BUCKETS,
            **reg,
        )
        self.rows_waiting = Gauge("engine_rows_waiting", "sequences queued for a place in the batch", **live)
        self.rows_prefilling = Gauge("engine_rows_prefilling", "sequences whose prompt is being read", **live)
        self.rows_running = Gauge("engine_rows_running", "sequences in the batch, generating", **live)
        self.prefill_backlog = Gauge(
            "engine_prefill_tokens_waiting",
            "prompt tokens still to read: of the sequences waiting, and the unread rest of those prefilling",
            **live,
        )
        self.cache_hits = Counter("prefix_cache_hit_tokens", "prompt tokens read from the prefix cache", **reg)
        self.cache_misses = Counter("prefix_cache_miss_tokens", "prompt tokens the prefix cache did not hold", **reg)
        self.cache_bytes = Gauge("prefix_cache_bytes", "memory the prefix caches hold", **live)
        self.cache_capacity = Gauge("prefix_cache_capacity_bytes", "memory the prefix caches may hold", **live)
        self.draft_proposed = Counter(
            "speculative_proposed_tokens", "draft tokens verified by speculation (SPECULATION)", **reg
        )
        self.draft_accepted = Counter(
            "speculative_accepted_tokens",
            "draft tokens accepted: new tokens that took no forward pass of their own",
            **reg,
        )
        self._engine_seen = EngineStats()

    def init_app(self, app: Flask) -> None:
        """Count every request, a stream when its response is closed, so that it is timed to its end."""
        app.extensions[EXTENSION] = self
        app.before_request(_start_timer)
        app.after_request(self._observe)

    def _observe(self, response: Response) -> Response:
        """after_request: record route, status and latency (of a stream: when it has been sent to the end)."""
        started = request.environ.get("llmapi.started", time.perf_counter())
        method = request.method if request.method in METHODS else "OTHER"
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        status = str(response.status_code)

        def observe() -> None:
            self.requests.labels(method, route, status).inc()
            self.latency.labels(method, route).observe(time.perf_counter() - started)

        if response.is_streamed:
            response.call_on_close(observe)
        else:
            observe()
        return response

    def observe_result(self, result: GenerationResult) -> None:
        """Record a finished generation: its tokens and the engine's timings."""
        self.generations.labels(result.finish_reason).inc()
        self.prompt_tokens.inc(result.prompt_tokens)
        self.new_tokens.inc(result.completion_tokens)
        timings = result.timings
        for name, histogram in (
            ("first_token_s", self.first_token),
            ("queue_s", self.queue_wait),
            ("total_s", self.generation_time),
            ("batch_size", self.batch_size),
        ):
            if name in timings:
                histogram.observe(timings[name])
        times = result.token_times
        for earlier, later in itertools.pairwise(times):
            self.inter_token.observe(later - earlier)

    def observe_engine(self, stats: EngineStats) -> None:
        """Record a snapshot of this worker's engine (called from its thread when something changed)."""
        self.rows_waiting.set(stats.waiting)
        self.rows_prefilling.set(stats.prefilling)
        self.rows_running.set(stats.decoding)
        self.prefill_backlog.set(stats.prefill_tokens)
        self.cache_bytes.set(stats.prefix_cache_bytes)
        self.cache_capacity.set(stats.prefix_cache_capacity_bytes)
        seen, self._engine_seen = self._engine_seen, stats
        if stats.prefix_hit_tokens > seen.prefix_hit_tokens:
            self.cache_hits.inc(stats.prefix_hit_tokens - seen.prefix_hit_tokens)
        if stats.prefix_miss_tokens > seen.prefix_miss_tokens:
            self.cache_misses.inc(stats.prefix_miss_tokens - seen.prefix_miss_tokens)
        if stats.speculative_proposed_tokens > seen.speculative_proposed_tokens:
            self.draft_proposed.inc(stats.speculative_proposed_tokens - seen.speculative_proposed_tokens)
        if stats.speculative_accepted_tokens > seen.speculative_accepted_tokens:
            self.draft_accepted.inc(stats.speculative_accepted_tokens - seen.speculative_accepted_tokens)

    def observe_load(self, seconds: float | None, *, placement: dict[str, str] | None = None) -> None:
        """Record a model load: its duration (None when it failed) and the dtype and device it chose."""
        if seconds is None:
            self.model_load_failures.inc()
        else:
            self.model_load.observe(seconds)
            self.models_loaded.set(1)
            if placement:
                self.model_info.labels(placement.get("dtype", ""), placement.get("device", "")).set(1)

    def render(self) -> bytes:
        """The text exposition of every worker's metrics (or of this process's alone, outside gunicorn)."""
        if not self.directory:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        return generate_latest(registry)


def _start_timer() -> None:
    """before_request: note when the request started."""
    request.environ["llmapi.started"] = time.perf_counter()
