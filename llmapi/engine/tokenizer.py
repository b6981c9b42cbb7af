"""The model's front, the same whichever way an engine decodes: its tokenizer (under one lock), chat rendering,
the context check, and the facts of the loaded model."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from llmapi.engine.chat import Message, render
from llmapi.engine.loader import LoadedModel
from llmapi.engine.types import (
    ContextLengthExceeded,
    EmbeddingRequest,
    GenerationRequest,
    GenerationResult,
    InvalidRequest,
)


class Tokenizer:
    """Tokenizing, chat rendering and the context check of one loaded model; each engine builds on it."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        # A fast tokenizer shared by request threads and the decoding thread must not be entered twice at once.
        self._tokenizer_lock = threading.Lock()
        self._grammars: Any = None
        self._grammars_lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        """How many logits a forward pass gives per position (token ids are below it)."""
        return int(getattr(self.loaded.model.config, "vocab_size", 0) or len(self.loaded.tokenizer))

    def outside(self, ids: Sequence[int]) -> int | None:
        """The first of `ids` that is no token id of this model (at or above its vocabulary size), if any."""
        return next((token for token in ids if token >= self.vocab_size), None)

    def check_request(self, request: GenerationRequest) -> None:
        """Refuse what the model cannot take: logit_bias on a token id outside its vocabulary."""
        token = self.outside([token for token, _ in request.logit_bias])
        if token is not None:
            raise InvalidRequest(
                f"logit_bias names token {token}, but this model's token ids stop at {self.vocab_size - 1}.",
                param="logit_bias",
            )

    def grammars(self) -> Any:
        """The grammar compiler for this tokenizer (engine/grammar.py), built on first use: it walks the vocabulary."""
        if self._grammars is None:
            with self._grammars_lock:
                if self._grammars is None:
                    from llmapi.engine.grammar import Grammars

                    self._grammars = Grammars(self.loaded.tokenizer, self.vocab_size)
        return self._grammars

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with the tokenizer's special tokens, if it adds any, when asked)."""
        with self._tokenizer_lock:
            return self.loaded.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def token_strings(self, ids: list[int]) -> list[str]:
        """The tokenizer's own string of each token id (GPT-2 shows a leading space as "Ġ")."""
        with self._tokenizer_lock:
            return self.loaded.tokenizer.convert_ids_to_tokens(ids)

    @property
    def model_name(self) -> str:
        """The name the model was loaded by."""
        return self.loaded.name

    @property
    def placement(self) -> dict[str, str]:
        """Where the model runs and in which dtype, as plain strings for /ready and the metrics."""
        return {"device": self.loaded.device, "dtype": self.loaded.dtype}

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

    def render_chat(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """Turn chat messages (and tools) into the prompt this model expects (its chat template, or the default)."""
        with self._tokenizer_lock:
            return render(self.loaded.tokenizer, messages, tools)

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Tokenize the prompt (or take its ids); raise ContextLengthExceeded when it and the new tokens cannot fit."""
        if request.prompt_ids is not None:
            ids = list(request.prompt_ids)
            token = self.outside(ids)
            if token is not None:
                raise InvalidRequest(
                    f"The prompt holds token {token}, but this model's token ids stop at {self.vocab_size - 1}.",
                    param="prompt",
                )
        else:
            ids = self.encode(request.prompt)
        if len(ids) + request.max_new_tokens > self.context_length:
            raise ContextLengthExceeded(
                prompt_tokens=len(ids), max_new_tokens=request.max_new_tokens, context_length=self.context_length
            )
        return ids

    def embed(self, request: EmbeddingRequest) -> Any:
        """Queue one input to embed (the batching engine does; the simple one does not)."""
        raise InvalidRequest("This server's engine (ENGINE_MODE=simple) does not serve embeddings.", param="input")

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate and wait for the whole result (through the engine's own submit())."""
        return self.submit(request).result()  # type: ignore[attr-defined]
