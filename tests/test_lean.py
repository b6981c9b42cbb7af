"""The lean decode pass (engine/lean.py) computes what transformers' forward computes, to the bit: plain steps and
verifications, padded rows or not, fp32, bf16 and int4, Llama, Qwen2 and Mistral; other models keep transformers'."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmapi.engine.lane import Lane
from llmapi.engine.loader import load
from llmapi.engine.quantize import Int4Linear
from llmapi.engine.step import DecodeStep
from tests.test_families import family_config

VOCAB = 50257  # the tiny model's tokenizer's
PROMPTS = [[5, 17, 42, 9, 100, 7, 3, 250], [8, 19, 4], [60, 61, 62, 63, 64]]


def save_family(family: str, path: Path, tokenizer_from: str, **overrides) -> str:
    """A tiny random model of `family` (test_families' shapes, no sliding window unless asked) and the tiny model's
    tokenizer, saved at `path`."""
    from transformers import AutoModelForCausalLM

    for item in Path(tokenizer_from).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, path)
    config = family_config(family, VOCAB)
    config.sliding_window = overrides.pop("sliding_window", None)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(
    scope="module",
    params=[
        ("llama", "none", "float32"),
        ("llama", "none", "bfloat16"),
        ("llama", "int4", "auto"),  # k and v 32 rows: not joined
        ("llama-wide", "int4", "auto"),  # k and v 64 rows: q, k and v in one int4 call
        ("qwen2-wide", "int4", "auto"),  # biased q, k and v: the joined int4 layer's bias
        ("qwen2", "none", "float32"),
        ("mistral", "none", "bfloat16"),
    ],
    ids=lambda p: "-".join(p),
)
def model(request, tiny_model, tmp_path_factory):
    """One family loaded as the engine loads it, in one format."""
    family, quantization, dtype = request.param
    wide = dict(head_dim=32) if family.endswith("-wide") else {}  # q 128 rows, k and v 64: a block each
    family = family.removesuffix("-wide")
    path = save_family(family, tmp_path_factory.mktemp(family), tiny_model, **wide)
    return SimpleNamespace(model=load(path, quantization=quantization, dtype=dtype).model, joins=bool(wide))


def lane_of(model, padded: bool) -> Lane:
    """Prefill PROMPTS (left-padded to the longest when `padded`, else the first in every row) through transformers."""
    from transformers import DynamicCache

    prompts = PROMPTS if padded else [PROMPTS[0]] * len(PROMPTS)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
    lane = Lane([SimpleNamespace(solo=False)] * len(prompts), out.cache, mask, positions[:, -1:], padded)
    lane.next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    return lane


def shares(*layers) -> bool:
    """Whether int4 layers' packed weights are views of one storage."""
    if any(type(layer) is not Int4Linear for layer in layers):
        return False
    return len({layer.packed.untyped_storage().data_ptr() for layer in layers}) == 1


def same_cache(a: Lane, b: Lane) -> bool:
    """Whether two lanes' caches hold the same keys and values, bit for bit."""
    return all(
        torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) for x, y in zip(a.cache.layers, b.cache.layers)
    )


@pytest.mark.parametrize("padded", [False, True])
def test_lean_steps_and_verifications_equal_transformers_to_the_bit(model, padded):
    model, joins = model.model, model.joins
    lean, plain = DecodeStep(model), DecodeStep(model)
    plain.lean = None  # transformers' forward, with the engine's attention
    assert lean.lean is not None
    for layer in model.model.layers:  # joined: q, k and v read one packed weight (as do gate and up)
        attention, mlp = layer.self_attn, layer.mlp
        assert shares(attention.q_proj, attention.k_proj, attention.v_proj) == joins
        assert shares(mlp.gate_proj, mlp.up_proj) == (type(mlp.up_proj) is Int4Linear)
    ours, theirs = lane_of(model, padded), lane_of(model, padded)
    with torch.inference_mode():
        for _ in range(4):
            a, b = lean(ours), plain(theirs)
            assert torch.equal(a, b)
            ours.next_ids = theirs.next_ids = a.argmax(-1, keepdim=True)
        drafts = [[11, 12, 13], [14], [15, 16]]
        a, b = lean.verify(ours, drafts), plain.verify(theirs, drafts)
        assert a.shape == (3, 4, VOCAB) and torch.equal(a, b)
        assert same_cache(ours, theirs)
    assert torch.equal(ours.mask, theirs.mask)


def test_joined_int4_layers_share_their_parts_memory_and_compute_their_outputs():
    torch.manual_seed(0)
    parts = [Int4Linear(torch.randn(n, 64), torch.randn(n) if n == 128 else None, group=32, dtype=torch.bfloat16)
             for n in (128, 64, 64)]  # fmt: skip
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    before = torch.cat([part(x) for part in parts], dim=-1)
    joined = Int4Linear.joined(parts)
    assert torch.equal(joined(x), before)
    assert torch.equal(torch.cat([part(x) for part in parts], dim=-1), before)  # the parts read views of it
    storage = joined.packed.untyped_storage().data_ptr()
    assert all(part.packed.untyped_storage().data_ptr() == storage for part in parts)
    # 32 rows cut a block of the kernel's layout in two: those stay apart.
    assert (
        Int4Linear.joined([Int4Linear(torch.randn(n, 64), None, group=32, dtype=torch.bfloat16) for n in (64, 32)])
        is None
    )


@pytest.mark.parametrize(
    "case",
    ["gpt2", "sliding", "eager"],
)
def test_other_models_keep_transformers_forward(case, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    if case == "gpt2":
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
    elif case == "sliding":
        model = AutoModelForCausalLM.from_pretrained(save_family("mistral", tmp_path, tiny_model, sliding_window=8))
    else:
        model = AutoModelForCausalLM.from_pretrained(
            save_family("llama", tmp_path, tiny_model), attn_implementation="eager"
        )
    assert DecodeStep(model).lean is None
