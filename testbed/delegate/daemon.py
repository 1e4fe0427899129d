"""The delegate daemon: answers forwarded system calls from relays (ZMTP, the ZeroMQ protocol).

``testbed delegate --listen ENDPOINT`` binds a ROUTER and answers every frame
with a :mod:`testbed.core.wire` frame (protocol in ``docs/wire.md``).  The ROUTER is
:class:`testbed.delegate.router.Router` (ZMTP served on plain sockets, no libzmq:
``--transport zmtp``, the default where it serves) or a libzmq ROUTER socket
(CURVE, ``workers > 1``, ``--service-us``, other endpoints, ``TESTBED_ZMTP=0``):

* HELLO  -> WELCOME (host, pid, workers, delay, mode, versions)
* CALL   -> RESULT with the four delegate-clock timestamps, or ERROR
* BYE    -> BYE with the accounting of that client
* STATS  -> STATS: the delegate's CPU time and CPUs (``testbed.core.cpus.process_stats``)
* anything malformed -> ERROR to that client; the delegate keeps serving.

Serving: one loop per transport, one dispatcher interface
(:mod:`testbed.delegate.dispatch`).  A :class:`~testbed.delegate.handler.Handler`
turns a request into its reply and keeps one thread's per-client accounting.

transport ``zmtp`` (``workers == 1``; the measured path)
    One thread runs the router's ``epoll`` loop: read, stamp ``t_recv``,
    decode, spin the injected delay, stamp, encode, send.  No other thread.
transport ``shm`` (``--listen shm://PATH``; same-node relays)
    The same router loop; each relay's messages arrive in a shared-memory ring
    with an eventfd doorbell instead of on a socket (:mod:`testbed.core.shmring`).
transport ``libzmq``
    One thread runs :meth:`Delegate._serve_router` on the ROUTER socket: it
    takes each message off it (stamp ``t_recv``, then the one intake step of
    :meth:`Delegate._intake`: mark its connection (``ZMQ_SRCFD``) for the
    backlog bound of :mod:`testbed.delegate.connguard`, read its envelope,
    take its connection's offload key, answer a malformed one) and hands the
    request to a dispatcher:

    :class:`~testbed.delegate.dispatch.Inline` (``workers == 1``)
        answers in the serving thread: no inproc hop.
    :class:`~testbed.delegate.dispatch.WorkerPool` (``workers > 1``)
        passes whole requests round-robin over an inproc DEALER to N worker
        threads, which stamp ``t_recv`` when they take one off their socket (the
        hop counts as *wire*, not as *residence*), answer it and hand the reply
        back for the loop to send.  The injected delay spins with
        ``os.sched_yield`` so the workers' spins overlap despite the GIL.
    :class:`testbed.delegate.service.Queue` (``--service-us S``, any ``workers``)
        one FIFO queue shared by the workers, each call served for a drawn
        time and recorded (``docs/contention.md``).

Shutdown (SIGINT/SIGTERM, ``--max-calls``, :meth:`Delegate.stop`): the reply
being computed is sent, messages already queued are answered (bounded: 0.2 s),
then the sockets close with a 100 ms linger and the process exits 0.
``--curve-keys DIR`` makes the ROUTER a CURVE server admitting only the relay
keys in ``DIR/authorized`` (:mod:`testbed.core.keys`); ``--user NAME`` drops root
after binding and reading the keys, every thread (:mod:`testbed.delegate.privileges`).

The limits of :mod:`testbed.core.limits` are kept by :class:`testbed.delegate.router.Router`
itself (``zmtp``) or, under libzmq, by socket options (``ZMQ_HANDSHAKE_IVL``,
``ZMQ_MAXMSGSIZE``, the high-water marks: :func:`send_hwm`) and by
:class:`testbed.delegate.connguard.ConnectionGuard` (connections, backlog, memory held,
message and idle timeouts); :func:`connection_cap` shares the fd limit with
the offload executor.  Offload state belongs to a connection: under libzmq it
is keyed by identity and socket inode and forgotten when the connection ends.

Cost mode acknowledges a call (ret 0, errno 0) without executing it; offload
mode is delegated to an :class:`~testbed.delegate.handler.OffloadExecutor` (``testbed.delegate.offload``, built
for ``--offload-root DIR``; see ``docs/offload.md``).
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from testbed import __version__
from testbed.core import keys, limits, shmring, syscalls, wire, zmtp
from testbed.core.errors import TestbedError
from testbed.delegate import router
from testbed.delegate.connguard import ConnectionGuard
from testbed.delegate.dispatch import (
    CLOSE_LINGER_MS,
    DRAIN_NS,
    POLL_MS,
    RECV_HWM,
    SEND_HWM,
    Dispatcher,
    Inline,
    QueueService,
    WorkerPool,
    split_envelope,
)
from testbed.delegate.handler import Handler, OffloadExecutor, _Client
from testbed.delegate.offload import offload_executor
from testbed.delegate.privileges import drop_privileges, restrict
from testbed.delegate.service import Service

#: ZMQ_MAXMSGSIZE: libzmq drops the *connection* of a peer sending a bigger
#: frame (it never reaches us).  Frames between ``wire.MAX_FRAME`` and this cap
#: are received and answered with ERROR ``too-large``.
HARD_MAX_FRAME = wire.MAX_FRAME + (64 << 10)

#: Bytes a connection may send without completing a message (an unterminated
#: multipart message) before it is cut (``testbed.delegate.connguard``): above the
#: legitimate backlog of RECV_HWM whole messages plus the kernel's buffer.
MAX_BACKLOG = RECV_HWM * HARD_MAX_FRAME + (16 << 20)

#: Parts of one message the serving loop keeps ([identity, "", payload] at
#: most); further parts are read and dropped, and the message is answered
#: with ERROR ``malformed``.
MAX_PARTS = 3

#: Open connections accepted (further ones are shut down at once); lowered to
#: fit under ``RLIMIT_NOFILE`` (see :func:`connection_cap`).
MAX_CONNECTIONS = 4096

#: How the delegate is reached: "auto" picks "zmtp" (:mod:`testbed.delegate.router`, no
#: libzmq) where it serves, else "libzmq".
TRANSPORTS = ("auto", "zmtp", "libzmq")

SNDMORE = int(zmq.SNDMORE)  # plain int: enum flags are slow on the hot path
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE_NOBLOCK = SNDMORE | NOBLOCK
POLLIN = int(zmq.POLLIN)
SRCFD = int(zmq.SRCFD)
#: How a BYE frame begins (``[version, "bye", map]``, msgpack).
_BYE_HEAD = bytes([0x93, wire.WIRE_VERSION]) + b"\xa3" + wire.BYE.encode()


def connection_cap(workers: int, offload: bool = False) -> int:
    """Connections to accept: MAX_CONNECTIONS, less if RLIMIT_NOFILE is lower.

    Each connection costs one fd; ``limits.RESERVED_FDS`` stay free for the
    delegate itself and each worker's sockets cost 3 more.  With offload the
    connections get half of the rest: the other half is the offload
    executor's (its global cap, ``(soft - RESERVED_FDS) // 2``), so neither
    offloaded files nor connections can starve the other.
    """
    soft = limits.fd_limit()
    free = soft - limits.RESERVED_FDS - 3 * workers
    if offload:
        free //= 2
    return max(1, min(MAX_CONNECTIONS, free))


def send_hwm(offload: bool) -> int:
    """ZMQ_SNDHWM: replies queued for a peer that does not read them, at most
    ``limits.OUT_MAX`` bytes of them (with offload a reply may carry
    ``syscalls.MAX_BUFFER`` bytes; cost-mode replies are < 300 bytes)."""
    if not offload:
        return SEND_HWM
    return max(2, limits.OUT_MAX // syscalls.MAX_BUFFER)


class Delegate:
    """A delegate bound to one endpoint.

    ``Delegate(listen).start()`` serves in background threads (tests,
    benchmarks); ``serve_forever()`` serves in the calling thread (the CLI).
    Bind ``tcp://127.0.0.1:*`` and read :attr:`bound_endpoint` for a free port.
    """

    def __init__(
        self,
        listen: str,
        workers: int = 1,
        delay_us: float = 0.0,
        offload: OffloadExecutor | None = None,
        max_calls: int | None = None,
        on_stop: Callable[[], None] | None = None,
        curve_keys: str | None = None,
        service: QueueService | None = None,
        transport: str = "auto",
    ):
        if workers < 1:
            raise TestbedError(f"workers must be >= 1, not {workers}")
        if not 0 <= delay_us < float("inf"):  # refuses NaN and inf
            raise TestbedError(f"delay must be a finite number >= 0 µs, not {delay_us}")
        self.listen = listen
        self.workers = int(workers)
        self.delay_us = float(delay_us)
        self.delay_ns = round(delay_us * 1000)
        self.offload = offload
        self.max_calls = max_calls
        self.on_stop = on_stop
        self.curve_keys = curve_keys
        #: a testbed.delegate.service.Service: one FIFO queue, W servers (its dispatcher)
        self.service = service
        if transport not in TRANSPORTS:
            raise TestbedError(
                f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}"
            )
        self.transport_asked = transport
        self.transport = ""  # "zmtp", "shm" (both the raw router) or "libzmq", chosen in bind()
        self._raw: router.Router | None = None
        self._auth = None
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._guard: ConnectionGuard | None = None
        self._pool: WorkerPool | None = None
        self._endpoint: str | None = None
        self._handlers: list[Handler] = []
        self._answered = itertools.count(1)
        self._n_answered = 0
        self._stop_requested = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ctl_id = b"\x00tb-ctl-" + os.urandom(8)
        self._ctl_endpoint = f"inproc://tb-delegate-{id(self):x}-ctl"
        self._lock = threading.RLock()

    # ------------------------------------------------------------ properties

    @property
    def bound_endpoint(self) -> str:
        """The endpoint actually bound (ZMQ_LAST_ENDPOINT: real port for ``:*``)."""
        if self._endpoint is None:
            raise RuntimeError("delegate is not bound yet (call start() or bind())")
        return self._endpoint

    @property
    def mode(self) -> str:
        return "cost+offload" if self.offload is not None else "cost"

    @property
    def answered(self) -> int:
        """Calls answered with a RESULT so far."""
        return self._n_answered

    def welcome_info(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "workers": self.workers,
            "delay_us": self.delay_us,
            "mode": self.mode,
            "wire_version": wire.WIRE_VERSION,
            "version": __version__,
            "clock": "CLOCK_MONOTONIC",
            "max_frame": wire.MAX_FRAME,
            "curve": self.curve_keys is not None,
            "transport": self.transport,
            **(self.service.info() if self.service is not None else {}),
        }

    def status_line(self) -> str:
        return (
            f"testbed delegate: listening on {self.bound_endpoint} "
            f"(workers {self.workers}, delay {self.delay_us:g} us, mode {self.mode}, "
            f"wire v{wire.WIRE_VERSION}{', CURVE' if self.curve_keys else ''}, "
            f"transport {self.transport}, pid {os.getpid()})"
        )

    # ------------------------------------------------------------ accounting

    def count_answered(self) -> None:
        n = next(self._answered)  # atomic under the GIL
        self._n_answered = n
        if self.max_calls is not None and n >= self.max_calls:
            self._stop_requested = True

    def client_stats(self, ident: bytes) -> dict[str, Any]:
        """Accounting of one client (merged across worker threads)."""
        parts = [c for h in self._handlers if (c := h.clients.get(ident)) is not None]
        return self._merge(parts)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-client accounting keyed by the hex ROUTER identity."""
        idents: dict[bytes, None] = {}
        for h in self._handlers:
            idents.update(dict.fromkeys(list(h.clients)))
        return {ident.hex(): self.client_stats(ident) for ident in idents}

    @staticmethod
    def _merge(parts: list[_Client]) -> dict[str, Any]:
        offset = time.time_ns() - time.monotonic_ns()
        if not parts:
            return {"calls": 0, "errors": 0, "bytes_in": 0}
        first = min(c.first_ns for c in parts)
        last = max(c.last_ns for c in parts)
        return {
            "calls": sum(c.calls for c in parts),
            "errors": sum(c.errors for c in parts),
            "bytes_in": sum(c.bytes_in for c in parts),
            "first_seen": (first + offset) / 1e9,
            "last_seen": (last + offset) / 1e9,
            "peer": next((c.peer for c in parts if c.peer), ""),
        }

    def accounting_lines(self) -> list[str]:
        """One human-readable line per client (printed on shutdown)."""
        lines = []
        for ident, s in sorted(self.stats().items(), key=lambda kv: kv[1].get("first_seen", 0)):
            first = time.strftime("%H:%M:%S", time.localtime(s["first_seen"]))
            last = time.strftime("%H:%M:%S", time.localtime(s["last_seen"]))
            peer = f" ({s['peer']})" if s["peer"] else ""
            lines.append(
                f"testbed delegate: client {ident}{peer}: calls {s['calls']}, "
                f"errors {s['errors']}, bytes in {s['bytes_in']}, first {first}, last {last}"
            )
        return lines

    # ------------------------------------------------------------ lifecycle

    def bind(self) -> str:
        """Create the ROUTER socket and bind it; return the bound endpoint."""
        if self._endpoint is not None:
            return self._endpoint
        try:  # catch what libzmq would silently accept (a TCP port above 65535 wraps)
            keys.parse_endpoint(self.listen)
        except keys.EndpointError as exc:
            raise TestbedError(f"cannot listen on {self.listen}: {exc}") from None
        self.transport = self._choose_transport()
        if self.transport in ("zmtp", "shm"):
            self._raw = router.Router(
                self.listen,
                max_connections=connection_cap(self.workers, self.offload is not None),
                max_frame=HARD_MAX_FRAME,
                max_backlog=MAX_BACKLOG,
                max_parts=MAX_PARTS,
                on_close=self._forget,
            )
            try:
                self._endpoint = self._raw.bind()
            except BaseException:
                self._close()
                raise
            return self._endpoint
        path = self.listen[6:] if self.listen.startswith("ipc://") else ""
        if path and path != "*" and not path.startswith("@"):  # a file, not abstract
            # libzmq would unlink whatever is there (a file, a live listener's socket)
            router.prepare_ipc_path(path)
        ctx = zmq.Context()
        self._ctx = ctx
        try:
            rsock = self._router = ctx.socket(zmq.ROUTER)
            rsock.setsockopt(zmq.LINGER, 0)
            rsock.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_FRAME)
            # per peer, in messages: at most limits.OUT_MAX bytes; beyond it replies are dropped
            # (with --service-us they go out without ROUTER_MANDATORY: SEND_HWM, dropped beyond)
            small = self.offload is not None and self.service is None
            rsock.setsockopt(zmq.SNDHWM, send_hwm(small))
            rsock.setsockopt(zmq.RCVHWM, RECV_HWM)  # per peer; beyond it TCP pushes back
            if self.service is None:  # see _send_again
                rsock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # greeting, READY (CURVE: HELLO .. READY) complete within this, else closed
            rsock.setsockopt(zmq.HANDSHAKE_IVL, int(limits.HANDSHAKE_TIMEOUT_S * 1000))
            if self.curve_keys is not None:
                self._auth = keys.setup_server(ctx, rsock, self.curve_keys)
            try:
                if self.workers == 1:  # first, so LAST_ENDPOINT names the listening one
                    rsock.bind(self._ctl_endpoint)
                rsock.bind(self.listen)
            except zmq.ZMQError as exc:
                raise TestbedError(
                    f"cannot listen on {self.listen}: {zmq.strerror(exc.errno)}"
                ) from None
            endpoint = rsock.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._start_guard()
            if self.workers > 1 and self.service is None:
                self._pool = WorkerPool(
                    ctx,
                    self.workers,
                    f"inproc://tb-delegate-{id(self):x}-workers",
                    self.offload is not None,
                    lambda: self._stop_requested,
                )
        except BaseException as exc:
            self._close()
            if isinstance(exc, zmq.ZMQError):
                raise TestbedError(self._setup_error(exc)) from None
            raise
        self._endpoint = endpoint
        return self._endpoint

    def _choose_transport(self) -> str:
        """``"zmtp"`` (:class:`testbed.delegate.router.Router`, no libzmq) where it serves, else ``"libzmq"``."""
        if shmring.is_shm(self.listen):
            return self._choose_shm()
        if self.transport_asked == "libzmq":
            return "libzmq"
        why = None
        if self.curve_keys is not None:
            why = "CURVE needs libzmq"
        elif self.workers > 1 or self.service is not None:
            why = "--workers > 1 and --service-us serve through libzmq's inproc sockets"
        elif not router.serves(self.listen):
            why = "it serves tcp://ADDR:PORT (IPv4 or *) and ipc://PATH only"
        elif self.transport_asked == "auto" and zmtp.disabled_by_env():
            why = f"{zmtp.ENV}=0"
        if why is None:
            return "zmtp"
        if self.transport_asked == "zmtp":
            raise TestbedError(f"cannot serve {self.listen} with transport zmtp: {why}")
        return "libzmq"

    def _choose_shm(self) -> str:
        """``shm://PATH``: only the raw router serves it (libzmq has no such transport)."""
        why = None
        if self.transport_asked == "libzmq":
            why = "libzmq has no shared-memory transport (use --transport auto)"
        elif self.curve_keys is not None:
            why = "CURVE needs libzmq (a same-node delegate needs no encryption; use ipc:// for it)"
        elif self.workers > 1 or self.service is not None:
            why = "--workers > 1 and --service-us serve through libzmq's inproc sockets"
        if why is not None:
            raise TestbedError(f"cannot serve {self.listen}: {why}")
        return "shm"

    def _forget(self, key: bytes) -> None:
        """A connection ended (raw ZMTP: its identity; libzmq: the key of
        :meth:`ConnectionGuard.conn_key`): its offload state goes with it."""
        if self.offload is not None:
            self.offload.forget(key)

    def _start_guard(self) -> None:
        self._guard = ConnectionGuard(
            self._ctx,
            self._router,
            connection_cap(self.workers, self.offload is not None),
            MAX_BACKLOG,
            message_timeout=limits.MESSAGE_TIMEOUT_S,
            idle_timeout=limits.IDLE_TIMEOUT_S,
            peer_memory_max=limits.PEER_MEMORY_MAX,
            global_memory_max=limits.GLOBAL_MEMORY_MAX,
            max_frame=HARD_MAX_FRAME,
            loop_marks=self.service is None,  # the service's queue keeps the loop from sticking
            on_gone=self._forget,
        )
        self._guard.start()

    def _setup_error(self, exc: zmq.ZMQError) -> str:
        """One line for a failure to create the delegate's sockets."""
        what = f"cannot start the delegate with {self.workers} workers: {zmq.strerror(exc.errno)}"
        if exc.errno == errno.EMFILE:
            soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            what += f" (ulimit -n is {soft}; use fewer --workers or raise it)"
        return what

    def start(self) -> Delegate:
        """Bind and serve in a background thread; returns self (once: a second call is a no-op).

        ``with Delegate(...).start()`` is therefore safe: a second serving thread
        on the same socket would make libzmq abort.
        """
        if self._thread is not None:
            return self
        self.bind()
        self._thread = threading.Thread(target=self._serve_catch, name="tb-delegate", daemon=True)
        self._thread.start()
        return self

    def _serve_catch(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # kept for the CLI to report, not printed twice
            self._error = exc

    def serve_forever(self) -> None:
        """Bind (if needed) and serve in the calling thread until stopped.

        Stop it from another thread with :meth:`request_stop`.  To stop on
        signals, serve with :meth:`start` and wait in the main thread as
        :func:`serve_until_stopped` does: a handler cannot run while the main thread
        is blocked inside libzmq.
        """
        self.bind()
        self._serve()

    def request_stop(self) -> None:
        """Ask the serving loop to finish its in-flight reply and stop (signal-safe)."""
        if self._stop_requested and self._stopped.is_set():
            return
        self._stop_requested = True
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and wait (bounded) for the serving thread to finish."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._stopped.wait(timeout)

    @property
    def stop_requested(self) -> bool:
        """True once a stop was asked for (signal, :meth:`request_stop`, ``max_calls``)."""
        return self._stop_requested

    @property
    def error(self) -> BaseException | None:
        """What ended the serving thread of :meth:`start`, if it failed."""
        return self._error

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (bounded by ``timeout``) until serving has ended; True if it has.

        After :meth:`start` this also joins the serving thread (``timeout`` more).
        """
        if not self._stopped.wait(timeout):
            return False
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def close(self) -> None:
        """Close the sockets and the context now (idempotent; after serving, or instead)."""
        self._close()

    def __enter__(self) -> Delegate:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wake(self) -> None:
        if self._raw is not None:
            if not self._stopped.is_set():
                self._raw.wake()
            return
        ctx = self._ctx
        if ctx is None or self._stopped.is_set():
            return
        if self.workers > 1:
            return  # the serving loop and workers poll the stop flag every POLL_MS
        with self._lock:  # re-entrant: a second signal may arrive in here
            try:
                s = ctx.socket(zmq.DEALER)
            except zmq.ZMQError:
                return  # context already closing: the loop is ending anyway
            try:
                s.setsockopt(zmq.ROUTING_ID, self._ctl_id)
                s.setsockopt(zmq.LINGER, 200)
                s.connect(self._ctl_endpoint)
                s.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            finally:
                s.close()

    # ------------------------------------------------------------ serving

    def _serve(self) -> None:
        try:
            if self._raw is not None:
                self._serve_raw()
            else:
                self._serve_router(self._dispatcher())
        finally:
            self._close()
            self._stopped.set()
            if self.on_stop is not None:
                self.on_stop()

    def _close(self) -> None:
        """Close the sockets (bounded linger) and the context; idempotent.

        ``Context.destroy`` closes any socket still open, so a failure half-way
        through setup can never leave ``term()`` waiting forever.
        """
        if self._raw is not None:
            self._raw.close()
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._router is not None:
            self._router.close(CLOSE_LINGER_MS)
            self._router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.destroy(linger=CLOSE_LINGER_MS)

    def _new_handler(self, idents_are_keys: bool = False) -> Handler:
        """A handler for one serving thread, its accounting merged into :meth:`stats`."""
        handler = Handler(self, idents_are_keys)
        self._handlers.append(handler)
        return handler

    def _dispatcher(self) -> Dispatcher:
        """The dispatcher of this layout: the service's queue, the worker pool or inline."""
        if self.service is not None:
            answerers = [self._new_handler() for _ in range(self.workers)]
            endpoint = f"inproc://tb-delegate-{id(self):x}-replies"
            return self.service.dispatcher(self._ctx, answerers, endpoint)
        if self._pool is not None:
            answerers = [self._new_handler() for _ in range(self.workers)]
            self._pool.start(answerers)
            return self._pool
        return Inline(self._new_handler())

    def _serve_raw(self) -> None:
        """Transport ``zmtp``: the :class:`testbed.delegate.router.Router` loop, no libzmq;
        it answers inline, the identity keying the offload state."""
        handler = self._new_handler(idents_are_keys=True)
        self._raw.serve(
            handler.handle,
            handler.bad_envelope,
            lambda: self._stop_requested,
            DRAIN_NS,
            CLOSE_LINGER_MS * 1_000_000,
        )

    def _serve_router(self, dispatcher: Dispatcher) -> None:
        """Transport ``libzmq``: take every message off the ROUTER, hand each request
        to ``dispatcher``, send the replies; until stopped, then drain.

        With replies only now (:class:`Inline`) the loop blocks in ``recv`` (a
        stop wakes it, :meth:`_wake`) and drains what is queued without
        blocking, bounded in time; else it polls the ROUTER and
        ``dispatcher.replies`` and drains until the dispatcher is idle or
        ``dispatcher.drain_ns`` passed.  Then the dispatcher's workers are joined
        and their last replies sent.

        Hand-rolled ``recv``/``send`` instead of ``recv_multipart`` /
        ``send_multipart`` and ``getsockopt(RCVMORE)``: those cost several
        microseconds each in pyzmq, on the measured path.
        """
        sock = self._router
        recv = sock.recv
        send = sock.send
        mono = time.monotonic_ns
        take = self._intake(sock, dispatcher.dispatch)
        ctl = self._ctl_id
        g = self._guard
        replies = dispatcher.replies
        wait = None
        if replies is not None:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(replies, zmq.POLLIN)
            wait = functools.partial(_wait, poller.poll, replies, sock, dispatcher.replies_per_turn)
        deadline = None
        try:
            while True:
                if self._stop_requested:  # drain what is queued, bounded in time
                    if deadline is None:
                        deadline = mono() + dispatcher.drain_ns
                        dispatcher.stopping()
                        if wait is None:
                            recv = functools.partial(sock.recv, NOBLOCK)
                    if mono() > deadline or dispatcher.idle():
                        break
                if wait is not None and not wait():
                    continue  # no request: replies passed on, or a poll timeout
                try:
                    ident = recv()
                except zmq.Again:
                    break  # draining, and nothing more is queued
                frame = sock.recv(copy=False)  # the rest of a message is there already
                t_recv = mono()
                if ident == ctl:  # a wake-up from request_stop (inproc, never multipart)
                    continue
                env, reply = take(ident, frame, t_recv)
                if reply is not None:
                    try:
                        for part in env:
                            send(part, SNDMORE_NOBLOCK)
                        send(reply, NOBLOCK)
                    except zmq.Again:
                        _send_again(sock, (*env, reply))
                    except zmq.ZMQError:
                        pass  # the peer vanished: nothing to do
                if g is not None:
                    g.current = -1  # waiting again (the guard's "loop stuck" test)
        finally:
            self._stop_requested = True  # the workers stop too, whatever ended the loop
            dispatcher.join()
            if replies is not None:
                while replies.poll(0):  # the replies the workers computed last
                    _forward_out(replies, sock)
            dispatcher.close()

    def _intake(
        self, sock: zmq.Socket, dispatch: Callable
    ) -> Callable[[bytes, zmq.Frame, int], tuple]:
        """``take(ident, frame, t_recv) -> (env, reply)``: the one intake step of a
        message taken off the ROUTER ``sock`` (``ident`` and its first ``frame``,
        received at ``t_recv``), whatever the dispatcher.

        Marks the message's connection (``ZMQ_SRCFD``) as having delivered a whole
        message for the connection guard; reads the rest of the message, keeping
        ``MAX_PARTS`` parts, and its envelope (:func:`~testbed.delegate.dispatch.split_envelope`);
        with offload, takes the key of its connection's offload state for an
        offload call (its encoding always ends with its mode) or a BYE
        (:meth:`ConnectionGuard.conn_key`; None for an inproc peer or a
        connection that has ended: the handler answers an offload call with an
        error).  Then hands the request to ``dispatch`` (a
        :meth:`~testbed.delegate.dispatch.Dispatcher.dispatch`) and returns its
        reply, or the ERROR for a malformed envelope, with the envelope to send
        it with (``reply`` None: none now).
        """
        g = self._guard
        recv = sock.recv
        keyed = g is not None and self.offload is not None
        rx = self._new_handler()  # accounting of malformed envelopes

        def take(ident: bytes, frame: zmq.Frame, t_recv: int):
            fd = -1
            if g is not None:
                try:
                    fd = frame.get(SRCFD)
                except zmq.ZMQError:
                    pass  # an inproc peer: no connection to guard
                else:
                    g.delivered(fd)
            env: tuple[bytes, ...] = (ident,)
            if frame.more:  # [identity, "", payload] (a REQ) or malformed: bounded parts
                parts, nparts, nbytes = [frame], 1, len(frame)
                while frame.more:  # libzmq delivers whole messages: every part is here
                    frame = recv(copy=False)
                    nparts += 1
                    nbytes += len(frame)
                    if nparts <= MAX_PARTS:
                        parts.append(frame)
                split = split_envelope(parts, nparts)
                if split is None:
                    return env, rx.bad_envelope(ident, nparts, nbytes, t_recv)
                env += split[0]
                frame = split[1]
            key = None
            if keyed and fd >= 0:
                payload = frame.buffer
                if payload[-7:] == b"offload" or payload[:6] == _BYE_HEAD:
                    try:
                        key = g.conn_key(ident, fd)
                    except OSError:
                        pass  # the connection has ended since the message came
            return env, dispatch(env, frame, t_recv, key)

        return take


def _wait(poll: Callable, replies: zmq.Socket, router_sock: zmq.Socket, turn: int) -> bool:
    """Poll the ROUTER and a dispatcher's ``replies`` (``POLL_MS`` at most); pass
    replies on (``turn`` more in a row while there are); True if a request waits."""
    request = False
    for s, _ in poll(POLL_MS):
        if s is replies:
            _forward_out(replies, router_sock)
            for _ in range(turn):  # offload: replies of 1 MiB, pass them on first
                if not replies.getsockopt(zmq.EVENTS) & POLLIN:
                    break
                _forward_out(replies, router_sock)
        else:
            request = True
    return request


def _forward_out(backend: zmq.Socket, router: zmq.Socket) -> None:
    """Move one whole reply from the workers to the ROUTER (never blocking on a peer)."""
    recv = backend.recv
    frame = recv(copy=False)  # the identity; a whole message is there already
    parts = [frame]
    while frame.more:
        frame = recv(copy=False)
        parts.append(frame)
    send = router.send
    try:
        for part in parts[:-1]:
            send(part, SNDMORE_NOBLOCK)
        send(parts[-1], NOBLOCK)
    except zmq.Again:
        _send_again(router, parts)
    except zmq.ZMQError:
        pass  # the peer vanished: nothing to do


def _send_again(router: zmq.Socket, parts: tuple | list) -> None:
    """Send a reply the ROUTER refused as over its high-water mark once more, after it
    has caught up with what the peer read; if still refused, drop it (ROUTER policy).

    libzmq tells a socket how many messages a peer has read only now and then
    (every ``(SNDHWM + 1) // 2`` of them, a command the socket processes when it
    gets to it), so with a small SNDHWM a peer that reads every reply can look
    full: without ``ROUTER_MANDATORY`` its reply was dropped silently (seen with
    SNDHWM 8 and 16 and a client making one call at a time).  ``ZMQ_EVENTS``
    processes the pending commands.
    """
    router.getsockopt(zmq.EVENTS)
    try:
        for part in parts[:-1]:
            router.send(part, SNDMORE_NOBLOCK)
        router.send(parts[-1], NOBLOCK)
    except zmq.ZMQError:
        pass  # really full (a peer that does not read), or it vanished: dropped


# ---------------------------------------------------------------- CLI


def serve_until_stopped(
    delegate: Delegate,
    user: str | None = None,
    on_ready: Callable[[Delegate], None] | None = None,
) -> None:
    """``testbed delegate``: bind, serve until SIGINT/SIGTERM or ``max_calls``, close.

    Main thread only (signal handlers).  Started as root with ``user``, sets
    what the kernel keeps per thread (``no_new_privs``, the capability bounding
    set) before any other thread exists, and drops to that user after binding
    and reading the keys, before the first message (:mod:`testbed.delegate.privileges`).
    ``on_ready`` is called once bound (the CLI prints the status line there).
    On return the sockets are closed and SIGINT/SIGTERM are handed back
    (:func:`_after_shutdown`); a failure of the serving thread is raised.
    """

    def on_signal(signum: int, frame: object) -> None:
        delegate.request_stop()

    # handlers first: a signal arriving right after the status line must stop us cleanly
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            if user:  # before the ZeroMQ context, the guard, the authenticator: every thread
                restrict(user)
            delegate.bind()
            if user:
                drop_privileges(user)  # after bind and keys, before the first message
            if on_ready is not None:
                on_ready(delegate)
            if not delegate.stop_requested:
                # Serve in a thread; the main thread only waits.  Python runs signal
                # handlers in the main thread between bytecodes: had the main thread
                # been blocked inside libzmq when a signal came, its handler would
                # not run until the next message arrived (a lost wake-up).
                delegate.start()
                while not delegate.wait(0.25):
                    pass
                err = delegate.error
                if isinstance(err, zmq.ZMQError | RuntimeError | OSError):  # no more threads
                    raise TestbedError(f"delegate stopped: {err}") from None
                if err is not None:
                    raise err
        finally:
            delegate.close()
    finally:
        _after_shutdown(old)


def make_delegate(
    listen: str,
    *,
    workers: int = 1,
    delay_us: float = 0.0,
    service_us: float | None = None,
    service: str = "sleep",
    service_dist: str = "exp",
    seed: int = 0,
    record: bool = False,
    offload_root: str | None = None,
    offload_max_fds: int | None = None,
    offload_idle_timeout: float | None = None,
    insecure: bool = False,
    max_calls: int | None = None,
    curve_keys: str | None = None,
    transport: str = "auto",
) -> Delegate:
    """The :class:`Delegate` of ``testbed delegate`` (offload executor, service queue).

    A :class:`~testbed.delegate.service.Service` queue serves the calls when
    ``service_us`` is given or ``record`` asks for the delegate's own record of
    its queue; ``offload_*``, ``insecure`` and ``curve_keys`` are checked by
    :func:`testbed.delegate.offload.offload_executor`.
    """

    offload = offload_executor(
        listen,
        root=offload_root,
        max_fds=offload_max_fds,
        idle_timeout_s=offload_idle_timeout,
        insecure=insecure,
        curve_keys=curve_keys,
    )
    queue = None
    if service_us is not None or record:
        queue = Service(service_us or 0.0, service, service_dist, seed)
    return Delegate(
        listen,
        workers=workers,
        delay_us=delay_us,
        offload=offload,
        max_calls=max_calls,
        curve_keys=curve_keys,
        service=queue,
        transport=transport,
    )


def _after_shutdown(old: dict[int, Any]) -> None:
    """Hand SIGINT/SIGTERM back once the delegate has shut down.

    A signal arriving now (a service manager's second SIGTERM, a second ^C) asks
    for what is already happening, so it must not turn a clean exit into death by
    signal (exit status -15, summary lost) or a ``KeyboardInterrupt`` traceback
    during interpreter teardown: where the previous handler was the process
    default it is replaced by SIG_IGN; a handler an embedding caller installed
    is restored.
    """
    for s, h in old.items():
        default = h in (signal.SIG_DFL, signal.default_int_handler, None)
        signal.signal(s, signal.SIG_IGN if default else h)
