"""Per-client remote fd tables at the delegate, with limits per client and in all.

A client (one ROUTER identity, i.e. one relay) sees only *handles*: integers
valid in its own table.  A handle of one client means nothing in another
client's table (``EBADF``), so clients cannot reach each other's files.
Handles come from one counter shared by every table and are not reused (until
it wraps at 2**31), so the handles of a forgotten client stay ``EBADF`` in
the fresh table its later calls get.

Limits (docs/offload.md prints them as a table):

* fds of all clients together: ``max_total_fds``, by default half of what
  :func:`testbed.core.limits.fd_limit` leaves after ``RESERVED_FDS`` when the
  tables are built (the other half is for connections);
* fds of one client: ``min(max_fds, max(64, max_total_fds // 4))``, so one
  client cannot take everything and room is kept for new ones;
* bytes in flight (data received plus output being built) of one client,
  ``max_inflight``, and of all clients together, ``max_total_inflight``.

Beyond an fd limit an open fails with ``EMFILE`` before it is made, beyond
a byte limit a call fails with ``ENOBUFS`` before it executes.

A client that says BYE, whose connection closes, or that is not heard from
for ``idle_s`` seconds is *forgotten*: its table is marked dead and every fd
is closed -- at once if none of its calls executes, else when the last one
ends (:meth:`Tables.use`), so an fd is never closed under a running call (its
number could be reused by another client's open meanwhile).  ``forget`` may
be called from any thread.  A reaper thread checks every ``min(idle_s / 4,
1)`` seconds, so a vanished client's fds are gone within ``idle_s`` plus that
period even when no other client calls.
"""

from __future__ import annotations

import errno as E
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from testbed.core import limits

#: Default limits.
MAX_FDS = 1024  # per client (--offload-max-fds), before the share of the total below
MIN_CLIENT_FDS = 64  # a client's share of the total is never smaller than this
MAX_INFLIGHT_BYTES = 8 << 20  # per client
MAX_TOTAL_INFLIGHT_BYTES = 64 << 20  # all clients together
IDLE_S = 3600.0
FIRST_HANDLE = 3
_HANDLE_END = 1 << 31  # handles travel as C ints


