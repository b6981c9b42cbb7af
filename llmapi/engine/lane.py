"""Lanes: rows decoded together, one forward pass per step; and the packing policy that places a new lane.

Rows of one lane are left-padded to its longest (kv.py), and every step's attention (and the cache's growth) reads
every column of every row. A request with a seed gets a lane of its own (a batch of one with no padding), so that
its arithmetic, and so its text, does not depend on what else the server is doing.
"""

from __future__ import annotations

from typing import Any

import torch

from llmapi.engine import kv

# Keeping a long lane apart from short ones (place): at least this many padding cells (rows x columns) would have to
# be added, below which one more forward pass per step costs more than the padding; and at most this many shared
# lanes step side by side.
MIN_PADDING_CELLS = 2048
MAX_SHARED_LANES = 2


class Lane:
    """Rows decoded together, one forward pass per step; `next_ids` holds each row's token to feed next."""

    def __init__(self, rows: list[Any], cache: Any, mask: torch.Tensor, positions: torch.Tensor, padded: bool) -> None:
        self.rows = rows
        self.cache = cache
        self.mask = mask  # [rows, cache length]: 1 where the cache holds a real token, 0 for left padding
        self.positions = positions  # [rows, 1]: the position of each row's last token in the cache
        self.next_ids = torch.empty((0, 1), dtype=torch.long, device=mask.device)
        self.solo = rows[0].solo
        # Whether any row has padding, known on the host: a step never asks the device (one sync fewer).
        self.padded = padded

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at `index`, and drop cache columns that are padding in every row left."""
        self.rows = [self.rows[i] for i in index]
        if not self.rows:
            return
        select = torch.tensor(index, dtype=torch.long).to(self.mask.device)
        kv.select_rows(self.cache, select)
        self.mask, self.positions, self.next_ids = self.mask[select], self.positions[select], self.next_ids[select]
        if not self.padded:
            return
        lead = int(self.mask.any(dim=0).to(torch.int8).argmax())  # a device sync, only when a padded row leaves
        if lead:
            self.mask = self.mask[:, lead:]
            kv.drop_columns(self.cache, lead)
        self.padded = not bool(self.mask.all())  # padding may sit between a cached prefix and the rest

    def settle(self, fed: int, kept: list[int]) -> None:
        """After a pass that fed `fed` tokens per row (a verification: step.py), keep the first `kept[r]` of row r's.

        Columns no row keeps leave the cache; a row that keeps fewer than the longest masks the rest out (padding
        after its tokens, which its later steps never see), so that rows of one lane may accept different counts.
        """
        longest = max(kept)
        if longest < fed:
            self.mask = self.mask[:, : self.mask.shape[1] - (fed - longest)]
            kv.drop_last_columns(self.cache, fed - longest)
        width = self.mask.shape[1]
        for row, count in enumerate(kept):
            if count < longest:
                self.mask[row, width - longest + count :] = 0
                self.padded = True
        self.positions = self.positions + torch.tensor(kept, device=self.mask.device).unsqueeze(-1)

    def merge(self, other: Lane) -> None:
        """Append `other`'s rows: the shorter cache and mask are padded on the left to the longer one."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        self.padded = self.padded or other.padded or self.mask.shape[1] != other.mask.shape[1]
        kv.append_rows(self.cache, other.cache, width)
        self.mask = torch.cat([kv.pad_left(self.mask, width, 1), kv.pad_left(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.rows = self.rows + other.rows


def cells(lane: Lane) -> int:
    """Rows x columns: what a step's attention reads of the lane's cache."""
    return len(lane.rows) * lane.mask.shape[1]


def padding_cells(shared: Lane, other: Lane) -> int:
    """The cells merging `other` into `shared` would add beyond the two lanes' own."""
    width = max(shared.mask.shape[1], other.mask.shape[1])
    return (len(shared.rows) + len(other.rows)) * width - cells(shared) - cells(other)


def apart(shared: Lane, other: Lane) -> bool:
    """Whether `other` should decode in a lane of its own: merging would more than double the cells read."""
    added = padding_cells(shared, other)
    return added >= MIN_PADDING_CELLS and added > cells(shared) + cells(other)


def place(lane: Lane, lanes: list[Lane]) -> None:
    """Merge a freshly prefilled lane into the shared lane it pads least, unless it is far longer: then its own.

    A 900-token prompt merged among short streams made each of their steps several times dearer for as long as it
    decoded. A lane apart costs one more forward pass per step instead, so it is kept apart only when merging would
    more than double the columns read and by MIN_PADDING_CELLS at least, and there are never more than
    MAX_SHARED_LANES.
    """
    if not lane.rows:
        return
    shared = [other for other in lanes if not other.solo and other.rows and kv.mergeable(other.cache)]
    if lane.solo or not shared or not kv.mergeable(lane.cache):
        lanes.append(lane)
        return
    closest = min(shared, key=lambda other: padding_cells(other, lane))
    if len(shared) >= MAX_SHARED_LANES or not apart(closest, lane):
        closest.merge(lane)
    else:
        lanes.append(lane)
