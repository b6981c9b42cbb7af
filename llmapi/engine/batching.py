"""The per-process engine: a queue of requests and one decoding thread that runs continuous batching.

Rows decode together in a lane, one forward pass per step. Requests that arrive while a lane decodes are
prefilled and merged into it at the next step (their KV cache and mask left-padded to the lane's length), and a
row that finishes leaves the lane at once. A request with a seed gets a lane of its own (a batch of one with no
padding), so that its arithmetic, and so its text, does not depend on what else the server is doing.
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from llmapi.engine import embed, logprobs
from llmapi.engine.base import ModelFront
from llmapi.engine.bytelevel import fast_decoder
from llmapi.engine.loader import LoadedModel
from llmapi.engine.prefill import Prefill, row_kv
from llmapi.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from llmapi.engine.sampling import RowControls, choose
from llmapi.engine.stats import TokenRate, model_facts
from llmapi.engine.text import IncrementalDecoder, StopMatcher
from llmapi.engine.types import (
    EmbeddingRequest,
    EngineError,
    EngineStats,
    GenerationRequest,
    GenerationResult,
    Piece,
    TokenLogprob,
)

log = logging.getLogger(__name__)


class Handle:
    """The caller's end of one generation: its text pieces, its result, and a way to cancel it."""

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.cancelled = threading.Event()
        self._events: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()

    def cancel(self) -> None:
        """Ask the engine to stop this generation at the next step."""
        self.cancelled.set()

    def pieces(self) -> Iterator[str | GenerationResult]:
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

    def _send(self, kind: str, payload: object) -> None:
        """Deliver an event from the engine thread."""
        self._events.put((kind, payload))


