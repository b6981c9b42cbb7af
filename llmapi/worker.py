"""The gunicorn side, used by gunicorn.conf.py: a worker that reads requests before a thread gets them and stops
cleanly, JSON logs, the metrics directory."""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import resource
import selectors
import shutil
import socket
import struct
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from gunicorn import util
from gunicorn.glogging import Logger
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn
from gunicorn.workers.gthread import ThreadWorker as GthreadWorker
from prometheus_client import multiprocess

from llmapi.errors import error_body
from llmapi.logs import JsonFormatter, iso_time
from llmapi.metrics import EXTENSION as METRICS_EXTENSION
from llmapi.runtime.service import EXTENSION as ENGINE_EXTENSION

METRICS_DIR_PREFIX = "llmapi-metrics-"


class ConnectionBoard:
    """Each worker's open connections, in memory that the master maps before it forks the workers.

    A worker's slot is its age (gunicorn numbers workers as it forks them) modulo SLOTS; it holds the worker's pid
    and its count of open connections, written by the worker alone (aligned 8-byte writes), read by the others.
    """

    SLOTS = 64
    ENTRY = struct.Struct("qq")  # pid, open connections

    def __init__(self) -> None:
        self.memory = mmap.mmap(-1, self.SLOTS * self.ENTRY.size)  # anonymous and shared: forked workers see it

    def slot(self, age: int) -> int:
        """The slot of the worker of this age."""
        return age % self.SLOTS

    def publish(self, slot: int, pid: int, connections: int) -> None:
        """Record a worker's open connections."""
        self.ENTRY.pack_into(self.memory, slot * self.ENTRY.size, pid, connections)

    def clear(self, slot: int, pid: int) -> None:
        """Forget the worker in `slot` if it is still `pid` (the master calls this when a worker exits)."""
        if self.ENTRY.unpack_from(self.memory, slot * self.ENTRY.size)[0] == pid:
            self.ENTRY.pack_into(self.memory, slot * self.ENTRY.size, 0, 0)

    def fewest_elsewhere(self, slot: int) -> int | None:
        """The fewest open connections of any other live worker (None when there is none)."""
        counts = [
            connections
            for index, (pid, connections) in enumerate(self.ENTRY.iter_unpack(self.memory))
            if pid and index != slot
        ]
        return min(counts) if counts else None


_board: ConnectionBoard | None = None
# How long a worker leaves a waiting connection to a sibling with fewer connections before taking it itself (the
# sibling may be stopping, or slow to wake up), and how long it sleeps between two looks.
ACCEPT_DEFER_S = 0.02
ACCEPT_DEFER_STEP_S = 0.0005
FD_HEADROOM = 128  # files a worker has open besides its connections: listeners, pipes, model and metrics files


def make_connection_board() -> None:
    """Create the board the workers forked from now on share (from gunicorn's on_starting hook)."""
    global _board
    _board = ConnectionBoard()


def forget_worker(age: int, pid: int) -> None:
    """Clear an exited worker's slot (from gunicorn's child_exit hook)."""
    if _board is not None:
        _board.clear(_board.slot(age), pid)


# Reading requests on the main loop (slow clients). See ThreadWorker for why.
HEAD_LIMIT = 64 * 1024  # most bytes of a head (request line and headers) read while looking for its end
READ_CHUNK = 64 * 1024  # most bytes read from one connection per turn of the loop
LINGER_S = 2.0  # as gunicorn's util.close_graceful: how long a closing connection may still send...
LINGER_MAX_BYTES = 64 * 1024  # ...and how much
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The answers of the main loop to a request it does not pass on: reason phrase, metrics label, message.
REFUSALS = {
    408: ("Request Timeout", "read_timeout", "The request did not arrive within {timeout:g} s (REQUEST_READ_TIMEOUT)."),
    413: ("Content Too Large", "body_too_large", "The request body is larger than {max_body} bytes."),
    431: ("Request Header Fields Too Large", "head_too_large", "The request head is larger than {head} bytes."),
}


@dataclass(frozen=True)
class ReadLimits:
    """How long a client has to send a whole request, and the largest body the app accepts."""

    timeout: float = 10.0
    max_body: int = 262_144


_limits = ReadLimits()


def configure_reading(*, timeout: float, max_body: int) -> None:
    """Set REQUEST_READ_TIMEOUT and MAX_BODY_BYTES for the workers forked from now on (from on_starting)."""
    global _limits
    _limits = ReadLimits(timeout=timeout, max_body=max_body)


