"""Which rows run next: the waiting queue, admission into the batch, prefill jobs and their chunk budget, the lanes
that decode, and the rows that end early (cancelled, or past their deadline).

Work is scheduled by tokens, and fairly between requests (the rows of one HTTP request share a `group`): admission
takes waiting rows while fewer than `max_prefill_tokens` admitted prompt tokens are still unread, one row per request
in turn, the requests holding the fewest prefilling rows first; and while rows decode, a step reads at most
`prefill_chunk_tokens` prompt tokens across the prefill jobs, one job per request in turn, the request served least
recently first. So one request's many long prompts cannot hold the engine while another's short one waits.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
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
        self.max_prefill_tokens = config.max_prefill_tokens
        self.prefix_cache = prefix_cache
        self.model_name = model_name
        self.pad_id = pad_id
        self.device = device
        self.waiting: deque[Row | EmbedRow] = deque()  # an input to embed waits for room like a generation
        self.prefilling: list[Prefill] = []
        self.lanes: list[Lane] = []
        self.waiting_tokens = 0  # the prompt tokens of the rows waiting (the metrics' prefill backlog)
        self.served: dict[int, int] = {}  # each prefilling request's last turn at the step's prefill budget
        self.turns = itertools.count(1)
        self.wakeup = threading.Condition()
        self.closing = False

    def add(self, row: Row | EmbedRow) -> None:
        """Queue a submitted row and wake the engine thread (from the caller's thread)."""
        with self.wakeup:
            if self.closing:
                raise EngineError("the engine was shut down")
            self.waiting.append(row)
            self.waiting_tokens += prompt_tokens(row)
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
            taken = self._take_fairly(room)
        embeds = [row for row in taken if isinstance(row, EmbedRow)]  # run by the engine in one forward pass
        taken = [row for row in taken if not isinstance(row, EmbedRow)]
        shared = [row for row in taken if not row.solo and not row.needs_prompt_logprobs]
        # A row that scores its prompt prefills alone, so that its prefill keeps one prompt's logits (T x vocab),
        # not the whole group's; its lane then joins the shared one like any other.
        alone = [[row] for row in taken if row.solo or row.needs_prompt_logprobs]
        return ([embeds] if embeds else []) + ([shared] if shared else []) + alone

    def _take_fairly(self, room: int) -> list[Row | EmbedRow]:
        """Take up to `room` waiting rows, one per request in turn, while the admitted prompt tokens still unread are
        fewer than max_prefill_tokens (so at least one row when none are, however long its prompt).

        Requests holding the fewest prefilling rows go first, then the one waiting longest: a request of eight long
        prompts gets its second row in only after each other waiting request got one (the caller holds the lock).
        """
        queues: dict[int, deque[Row | EmbedRow]] = {}
        for row in self.waiting:
            queues.setdefault(row.group, deque()).append(row)
        held = Counter(row.group for job in self.prefilling for row in job.rows)
        unread = sum(job.unread() for job in self.prefilling)
        taken: list[Row | EmbedRow] = []
        while queues and len(taken) < room and unread < self.max_prefill_tokens:
            group = min(queues, key=lambda key: (held[key], queues[key][0].submitted))
            row = queues[group].popleft()
            if not queues[group]:
                del queues[group]
            taken.append(row)
            held[group] += 1
            unread += prompt_tokens(row)
        chosen = {id(row) for row in taken}
        self.waiting = deque(row for row in self.waiting if id(row) not in chosen)
        self.waiting_tokens -= sum(prompt_tokens(row) for row in taken)
        return taken

    def _wait_for_company(self) -> None:
        """Hold a new batch open for batch_wait_ms or until it is full (the caller holds the lock)."""
        deadline = time.monotonic() + self.batch_wait_s
        while len(self.waiting) < self.max_batch_size and not self.closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wakeup.wait(left)

    def start_prefill(self, rows: list[Row]) -> None:
        """Look up each row's cached prefix and queue its prefill: a row with a long rest, or one that scores its
        prompt, alone (in chunks when long); the others together, in jobs of at most a chunk's cells."""
        now = time.monotonic()
        rows = self.end_stopped(rows, now)
        batch: list[tuple[Row, tuple[int, torch.Tensor | None]]] = []
        for row in rows:
            row.timings["queue_s"] = now - row.submitted
            start = self._cached_prefix(row)
            row.cached_tokens = start[0]
            # A scoring row alone: its chunks' logits (every column) are one prompt's, not a group's.
            if row.needs_prompt_logprobs or (self.chunk_tokens and len(row.prompt_ids) - start[0] > self.chunk_tokens):
                self.prefilling.append(self._job([(row, start)], all_logits=row.needs_prompt_logprobs))
            else:
                batch.append((row, start))
        for part in self._pack(batch):
            self.prefilling.append(self._job(part))

    def _pack(self, batch: list[tuple[Row, tuple[int, torch.Tensor | None]]]) -> list[list[Any]]:
        """Split short rows into jobs whose rows x longest rest fit one step's budget (all in one without chunks).

        Sorted by length, so that rows of like length pad each other least.
        """
        if not self.chunk_tokens:
            return [batch] if batch else []
        parts: list[list[Any]] = []
        for row, start in sorted(batch, key=lambda item: len(item[0].prompt_ids) - item[1][0]):
            rest = len(row.prompt_ids) - start[0]  # the longest yet: sorted
            if parts and (len(parts[-1]) + 1) * rest <= self.chunk_tokens:
                parts[-1].append((row, start))
            else:
                parts.append([(row, start)])
        return parts

    def _job(self, part: list[Any], *, all_logits: bool = False) -> Prefill:
        """A prefill job for the (row, cached prefix) pairs of `part`, on the model's device."""
        rows, starts = [row for row, _ in part], [start for _, start in part]
        return Prefill(
            rows, starts, pad_id=self.pad_id, chunk_tokens=self.chunk_tokens, device=self.device, all_logits=all_logits
        )

    def _cached_prefix(self, row: Row) -> tuple[int, torch.Tensor | None]:
        """The row's longest cached prefix (tokens, KV), or (0, None) when it may not or does not have one."""
        if not self.prefix_cache.enabled or not row.uses_prefix_cache:
            return 0, None
        return self.prefix_cache.lookup(row.prompt_ids)

    def prefills_due(self) -> list[Prefill]:
        """The prefill jobs to feed this step: while rows decode, at most prefill_chunk_tokens prompt cells in all
        (at least one job), one job per request in turn; with no row decoding, every job.

        So whatever arrives, prompts to score included, a decoding row waits about one chunk's time per token.
        """
        jobs = [job for job in self.prefilling if job.rows]
        if not self.chunk_tokens or not any(lane.rows for lane in self.lanes):
            return jobs  # nothing to protect (or no budget): every job reads its next chunk
        due: list[Prefill] = []
        budget = self.chunk_tokens
        for job in self._fair_order(jobs):
            cost = job.next_cost()
            if due and cost > budget:
                continue  # a smaller one may still fit; this one's request, not served, goes first next step
            due.append(job)
            budget -= cost
        turn = next(self.turns)
        for job in due:
            self.served[job.group] = turn
        live = {job.group for job in jobs}
        self.served = {group: last for group, last in self.served.items() if group in live}
        return due

    def _fair_order(self, jobs: list[Prefill]) -> list[Prefill]:
        """`jobs` in turns: each request's first job, the request served least recently (then the oldest) first;
        then each one's second; and so on."""
        by_group: dict[int, list[Prefill]] = {}
        for job in jobs:
            by_group.setdefault(job.group, []).append(job)
        queues = sorted(by_group.values(), key=lambda own: (self.served.get(own[0].group, 0), own[0].submitted))
        return [job for turn in itertools.zip_longest(*queues) for job in turn if job is not None]

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

    def prefill_tokens(self) -> int:
        """Prompt tokens still to read: the waiting rows' and the unread rest of the prefilling ones (the metrics)."""
        return self.waiting_tokens + sum(job.unread() for job in list(self.prefilling) if job.rows)

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


def prompt_tokens(row: Row | EmbedRow) -> int:
    """The tokens of a row's prompt (or of an input to embed)."""
    return len(row.prompt_ids) if isinstance(row, Row) else len(row.ids)
