"""Slow and hostile clients: the worker's RequestBuffer, then a real gunicorn with sockets of our own."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import requests
import yaml

from llmapi.config import ConfigError, Settings
from llmapi.gunicorn.reading import HEAD_LIMIT, DeadlineUnreader, RequestBuffer
from tests.conftest import KEY, ROOT, Server
from tests.ops_helpers import error_of, sample

THREADS = 4
READ_TIMEOUT = 2.0
MARGIN = 1.5  # how late after its deadline a connection may be closed (the loop wakes at deadlines; a busy CPU)
MAX_BODY = 1024
SLOW = {
    "WEB_CONCURRENCY": "1",
    "GUNICORN_THREADS": str(THREADS),
    "REQUEST_READ_TIMEOUT": str(READ_TIMEOUT),
    "MAX_BODY_BYTES": str(MAX_BODY),
}
HALF_HEAD = b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl"
SHORT_BODY = (
    b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    + f"x-api-key: {KEY}\r\nContent-Length: 500\r\n\r\n".encode()
    + b'{"prompt": "abc'  # 16 bytes of the 500 promised
)


# RequestBuffer: where a request ends, as its bytes arrive.


def fed(*pieces: bytes, max_body: int = MAX_BODY) -> RequestBuffer:
    """A buffer fed `pieces` one after the other."""
    request = RequestBuffer(0.0, max_body=max_body)
    for piece in pieces:
        request.feed(piece)
    return request


def bytewise(data: bytes) -> list[bytes]:
    """`data` one byte at a time."""
    return [data[i : i + 1] for i in range(len(data))]


def request_bytes(body: bytes = b"", *, headers: str = "") -> bytes:
    """A POST with a Content-Length body."""
    head = f"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n"
    return head.encode() + body


def test_request_buffer_is_whole_at_the_last_byte_of_the_head_or_body():
    for data in (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", request_bytes(b'{"prompt": "hi"}')):
        pieces = bytewise(data)
        assert not fed(*pieces[:-1]).ready
        request = fed(*pieces)
        assert request.whole and request.ready and not request.refused


def test_request_buffer_reads_chunks_to_the_last_one_and_its_trailers():
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    for body in (b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n", b"3\r\nabc\r\n0\r\nTrailer: x\r\n\r\n"):
        pieces = bytewise(head + body)
        assert not fed(*pieces[:-1]).ready
        assert fed(*pieces).whole
    assert fed(head + b"0\r\n\r\n" + b"GET / HTTP/1.1\r\n").whole  # a pipelined request after it stays buffered


def test_request_buffer_leaves_odd_framing_to_gunicorn():
    for data in (
        b"GET / HTTP/1.1\nHost: x\n",  # bare LF
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        request = fed(data)
        assert request.ready and not request.whole and not request.refused, data


def test_request_buffer_passes_on_a_long_body_at_once_for_the_app_to_refuse():
    request = fed(request_bytes(b"x" * (MAX_BODY + 1))[:-MAX_BODY])
    assert request.ready and not request.whole


def test_request_buffer_refuses_a_head_or_a_chunked_body_too_large():
    assert fed(b"GET / HTTP/1.1\r\nX: " + b"a" * HEAD_LIMIT).refused == 431
    chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert fed(chunked + b"%x\r\n" % (MAX_BODY * 2) + b"a" * (MAX_BODY + 1)).refused == 413
    assert not fed(chunked + b"%x\r\n" % (MAX_BODY * 2) + b"a" * 10).refused  # declared is not sent


def test_request_buffer_asks_for_100_continue_only_while_the_body_is_due():
    assert fed(request_bytes(b"x" * 10, headers="Expect: 100-continue\r\n")[:-10]).continue_due
    assert not fed(request_bytes(b"x" * 10, headers="Expect: 100-continue\r\n")).continue_due


def test_a_thread_reading_the_socket_stops_at_the_request_s_deadline():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = DeadlineUnreader(ours)
        theirs.sendall(b"GET")
        reader.deadline = time.monotonic() + 0.3
        assert reader.chunk() == b"GET"
        with pytest.raises(TimeoutError):  # nothing more comes: the wait ends at the deadline, not never
            reader.chunk()
        assert time.monotonic() >= reader.deadline
        assert ours.gettimeout() is None  # the socket is blocking again, for writing the answer
        with pytest.raises(TimeoutError):
            reader.chunk()  # past the deadline: no wait at all


# Real gunicorn: one worker of THREADS threads, REQUEST_READ_TIMEOUT seconds to send a request.


def worker_pid(server: Server) -> int:
    """The pid of the server's only worker."""
    (pid,) = server.wait_workers(1)
    return pid


