"""After a forward pass, in named steps: keep the logits that log-probabilities need, mask each grammar's row, choose
the next tokens, score them, hand each row its token (stream what is safe, finish what ended), and let finished
rows leave their lane at once. After a pass that verified drafts (speculation.py), the same steps run position by
position for each row, while its tokens equal its draft."""

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
        chosen, tokens, entries = self.pick(lane.rows, logits)
        keep = self.hand_out(lane.rows, tokens, entries)
        lane.next_ids = chosen.to(torch.long).unsqueeze(-1)
        if len(keep) < len(lane.rows):
            lane.keep(keep)

    def run_drafts(self, lane: Lane, logits: torch.Tensor, drafts: list[list[int]]) -> list[int]:
        """After a verification pass (speculation.py): hand each row its accepted draft tokens and one more, roll the
        lane back to them, let finished rows leave; return how many draft tokens each row accepted."""
        now = time.monotonic()
        size = len(lane.rows)
        accepted, kept, keep, last = [], [], [], []
        for i, (row, draft) in enumerate(zip(lane.rows, drafts)):
            taken, token = self.accept(row, logits[i], draft, size, now)
            accepted.append(taken)
            kept.append(taken + 1 if row.finish_reason is None else 1)  # a finished row leaves: keep it short
            last.append(token)
            if row.finish_reason is None:
                keep.append(i)
        lane.settle(logits.shape[1], kept)
        lane.next_ids = torch.tensor(last, dtype=torch.long, device=lane.mask.device).unsqueeze(-1)
        if len(keep) < len(lane.rows):
            lane.keep(keep)
        return accepted

    def accept(self, row: Row, logits: torch.Tensor, draft: list[int], size: int, now: float) -> tuple[int, int]:
        """Choose one row's tokens position by position, as plain steps would, while they equal its draft.

        Each position is chosen after the tokens before it were handed to the row (penalties, min_tokens, grammar
        and stop state included), so a greedy row gets exactly its plain tokens, and a sampled row samples each from
        the same distribution: a draft token x is accepted with probability p(x), and on rejection the token drawn
        is distributed as p without x, renormalized (speculative sampling for a draft that is certain of x).
        Return how many draft tokens were taken and the last token handed out.
        """
        taken = 0
        for j in range(len(draft) + 1):
            _, tokens, entries = self.pick([row], logits[j : j + 1])
            token = tokens[0]
            self.rate.add(1)
            self.give(row, token, entries.get(0), size, now)
            matched = j < len(draft) and token == draft[j]
            taken += matched
            if not matched or row.finish_reason is not None:
                break
        return taken, token

    def pick(self, rows: list[Row], logits: torch.Tensor) -> tuple[torch.Tensor, list[int], dict[int, TokenLogprob]]:
        """Each row's next token (on the logits' device and on the host) and its log-probability entry if asked."""
        scored, raw = self.keep_scored(rows, logits)
        self.mask_grammars(rows, logits)
        chosen = choose(logits, [row.controls for row in rows], self.eos_list)  # on the logits' device
        tokens = chosen.tolist()  # the one copy to the host a step makes
        return chosen, tokens, self.score(rows, scored, raw, tokens)

    def keep_scored(self, rows: list[Row], logits: torch.Tensor) -> tuple[list[int], torch.Tensor | None]:
        """The rows that want log-probabilities, and a copy of their logits before the sampler or a grammar edits."""
        scored = logprobs.wanted(rows)
        return scored, (logits[scored] if scored else None)

    def mask_grammars(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Forbid, in each grammar row's logits, the tokens its grammar does not allow next."""
        if any(row.grammar is not None for row in rows):
            self.grammars().mask(logits, [row.grammar for row in rows])

    def score(
        self, rows: list[Row], scored: list[int], raw: torch.Tensor | None, tokens: list[int]
    ) -> dict[int, TokenLogprob]:
        """The chosen tokens' log-probabilities (with the top alternatives asked for), by row index."""
        if raw is None:
            return {}
        ks = [rows[i].request.logprobs or 0 for i in scored]
        found = logprobs.entries(raw, [tokens[i] for i in scored], ks, self.texts)
        return dict(zip(scored, found))

    def hand_out(self, rows: list[Row], tokens: list[int], entries: dict[int, TokenLogprob]) -> list[int]:
        """Give each row its token and timing, stream what is safe, finish the rows that ended; return the others."""
        now = time.monotonic()
        size = len(rows)
        self.rate.add(size)
        return [
            i for i, (row, token) in enumerate(zip(rows, tokens)) if self.give(row, token, entries.get(i), size, now)
        ]

    def give(self, row: Row, token: int, entry: TokenLogprob | None, size: int, now: float) -> bool:
        """Give one row one token chosen in a pass of `size` rows; stream, finish if it ended; return if it goes on."""
        if row.steps == 0:
            row.timings["first_token_s"] = now - row.submitted
        row.token_times.append(now - row.submitted)
        row.steps += 1
        row.batched += size
        if row.request.max_new_tokens == 0:  # score only (echo): the prefill was all it needed
            row.finish(self.model_name, now)
            return False
        row.push(token, self.eos_ids, entry)
        row.stream()
        if row.finish_reason is None:
            return True
        row.finish(self.model_name, now)
        return False

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
