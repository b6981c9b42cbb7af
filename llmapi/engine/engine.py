"""The per-process engine: a queue of requests and one decoding thread that runs continuous batching.

Each turn of its loop reads the schedule (scheduler.py), runs what it says (a prefill chunk: prefill.py; a decode
step: step.py) and postprocesses the logits (postprocess.py). Requests that arrive while a lane decodes are
prefilled and merged into it at the next step (lane.py), and a row that finishes leaves its lane at once.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from llmapi.engine import embed, kv, logprobs
from llmapi.engine.bytelevel import fast_decoder
from llmapi.engine.config import EngineConfig
from llmapi.engine.handle import Handle
from llmapi.engine.lane import Lane, place
from llmapi.engine.loader import LoadedModel
from llmapi.engine.postprocess import Postprocess
from llmapi.engine.prefill import Prefill
from llmapi.engine.prefix_cache import PrefixCache
from llmapi.engine.scheduler import Scheduler
from llmapi.engine.sequence import Row
from llmapi.engine.speculation import Speculator
from llmapi.engine.stats import TokenRate, model_facts
from llmapi.engine.step import DecodeStep
from llmapi.engine.text import IncrementalDecoder
from llmapi.engine.tokenizer import Tokenizer
from llmapi.engine.types import EmbeddingRequest, EngineError, EngineStats, GenerationRequest

log = logging.getLogger(__name__)


class Engine(Tokenizer):
    """Owns one model copy; requests are queued and decoded in lanes by one background thread."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        super().__init__(loaded)
        self.max_batch_size = config.max_batch_size
        self.prefix_cache = PrefixCache(config.prefix_cache_mb, block_tokens=config.prefix_cache_block_tokens)
        device = getattr(loaded.model, "device", "cpu")
        self.scheduler = Scheduler(
            config, self.prefix_cache, model_name=self.model_name, pad_id=loaded.pad_id, device=device
        )
        self.step = DecodeStep(loaded.model)
        self.speculator = Speculator(
            config.speculation,
            tokens=config.speculative_tokens,
            ngram_max=config.speculation_ngram_max,
            ngram_min=config.speculation_ngram_min,
            max_rows=config.speculation_max_rows,
        )
        self._rate = TokenRate()
        self.postprocess = Postprocess(
            model_name=self.model_name,
            eos_ids=loaded.eos_ids,
            texts=logprobs.TokenTexts(loaded.tokenizer, self.decode),
            grammars=self.grammars,
            rate=self._rate,
        )
        # Called from the engine thread with an EngineStats whenever the queue or the cache changed (the metrics).
        self.on_stats: Callable[[EngineStats], None] | None = None
        self._published: EngineStats | None = None
        self._piece_decode = fast_decoder(loaded.tokenizer, self.decode)
        self._thread = threading.Thread(target=self._run, name="llmapi-engine", daemon=True)
        self._thread.start()
        # A daemon thread still inside a torch op while the interpreter finalizes aborts the process.
        atexit.register(self.close)

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue `request` and return its handle; raise ContextLengthExceeded when it cannot fit."""
        submitted = time.monotonic()
        prompt_ids = self.prompt_ids(request)
        self.check_request(request)
        handle = Handle(request)
        row = Row(handle, prompt_ids, IncrementalDecoder(self._piece_decode), submitted)
        if request.grammar is not None:  # compiled (or found in the cache) here, in the caller's thread
            row.grammar = self.grammars().matcher(request.grammar)
        if request.prompt_ids is not None:  # for echo: the text of a prompt sent as ids
            row.prompt_text = self.decode(prompt_ids)
        self.scheduler.add(row)
        return handle

    def embed(self, request: EmbeddingRequest) -> embed.EmbedRow:
        """Queue one input to embed: admitted like a generation, run with the others taken with it (engine/embed.py)."""
        row = embed.EmbedRow(request, embed.input_ids(self, request))
        self.scheduler.add(row)
        return row

    def stats(self) -> dict[str, Any]:
        """Live figures for the status route, read from the request thread without pausing the decoding thread."""
        scheduler = self.scheduler
        with scheduler.wakeup:
            waiting = len(scheduler.waiting)
        # A finished row stays in its lane until the end of its step; its caller may have its result already.
        decoding = sum(row.finish_reason is None for lane in list(scheduler.lanes) for row in list(lane.rows))
        return {
            **model_facts(self.loaded),
            "engine_mode": "batch",
            "decoding": decoding,
            "prefilling": scheduler.prefilling_rows(),
            "waiting": waiting,
            "max_batch_size": self.max_batch_size,
            "tokens_per_second": round(self._rate.per_second(), 1),
            "generated_tokens": self._rate.total,
        }

    def queue_stats(self) -> EngineStats:
        """A snapshot of the queue and the prefix cache, for the metrics (on_stats)."""
        cache = self.prefix_cache.stats()
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            prefilling=self.scheduler.prefilling_rows(),
            decoding=self.scheduler.decoding(),
            prefix_cache_bytes=cache.bytes,
            prefix_cache_capacity_bytes=cache.capacity_bytes,
            prefix_hit_tokens=cache.hit_tokens,
            prefix_miss_tokens=cache.miss_tokens,
            speculative_proposed_tokens=self.speculator.proposed,
            speculative_accepted_tokens=self.speculator.accepted,
            prefill_tokens=self.scheduler.prefill_tokens(),
        )

    def close(self) -> None:
        """Stop the decoding thread after its current step; requests still queued or decoding get an error."""
        self.scheduler.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        """Read the schedule, run its prefills and one step of every lane, until closed; a failure fails its rows."""
        scheduler = self.scheduler
        while not scheduler.closing:
            with torch.inference_mode():
                for rows in scheduler.admit():
                    if isinstance(rows[0], embed.EmbedRow):  # inputs to embed: one forward pass, done
                        self._guarded(rows, partial(embed.run, self.loaded.model, rows, pad_id=self.loaded.pad_id))
                        continue
                    self._guarded(rows, partial(scheduler.start_prefill, rows))
                for job in scheduler.prefills_due():
                    if not self._guarded(job.rows, partial(self._prefill, job)):
                        job.rows = []
                for lane in list(scheduler.lanes):
                    if not self._guarded(lane.rows, partial(self._step, lane)):
                        lane.rows = []
            scheduler.lanes = [lane for lane in scheduler.lanes if lane.rows]
            self._publish()
        for row in scheduler.every_row():
            row.fail(EngineError("the engine was shut down"))

    def _guarded(self, rows: list[Row], action: Callable[[], None]) -> bool:
        """Run `action`; on failure report it to the callers of `rows` and return False (the engine goes on)."""
        try:
            action()
        except Exception as exc:  # a bug or a torch failure: the callers get an error, the engine goes on
            log.exception("generation failed for %d rows", len(rows))
            for row in rows:
                row.fail(EngineError(f"generation failed: {type(exc).__name__}"))
            self.scheduler.drop_failed()
            return False
        return True

    def _prefill(self, job: Prefill) -> None:
        """Feed a job's next chunk (dropping rows cancelled or out of time); when done, its rows start decoding."""
        scheduler = self.scheduler
        live = scheduler.end_stopped(job.rows, time.monotonic())
        if len(live) < len(job.rows):
            job.keep([i for i, row in enumerate(job.rows) if row.finish_reason is None])
        if not job.rows:
            scheduler.prefilling.remove(job)
            return
        logits = job.advance(self.loaded.model)
        if job.all_logits:  # scored as read: a long prompt never holds T x vocab logits at once
            self.postprocess.score_prompt_chunk(job, logits)
        if not job.done:
            return
        scheduler.prefilling.remove(job)
        lane = Lane(job.rows, job.cache, job.mask, job.positions[:, -1:], padded=not bool(job.mask.all()))
        self._store_prefixes(lane)
        self.postprocess.run(lane, logits[:, -1, :].float())  # fp32 whatever the model computes in: see sampling
        self._place(lane)

    def _store_prefixes(self, lane: Lane) -> None:
        """Keep the full prompt blocks of the lane's rows in the prefix cache (those it does not hold yet)."""
        cache = self.prefix_cache
        if not cache.enabled or not kv.mergeable(lane.cache):
            return
        for i, row in enumerate(lane.rows):
            full = len(row.prompt_ids) // cache.block_tokens * cache.block_tokens
            start = max(row.cached_tokens, cache.known(row.prompt_ids[:full]))
            if full <= start:
                continue
            columns = kv.real_columns(lane.mask, i, start, full)
            cache.store(row.prompt_ids[:full], kv.row_kv(lane.cache, i, columns), start=start)

    def _place(self, lane: Lane) -> None:
        """Put a freshly prefilled lane among the decoding ones (lane.place: merged, or apart)."""
        place(lane, self.scheduler.lanes)

    def _step(self, lane: Lane) -> None:
        """Drop the lane's rows that ended early, run its forward pass, choose each row's next token (or tokens: a
        pass that verifies drafts, when the speculator has some for this lane)."""
        if len(self.scheduler.end_stopped(lane.rows, time.monotonic())) < len(lane.rows):
            lane.keep([i for i, row in enumerate(lane.rows) if row.finish_reason is None])
            if not lane.rows:
                return
        drafts = self.speculator.drafts(lane)
        if drafts is None:
            self.postprocess.run(lane, self.step(lane))
            return
        rows = lane.rows
        accepted = self.postprocess.run_drafts(lane, self.step.verify(lane, drafts), drafts)
        self.speculator.record(rows, drafts, accepted)

    def _publish(self) -> None:
        """Hand the stats to on_stats when they changed since last time (a failing hook is logged, not fatal)."""
        if self.on_stats is None:
            return
        stats = self.queue_stats()
        if stats == self._published:
            return
        self._published = stats
        try:
            self.on_stats(stats)
        except Exception:
            log.exception("the engine's stats hook failed")
