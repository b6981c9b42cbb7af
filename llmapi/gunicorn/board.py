"""The least-connections accept board: each worker's open connections, in memory shared by every worker."""

from __future__ import annotations

import mmap
import struct
import time


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


def shared() -> ConnectionBoard | None:
    """The board made in the master (None outside gunicorn, or before on_starting)."""
    return _board


def make_connection_board() -> None:
    """Create the board the workers forked from now on share (from gunicorn's on_starting hook)."""
    global _board
    _board = ConnectionBoard()


def forget_worker(age: int, pid: int) -> None:
    """Clear an exited worker's slot (from gunicorn's child_exit hook)."""
    if _board is not None:
        _board.clear(_board.slot(age), pid)


class Deferral:
    """When a worker with more open connections than a sibling leaves a waiting connection to that sibling."""

    def __init__(self) -> None:
        self.since: float | None = None

    def defer(self, board: ConnectionBoard | None, slot: int | None, connections: int) -> bool:
        """Whether to leave the waiting connection to a sibling for now (at most ACCEPT_DEFER_S)."""
        if board is None or slot is None:
            return False
        fewest = board.fewest_elsewhere(slot)
        if fewest is None or connections <= fewest:
            return False
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return now - self.since < ACCEPT_DEFER_S