class Row:
    """One sequence inside a lane: its request, tokens, text and timing."""

    def __init__(self, handle: Handle, prompt_ids: list[int], decoder: IncrementalDecoder, submitted: float) -> None:
        request = handle.request
        self.handle = handle
        self.request = request
        self.prompt_ids = prompt_ids
        self.decoder = decoder
        self.stops = StopMatcher(request.stop)
        self.text = ""
        self.sent = 0
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.submitted = submitted
        self.deadline = submitted + request.timeout_s if request.timeout_s else float("inf")
        self.timings: dict[str, float] = {}
        # The submitting thread's context (its request id, for one): the engine thread logs about the row in it.
        self.context = contextvars.copy_context()
        self.closed = False
        self.solo = request.seed is not None
        self.seed = request.seed
        self.steps = 0
        self.batched = 0  # sum over this row's forward passes of the rows in them
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        self.token_times: list[float] = []  # when each new token was chosen, seconds after submission
        if not request.greedy and self.seed is None:
            self.seed = random.getrandbits(63)
        generator = torch.Generator().manual_seed(self.seed) if not request.greedy else None
        self.controls = RowControls(
            greedy=request.greedy,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            repetition_penalty=request.repetition_penalty,
            suppress_eos=request.min_new_tokens > 0,
            seen=set(prompt_ids) if request.repetition_penalty != 1.0 else set(),
            generator=generator,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            bias=dict(request.logit_bias),
            min_p=request.min_p,
        )
        # Log-probabilities (engine/logprobs.py) and the grammar's matcher (engine/grammar.py), when asked for.
        self.logprobs: list[TokenLogprob] = []
        self.logprobs_sent = 0
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
        self.grammar: Any = None  # a grammar.Matcher, set by the engine at submit
        self.prompt_text: str | None = None  # the decoded prompt of a request sent as token ids

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether this row's prefill must keep every prompt position's logits (prompt logprobs: echo with logprobs).

        Such a row reads its whole prompt in one pass: no prefix cache (as vLLM does: cached positions would have
        no logits to score), no chunks.
        """
        return self.request.needs_prompt_logprobs

    @property
    def uses_prefix_cache(self) -> bool:
        """Whether this row may start after a cached prefix: not a seeded row (its arithmetic must not depend on
        what ran before it: the seed promise), nor one that needs every prompt position's logits."""
        return not self.solo and not self.needs_prompt_logprobs

    @property
    def generated(self) -> int:
        """How many tokens this row has produced."""
        return len(self.decoder.ids)

    def check_time(self, now: float) -> None:
        """End the row if its client went away or its deadline passed."""
        if self.finish_reason is None:
            if self.handle.cancelled.is_set():
                self.finish_reason = "cancelled"
            elif now >= self.deadline:
                self.finish_reason = "timeout"

    def push(self, token: int, eos_ids: frozenset[int], logprob: TokenLogprob | None = None) -> None:
        """Take the next token: end on EOS, a stop sequence or the length limit; stream what is safe."""
        request = self.request
        if token in eos_ids and self.generated >= request.min_new_tokens:
            self.decoder.ids.append(token)
            self.finish_reason = "eos"
            return
        if logprob is not None:
            self.logprobs.append(logprob)
        complete = self.grammar is not None and self.grammar.advance(token)
        self.controls.saw(token)
        self.controls.suppress_eos = self.generated + 1 < request.min_new_tokens
        self._add_text(self.decoder.push(token))
        if complete and self.finish_reason is None:
            # The grammar is complete: its only next token would be end-of-sequence, so end here, a step early.
            self._add_text(self.decoder.flush())
            self.finish_reason = self.finish_reason or "eos"  # a stop sequence in the flushed text wins
        if self.finish_reason is None and self.generated >= request.max_new_tokens:
            self.finish_reason = "length"

    def _add_text(self, piece: str) -> None:
        """Append decoded text, cutting it at the first stop sequence."""
        if not piece:
            return
        start = len(self.text)
        self.text += piece
        found = self.stops.find(self.text, start)
        if found is not None:
            self.text = self.text[: found[0]]
            self.stop_sequence = found[1]
            self.finish_reason = "stop"

    def stream(self) -> None:
        """Send the text that can no longer become part of a stop sequence."""
        if not self.request.stream:
            return
        safe = len(self.text) - (0 if self.finish_reason else self.stops.held_back(self.text))
        held = len(self.logprobs) > self.logprobs_sent and self.finish_reason is not None
        if safe > self.sent or held:
            piece = self.text[self.sent : safe]
            if self.request.logprobs is not None:  # the piece carries the log-probabilities of its tokens
                piece = Piece(piece, tuple(self.logprobs[self.logprobs_sent :]))
                self.logprobs_sent = len(self.logprobs)
            self.handle._send("piece", piece)
            self.sent = safe

    def finish(self, model: str, now: float) -> None:
        """Flush the decoder, send the last piece and the result."""
        if self.finish_reason not in ("stop", "eos"):
            self._add_text(self.decoder.flush())
        self.stream()
        self.closed = True
        if self.finish_reason == "cancelled":
            self.context.run(
                log.info, "generation cancelled after %d of %d new tokens", self.generated, self.request.max_new_tokens
            )
        self.timings["total_s"] = now - self.submitted
        self.timings["batch_size"] = self.batched / self.steps if self.steps else 1.0
        result = GenerationResult(
            text=self.text,
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.generated,
            model=model,
            seed=self.seed,
            stop_sequence=self.stop_sequence,
            timings=self.timings,
            logprobs=tuple(self.logprobs) if self.request.logprobs is not None else None,
            prompt_logprobs=self.prompt_logprobs,
            prompt_text=self.prompt_text,
            cached_tokens=self.cached_tokens,
            token_times=tuple(self.token_times),
        )
        self.handle._send("done", result)


class Lane:
    """Rows decoded together, one forward pass per step; `next_ids` holds each row's token to feed next."""

    def __init__(self, rows: list[Row], cache: Any, mask: torch.Tensor, positions: torch.Tensor, padded: bool) -> None:
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [rows, cache length]: 1 where the cache holds a real token, 0 for left padding
        self.positions = positions  # [rows, 1]: the position of each row's last token in the cache
        self.next_ids = torch.empty((0, 1), dtype=torch.long, device=mask.device)
        self.solo = rows[0].solo
        # Whether any row has padding, known on the host: a step never asks the device (one sync fewer).
        self.padded = padded

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at `index`, and drop cache columns that are padding in every row left."""
        self.rows = [self.rows[i] for i in index]
        if not self.rows:
            return
        select = torch.tensor(index, dtype=torch.long).to(self.mask.device)
        self.cache.batch_select_indices(select)
        self.mask, self.positions, self.next_ids = self.mask[select], self.positions[select], self.next_ids[select]
        if not self.padded:
            return
        lead = int(self.mask.any(dim=0).to(torch.int8).argmax())  # a device sync, only when a padded row leaves
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
        self.padded = not bool(self.mask.all())  # padding may sit between a cached prefix and the rest

    def merge(self, other: Lane) -> None:
        """Append `other`'s rows: the shorter cache and mask are padded on the left to the longer one."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.padded = self.padded or other.padded or self.mask.shape[1] != other.mask.shape[1]
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.rows = self.rows + other.rows


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of dimension `dim` to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


