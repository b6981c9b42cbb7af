"""The attention function every SDPA model runs here: transformers' own, with two changes for decoding on the CPU.

A decode step (one query position) takes transformers' packed-GQA path: the query heads that share a key head are
laid out as that head's query rows, one SDPA call over the key heads. transformers takes it only when it is given a
mask; without padding a step has none, and it calls SDPA's `enable_gqa` instead, which on the CPU is 3 to 5 times
slower for one position (SmolLM2's 9 query and 3 key heads, 2 threads: 205 against 43 us at 300 columns,
docs/performance.md). Handed an all-true mask, the step takes the packed path and computes the same attention.

A verification pass (speculation.py) feeds each of its positions through that same one-position call, so that every
position's output is the plain step's to the bit. SDPA over several positions at once blocks its sums otherwise:
in bf16 a position then differs by a rounding, and a greedy text may turn where two tokens were nearly tied
(tests/test_speculation.py). It costs one attention call per fed position.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

# The keyword a verification pass hands down to the attention function (transformers passes a forward's extra keyword
# arguments on to it): the lane's 2-D mask when it has padding, else False; absent from every other pass.
ROW_BY_ROW = "llmapi_row_by_row"


def one_position(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any):
    """SDPA for one query position per row; on the CPU with shared key heads, always through the packed path."""
    if mask is None and query.device.type == "cpu" and getattr(module, "num_key_value_groups", 1) > 1:
        mask = torch.ones((query.shape[0], 1, 1, key.shape[2]), dtype=torch.bool)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kwargs: Any):
    """transformers' SDPA, but a decode step through one_position and a verification pass one position at a time."""
    padding = kwargs.pop(ROW_BY_ROW, None)
    width, columns = query.shape[2], key.shape[2]
    if width == 1:
        return one_position(module, query, key, value, mask, **kwargs)
    if padding is None:  # a prefill
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    outputs = []
    for i in range(width):
        end = columns - width + i + 1  # position i sees what a plain step would: every column up to its own
        own = None if padding is False else padding[:, None, None, :end].bool()
        keys, values = key[:, :, :end], value[:, :, :end]
        out, _ = one_position(module, query[:, :, i : i + 1], keys, values, own, **kwargs)
        outputs.append(out)
    return torch.cat(outputs, dim=1), None  # [rows, width, heads, head_dim], as sdpa_attention_forward returns it


def install() -> None:
    """Make `sdpa` the attention of every model that asks transformers for SDPA (this process serves one model)."""
    AttentionInterface.register("sdpa", sdpa)
