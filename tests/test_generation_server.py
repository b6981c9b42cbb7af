"""Generation controls against a real gunicorn: seeds under load, deadlines, SSE streaming, hang-ups."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
import requests
import sseclient

from tests.conftest import KEY, run_concurrently

pytestmark = pytest.mark.slow

SAMPLED = {"prompt": "Once upon a time", "max_new_tokens": 24, "temperature": 0.9, "top_p": 0.95, "seed": 1234}


# Two workers; 37 threads, so that one worker may admit all 36 concurrent requests below (503 beyond).
SERVER_ENV = {"WEB_CONCURRENCY": "2", "GUNICORN_THREADS": "37"}


def test_seed_gives_the_same_text_under_concurrent_load(server):
    def call(i: int) -> requests.Response:
        if i % 3 == 0:
            return server.post("/generate", SAMPLED)
        noise = {"prompt": f"Other request {i} " * (i % 5 + 1), "max_new_tokens": 5 + i % 20}
        return server.post("/generate", {**noise, "temperature": 1.0} if i % 2 else noise)

    seeded: list[dict] = []
    # Rounds until both workers have served (the kernel, not us, spreads connections over them).
    for _ in range(5):
        responses = run_concurrently(call, 36)
        assert all(r.status_code == 200 for r in responses)
        seeded += [r.json() for i, r in enumerate(responses) if i % 3 == 0]
        if len(set(re.findall(r"pid=(\d+) loaded model", server.log()))) == 2:
            break
    assert len(set(re.findall(r"pid=(\d+) loaded model", server.log()))) == 2, "one worker served everything"
    alone = server.post("/generate", SAMPLED).json()
    assert {body["generated_text"] for body in seeded} == {alone["generated_text"]}
    assert all(body["seed"] == 1234 for body in seeded)


def test_returned_seed_reproduces_an_unseeded_sample(server):
    body = {k: v for k, v in SAMPLED.items() if k != "seed"}
    first = server.post("/generate", body).json()
    again = server.post("/generate", {**body, "seed": first["seed"]}).json()
    assert again["generated_text"] == first["generated_text"]


def test_stop_sequence_is_excluded_and_reported(server):
    full = server.post("/generate", {**SAMPLED, "return_full_text": False}).json()["generated_text"]
    stop = full[10:13]
    body = server.post("/generate", {**SAMPLED, "stop": ["@@never@@", stop], "return_full_text": False}).json()
    assert body["finish_reason"] == "stop"
    assert body["stop_sequence"] == stop
    assert body["generated_text"] == full[: full.index(stop)]


def test_deadline_returns_text_so_far_and_worker_survives(server):
    workers = server.wait_workers(2)
    response = server.post("/generate", {"prompt": "Hello", "max_new_tokens": 512, "timeout_ms": 30})
    assert response.status_code == 200
    body = response.json()
    assert body["finish_reason"] == "timeout"
    assert body["usage"]["completion_tokens"] < 512
    assert body["generated_text"].startswith("Hello")
    assert server.worker_pids() == workers
    follow = server.post("/generate", {"prompt": "Hello", "max_new_tokens": 4})
    assert follow.status_code == 200 and follow.json()["finish_reason"] == "length"


def read_sse(response: requests.Response) -> list[dict]:
    """Parse a Server-Sent Events answer with a real SSE client."""
    return [json.loads(event.data) for event in sseclient.SSEClient(response).events()]


@pytest.mark.parametrize("return_full_text", [True, False])
def test_stream_events_add_up_to_the_final_text(server, return_full_text):
    body = {**SAMPLED, "max_new_tokens": 40, "stream": True, "return_full_text": return_full_text}
    response = server.post("/generate", body, stream=True)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    assert "no-cache" in response.headers["Cache-Control"]
    events = read_sse(response)
    final = events[-1]
    pieces = "".join(e["token"]["text"] for e in events[:-1])
    prefix = SAMPLED["prompt"] if return_full_text else ""
    assert final["generated_text"] == prefix + pieces
    assert len(events) > 10
    plain = server.post("/generate", {**SAMPLED, "max_new_tokens": 40, "return_full_text": return_full_text}).json()
    assert final["generated_text"] == plain["generated_text"]
    assert final["usage"] == plain["usage"]
    assert final["usage"]["completion_tokens"] == 40


def test_stream_with_stop_never_sends_the_stop(server):
    full = server.post("/generate", {**SAMPLED, "return_full_text": False}).json()["generated_text"]
    stop = full[8:12]
    response = server.post(
        "/generate", {**SAMPLED, "stop": stop, "stream": True, "return_full_text": False}, stream=True
    )
    events = read_sse(response)
    streamed = "".join(e["token"]["text"] for e in events[:-1])
    assert stop not in streamed
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["generated_text"] == streamed == full[: full.index(stop)]


def test_stream_error_before_start_is_a_plain_json_error(server):
    response = server.post("/generate", {"prompt": "hi " * 1100, "stream": True}, stream=True)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "max_new_tokens"


def test_client_hang_up_stops_generation_early(server):
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps({"prompt": "Hello", "max_new_tokens": 512, "stream": True}).encode()
    request = (
        f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"x-api-key: {KEY}\r\nX-Request-ID: hang-up-test-1\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload
    before = server.log().count("generation cancelled after")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while received.count(b"data: ") < 2:
            chunk = sock.recv(256)
            assert chunk, f"connection closed early: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200"), received
    # The client is gone after two events: the worker must notice on its next writes and cancel.
    deadline = time.monotonic() + 15
    while server.log().count("generation cancelled after") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [line for line in server.log().splitlines() if "generation cancelled after" in line]
    assert len(lines) == before + 1, "the generation was not cancelled"
    done = int(re.search(r"cancelled after (\d+) of 512", lines[-1]).group(1))
    assert done < 256, f"generation ran on for {done} tokens after the client left"
    assert "[hang-up-test-1]" in lines[-1]  # logged by the engine thread, with the request's id
    # The worker is free and well afterwards.
    assert server.post("/generate", {"prompt": "Hello", "max_new_tokens": 3}).status_code == 200
