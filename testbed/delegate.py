"""The delegate daemon: answers forwarded system calls from relays (ZMTP, the ZeroMQ protocol).

``testbed delegate --listen ENDPOINT`` binds a ROUTER and answers every frame
with a :mod:`testbed.wire` frame (protocol in ``docs/wire.md``).  The ROUTER is
:class:`testbed.router.Router` (ZMTP served on plain sockets, no libzmq:
``--transport zmtp``, the default where it serves) or a libzmq ROUTER socket
(CURVE, ``workers > 1``, ``--service-us``, other endpoints, ``TESTBED_ZMTP=0``):

* HELLO  -> WELCOME (host, pid, workers, delay, mode, versions)
* CALL   -> RESULT with the four delegate-clock timestamps, or ERROR
* BYE    -> BYE with the accounting of that client
* STATS  -> STATS: the delegate's CPU time and CPUs (``testbed.cpus.process_stats``)
* anything malformed -> ERROR to that client; the delegate keeps serving.

Threading (one of four layouts, chosen by the transport, ``workers`` and ``--service-us``):

transport ``zmtp`` (``workers == 1``; the measured path)
    One thread runs the router's ``epoll`` loop: read, stamp ``t_recv``,
    decode, spin the injected delay, stamp, encode, send.  No other thread.
``workers == 1`` (libzmq)
    One thread serves the ROUTER directly: receive, stamp ``t_recv``, decode,
    spin the injected delay, stamp, encode, send.  No inproc hop.
``workers > 1``
    A front loop in the serving thread moves whole messages between the
    ROUTER and an inproc DEALER, marking each message's connection
    (``ZMQ_SRCFD``) for the backlog bound of :mod:`testbed.connguard`; N
    worker threads each own a DEALER socket connected to it and receive
    ``[identity, frame]`` envelopes round-robin.  ``t_recv`` is stamped in the
    worker that takes the frame off its socket, so the front hop counts as
    *wire*, not as *residence*.  The injected delay spins with
    ``os.sched_yield`` so the workers' spins overlap despite the GIL.
``--service-us S`` (any ``workers``)
    One FIFO queue shared by the workers, each call served for a drawn time
    and recorded (:mod:`testbed.service`, ``docs/contention.md``).

Shutdown (SIGINT/SIGTERM, ``--max-calls``, :meth:`Delegate.stop`): the reply
being computed is sent, messages already queued are answered (bounded: 0.2 s),
then the sockets close with a 100 ms linger and the process exits 0.
``--curve-keys DIR`` makes the ROUTER a CURVE server admitting only the relay
keys in ``DIR/authorized`` (:mod:`testbed.keys`); ``--user NAME`` drops root
after binding and reading the keys, every thread (:mod:`testbed.privileges`).

The limits of :mod:`testbed.limits` are kept by :class:`testbed.router.Router`
itself (``zmtp``) or, under libzmq, by socket options (``ZMQ_HANDSHAKE_IVL``,
``ZMQ_MAXMSGSIZE``, the high-water marks: :func:`send_hwm`) and by
:class:`testbed.connguard.ConnectionGuard` (connections, backlog, memory held,
message and idle timeouts); :func:`connection_cap` shares the fd limit with
the offload executor.  Offload state belongs to a connection: under libzmq it
is keyed by identity and socket inode and forgotten when the connection ends.

Cost mode acknowledges a call (ret 0, errno 0) without executing it; offload
mode is delegated to an :class:`OffloadExecutor` (``testbed.offload``, built
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
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from testbed import cpus, keys, limits, router, syscalls, wire, zmtp
from testbed.connguard import ConnectionGuard
from testbed.errors import TestbedError
from testbed.privileges import drop_privileges, restrict

#: ZMQ_MAXMSGSIZE: libzmq drops the *connection* of a peer sending a bigger
#: frame (it never reaches us).  Frames between ``wire.MAX_FRAME`` and this cap
#: are received and answered with ERROR ``too-large``.
HARD_MAX_FRAME = wire.MAX_FRAME + (64 << 10)

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

#: Bytes a connection may send without completing a message (an unterminated
#: multipart message) before it is cut (``testbed.connguard``): above the
#: legitimate backlog of RECV_HWM whole messages plus the kernel's buffer.
MAX_BACKLOG = RECV_HWM * HARD_MAX_FRAME + (16 << 20)

#: Parts of one message the serving loop keeps ([identity, "", payload] at
#: most); further parts are read and dropped, and the message is answered
#: with ERROR ``malformed``.
MAX_PARTS = 3

#: Open connections accepted (further ones are shut down at once); lowered to
#: fit under ``RLIMIT_NOFILE`` (see :func:`connection_cap`).
MAX_CONNECTIONS = 4096

#: How the delegate is reached: "auto" picks "zmtp" (:mod:`testbed.router`, no
#: libzmq) where it serves, else "libzmq".
TRANSPORTS = ("auto", "zmtp", "libzmq")

#: Linger (ms) when closing sockets on shutdown: long enough for the replies
#: already handed to libzmq to leave, bounded so shutdown never hangs.
CLOSE_LINGER_MS = 100

#: Bound on remembered clients (least recently seen dropped beyond it, O(1)).
MAX_CLIENTS = 65536

#: Worker receive timeout (ms) in the multi-worker layout: how often an idle
#: worker checks whether it should stop.
WORKER_POLL_MS = 50

#: On stop, queued messages are still answered for at most this long (ns).
DRAIN_NS = 200_000_000

#: ``workers > 1`` with offload: replies (up to ``syscalls.MAX_BUFFER`` bytes
#: each) the front loop passes on in a row before it looks at the ROUTER again,
#: so new requests cannot keep replies waiting in memory.
REPLIES_PER_TURN = 64

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


#: How a handler keys a client's offload state (:meth:`_Handler.offload_key`).
KEY_IDENT, KEY_GUARD, KEY_TAG = "ident", "guard", "tag"


class _Handler:
    """Turns one received message into one reply; owns one thread's accounting."""

    def __init__(self, delegate: Delegate, key_mode: str = KEY_IDENT):
        self.d = delegate
        self.clients: OrderedDict[bytes, _Client] = OrderedDict()  # least recently seen first
        self.delay_ns = delegate.delay_ns
        self.yield_gil = delegate.workers > 1
        self.service_slot = None  # (t_recv, found, worker) set by testbed.service
        #: KEY_IDENT: the identity is the connection's (raw ZMTP: forgotten on close);
        #: KEY_GUARD: the serving loop reads the ROUTER itself (guard.current);
        #: KEY_TAG: a worker behind the front loop, which tags offload messages
        self.key_mode = key_mode
        self.tag: bytes | None = None  # the key the front loop tagged this message with

    def offload_key(
        self, ident: bytes, required: bool = True, call_id: int | None = None
    ) -> bytes | None:
        """The key of this message's connection for the offload executor (its
        state belongs to the connection, not to the identity a peer chose)."""
        mode = self.key_mode
        if mode == KEY_IDENT:
            return ident
        if mode == KEY_TAG:
            key = self.tag
        else:
            guard = self.d._guard
            try:
                key = guard.conn_key(ident, guard.current) if guard is not None else None
            except OSError:
                key = None  # the connection has ended since the message came
        if key is None and required:
            raise wire.WireError(wire.E_INTERNAL, "the connection of this call has ended", call_id)
        return key

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

    def handle(self, ident: bytes, payload: bytes, t_recv: int) -> bytes:
        """The reply frame for one ``payload`` received from client ``ident``."""
        client = self._client(ident, t_recv)
        client.bytes_in += len(payload)
        client.last_ns = t_recv
        msg = None
        try:
            kind, msg = wire.decode(payload)
            if kind == wire.CALL:
                return self._call(client, ident, msg, t_recv)
            if kind == wire.HELLO:
                client.peer = _peer_label(msg)
                return wire.encode_welcome(self.d.welcome_info())
            if kind == wire.BYE:
                if self.d.offload is not None:
                    key = self.offload_key(ident, required=False)
                    if key is not None:
                        self.d.offload.forget(key)
                return wire.encode_bye(self.d.client_stats(ident))
            if kind == wire.STATS:  # CPU time for the relay's run record (testbed.cpus)
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

    def _call(self, client: _Client, ident: bytes, call: wire.Call, t_recv: int) -> bytes:
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
        if self.service_slot is not None:  # --service-us: queued, then served
            self.d.service.serve(*self.service_slot)
        if call.mode == "offload":
            key = self.offload_key(ident, call_id=call.call_id)
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
        service: Any = None,
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
        self.service = service  # a testbed.service.Service: one FIFO queue, W servers
        if transport not in TRANSPORTS:
            raise TestbedError(
                f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}"
            )
        self.transport_asked = transport
        self.transport = ""  # "zmtp" or "libzmq", chosen in bind()
        self._raw: router.Router | None = None
        self._auth = None
        self._ctx: zmq.Context | None = None
        self._router: zmq.Socket | None = None
        self._guard: ConnectionGuard | None = None
        self._pool_socks: list[zmq.Socket] = []
        self._endpoint: str | None = None
        self._handlers: list[_Handler] = []
        self._answered = itertools.count(1)
        self._n_answered = 0
        self._stop_requested = False
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._ctl_id = b"\x00tb-ctl-" + os.urandom(8)
        # heads the tag frame the front loop puts before an offload message for the
        # workers (``workers > 1``): never sent, so no peer can forge one
        self._tag_prefix = b"\x00tb-tag-" + os.urandom(16)
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
        from testbed import __version__

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
        if self.transport == "zmtp":
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
            # (testbed.service's loop sends without NOBLOCK: it keeps SEND_HWM, see _send_again)
            small = self.offload is not None and self.service is None
            rsock.setsockopt(zmq.SNDHWM, send_hwm(small))
            rsock.setsockopt(zmq.RCVHWM, RECV_HWM)  # per peer; beyond it TCP pushes back
            if self.service is None:  # our loops send with NOBLOCK: see _send_again
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
                self._setup_pool()
        except BaseException as exc:
            self._close()
            if isinstance(exc, zmq.ZMQError):
                raise TestbedError(self._setup_error(exc)) from None
            raise
        self._endpoint = endpoint
        return self._endpoint

    def _choose_transport(self) -> str:
        """``"zmtp"`` (:class:`testbed.router.Router`, no libzmq) where it serves, else ``"libzmq"``."""
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
            loop_marks=self.service is None,  # testbed.service's loop never clears it
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
            return  # the front loop and workers poll the stop flag every WORKER_POLL_MS
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
            if self.service is not None:
                from testbed.service import serve_queued

                serve_queued(self)
            elif self._raw is not None:
                self._serve_raw()
            elif self.workers == 1:
                self._serve_direct()
            else:
                self._serve_pool()
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
        for s in self._pool_socks:
            s.close(0)
        self._pool_socks.clear()
        if self._router is not None:
            self._router.close(CLOSE_LINGER_MS)
            self._router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.destroy(linger=CLOSE_LINGER_MS)

    def _serve_direct(self) -> None:
        """``workers == 1``: serve the ROUTER in this thread, no inproc hop."""
        handler = _Handler(self, KEY_GUARD)
        self._handlers.append(handler)
        self._loop(self._router, handler)

    def _serve_raw(self) -> None:
        """Transport ``zmtp``: the :class:`testbed.router.Router` loop, no libzmq."""
        handler = _Handler(self)
        self._handlers.append(handler)
        self._raw.serve(
            handler.handle,
            functools.partial(_answer_parts, handler),
            lambda: self._stop_requested,
            DRAIN_NS,
            CLOSE_LINGER_MS * 1_000_000,
        )

    def _loop(self, sock: zmq.Socket, handler: _Handler) -> None:
        """Receive, answer, repeat until stopped; then answer what is queued.

        Hand-rolled ``recv``/``send`` instead of ``recv_multipart`` /
        ``send_multipart`` and ``getsockopt(RCVMORE)``: those cost several
        microseconds each in pyzmq, on the measured path.
        """
        recv = sock.recv
        send = sock.send
        mono = time.monotonic_ns
        handle = handler.handle
        ctl = self._ctl_id
        # marks each message's fd, and g.current busy; None: a worker behind the front
        g = self._guard if sock is self._router else None
        # the ROUTER never blocks on a peer (ROUTER_MANDATORY + NOBLOCK); a worker's
        # DEALER blocks while the front loop is behind
        more, last = (SNDMORE_NOBLOCK, NOBLOCK) if sock is self._router else (SNDMORE, 0)
        deadline = None
        while True:
            if self._stop_requested:  # drain what is queued, bounded in count and time
                if deadline is None:
                    deadline = mono() + DRAIN_NS
                    recv = functools.partial(sock.recv, zmq.NOBLOCK)
                elif mono() > deadline:
                    break
            try:
                ident = recv()
            except zmq.Again:
                if deadline is not None:
                    break
                continue  # worker receive timeout: look at the stop flag
            frame = sock.recv(copy=False)  # the rest of a message is there already
            t_recv = mono()
            if ident == ctl:  # a wake-up from request_stop (inproc, never multipart)
                continue
            if g is not None:
                mark_delivered(g, frame)
            if not frame.more:  # [identity, payload]: a DEALER client (the relay)
                reply = handle(ident, frame.bytes, t_recv)
                env = (ident,)
            else:
                reply, env = self._multipart(sock, handler, ident, frame, t_recv, g is None)
            try:
                for part in env:
                    send(part, more)
                send(reply, last)
            except zmq.Again:
                _send_again(sock, (*env, reply))
            except zmq.ZMQError:
                pass  # the peer vanished: nothing to do
            if g is not None:
                g.current = -1  # waiting again (the guard's "loop stuck" test)

    def _multipart(
        self,
        sock: zmq.Socket,
        handler: _Handler,
        ident: bytes,
        frame: zmq.Frame,
        t_recv: int,
        tagged: bool = False,
    ) -> tuple[bytes, tuple[bytes, ...]]:
        """Reply to a message of several parts; keeps at most MAX_PARTS of them.

        ``tagged``: ``sock`` is a worker's, behind the front loop, which may put a
        tag frame (the offload key of the message's connection) before the
        identity (:meth:`_tag`); from the ROUTER itself a first part is always
        the peer's identity, never a tag.
        """
        frames = [frame.bytes]
        parts, nbytes = 1, len(frame)
        while frame.more:  # libzmq delivers whole messages: every part is here already
            frame = sock.recv(copy=False)
            parts += 1
            nbytes += len(frame)
            if parts <= MAX_PARTS:
                frames.append(frame.bytes)
        prefix = self._tag_prefix
        if tagged and ident[: len(prefix)] == prefix and parts <= MAX_PARTS:
            handler.tag = ident[len(prefix) :]
            ident, frames = frames[0], frames[1:]
            parts, nbytes = parts - 1, nbytes - len(ident)
            try:
                if parts == 1:
                    return handler.handle(ident, frames[0], t_recv), (ident,)
                reply, env = _answer_parts(handler, ident, frames, parts, nbytes, t_recv)
            finally:
                handler.tag = None
            return reply, (ident, *env)
        reply, env = _answer_parts(handler, ident, frames, parts, nbytes, t_recv)
        return reply, (ident, *env)

    def _setup_pool(self) -> None:
        """``workers > 1``: create every socket before serving (errors surface in bind)."""
        ctx = self._ctx
        backend_ep = f"inproc://tb-delegate-{id(self):x}-workers"
        socks = self._pool_socks
        backend = ctx.socket(zmq.DEALER)
        socks.append(backend)
        backend.setsockopt(zmq.LINGER, 0)
        backend.setsockopt(zmq.SNDHWM, RECV_HWM * self.workers)
        backend.setsockopt(zmq.RCVHWM, SEND_HWM)  # replies pass on at once (ROUTER: send_hwm)
        backend.bind(backend_ep)
        for _ in range(self.workers):
            sock = ctx.socket(zmq.DEALER)
            socks.append(sock)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, WORKER_POLL_MS)
            sock.setsockopt(zmq.RCVHWM, RECV_HWM)
            sock.connect(backend_ep)

    def _serve_pool(self) -> None:
        """``workers > 1``: front loop ROUTER <-> inproc DEALER <-> N worker threads."""
        backend, *worker_socks = self._pool_socks
        workers = []
        for i, sock in enumerate(worker_socks):
            handler = _Handler(self, KEY_TAG)
            self._handlers.append(handler)
            t = threading.Thread(
                target=self._worker, args=(sock, handler), name=f"tb-delegate-w{i}", daemon=True
            )
            workers.append(t)
        for t in workers:
            t.start()
        try:
            self._front(backend, workers)
        finally:
            self._stop_requested = True
            for t in workers:
                t.join(5.0)
            backend.close(0)
            self._pool_socks.clear()

    def _front(self, backend: zmq.Socket, workers: list[threading.Thread]) -> None:
        """Forward whole messages ROUTER <-> workers until stopped and drained.

        Replaces libzmq's C proxy, which drops ``ZMQ_SRCFD``: every message
        from a peer is attributed to its connection here (the backlog bound of
        :mod:`testbed.connguard`), exactly as :meth:`_loop` does for one worker.
        """
        router = self._router
        g = self._guard
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(backend, zmq.POLLIN)
        poll = poller.poll
        mono = time.monotonic_ns
        drain = REPLIES_PER_TURN if self.offload is not None else 0
        deadline = None
        while True:
            if self._stop_requested:  # workers drain for DRAIN_NS; forward their replies
                if deadline is None:
                    deadline = mono() + DRAIN_NS + 2 * WORKER_POLL_MS * 1_000_000
                if mono() > deadline or not any(t.is_alive() for t in workers):
                    break
            for sock, _ in poll(WORKER_POLL_MS):
                if sock is router:
                    self._forward_in(router, backend)
                    if g is not None:
                        g.current = -1  # waiting again (the guard's "loop stuck" test)
                else:
                    _forward_out(backend, router)
                    for _ in range(drain):  # offload: replies of 1 MiB, pass them on first
                        if not backend.getsockopt(zmq.EVENTS) & POLLIN:
                            break
                        _forward_out(backend, router)
        while backend.poll(0):  # replies the workers computed last
            _forward_out(backend, router)

    def _forward_in(self, router: zmq.Socket, backend: zmq.Socket) -> None:
        """Move one whole message from the ROUTER to the workers: mark its connection
        for the guard, and with offload tag a call or BYE with its connection's key."""
        recv, send = router.recv, backend.send
        ident = recv(copy=False)  # a whole message is there already
        frame = recv(copy=False)
        fd = mark_delivered(self._guard, frame)
        tag = None
        head: tuple[zmq.Frame, ...] = ()
        if fd >= 0 and self.offload is not None:
            if frame.more and len(frame) == 0:  # ["", payload]: a REQ client
                head, frame = (frame,), recv(copy=False)
            if not frame.more:
                tag = self._tag(ident.bytes, frame, fd)
        try:
            if tag is not None:
                send(tag, SNDMORE)
            send(ident, SNDMORE)
            for part in head:
                send(part, SNDMORE)
            while frame.more:
                send(frame, SNDMORE)
                frame = recv(copy=False)
            send(frame)
        except zmq.ZMQError:  # peer vanished or its queue is full: drop the rest
            while frame.more:
                frame = recv(copy=False)

    def _tag(self, ident: bytes, frame: zmq.Frame, fd: int) -> bytes | None:
        """The tag frame for a message whose payload is ``frame`` from connection ``fd``:
        the prefix and :meth:`connection_key`; None where that is None."""
        key = self.connection_key(ident, frame.buffer, fd)
        return None if key is None else self._tag_prefix + key

    def connection_key(self, ident: bytes, payload, fd: int) -> bytes | None:
        """For an offload call (its encoding always ends with its mode) or a BYE
        received from connection ``fd``: the key of that connection's offload state
        (:meth:`ConnectionGuard.conn_key`); None for anything else, or if the
        connection has ended (the handler then answers an error)."""
        if payload[-7:] != b"offload" and payload[:6] != _BYE_HEAD:
            return None
        try:
            return self._guard.conn_key(ident, fd)
        except OSError:
            return None

    def _worker(self, sock: zmq.Socket, handler: _Handler) -> None:
        try:
            self._loop(sock, handler)
        finally:
            sock.close(CLOSE_LINGER_MS)


