"""After a forward pass, in named steps: keep the logits that log-probabilities need, mask each grammar's row, choose
the next tokens, score them, hand each row its token (stream what is safe, finish what ended), and let finished
rows leave their lane at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from llmapi.engine import logprobs
from llmapi.engine.lane import Lane
from llmapi.engine.prefill import Prefill
from llmapi.engine.sampling import choose
from llmapi.engine.sequence import Row
from llmapi.engine.stats import TokenRate
from llmapi.engine.types import TokenLogprob


class Postprocess:
    """What the engine does with a lane's logits, every step (and after a prefill, with its last position's)."""

    def __init__(
        self,
        *,
        model_name: str,
        eos_ids: frozenset[int],
        texts: logprobs.TokenTexts,
        grammars: Callable[[], Any],
        rate: TokenRate,
    ) -> None:
        self.model_name = model_name
        self.eos_ids = eos_ids
        self.eos_list = sorted(eos_ids)
        self.texts = texts
        self.grammars = grammars  # the tokenizer's grammar compiler, built on first use
        self.rate = rate

    def run(self, lane: Lane, logits: torch.Tensor) -> None:
        """Pick each row's next token, hand it to the row, and let finished rows leave the lane at once."""
        scored, raw = self.keep_scored(lane, logits)
        self.mask_grammars(lane, logits)
        chosen = choose(logits, [row.controls for row in lane.rows], self.eos_list)  # on the logits' device
        tokens = chosen.tolist()  # the one copy to the host a step makes
        entries = self.score(lane, scored, raw, tokens)
        keep = self.hand_out(lane.rows, tokens, entries)
        lane.next_ids = chosen.to(torch.long).unsqueeze(-1)
        if len(keep) < len(lane.rows):
            lane.keep(keep)

    def keep_scored(self, lane: Lane, logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """The rows that want log-probabilities, and a copy of their logits before the sampler or a grammar edits."""
        scored = logprobs.wanted(lane.rows)
        return scored, (logits[scored] if scored else None)

    def mask_grammars(self, lane: Lane, logits: torch.Tensor) -> None:
        """Forbid, in each grammar row's logits, the tokens its grammar does not allow next."""
        if any(row.grammar is not None for row in lane.rows):
            self.grammars().mask(logits, [row.grammar for row in lane.rows])

    def score(
        self, lane: Lane, scored: list[int], raw: torch.Tensor | None, tokens: list[int]
    ) -> dict[int, TokenLogprob]:
        """The chosen tokens' log-probabilities (with the top alternatives asked for), by row index."""
        if raw is None:
            return {}
        ks = [lane.rows[i].request.logprobs or 0 for i in scored]
        found = logprobs.entries(raw, [tokens[i] for i in scored], ks, self.texts)
        return dict(zip(scored, found))

    def hand_out(self, rows: list[Row], tokens: list[int], entries: dict[int, TokenLogprob]) -> list[int]:
        """Give each row its token and timing, stream what is safe, finish the rows that ended; return the others."""
        now = time.monotonic()
        size = len(rows)
        self.rate.add(size)
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens)):
            if row.steps == 0:
                row.timings["first_token_s"] = now - row.submitted
            row.token_times.append(now - row.submitted)
            row.steps += 1
            row.batched += size
            if row.request.max_new_tokens == 0:  # score only (echo): the prefill was all it needed
                row.finish(self.model_name, now)
                continue
            row.push(token, self.eos_ids, entries.get(i))
            row.stream()
            if row.finish_reason is None:
                keep.append(i)
            else:
                row.finish(self.model_name, now)
        return keep

    def score_prompt_chunk(self, job: Prefill, logits: torch.Tensor) -> None:
        """After each chunk of a scoring job (all_logits): score the prompt tokens it read, for each row that asked;
        once the job is done, the row's prompt_logprobs are complete."""
        for i, row in enumerate(job.rows):
            if not row.needs_prompt_logprobs:
                continue
            if row.prompt_scorer is None:
                row.prompt_scorer = logprobs.PromptScorer(row.prompt_ids, row.request.prompt_logprobs or 0, self.texts)
            row.prompt_scorer.feed(logits[i, job.read_columns(i)])
            if job.done:
                row.prompt_logprobs, row.prompt_scorer = row.prompt_scorer.result(), None
