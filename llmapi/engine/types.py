"""Plain data that crosses between the HTTP side and the engine: requests, results, errors, and the protocols."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


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


class InvalidRequest(EngineError):
    """A request the engine cannot serve as asked (a token id outside the vocabulary, a schema it cannot compile,
    a feature this engine lacks): the client's error, answered in each API's dialect for a refused body."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Grammar:
    """A constraint on the generated text: `kind` "json_object" (any JSON object), "json_schema" (`source` is the
    schema as JSON text), "ebnf" (`source` is a GBNF-style grammar), or "structural_tag" (`source` is xgrammar's
    structural tag as JSON text: the tool calls' tags around JSON arguments)."""

    kind: str
    source: str = ""
    param: str = field(default="", compare=False)  # the request field a refusal names (default: the kind)


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token, its log-probability under the model's raw distribution, and the top alternatives."""

    id: int
    text: str
    raw: bytes  # the token's own bytes (a byte-level token may hold part of a character)
    logprob: float | None  # None only for a prompt's first token, which nothing before it predicts
    top: tuple[TokenLogprob, ...] = ()


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
    # Penalties and biases on the logits, as OpenAI defines them (on generated tokens), and vLLM's min_p.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    min_p: float = 0.0
    # Log-probabilities: None = none; k >= 0 = each chosen token's, with its k most likely alternatives.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (the first has none)
    grammar: Grammar | None = None
    prompt_ids: tuple[int, ...] | None = None  # token ids sent instead of text (`prompt` is then "")
    # The HTTP request this generation is one choice of (the runner numbers them): the scheduler lets requests take
    # turns, not rows, so that one request's many prompts cannot hold the engine. None: a request of its own.
    group: int | None = field(default=None, compare=False)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether the prefill must keep every prompt position's logits (such rows bypass any prefix cache)."""
        return self.prompt_logprobs is not None

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
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per generated token (end-of-sequence left out)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # one per prompt token; the first's logprob is None
    prompt_text: str | None = None  # the decoded prompt, when it was sent as token ids
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    token_times: tuple[float, ...] = ()  # when each new token was chosen, in seconds after submission

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Piece:
    """A streamed piece of text, and the log-probabilities of the tokens it completes (() unless the request asked)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


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
    speculative_proposed_tokens: int = 0  # draft tokens verified (engine/speculation.py)
    speculative_accepted_tokens: int = 0  # of those, the ones kept: new tokens that took no pass of their own
    prefill_tokens: int = 0  # prompt tokens still to read: of the rows waiting, and the unread rest of those prefilling


class Handle(Protocol):
    """One generation in progress, as every engine hands it out."""

    def pieces(self) -> Iterator[Piece | GenerationResult]: ...
    def result(self) -> GenerationResult: ...
    def cancel(self) -> None: ...


class EngineLike(Protocol):
    """What the runtime uses of an engine (the batching one, the simple one, or a fake in tests): all of it."""

    model_name: str
    context_length: int
    vocab_size: int
    placement: dict[str, str]  # where the model runs and in which dtype ({} when the engine cannot say)
    # Set by the runtime, called from the engine's thread with an EngineStats when the queue or the cache changed.
    on_stats: Callable[[EngineStats], None] | None

    def stats(self) -> dict[str, Any]: ...  # live figures for /status ({} when the engine has none)

    def submit(self, request: GenerationRequest) -> Handle: ...
    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> str: ...
    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]: ...
    def token_strings(self, ids: list[int]) -> list[str]: ...
    def decode(self, ids: list[int]) -> str: ...
    def outside(self, ids: Sequence[int]) -> int | None: ...


@dataclass(frozen=True)
class EmbeddingRequest:
    """One input to embed: text, or token ids; pooled "mean" (over its tokens) or "last" (its last token)."""

    text: str = ""
    ids: tuple[int, ...] | None = None
    pooling: str = "last"
    param: str = ""  # the request field that holds it ("input.3"), named when it is refused


@dataclass(frozen=True)
class EmbeddingResult:
    """An input's embedding: the pooled last hidden states, L2-normalized, and how many tokens it read."""

    embedding: tuple[float, ...]
    prompt_tokens: int
