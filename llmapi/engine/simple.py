"""The baseline engine (ENGINE_MODE=simple): one `model.generate` per request, no batching, for comparison."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from llmapi.engine.loader import LoadedModel
from llmapi.engine.stats import TokenRate, model_facts
from llmapi.engine.text import StopMatcher
from llmapi.engine.tokenizer import Tokenizer
from llmapi.engine.types import EngineError, EngineStats, GenerationRequest, GenerationResult, InvalidRequest, Piece

# What only the batching engine does; this baseline refuses a request that asks for any of it.
BATCH_ONLY = {
    "logprobs": lambda r: r.logprobs is not None or r.prompt_logprobs is not None,
    "max_tokens": lambda r: r.max_new_tokens == 0,
    "response_format": lambda r: r.grammar is not None,
    "frequency_penalty": lambda r: r.frequency_penalty != 0.0,
    "presence_penalty": lambda r: r.presence_penalty != 0.0,
    "logit_bias": lambda r: bool(r.logit_bias),
    "min_p": lambda r: r.min_p != 0.0,
    "prompt": lambda r: r.prompt_ids is not None,
}


class SimpleHandle:
    """A generation that runs in the caller's thread when its result is first asked for."""

    def __init__(self, engine: SimpleEngine, request: GenerationRequest, prompt_ids: list[int], submitted: float):
        self._engine = engine
        self.request = request
        self._prompt_ids = prompt_ids
        self._submitted = submitted
        self._result: GenerationResult | None = None

    def pieces(self) -> Iterator[Piece | GenerationResult]:
        """Yield the whole text as one piece (this mode does not stream token by token), then the result."""
        result = self.result()
        if result.text:
            yield Piece(result.text)
        yield result

    def result(self) -> GenerationResult:
        """Run the generation (once) and return its result."""
        if self._result is None:
            self._result = self._engine.run(self.request, self._prompt_ids, self._submitted)
        return self._result

    def cancel(self) -> None:
        """Nothing to stop: the generation runs to its end (or its deadline) in the caller's thread."""


class SimpleEngine(Tokenizer):
    """transformers' `generate`, one request at a time per process: what a server without batching does."""

    def __init__(self, loaded: LoadedModel) -> None:
        super().__init__(loaded)
        # One generation at a time: the global RNG that seeds sampling, and the torch threads, are per process.
        self._lock = threading.Lock()
        self._rate = TokenRate()
        self._inside = 0  # callers in run(): the one generating and those waiting for the lock
        self._inside_lock = threading.Lock()
        self.on_stats: Callable[[EngineStats], None] | None = None  # never called: no queue, no prefix cache

    def stats(self) -> dict[str, Any]:
        """Live figures for the status route; tokens are counted when each generation ends (nothing streams)."""
        decoding = 1 if self._lock.locked() else 0
        return {
            **model_facts(self.loaded),
            "engine_mode": "simple",
            "decoding": decoding,
            "waiting": max(0, self._inside - decoding),
            "max_batch_size": 1,
            "tokens_per_second": round(self._rate.per_second(), 1),
            "generated_tokens": self._rate.total,
        }

    def submit(self, request: GenerationRequest) -> SimpleHandle:
        """Check that `request` fits and return a handle that generates when asked."""
        submitted = time.monotonic()
        for param, asks in BATCH_ONLY.items():
            if asks(request):
                raise InvalidRequest(f"{param} is not served in ENGINE_MODE=simple (the baseline).", param=param)
        prompt_ids = self.prompt_ids(request)
        return SimpleHandle(self, request, prompt_ids, submitted)

    def run(self, request: GenerationRequest, prompt_ids: list[int], submitted: float) -> GenerationResult:
        """Generate one request and return its result, counted for stats()."""
        seed = request.seed if request.seed is not None or request.greedy else random.getrandbits(63)
        with self._inside_lock:
            self._inside += 1
        try:
            result = self._run(request, prompt_ids, submitted, seed)
        finally:
            with self._inside_lock:
                self._inside -= 1
        self._rate.add(result.completion_tokens)
        return result

    def _run(
        self, request: GenerationRequest, prompt_ids: list[int], submitted: float, seed: int | None
    ) -> GenerationResult:
        """Call `model.generate` under the lock (one generation at a time) and turn its output into a result."""
        with self._lock:
            started = time.monotonic()
            if request.timeout_s is not None and started - submitted >= request.timeout_s:
                return self._result(request, prompt_ids, [], "timeout", seed, submitted, started)
            if seed is not None:
                torch.manual_seed(seed)
            try:
                input_ids = torch.tensor([prompt_ids], device=self.loaded.device)
                # generate upcasts each step's logits to fp32 before its processors and sampling (transformers
                # 5.24, generation/utils.py: `.to(dtype=torch.float32)`), as the batching engine does itself.
                with torch.inference_mode():
                    output = self.loaded.model.generate(
                        input_ids=input_ids,
                        attention_mask=torch.ones_like(input_ids),
                        **self._options(request, submitted, started),
                    )
            except Exception as exc:
                raise EngineError(f"generation failed: {type(exc).__name__}") from exc
        ids = output[0, len(prompt_ids) :].tolist()
        return self._result(request, prompt_ids, ids, None, seed, submitted, started)

    def _options(self, request: GenerationRequest, submitted: float, started: float) -> dict[str, Any]:
        """generate's keyword arguments for `request`."""
        options: dict[str, Any] = {
            "max_new_tokens": request.max_new_tokens,
            "min_new_tokens": request.min_new_tokens,
            "do_sample": not request.greedy,
            "repetition_penalty": request.repetition_penalty,
            "pad_token_id": self.loaded.pad_id,
            "eos_token_id": sorted(self.loaded.eos_ids),
        }
        if not request.greedy:
            options.update(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
        if request.timeout_s is not None:
            options["max_time"] = request.timeout_s - (started - submitted)
        if request.stop:
            options.update(stop_strings=list(request.stop), tokenizer=self.loaded.tokenizer)
        return options

    def _result(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        ids: list[int],
        reason: str | None,
        seed: int | None,
        submitted: float,
        started: float,
    ) -> GenerationResult:
        """Decode the new ids, cut at a stop sequence, and say why generation ended."""
        eos = self.loaded.eos_ids
        # generate pads a finished sequence with pad ids; with pad == eos, keep the first eos only.
        if any(token in eos for token in ids):
            ids = ids[: next(i for i, token in enumerate(ids) if token in eos) + 1]
        text = self.decode(ids)
        stop = StopMatcher(request.stop).find(text, 0)
        if stop is not None:
            text, reason = text[: stop[0]], "stop"
        elif reason is None:
            ended_on_eos = bool(ids) and ids[-1] in eos
            reason = "eos" if ended_on_eos else "length" if len(ids) >= request.max_new_tokens else "timeout"
        now = time.monotonic()
        timings = {"queue_s": started - submitted, "first_token_s": now - submitted, "total_s": now - submitted}
        return GenerationResult(
            text=text,
            finish_reason=reason,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(ids),
            model=self.model_name,
            seed=seed,
            stop_sequence=stop[1] if stop else None,
            timings={**timings, "batch_size": 1.0},
        )
