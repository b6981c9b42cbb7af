"""A cold worker under a burst: nothing touches the model outside an admitted generation."""

from __future__ import annotations

import time

import pytest
import requests

from tests.conftest import run_concurrently

pytestmark = pytest.mark.slow

THREADS = 4  # so the worker admits 3 requests and keeps a thread for /health
BURST = 8
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 2}
COMPLETION = {"prompt": "Say hello.", "max_tokens": 2}


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
def test_a_cold_burst_is_admitted_up_to_the_limit_and_health_keeps_answering(start_server, tiny_model, path, body):
    server = start_server(
        app="tests.slow_load_app:app",
        MODEL_NAME=tiny_model,
        WEB_CONCURRENCY="1",
        GUNICORN_THREADS=str(THREADS),
        LLMAPI_TEST_LOAD_DELAY="4",
    )
    health: list[int] = []

    def call(i: int) -> int:
        if i == BURST:  # the probe, once the burst is waiting on the load
            time.sleep(1.0)
            # The load takes 4 s more: a probe that had to wait for a thread would time out.
            health.append(requests.get(server.url + "/health", timeout=2.5).status_code)
            return 0
        return server.post(path, body, timeout=60).status_code

    statuses = run_concurrently(call, BURST + 1)[:BURST]
    assert sorted(statuses) == [200] * (THREADS - 1) + [503] * (BURST - THREADS + 1)
    assert health == [200]
    assert "loaded model" in server.log()