def usage(pid: int) -> tuple[int, int]:
    """The worker's open file descriptors and threads."""
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


def open_sockets(pid: int) -> int:
    """How many sockets the worker has open."""
    return sum(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:") for fd in os.listdir(f"/proc/{pid}/fd"))


def exchange(server: Server, data: bytes, *, timeout: float = 10) -> bytes:
    """Send raw bytes on a new connection and read until the server closes it."""
    with socket.create_connection(server.url.removeprefix("http://").split(":"), timeout=timeout) as sock:
        sock.sendall(data)
        return read_to_end(sock, timeout)


def read_to_end(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes)."""
    received, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        if not data:
            break
        received += data
    return received


def health_fast(server: Server) -> None:
    """Assert that /health answers 200 within a second, on a fresh connection."""
    host, port = server.url.removeprefix("http://").split(":")
    started = time.monotonic()
    conn = http.client.HTTPConnection(host, int(port), timeout=1)
    try:
        conn.request("GET", "/health", headers={"Connection": "close"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert time.monotonic() - started < 1.0


def generate(server: Server) -> requests.Response:
    """A normal /generate, on a connection of its own."""
    body = {"prompt": "Hello", "max_new_tokens": 2}
    return server.post("/generate", body, headers={"Connection": "close"}, timeout=60)


def metrics(server: Server) -> str:
    """The /metrics page."""
    with requests.get(server.url + "/metrics", headers={"Connection": "close"}, timeout=10) as response:
        return response.text


@contextmanager
def sockets(server: Server, count: int, data: bytes) -> Iterator[list[socket.socket]]:
    """`count` connections that each send `data` and then nothing; closed on the way out."""
    host, port = server.url.removeprefix("http://").split(":")
    opened = []
    try:
        for _ in range(count):
            sock = socket.create_connection((host, int(port)), timeout=10)
            if data:
                sock.sendall(data)
            opened.append(sock)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def closed_by_server(
    opened: list[socket.socket], timeout: float, *, since: float | None = None
) -> dict[socket.socket, tuple[float, bytes]]:
    """Wait for the server to close each socket: when (seconds after `since`, default now) and what it sent."""
    started = time.monotonic() if since is None else since
    received = {sock: b"" for sock in opened}
    closed: dict[socket.socket, tuple[float, bytes]] = {}
    with selectors.DefaultSelector() as selector:
        for sock in opened:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < len(opened) and time.monotonic() - started < timeout:
            for key, _ in selector.select(timeout=0.1):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionError:
                    data = b""
                received[key.fileobj] += data
                if not data:
                    closed[key.fileobj] = (time.monotonic() - started, received[key.fileobj])
                    selector.unregister(key.fileobj)
    return closed


def warmed_up(server: Server, *, model: bool = False) -> tuple[int, tuple[int, int]]:
    """Start every request thread (and load the model); return the worker's pid and its fds and threads then."""
    pid = worker_pid(server)
    if model:
        assert generate(server).status_code == 200
    for _ in range(3):  # requests that arrive together start a thread each (gthread's pool starts them lazily)
        with sockets(server, 3 * THREADS, b"") as burst:
            time.sleep(0.2)  # all accepted: the requests below arrive in one turn of the worker's loop
            for sock in burst:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            closed_by_server(burst, 10)
    metrics(server)
    return pid, quiet(pid)


def quiet(pid: int, *, steady: float = 0.5, timeout: float = 5) -> tuple[int, int]:
    """The worker's fds and threads once they have not changed for `steady` seconds (its last closes done)."""
    deadline, last, since = time.monotonic() + timeout, usage(pid), time.monotonic()
    while time.monotonic() - since < steady and time.monotonic() < deadline:
        time.sleep(0.05)
        if (current := usage(pid)) != last:
            last, since = current, time.monotonic()
    return last


def settled(pid: int, expected: tuple[int, int], timeout: float = 5) -> tuple[int, int]:
    """The worker's fds and threads, once they are `expected` again (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while (current := usage(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return current


def assert_408(data: bytes) -> None:
    """Check a 408 from the main loop: the status line, then the one error shape."""
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), data
    assert b"Connection: close" in head
    error_of(json.loads(body), 408)


@pytest.mark.slow
@pytest.mark.parametrize("sent", [HALF_HEAD, SHORT_BODY], ids=["half-sent heads", "short bodies"])
def test_slow_requests_hold_no_thread_and_are_closed_at_their_deadline(start_server, tiny_model, sent):
    server = start_server(MODEL_NAME=tiny_model, **SLOW)
    pid, before = warmed_up(server, model=True)
    refused_before = sample(metrics(server), "llmapi_connections_refused_total", reason="read_timeout")
    opened = time.monotonic()
    with sockets(server, 3 * THREADS, sent) as slow:
        for _ in range(3):
            health_fast(server)
        assert sample(metrics(server), "llmapi_connections", state="reading") >= 3 * THREADS
        assert generate(server).status_code == 200
        closed = closed_by_server(slow, READ_TIMEOUT + MARGIN + 5, since=opened)
        assert len(closed) == len(slow)
        for when, data in closed.values():
            assert READ_TIMEOUT - 0.05 < when < READ_TIMEOUT + MARGIN  # closed at the deadline, not before
            assert_408(data)
    refused = sample(metrics(server), "llmapi_connections_refused_total", reason="read_timeout")
    assert refused - refused_before == 3 * THREADS
    assert settled(pid, before) == before
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_a_client_that_keeps_trickling_is_closed_at_the_deadline_of_the_whole_request(start_server):
    server = start_server(**SLOW)
    with sockets(server, 1, b"GET /health HTTP/1.1\r\n") as (sock,):
        started, answer = time.monotonic(), b""
        while time.monotonic() - started < READ_TIMEOUT + MARGIN + 5:  # a byte every 0.2 s: no recv() waits long
            try:
                sock.sendall(b"X")
                sock.settimeout(0.2)
                answer += sock.recv(65536)
                break  # the server answered (or closed: b"")
            except TimeoutError:
                continue
            except OSError:
                break
        assert READ_TIMEOUT - 0.2 < time.monotonic() - started < READ_TIMEOUT + MARGIN
        assert answer.startswith(b"HTTP/1.1 408 ")


@pytest.mark.slow
def test_idle_connections_hold_no_thread(start_server):
    server = start_server(**SLOW)
    pid, before = warmed_up(server)
    opened = time.monotonic()
    with sockets(server, 3 * THREADS, b"") as silent, sockets(server, 3 * THREADS, b"") as kept:
        for sock in kept:  # one request each, then kept alive between requests, as gthread parks them
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        health_fast(server)
        closed = closed_by_server(silent, READ_TIMEOUT + MARGIN + 5, since=opened)
        assert len(closed) == len(silent)
        assert all(data == b"" for _, data in closed.values())  # a connection that said nothing gets no answer
        assert max(when for when, _ in closed.values()) < READ_TIMEOUT + MARGIN
        health_fast(server)
    assert settled(pid, before) == before


@pytest.mark.slow
def test_clients_that_never_close_do_not_stall_the_worker(start_server):
    # gthread's close_graceful waits on the main loop for the client to close: 2 s each, one after the other.
    server = start_server(**SLOW)
    pid, before = warmed_up(server)
    with sockets(server, 8, b"GET /health HTTP/1.0\r\n\r\n") as lingering:
        time.sleep(0.3)
        health_fast(server)
        closed = closed_by_server(lingering, 10)
        assert all(data.startswith(b"HTTP/1.0 200 ") for _, data in closed.values())
    assert settled(pid, before) == before


@pytest.mark.slow
def test_whole_requests_are_served_as_before(start_server):
    server = start_server(**SLOW)
    auth = f"x-api-key: {KEY}\r\nContent-Type: application/json\r\n"
    invalid = b'{"prompt": ""}'  # read, parsed and refused by the schema: no model needed
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    two = exchange(server, health + health.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert two.count(b"HTTP/1.1 200 ") == 2  # pipelined
    chunked = f"POST /generate HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(invalid), invalid)
    assert exchange(server, chunked.encode() + body).startswith(b"HTTP/1.1 422 ")
    many_headers = "".join(f"X-H{i}: {i}\r\n" for i in range(200))
    crowded = f"GET /health HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n".encode()
    assert exchange(server, crowded).startswith(b"HTTP/1.1 431")
    assert exchange(server, b"GET /" + b"a" * 16_384 + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 414")
    too_long = f"POST /generate HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {MAX_BODY * 4}\r\n\r\n".encode()
    assert exchange(server, too_long + b"{").startswith(b"HTTP/1.1 413 ")  # at once, and closed
    big_chunk = chunked.encode() + b"%x\r\n" % (MAX_BODY * 4) + b"a" * (MAX_BODY * 2)
    answer = exchange(server, big_chunk)
    assert answer.startswith(b"HTTP/1.1 413 ")
    error_of(json.loads(answer.partition(b"\r\n\r\n")[2]), 413)
    assert "Traceback" not in server.log()


@pytest.mark.slow
def test_a_body_sent_after_100_continue_and_byte_by_byte_is_read(start_server):
    server = start_server(**SLOW)
    body = b'{"prompt": ""}'
    head = (
        f"POST /generate HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(server.url.removeprefix("http://").split(":"), timeout=5) as sock:
        sock.sendall(head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        for byte in bytewise(body):
            sock.sendall(byte)
            time.sleep(0.01)
        assert b"HTTP/1.1 422 " in read_to_end(sock, 10)


@pytest.mark.slow
def test_deep_json_and_huge_integers_get_400_on_every_route(start_server):
    server = start_server(**{**SLOW, "MAX_BODY_BYTES": "262144"})
    routes = {
        "/generate": ('{"prompt": "hi", "max_new_tokens": %s}', "max_new_tokens"),
        "/v1/completions": ('{"prompt": "hi", "max_tokens": %s}', "max_tokens"),
        "/v1/chat/completions": ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}', "max_tokens"),
    }
    headers = {"x-api-key": KEY, "Content-Type": "application/json"}
    for path, (template, field) in routes.items():
        for value, param in ("[" * 50_000 + "]" * 50_000, None), ("9" * 5_000, field):
            response = requests.post(server.url + path, data=template % value, headers=headers, timeout=10)
            assert error_of(response.json(), 400)["param"] == param, (path, response.text)


@pytest.mark.slow
def test_connections_past_the_cap_wait_in_the_backlog(start_server):
    cap = THREADS + 2
    server = start_server(**SLOW, MAX_CONNECTIONS=str(cap))
    pid = worker_pid(server)
    assert sample(metrics(server), "llmapi_connection_capacity") == cap
    time.sleep(0.3)  # the scrape's connection closes
    idle = open_sockets(pid)
    with sockets(server, cap + 4, b"") as flood:
        time.sleep(0.5)
        assert open_sockets(pid) - idle == cap  # the other 4 wait in the kernel's backlog, not in the worker
        closed = closed_by_server(flood, 2 * (READ_TIMEOUT + MARGIN) + 5)
        assert len(closed) == cap + 4  # each in turn, once accepted, within its own read timeout
        assert max(when for when, _ in closed.values()) < 2 * (READ_TIMEOUT + MARGIN)
    health_fast(server)
    assert sample(metrics(server), "llmapi_connection_limit_reached_total") >= 1


def test_read_settings_are_checked():
    with pytest.raises(ConfigError, match="REQUEST_READ_TIMEOUT"):
        Settings.from_env({"API_KEY": "k", "REQUEST_READ_TIMEOUT": "0"})
    with pytest.raises(ConfigError, match="MAX_CONNECTIONS"):
        Settings.from_env({"API_KEY": "k", "GUNICORN_THREADS": "8", "MAX_CONNECTIONS": "8"})


def test_nginx_reads_requests_with_the_app_s_deadline():
    template = (ROOT / "deploy" / "nginx" / "llmapi.conf.template").read_text()
    for directive in ("client_header_timeout", "client_body_timeout"):
        assert f"{directive} ${{REQUEST_READ_TIMEOUT}}s;" in template
    loader = type("ComposeLoader", (yaml.SafeLoader,), {})
    loader.add_constructor("!reset", lambda _loader, _node: None)  # Compose's own tag
    services = yaml.load((ROOT / "docker-compose.scale.yml").read_text(), Loader=loader)["services"]
    app, nginx = services["llmapi"]["environment"], services["nginx"]["environment"]
    assert nginx["REQUEST_READ_TIMEOUT"] == app["REQUEST_READ_TIMEOUT"] == "${REQUEST_READ_TIMEOUT:-10}"
    assert Settings.request_read_timeout == 10  # the compose files' default is the app's
