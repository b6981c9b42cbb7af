"""Prompt-lookup speculation (n-gram drafts, no draft model): guess a row's next tokens from its own earlier text.

A row whose last n tokens (n from SPECULATION_NGRAM_MAX down to SPECULATION_NGRAM_MIN) occurred before, in its prompt
or its output, is proposed the tokens that followed their latest earlier occurrence (vLLM's `ngram` proposer,
transformers' `prompt_lookup_num_tokens`). The lane then feeds each row's last token and its draft in one forward
pass (step.py `DecodeStep.verify`), every position is chosen as a plain step would choose it (postprocess.py
`Postprocess.accept`), and the longest agreeing prefix plus one token more is kept (lane.py `Lane.settle`).

It pays when the answer copies its prompt (edits, summaries, extraction) and the pass is cheap beside the tokens it
saves: a lane of few rows, whose step reads every weight once whatever it feeds. So it runs only for lanes of at most
SPECULATION_MAX_ROWS rows, and in `auto` mode a row whose drafts keep missing stops drafting for a while.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmapi.engine import kv
from llmapi.engine.lane import Lane
from llmapi.engine.sequence import Row

MODES = ("off", "ngram", "auto")
# auto: after this many drafts in a row with nothing accepted, a row drafts nothing for REST_STEPS steps, doubled at
# each new run of misses up to MAX_REST_STEPS (a text that stopped copying rarely starts again at once).
MISSES_BEFORE_REST = 3
REST_STEPS = 8
MAX_REST_STEPS = 128


def propose(ids: Sequence[int], *, tokens: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to `tokens` ids that followed the latest earlier occurrence of the last n ids of `ids` (longest n first)."""
    if tokens < 1 or len(ids) < 2:
        return []
    seq = np.asarray(ids, dtype=np.int64)
    for n in range(min(ngram_max, len(seq) - 1), ngram_min - 1, -1):
        # Every window of n ids that has at least one id after it, compared with the last n ids.
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if len(hits):
            # The latest occurrence with `tokens` ids after it: in a text that repeats itself the very latest one is
            # often just before the end, with a draft of one or two.
            whole = hits[hits + n + tokens <= len(seq)]
            start = int(whole[-1] if len(whole) else hits[-1]) + n
            return seq[start : start + tokens].tolist()
    return []


class Speculator:
    """Drafts for the rows of a lane that should speculate this step, and the counters of what they proposed."""

    def __init__(self, mode: str, *, tokens: int, ngram_max: int, ngram_min: int, max_rows: int) -> None:
        self.mode = mode
        self.tokens = tokens
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self.max_rows = max_rows
        self.proposed = 0  # draft tokens fed to verification passes, since the start
        self.accepted = 0  # of those, the tokens handed to their rows
        self.passes = 0  # verification passes

    def drafts(self, lane: Lane) -> list[list[int]] | None:
        """One draft per row of `lane` (empty for a row with none), or None when the lane takes a plain step."""
        if self.mode == "off" or len(lane.rows) > self.max_rows or not kv.mergeable(lane.cache):
            return None
        drafts = [self.draft(row) for row in lane.rows]
        return drafts if any(drafts) else None

    def draft(self, row: Row) -> list[int]:
        """One row's draft: none while it rests (auto), and never past its last token (which a pass always adds)."""
        state = row.drafting
        if state.rest:
            state.rest -= 1
            return []
        room = min(self.tokens, row.request.max_new_tokens - row.generated - 1)
        ids = [*row.prompt_ids, *row.decoder.ids]
        return propose(ids, tokens=room, ngram_max=self.ngram_max, ngram_min=self.ngram_min)

    def record(self, rows: list[Row], drafts: list[list[int]], accepted: list[int]) -> None:
        """Count a verification pass, and in auto mode rest the rows whose drafts keep missing."""
        self.passes += 1
        self.proposed += sum(len(draft) for draft in drafts)
        self.accepted += sum(accepted)
        if self.mode != "auto":
            return
        for row, draft, taken in zip(rows, drafts, accepted):
            if not draft:
                continue
            state = row.drafting
            state.misses = 0 if taken else state.misses + 1
            if state.misses >= MISSES_BEFORE_REST:
                state.rest = min(MAX_REST_STEPS, REST_STEPS << state.rests)
                state.rests += 1
                state.misses = 0
