"""Plain data that crosses between the HTTP side and the engine: requests, results, errors, and the protocols."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class EngineError(Exception):
    """Base class of the errors the engine reports to its callers."""


class ModelUnavailable(EngineError):
    """The model could not be loaded; a later request will try again, from `retry_at` (time.monotonic())."""

    def __init__(self, message: str, *, retry_at: float | None = None) -> None:
        super().__init__(message)
        self.retry_at = retry_at

    def retry_after(self) -> int:
        """Whole seconds until a request will try loading again (at least 1): the Retry-After to send."""
        if self.retry_at is None:
            return 1
        return max(1, math.ceil(self.retry_at - time.monotonic()))


class ContextLengthExceeded(EngineError):
    """Prompt tokens plus requested new tokens do not fit the model's context window."""

    def __init__(self, *, prompt_tokens: int, max_new_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length
        super().__init__(
            f"This model's context length is {context_length} tokens, but the request asks for "
            f"{prompt_tokens + max_new_tokens} ({prompt_tokens} in the prompt + {max_new_tokens} new tokens). "
            "Shorten the prompt or lower the number of new tokens."
        )


GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate, with every decoding control already resolved to a value."""

    prompt: str
    max_new_tokens: int
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None
    stream: bool = False

    @property
    def greedy(self) -> bool:
        """Whether the next token is always the most likely one."""
        # Sampling tends to greedy as the temperature tends to 0; below this, logits / T overflows float32.
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class GenerationResult:
    """What one generation produced and how it ended."""

    text: str
    finish_reason: str  # "length", "eos", "stop", "timeout" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    model: str
    seed: int | None = None
    stop_sequence: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    token_times: tuple[float, ...] = ()  # when each new token was chosen, in seconds after submission

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of an engine's queue and prefix cache (token counts are totals since it started)."""

    waiting: int = 0  # rows queued for a place in the batch
    prefilling: int = 0  # rows whose prompts are being read
    decoding: int = 0  # rows in the batch, generating
    prefix_cache_bytes: int = 0
    prefix_cache_capacity_bytes: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens read from the prefix cache
    prefix_miss_tokens: int = 0  # prompt tokens of rows that looked in the cache, computed all the same


class Handle(Protocol):
    """One generation in progress, as every engine hands it out."""

    def pieces(self) -> Iterator[str | GenerationResult]: ...
    def result(self) -> GenerationResult: ...
    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the runtime uses of an engine (the batching one, the simple one, or a fake in tests)."""

    model_name: str

    def submit(self, request: GenerationRequest) -> Handle: ...
    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str: ...
