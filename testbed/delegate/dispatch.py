"""How the delegate's serving loop hands requests on: the dispatcher interface.

The serving loop (:class:`testbed.delegate.daemon.Delegate`) owns the ROUTER.  It
takes every message off it once, in one intake step: ``t_recv`` stamped, the
connection it came from marked for the connection guard (``ZMQ_SRCFD``), its
routing envelope read (:func:`split_envelope`) and, with offload, the key of its
connection's offload state taken.  A malformed envelope is answered there
(ERROR ``malformed``); every request is handed to a :class:`Dispatcher`, which
produces its reply *now* (the loop sends it) or *later*: worker threads put
``[*envelope, reply]`` on :attr:`Dispatcher.replies`, which the loop polls and
passes on to the ROUTER (the one thread that may send on it).  Whoever produces
a reply uses an :class:`Answerer` (the delegate's per-thread handler: decode,
delay, execute, account, encode).

The dispatchers: answer inline (:class:`Inline`, one worker) and the worker
pool (:class:`WorkerPool`, ``--workers N``) here, and the FIFO queue of ``--service-us``
in :mod:`testbed.delegate.service`, which plugs in through :class:`QueueService`.
This module imports nothing of the delegate's: the daemon, the handler and the
service depend on it, never on each other.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import zmq

#: On stop, queued requests are still answered for at most this long (ns).
DRAIN_NS = 200_000_000

#: How often (ms) a loop or worker with nothing to do looks at the stop flag.
POLL_MS = 50

#: Whole messages queued per peer, each way (ZMQ_RCVHWM / ZMQ_SNDHWM).  libzmq
#: counts messages, not bytes: a peer's receive queue holds at most
#: RECV_HWM * HARD_MAX_FRAME bytes; beyond it TCP pushes back on the peer.  In
#: cost mode a reply is a RESULT (~80 bytes) or an ERROR (< 300 bytes:
#: ``wire.MAX_ERROR_TEXT``), so a peer that never reads costs at most
#: SEND_HWM small replies; further replies to it are dropped (ROUTER policy).
#: With offload a reply may carry ``syscalls.MAX_BUFFER`` bytes: see
#: :func:`send_hwm`.
RECV_HWM = 8
SEND_HWM = 256


#: Linger (ms) when closing sockets on shutdown: long enough for the replies
#: already handed to libzmq to leave, bounded so shutdown never hangs.
CLOSE_LINGER_MS = 100


#: Worker receive timeout (ms) in the multi-worker layout: how often an idle
#: worker checks whether it should stop.
WORKER_POLL_MS = POLL_MS


#: ``workers > 1`` with offload: replies (up to ``syscalls.MAX_BUFFER`` bytes
#: each) the serving loop passes on in a row before it looks at the ROUTER
#: again, so new requests cannot keep replies waiting in memory.
REPLIES_PER_TURN = 64


SNDMORE = int(zmq.SNDMORE)  # plain int: enum flags are slow on the hot path
NOBLOCK = int(zmq.NOBLOCK)

#: The routing envelope of a REQ client after its identity: one empty delimiter.
REQ_DELIMITER = (b"",)


def split_envelope(parts: Sequence[Any], nparts: int) -> tuple[tuple[bytes, ...], Any] | None:
    """``(envelope, payload)`` of a message whose parts after the routing identity
    were ``parts`` (the first few of ``nparts``; bytes or ``zmq.Frame``): ``[payload]``
    from a DEALER (envelope ``()``) or ``["", payload]`` from a REQ (envelope
    :data:`REQ_DELIMITER`), the envelope being what goes back before the reply.
    None for anything else: the delegate answers it with ERROR ``malformed``.

    The one envelope rule of both transports; their single-part fast paths are
    its first case."""
    if nparts == 1:
        return (), parts[0]
    if nparts == 2 and len(parts[0]) == 0:
        return REQ_DELIMITER, parts[1]
    return None


class Answerer(Protocol):
    """Turns one request into its reply in the calling thread; keeps that thread's
    per-client accounting (:class:`testbed.delegate.handler.Handler`)."""

    def handle(
        self,
        ident: bytes,
        payload: bytes,
        t_recv: int,
        key: bytes | None = None,
        on_call: Callable[[], object] | None = None,
    ) -> bytes:
        """The reply to ``payload`` from client ``ident``, received at ``t_recv``.

        ``key``: the offload key of the request's connection (None: no offload,
        an inproc peer, or the connection has ended).  ``on_call`` runs for a
        CALL after the injected delay and before execution (the service time of
        :mod:`testbed.delegate.service`)."""
        ...

    def bad_envelope(self, ident: bytes, parts: int, nbytes: int, t_recv: int) -> bytes:
        """The ERROR for a message that :func:`split_envelope` refuses."""
        ...


class Dispatcher(Protocol):
    """Given a request and its connection, produces the reply now or later."""

    #: Where replies produced later arrive (whole ``[*envelope, reply]`` messages),
    #: polled by the serving loop; None if :meth:`dispatch` always replies now.
    replies: zmq.Socket | None
    #: Replies passed on in a row before the loop looks at the ROUTER again.
    replies_per_turn: int
    #: How long the loop keeps serving after a stop request, at most (ns).
    drain_ns: int

    def dispatch(
        self, env: tuple[bytes, ...], payload: zmq.Frame, t_recv: int, key: bytes | None
    ) -> bytes | None:
        """Hand on one request: ``env`` its routing envelope (identity first),
        ``payload`` its frame, ``t_recv`` when the loop took it off the ROUTER,
        ``key`` its connection's offload key (see :meth:`Answerer.handle`).
        Returns the reply, or None: it comes later on :attr:`replies` (or the
        request is dropped, as a stopping queue does)."""
        ...

    def stopping(self) -> None:
        """A stop was requested: the loop drains for at most :attr:`drain_ns`."""
        ...

    def idle(self) -> bool:
        """Nothing is in flight any more: the loop may end its drain early."""
        ...

    def join(self) -> None:
        """Stop the workers and wait for them (bounded); the loop then passes on
        what they left on :attr:`replies`."""
        ...

    def close(self) -> None:
        """Release the sockets (after :meth:`join`)."""
        ...


class QueueService(Protocol):
    """What ``Delegate(service=...)`` takes (:class:`testbed.delegate.service.Service`):
    fields for the WELCOME and the dispatcher of each serving run."""

    def info(self) -> dict[str, Any]: ...

    def dispatcher(
        self, ctx: zmq.Context, answerers: Sequence[Answerer], endpoint: str
    ) -> Dispatcher:
        """A dispatcher serving with one worker per answerer; its replies come on
        a socket bound at ``endpoint`` (inproc) of ``ctx``."""
        ...


class Inline:
    """The dispatcher of ``workers == 1``: answers every request at once, in the
    serving thread."""

    replies = None
    replies_per_turn = 0
    drain_ns = DRAIN_NS

    def __init__(self, answerer: Answerer):
        self._handle = answerer.handle

    def dispatch(
        self, env: tuple[bytes, ...], payload: zmq.Frame, t_recv: int, key: bytes | None
    ) -> bytes:
        return self._handle(env[0], payload.bytes, t_recv, key)

    def stopping(self) -> None:
        pass

    def idle(self) -> bool:
        return False  # the loop drains until the ROUTER has nothing more queued

    def join(self) -> None:
        pass

    def close(self) -> None:
        pass


class WorkerPool:
    """The dispatcher of ``workers > 1``: requests pass round-robin over an inproc
    DEALER to one worker thread per answerer, replies come back the same way.

    Every socket is created with the pool (in :meth:`Delegate.bind`, so that
    errors surface there); the threads start with :meth:`start`.  A request
    goes to the workers as ``[*envelope, payload]``, after a tag frame (a
    random prefix no peer ever sees, then the offload key) where it has a
    key.  A worker stamps ``t_recv`` when it takes a request off its socket and
    stops, draining what is queued for at most ``DRAIN_NS``, once ``stop()``.
    """

    drain_ns = DRAIN_NS + 2 * POLL_MS * 1_000_000  # the workers drain for DRAIN_NS

    def __init__(
        self, ctx: zmq.Context, n: int, endpoint: str, offload: bool, stop: Callable[[], bool]
    ):
        self._socks: list[zmq.Socket] = []
        self.replies = backend = ctx.socket(zmq.DEALER)
        self._socks.append(backend)
        backend.setsockopt(zmq.LINGER, 0)
        backend.setsockopt(zmq.SNDHWM, RECV_HWM * n)
        backend.setsockopt(zmq.RCVHWM, SEND_HWM)  # replies pass on at once (ROUTER: send_hwm)
        backend.bind(endpoint)
        for _ in range(n):
            sock = ctx.socket(zmq.DEALER)
            self._socks.append(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, WORKER_POLL_MS)
            sock.setsockopt(zmq.RCVHWM, RECV_HWM)
            sock.connect(endpoint)
        self.replies_per_turn = REPLIES_PER_TURN if offload else 0
        self._keyed = offload
        self._tag_prefix = b"\x00tb-tag-" + os.urandom(16)  # never sent: no peer can forge one
        self._threads: list[threading.Thread] = []
        self._stop = stop

    def start(self, answerers: Sequence[Answerer]) -> None:
        """Start one worker thread per answerer (as many as sockets)."""
        for i, (sock, answerer) in enumerate(zip(self._socks[1:], answerers, strict=True)):
            t = threading.Thread(
                target=self._work, args=(sock, answerer), name=f"tb-delegate-w{i}", daemon=True
            )
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def dispatch(
        self, env: tuple[bytes, ...], payload: zmq.Frame, t_recv: int, key: bytes | None
    ) -> None:
        send = self.replies.send
        try:  # blocks while every worker's queue is full: TCP pushes back on the peers
            if key is not None:
                send(self._tag_prefix + key, SNDMORE)
            for part in env:
                send(part, SNDMORE)
            send(payload)  # the frame itself: no copy
        except zmq.ZMQError:
            pass  # the context is closing
        return None

    def stopping(self) -> None:
        pass  # the workers watch stop() themselves

    def idle(self) -> bool:
        return not any(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for t in self._threads:
            t.join(5.0)

    def close(self) -> None:
        """Close the DEALER the replies come on, and the workers' sockets if no
        thread ever took them (each worker closes its own)."""
        socks = self._socks if not self._threads else self._socks[:1]
        for s in socks:
            s.close(0)
        self._socks.clear()

    def _work(self, sock: zmq.Socket, answerer: Answerer) -> None:
        """One worker: take a request, answer it, hand the reply back; until stopped."""
        recv, send = sock.recv, sock.send
        mono = time.monotonic_ns
        handle = answerer.handle
        stop = self._stop
        prefix = self._tag_prefix if self._keyed else None
        cut = len(self._tag_prefix)
        deadline = None
        try:
            while True:
                if stop():  # drain what is queued, bounded in count and time
                    if deadline is None:
                        deadline = mono() + DRAIN_NS
                        recv = functools.partial(sock.recv, NOBLOCK)
                    elif mono() > deadline:
                        break
                try:
                    first = recv()
                except zmq.Again:
                    if deadline is not None:
                        break
                    continue  # receive timeout: look at the stop flag
                frame = sock.recv(copy=False)  # the rest of a message is there already
                t_recv = mono()
                key = None
                if prefix is not None and first[:cut] == prefix:
                    key, ident = first[cut:], frame.bytes
                    frame = sock.recv(copy=False)
                else:
                    ident = first
                if frame.more:  # the "" of a REQ client's envelope (checked by the intake)
                    env: tuple[bytes, ...] = (ident, b"")
                    frame = sock.recv(copy=False)
                else:
                    env = (ident,)
                reply = handle(ident, frame.bytes, t_recv, key)
                try:
                    for part in env:
                        send(part, SNDMORE)
                    send(reply)
                except zmq.ZMQError:
                    pass  # the context is closing
        finally:
            sock.close(CLOSE_LINGER_MS)
