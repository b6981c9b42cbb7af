"""The byte-level piece decoder: the tokenizer's own text, piece by piece, and a fallback for other tokenizers."""

from __future__ import annotations

import random

from llmapi.engine.bytelevel import byte_table, fast_decoder

PROMPT = "Artificial Intelligence is"
LONG_PROMPT = " ".join(["tokens prompts and completions"] * 40)


def test_bytelevel_decoder_equals_the_tokenizer(engine):
    tokenizer = engine.loaded.tokenizer
    slow = engine.decode
    fast = fast_decoder(tokenizer, slow)
    assert fast is not slow
    rng = random.Random(5)
    special = tokenizer.all_special_ids
    for _ in range(300):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 20))] + rng.sample(special, 1)
        assert fast(ids) == slow(ids)
    text = "Héllo wörld — 日本語 ✓ 🎉"
    assert fast(tokenizer.encode(text)) == text


def test_bytelevel_decoder_falls_back_for_other_tokenizers():
    class NotByteLevel:
        backend_tokenizer = type("Backend", (), {"decoder": object()})()

    def decode(ids):
        return "".join(map(str, ids))

    assert byte_table(NotByteLevel()) is None
    assert fast_decoder(NotByteLevel(), decode) is decode
