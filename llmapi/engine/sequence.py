"""One request's sequence inside the engine (nano-vllm's Sequence): its tokens, text, stop cut, timings and result."""

from __future__ import annotations

import contextvars
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from llmapi.engine.handle import Handle
from llmapi.engine.sampling import RowControls
from llmapi.engine.text import IncrementalDecoder, StopMatcher
from llmapi.engine.types import EngineError, GenerationRequest, GenerationResult, Piece, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class Drafting:
    """A row's speculation state (speculation.py, auto mode): drafts missed in a row, steps left before it drafts
    again, and how many rests it has had (each doubles the next)."""

    misses: int = 0
    rest: int = 0
    rests: int = 0


class Row:
    """One request's sequence: its tokens, its text and the stop cut, its timings, and at the end its result."""

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
        self.controls = controls(request, prompt_ids, self.seed)
        # Log-probabilities (engine/logprobs.py) and the grammar's matcher (engine/grammar.py), when asked for.
        self.logprobs: list[TokenLogprob] = []
        self.logprobs_sent = 0
        self.prompt_logprobs: tuple[TokenLogprob, ...] | None = None
        self.prompt_scorer: Any = None  # a logprobs.PromptScorer while a scoring row's prompt is read, chunk by chunk
        self.grammar: Any = None  # a grammar.Matcher, set by the engine at submit
        self.prompt_text: str | None = None  # the decoded prompt of a request sent as token ids
        self.drafting = Drafting()

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether this row's prefill must keep every prompt position's logits (prompt logprobs: echo with logprobs).

        Such a row prefills alone and skips the prefix cache (as vLLM does: cached positions would have no logits
        to score); its chunks are scored as they are read (engine/logprobs.py PromptScorer).
        """
        return self.request.needs_prompt_logprobs

    @property
    def group(self) -> int:
        """The request this row is a choice of (its rows take turns with other requests'), else a group of its own."""
        return self.request.group if self.request.group is not None else -id(self)

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
            scored: tuple[TokenLogprob, ...] = ()
            if self.request.logprobs is not None:  # the piece carries the log-probabilities of its tokens
                scored = tuple(self.logprobs[self.logprobs_sent :])
                self.logprobs_sent = len(self.logprobs)
            self.handle.send("piece", Piece(self.text[self.sent : safe], scored))
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
        self.handle.send("done", result)

    def fail(self, error: EngineError) -> None:
        """End the row with an error for its caller (unless it has ended already)."""
        if not self.closed:
            self.closed = True
            self.handle.send("error", error)


def controls(request: GenerationRequest, prompt_ids: list[int], seed: int | None) -> RowControls:
    """The sampler's view of a request: its resolved controls and, when it samples, a generator seeded with `seed`."""
    return RowControls(
        greedy=request.greedy,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        repetition_penalty=request.repetition_penalty,
        suppress_eos=request.min_new_tokens > 0,
        seen=set(prompt_ids) if request.repetition_penalty != 1.0 else set(),
        generator=torch.Generator().manual_seed(seed) if not request.greedy else None,
        frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        bias=dict(request.logit_bias),
        min_p=request.min_p,
    )
