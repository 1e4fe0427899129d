"""Per-client remote fd tables at the delegate, with limits.

A client (one ROUTER identity, i.e. one relay) sees only *handles*: small
integers valid in its own table.  A handle of one client means nothing in
another client's table (``EBADF``), so clients cannot reach each other's
files.  Each table bounds the number of open fds and the bytes the client
may have in flight at once; a client that says BYE, or is not heard from for
``idle_s`` seconds, has every fd closed: a reaper thread checks every
``min(idle_s / 4, 1)`` seconds, so a vanished client's fds are gone within
``idle_s`` plus that period even when no other client calls.
"""

from __future__ import annotations

import errno as E
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Default limits per client.
MAX_FDS = 1024
MAX_INFLIGHT_BYTES = 8 << 20
IDLE_S = 3600.0


class FdTable:
    """One client's handles -> real delegate fds."""

    def __init__(self, max_fds: int = MAX_FDS, max_inflight: int = MAX_INFLIGHT_BYTES):
        self.max_fds = max_fds
        self.max_inflight = max_inflight
        self.fds: dict[int, int] = {}
        self.inflight = 0
        self.busy = 0  # calls executing now: a client is never reaped mid-call
        self.last_ns = time.monotonic_ns()
        self._next = 3
        self._lock = threading.Lock()

    def add(self, fd: int) -> int:
        """Store real fd ``fd``; return its handle (EMFILE beyond the limit: fd closed)."""
        with self._lock:
            if len(self.fds) >= self.max_fds:
                os.close(fd)
                raise OSError(E.EMFILE, "too many offloaded fds for this client")
            handle = self._next
            self._next += 1
            self.fds[handle] = fd
            return handle

    def get(self, handle: int) -> int:
        fd = self.fds.get(handle)
        if fd is None:
            raise OSError(E.EBADF, f"no remote fd {handle}")
        return fd

    def close(self, handle: int) -> None:
        with self._lock:
            fd = self.fds.pop(handle, None)
        if fd is None:
            raise OSError(E.EBADF, f"no remote fd {handle}")
        os.close(fd)

    def close_all(self) -> int:
        with self._lock:
            fds, self.fds = list(self.fds.values()), {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        return len(fds)

    @contextmanager
    def budget(self, nbytes: int) -> Iterator[None]:
        """Account ``nbytes`` in flight for one call (ENOBUFS beyond the limit)."""
        with self._lock:
            if self.inflight + nbytes > self.max_inflight:
                raise OSError(E.ENOBUFS, "too many bytes in flight for this client")
            self.inflight += nbytes
            self.busy += 1
        try:
            yield
        finally:
            with self._lock:
                self.inflight -= nbytes
                self.busy -= 1
                self.last_ns = time.monotonic_ns()


class Tables:
    """All clients' tables (thread-safe); idle clients are reaped by a thread."""

    def __init__(
        self,
        max_fds: int = MAX_FDS,
        max_inflight: int = MAX_INFLIGHT_BYTES,
        idle_s: float = IDLE_S,
    ):
        self.max_fds = max_fds
        self.max_inflight = max_inflight
        self.idle_ns = int(idle_s * 1e9)
        self._tables: dict[bytes, FdTable] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None

    def _reap_forever(self) -> None:
        period = min(self.idle_ns / 4e9, 1.0)
        while not self._closed.wait(period):
            self.reap()

    def close(self) -> None:
        """Stop the reaper and close every client's fds."""
        self._closed.set()
        with self._lock:
            clients = list(self._tables)
        for c in clients:
            self.forget(c)

    def of(self, client: bytes) -> FdTable:
        now = time.monotonic_ns()
        with self._lock:
            if self._reaper is None and not self._closed.is_set():
                self._reaper = threading.Thread(
                    target=self._reap_forever, name="offload-reaper", daemon=True
                )
                self._reaper.start()
            table = self._tables.get(client)
            if table is None:
                table = self._tables[client] = FdTable(self.max_fds, self.max_inflight)
        table.last_ns = now
        return table

    def forget(self, client: bytes) -> int:
        """Close every fd of ``client``; return how many were open."""
        with self._lock:
            table = self._tables.pop(client, None)
        return table.close_all() if table is not None else 0

    def reap(self, now: int | None = None) -> int:
        """Forget clients idle for longer than ``idle_s``; return fds closed."""
        now = time.monotonic_ns() if now is None else now
        with self._lock:
            idle = [
                c for c, t in self._tables.items() if not t.busy and now - t.last_ns > self.idle_ns
            ]
        return sum(self.forget(c) for c in idle)

    def open_fds(self, client: bytes | None = None) -> int:
        """Open remote fds of one client (or of all)."""
        with self._lock:
            tables = (
                [self._tables.get(client)] if client is not None else list(self._tables.values())
            )
        return sum(len(t.fds) for t in tables if t is not None)
