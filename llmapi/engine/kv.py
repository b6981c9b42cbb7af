"""The KV cache's layout, in one place: transformers' DynamicCache as a list of layers, each holding keys and values
`[rows, heads, columns, head_dim]`, rows left-padded with zeros to a common width.

Prefill (prefill.py) rebuilds a cache from the prefix cache's blocks, a lane (lane.py) selects, trims and merges rows,
and the engine copies one row's prompt columns out for the prefix cache (prefix_cache.py keeps them as
`[layers, 2, heads, tokens, head_dim]`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

COLUMNS = 2  # the dimension of a layer's keys and values that counts columns (tokens)


def pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of dimension `dim` to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def mergeable(cache: Any) -> bool:
    """Whether a cache is a list of plain growing layers, the kind whose rows can be padded and merged."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def select_rows(cache: Any, select: torch.Tensor) -> None:
    """Keep only the rows at `select` (a long tensor on the cache's device), in place."""
    cache.batch_select_indices(select)


def drop_columns(cache: Any, lead: int) -> None:
    """Drop the first `lead` columns of every row (padding in all of them), in place."""
    for layer in cache.layers:
        held = layer.keys.shape[COLUMNS]
        total = getattr(layer, "cumulative_length", None)
        if total is None:
            layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            continue
        # A sliding-window layer holds only the last `held` of its `total` columns: drop what it holds of the lead,
        # and count the lead out of its length, so that its window's offset matches the trimmed mask.
        drop = max(0, lead - (total - held))
        layer.keys, layer.values = layer.keys[:, :, drop:], layer.values[:, :, drop:]
        layer.cumulative_length = total - lead


def drop_last_columns(cache: Any, count: int) -> None:
    """Drop the last `count` columns of every row (a verification's rejected draft tokens), in place."""
    for layer in cache.layers:
        held = layer.keys.shape[COLUMNS] - count
        layer.keys, layer.values = layer.keys[:, :, :held], layer.values[:, :, :held]


def append_rows(cache: Any, other: Any, width: int) -> None:
    """Append `other`'s rows to `cache`'s, both left-padded to `width` columns, in place."""
    for mine, theirs in zip(cache.layers, other.layers):
        mine.keys = torch.cat([pad_left(mine.keys, width, COLUMNS), pad_left(theirs.keys, width, COLUMNS)])
        mine.values = torch.cat([pad_left(mine.values, width, COLUMNS), pad_left(theirs.values, width, COLUMNS)])


def rebuild_cache(cached: list[tuple[int, torch.Tensor | None]], width: int) -> DynamicCache:
    """A DynamicCache of the cached prefixes, each `[layers, 2, heads, n, dim]`, left-padded with zeros to `width`."""
    sample = next(kv for _, kv in cached if kv is not None)
    layers, _, heads, _, dim = sample.shape
    full = sample.new_zeros((layers, 2, len(cached), heads, width, dim))
    for i, (n, kv) in enumerate(cached):
        if kv is not None:
            full[:, :, i, :, width - n :] = kv
    return DynamicCache(ddp_cache_data=[(full[layer, 0], full[layer, 1]) for layer in range(layers)])


def row_kv(cache: Any, row: int, columns: torch.Tensor) -> torch.Tensor:
    """The keys and values of one row at `columns`, every layer: `[layers, 2, heads, len(columns), dim]`."""
    return torch.stack(
        [torch.stack([layer.keys[row][:, columns], layer.values[row][:, columns]]) for layer in cache.layers]
    )


def real_columns(mask: torch.Tensor, row: int, start: int, stop: int) -> torch.Tensor:
    """The columns of tokens `start` to `stop` of a row, counting only the real ones (mask 1) past its padding."""
    return mask[row].nonzero().squeeze(-1)[start:stop]
