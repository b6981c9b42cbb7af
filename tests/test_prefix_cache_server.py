"""The engine's queue, its prefix cache and per-token latency in /metrics, summed over real gunicorn workers."""

from __future__ import annotations

import re

import pytest
import requests

from tests.conftest import run_concurrently

pytestmark = pytest.mark.slow
SERVER_ENV = {"PREFIX_CACHE_MB": "16", "PREFILL_CHUNK_TOKENS": "32", "SERVED_MODEL_NAME": "m", "GUNICORN_THREADS": "9"}
SYSTEM = " ".join(["You are a careful assistant: answer in one short sentence."] * 8)


def sample(text: str, name: str) -> float:
    """The value of an unlabelled sample in the exposition text."""
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def test_metrics_show_the_queue_the_cache_and_token_latency(server):
    def chat(i: int) -> requests.Response:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"question {i}"}]
        return server.post("/v1/chat/completions", {"model": "m", "messages": messages, "max_tokens": 6})

    answers = [server.post("/generate", {"prompt": SYSTEM + f" Q{i}", "max_new_tokens": 4}) for i in range(2)]
    answers += [server.post("/v1/completions", {"model": "m", "prompt": SYSTEM + " Q2", "max_tokens": 4})]
    answers += run_concurrently(chat, 6)
    assert [r.status_code for r in answers] == [200] * 9
    new_tokens = [r.json()["usage"]["completion_tokens"] for r in answers]
    text = requests.get(server.url + "/metrics", timeout=10).text
    assert sample(text, "llmapi_prefix_cache_hit_tokens_total") > 0
    assert sample(text, "llmapi_prefix_cache_miss_tokens_total") > 0
    assert 0 < sample(text, "llmapi_prefix_cache_bytes") <= sample(text, "llmapi_prefix_cache_capacity_bytes")
    assert sample(text, "llmapi_prefix_cache_capacity_bytes") == 2 * 16 * 1024 * 1024  # both workers' bounds
    assert sample(text, "llmapi_engine_rows_waiting") == 0
    assert sample(text, "llmapi_engine_rows_prefilling") == 0
    assert sample(text, "llmapi_engine_rows_running") >= 0
    assert sample(text, "llmapi_time_to_first_token_seconds_count") == 9
    assert sample(text, "llmapi_inter_token_latency_seconds_count") == sum(n - 1 for n in new_tokens if n)
