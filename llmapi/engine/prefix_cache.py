"""Automatic prefix caching: the KV cache of prompt prefixes, in blocks keyed by chained hashes, evicted LRU by bytes.

As nano-vllm's block_manager.py does it: a prompt is cut into blocks of BLOCK_TOKENS tokens, and block k is keyed
by a hash of block k-1's key and block k's token ids, so that a key names the whole prefix up to the end of its
block and a block is reused only after an identical prefix. Only full blocks are kept. A block holds the keys and
values of its tokens for every layer in one tensor `[layers, 2, heads, BLOCK_TOKENS, head_dim]`, on the cache's own
device and dtype; the rows that use it get copies, so a block can be evicted at any time.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16  # vLLM's default block size: a partial match wastes at most 15 tokens of prefill
MIB = 1024 * 1024


def block_key(tokens: list[int], parent: bytes) -> bytes:
    """The key of a block: a hash of its parent's key and its own token ids."""
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


def block_keys(ids: list[int], *, block_tokens: int = BLOCK_TOKENS) -> list[bytes]:
    """The chained keys of every full block of `ids`."""
    keys: list[bytes] = []
    parent = b""
    for start in range(0, len(ids) - block_tokens + 1, block_tokens):
        parent = block_key(ids[start : start + block_tokens], parent)
        keys.append(parent)
    return keys


@dataclass
class Block:
    """One cached block: its token ids (checked on a hit, as nano-vllm does) and its KV."""

    tokens: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2, heads, block_tokens, head_dim]

    @property
    def nbytes(self) -> int:
        """Memory the block's KV holds."""
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the prefix cache: what it holds and what it saved so far."""

    blocks: int
    bytes: int
    capacity_bytes: int
    hit_tokens: int
    miss_tokens: int
    evicted_blocks: int


class PrefixCache:
    """KV blocks of prompt prefixes, at most `capacity_mb` MiB of them, least recently used evicted first."""

    def __init__(self, capacity_mb: float, *, block_tokens: int = BLOCK_TOKENS) -> None:
        self.capacity_bytes = int(capacity_mb * MIB)
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._bytes = 0
        self._hits = self._misses = self._evicted = 0
        self._lock = threading.Lock()  # the engine thread writes, stats() may be read from any thread

    @property
    def enabled(self) -> bool:
        """Whether anything can be cached at all (PREFIX_CACHE_MB=0 turns it off)."""
        return self.capacity_bytes > 0

    def lookup(self, ids: list[int]) -> tuple[int, torch.Tensor | None]:
        """Return (n, kv) for the longest cached prefix of `ids` that leaves at least its last token to compute.

        `kv` is `[layers, 2, heads, n, head_dim]`, a copy, or None when nothing matched. The last token is never
        taken from the cache: its logits choose the first new token.
        """
        usable = (len(ids) - 1) // self.block_tokens
        found: list[Block] = []
        with self._lock:
            for index, key in enumerate(block_keys(ids[: usable * self.block_tokens], block_tokens=self.block_tokens)):
                block = self._blocks.get(key)
                start = index * self.block_tokens
                if block is None or block.tokens != tuple(ids[start : start + self.block_tokens]):
                    break
                found.append(block)
            self._touch(block_keys(ids[: len(found) * self.block_tokens], block_tokens=self.block_tokens))
            cached = len(found) * self.block_tokens
            self._hits += cached
            self._misses += len(ids) - cached
        if not found:
            return 0, None
        return cached, torch.cat([block.kv for block in found], dim=3)

    def known(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the cache holds already, in whole blocks (no hit is counted)."""
        with self._lock:
            count = 0
            for key in block_keys(ids, block_tokens=self.block_tokens):
                if key not in self._blocks:
                    break
                count += self.block_tokens
            return count

    def store(self, ids: list[int], kv: torch.Tensor, *, start: int = 0) -> None:
        """Keep the full blocks of `ids` from token `start` on; `kv` (`[layers, 2, heads, n, dim]`) is theirs."""
        if not self.enabled:
            return
        keys = block_keys(ids, block_tokens=self.block_tokens)
        with self._lock:
            for index in range(start // self.block_tokens, min(len(keys), (start + kv.shape[3]) // self.block_tokens)):
                if keys[index] in self._blocks:
                    continue
                first = index * self.block_tokens
                tokens = tuple(ids[first : first + self.block_tokens])
                block = Block(tokens, kv[:, :, :, first - start : first - start + self.block_tokens].clone())
                if block.nbytes > self.capacity_bytes:
                    return
                self._blocks[keys[index]] = block
                self._bytes += block.nbytes
            self._touch(keys)
            self._evict()

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain as just used, its first block last: LRU then evicts a chain from its tail inwards."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _evict(self) -> None:
        """Drop least recently used blocks until the cache fits its capacity."""
        while self._bytes > self.capacity_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self._bytes -= block.nbytes
            self._evicted += 1

    def stats(self) -> CacheStats:
        """What the cache holds now and what it saved so far."""
        with self._lock:
            return CacheStats(
                len(self._blocks), self._bytes, self.capacity_bytes, self._hits, self._misses, self._evicted
            )