def mark_delivered(guard: ConnectionGuard | None, frame: zmq.Frame) -> int:
    """The fd of the connection ``frame`` came from (``ZMQ_SRCFD``), marked as having
    delivered a whole message for ``guard``; -1 for an inproc peer or without a guard.
    Every libzmq serving loop takes its messages through here."""
    if guard is None:
        return -1
    try:
        fd = frame.get(SRCFD)
    except zmq.ZMQError:
        return -1  # an inproc peer: no connection to guard
    guard.delivered(fd)
    return fd


def _answer_parts(
    handler: _Handler, ident: bytes, frames: list[bytes], parts: int, nbytes: int, t_recv: int
) -> tuple[bytes, tuple[bytes, ...]]:
    """The reply to a message of ``parts`` parts (``frames``: the first MAX_PARTS of them)
    and the envelope parts that go before it (after the routing identity)."""
    if parts == 2 and frames[0] == b"":  # ["", payload]: a REQ client
        return handler.handle(ident, frames[1], t_recv), (b"",)
    return handler.bad_envelope(ident, parts, nbytes, t_recv), ()


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
    and reading the keys, before the first message (:mod:`testbed.privileges`).
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


def delegate_from_args(args: Any) -> Delegate:
    """The :class:`Delegate` the ``testbed delegate`` options describe (offload, service)."""
    from testbed.offload import executor_from_args

    offload = executor_from_args(args)
    service = None
    if getattr(args, "service_us", None) is not None or getattr(args, "record", None):
        from testbed.service import Service

        service = Service(args.service_us or 0.0, args.service, args.service_dist, args.seed)
    return Delegate(
        args.listen,
        workers=args.workers,
        delay_us=args.delay_us,
        offload=offload,
        max_calls=getattr(args, "max_calls", None),
        curve_keys=getattr(args, "curve_keys", None),
        service=service,
        transport=getattr(args, "transport", "auto"),
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
