"""A fast detokenizer for byte-level BPE tokenizers (GPT-2 and its kin): a table of bytes per token id."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

Decode = Callable[[Sequence[int]], str]
CHECKS = 200  # random id sequences compared with the tokenizer's own decode before the table is trusted


def _byte_map() -> dict[str, int]:
    """GPT-2's reversible map from printable characters back to the bytes they stand for."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def byte_table(tokenizer: Any) -> list[bytes] | None:
    """The bytes of every token id (special tokens: none), or None if the tokenizer is not plain byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    special = set(tokenizer.all_special_ids)
    added = {i for i in tokenizer.added_tokens_decoder if i not in special}
    if added:  # added tokens decode as their literal content, not through the byte map
        return None
    byte_of = _byte_map()
    table: list[bytes] = []
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in special or token is None:
            table.append(b"")
        elif all(ch in byte_of for ch in token):
            table.append(bytes(byte_of[ch] for ch in token))
        else:
            return None
    return table


def fast_decoder(tokenizer: Any, decode: Decode, *, seed: int = 0) -> Decode:
    """Return a table-driven decode equal to `decode` on byte-level tokenizers (checked here), else `decode`."""
    table = byte_table(tokenizer)
    if table is None:
        return decode

    def fast(ids: Sequence[int]) -> str:
        return b"".join([table[i] for i in ids]).decode("utf-8", "replace")

    rng = random.Random(seed)
    # Lone non-ASCII bytes make broken and partial characters, where decoders differ if they differ at all.
    pool = [i for i, piece in enumerate(table) if len(piece) == 1 and piece[0] >= 0x80] or [0]
    for _ in range(CHECKS):
        ids = [rng.choice(pool) if rng.random() < 0.5 else rng.randrange(len(table)) for _ in range(rng.randint(1, 12))]
        if fast(ids) != decode(ids):
            return decode
    return fast
