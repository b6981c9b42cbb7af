"""How the /v1 routes write results: OpenAI's bodies and stream chunks, for completions and for chat."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from llmapi.engine.types import GenerationResult, Piece, TokenLogprob
from llmapi.runtime.runner import Event

# OpenAI names two endings: "stop" (the model ended, or a stop sequence matched) and "length" (max_tokens).
# A deadline is neither, and calling it either would tell a client that its text is complete or that a
# larger max_tokens would help. "timeout" says what happened; OpenAI's clients pass unknown reasons through.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "timeout": "timeout"}


def finish_reason(result: GenerationResult) -> str:
    """Name the way a generation ended as OpenAI does."""
    return FINISH_REASONS.get(result.finish_reason, result.finish_reason)


def legacy_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, list[Any]]:
    """OpenAI's legacy completions shape: tokens, token_logprobs, top_logprobs (dicts), text_offset from `offset`.

    A position's dict holds its k alternatives and its own token, as vLLM's does; a prompt's first token has
    null in both lists.
    """
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry.text)
        values.append(entry.logprob)
        if entry.logprob is None:
            tops.append(None)
        else:
            top = {alt.text: alt.logprob for alt in entry.top}
            top.setdefault(entry.text, entry.logprob)
            tops.append(top)
        offsets.append(offset)
        offset += len(entry.text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    """One position of a chat's logprobs.content: the token, its log-probability, its bytes, its alternatives."""
    top = [{"token": alt.text, "logprob": alt.logprob, "bytes": list(alt.raw)} for alt in entry.top]
    return {"token": entry.text, "logprob": entry.logprob, "bytes": list(entry.raw), "top_logprobs": top}


def usage(results: Sequence[GenerationResult | None], n: int) -> dict[str, int]:
    """Count each prompt once and every choice's completion, as OpenAI does."""
    prompt = sum(result.prompt_tokens for result in results[::n] if result is not None)
    completion = sum(result.completion_tokens for result in results if result is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAIFormat:
    """What both /v1 generation routes share: the head of every body and chunk, usage, the stream's order."""

    prefix = object = chunk_object = ""  # set by each kind
    done = "[DONE]"

    def __init__(self, model: str, *, choices: int, n: int, include_usage: bool = False) -> None:
        self.choices = choices  # how many choices the answer carries (prompts x n)
        self.n = n  # choices per prompt
        self.include_usage = include_usage
        self.head = {"id": self.prefix + uuid.uuid4().hex, "object": self.object, "created": int(time.time())}
        self.head["model"] = model

    def body(self, results: Sequence[GenerationResult]) -> dict[str, Any]:
        """The whole answer: every choice and the usage."""
        choices = [self.choice(index, result) for index, result in enumerate(results)]
        return {**self.head, "choices": choices, "usage": usage(results, self.n)}

    def events(self, events: Iterator[Event]) -> Iterator[dict[str, Any]]:
        """Every choice's opening chunk, one chunk per piece as it arrives, each choice's closing chunk, usage."""
        head = {**self.head, "object": self.chunk_object}
        extra: dict[str, Any] = {"usage": None} if self.include_usage else {}
        results: list[GenerationResult | None] = []
        for index in range(self.choices):
            results.append(None)
            if (opening := self.opening(index)) is not None:
                yield {**head, "choices": [opening], **extra}
        for index, item in events:
            if isinstance(item, GenerationResult):
                results[index] = item
                yield {**head, "choices": [self.closing(index, item)], **extra}
            elif item.text or item.logprobs:
                yield {**head, "choices": [self.delta(index, item)], **extra}
        if self.include_usage:
            yield {**head, "choices": [], "usage": usage(results, self.n)}

    def choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """A finished choice, in a body."""
        raise NotImplementedError

    def opening(self, index: int) -> dict[str, Any] | None:
        """The first chunk of a streamed choice, if its kind has one."""
        raise NotImplementedError

    def delta(self, index: int, piece: Piece) -> dict[str, Any]:
        """A chunk of new text."""
        raise NotImplementedError

    def closing(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The last chunk of a streamed choice."""
        raise NotImplementedError


class CompletionFormat(OpenAIFormat):
    """/v1/completions: `text` choices, the prompt in front of each when echoing."""

    prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def __init__(
        self,
        model: str,
        prompts: Sequence[str],
        *,
        n: int,
        echo: bool,
        logprobs: int | None = None,
        include_usage: bool = False,
    ):
        super().__init__(model, choices=len(prompts), n=n, include_usage=include_usage)
        self.prompts = prompts  # the prompt of each choice, prompt-major
        self.echo = echo
        self.logprobs = logprobs
        self._offsets = [len(prompt) if echo else 0 for prompt in prompts]  # a stream's text so far, per choice

    def _choice(self, index: int, text: str, reason: str | None, logprobs: Any = None) -> dict[str, Any]:
        """One choice object."""
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """A finished choice."""
        prefix = "" if not self.echo else result.prompt_text if result.prompt_text is not None else self.prompts[index]
        logprobs = None
        if self.logprobs is not None:
            prompt = (result.prompt_logprobs or ()) if self.echo else ()
            logprobs = legacy_logprobs([*prompt, *(result.logprobs or ())])
        return self._choice(index, prefix + result.text, finish_reason(result), logprobs)

    def opening(self, index: int) -> dict[str, Any] | None:
        """The first chunk of a streamed choice: the prompt when echoing."""
        return self._choice(index, self.prompts[index], None) if self.echo else None

    def delta(self, index: int, piece: Piece) -> dict[str, Any]:
        """A chunk of new text, with its tokens' log-probabilities when asked."""
        logprobs = None
        if self.logprobs is not None:
            logprobs = legacy_logprobs(piece.logprobs, self._offsets[index])
            self._offsets[index] += sum(len(entry.text) for entry in piece.logprobs)
        return self._choice(index, piece.text, None, logprobs)

    def closing(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The last chunk of a streamed choice."""
        return self._choice(index, "", finish_reason(result))


class ChatFormat(OpenAIFormat):
    """/v1/chat/completions: assistant messages, and in a stream the role first, then content deltas."""

    prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, *, n: int, logprobs: bool = False, include_usage: bool = False) -> None:
        super().__init__(model, choices=n, n=n, include_usage=include_usage)
        self.logprobs = logprobs

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        """A choice's (or a chunk's) logprobs object, when asked."""
        return {"content": [chat_logprob(entry) for entry in entries]} if self.logprobs else None

    def choice(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """A finished choice."""
        message = {"role": "assistant", "content": result.text}
        logprobs = self._logprobs(result.logprobs or ())
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason(result)}

    def opening(self, index: int) -> dict[str, Any]:
        """The first chunk of a streamed choice carries the role."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, piece: Piece) -> dict[str, Any]:
        """A chunk of new text."""
        return {
            "index": index,
            "delta": {"content": piece.text},
            "logprobs": self._logprobs(piece.logprobs),
            "finish_reason": None,
        }

    def closing(self, index: int, result: GenerationResult) -> dict[str, Any]:
        """The last chunk of a streamed choice."""
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason(result)}
