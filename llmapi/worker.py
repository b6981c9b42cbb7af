"""The gunicorn side, used by gunicorn.conf.py: a worker that stops cleanly, JSON logs, the metrics directory."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from gunicorn.glogging import Logger
from gunicorn.workers.gthread import ThreadWorker as GthreadWorker
from prometheus_client import multiprocess

from llmapi.logs import JsonFormatter, iso_time
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


def make_connection_board() -> None:
    """Create the board the workers forked from now on share (from gunicorn's on_starting hook)."""
    global _board
    _board = ConnectionBoard()


def forget_worker(age: int, pid: int) -> None:
    """Clear an exited worker's slot (from gunicorn's child_exit hook)."""
    if _board is not None:
        _board.clear(_board.slot(age), pid)


class ThreadWorker(GthreadWorker):
    """gthread with two changes: a stopping worker lets go of the listening sockets at once, and a worker leaves a
    new connection to a sibling that has fewer (least-connections accept).

    gunicorn's master closes its copy of the listening socket on SIGTERM, but each worker keeps its
    own until it has finished its requests: meanwhile new connections wait unanswered in the kernel's
    backlog and are reset at the end. Closed at once by every process, the socket refuses them straight
    away, so a client or a proxy (nginx: proxy_next_upstream) can go elsewhere at once.

    Every worker is woken by a new connection and the first to call accept() gets it, so the split of
    keep-alive connections (which stay with the worker that accepted them) is a matter of chance: 8
    clients came out 5 / 3 or 6 / 2 as often as 4 / 4, leaving one worker's batch short and the other's
    requests waiting. Here a worker with more open connections than a sibling waits a moment
    (ACCEPT_DEFER_S at most) for that sibling to take the connection.
    """

    _slot: int | None = None
    _deferring_since: float | None = None
    _accept_called = False

    def init_process(self) -> None:
        """Take this worker's slot on the connection board, then run gthread's loop."""
        if _board is not None:
            self._slot = _board.slot(self.age)
            _board.publish(self._slot, os.getpid(), 0)
        super().init_process()

    def set_accept_enabled(self, enabled: bool) -> None:
        """Stop (or start) accepting; when stopping for good, close the listeners and leave the board."""
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()  # idempotent: gunicorn closes them again on its way out
            if _board is not None and self._slot is not None:
                _board.clear(self._slot, os.getpid())
                self._slot = None

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Publish this worker's open connections, then wait for and handle events as gthread does."""
        self._publish()
        self._accept_called = False
        super().wait_for_and_dispatch_events(timeout)
        if not self._accept_called:  # nobody is waiting to be accepted any more
            self._deferring_since = None

    def accept(self, listener: Any) -> None:
        """Accept a waiting connection, unless a sibling with fewer connections should have it."""
        self._accept_called = True
        if self._defer():
            time.sleep(ACCEPT_DEFER_STEP_S)  # the loop comes back while the connection is still waiting
            return
        self._deferring_since = None
        super().accept(listener)
        self._publish()

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
        """Write this worker's open connections on the board."""
        if _board is not None and self._slot is not None:
            _board.publish(self._slot, os.getpid(), self.nr_conns)


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
