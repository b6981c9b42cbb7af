"""Which rows run next: the waiting queue, admission into the batch, prefill jobs and their chunk budget, the lanes
that decode, and the rows that end early (cancelled, or past their deadline)."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch

from llmapi.engine.config import EngineConfig
from llmapi.engine.embed import EmbedRow
from llmapi.engine.lane import Lane
from llmapi.engine.prefill import Prefill
from llmapi.engine.prefix_cache import PrefixCache
from llmapi.engine.sequence import Row
from llmapi.engine.types import EngineError


class Scheduler:
    """The rows waiting, being prefilled and decoding (nano-vllm's waiting and running queues), and what runs next."""

    def __init__(self, config: EngineConfig, prefix_cache: PrefixCache, *, model_name: str, pad_id: int, device: Any):
        self.max_batch_size = config.max_batch_size
        self.batch_wait_s = config.batch_wait_ms / 1000.0
        self.chunk_tokens = config.prefill_chunk_tokens  # 0: every prompt in one pass
        self.prefix_cache = prefix_cache
        self.model_name = model_name
        self.pad_id = pad_id
        self.device = device
        self.waiting: deque[Row | EmbedRow] = deque()  # an input to embed waits for room like a generation
        self.prefilling: list[Prefill] = []
        self.lanes: list[Lane] = []
        self.wakeup = threading.Condition()
        self.closing = False

    def add(self, row: Row | EmbedRow) -> None:
        """Queue a submitted row and wake the engine thread (from the caller's thread)."""
        with self.wakeup:
            if self.closing:
                raise EngineError("the engine was shut down")
            self.waiting.append(row)
            self.wakeup.notify()

    def close(self) -> None:
        """Stop admitting; wake the engine thread so that it sees it."""
        with self.wakeup:
            self.closing = True
            self.wakeup.notify()

    def admit(self) -> list[list[Row]]:
        """Take waiting rows that fit: the shared group, and each seeded row as a group of its own.

        When idle, block for work and give late arrivals batch_wait_ms to join. While lanes decode, take
        newcomers once the oldest has waited batch_wait_ms or they fill the free room, so that a trickle of
        arrivals shares one prefill instead of costing one each.
        """
        with self.wakeup:
            busy = bool(self.lanes or self.prefilling)
            if not busy:
                while not self.waiting and not self.closing:
                    self.wakeup.wait()
                self._wait_for_company()
            if self.closing:
                return []
            room = self.max_batch_size - self.decoding() - self.prefilling_rows()
            if not self.waiting or room <= 0:
                return []
            waited = time.monotonic() - self.waiting[0].submitted
            if busy and waited < self.batch_wait_s and len(self.waiting) < room:
                return []
            taken = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        embeds = [row for row in taken if isinstance(row, EmbedRow)]  # run by the engine in one forward pass
        taken = [row for row in taken if not isinstance(row, EmbedRow)]
        shared = [row for row in taken if not row.solo and not row.needs_prompt_logprobs]
        # A row that scores its prompt prefills alone, so that its prefill keeps one prompt's logits (T x vocab),
        # not the whole group's; its lane then joins the shared one like any other.
        alone = [[row] for row in taken if row.solo or row.needs_prompt_logprobs]
        return ([embeds] if embeds else []) + ([shared] if shared else []) + alone

    def _wait_for_company(self) -> None:
        """Hold a new batch open for batch_wait_ms or until it is full (the caller holds the lock)."""
        deadline = time.monotonic() + self.batch_wait_s
        while len(self.waiting) < self.max_batch_size and not self.closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wakeup.wait(left)

    def start_prefill(self, rows: list[Row]) -> None:
        """Look up each row's cached prefix and queue its prefill: rows with a long rest each alone, in chunks."""
        now = time.monotonic()
        rows = self.end_stopped(rows, now)
        batch: list[tuple[Row, tuple[int, torch.Tensor | None]]] = []
        for row in rows:
            row.timings["queue_s"] = now - row.submitted
            start = self._cached_prefix(row)
            row.cached_tokens = start[0]
            if row.needs_prompt_logprobs:
                self.prefilling.append(self._job([row], [start], chunked=False, all_logits=True))
            elif self.chunk_tokens and len(row.prompt_ids) - start[0] > self.chunk_tokens:
                self.prefilling.append(self._job([row], [start], chunked=True))
            else:
                batch.append((row, start))
        if batch:
            self.prefilling.append(self._job([row for row, _ in batch], [start for _, start in batch], chunked=False))

    def _job(self, rows: list[Row], starts: list, *, chunked: bool, all_logits: bool = False) -> Prefill:
        """A prefill job for `rows` on the model's device."""
        chunk = self.chunk_tokens if chunked else 0
        return Prefill(rows, starts, pad_id=self.pad_id, chunk_tokens=chunk, device=self.device, all_logits=all_logits)

    def _cached_prefix(self, row: Row) -> tuple[int, torch.Tensor | None]:
        """The row's longest cached prefix (tokens, KV), or (0, None) when it may not or does not have one."""
        if not self.prefix_cache.enabled or not row.uses_prefix_cache:
            return 0, None
        return self.prefix_cache.lookup(row.prompt_ids)

    def prefills_due(self) -> list[Prefill]:
        """The prefill jobs to feed this step: every one-pass job, and one chunk of the oldest chunked job.

        So a long prompt costs the running rows at most one chunk per decode step, however many long prompts wait.
        With no row decoding there is nothing to protect: every chunked job reads its next chunk.
        """
        due = []
        chunked_done = False
        protect = any(lane.rows for lane in self.lanes)
        for job in list(self.prefilling):
            if job.chunked and protect:
                if chunked_done:
                    continue
                chunked_done = True
            due.append(job)
        return due

    def end_stopped(self, rows: list[Row], now: float) -> list[Row]:
        """Finish the rows that were cancelled or ran out of time; return the rows still going."""
        for row in rows:
            if row.finish_reason is None:
                row.check_time(now)
            if row.finish_reason is not None and not row.closed:
                row.finish(self.model_name, now)
        return [row for row in rows if row.finish_reason is None]

    def drop_failed(self) -> None:
        """Forget the prefill jobs of failed rows (queued by a failing start_prefill, say): they must not go on."""
        self.prefilling = [job for job in self.prefilling if job.rows and not any(r.closed for r in job.rows)]

    def decoding(self) -> int:
        """Rows in the lanes (decoding)."""
        return sum(len(lane.rows) for lane in self.lanes)

    def prefilling_rows(self) -> int:
        """Rows in the prefill jobs (their prompts being read)."""
        return sum(len(job.rows) for job in list(self.prefilling))

    def every_row(self) -> list[Row]:
        """Every row the engine holds: decoding, waiting, being prefilled (to fail them when it shuts down)."""
        return (
            [row for lane in self.lanes for row in lane.rows]
            + list(self.waiting)
            + [row for job in self.prefilling for row in job.rows]
        )