# Keeping a long lane apart from short ones (Engine._add_lane): at least this many padding cells (rows x columns)
# would have to be added, below which one more forward pass per step costs more than the padding; and at most
# this many shared lanes step side by side.
MIN_PADDING_CELLS = 2048
MAX_SHARED_LANES = 2


def cells(lane: Lane) -> int:
    """Rows x columns: what a step's attention reads of the lane's cache."""
    return len(lane.rows) * lane.mask.shape[1]


def padding_cells(shared: Lane, other: Lane) -> int:
    """The cells merging `other` into `shared` would add beyond the two lanes' own."""
    width = max(shared.mask.shape[1], other.mask.shape[1])
    return (len(shared.rows) + len(other.rows)) * width - cells(shared) - cells(other)


def apart(shared: Lane, other: Lane) -> bool:
    """Whether `other` should decode in a lane of its own: merging would more than double the cells read."""
    added = padding_cells(shared, other)
    return added >= MIN_PADDING_CELLS and added > cells(shared) + cells(other)


def mergeable(cache: Any) -> bool:
    """Whether a cache is a list of plain growing layers, the kind whose rows can be padded and merged."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


class Engine(ModelFront):
    """Owns one model copy; requests are queued and decoded in lanes by one background thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch_size: int = 8,
        batch_wait_ms: float = 2.0,
        prefix_cache_mb: float = 0.0,
        prefill_chunk_tokens: int = 0,
        block_tokens: int = BLOCK_TOKENS,
    ) -> None:
        super().__init__(loaded)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.prefix_cache = PrefixCache(prefix_cache_mb, block_tokens=block_tokens)
        self.chunk_tokens = prefill_chunk_tokens  # 0: every prompt in one pass
        # Called from the engine thread with an EngineStats whenever the queue or the cache changed (the metrics).
        self.on_stats: Any = None
        self._published: EngineStats | None = None
        self._prefilling: list[Prefill] = []
        self._piece_decode = fast_decoder(loaded.tokenizer, self.decode)
        self._texts = logprobs.TokenTexts(loaded.tokenizer, self.decode)
        self._eos_list = sorted(loaded.eos_ids)
        # With SDPA attention a decode step's mask is just "may row r see key k": built here as a view instead of
        # by transformers' mask functions, which cost about a tenth of a tiny model's step.
        self._bool_masks = getattr(loaded.model.config, "_attn_implementation", None) == "sdpa"
        self._pending: deque[Row] = deque()
        self._lanes: list[Lane] = []
        self._wakeup = threading.Condition()
        self._closing = False
        self._rate = TokenRate()
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
        with self._wakeup:
            if self._closing:
                raise EngineError("the engine was shut down")
            self._pending.append(row)
            self._wakeup.notify()
        return handle

    def embed(self, request: EmbeddingRequest) -> embed.EmbedRow:
        """Queue one input to embed: admitted like a generation, run with the others taken with it (engine/embed.py)."""
        row = embed.EmbedRow(request, embed.input_ids(self, request))
        with self._wakeup:
            if self._closing:
                raise EngineError("the engine was shut down")
            self._pending.append(row)  # type: ignore[arg-type]
            self._wakeup.notify()
        return row

    def stats(self) -> dict[str, Any]:
        """Live figures for the status route, read from the request thread without pausing the decoding thread."""
        with self._wakeup:
            waiting = len(self._pending)
        # A finished row stays in its lane until the end of its step; its caller may have its result already.
        decoding = sum(row.finish_reason is None for lane in list(self._lanes) for row in list(lane.rows))
        prefilling = self._prefilling_rows()
        return {
            **model_facts(self.loaded),
            "engine_mode": "batch",
            "decoding": decoding,
            "prefilling": prefilling,
            "waiting": waiting,
            "max_batch_size": self.max_batch_size,
            "tokens_per_second": round(self._rate.per_second(), 1),
            "generated_tokens": self._rate.total,
        }

    def close(self) -> None:
        """Stop the decoding thread after its current step; requests still queued or decoding get an error."""
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        """Admit requests and advance every lane by one token until closed; a failing lane fails its own rows."""
        while not self._closing:
            with torch.inference_mode():
                for rows in self._admit():
                    if isinstance(rows[0], embed.EmbedRow):  # inputs to embed: one forward pass, done
                        self._guarded(self._embed, rows)
                        continue
                    self._guarded(self._start_prefill, rows)
                self._advance_prefills()
                for lane in list(self._lanes):
                    self._guarded(self._step, lane)
            self._lanes = [lane for lane in self._lanes if lane.rows]
            self._publish()
        stopped = [row for lane in self._lanes for row in lane.rows] + list(self._pending)
        stopped += [row for job in self._prefilling for row in job.rows]
        for row in stopped:
            if not row.closed:
                row.closed = True
                row.handle._send("error", EngineError("the engine was shut down"))

    def _guarded(self, action: Any, lane: Lane | Prefill | list[Row]) -> None:
        """Run action(lane); on failure, report it to the lane's (or prefill's) waiting callers and drop it."""
        try:
            action(lane)
        except Exception as exc:  # a bug or a torch failure: the callers get an error, the engine goes on
            rows = lane if isinstance(lane, list) else lane.rows
            log.exception("generation failed for %d rows", len(rows))
            for row in rows:
                if not row.closed:
                    row.closed = True
                    row.handle._send("error", EngineError(f"generation failed: {type(exc).__name__}"))
            if not isinstance(lane, list):
                lane.rows = []
            # Prefill jobs of the failed rows (queued by a failing _start_prefill, say) must not go on.
            self._prefilling = [job for job in self._prefilling if job.rows and not any(r.closed for r in job.rows)]

    def _admit(self) -> list[list[Row]]:
        """Take waiting rows that fit: the shared group, and each seeded row as a group of its own.

        When idle, block for work and give late arrivals batch_wait_ms to join. While lanes decode, take
        newcomers once the oldest has waited batch_wait_ms or they fill the free room, so that a trickle of
        arrivals shares one prefill instead of costing one each.
        """
        with self._wakeup:
            busy = bool(self._lanes or self._prefilling)
            if not busy:
                while not self._pending and not self._closing:
                    self._wakeup.wait()
                self._wait_for_company()
            if self._closing:
                return []
            room = self.max_batch_size - self._decoding() - self._prefilling_rows()
            if not self._pending or room <= 0:
                return []
            waited = time.monotonic() - self._pending[0].submitted
            if busy and waited < self.batch_wait_s and len(self._pending) < room:
                return []
            taken = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        embeds = [row for row in taken if isinstance(row, embed.EmbedRow)]
        taken = [row for row in taken if not isinstance(row, embed.EmbedRow)]
        shared = [row for row in taken if not row.solo and not row.needs_prompt_logprobs]
        # A row that scores its prompt prefills alone, so that its prefill keeps one prompt's logits (T x vocab),
        # not the whole group's; its lane then joins the shared one like any other.
        alone = [[row] for row in taken if row.solo or row.needs_prompt_logprobs]
        return ([embeds] if embeds else []) + ([shared] if shared else []) + alone

    def _embed(self, rows: list[embed.EmbedRow]) -> None:
        """Embed the inputs taken together in one forward pass."""
        embed.run(self.loaded.model, rows, pad_id=self.loaded.pad_id)

    def _wait_for_company(self) -> None:
        """Hold a new batch open for batch_wait_ms or until it is full (the caller holds the lock)."""
        deadline = time.monotonic() + self.batch_wait_s
        while len(self._pending) < self.max_batch_size and not self._closing:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wakeup.wait(left)

    def _start_prefill(self, rows: list[Row]) -> None:
        """Look up each row's cached prefix and queue its prefill: rows with a long rest each alone, in chunks."""
        now = time.monotonic()
        rows = self._live(rows, now)
        batch: list[tuple[Row, tuple[int, torch.Tensor | None]]] = []
        for row in rows:
            row.timings["queue_s"] = now - row.submitted
            start = self._cached_prefix(row)
            row.cached_tokens = start[0]
            if row.needs_prompt_logprobs:
                self._prefilling.append(self._job([row], [start], chunked=False, all_logits=True))
            elif self.chunk_tokens and len(row.prompt_ids) - start[0] > self.chunk_tokens:
                self._prefilling.append(self._job([row], [start], chunked=True))
            else:
                batch.append((row, start))
        if batch:
            self._prefilling.append(self._job([row for row, _ in batch], [start for _, start in batch], chunked=False))

    def _job(self, rows: list[Row], starts: list, *, chunked: bool, all_logits: bool = False) -> Prefill:
        """A prefill job for `rows` on the model's device."""
        chunk = self.chunk_tokens if chunked else 0
        device = getattr(self.loaded.model, "device", "cpu")
        return Prefill(
            rows, starts, pad_id=self.loaded.pad_id, chunk_tokens=chunk, device=device, all_logits=all_logits
        )

    def _cached_prefix(self, row: Row) -> tuple[int, torch.Tensor | None]:
        """The row's longest cached prefix (tokens, KV), or (0, None) when it may not or does not have one."""
        if not self.prefix_cache.enabled or not row.uses_prefix_cache:
            return 0, None
        return self.prefix_cache.lookup(row.prompt_ids)

    def _advance_prefills(self) -> None:
        """Run one step of prefill: every one-pass job, and one chunk of the oldest chunked job.

        So a long prompt costs the running rows at most one chunk per decode step, however many long prompts wait.
        With no row decoding there is nothing to protect: every chunked job reads its next chunk.
        """
        chunked_done = False
        protect = any(lane.rows for lane in self._lanes)
        for job in list(self._prefilling):
            if job.chunked and protect:
                if chunked_done:
                    continue
                chunked_done = True
            self._guarded(self._advance, job)

    def _advance(self, job: Prefill) -> None:
        """Feed a job's next chunk (dropping rows cancelled or out of time); when done, its rows start decoding."""
        live = self._live(job.rows, time.monotonic())
        if len(live) < len(job.rows):
            job.keep([i for i, row in enumerate(job.rows) if row.finish_reason is None])
        if not job.rows:
            self._prefilling.remove(job)
            return
        logits = job.advance(self.loaded.model)
        if logits is None:
            return
        self._prefilling.remove(job)
        lane = Lane(job.rows, job.cache, job.mask, job.positions[:, -1:], padded=not bool(job.mask.all()))
        self._remember(lane)
        for i, row in enumerate(lane.rows):
            if row.needs_prompt_logprobs:  # a job of its own, every position's logits kept (all_logits)
                width = len(row.prompt_ids)
                row.prompt_logprobs = logprobs.prompt_entries(
                    logits[i, -width:].float(), row.prompt_ids, row.request.prompt_logprobs or 0, self._texts
                )
        self._choose(lane, logits[:, -1, :].float())  # fp32 whatever the model computes in: see sampling
        self._add_lane(lane)

    def _remember(self, lane: Lane) -> None:
        """Keep the full prompt blocks of the lane's rows in the prefix cache (those it does not hold yet)."""
        cache = self.prefix_cache
        if not cache.enabled or not mergeable(lane.cache):
            return
        for i, row in enumerate(lane.rows):
            full = len(row.prompt_ids) // cache.block_tokens * cache.block_tokens
            start = max(row.cached_tokens, cache.known(row.prompt_ids[:full]))
            if full <= start:
                continue
            columns = lane.mask[i].nonzero().squeeze(-1)[start:full]
            cache.store(row.prompt_ids[:full], row_kv(lane.cache, i, columns), start=start)

    def _add_lane(self, lane: Lane) -> None:
        """Merge a freshly prefilled lane into the shared lane it pads least, unless it is far longer: then its own.

        Rows of one lane are left-padded to its longest, and every step's attention (and the cache's growth) reads
        every column of every row: a 900-token prompt merged among short streams made each of their steps several
        times dearer for as long as it decoded. A lane apart costs one more forward pass per step instead, so it
        is kept apart only when merging would more than double the columns read and by MIN_PADDING_CELLS at least,
        and there are never more than MAX_SHARED_LANES.
        """
        if not lane.rows:
            return
        shared = [other for other in self._lanes if not other.solo and other.rows and mergeable(other.cache)]
        if lane.solo or not shared or not mergeable(lane.cache):
            self._lanes.append(lane)
            return
        closest = min(shared, key=lambda other: padding_cells(other, lane))
        if len(shared) >= MAX_SHARED_LANES or not apart(closest, lane):
            closest.merge(lane)
        else:
            self._lanes.append(lane)

    def _step(self, lane: Lane) -> None:
        """Feed each row's last token, then choose the next one."""
        now = time.monotonic()
        if len(self._live(lane.rows, now)) < len(lane.rows):
            lane.keep([i for i, row in enumerate(lane.rows) if row.finish_reason is None])
            if not lane.rows:
                return
        lane.mask = torch.cat([lane.mask, lane.mask.new_ones((len(lane.rows), 1))], dim=-1)
        lane.positions = lane.positions + 1
        out = self.loaded.model(
            input_ids=lane.next_ids,
            attention_mask=self._step_mask(lane),
            position_ids=lane.positions,
            cache=lane.cache,
            use_cache=True,
        )
        lane.cache = out.cache
        self._choose(lane, out.logits[:, -1, :].float())  # fp32 whatever the model computes in: see sampling

    def _step_mask(self, lane: Lane) -> torch.Tensor | None:
        """The attention mask of a decode step: none without padding, else 4-D boolean for SDPA, else 2-D."""
        if not lane.padded:  # no row has padding (left, or between a cached prefix and the rest)
            return None
        if self._bool_masks:
            return lane.mask.bool()[:, None, None, :]
        return lane.mask

    def _choose(self, lane: Lane, logits: torch.Tensor) -> None:
        """Pick each row's next token, hand it to the row, and let finished rows leave the lane at once."""
        scored = logprobs.wanted(lane.rows)
        raw = logits[scored] if scored else None  # a copy, before the sampler and any grammar edit the logits
        if any(row.grammar is not None for row in lane.rows):
            self.grammars().mask(logits, [row.grammar for row in lane.rows])
        chosen = choose(logits, [row.controls for row in lane.rows], self._eos_list)  # on the logits' device
        tokens = chosen.tolist()  # the one copy to the host a step makes
        entries: dict[int, TokenLogprob] = {}
        if raw is not None:
            ks = [lane.rows[i].request.logprobs or 0 for i in scored]
            found = logprobs.entries(raw, [tokens[i] for i in scored], ks, self._texts)
            entries = dict(zip(scored, found))
        now = time.monotonic()
        size = len(lane.rows)
        self._rate.add(size)
        keep = []
        for i, (row, token) in enumerate(zip(lane.rows, tokens)):
            if row.steps == 0:
                row.timings["first_token_s"] = now - row.submitted
            row.token_times.append(now - row.submitted)
            row.steps += 1
            row.batched += size
            if row.request.max_new_tokens == 0:  # score only (echo): the prefill was all it needed
                row.finish(self.model_name, now)
                continue
            row.push(token, self.loaded.eos_ids, entries.get(i))
            row.stream()
            if row.finish_reason is None:
                keep.append(i)
            else:
                row.finish(self.model_name, now)
        lane.next_ids = chosen.to(torch.long).unsqueeze(-1)
        if len(keep) < size:
            lane.keep(keep)

    def _decoding(self) -> int:
        """Rows in the lanes (decoding)."""
        return sum(len(lane.rows) for lane in self._lanes)

    def _prefilling_rows(self) -> int:
        """Rows in the prefill jobs (their prompts being read)."""
        return sum(len(job.rows) for job in list(self._prefilling))

    def queue_stats(self) -> EngineStats:
        """A snapshot of the queue and the prefix cache, for the metrics (on_stats)."""
        cache = self.prefix_cache.stats()
        return EngineStats(
            waiting=len(self._pending),
            prefilling=self._prefilling_rows(),
            decoding=self._decoding(),
            prefix_cache_bytes=cache.bytes,
            prefix_cache_capacity_bytes=cache.capacity_bytes,
            prefix_hit_tokens=cache.hit_tokens,
            prefix_miss_tokens=cache.miss_tokens,
        )

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

    def _live(self, rows: list[Row], now: float) -> list[Row]:
        """Finish rows that were cancelled or ran out of time; return the rows still going."""
        for row in rows:
            if row.finish_reason is None:
                row.check_time(now)
            if row.finish_reason is not None and not row.closed:
                row.finish(self.model_name, now)
        return [row for row in rows if row.finish_reason is None]
