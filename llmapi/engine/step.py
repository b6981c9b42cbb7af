"""The decode step's forward pass: each row of a lane feeds its last token and gets the next position's logits."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llmapi.engine.lane import Lane

# The keyword a verification pass hands down to the attention function (transformers passes a forward's extra keyword
# arguments on to it): the lane's 2-D mask when it has padding, else False, and absent in any other pass.
ROW_BY_ROW = "llmapi_row_by_row"


def sdpa_row_by_row(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any):
    """SDPA, except in a verification pass: there each fed position attends on its own, as a decode step would.

    SDPA of several query positions blocks its sums otherwise than SDPA of one: in bf16 a position's output then
    differs by a rounding from the plain step's, and a greedy text may turn where two tokens were nearly tied.
    Fed one at a time, each position sees the keys a plain step would, with the plain step's mask, so the verified
    text is the plain decoding's (tests/test_speculation.py). It costs one attention call per fed position.
    """
    padding = kwargs.pop(ROW_BY_ROW, None)
    width, columns = query.shape[2], key.shape[2]
    if padding is None or width == 1:
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    outputs = []
    for i in range(width):
        end = columns - width + i + 1
        own = None if padding is False else padding[:, None, None, :end].bool()
        keys, values = key[:, :, :end], value[:, :, :end]
        out, _ = sdpa_attention_forward(module, query[:, :, i : i + 1], keys, values, own, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None  # [rows, width, heads, head_dim], as sdpa_attention_forward returns it


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
        # Verification feeds positions one at a time through attention where a plain step's mask is known (above).
        self.row_by_row = self.bool_masks
        if self.row_by_row:
            AttentionInterface.register("sdpa", sdpa_row_by_row)  # delegates to transformers' own in every other pass

    def __call__(self, lane: Lane) -> torch.Tensor:
        """Feed each row's last token; return the logits of the next one, [rows, vocab] in fp32 (see sampling)."""
        lane.mask = torch.cat([lane.mask, lane.mask.new_ones((len(lane.rows), 1))], dim=-1)
        lane.positions = lane.positions + 1
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
        out = self.model(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            # Several new positions need a causal mask among them: transformers builds it from the 2-D mask (or,
            # with no padding, from the cache's length alone).
            attention_mask=lane.mask if lane.padded else None,
            position_ids=lane.positions + torch.arange(1, width + 1, device=device),
            cache=lane.cache,
            use_cache=True,
            **({ROW_BY_ROW: lane.mask if lane.padded else False} if self.row_by_row else {}),
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
