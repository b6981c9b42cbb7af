"""Prefill as a job of the engine's loop: prompts run after their cached prefixes, one chunk of columns per step.

A job's rows are laid out in two left-padded parts: the cached prefixes (rebuilt into a DynamicCache from the
prefix cache's blocks) and the rest of each prompt, which the model still has to read. Row r's columns are

    [pad][its cached prefix] [pad][the rest of its prompt]

with the mask 0 on the pads and positions counting real tokens only, so every token sits where a prefill of the
whole prompt would have put it. The rest is fed `chunk_tokens` columns at a time; the last column of every row is
its prompt's last token, whose logits choose the first new token. A job that scores its prompt (`all_logits`) gets
every column's logits of each chunk as it is read (engine/logprobs.py PromptScorer scores them then).
"""

from __future__ import annotations

from typing import Any

import torch

from llmapi.engine.kv import rebuild_cache, select_rows


class Prefill:
    """Rows being prefilled together: their ids still to read, mask, positions and the cache built so far."""

    def __init__(
        self,
        rows: list[Any],
        cached: list[tuple[int, torch.Tensor | None]],
        *,
        pad_id: int,
        chunk_tokens: int = 0,
        device: torch.device | str = "cpu",
        all_logits: bool = False,
    ) -> None:
        self.rows = rows
        # Which request it serves first and since when: the scheduler lets requests take turns (scheduler.py).
        self.group = rows[0].group
        self.submitted = min(row.submitted for row in rows)
        self.cached_width = max(n for n, _ in cached)
        rests = [row.prompt_ids[n:] for row, (n, _) in zip(rows, cached)]
        self.width = max(len(rest) for rest in rests)
        self.ids = torch.full((len(rows), self.width), pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((len(rows), self.cached_width + self.width), dtype=torch.long, device=device)
        for i, ((n, _), rest) in enumerate(zip(cached, rests)):
            self.ids[i, self.width - len(rest) :] = torch.tensor(rest, dtype=torch.long, device=device)
            self.mask[i, self.cached_width - n : self.cached_width] = 1
            self.mask[i, self.cached_width + self.width - len(rest) :] = 1
        self.rests = [len(rest) for rest in rests]  # each row's columns to read (its own start: width - rest)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        self.cached_tokens = [n for n, _ in cached]
        self.cache = rebuild_cache(cached, self.cached_width) if self.cached_width else None
        self.chunk = chunk_tokens if 0 < chunk_tokens < self.width else self.width
        self.offset = 0  # columns read so far
        self.read_from = 0  # where the chunk read last began
        self.all_logits = all_logits  # the hook for prompt logprobs: keep the logits of every position

    @property
    def chunked(self) -> bool:
        """Whether this job takes more than one step."""
        return self.chunk < self.width

    @property
    def done(self) -> bool:
        """Whether every row's whole prompt has been read."""
        return self.offset == self.width

    def unread(self) -> int:
        """Prompt tokens of its rows not read yet (padding left out)."""
        left = self.width - self.offset
        return sum(min(rest, left) for rest in self.rests)

    def next_cost(self) -> int:
        """The cells (rows x columns) its next chunk computes: what it spends of a step's prefill budget."""
        return len(self.rows) * min(self.chunk, self.width - self.offset)

    def advance(self, model: Any) -> torch.Tensor:
        """Feed the next chunk; return its logits: of every column when all_logits, else of its last one."""
        end = min(self.offset + self.chunk, self.width)
        total = self.cached_width + end
        out = model(
            input_ids=self.ids[:, self.offset : end],
            attention_mask=self.mask[:, :total],
            position_ids=self.positions[:, self.cached_width + self.offset : total],
            cache=self.cache,
            use_cache=True,
            logits_to_keep=0 if self.all_logits else 1,
        )
        self.cache = out.cache
        self.read_from, self.offset = self.offset, end
        return out.logits

    def read_columns(self, index: int) -> slice:
        """The columns of the chunk read last that hold row `index`'s own tokens (its padding left out)."""
        start = self.width - self.rests[index]
        return slice(max(0, start - self.read_from), self.offset - self.read_from)

    def keep(self, index: list[int]) -> None:
        """Keep only the rows at `index` (the others were cancelled or timed out between chunks)."""
        self.rows = [self.rows[i] for i in index]
        self.cached_tokens = [self.cached_tokens[i] for i in index]
        self.rests = [self.rests[i] for i in index]
        if not self.rows:
            return
        select = torch.tensor(index, dtype=torch.long, device=self.ids.device)
        self.ids, self.mask, self.positions = self.ids[select], self.mask[select], self.positions[select]
        if self.cache is not None:
            select_rows(self.cache, select)
