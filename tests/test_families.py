"""Batched equals solo for each model family, sliding windows included: fp32, long prompts, joiners, prefix cache on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from llmapi.engine import GenerationRequest, create_engine

WINDOW = 8  # the sliding window of the families that have one: every prompt below is longer
SLIDING = ("gemma3", "gemma2", "mistral")
PROMPTS = [" ".join(["tokens prompts and completions"] * n) for n in (3, 5, 8, 2, 6)]


def family_config(family: str, vocab_size: int):
    """A tiny random config of `family`: 2 layers (one sliding where the family has them), 64 wide."""
    import transformers

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        initializer_range=0.3,
        max_position_embeddings=512,
    )
    if family == "gemma3":
        return transformers.Gemma3TextConfig(
            **common, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]
        )
    if family == "gemma2":
        return transformers.Gemma2Config(**common, sliding_window=WINDOW)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=WINDOW)
    if family in OTHERS:
        return OTHERS[family](transformers, vocab_size)
    return {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config}[
        family
    ](**common)


# Families whose configs name their sizes otherwise: 2 layers, 64 wide, 4 heads, as above.
OTHERS = {
    "gpt_neox": lambda t, vocab: t.GPTNeoXConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        initializer_range=0.3, max_position_embeddings=512, rotary_pct=0.5,
    ),
    "opt": lambda t, vocab: t.OPTConfig(
        vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=64, init_std=0.3, max_position_embeddings=512,
    ),
    "bloom": lambda t, vocab: t.BloomConfig(
        vocab_size=vocab, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.3
    ),
    "falcon": lambda t, vocab: t.FalconConfig(
        vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, initializer_range=0.3,
        max_position_embeddings=512,
    ),
}  # fmt: skip


@pytest.fixture(
    scope="module",
    params=["gemma3", "gemma2", "mistral", "llama", "qwen2", "phi3", "gpt_neox", "opt", "bloom", "falcon"],
)
def family_engine(request, tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    """An fp32 engine of a tiny random model of one family, prefix cache and chunked prefill (16 tokens) on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(tmp_path_factory.mktemp(request.param))
    for item in Path(tiny_model).iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, path)
    torch.manual_seed(0)
    config = family_config(request.param, len(AutoTokenizer.from_pretrained(tiny_model)))
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    engine = create_engine(
        str(path),
        torch_threads=1,
        max_batch_size=8,
        batch_wait_ms=5,
        dtype="float32",
        prefix_cache_mb=16,
        prefill_chunk_tokens=16,
    )
    yield engine
    engine.close()


def test_family_batched_greedy_equals_solo(family_engine, request):
    requests = [GenerationRequest(prompt=p, max_new_tokens=6 + 3 * i) for i, p in enumerate(PROMPTS)]
    alone = [family_engine.generate(request).text for request in requests]
    runner = family_engine.submit(GenerationRequest(prompt=PROMPTS[2], max_new_tokens=400, stream=True))
    pieces = runner.pieces()
    next(pieces)  # decoding: the others join a running batch, and leave it at different times
    results = [handle.result() for handle in [family_engine.submit(request) for request in requests]]
    runner.cancel()
    list(pieces)
    assert [result.text for result in results] == alone
    if request.node.callspec.params["family_engine"] not in SLIDING:  # their caches hold a window: none is stored
        assert any(result.cached_tokens for result in results)  # the prefix cache served the second reading
