"""Embeddings: a forward pass over each input, its last hidden states pooled (mean or last token) and normalized.

An input to embed is a row of the engine's queue like any other (`EmbedRow`): it waits for room in the same
admission (`Engine._admit`), and the rows taken together run as one batch in one forward pass of the model's base
(no language-model head, no cache), right-padded, so that every input's positions and attention are those it has
alone: batched equals solo up to float rounding. Last-token pooling was chosen by measurement on a small retrieval
set (`python -m bench.agents`, docs/openai.md); EMBEDDINGS_POOLING=mean picks the other.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import torch

from llmapi.engine.types import EmbeddingRequest, EmbeddingResult, EngineError, InvalidRequest

POOLINGS = ("mean", "last")


class EmbedRow:
    """One input waiting for its embedding: what the engine's queue and its error paths need of a row."""

    solo = False  # shares a batch
    needs_prompt_logprobs = False
    closed = False

    def __init__(self, request: EmbeddingRequest, ids: list[int]) -> None:
        self.request = request
        self.ids = ids
        self.submitted = time.monotonic()
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()

    @property
    def group(self) -> int:
        """A request of its own, in the admission's turns (the scheduler's key, as a generation row's)."""
        return -id(self)

    def send(self, kind: str, payload: Any) -> None:
        """Deliver the result ("done") or an error from the engine thread."""
        self._events.put((kind, payload))

    def fail(self, error: EngineError) -> None:
        """End the input with an error for its caller (unless it has ended already), as a generation row does."""
        if not self.closed:
            self.closed = True
            self.send("error", error)

    def result(self) -> EmbeddingResult:
        """Wait for the embedding."""
        kind, payload = self._events.get()
        if kind == "error":
            raise payload
        return payload

    def cancel(self) -> None:
        """Nothing to stop: an embedding is one forward pass."""


def input_ids(front: Any, request: EmbeddingRequest) -> list[int]:
    """The token ids of one input, checked against the model's vocabulary and context (naming the input)."""
    ids = list(request.ids) if request.ids is not None else front.encode(request.text)
    where = request.param or "input"
    token = front.outside(ids)
    if token is not None:
        raise InvalidRequest(
            f"{where} holds token {token}, but this model's ids stop at {front.vocab_size - 1}.", param=where
        )
    if not ids:
        raise InvalidRequest(f"{where} has no tokens.", param=where)
    if len(ids) > front.context_length:
        raise InvalidRequest(
            f"{where} is {len(ids)} tokens, but this model's maximum context length is {front.context_length} tokens.",
            param=where,
        )
    if request.pooling not in POOLINGS:
        raise EngineError(f"unknown pooling {request.pooling!r}")
    return ids


def run(model: Any, rows: list[EmbedRow], *, pad_id: int) -> None:
    """Embed `rows` in one forward pass of the model's base and hand each its normalized vector."""
    device = getattr(model, "device", "cpu")
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):  # right padding: each input sits at positions 0.. as it would alone
        ids[i, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long, device=device)
        mask[i, : len(row.ids)] = 1
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.float()
    for i, row in enumerate(rows):
        states = hidden[i, : len(row.ids)]
        vector = states.mean(dim=0) if row.request.pooling == "mean" else states[-1]
        vector = vector / vector.norm().clamp_min(1e-12)
        row.closed = True
        row.send("done", EmbeddingResult(tuple(vector.cpu().tolist()), len(row.ids)))
