"""Answering one request: decode, delay, execute, account, encode.

A :class:`Handler` is the delegate's :class:`~testbed.delegate.dispatch.Answerer`:
one per serving or worker thread, each keeping that thread's per-client
accounting (merged by :class:`testbed.delegate.daemon.Delegate` on demand).  It
sees the delegate only through :class:`Served`.  Cost mode acknowledges a call
(ret 0, errno 0) without executing it; offload mode hands it to an
:class:`OffloadExecutor` (:mod:`testbed.delegate.offload`).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from testbed.core import cpus, wire

#: Bound on remembered clients (least recently seen dropped beyond it, O(1)).
MAX_CLIENTS = 65536


class Served(Protocol):
    """What a :class:`Handler` needs of its delegate."""

    delay_ns: int
    workers: int
    offload: OffloadExecutor | None

    @property
    def answered(self) -> int: ...

    def welcome_info(self) -> dict[str, Any]: ...

    def client_stats(self, ident: bytes) -> dict[str, Any]: ...

    def count_answered(self) -> None: ...


class OffloadExecutor(Protocol):
    """Executes offload-mode calls for the delegate (the extension point).

    ``execute`` is called from worker threads (concurrently when
    ``workers > 1``) and must keep per-client state (fd tables) keyed by
    ``client``: a key unique to the client's *connection*, never only the
    routing identity a peer chooses (a later peer choosing the same identity
    must not inherit that state).  Raw ZMTP: the identity, which the router
    gives no other connection while this one is open; libzmq: the identity,
    NUL and the connection's socket inode (:meth:`ConnectionGuard.conn_key`).
    It returns ``(ret, errno, outbufs)``.  ``forget`` is called when a client
    says BYE and when its connection has ended, from the serving thread or the
    connection guard's, possibly while a call of that client still executes.
    """

    def execute(
        self, client: bytes, call: wire.Call
    ) -> tuple[int, int, tuple[tuple[int, bytes], ...]]: ...

    def forget(self, client: bytes) -> None: ...


class _Client:
    """Accounting of one client (one ROUTER identity) within one thread."""

    __slots__ = ("calls", "errors", "bytes_in", "first_ns", "last_ns", "peer")

    def __init__(self, t_ns: int):
        self.calls = 0
        self.errors = 0
        self.bytes_in = 0
        self.first_ns = t_ns
        self.last_ns = t_ns
        self.peer = ""


def _peer_label(info: dict) -> str:
    """A short printable label from a client's HELLO map (host/pid if given)."""
    parts = []
    for key in ("host", "hostname", "pid"):
        value = info.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            parts.append(f"{key}={str(value)[:64]}")
    return " ".join(parts)


def _spin_until(deadline_ns: int, yield_gil: bool) -> None:
    """Busy-wait until ``deadline_ns`` on CLOCK_MONOTONIC.

    Never sleeps: a sleep's wake-up (timer slack, scheduler, an idle vCPU
    halting) adds tens of microseconds of jitter to an emulated link delay.
    """
    mono = time.monotonic_ns
    if yield_gil:
        yield_ = os.sched_yield  # releases the GIL so other workers' spins progress
        while mono() < deadline_ns:
            yield_()
    else:
        while mono() < deadline_ns:
            pass


