"""No user waits behind another, against a real gunicorn: while clients score long prompts, a short generation gets
its turn within a few chunks' time, not after the scoring."""

from __future__ import annotations

import threading
import time

import pytest

from tests.ops_helpers import sample

pytestmark = pytest.mark.slow

CHUNK = 64  # PREFILL_CHUNK_TOKENS's default, set here so that the bound below reads it
SCORERS = 3  # concurrent clients, each scoring PROMPTS prompts
PROMPTS = 4


def test_short_generation_is_not_held_behind_prompt_scoring(start_server, tiny_model, tokenizer):
    """Three clients score four ~900-token prompts each (what lm-evaluation-harness sends: echo, logprobs 5,
    max_tokens 0); a fourth client's 8-token generation, sent while they run, must end within a bound set from the
    chunk size: the time the scoring took per chunk of 64 tokens (measured here), times the chunks the short request
    may wait (one prompt past the admission budget, its own prefill, 8 decode steps), times 2. Before scoring went
    through the chunk budget it waited for every scoring prompt (a 2-core machine: 6.07 s, as long as the scoring,
    against a bound of 1.67 s; with it, 0.45 s against 1.23 s)."""
    server = start_server(
        MODEL_NAME=tiny_model, WEB_CONCURRENCY="1", GUNICORN_THREADS="8", TORCH_THREADS="1",
        PREFILL_CHUNK_TOKENS=str(CHUNK),
    )  # fmt: skip
    prompt = " ".join(["tokens prompts and completions"] * 180)
    prompt_tokens = len(tokenizer(prompt).input_ids)
    assert 800 < prompt_tokens < 1000
    body = {"model": tiny_model, "prompt": [prompt] * PROMPTS, "echo": True, "logprobs": 5, "max_tokens": 0}
    assert server.post("/generate", {"prompt": "Warm", "max_new_tokens": 2}).status_code == 200  # the model loaded
    done: list[tuple[int, float]] = []

    def score() -> None:
        response = server.post("/v1/completions", body, timeout=300)
        done.append((response.status_code, time.monotonic()))

    scorers = [threading.Thread(target=score) for _ in range(SCORERS)]
    started = time.monotonic()
    for thread in scorers:
        thread.start()
    while sample(server_metrics(server), "llmapi_requests_in_flight") < SCORERS:  # all admitted by the workers
        time.sleep(0.01)
    sent = time.monotonic()
    short = server.post("/generate", {"prompt": "A short question", "max_new_tokens": 8, "min_new_tokens": 8})
    short_s = time.monotonic() - sent
    for thread in scorers:
        thread.join(300)
    assert short.status_code == 200 and [code for code, _ in done] == [200] * SCORERS
    scoring_s = max(end for _, end in done) - started
    chunk_s = scoring_s * CHUNK / (SCORERS * PROMPTS * prompt_tokens)  # the time a chunk of scoring took
    bound_s = 2 * chunk_s * (prompt_tokens / CHUNK + 1 + 8)
    assert short_s < bound_s, f"short {short_s:.2f}s, bound {bound_s:.2f}s, scoring {scoring_s:.2f}s"
    assert short.json()["usage"]["completion_tokens"] == 8


def server_metrics(server) -> str:
    """The server's /metrics text."""
    import requests

    return requests.get(server.url + "/metrics", timeout=30).text
