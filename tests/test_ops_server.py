"""Operations against real gunicorn processes serving the real tiny model on loopback."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import KEY, Server, run_concurrently
from tests.ops_helpers import error_of, sample

pytestmark = pytest.mark.slow

ACCESS = re.compile(r'"(?P<method>\S+) (?P<path>\S+) \S+" (?P<status>\d+) .* pid=<(?P<pid>\d+)> request_id=(?P<id>\S+)')


def access_lines(server: Server) -> list[dict[str, str]]:
    """The text access-log lines of `server`, parsed."""
    return [m.groupdict() for m in map(ACCESS.search, server.log().splitlines()) if m]


def metrics_text(server: Server) -> str:
    """One scrape of /metrics (answered by whichever worker accepts it)."""
    response = requests.get(server.url + "/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def metrics_dir(server: Server) -> Path:
    """The metrics directory the server logged at start."""
    return Path(re.search(r"metrics directory (\S+)", server.log()).group(1))


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` every 50 ms until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_of(server: Server) -> int:
    """The port `server` listens on."""
    return int(server.url.rsplit(":", 1)[1])


def open_stream(server: Server, body: dict[str, Any], **headers: str) -> http.client.HTTPConnection:
    """Start a streamed /generate on a connection of our own (so that its client port is known)."""
    conn = http.client.HTTPConnection("127.0.0.1", port_of(server), timeout=120)
    payload = json.dumps({**body, "stream": True})
    conn.request("POST", "/generate", payload, {"x-api-key": KEY, "content-type": "application/json", **headers})
    return conn


def events(response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
    """The SSE events of a response, decoded, until the server ends it."""
    while line := response.readline():
        if line.startswith(b"data: "):
            yield json.loads(line[len(b"data: ") :])


def serving_pid(server: Server, client_port: int) -> int:
    """The worker holding the server side of the loopback connection from `client_port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)
        if local == port_of(server) and remote == client_port:
            inodes.add(f"socket:[{fields[9]}]")
    for pid in server.worker_pids():
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) in inodes:
                    return pid
            except OSError:
                continue
    raise LookupError(f"no worker holds the connection from port {client_port}")


def generate_until_both_workers_served(server: Server, rounds: int = 6) -> list[requests.Response]:
    """Send rounds of concurrent requests until both workers have answered some; return every response."""
    responses: list[requests.Response] = []
    for round_ in range(rounds):
        batch = run_concurrently(
            lambda i, r=round_: server.post(
                "/generate", {"prompt": f"Round {r}, request {i}:", "max_new_tokens": 2 + i}
            ),
            6,
        )
        assert [r.status_code for r in batch] == [200] * len(batch), [r.text for r in batch]
        responses += batch
        pids = {line["pid"] for line in access_lines(server) if line["path"] == "/generate"}
        if len(pids) == 2:
            return responses
    raise AssertionError("the same worker answered every request")


def test_ops_metrics_are_summed_over_both_workers_and_cleaned_up(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model, GUNICORN_THREADS="8")
    assert "not loaded yet" in error_of(requests.get(server.url + "/ready", timeout=5).json(), 503)["message"]
    directory = metrics_dir(server)
    assert directory.is_dir()
    responses = generate_until_both_workers_served(server)
    usage = [r.json()["usage"] for r in responses]
    for _ in range(6):  # whichever worker answers the scrape, it reports both workers' numbers
        text = metrics_text(server)
        assert sample(text, "llmapi_http_requests_total", route="/generate", status="200") == len(responses)
        assert sample(text, "llmapi_generated_tokens_total") == sum(u["completion_tokens"] for u in usage)
        assert sample(text, "llmapi_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
        assert sample(text, "llmapi_time_to_first_token_seconds_count") == len(responses)
        assert sample(text, "llmapi_queue_wait_seconds_count") == len(responses)
        assert sample(text, "llmapi_batch_size_count") == len(responses)
        assert sample(text, "llmapi_http_request_duration_seconds_count", route="/generate") == len(responses)
        assert sample(text, "llmapi_model_load_duration_seconds_count") == 2
        assert sample(text, "llmapi_models_loaded") == 2
        assert sample(text, "llmapi_admission_capacity") == 2 * 7
        assert sample(text, "llmapi_requests_in_flight") == 0
    scrapers = {line["pid"] for line in access_lines(server) if line["path"] == "/metrics"}
    print(f"{len(responses)} generations over 2 workers; /metrics answered by {len(scrapers)} worker(s)")
    assert [requests.get(server.url + "/ready", timeout=5).status_code for _ in range(6)] == [200] * 6
    assert server.stop() == 0
    assert not directory.exists()


def test_ops_warmup_load_failure_reports_why_and_recovers_without_restarts(start_server, tiny_model, tmp_path):
    target = tmp_path / "model"
    server = start_server(MODEL_NAME=str(target), WARMUP="true", MODEL_RETRY_SECONDS="0")
    workers = server.wait_workers(2)
    # Each worker tried at start, with no request at all.
    wait_until(lambda: server.log().count("model load failed") >= 2, 60, "both warm-up loads to fail")
    ready = requests.get(server.url + "/ready", timeout=5)
    assert "could not be loaded" in error_of(ready.json(), 503)["message"]
    assert ready.headers["Retry-After"].isdigit()
    failed = server.post("/generate", {"prompt": "hi"})
    assert "could not be loaded" in error_of(failed.json(), 503)["message"]
    assert failed.headers["Retry-After"].isdigit()
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    assert sample(metrics_text(server), "llmapi_model_load_failures_total") >= 2
    assert server.worker_pids() == workers  # no worker died or was replaced: no restart loop
    os.symlink(tiny_model, target)
    # Readiness probes alone start the new loads; every worker becomes ready.
    wait_until(
        lambda: all(requests.get(server.url + "/ready", timeout=10).status_code == 200 for _ in range(4)),
        90,
        "every worker to load the fixed model",
    )
    assert server.post("/generate", {"prompt": "hi", "max_new_tokens": 3}).status_code == 200
    assert server.worker_pids() == workers
    assert server.log().count("Booting worker") == 2


def test_ops_request_ids_and_json_logs_hold_no_key_and_no_prompt(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model, LOG_FORMAT="json", WEB_CONCURRENCY="1")
    marker = "zebra-quartz-prompt-marker"
    body = {"prompt": f"{marker} once upon a time", "max_new_tokens": 4}
    sent = server.post("/generate", body, headers={"X-Request-ID": "client-id-1"})
    fresh = server.post("/generate", body)
    insane = server.post("/generate", body, headers={"X-Request-ID": "not a sane id"})
    bearer = requests.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    streamed = server.post("/generate", {**body, "stream": True}, headers={"X-Request-ID": "client-id-stream"})
    invalid = server.post("/generate", {**body, "max_new_tokens": 0}, headers={"X-Request-ID": "client-id-bad"})
    unauthorized = server.post("/generate", body, headers={"x-api-key": "wrong-key-value"})
    assert [r.status_code for r in (sent, fresh, insane, bearer, streamed, invalid, unauthorized)] == [200] * 5 + [
        422,
        401,
    ]
    assert sent.headers["X-Request-ID"] == "client-id-1"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["X-Request-ID"])
    assert re.fullmatch(r"[0-9a-f]{32}", insane.headers["X-Request-ID"])
    assert '"generated_text"' in streamed.text
    assert server.stop() == 0  # flushes every log line
    log = server.log()
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is JSON
    responses = (sent, fresh, insane, bearer, streamed, invalid, unauthorized)
    for response in responses:
        rid = response.headers["X-Request-ID"]
        about = [e for e in entries if e.get("request_id") == rid]
        access = [e for e in about if e["logger"] == "gunicorn.access"]
        assert len(access) == 1 and access[0]["status"] == response.status_code, about
        if response.status_code == 200:
            assert any("generation ended" in e["message"] for e in about), about
    assert KEY not in log and "wrong-key-value" not in log
    assert marker not in log


def test_ops_overload_at_four_times_capacity_is_200_or_503_and_health_stays_up(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model, GUNICORN_THREADS="3")  # 2 workers x 2 admitted = 4
    workers = server.wait_workers(2)
    capacity = 4
    health: list[tuple[int, float]] = []
    storm_done = threading.Event()

    def probe() -> None:
        while not storm_done.is_set():
            started = time.perf_counter()
            status = requests.get(server.url + "/health", timeout=10).status_code
            health.append((status, time.perf_counter() - started))
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        body = {"prompt": "Overload test:", "max_new_tokens": 48, "min_new_tokens": 48}
        results = run_concurrently(lambda i: server.post("/generate", body), 4 * capacity)
    finally:
        storm_done.set()
        prober.join(30)
    statuses = [r.status_code for r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    for refused in (r for r in results if r.status_code == 503):
        assert "capacity" in error_of(refused.json(), 503)["message"]
        assert refused.headers["Retry-After"] == "1"
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in results if r.status_code == 200)
    assert health and all(status == 200 for status, _ in health)
    latencies = sorted(seconds for _, seconds in health)
    print(
        f"overload: {statuses.count(200)} x 200, {statuses.count(503)} x 503; /health during it:"
        f" {len(latencies)} probes, median {latencies[len(latencies) // 2] * 1000:.1f} ms,"
        f" max {latencies[-1] * 1000:.1f} ms"
    )
    text = metrics_text(server)
    assert sample(text, "llmapi_requests_rejected_total", reason="overload") == statuses.count(503)
    assert sample(text, "llmapi_http_requests_total", route="/generate", status="503") == statuses.count(503)
    assert sample(text, "llmapi_http_requests_total", route="/generate", status="200") == statuses.count(200)
    assert sample(text, "llmapi_requests_in_flight") == 0
    assert server.worker_pids() == workers
    assert "WORKER TIMEOUT" not in server.log()


def test_ops_sigterm_finishes_in_flight_requests_and_refuses_new_connections(start_server, tiny_model):
    server = start_server(
        MODEL_NAME=tiny_model, WEB_CONCURRENCY="1", GUNICORN_THREADS="8", MAX_BATCH_SIZE="1"
    )  # one row at a time, so that the requests stay in flight a while
    assert server.post("/generate", {"prompt": "warm up", "max_new_tokens": 1}).status_code == 200
    directory = metrics_dir(server)
    tokens = 80
    body = {"max_new_tokens": tokens, "min_new_tokens": tokens}
    conn = open_stream(server, {"prompt": "Streamed while stopping", **body})  # first in line
    plain: list[requests.Response] = []

    def send_plain() -> None:
        plain.extend(run_concurrently(lambda i: server.post("/generate", {"prompt": f"Drain {i}", **body}), 3))

    pending = threading.Thread(target=send_plain)
    pending.start()
    wait_until(lambda: sample(metrics_text(server), "llmapi_requests_in_flight") == 4, 30, "4 requests in flight")
    server.process.send_signal(signal.SIGTERM)
    outcomes: list[str] = []
    wait_until(lambda: outcomes.append(connect(port_of(server))) or outcomes[-1] == "refused", 20, "a refusal")
    assert "waiting" not in outcomes, outcomes  # never accepted and left unanswered while draining
    received = list(events(conn.getresponse()))
    pending.join(120)
    final = received[-1]
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == tokens
    streamed = "".join(event["token"]["text"] for event in received[:-1])
    assert "Streamed while stopping" + streamed == final["generated_text"]
    assert [r.status_code for r in plain] == [200] * 3
    assert all(r.json()["finish_reason"] == "length" for r in plain)
    assert server.process.wait(60) == 0
    assert not directory.exists()


def connect(port: int) -> str:
    """Try a new connection: "answered", "refused", "reset" (accepted, then dropped) or "waiting" (left unanswered)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return "answered" if sock.recv(1024) else "reset"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "waiting"
    except OSError:
        return "reset"


def test_ops_sigkill_of_a_worker_mid_request_is_survived(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model, GUNICORN_THREADS="4", MAX_BATCH_SIZE="1")
    before = server.wait_workers(2)
    conn = open_stream(server, {"prompt": "Killed midway", "max_new_tokens": 300, "min_new_tokens": 300})
    received = events(conn.getresponse())
    next(received)
    victim = serving_pid(server, conn.sock.getsockname()[1])
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    os.kill(victim, signal.SIGKILL)
    try:
        rest = list(received)
    except (http.client.HTTPException, OSError):
        rest = []
    assert not any("generated_text" in event for event in rest)  # that stream never completes...
    # ...while /health never stops answering, and the master replaces the worker.
    health = []

    def newcomer() -> int | None:
        health.append(requests.get(server.url + "/health", timeout=5).status_code)
        fresh = [pid for pid in server.worker_pids() if pid not in before]
        return fresh[0] if fresh else None

    replacement = wait_until(newcomer, 60, "the master to replace the worker")
    served = []

    def generate_on_the_replacement() -> bool:
        health.append(requests.get(server.url + "/health", timeout=5).status_code)
        rid = f"after-kill-{len(served)}"
        served.append(server.post("/generate", {"prompt": "Again", "max_new_tokens": 3}, headers={"X-Request-ID": rid}))
        lines = access_lines(server)
        return any(line["id"] == rid and int(line["pid"]) == replacement for line in lines)

    wait_until(generate_on_the_replacement, 90, "the new worker to answer a generate")
    assert [r.status_code for r in served] == [200] * len(served)
    assert set(health) == {200}
    text = metrics_text(server)
    # The dead worker's live gauges were dropped by child_exit: two workers' capacity, nothing in flight.
    assert sample(text, "llmapi_admission_capacity") == 2 * 3
    assert sample(text, "llmapi_requests_in_flight") == 0
