"""The gthread worker's overrides (ThreadWorker); its parts live in reading.py, board.py and hooks.py.

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

from __future__ import annotations

import errno
import math
import os
import resource
import selectors
import socket
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn
from gunicorn.workers.gthread import ThreadWorker as GthreadWorker

from llmapi.gunicorn import board
from llmapi.gunicorn.hooks import ConnectionMetrics
from llmapi.gunicorn.reading import (
    CONTINUE,
    LINGER_MAX_BYTES,
    LINGER_S,
    REFUSALS,
    DeadlineUnreader,
    RequestBuffer,
    limits,
    recv,
    refusal,
    send_quietly,
)

FD_HEADROOM = 128  # files a worker has open besides its connections: listeners, pipes, model and metrics files


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

    The why of each, in this module's docstring.
    """

    _slot: int | None = None
    _accept_called = False
    _reads_requests = False
    _fd_warned_at = -math.inf

    def init_process(self) -> None:
        """Take this worker's slot on the connection board, make room for its connections, run gthread's loop."""
        self._arriving: dict[Connection, RequestBuffer] = {}
        self._closing: dict[Connection, Closing] = {}
        self._next_expiry = math.inf
        self._metrics = ConnectionMetrics(self)
        self._deferral = board.Deferral()
        cfg = self.cfg
        self._reads_requests = not cfg.is_ssl and "h2" not in cfg.http_protocols and cfg.proxy_protocol == "off"
        raise_fd_limit(self.worker_connections, self.log)
        if (shared := board.shared()) is not None:
            self._slot = shared.slot(self.age)
            shared.publish(self._slot, os.getpid(), 0)
        super().init_process()

    def set_accept_enabled(self, enabled: bool) -> None:
        """Stop (or start) accepting; when stopping for good, close the listeners and leave the board."""
        if not enabled and self.alive and self._accepting:
            self._metrics.count("limit")  # gthread's loop stops accepting at worker_connections
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()  # idempotent: gunicorn closes them again on its way out
            if (shared := board.shared()) is not None and self._slot is not None:
                shared.clear(self._slot, os.getpid())
                self._slot = None
            # Connections that have not started a request get until then, as gthread's idle ones.
            deadline = time.monotonic() + STOP_KEEPALIVE_LINGER
            for request in self._arriving.values():
                if not request.data:
                    request.deadline = min(request.deadline, deadline)
                    self._next_expiry = min(self._next_expiry, request.deadline)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Publish this worker's open connections, wait for and handle events as gthread does, expire the late."""
        self._publish()
        self._accept_called = False
        super().wait_for_and_dispatch_events(min(timeout, max(0.0, self._next_expiry - time.monotonic())))
        if not self._accept_called:  # nobody is waiting to be accepted any more
            self._deferral.since = None
        if time.monotonic() >= self._next_expiry:
            self._expire()

    def accept(self, listener: Any) -> None:
        """Accept a waiting connection (unless a sibling with fewer should have it) and start reading it."""
        self._accept_called = True
        if self._deferral.defer(board.shared(), self._slot, self.nr_conns):
            time.sleep(board.ACCEPT_DEFER_STEP_S)  # the loop comes back while the connection is still waiting
            return
        self._deferral.since = None
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._fd_warned_at = wait_out_of_files(exc, self.nr_conns, self.log, warned_at=self._fd_warned_at)
            elif exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self.enqueue_req(Connection(self.cfg, client, address, listener.getsockname()))
        self._publish()

    def enqueue_req(self, conn: Any) -> None:
        """Read the connection's next request on this loop; a thread gets the connection once all of it is here."""
        if not self._reads_requests:
            super().enqueue_req(conn)
            return
        request = RequestBuffer(time.monotonic() + limits().timeout, max_body=limits().max_body)
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
        data = recv(conn.sock)
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
            send_quietly(conn.sock, CONTINUE)

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
        send_quietly(conn.sock, refusal(status))
        self._metrics.count(REFUSALS[status][1])
        self._linger(conn)

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
        data = recv(conn.sock)
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

    def _publish(self) -> None:
        """Write this worker's open connections on the board and, by state, in the metrics."""
        if (shared := board.shared()) is not None and self._slot is not None:
            shared.publish(self._slot, os.getpid(), self.nr_conns)
        self._metrics.show(len(self._arriving), len(self.keepalived_conns), len(self._closing), self.nr_conns)


def raise_fd_limit(connections: int, log: Any) -> None:
    """Raise the soft limit on open files so that `connections` fit, as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + FD_HEADROOM
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    allowed = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
    if allowed < wanted:
        log.warning("open files limited to %s: MAX_CONNECTIONS %s may not fit", allowed, wanted - FD_HEADROOM)


def wait_out_of_files(exc: OSError, connections: int, log: Any, *, warned_at: float) -> float:
    """Leave the connection in the backlog for a moment instead of dying (gthread's accept raises); when last warned."""
    now = time.monotonic()
    if now - warned_at > 10:
        warned_at = now
        log.warning("cannot accept: %s (%s open connections)", exc.strerror, connections)
    time.sleep(board.ACCEPT_DEFER_S)
    return warned_at