class Handler:
    """Turns one request into one reply (an :class:`~testbed.delegate.dispatch.Answerer`);
    owns one thread's accounting.

    ``idents_are_keys``: a request's routing identity is its connection's own
    (raw ZMTP: no other open connection has it, and its offload state is
    forgotten on close), so it keys the offload state; else the serving loop
    passes each request's key (:meth:`Delegate._intake`).
    """

    def __init__(self, delegate: Served, idents_are_keys: bool = False):
        self.d = delegate
        self.clients: OrderedDict[bytes, _Client] = OrderedDict()  # least recently seen first
        self.delay_ns = delegate.delay_ns
        self.yield_gil = delegate.workers > 1
        self.idents_are_keys = idents_are_keys

    def _client(self, ident: bytes, t_ns: int) -> _Client:
        clients = self.clients
        client = clients.get(ident)
        if client is None:
            if len(clients) >= MAX_CLIENTS:
                clients.popitem(last=False)  # least recently seen, O(1)
            client = clients[ident] = _Client(t_ns)
        else:
            clients.move_to_end(ident)
        return client

    def handle(
        self,
        ident: bytes,
        payload: bytes,
        t_recv: int,
        key: bytes | None = None,
        on_call: Callable[[], object] | None = None,
    ) -> bytes:
        """The reply frame for one ``payload`` received from client ``ident``
        (:meth:`testbed.delegate.dispatch.Answerer.handle`)."""
        client = self._client(ident, t_recv)
        client.bytes_in += len(payload)
        client.last_ns = t_recv
        msg = None
        try:
            kind, msg = wire.decode(payload)
            if kind == wire.CALL:
                return self._call(client, ident, msg, t_recv, key, on_call)
            if kind == wire.HELLO:
                client.peer = _peer_label(msg)
                return wire.encode_welcome(self.d.welcome_info())
            if kind == wire.BYE:
                if self.d.offload is not None:
                    if self.idents_are_keys:
                        key = ident
                    if key is not None:
                        self.d.offload.forget(key)
                return wire.encode_bye(self.d.client_stats(ident))
            if kind == wire.STATS:  # CPU time for the relay's run record (testbed.core.cpus)
                calls = self.d.client_stats(ident)["calls"]
                return wire.encode_stats(cpus.process_stats(self.d.answered, calls))
            raise wire.WireError(wire.E_UNSUPPORTED, f"a delegate does not accept {kind!r}")
        except wire.WireError as exc:
            client.errors += 1
            return wire.encode_error(exc.code, str(exc), exc.call_id)
        except Exception as exc:  # never crash on one client's message
            client.errors += 1
            text = f"internal error: {exc.__class__.__name__}: {exc}"[:200]
            return wire.encode_error(wire.E_INTERNAL, text, getattr(msg, "call_id", None))

    def bad_envelope(self, ident: bytes, parts: int, nbytes: int, t_recv: int) -> bytes:
        """The ERROR for a message that is not ``[identity, ("",) payload]``."""
        client = self._client(ident, t_recv)
        client.bytes_in += nbytes
        client.last_ns = t_recv
        client.errors += 1
        msg = f"expected one frame after the routing envelope, got {parts}"
        return wire.encode_error(wire.E_MALFORMED, msg)

    def _call(
        self,
        client: _Client,
        ident: bytes,
        call: wire.Call,
        t_recv: int,
        key: bytes | None,
        on_call: Callable[[], object] | None,
    ) -> bytes:
        client.calls += 1
        offload = self.d.offload
        if call.mode == "offload" and offload is None:
            raise wire.WireError(
                wire.E_UNSUPPORTED,
                "offload mode is not enabled on this delegate (start it with --offload-root)",
                call.call_id,
            )
        mono = time.monotonic_ns
        if self.delay_ns:
            # the emulated link delay counts from when the frame was taken off the socket
            _spin_until(t_recv + self.delay_ns, self.yield_gil)
        if on_call is not None:  # --service-us: queued, then served
            on_call()
        if call.mode == "offload":
            if self.idents_are_keys:
                key = ident
            elif key is None:
                raise wire.WireError(
                    wire.E_INTERNAL, "the connection of this call has ended", call.call_id
                )
            t_exec_start = mono()
            ret, err, outbufs = offload.execute(key, call)
            t_exec_end = mono()
        else:
            t_exec_start = t_exec_end = mono()
            ret = err = 0
            outbufs = ()
        res = wire.Result(call.call_id, ret, err, t_recv, t_exec_start, t_exec_end, mono(), outbufs)
        self.d.count_answered()
        return wire.encode_result(res)
