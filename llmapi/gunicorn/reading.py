"""Reading requests on a worker's main loop: HTTP/1.1 framing, read deadlines, and the refusals (408, 413, 431)."""

from __future__ import annotations

import errno
import json
import math
import socket
import time
from dataclasses import dataclass

from gunicorn.http.unreader import SocketUnreader

from llmapi.errors import error_body

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


def limits() -> ReadLimits:
    """REQUEST_READ_TIMEOUT and MAX_BODY_BYTES as configured in the master."""
    return _limits


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


def recv(sock: socket.socket) -> bytes | None:
    """Read what has arrived without blocking: None when nothing has, b"" when the client closed or failed."""
    try:
        return sock.recv(READ_CHUNK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """Send a short answer without blocking; the socket's buffer takes it whole (or the client is gone)."""
    try:
        sock.send(data)
    except OSError:
        pass


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
