"""The decode step's forward pass: each row of a lane feeds its last token and gets the next position's logits."""

from __future__ import annotations

from typing import Any

import torch

from llmapi.engine import attention
from llmapi.engine.lane import Lane
from llmapi.engine.lean import LeanDecoder


class DecodeStep:
    """One forward pass of a lane, with the attention mask it needs (none without padding)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        # With SDPA attention a decode step's mask is just "may row r see key k": built here as a view instead of
        # by transformers' mask functions, which cost about a tenth of a tiny model's step.
        # Not for a model with sliding-window layers: that view would let them see past their window, and its width
        # would not match their cache, which keeps only the window's columns.
        sdpa = getattr(model.config, "_attn_implementation", None) == "sdpa"
        self.bool_masks = sdpa and not getattr(model.config, "sliding_window", None)
        # attention.py: a step's attention through the packed path, a verification's position by position, where a
        # plain step's mask is known (above).
        if self.bool_masks:
            attention.install()
        # lean.py: the same computation without transformers' per-module overhead, for Llama-shaped models.
        self.lean = LeanDecoder.build(model) if self.bool_masks else None

    def __call__(self, lane: Lane) -> torch.Tensor:
        """Feed each row's last token; return the logits of the next one, [rows, vocab] in fp32 (see sampling)."""
        lane.mask = torch.cat([lane.mask, lane.mask.new_ones((len(lane.rows), 1))], dim=-1)
        lane.positions = lane.positions + 1
        if self.lean is not None and self.lean.usable(lane.cache):
            logits = self.lean(lane.next_ids, lane.positions, lane.cache, lane.mask if lane.padded else None)
            return logits[:, -1, :].float()
        out = self.model(
            input_ids=lane.next_ids,
            attention_mask=self.mask(lane),
            position_ids=lane.positions,
            cache=lane.cache,
            use_cache=True,
        )
        lane.cache = out.cache
        return out.logits[:, -1, :].float()  # fp32 whatever the model computes in

    def verify(self, lane: Lane, drafts: list[list[int]]) -> torch.Tensor:
        """Feed each row's last token and its draft (speculation.py) in one pass; return every fed position's logits,
        [rows, 1 + longest draft, vocab] in fp32. The lane keeps every fed column until `Lane.settle`."""
        width = 1 + max(len(draft) for draft in drafts)
        last = lane.next_ids.squeeze(-1).tolist()
        # A shorter draft is filled out with its row's last token: those columns are dropped or masked by settle.
        ids = [[token, *draft, *[token] * (width - 1 - len(draft))] for token, draft in zip(last, drafts)]
        device = lane.mask.device
        lane.mask = torch.cat([lane.mask, lane.mask.new_ones((len(lane.rows), width))], dim=-1)
        fed = torch.tensor(ids, dtype=torch.long, device=device)
        positions = lane.positions + torch.arange(1, width + 1, device=device)
        if self.lean is not None and self.lean.usable(lane.cache):
            return self.lean(fed, positions, lane.cache, lane.mask if lane.padded else None).float()
        out = self.model(
            input_ids=fed,
            # Several new positions need a causal mask among them: transformers builds it from the 2-D mask (or,
            # with no padding, from the cache's length alone).
            attention_mask=lane.mask if lane.padded else None,
            position_ids=positions,
            cache=lane.cache,
            use_cache=True,
            **({attention.ROW_BY_ROW: lane.mask if lane.padded else False} if self.bool_masks else {}),
        )
        lane.cache = out.cache
        return out.logits.float()

    def mask(self, lane: Lane) -> torch.Tensor | None:
        """The attention mask of a decode step: none without padding, else 4-D boolean for SDPA, else 2-D."""
        if not lane.padded:  # no row has padding (left, or between a cached prefix and the rest)
            return None
        if self.bool_masks:
            return lane.mask.bool()[:, None, None, :]
        return lane.mask