def default_total_fds() -> int:
    """Offloaded fds of all clients together: half of what the fd limit leaves free."""
    return max(1, (limits.fd_limit() - limits.RESERVED_FDS) // 2)


def client_fds(max_fds: int, total: int) -> int:
    """The fds one client may hold: ``min(max_fds, max(64, total // 4))``."""
    return min(max_fds, max(MIN_CLIENT_FDS, total // 4))


class FdPool:
    """The fds of all clients together, and the handle counter they share."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._next = FIRST_HANDLE
        self._lock = threading.Lock()

    def take(self) -> int:
        """Reserve one fd; a fresh handle number, or -1 beyond the limit."""
        with self._lock:
            if self.used >= self.limit:
                return -1
            self.used += 1
            handle = self._next
            self._next = handle + 1 if handle + 1 < _HANDLE_END else FIRST_HANDLE
            return handle

    def give(self, n: int = 1) -> None:
        with self._lock:
            self.used -= n


class FdTable:
    """One client's handles -> real delegate fds."""

    def __init__(
        self,
        max_fds: int = MAX_FDS,
        max_inflight: int = MAX_INFLIGHT_BYTES,
        pool: FdPool | None = None,
    ):
        self.max_fds = max_fds
        self.max_inflight = max_inflight
        self.pool = pool if pool is not None else FdPool(max_fds)
        self.fds: dict[int, int] = {}
        self.reserved = 0  # handles of opens in progress
        self.inflight = 0
        self.busy = 0  # calls executing now (changed under Tables' lock)
        self.dead = False  # forgotten: closed when no call executes
        self.last_ns = time.monotonic_ns()
        self._lock = threading.Lock()

    def reserve(self) -> int:
        """A handle for an fd about to be opened (EMFILE beyond a limit, before the
        open: an ``O_CREAT``/``O_TRUNC`` open refused for the limit changes nothing)."""
        with self._lock:
            if len(self.fds) + self.reserved >= self.max_fds:
                raise OSError(E.EMFILE, "too many offloaded fds for this client")
            handle = self.pool.take()
            if handle < 0:
                raise OSError(E.EMFILE, "too many offloaded fds for all clients")
            while handle in self.fds:  # only after the counter wrapped
                self.pool.give()
                handle = self.pool.take()
            self.reserved += 1
            return handle

    def place(self, handle: int, fd: int | None) -> None:
        """Store real ``fd`` under a reserved ``handle`` (None: the open failed)."""
        with self._lock:
            self.reserved -= 1
            if fd is not None:
                self.fds[handle] = fd
        if fd is None:
            self.pool.give()

    def add(self, fd: int) -> int:
        """Store real fd ``fd``; return its handle (EMFILE beyond a limit: fd closed)."""
        try:
            handle = self.reserve()
        except OSError:
            os.close(fd)
            raise
        self.place(handle, fd)
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
        self.pool.give()
        os.close(fd)

    def close_all(self) -> int:
        with self._lock:
            fds, self.fds = list(self.fds.values()), {}
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.pool.give(len(fds))
        return len(fds)


class Tables:
    """All clients' tables (thread-safe); idle clients are reaped by a thread."""

    def __init__(
        self,
        max_fds: int = MAX_FDS,
        max_inflight: int = MAX_INFLIGHT_BYTES,
        idle_s: float = IDLE_S,
        max_total_fds: int | None = None,
        max_total_inflight: int = MAX_TOTAL_INFLIGHT_BYTES,
    ):
        self.max_total_fds = default_total_fds() if max_total_fds is None else max_total_fds
        if self.max_total_fds < 1 or max_fds < 1:
            raise ValueError("fd limits must be >= 1")
        self.max_fds = client_fds(max_fds, self.max_total_fds)
        self.max_inflight = max_inflight
        self.max_total_inflight = max_total_inflight
        self.idle_ns = int(idle_s * 1e9)
        self.pool = FdPool(self.max_total_fds)
        self.inflight = 0  # bytes of every client's executing calls
        self._tables: dict[bytes, FdTable] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None

    def _reap_forever(self) -> None:
        period = min(self.idle_ns / 4e9, 1.0)
        while not self._closed.wait(period):
            self.reap()

    def close(self) -> None:
        """Stop the reaper and close every client's fds (those of running calls when they end)."""
        self._closed.set()
        with self._lock:
            clients = list(self._tables)
        for c in clients:
            self.forget(c)

    def _table(self, client: bytes) -> FdTable:
        """``client``'s live table, made if needed (call with the lock held)."""
        if self._reaper is None and not self._closed.is_set():
            self._reaper = threading.Thread(
                target=self._reap_forever, name="offload-reaper", daemon=True
            )
            self._reaper.start()
        table = self._tables.get(client)
        if table is None:
            table = self._tables[client] = FdTable(self.max_fds, self.max_inflight, self.pool)
        return table

    def of(self, client: bytes) -> FdTable:
        """``client``'s table (a fresh one after it was forgotten)."""
        with self._lock:
            table = self._table(client)
            table.last_ns = time.monotonic_ns()
        return table

    @contextmanager
    def use(self, client: bytes, nbytes: int) -> Iterator[FdTable]:
        """``client``'s table for one call holding ``nbytes`` (ENOBUFS beyond a budget).

        While the call runs its table is busy: never reaped, and if it is
        forgotten meanwhile its fds are closed only when the call ends.
        """
        with self._lock:
            table = self._table(client)
            if table.inflight + nbytes > table.max_inflight:
                raise OSError(E.ENOBUFS, "too many bytes in flight for this client")
            if self.inflight + nbytes > self.max_total_inflight:
                raise OSError(E.ENOBUFS, "too many bytes in flight for all clients")
            table.inflight += nbytes
            self.inflight += nbytes
            table.busy += 1
            table.last_ns = time.monotonic_ns()
        try:
            yield table
        finally:
            with self._lock:
                table.inflight -= nbytes
                self.inflight -= nbytes
                table.busy -= 1
                table.last_ns = time.monotonic_ns()
                close_now = table.dead and table.busy == 0
            if close_now:
                table.close_all()

    def _drop(self, client: bytes) -> FdTable | None:
        """Unlink ``client``'s table and mark it dead; it if no call runs (lock held)."""
        table = self._tables.pop(client, None)
        if table is None:
            return None
        table.dead = True
        return None if table.busy else table

    def forget(self, client: bytes) -> int:
        """Forget ``client`` (any thread): its fds are closed now, or when its running
        calls end; its next call starts a fresh table.  Returns how many were open."""
        with self._lock:
            table = self._tables.get(client)
            n = len(table.fds) if table is not None else 0
            idle = self._drop(client)
        if idle is not None:
            idle.close_all()
        return n

    def reap(self, now: int | None = None) -> int:
        """Forget clients idle for longer than ``idle_s``; return fds closed."""
        now = time.monotonic_ns() if now is None else now
        with self._lock:
            idle = [
                c for c, t in self._tables.items() if not t.busy and now - t.last_ns > self.idle_ns
            ]
            tables = [self._drop(c) for c in idle]
        return sum(t.close_all() for t in tables if t is not None)

    def open_fds(self, client: bytes | None = None) -> int:
        """Open remote fds of one client (or of all, those awaiting a deferred close included)."""
        if client is None:
            return self.pool.used
        with self._lock:
            table = self._tables.get(client)
        return len(table.fds) if table is not None else 0