def refusal(status: int) -> bytes:
    """The whole response the main loop answers a request it will not pass on with, then closes."""
    reason, _, message = REFUSALS[status]
    text = message.format(timeout=_limits.timeout, max_body=_limits.max_body, head=HEAD_LIMIT)
    body = json.dumps(error_body(text, status=status)).encode()
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"Connection: close\r\n\r\n" + body


def _bare_lf(data: bytearray, start: int, stop: int) -> bool:
    """Whether an LF in data[start:stop] ends a line without a CR before it."""
    at = data.find(b"\n", start, stop)
    while at >= 0:
        if at == 0 or data[at - 1] != 13:  # 13: CR
            return True
        at = data.find(b"\n", at + 1, stop)
    return False


def _chunk_size(line: bytes) -> int | None:
    """The size on a chunk's size line (extensions ignored), or None when it is not hexadecimal."""
    digits = line.split(b";", 1)[0].strip()
    if not digits or digits.strip(b"0123456789abcdefABCDEF"):
        return None
    return int(digits, 16)


def _recv(sock: socket.socket) -> bytes | None:
    """Read what has arrived without blocking: None when nothing has, b"" when the client closed or failed."""
    try:
        return sock.recv(READ_CHUNK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class RequestBuffer:
    """One request's bytes as they arrive on a worker's main loop, and whether they make a whole request yet.

    It reads HTTP/1.1's framing only as far as it needs to know where a request ends: the blank line after
    the head, then Content-Length bytes, or chunks up to the last one and its trailers. Anything odd there
    (two lengths, an unknown coding, a bare LF) is gunicorn's parser's to refuse, with nothing more to read:
    the request is `ready` as soon as the oddity is seen. A body over MAX_BODY_BYTES with a Content-Length is
    ready at once too (the app answers 413 without reading it); a chunked one, or a head past HEAD_LIMIT, is
    `refused` here (413, 431). Scans resume where the last one stopped, so a client that sends a byte at a
    time costs each byte once.
    """

    def __init__(self, deadline: float, *, max_body: int) -> None:
        self.deadline = deadline
        self.max_body = max_body
        self.data = bytearray()
        self.whole = False  # the request has arrived up to its last byte
        self.ready = False  # a thread may take it: it is whole, or gunicorn or the app refuses it as it is
        self.refused: int | None = None  # the status the main loop answers it with instead
        self.continue_due = False  # the client waits for "100 Continue" before it sends the body
        self._head_end = -1
        self._body_end = -1  # Content-Length: where the body ends
        self._chunk_at = -1  # chunked: where the next size line starts
        self._chunked_bytes = 0  # chunked: body bytes of the chunks before it
        self._trailers_at = -1  # chunked: where the last chunk's size line ends
        self._scan_from = 0  # chunked: where the search for the end of a size line or of the trailers resumes

    def feed(self, chunk: bytes) -> None:
        """Add bytes read from the client and see whether the request is now whole."""
        start = len(self.data)
        self.data += chunk
        if self._head_end < 0:
            end = self.data.find(b"\r\n\r\n", max(0, start - 3))
            if _bare_lf(self.data, start, end if end >= 0 else len(self.data)):
                self.ready = True  # gunicorn refuses a bare LF at once
            elif end < 0:
                self.refused = 431 if len(self.data) > HEAD_LIMIT else None
            else:
                self._head_end = end + 4
                self._frame(bytes(self.data[:end]))
        if self._head_end >= 0 and not (self.ready or self.refused):
            self._find_end()
        self.continue_due = self.continue_due and not (self.ready or self.refused)

    def _frame(self, head: bytes) -> None:
        """Read how the body is framed, and whether the client waits for 100 Continue."""
        lengths, codings, expect = set(), [], b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.lower(), value.strip().lower()
            if name == b"content-length":
                lengths.add(value)
            elif name == b"transfer-encoding":
                codings.extend(coding.strip() for coding in value.split(b","))
            elif name == b"expect":
                expect = value
        if codings:
            self._chunk_at = self._head_end
            self.ready = codings[-1] != b"chunked"  # gunicorn refuses other codings
        elif len(lengths) > 1 or not all(length.isdigit() for length in lengths):
            self.ready = True  # gunicorn refuses these
        else:
            length = int(lengths.pop()) if lengths else 0
            self._body_end = self._head_end + length
            self.ready = length > self.max_body  # the app answers 413 without reading the body
        self.continue_due = expect == b"100-continue"

    def _find_end(self) -> None:
        """See whether the body has arrived to its end."""
        if self._body_end >= 0:
            self.whole = self.ready = len(self.data) >= self._body_end
        else:
            self._find_last_chunk()

    def _find_last_chunk(self) -> None:
        """Walk the chunks that have arrived, up to the last one and the blank line that ends its trailers."""
        data = self.data
        while self._trailers_at < 0:
            eol = data.find(b"\r\n", max(self._chunk_at, self._scan_from))
            if eol < 0:
                self._scan_from = len(data) - 1
                self.ready = len(data) - self._chunk_at > HEAD_LIMIT  # no size line is that long: let gunicorn say
                return
            size = _chunk_size(bytes(data[self._chunk_at : eol]))
            if size is None:
                self.ready = True  # gunicorn refuses it
                return
            if size == 0:
                self._trailers_at = self._scan_from = eol
                break
            if self._chunked_bytes + min(size, len(data) - eol - 2) > self.max_body:
                self.refused = 413
                return
            following = eol + 2 + size + 2  # the chunk's data and its CRLF
            if len(data) < following:
                return
            self._chunk_at = following
            self._chunked_bytes += size
        end = data.find(b"\r\n\r\n", self._scan_from)
        self._scan_from = max(self._trailers_at, len(data) - 3)
        self.whole = self.ready = end >= 0
        self.ready = self.ready or len(data) - self._trailers_at > HEAD_LIMIT  # trailers no longer than a head


class DeadlineUnreader(SocketUnreader):
    """gunicorn's socket reader with the request's read deadline on every recv(): a thread's backstop.

    The main loop hands a thread only whole requests, so the thread reads them from the buffer; a thread
    reads the socket only for a request gunicorn or the app refuses, or where RequestBuffer read the framing
    otherwise than gunicorn's parser does. Even then it waits no longer than the request's deadline.
    """

    deadline = math.inf

    def chunk(self, size_hint: int | None = None) -> bytes:
        """Read from the socket, for at most the time left before the deadline."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "request not read within REQUEST_READ_TIMEOUT")
        prior = self.sock.gettimeout()  # gunicorn's body drain sets one of its own
        self.sock.settimeout(remaining if prior is None else min(prior, remaining))
        try:
            return super().chunk(size_hint)
        finally:
            self.sock.settimeout(prior)


class Connection(TConn):
    """gthread's connection, with the request the main loop is reading (or has read) on it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.request: RequestBuffer | None = None  # being read, or read and not yet parsed
        self.whole = True  # whether the main loop read the last request passed on to the end


@dataclass
class Closing:
    """A connection whose answer has been sent, waiting for the client to close its side."""

    deadline: float
    drained: int = 0


class ThreadWorker(GthreadWorker):
    """gthread that reads each request on its main loop before a thread gets it, closes connections without
    blocking that loop, lets go of the listening sockets as soon as it stops, and leaves a new connection to
    a sibling that has fewer (least-connections accept).

    Slow clients. gthread hands a new connection to a thread, which waits up to 5 s for its first bytes
    (gthread's DEFAULT_WORKER_DATA_TIMEOUT) and then blocks in recv() for the rest of the head and for the
    body, as long as the client likes: GUNICORN_THREADS connections that send half a request hold every
    thread, /health's included. A per-recv() timeout would not help, since a client that sends a byte now and
    then never trips it. Here the main loop reads the request itself, without blocking, as its bytes arrive
    (RequestBuffer says when they are all there), and a thread gets the connection only with the whole
    request in memory, which gunicorn's parser then reads from its buffer without waiting on the client. A
    request that is not whole REQUEST_READ_TIMEOUT after its first byte (after the accept, on a new
    connection) is answered 408 and closed by the main loop; a thread never waited for it. A keep-alive
    connection between two requests waits in the selector, as in gthread, for at most `keepalive` seconds.
    Relied on in gunicorn 27.0.1's gthread.py: every connection reaches a thread through enqueue_req() (from
    accept, from the selector when a kept-alive one becomes readable, and from finish_request when bytes of a
    pipelined request are already buffered); a TConn with data_ready set skips the wait in handle(); its
    parser reads everything through parser.unreader, whose unread() bytes come first; finish_request() runs
    on the main loop. Not with TLS, HTTP/2 or the PROXY protocol (none is used): their bytes are not HTTP/1's,
    and this worker is then gthread as it is.

    Closing. gthread closes a connection it will not keep alive with util.close_graceful() on the main loop,
    which waits up to 2 s for the client to close its side: eight clients that never do froze the worker (and
    /health) for 16 s. Here the same lingering close (FIN, then read what the client still sends, for 2 s or
    64 KiB at most) waits in the selector.

    Stopping. gunicorn's master closes its copy of the listening socket on SIGTERM, but each worker keeps its
    own until it has finished its requests: meanwhile new connections wait unanswered in the kernel's backlog
    and are reset at the end. Closed at once by every process, the socket refuses them straight away, so a
    client or a proxy (nginx: proxy_next_upstream) can go elsewhere at once.

    Least-connections accept. Every worker is woken by a new connection and the first to call accept() gets
    it, so the split of keep-alive connections (which stay with the worker that accepted them) is a matter of
    chance: 8 clients came out 5 / 3 or 6 / 2 as often as 4 / 4, leaving one worker's batch short and the
    other's requests waiting. Here a worker with more open connections than a sibling waits a moment
    (ACCEPT_DEFER_S at most) for that sibling to take the connection.

    Open connections (reading, in a thread, kept alive or closing) count against worker_connections
    (MAX_CONNECTIONS): at the cap gthread stops accepting, and new connections wait in the kernel's backlog,
    costing this worker nothing until one closes.
    """

    _slot: int | None = None
    _deferring_since: float | None = None
    _accept_called = False
    _reads_requests = False
    _fd_warned_at = -math.inf

    def init_process(self) -> None:
        """Take this worker's slot on the connection board, make room for its connections, run gthread's loop."""
        self._arriving: dict[Connection, RequestBuffer] = {}
        self._closing: dict[Connection, Closing] = {}
        self._next_expiry = math.inf
        self._counted: tuple[int, ...] = ()
        cfg = self.cfg
        self._reads_requests = not cfg.is_ssl and "h2" not in cfg.http_protocols and cfg.proxy_protocol == "off"
        self._raise_fd_limit()
        if _board is not None:
            self._slot = _board.slot(self.age)
            _board.publish(self._slot, os.getpid(), 0)
        super().init_process()

    def _raise_fd_limit(self) -> None:
        """Raise the soft limit on open files so that worker_connections fit, as far as the hard limit allows."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = self.worker_connections + FD_HEADROOM
        if soft == resource.RLIM_INFINITY or soft >= wanted:
            return
        allowed = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
        resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
        if allowed < wanted:
            self.log.warning("open files limited to %s: MAX_CONNECTIONS %s may not fit", allowed, wanted - FD_HEADROOM)

    def set_accept_enabled(self, enabled: bool) -> None:
        """Stop (or start) accepting; when stopping for good, close the listeners and leave the board."""
        if not enabled and self.alive and self._accepting:
            self._observe("limit")  # gthread's loop stops accepting at worker_connections
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()  # idempotent: gunicorn closes them again on its way out
            if _board is not None and self._slot is not None:
                _board.clear(self._slot, os.getpid())
                self._slot = None
            self._cap_arrivals(time.monotonic() + STOP_KEEPALIVE_LINGER)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Publish this worker's open connections, wait for and handle events as gthread does, expire the late."""
        self._publish()
        self._accept_called = False
        super().wait_for_and_dispatch_events(min(timeout, max(0.0, self._next_expiry - time.monotonic())))
        if not self._accept_called:  # nobody is waiting to be accepted any more
            self._deferring_since = None
        if time.monotonic() >= self._next_expiry:
            self._expire()

    def accept(self, listener: Any) -> None:
        """Accept a waiting connection (unless a sibling with fewer should have it) and start reading it."""
        self._accept_called = True
        if self._defer():
            time.sleep(ACCEPT_DEFER_STEP_S)  # the loop comes back while the connection is still waiting
            return
        self._deferring_since = None
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._out_of_files(exc)
            elif exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(Connection(self.cfg, client, address, listener.getsockname()))
        self._publish()

    def _out_of_files(self, exc: OSError) -> None:
        """Leave the connection in the backlog for a moment instead of dying (gthread's accept raises)."""
        now = time.monotonic()
        if now - self._fd_warned_at > 10:
            self._fd_warned_at = now
            self.log.warning("cannot accept: %s (%s open connections)", exc.strerror, self.nr_conns)
        time.sleep(ACCEPT_DEFER_S)

    def enqueue_req(self, conn: Any) -> None:
        """Read the connection's next request on this loop; a thread gets the connection once all of it is here."""
        if not self._reads_requests:
            super().enqueue_req(conn)
            return
        request = RequestBuffer(time.monotonic() + _limits.timeout, max_body=_limits.max_body)
        conn.request = request
        conn.sock.setblocking(False)
        self._arriving[conn] = request
        self._next_expiry = min(self._next_expiry, request.deadline)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))
        pipelined = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        if pipelined:  # read ahead with the last request: gunicorn's parser must not wait for its end on a thread
            self._take(conn, pipelined)

    def _on_readable(self, conn: Connection, _sock: Any) -> None:
        """Read what the client sent (once per turn of the loop, so that every connection gets its turn)."""
        if conn not in self._arriving:  # passed on or closed earlier in this turn of the loop
            return
        data = _recv(conn.sock)
        if data is None:
            return
        if data:
            self._take(conn, data)
        else:  # the client went away: a new or kept-alive connection closed, or a request cut short
            self._close(conn)

    def _take(self, conn: Connection, data: bytes) -> None:
        """Add bytes to the request being read; pass it on once it is whole, or refuse it."""
        request = self._arriving[conn]
        request.feed(data)
        if request.refused:
            self._refuse(conn, request.refused)
        elif request.ready:
            del self._arriving[conn]
            self.poller.unregister(conn.sock)
            conn.data_ready = True  # gthread's handle() then parses at once instead of waiting for data
            super().enqueue_req(conn)
        elif request.continue_due:
            request.continue_due = False
            self._send(conn, CONTINUE)

    def handle(self, conn: Any) -> Any:
        """On a thread: give gunicorn's parser the request read by the main loop, then handle it as gthread does."""
        request, conn.request = getattr(conn, "request", None), None
        if request is not None:
            conn.sock.setblocking(True)
            conn.init()  # gthread's handle() does it too; here first, for the parser
            unreader = conn.parser.unreader
            if not isinstance(unreader, DeadlineUnreader):
                unreader = conn.parser.unreader = DeadlineUnreader(conn.sock)
            unreader.deadline = request.deadline
            unreader.unread(bytes(request.data))
            conn.whole = request.whole
        return super().handle(conn)

    def _keepalive_after(self, conn: Any, keepalive: bool) -> bool:
        """Keep a connection only if its request was read to the end: never drain a body on a thread."""
        if keepalive and not getattr(conn, "whole", True):
            return False
        return super()._keepalive_after(conn, keepalive)

    def finish_request(self, conn: Any, fs: Future) -> None:
        """After a thread is done with a connection: keep it as gthread does, or close it without blocking."""
        if self._reads_requests and not fs.cancelled() and fs.exception() is None and not fs.result():
            self._linger(conn)
            return
        super().finish_request(conn, fs)

    def _refuse(self, conn: Connection, status: int) -> None:
        """Answer a request the main loop will not pass on (408, 413, 431), then close."""
        self._arriving.pop(conn, None)
        self.poller.unregister(conn.sock)
        self._send(conn, refusal(status))
        self._observe(REFUSALS[status][1])
        self._linger(conn)

    def _send(self, conn: Connection, data: bytes) -> None:
        """Send a short answer without blocking; the socket's buffer takes it whole (or the client is gone)."""
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def _linger(self, conn: Connection) -> None:
        """Close as util.close_graceful does (FIN, then drain what the client still sends), in the selector."""
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        closing = Closing(deadline=time.monotonic() + LINGER_S)
        self._closing[conn] = closing
        self._next_expiry = min(self._next_expiry, closing.deadline)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_lingering, conn))

    def _on_lingering(self, conn: Connection, _sock: Any) -> None:
        """Drain a closing connection; close it when the client has closed its side or sent too much."""
        if conn not in self._closing:
            return
        data = _recv(conn.sock)
        if data is None:
            return
        self._closing[conn].drained += len(data)
        if not data or self._closing[conn].drained >= LINGER_MAX_BYTES:
            self._close(conn)

    def _close(self, conn: Connection) -> None:
        """Close a connection that is being read or closed on the main loop."""
        self._arriving.pop(conn, None)
        self._closing.pop(conn, None)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        util.close(conn.sock)
        self.nr_conns -= 1

    def _expire(self) -> None:
        """Answer 408 to requests past their deadline (close silent ones), close lingering ones past theirs."""
        now = time.monotonic()
        for conn, request in [(conn, request) for conn, request in self._arriving.items() if request.deadline <= now]:
            if request.data:
                self._refuse(conn, 408)
            else:  # a connection that never said anything gets no answer
                self._close(conn)
        for conn in [conn for conn, closing in self._closing.items() if closing.deadline <= now]:
            self._close(conn)
        deadlines = [r.deadline for r in self._arriving.values()] + [c.deadline for c in self._closing.values()]
        self._next_expiry = min(deadlines, default=math.inf)

    def _cap_arrivals(self, deadline: float) -> None:
        """When stopping: give connections that have not started a request until `deadline` (as gthread's idle ones)."""
        for request in self._arriving.values():
            if not request.data:
                request.deadline = min(request.deadline, deadline)
                self._next_expiry = min(self._next_expiry, request.deadline)

    def _defer(self) -> bool:
        """Whether to leave the waiting connection to a sibling for now."""
        if _board is None or self._slot is None:
            return False
        fewest = _board.fewest_elsewhere(self._slot)
        if fewest is None or self.nr_conns <= fewest:
            return False
        now = time.monotonic()
        if self._deferring_since is None:
            self._deferring_since = now
        return now - self._deferring_since < ACCEPT_DEFER_S

    def _publish(self) -> None:
        """Write this worker's open connections on the board and, by state, in the metrics."""
        if _board is not None and self._slot is not None:
            _board.publish(self._slot, os.getpid(), self.nr_conns)
        counts = (len(self._arriving), len(self.keepalived_conns), len(self._closing), self.nr_conns)
        if counts != self._counted and (metrics := self._metrics()) is not None:
            self._counted = counts
            reading, idle, closing, total = counts
            for state, count in ("reading", reading), ("idle", idle), ("closing", closing):
                metrics.connections.labels(state).set(count)
            metrics.connections.labels("active").set(total - reading - idle - closing)

    def _observe(self, event: str) -> None:
        """Count a connection refused by the main loop (by reason), or the worker reaching MAX_CONNECTIONS."""
        if (metrics := self._metrics()) is None:
            return
        if event == "limit":
            metrics.connection_limit_reached.inc()
        else:
            metrics.connections_refused.labels(event).inc()

    def _metrics(self) -> Any:
        """The app's metrics, once gunicorn has loaded the app in this worker."""
        return getattr(getattr(self, "wsgi", None), "extensions", {}).get(METRICS_EXTENSION)


