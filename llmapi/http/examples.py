"""Examples shown in the OpenAPI docs (and sent by Swagger UI's "Try it out"), kept within a server's limits."""

from __future__ import annotations

import json
from typing import Any

from llmapi.config import Settings

PROMPT = "Artificial Intelligence is"  # the README's curl example


def generate_requests(settings: Settings) -> dict[str, dict[str, Any]]:
    """Named POST /generate bodies; the first, the README's curl example, is what Try it out starts with."""
    tokens = min(40, settings.max_new_tokens_limit)
    bodies = {
        "readme": ("The README's curl example", {"prompt": PROMPT, "max_new_tokens": tokens}),
        "sampled": (
            "Sampled and reproducible (send the same seed again)",
            {"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0.8, "top_p": 0.95, "seed": 42},
        ),
        "stop": (
            "Stop at a sequence",
            {"prompt": "Q: What is AI?\nA:", "max_new_tokens": tokens, "stop": ["\n", "Q:"]},
        ),
        "stream": ("Streamed as Server-Sent Events", {"prompt": PROMPT, "max_new_tokens": tokens, "stream": True}),
    }
    return {name: {"summary": summary, "value": value} for name, (summary, value) in bodies.items()}


def generate_response() -> dict[str, Any]:
    """A POST /generate answer."""
    return {
        "generated_text": PROMPT + " a field of computer science that",
        "finish_reason": "length",
        "stop_sequence": None,
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9},
        "model": "models/tiny-gpt2",
        "seed": None,
    }


def generate_stream() -> str:
    """A streamed POST /generate answer: a token event per piece, then the full answer."""
    pieces = [" a", " field", " of", " computer", " science", " that"]
    events = [{"token": {"text": piece}} for piece in pieces] + [generate_response()]
    return "".join(f"data: {json.dumps(event)}\n\n" for event in events)
