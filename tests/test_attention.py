"""The attention every SDPA model runs here (engine/attention.py): the packed path computes transformers' attention,
and a verification pass gives each position exactly what a one-position step gives."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llmapi.engine.attention import ROW_BY_ROW, one_position, sdpa

HEADS, KV_HEADS, DIM, COLUMNS = 9, 3, 64, 40  # SmolLM2's heads


def tensors(rows: int, width: int, dtype: torch.dtype):
    """A GQA module and random query, keys and values: `width` new positions at the end of COLUMNS columns."""
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False)
    query = torch.randn(rows, HEADS, width, DIM, dtype=dtype)
    key = torch.randn(rows, KV_HEADS, COLUMNS, DIM, dtype=dtype)
    value = torch.randn(rows, KV_HEADS, COLUMNS, DIM, dtype=dtype)
    return module, query, key, value


def test_a_step_through_the_packed_path_is_transformers_attention():
    module, query, key, value = tensors(2, 1, torch.float32)
    ours, _ = one_position(module, query, key, value, None, scaling=DIM**-0.5)
    theirs, _ = sdpa_attention_forward(module, query, key, value, None, scaling=DIM**-0.5)  # enable_gqa
    assert ours.shape == theirs.shape == (2, 1, HEADS, DIM)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_a_verified_position_is_the_plain_steps_to_the_bit(padded):
    module, query, key, value = tensors(2, 4, torch.bfloat16)
    mask = torch.ones(2, COLUMNS, dtype=torch.long)
    if padded:
        mask[1, :7] = 0  # row 1 is left-padded
    out, _ = sdpa(module, query, key, value, None, scaling=DIM**-0.5, **{ROW_BY_ROW: mask if padded else False})
    for i in range(4):
        end = COLUMNS - 4 + i + 1
        step_mask = mask[:, None, None, :end].bool() if padded else None
        plain, _ = one_position(module, query[:, :, i : i + 1], key[:, :, :end], value[:, :, :end], step_mask,
                                scaling=DIM**-0.5)  # fmt: skip
        assert torch.equal(out[:, i : i + 1], plain)
    # Not asserted: whether several positions in one SDPA call round otherwise. On the AVX2 EPYC they did (the
    # reason for going position by position), on an AVX-512 Xeon with these shapes they did not.