class JsonLogger(Logger):
    """gunicorn's logger with LOG_FORMAT=json: the error log and the access log as one JSON object a line."""

    def setup(self, cfg: Any) -> None:
        """Set gunicorn's handlers up, then make the error log JSON (access lines are built in access())."""
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: Any) -> None:
        """Log one request as JSON, with its id; the query string is left out (keys never belong in URLs)."""
        if not self.access_log_enabled:
            return
        atoms = self.atoms(resp, req, environ, request_time)
        entry = {
            "time": iso_time(time.time()),
            "level": "info",
            "logger": "gunicorn.access",
            "pid": os.getpid(),
            "request_id": atoms.get("{x-request-id}o"),
            "remote": atoms["h"],
            "method": atoms["m"],
            "path": atoms["U"],
            "status": int(atoms["s"]) if str(atoms["s"]).isdigit() else atoms["s"],
            "bytes": atoms["B"],
            "duration_ms": atoms["M"],
            "user_agent": atoms["a"],
        }
        self.access_log.info(json.dumps(entry, ensure_ascii=False))


def prepare_metrics_dir(configured: str) -> tuple[Path, bool]:
    """Return an empty directory for prometheus_client's files, and whether we made it (and so remove it)."""
    if not configured:
        return Path(tempfile.mkdtemp(prefix=METRICS_DIR_PREFIX)), True
    path = Path(configured)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # left by an earlier run: counters would start from its values
        stale.unlink()
    return path, False


def mark_worker_dead(pid: int, path: Path) -> None:
    """Drop a dead worker's live gauges (in flight, capacity, models loaded); its counters stay summed."""
    multiprocess.mark_process_dead(pid, str(path))


def remove_metrics_dir(path: Path) -> None:
    """Remove the directory made by prepare_metrics_dir."""
    shutil.rmtree(path, ignore_errors=True)


def warm_up(app: Any) -> None:
    """Start loading the worker's model in the background (WARMUP=true)."""
    app.extensions[ENGINE_EXTENSION].warm()
