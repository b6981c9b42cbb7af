"""End to end: a real gunicorn (2 workers, several threads) serving the real tiny model over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import KEY, ROOT, run_concurrently, server_env

pytestmark = pytest.mark.slow


def torch_mapped(pid: int) -> bool:
    """Whether process `pid` has torch's shared library mapped (i.e. has imported torch)."""
    with open(f"/proc/{pid}/maps") as maps:
        return "libtorch" in maps.read()


def test_server_reference_curl_example(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model)
    out = subprocess.run(
        [
            "curl", "-sS", "-X", "POST", f"{server.url}/generate",
            "-H", "Content-Type: application/json", "-H", f"x-api-key: {KEY}",
            "-d", '{"prompt": "Artificial Intelligence is", "max_new_tokens": 40}',
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    body = json.loads(out.stdout)
    assert body["generated_text"].startswith("Artificial Intelligence is")
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 40
    assert body["model"] == tiny_model


def test_server_curl_without_key_is_401(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model)
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", f"{server.url}/generate",
         "-H", "Content-Type: application/json", "-d", '{"prompt": "hi"}'],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout == "401"


def test_server_workers_load_lazily_and_once(start_server, tiny_model):
    # Enough threads that one worker could admit all 24 requests (admission control answers 503 beyond).
    server = start_server(MODEL_NAME=tiny_model, GUNICORN_THREADS="25")
    workers = server.wait_workers(2)
    assert len(workers) == 2
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok"}
    # Before any generate, no worker (and not the master) has torch in memory.
    assert not any(torch_mapped(pid) for pid in [server.process.pid, *workers])
    results = run_concurrently(lambda i: server.post("/generate", {"prompt": f"Hello {i}", "max_new_tokens": 8}), 24)
    assert [r.status_code for r in results] == [200] * 24
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in results)
    loads = [line for line in server.log().splitlines() if "loaded model" in line]
    pids = [line.split("pid=")[1].split()[0] for line in loads]
    assert len(pids) == len(set(pids)) <= 2, loads  # each worker loaded at most once
    assert all(torch_mapped(int(pid)) for pid in pids)
    assert not torch_mapped(server.process.pid)


def test_server_concurrent_requests_all_succeed(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model, GUNICORN_THREADS="33")  # one worker may admit all 32
    bodies = [{"prompt": f"Request number {i}", "max_new_tokens": 5 + i % 7} for i in range(32)]
    results = run_concurrently(lambda i: server.post("/generate", bodies[i]), len(bodies))
    assert [r.status_code for r in results] == [200] * len(bodies)
    assert [r.json()["usage"]["completion_tokens"] for r in results] == [b["max_new_tokens"] for b in bodies]
    assert all(r.json()["generated_text"].startswith(b["prompt"]) for r, b in zip(results, bodies))


def test_server_model_load_failure_is_503_and_server_stays_up(start_server, tmp_path):
    missing = tmp_path / "no-model-here"
    server = start_server(MODEL_NAME=str(missing), MODEL_RETRY_SECONDS="0")
    first = server.post("/generate", {"prompt": "hi"})
    assert first.status_code == 503
    assert "could not be loaded" in first.json()["error"]["message"]
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    workers = server.wait_workers(2)
    second = server.post("/generate", {"prompt": "hi"})
    assert second.status_code == 503
    assert server.worker_pids() == workers  # no worker was killed or restarted
    assert server.process.poll() is None


def test_server_recovers_once_the_model_appears(start_server, tiny_model, tmp_path):
    target = tmp_path / "model"
    server = start_server(MODEL_NAME=str(target), MODEL_RETRY_SECONDS="0", WEB_CONCURRENCY="1")
    assert server.post("/generate", {"prompt": "hi"}).status_code == 503
    os.symlink(tiny_model, target)
    response = server.post("/generate", {"prompt": "hi", "max_new_tokens": 3})
    assert response.status_code == 200, response.text


def test_server_without_a_key_refuses_to_start(tiny_model):
    env = server_env(MODEL_NAME=tiny_model, BIND="127.0.0.1:0")
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "set API_KEY" in result.stderr


def test_server_health_answers_after_start_without_loading_the_model(start_server, tiny_model):
    server = start_server(MODEL_NAME=tiny_model)  # returns once /health has answered 200
    assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok"}
    ready = requests.get(server.url + "/ready", timeout=5)
    assert ready.status_code == 503 and "not loaded yet" in ready.json()["error"]["message"]
    assert "loaded model" not in server.log()


def connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections on the server's `port` each process holds, from /proc."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            rows = lines.read().splitlines()[1:]
        for line in rows:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # 01: ESTABLISHED
                established.add(fields[9])  # the socket's inode
    counts = {}
    for pid in pids:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:  # closed meanwhile
                continue
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
        counts[pid] = len(inodes & established)
    return counts


def test_server_splits_keep_alive_connections_evenly_between_workers(start_server):
    # Without least-connections accept, 8 connections opened at once split 4 / 4 about one time in four.
    server = start_server(GUNICORN_THREADS="16")
    pids = server.wait_workers(2)
    port = int(server.url.rsplit(":", 1)[1])
    for _ in range(3):
        sessions = [requests.Session() for _ in range(8)]
        statuses = run_concurrently(lambda i, sessions=sessions: sessions[i].get(server.url + "/health").status_code, 8)
        assert statuses == [200] * 8
        counts = connections_by_pid(pids, port)
        assert sorted(counts.values()) == [4, 4], counts
        for session in sessions:
            session.close()
        deadline = time.monotonic() + 10
        while sum(connections_by_pid(pids, port).values()) and time.monotonic() < deadline:
            time.sleep(0.05)


def test_connection_board_reports_the_fewest_connections_of_other_live_workers():
    from llmapi.gunicorn.board import ConnectionBoard

    board = ConnectionBoard()
    assert board.fewest_elsewhere(board.slot(1)) is None  # alone
    board.publish(board.slot(1), 101, 5)
    board.publish(board.slot(2), 102, 3)
    board.publish(board.slot(3), 103, 4)
    assert board.fewest_elsewhere(board.slot(1)) == 3
    assert board.fewest_elsewhere(board.slot(2)) == 4  # its own count is not a sibling's
    board.clear(board.slot(2), 999)  # another pid: the slot was taken over since, keep it
    assert board.fewest_elsewhere(board.slot(1)) == 3
    board.clear(board.slot(2), 102)
    assert board.fewest_elsewhere(board.slot(1)) == 4
    assert board.slot(1 + ConnectionBoard.SLOTS) == board.slot(1)
