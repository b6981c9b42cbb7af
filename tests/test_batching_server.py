"""The batching engine and the baseline mode behind a real gunicorn."""

from __future__ import annotations

import pytest

from tests.conftest import run_concurrently

pytestmark = pytest.mark.slow

SEEDED = {"prompt": "Artificial Intelligence is", "max_new_tokens": 20, "temperature": 0.8, "seed": 2024}


def test_server_seeded_requests_repeat_under_concurrent_load(start_server, tiny_model):
    # Threads enough that one worker admits all 18 even if the kernel hands it every connection.
    server = start_server(MODEL_NAME=tiny_model, WEB_CONCURRENCY="2", GUNICORN_THREADS="20")
    alone = server.post("/generate", SEEDED).json()["generated_text"]
    bodies = [SEEDED if i % 3 == 0 else {"prompt": f"Busy {i}", "max_new_tokens": 5 + i, "temperature": 1.0}
              for i in range(18)]  # fmt: skip
    responses = run_concurrently(lambda i: server.post("/generate", bodies[i]), len(bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    seeded = [r.json()["generated_text"] for r, body in zip(responses, bodies) if body is SEEDED]
    assert seeded == [alone] * 6  # both workers, beside other requests, give the same text


def test_server_baseline_mode_serves_generate(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model, ENGINE_MODE="simple", WEB_CONCURRENCY="1", GUNICORN_THREADS="8")
    batch = start_server(MODEL_NAME=tiny_model, WEB_CONCURRENCY="1")
    body = {"prompt": "Hello there", "max_new_tokens": 12}
    responses = run_concurrently(lambda i: server.post("/generate", body), 4)
    assert [r.status_code for r in responses] == [200] * 4
    expected = batch.post("/generate", body).json()
    assert all(r.json() == expected for r in responses)
    assert server.post("/generate", {**SEEDED, "stream": True}).headers["content-type"].startswith("text/event-stream")
