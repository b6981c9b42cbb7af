"""The per-process engine: a queue of requests, one decoding thread, batches decoded step by step."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from llmapi.engine.chat import Message, render
from llmapi.engine.loader import LoadedModel
from llmapi.engine.sampling import RowControls, choose
from llmapi.engine.text import IncrementalDecoder, StopMatcher
from llmapi.engine.types import ContextLengthExceeded, EngineError, GenerationRequest, GenerationResult

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
    """One sequence inside a batch: its request, tokens, text and timing."""

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
        self.closed = False
        self.seed = request.seed
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
            seen=list(prompt_ids) if request.repetition_penalty != 1.0 else [],
            generator=generator,
        )

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

    def push(self, token: int, eos_ids: frozenset[int]) -> None:
        """Take the next token: end on EOS, a stop sequence or the length limit; stream what is safe."""
        request = self.request
        if token in eos_ids and self.generated >= request.min_new_tokens:
            self.decoder.ids.append(token)
            self.finish_reason = "eos"
            return
        if self.controls.seen or self.controls.suppress_eos:
            self.controls.seen.append(token)
            self.controls.suppress_eos = self.generated + 1 < request.min_new_tokens
        self._add_text(self.decoder.push(token))
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
        if safe > self.sent:
            self.handle._send("piece", self.text[self.sent : safe])
            self.sent = safe

    def finish(self, model: str, now: float) -> None:
        """Flush the decoder, send the last piece and the result."""
        if self.finish_reason not in ("stop", "eos"):
            self._add_text(self.decoder.flush())
        self.stream()
        self.closed = True
        if self.finish_reason == "cancelled":
            log.info("generation cancelled after %d of %d new tokens", self.generated, self.request.max_new_tokens)
        self.timings["total_s"] = now - self.submitted
        result = GenerationResult(
            text=self.text,
            finish_reason=self.finish_reason or "length",
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.generated,
            model=model,
            seed=self.seed,
            stop_sequence=self.stop_sequence,
            timings=self.timings,
        )
        self.handle._send("done", result)


class Engine:
    """Owns one model copy; requests are queued and decoded in batches by one background thread."""

    def __init__(self, loaded: LoadedModel, *, max_batch_size: int = 8, batch_wait_ms: float = 2.0) -> None:
        self.loaded = loaded
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._tokenizer_lock = threading.Lock()
        self._pending: deque[Row] = deque()
        self._wakeup = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="llmapi-engine", daemon=True)
        self._thread.start()

    @property
    def model_name(self) -> str:
        """The name the model was loaded by."""
        return self.loaded.name

    @property
    def context_length(self) -> int:
        """How many tokens (prompt plus new) fit the model."""
        return self.loaded.context_length

    def encode(self, text: str) -> list[int]:
        """Tokenize `text` as the model will see it."""
        with self._tokenizer_lock:
            return self.loaded.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Detokenize `ids`, leaving out special tokens."""
        with self._tokenizer_lock:
            return self.loaded.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def render_chat(self, messages: Sequence[Message]) -> str:
        """Turn chat messages into the prompt this model expects (its chat template, or the default)."""
        with self._tokenizer_lock:
            return render(self.loaded.tokenizer, messages)

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue `request` and return its handle; raise ContextLengthExceeded when it cannot fit."""
        submitted = time.monotonic()
        prompt_ids = self.encode(request.prompt)
        if len(prompt_ids) + request.max_new_tokens > self.context_length:
            raise ContextLengthExceeded(
                prompt_tokens=len(prompt_ids),
                max_new_tokens=request.max_new_tokens,
                context_length=self.context_length,
            )
        handle = Handle(request)
        row = Row(handle, prompt_ids, IncrementalDecoder(self.decode), submitted)
        with self._wakeup:
            self._pending.append(row)
            self._wakeup.notify()
        return handle

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate and wait for the whole result."""
        return self.submit(request).result()

    def _run(self) -> None:
        """Decode batches forever; a failing batch fails its own requests only."""
        while True:
            rows = self._take_batch()
            try:
                with torch.inference_mode():
                    self._decode(rows)
            except Exception as exc:  # a bug or a torch failure: report it to the waiting callers
                log.exception("generation failed for a batch of %d", len(rows))
                for row in rows:
                    if row.finish_reason is None:
                        row.handle._send("error", EngineError(f"generation failed: {type(exc).__name__}"))

    def _take_batch(self) -> list[Row]:
        """Wait for work, then give late arrivals a moment to join, up to the batch size."""
        with self._wakeup:
            while not self._pending:
                self._wakeup.wait()
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._pending) < self.max_batch_size:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.wait(left)
            count = min(len(self._pending), self.max_batch_size)
            return [self._pending.popleft() for _ in range(count)]

    def _decode(self, rows: list[Row]) -> None:
        """Prefill the batch, then decode one token per live row per step until every row ends."""
        rows = self._live(rows, time.monotonic())
        if not rows:
            return
        started = time.monotonic()
        for row in rows:
            row.timings["queue_s"] = started - row.submitted
            row.timings["batch_size"] = float(len(rows))
        input_ids, mask = self._left_pad([row.prompt_ids for row in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.loaded.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache, position = out.cache, positions[:, -1:]
        logits = out.logits[:, -1, :].float()
        while rows:
            tokens = choose(logits, [row.controls for row in rows], sorted(self.loaded.eos_ids))
            now = time.monotonic()
            for row, token in zip(rows, tokens):
                row.timings.setdefault("first_token_s", now - row.submitted)
                row.push(token, self.loaded.eos_ids)
                row.stream()
            if len(self._live(rows, now)) < len(rows):
                keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
                if not keep:
                    return
                index = torch.tensor(keep, dtype=torch.long)
                rows, tokens = [rows[i] for i in keep], [tokens[i] for i in keep]
                cache.batch_select_indices(index)
                mask, position = mask[index], position[index]
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            position = position + 1
            next_ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(-1)
            out = self.loaded.model(
                input_ids=next_ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True
            )
            cache, logits = out.cache, out.logits[:, -1, :].float()

    def _live(self, rows: list[Row], now: float) -> list[Row]:
        """Finish rows that were cancelled or ran out of time; return all rows, ended ones included."""
        for row in rows:
            if row.finish_reason is None:
                row.check_time(now)
            if row.finish_reason is not None and not row.closed:
                row.finish(self.model_name, now)
        return [row for row in rows if row.finish_reason is None]

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token lists into ids and attention mask tensors."""
        width = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), width), self.loaded.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
        return ids, mask
