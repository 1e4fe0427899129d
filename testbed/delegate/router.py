"""The delegate's ROUTER without libzmq: ZMTP 3.0 (NULL) served on plain sockets.

:class:`Router` listens on ``tcp://ADDR:PORT`` (an IPv4 literal or ``*``,
port or ``*``) or ``ipc://PATH`` and serves every connection in one thread
with ``epoll``: the greeting and READY exchange, message frames, PING/PONG.
It is what a libzmq ROUTER is to the delegate's single serving loop, minus
libzmq's I/O thread and its hand-off, which cost the delegate about half its
CPU per call (docs/design-notes.md, "The delegate's side").  Peers are any
ZMTP 3 DEALER, REQ or ROUTER over NULL: the relay's :class:`testbed.core.zmtp.Dealer`,
its C path, or a libzmq socket.

Each connection gets a ROUTER identity (``b"\\0"`` + 4 bytes, or the peer's
``Identity`` property when it is unused), and every complete message is
answered in the serving thread (:meth:`Router.serve`) with the time it was
read.  The limits the libzmq path needs :mod:`testbed.delegate.connguard` for
are kept here directly; the defaults come from :mod:`testbed.core.limits`, and
every one is a keyword of :class:`Router` (and an attribute, read when it is
used):

=====================  ==========================  ==========================================
limit                  default                     how it is enforced
=====================  ==========================  ==========================================
``max_connections``    the caller's (delegate:     at the cap a new connection evicts the
                       ``connection_cap``)         oldest one still in its handshake (after
                                                   reading what it already sent); only when
                                                   none is in its handshake is the new one
                                                   closed at once (``refused``)
``handshake_timeout``  ``HANDSHAKE_TIMEOUT_S``     greeting and READY not complete this long
                                                   after accept: closed (``timed_out``)
``message_timeout``    ``MESSAGE_TIMEOUT_S``       a frame or multipart message begun and not
                                                   complete this long: cut (``timed_out``); so
                                                   is a peer whose out buffer stayed full
                                                   (not below half) this long while it kept
                                                   sending
``idle_timeout``       ``IDLE_TIMEOUT_S``          nothing read from it (PINGs count) this
                                                   long: closed (``timed_out``)
``max_frame``          the caller's                a longer frame ends its connection as soon
                       (``HARD_MAX_FRAME``)        as its header is read (``ZMQ_MAXMSGSIZE``)
``max_parts``          the caller's (3)            parts of one message kept; later ones are
                                                   only counted
``max_backlog``        the caller's                an unfinished multipart message counting
                       (``MAX_BACKLOG``)           more than this is cut: every part, kept or
                                                   not, counts its bytes + ``PART_OVERHEAD``,
                                                   so empty parts count too
``out_max``            ``OUT_MAX``                 bytes waiting to be sent to one peer,
                                                   replies and PONGs alike; beyond it further
                                                   ones are dropped (ROUTER policy) and
                                                   counted (``dropped_replies``,
                                                   ``dropped_pongs``)
``peer_memory_max``    ``PEER_MEMORY_MAX``         bytes held for one peer (its carried input,
                                                   kept parts with ``PART_OVERHEAD`` each, its
                                                   out buffer): above it the peer is cut
``global_memory_max``  ``GLOBAL_MEMORY_MAX``       the same summed over all peers: above it
                                                   the peer holding most is cut (again, until
                                                   under it); cutting, not pausing reads,
                                                   because a paused peer would hold its bytes
``turn_frames``,       ``TURN_FRAMES``,            fairness: one read or one turn handles at
``turn_bytes``         ``TURN_BYTES``              most this many frames / bytes of a
                                                   connection; the rest stays buffered, the
                                                   connection is not read again until it is
                                                   handled (TCP pushes back on it), and
                                                   connections with buffered work get a turn
                                                   each, round robin, before ``epoll`` blocks
=====================  ==========================  ==========================================

Memory is counted in bytes held (``held``, per connection and in all; the
kernel's socket buffers are not counted).  With the delegate's values one
peer can hold at most one frame being read (``HARD_MAX_FRAME``) plus one
read, three kept parts and ``OUT_MAX`` plus one reply: about 26 MiB, under
``PEER_MEMORY_MAX``; the per-peer check is the backstop for other values,
the global one is what bounds many peers together.

Timers cost the message path one stored timestamp per read (``last``, which
is also the loop's clock) and one set when a frame is left incomplete
(``since``): the clock is read anew only when the loop wakes with nothing
to do, and a sweep over the connections runs at most every ``SWEEP_S``
(also the ``epoll`` timeout, so an idle loop still sweeps), never per
message.  Protocol violations (not ZMTP 3, a security mechanism, the
as-server flag, a socket type other than DEALER, REQ or ROUTER, a message
before READY, a second READY, an empty command) close the connection; each
limit and refusal logs one line at most every ``WARN_EVERY_S`` per kind.
Counters: ``refused``, ``evicted``, ``timed_out``, ``cut``,
``dropped_replies``, ``dropped_pongs``, ``held``, ``peak_held``.

A message is answered as soon as its last frame is handled; the replies of
one read or turn go out in one ``send``.

**The offload data path** (docs/offload.md, "The data fast path"): with an
offload executor, no injected delay and ``TESTBED_FASTPATH`` not off, a
fixed-width offload CALL of a data call is answered straight from the receive
buffer by :func:`testbed.delegate.offload.execute.serve_data` (the handler's
accounting kept here, :meth:`Router._answered`), its RESULT packed, framed and
sent from one reused buffer; any other message goes to ``answer``.  A frame of
``BIG_FRAME`` bytes or more whose header came first is received straight into
a buffer of its size (one reused, ``SPARE`` bytes) with ``SO_RCVLOWAT`` set to
what is missing; it counts in ``held`` and its ``message_timeout`` runs.
"""

from __future__ import annotations

import os
import re
import select
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from testbed.core import limits, shmring, syscalls, wire
from testbed.core.errors import TestbedError
from testbed.core.zmtp import GREETING, frame, frame_head, ready_command
from testbed.delegate.connguard import ThrottledLog
from testbed.delegate.dispatch import split_envelope
from testbed.delegate.offload.execute import RESULT_ROOM, serve_data

_MORE, _COMMAND = 0x01, 0x04
_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
_EPOLLRD = select.EPOLLIN | select.EPOLLRDHUP
_PEER_TYPES = (b"DEALER", b"REQ", b"ROUTER")
_TCP_BIND = re.compile(r"tcp://(\*|\d{1,3}(?:\.\d{1,3}){3}):(\*|\d{1,5})")

#: Bytes of replies and commands waiting per connection for a peer that does not read.
MAX_OUT = limits.OUT_MAX
#: What one kept or counted message part costs beyond its bytes: a Python
#: ``bytes`` object's header and its list slot (``sys.getsizeof(b"")`` is 33).
PART_OVERHEAD = 64
#: Frames one read or one turn handles of a connection, at most (fairness).
TURN_FRAMES = 8
#: Bytes of frames one read or one turn handles, at most (at least one frame).
TURN_BYTES = 64 << 10
#: Timeouts are looked at this often, at most (s); also the epoll timeout.
SWEEP_S = 0.25
#: Handshaking connections read (to see whether they finished) before one is evicted.
EVICT_TRIES = 8
#: Bytes taken per read (one buffer, reused).
READ = 1 << 18
#: At most one warning line of each kind per this many seconds.
WARN_EVERY_S = 10.0

_GREETING_STATE, _READY_STATE, _OPEN = 0, 1, 2

#: A frame at least this long whose header arrived before its body is received
#: straight into a buffer of its own size (the offload data path only).
BIG_FRAME = 64 << 10
#: Bytes of the reused large-frame buffer: a CALL with ``syscalls.MAX_BUFFER`` bytes fits.
SPARE = syscalls.MAX_BUFFER + 4096
#: ``shm://`` connections served at once, at most (each maps two rings of
#: ``shmring.RING`` bytes, shared with its relay, touched as they are used).
SHM_MAX_CONNECTIONS = 256
#: ``shm://``: how long the loop looks at its request rings before it sleeps on the
#: doorbells (ns; the calls of a relay that forwards in a loop then arrive
#: without a wake-up on either side).  ``TESTBED_SHM_SPIN_US`` overrides it.
SHM_SPIN_NS = 50_000
SHM_SPIN_ENV = "TESTBED_SHM_SPIN_US"
#: ``0``/``off``/``no``/``false``: the offload data path is off (both sides: the
#: relay's C path reads the same variable).
FASTPATH_ENV = "TESTBED_FASTPATH"


def serves(endpoint: str) -> bool:
    """True if :class:`Router` can bind ``endpoint`` (else libzmq must)."""
    m = _TCP_BIND.fullmatch(endpoint)
    if m:
        host = m.group(1)
        return host == "*" or all(0 <= int(x) <= 255 for x in host.split("."))
    if shmring.is_shm(endpoint):
        return True
    return endpoint.startswith("ipc://") and len(endpoint) > 6 and endpoint != "ipc://*"


class _Conn:
    __slots__ = ("sock", "fd", "ident", "state", "inbuf", "out", "parts", "nparts", "nbytes",
                 "counted", "kept", "held", "opened", "last", "since", "full_since",
                 "pending", "big", "big_n", "ch")  # fmt: skip

    def __init__(self, sock: socket.socket, now: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()  # -1 once dropped
        self.ident = b""
        self.state = _GREETING_STATE
        self.inbuf = bytearray()  # read, not handled yet: an incomplete frame, a turn's rest
        self.out = bytearray()  # reply bytes the kernel did not take yet
        self.parts: list[bytes] = []  # kept parts of an unfinished multipart message
        self.nparts = 0
        self.nbytes = 0  # bytes of that message's parts so far
        self.counted = 0  # the same + PART_OVERHEAD per part: what max_backlog bounds
        self.kept = 0  # held bytes of the kept parts, + PART_OVERHEAD each
        self.held = 0  # inbuf + kept + out when last accounted (Router.held sums them)
        self.opened = now  # accepted (monotonic ns)
        self.last = now  # last read
        self.since = 0  # the incomplete frame or message began (0: none)
        self.full_since = 0  # a reply or PONG was first dropped since out was last half empty
        self.pending = False  # handled frames wait in inbuf: in Router._pending, not read
        self.big: memoryview | None = None  # a large frame's body, received in place
        self.big_n = 0  # bytes of it received so far
        self.ch: shmring.Channel | None = None  # shm://: the rings (the socket is only liveness)


#: answer(identity, payload, t_recv_ns) -> reply (``Answerer.handle``).
Answer = Callable[[bytes, bytes, int], bytes]
#: bad_envelope(identity, n_parts, n_bytes, t_recv_ns) -> ERROR reply (``Answerer.bad_envelope``).
BadEnvelope = Callable[[bytes, int, int, int], bytes]


class Router:
    """A listening ZMTP 3.0 ROUTER on one endpoint, served by :meth:`serve`."""

    def __init__(
        self,
        endpoint: str,
        *,
        max_connections: int,
        max_frame: int,
        max_backlog: int,
        max_parts: int,
        log: Callable[[str], None] | None = None,
        on_close: Callable[[bytes], None] | None = None,
        handshake_timeout: float = limits.HANDSHAKE_TIMEOUT_S,
        message_timeout: float = limits.MESSAGE_TIMEOUT_S,
        idle_timeout: float = limits.IDLE_TIMEOUT_S,
        out_max: int = limits.OUT_MAX,
        peer_memory_max: int = limits.PEER_MEMORY_MAX,
        global_memory_max: int = limits.GLOBAL_MEMORY_MAX,
        turn_frames: int = TURN_FRAMES,
        turn_bytes: int = TURN_BYTES,
    ) -> None:
        if not serves(endpoint):
            raise TestbedError(f"the raw ZMTP delegate serves tcp://ADDR:PORT, ipc://PATH and "
                               f"shm://PATH, not {endpoint!r}")  # fmt: skip
        self.endpoint = endpoint
        #: shm://PATH: connections are rings in shared memory (:mod:`testbed.core.shmring`)
        self.shm = shmring.is_shm(endpoint)
        self._bells: dict[int, _Conn] = {}  # shm: request doorbell fd -> its connection
        try:
            spin = os.environ.get(SHM_SPIN_ENV)
            self.shm_spin_ns = SHM_SPIN_NS if spin is None else max(0, int(float(spin) * 1000))
        except ValueError:
            raise TestbedError(f"{SHM_SPIN_ENV}={spin!r} is not a number of microseconds") from None
        self.max_connections = max_connections
        self.max_frame = max_frame
        self.max_backlog = max_backlog
        self.max_parts = max_parts
        self.handshake_timeout = handshake_timeout
        self.message_timeout = message_timeout
        self.idle_timeout = idle_timeout
        self.out_max = out_max
        self.peer_memory_max = peer_memory_max
        self.global_memory_max = global_memory_max
        self.turn_frames = max(1, turn_frames)
        self.turn_bytes = turn_bytes
        self.on_close = on_close
        self._log = ThrottledLog(log, WARN_EVERY_S)
        self._listener: socket.socket | None = None
        self._unlink: str | None = None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.RLock()  # a wake-up never writes to a closed (reused) fd
        self._ep = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self._handshaking: OrderedDict[int, _Conn] = OrderedDict()  # oldest accepted first
        self._pending: deque[_Conn] = deque()  # connections with frames left for a turn
        self._idents: set[bytes] = set()
        self._next_ident = struct.unpack("<I", os.urandom(4))[0]
        self._hello = GREETING + ready_command(b"ROUTER")
        self._buf = bytearray(READ)
        self._view = memoryview(self._buf)
        #: the offload data path: (handler, executor), or None (``_data_path``)
        self._data: tuple | None = None
        #: the data path's reply buffer: a ZMTP frame header, a RESULT and 1 MiB of data
        self._rbuf = memoryview(b"")  # (made by serve when the data path is on, as:)
        #: one reused buffer for large frames (a 1 MiB write's), lent to one connection at a time
        self._spare: memoryview | None = None
        self._accept_paused = 0.0
        self.bound = ""
        self._now = 0  # the serving loop's last clock reading (ns)
        self.held = 0  # bytes held for all peers (sum of their inbuf, kept parts, out)
        self.peak_held = 0
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self.cut = 0
        self.dropped_replies = 0
        self.dropped_pongs = 0

    # ------------------------------------------------------------ set-up

    def bind(self) -> str:
        """Listen; the bound endpoint (the real port for ``:*``)."""
        if self.shm:
            try:
                s = self._bind_ipc(shmring.path_of(self.endpoint))
            except TestbedError as exc:
                raise TestbedError(str(exc).replace("ipc://", "shm://", 1)) from None
            self.bound = self.endpoint
        elif self.endpoint.startswith("ipc://"):
            s = self._bind_ipc(self.endpoint[6:])
            self.bound = self.endpoint
        else:
            m = _TCP_BIND.fullmatch(self.endpoint)
            host = "0.0.0.0" if m.group(1) == "*" else m.group(1)
            port = 0 if m.group(2) == "*" else int(m.group(2))
            if not 0 <= port <= 65535:
                raise TestbedError(f"cannot listen on {self.endpoint}: port out of range")
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq
            try:
                s.bind((host, port))
            except OSError as exc:
                s.close()
                raise TestbedError(f"cannot listen on {self.endpoint}: {exc.strerror}") from None
            self.bound = f"tcp://{host}:{s.getsockname()[1]}"
        s.listen(128)
        s.setblocking(False)
        self._listener = s
        self._ep.register(s.fileno(), _EPOLLIN)
        self._ep.register(self._wake_fd, _EPOLLIN)
        return self.bound

    def _bind_ipc(self, path: str) -> socket.socket:
        prepare_ipc_path(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(path)
        except OSError as exc:
            s.close()
            raise TestbedError(f"cannot listen on ipc://{path}: {exc.strerror}") from None
        self._unlink = path
        return s

    def wake(self) -> None:
        """Make :meth:`serve` look at its stop condition now (thread-safe; from a signal
        handler only while no other thread of this process calls it or :meth:`close`)."""
        with self._wake_lock:
            if self._wake_fd < 0:
                return
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass  # the counter is full: a wake-up is pending anyway

    def close(self) -> None:
        """Close every connection and the listener (idempotent)."""
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            if self._unlink:
                try:
                    os.unlink(self._unlink)
                except OSError:
                    pass
        if not self._ep.closed:
            self._ep.close()
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.close(self._wake_fd)
                self._wake_fd = -1

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------ serving

    def serve(
        self,
        answer: Answer,
        bad_envelope: BadEnvelope,
        stop: Callable[[], bool],
        drain_ns: int,
        linger_ns: int,
    ) -> None:
        """Answer every message until ``stop()``; then answer what is already
        readable (for at most ``drain_ns``) and send what is queued (``linger_ns``).

        Requests are answered in this thread (``answer``, ``bad_envelope``: the
        methods of a :class:`testbed.delegate.dispatch.Answerer`), the envelope
        read by :func:`~testbed.delegate.dispatch.split_envelope`."""
        self._answer, self._bad_envelope = answer, bad_envelope
        self._data = _data_path(answer)
        if self._data is not None and not self._rbuf:
            self._rbuf = memoryview(bytearray(9 + RESULT_ROOM + syscalls.MAX_BUFFER))
            self._spare = memoryview(bytearray(SPARE))
        poll = self._ep.poll
        conns = self._conns
        pending = self._pending
        lfd, wfd = self._listener.fileno(), self._wake_fd
        read = self._shm_control if self.shm else self._read
        bells = self._bells
        mono = time.monotonic_ns
        sweep_ns = int(SWEEP_S * 1e9)
        next_sweep = mono() + sweep_ns
        timeout = SWEEP_S  # 0 while connections have work left over or on stop
        deadline = None
        while True:
            if stop():
                if deadline is None:
                    deadline = mono() + drain_ns
                    self._ep.unregister(lfd)  # no new connections while draining
                    self._accept_paused = 0.0
                    timeout = 0
                elif mono() > deadline:
                    break
            if self._accept_paused:
                if time.monotonic() > self._accept_paused:
                    self._accept_paused = 0.0
                    self._ep.modify(lfd, _EPOLLIN)
                timeout = self._timeout(deadline)
            if bells:
                armed = self._shm_idle(timeout != 0)  # rings served, or armed to sleep
                events = poll(timeout if armed else 0)
                if armed:
                    for conn in bells.values():
                        conn.ch.disarm()
            else:
                events = poll(timeout)
            if not events and not pending and deadline is not None:
                break  # nothing more is readable: drained
            for fd, ev in events:
                conn = conns.get(fd)
                if conn is not None:
                    if ev & _EPOLLOUT:
                        self._flush(conn)
                    if ev & ~_EPOLLOUT and conn.fd >= 0:
                        read(conn)
                elif fd == lfd:
                    self._accept()
                elif fd == wfd:
                    try:
                        os.eventfd_read(wfd)
                    except BlockingIOError:
                        pass
                elif (conn := bells.get(fd)) is not None:
                    self._shm_read(conn, True)
            if pending:
                self._turns()
                timeout = self._timeout(deadline)
            if not events:  # (else a read, an accept took the time: no clock read per message)
                self._now = mono()
            if self._now >= next_sweep:
                self._sweep(self._now)
                next_sweep = self._now + sweep_ns
        self._linger(linger_ns)

    def _timeout(self, deadline: int | None) -> float:
        """The epoll timeout (s): 0 while there is work left or on stop, else the sweep's."""
        if self._pending or deadline is not None:
            return 0
        return 0.1 if self._accept_paused else SWEEP_S

    def _turns(self) -> None:
        """One turn for each connection that has frames left over, oldest first."""
        pending = self._pending
        for _ in range(len(pending)):
            conn = pending.popleft()
            if conn.fd >= 0:
                self._parse(conn, conn.inbuf, len(conn.inbuf), time.monotonic_ns(), True, True)

    def _sweep(self, now: int) -> None:
        """Close connections whose handshake, message or silence took too long."""
        hs = self._handshaking
        begun = now - int(self.handshake_timeout * 1e9)
        while hs:
            conn = next(iter(hs.values()))
            if conn.opened > begun:
                break
            self._time_out(conn, "handshake", f"did not complete its handshake within "
                                              f"{self.handshake_timeout:g} s")  # fmt: skip
        msg_ns = int(self.message_timeout * 1e9)
        idle_ns = int(self.idle_timeout * 1e9)
        for conn in list(self._conns.values()):
            if conn.fd < 0:
                continue
            if conn.full_since and now - conn.full_since > msg_ns and conn.last > conn.full_since:
                self._time_out(conn, "unread", f"kept sending without reading its replies for "
                                               f"more than {self.message_timeout:g} s")  # fmt: skip
            elif conn.pending:
                continue  # the delegate owes it work: its timers wait
            elif conn.since and now - conn.since > msg_ns:
                self._time_out(conn, "message", f"left a frame or message incomplete for more "
                                                f"than {self.message_timeout:g} s")  # fmt: skip
            elif now - conn.last > idle_ns:
                self._time_out(conn, "idle", f"sent nothing for {self.idle_timeout:g} s")

    def _time_out(self, conn: _Conn, kind: str, why: str) -> None:
        self.timed_out += 1
        self._warn(kind, f"testbed delegate: closed a connection that {why}")
        self._drop(conn)

    def _linger(self, linger_ns: int) -> None:
        end = time.monotonic_ns() + linger_ns
        while True:
            waiting = [c for c in self._conns.values() if c.out]
            left = end - time.monotonic_ns()
            if not waiting or left <= 0:
                return
            for fd, _ev in self._ep.poll(left / 1e9):
                conn = self._conns.get(fd)
                if conn is not None and conn.out:
                    self._flush(conn)

    def _accept(self) -> None:
        conns = self._conns
        self._now = time.monotonic_ns()
        while True:
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: stop accepting for a while
                self._warn("accept", f"testbed delegate: cannot accept a connection: "
                                     f"{exc.strerror}; pausing new ones for 0.1 s")  # fmt: skip
                self._accept_paused = time.monotonic() + 0.1
                self._ep.modify(self._listener.fileno(), 0)
                return
            if self.shm:
                self._accept_shm(sock)
                continue
            if len(conns) >= self.max_connections:
                self._evict_one()
            if len(conns) >= self.max_connections:
                self.refused += 1
                self._warn("cap", f"testbed delegate: {len(conns)} connections open "
                                  f"(limit {self.max_connections}), none in its handshake; "
                                  f"refusing new ones")  # fmt: skip
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, time.monotonic_ns())
            conns[conn.fd] = conn
            self._handshaking[conn.fd] = conn
            self._ep.register(conn.fd, _EPOLLRD)
            self._write(conn, self._hello)

    def _evict_one(self) -> None:
        """Close the oldest connection still in its handshake, if there is one.

        What a candidate already sent is read first: a peer whose greeting and
        READY merely wait in the kernel is handshaken, not evicted.
        """
        hs = self._handshaking
        for _ in range(EVICT_TRIES):
            if not hs:
                return
            conn = next(iter(hs.values()))
            self._read(conn)
            if conn.fd < 0:
                return  # it went away: its place is free
            if hs.get(conn.fd) is conn:
                self.evicted += 1
                self._warn("evict", f"testbed delegate: {len(self._conns)} connections open "
                                    f"(limit {self.max_connections}); closed the oldest one "
                                    f"still in its handshake for a new one")  # fmt: skip
                self._drop(conn)
                return

    def _drop(self, conn: _Conn) -> None:
        fd = conn.fd
        if fd < 0 or self._conns.get(fd) is not conn:
            return
        del self._conns[fd]
        self._handshaking.pop(fd, None)
        conn.fd = -1
        if conn.big is not None:
            if self._spare is None and len(conn.big.obj) == SPARE:
                self._spare = memoryview(conn.big.obj)
            conn.big = None
        self.held -= conn.held
        conn.held = 0
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass
        if conn.ch is not None:
            self._bells.pop(conn.ch.rx_bell, None)
            try:
                self._ep.unregister(conn.ch.rx_bell)
            except (OSError, ValueError):
                pass
            conn.ch.close()
            conn.ch = None
        conn.sock.close()
        if conn.ident:
            self._idents.discard(conn.ident)
            if self.on_close is not None:
                self.on_close(conn.ident)

    def _warn(self, kind: str, line: str) -> None:
        self._log(line, kind)

    # ------------------------------------------------------------ bytes in

    def _read(self, conn: _Conn) -> None:
        if conn.big is not None:
            self._read_big(conn)
            return
        try:
            n = conn.sock.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        t_recv = time.monotonic_ns()
        if not n:
            self._drop(conn)
            return
        conn.last = self._now = t_recv  # (the serving loop's clock too)
        buf = self._buf
        # the offload data path: one whole long frame (a 4 KiB write), nothing carried over
        if (buf[0] == 0x02 and n > 9 and self._data is not None and not conn.inbuf
                and conn.state == _OPEN and not conn.nparts
                and int.from_bytes(buf[1:9], "big") == n - 9
                and self._fast(conn, self._view[9:n], t_recv, None)):  # fmt: skip
            return
        # the measured path: one whole single-part message, nothing carried over
        if not conn.inbuf and conn.state == _OPEN and buf[0] == 0 and buf[1] + 2 == n \
                and not conn.nparts:  # fmt: skip
            if self._data is not None and self._fast(conn, self._view[2:n], t_recv, None):
                return
            reply = self._answer(conn.ident, bytes(self._view[2:n]), t_recv)
            if conn.fd >= 0:
                self._reply(conn, reply, ())
            return
        if conn.inbuf:
            conn.inbuf += self._view[:n]
            self._parse(conn, conn.inbuf, len(conn.inbuf), t_recv, True, False)
        else:
            self._parse(conn, self._view, n, t_recv, False, False)

    def _parse(self, conn: _Conn, data, n: int, t_recv: int, carried: bool, turn: bool) -> None:
        """Handle the frames in ``data[:n]`` (``conn.inbuf`` when ``carried``), at
        most one turn's worth; keep the rest in ``conn.inbuf``."""
        pos = 0
        if conn.state == _GREETING_STATE:
            if n < 64:
                if data[0] != 0xFF or (n >= 10 and data[9] != 0x7F):
                    self._refuse(conn, "does not speak ZMTP")
                    return
                self._carry(conn, data, 0, n, carried)
                self._account(conn)
                return
            if data[0] != 0xFF or data[9] != 0x7F or data[10] < 3:
                self._refuse(conn, "does not speak ZMTP 3")
                return
            if bytes(data[12:17]) != b"NULL\x00":
                self._refuse(conn, "asks for a security mechanism (start the delegate with "
                                   "--curve-keys for CURVE)")  # fmt: skip
                return
            if data[32]:
                self._refuse(conn, "set the as-server flag in its greeting (a client "
                                   "must not)")  # fmt: skip
                return
            conn.state, pos = _READY_STATE, 64
        max_frame = self.max_frame
        frames_left, bytes_end = self.turn_frames, pos + self.turn_bytes
        outq = bytearray()  # this turn's replies and PONGs: one send at the end
        done = hit = False  # a message or command completed / the turn is used up
        while (fh := frame_head(data, pos, n)) is not None:
            flags, size, head = fh
            if size > max_frame:
                self.cut += 1
                self._warn("frame", f"testbed delegate: dropped a connection that sent a frame "
                                    f"of {size} bytes (limit {max_frame})")  # fmt: skip
                self._drop(conn)
                return
            if n - pos < head + size:
                if (size >= BIG_FRAME and self._data is not None and conn.state == _OPEN
                        and not flags & (_MORE | _COMMAND) and not conn.nparts):  # fmt: skip
                    self._begin_big(conn, data, pos + head, n, size)
                    pos = n
                break
            if not frames_left or pos >= bytes_end:
                hit = True
                break
            frames_left -= 1
            start, pos = pos + head, pos + head + size
            if flags & _COMMAND:
                if not self._command(conn, data[start:pos], outq):
                    return
                done = True
                continue
            if conn.state != _OPEN:
                self._refuse(conn, "sent a message before its READY command")
                return
            if flags & _MORE:
                cost = size + PART_OVERHEAD
                conn.nparts += 1
                conn.nbytes += size
                conn.counted += cost
                if conn.nparts <= self.max_parts:
                    conn.parts.append(bytes(data[start:pos]))
                    conn.kept += cost
                if conn.counted > self.max_backlog:
                    self._cut_backlog(conn)
                    return
                continue
            if not conn.nparts and self._data is not None:
                with memoryview(data) as whole:
                    fast = self._fast(conn, whole[start:pos], t_recv, outq)
                if fast:
                    done = True
                    if conn.fd < 0:
                        return
                    continue
            body = bytes(data[start:pos])
            if conn.nparts:
                parts, nparts, nbytes = conn.parts, conn.nparts + 1, conn.nbytes + size
                if nparts <= self.max_parts:
                    parts.append(body)
                conn.parts, conn.nparts, conn.nbytes, conn.counted, conn.kept = [], 0, 0, 0, 0
                split = split_envelope(parts, nparts)
                if split is None:
                    reply, env = self._bad_envelope(conn.ident, nparts, nbytes, t_recv), ()
                else:
                    env, body = split
                    reply = self._answer(conn.ident, body, t_recv)
            else:
                reply, env = self._answer(conn.ident, body, t_recv), ()
            done = True
            if conn.fd < 0:
                return
            data_out = frame(reply)
            if env:
                data_out = b"".join(frame(e, more=True) for e in env) + data_out
            self._queue(conn, outq, data_out, False)
        if outq:
            self._write(conn, outq)
            if conn.fd < 0:
                return
        if hit:
            conn.since = 0  # what is left is the delegate's to do, not the peer's
        else:
            if conn.nparts and conn.counted + (n - pos) > self.max_backlog:
                self._cut_backlog(conn)
                return
            if pos < n or conn.nparts:  # a frame or message is incomplete
                if done or not conn.since:
                    conn.since = t_recv
            else:
                conn.since = 0
            if conn.big is not None and not conn.since:
                conn.since = t_recv  # the large frame is incomplete
        self._carry(conn, data, pos, n, carried)
        if hit:
            if turn or not conn.pending:
                self._pending.append(conn)
            if not conn.pending:
                conn.pending = True
                self._ep.modify(conn.fd, _EPOLLOUT if conn.out else 0)  # not read meanwhile
        elif conn.pending:
            conn.pending = False
            self._ep.modify(conn.fd, _EPOLLRD | _EPOLLOUT if conn.out else _EPOLLRD)
        self._account(conn)

    def _carry(self, conn: _Conn, data, pos: int, n: int, carried: bool) -> None:
        """Keep ``data[pos:n]`` (an incomplete frame, or frames for a later turn)."""
        if carried:
            if pos:
                del conn.inbuf[:pos]  # (O(1) at the front of a bytearray)
        elif pos < n:
            conn.inbuf += data[pos:n]

    def _cut_backlog(self, conn: _Conn) -> None:
        self.cut += 1
        self._warn("backlog", f"testbed delegate: dropped a connection that sent "
                              f"{conn.nparts} parts, {conn.nbytes} bytes, without completing "
                              f"a message (counted {conn.counted}, limit {self.max_backlog}: "
                              f"{PART_OVERHEAD} bytes more per part)")  # fmt: skip
        self._drop(conn)

    def _refuse(self, conn: _Conn, why: str) -> None:
        self._warn("proto", f"testbed delegate: closed a connection that {why}")
        self._drop(conn)

    def _command(self, conn: _Conn, body, outq: bytearray) -> bool:
        """Act on one command frame; False if the connection was dropped."""
        if not body:
            self._refuse(conn, "sent an empty command")
            return False
        name = bytes(body[1 : 1 + body[0]])
        if conn.state == _READY_STATE:
            if name != b"READY":
                self._refuse(conn, f"sent {name[:16]!r} instead of READY")
                return False
            props = _properties(bytes(body[1 + body[0] :]))
            if props is None or props.get(b"Socket-Type") not in _PEER_TYPES:
                kind = (props or {}).get(b"Socket-Type", b"no socket type")
                self._refuse(conn, f"is a {kind[:16].decode('latin-1')} socket, "
                                   "not DEALER, REQ or ROUTER")  # fmt: skip
                return False
            conn.ident = self._identity(props.get(b"Identity", b""))
            conn.state = _OPEN
            self._handshaking.pop(conn.fd, None)
        elif name == b"PING":  # ZMTP 3.1 heartbeat: PONG with its context
            pong = b"\x04PONG" + bytes(body[7:23])
            self._queue(conn, outq, bytes([_COMMAND, len(pong)]) + pong, True)
        elif name == b"READY":
            self._refuse(conn, "sent a second READY command")
            return False
        return True

    def _identity(self, asked: bytes) -> bytes:
        if asked and asked[0] != 0 and len(asked) <= 255 and asked not in self._idents:
            ident = asked
        else:
            while True:
                self._next_ident = (self._next_ident + 1) & 0xFFFFFFFF
                ident = b"\x00" + struct.pack(">I", self._next_ident)
                if ident not in self._idents:
                    break
        self._idents.add(ident)
        return ident

    # ------------------------------------------------------------ shm://: rings, not bytes

    def _accept_shm(self, sock: socket.socket) -> None:
        """A relay connected to the rendezvous socket: give it its rings and doorbells
        (:func:`testbed.core.shmring.offer`); the socket stays open as liveness only."""
        cap = min(self.max_connections, SHM_MAX_CONNECTIONS)
        if len(self._conns) >= cap:
            self.refused += 1
            self._warn("cap", f"testbed delegate: {len(self._conns)} shm connections open "
                              f"(limit {cap}); refusing new ones")  # fmt: skip
            sock.close()
            return
        try:
            ch = shmring.offer(sock)
        except (OSError, TestbedError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self._warn("accept", f"testbed delegate: cannot set up a shm connection: {why}")
            sock.close()
            return
        sock.setblocking(False)
        conn = _Conn(sock, time.monotonic_ns())
        conn.ch = ch
        conn.state = _OPEN
        conn.ident = self._identity(b"")
        self._conns[conn.fd] = conn
        self._bells[ch.rx_bell] = conn
        self._ep.register(conn.fd, _EPOLLRD)
        self._ep.register(ch.rx_bell, _EPOLLIN)  # (a bell rung before this is still seen)

    def _shm_control(self, conn: _Conn) -> None:
        """The shm connection's socket is readable: the relay closed it (or broke the rule
        that it stays silent): the connection ends, as a closed ZMTP connection does."""
        try:
            data = conn.sock.recv(64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._refuse(conn, "wrote on its shm control socket")
        else:
            self._drop(conn)

    def _shm_idle(self, sleep: bool) -> bool:
        """Before each wait of the loop: answer what the request rings hold (a producer
        rings only a sleeping consumer's bell); before a sleep (``sleep``) look at them
        for ``shm_spin_ns`` first, then arm every doorbell
        (:meth:`testbed.core.shmring.Channel.arm`).  True: armed, the loop may sleep
        (and disarms when it wakes); False: nothing is armed."""
        conns = list(self._bells.values())
        end = time.monotonic_ns() + self.shm_spin_ns if sleep else 0
        while True:
            busy = [c for c in conns if c.ch.rx.pending()]
            if busy:
                for conn in busy:
                    if conn.fd >= 0:
                        self._shm_read(conn, False)
                return False
            if not sleep:
                return False
            if time.monotonic_ns() >= end:
                break
        for i, conn in enumerate(conns):
            if not conn.ch.arm():
                for other in conns[:i]:
                    other.ch.disarm()
                return False
        return True

    def _shm_read(self, conn: _Conn, rung: bool) -> None:
        """The request doorbell rang (``rung``) or the ring was seen non-empty: answer up
        to ``turn_frames`` messages from the ring (more left: the bell is rung again, so
        other connections get their turn first)."""
        ch = conn.ch
        if rung:
            ch.drain()
        conn.last = self._now = time.monotonic_ns()
        answer = self._answer
        for _ in range(self.turn_frames):
            try:
                body = ch.recv()
            except shmring.ShmError as exc:
                self._refuse(conn, f"corrupted its shared-memory ring ({exc})")
                return
            if body is None:
                return
            t_recv = time.monotonic_ns()
            if len(body) > self.max_frame:
                self.cut += 1
                self._warn("frame", f"testbed delegate: dropped a connection that sent a frame "
                                    f"of {len(body)} bytes (limit {self.max_frame})")  # fmt: skip
                self._drop(conn)
                return
            reply = answer(conn.ident, body, t_recv)
            if conn.fd < 0:
                return
            try:
                if not ch.send(reply):
                    self._dropped(conn, False)  # its reply ring is full: it does not read
                elif conn.full_since and ch.tx.used() <= ch.tx.size >> 1:
                    conn.full_since = 0  # it reads again
            except shmring.ShmError as exc:
                self._refuse(conn, f"corrupted its shared-memory ring ({exc})")
                return
        shmring.ring_bell(ch.rx_bell)  # more may wait: another turn, after the others

    # ------------------------------------------------------------ the offload data path

    def _fast(self, conn: _Conn, body: memoryview, t_recv: int, outq: bytearray | None) -> bool:
        """Answer ``body`` on the offload data path if it is a data call
        (:func:`testbed.delegate.offload.execute.serve_data`); False: not one.

        The accounting is the handler's (``Handler.handle`` for a CALL); the
        RESULT is packed in the reused reply buffer, framed there and sent from
        it (``outq``: this turn's earlier replies go first; None: none)."""
        handler, executor = self._data
        out = self._rbuf
        try:
            n = serve_data(executor, conn.ident, body, out[9:], t_recv)
        except Exception as exc:  # a bug: answered as the handler answers one, never raised
            text = f"internal error: {exc.__class__.__name__}: {exc}"[:200]
            self._reply(conn, wire.encode_error(wire.E_INTERNAL, text), ())
            return True
        if n is None:
            return False
        self._answered(conn, len(body), n, t_recv, outq)
        return True

    def _answered(self, conn: _Conn, nbytes: int, n: int, t_recv: int,
                  outq: bytearray | None) -> None:  # fmt: skip
        """Account a data-path CALL of ``nbytes`` as ``Handler.handle`` does and send its
        RESULT (``n`` bytes at ``_rbuf[9:]``), framed in place."""
        handler = self._data[0]
        out = self._rbuf
        client = handler._client(conn.ident, t_recv)
        client.bytes_in += nbytes
        client.last_ns = t_recv
        client.calls += 1
        handler.d.count_answered()
        if n > 255:
            out[0] = 0x02
            out[1:9] = n.to_bytes(8, "big")
            reply = out[: 9 + n]
        else:
            out[7] = 0
            out[8] = n
            reply = out[7 : 9 + n]
        if outq is not None and len(reply) <= TURN_BYTES:
            self._queue(conn, outq, reply, False)
            return
        if outq:  # earlier replies of this turn go first
            self._write(conn, outq)
            outq.clear()
            if conn.fd < 0:
                return
        self._reply_raw(conn, reply)

    def _reply_raw(self, conn: _Conn, data: memoryview) -> None:
        """Send one framed reply (``_reply`` without framing it)."""
        if conn.out and len(conn.out) + len(data) > self.out_max:
            self._dropped(conn, False)
            return
        self._write(conn, data)

    def _begin_big(self, conn: _Conn, data, start: int, n: int, size: int) -> None:
        """Receive the rest of a large frame (``size`` bytes, ``data[start:n]`` of it
        here) straight into a buffer of its own (:meth:`_read_big`)."""
        spare = self._spare
        if spare is not None and len(spare) >= size:  # (no zeroing of a fresh MiB)
            self._spare = None
            big = spare[:size]
        else:
            big = memoryview(bytearray(size))
        with memoryview(data) as whole:
            big[: n - start] = whole[start:n]
        conn.big, conn.big_n = big, n - start
        self._lowat(conn, size - conn.big_n)

    @staticmethod
    def _lowat(conn: _Conn, n: int) -> None:
        """SO_RCVLOWAT: ``epoll`` reports the connection once ``n`` bytes are queued (the
        kernel grows the receive buffer to hold them): the rest of a large frame in one
        read instead of one per segment.  TCP only; 1 is the default."""
        if conn.sock.family == socket.AF_INET:
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, max(1, n))
            except OSError:
                pass

    def _read_big(self, conn: _Conn) -> None:
        big = conn.big
        try:
            n = conn.sock.recv_into(big[conn.big_n :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        t_recv = time.monotonic_ns()
        if not n:
            self._drop(conn)
            return
        conn.last = self._now = t_recv
        conn.big_n += n
        if conn.big_n < len(big):
            self._lowat(conn, len(big) - conn.big_n)
            return
        conn.big, conn.big_n, conn.since = None, 0, 0
        self._lowat(conn, 1)
        if not self._fast(conn, big, t_recv, None):
            reply = self._answer(conn.ident, bytes(big), t_recv)
            if conn.fd >= 0:
                self._reply(conn, reply, ())
        if self._spare is None and len(big.obj) == SPARE:
            self._spare = memoryview(big.obj)  # the next large frame's buffer
        try:
            big.release()
        except BufferError:
            pass  # (still referenced somewhere: freed with it)
        if conn.fd >= 0:
            self._account(conn)

    # ------------------------------------------------------------ bytes out

    def _queue(self, conn: _Conn, outq: bytearray, data: bytes, pong: bool) -> None:
        """Add ``data`` to this turn's output unless that passes ``out_max`` (then drop it)."""
        waiting = len(conn.out) + len(outq)
        if waiting and waiting + len(data) > self.out_max:
            self._dropped(conn, pong)
            return
        outq += data

    def _dropped(self, conn: _Conn, pong: bool) -> None:
        if not conn.full_since:
            conn.full_since = time.monotonic_ns()
        if pong:
            self.dropped_pongs += 1
        else:
            self.dropped_replies += 1
        self._warn("out", f"testbed delegate: a client does not read what it is sent; "
                          f"dropped {self.dropped_replies} replies and {self.dropped_pongs} "
                          f"PONGs so far")  # fmt: skip

    def _reply(self, conn: _Conn, reply: bytes, env: tuple[bytes, ...]) -> None:
        data = frame(reply)
        if env:
            data = b"".join(frame(e, more=True) for e in env) + data
        if conn.out and len(conn.out) + len(data) > self.out_max:
            self._dropped(conn, False)
            return
        self._write(conn, data)

    def _write(self, conn: _Conn, data) -> None:
        if conn.out:
            conn.out += data
            self._account(conn)
            return
        try:
            sent = conn.sock.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(data):
            conn.out += memoryview(data)[sent:]
            self._ep.modify(conn.fd, _EPOLLOUT if conn.pending else _EPOLLRD | _EPOLLOUT)
            self._account(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        del conn.out[:sent]
        if len(conn.out) <= self.out_max >> 1:
            conn.full_since = 0  # it reads: no longer "full"
        if not conn.out:
            self._ep.modify(conn.fd, 0 if conn.pending else _EPOLLRD)
        self._account(conn)

    # ------------------------------------------------------------ memory

    def _account(self, conn: _Conn) -> None:
        """Record what ``conn`` holds now; cut it, or the biggest holder, past a limit."""
        held = len(conn.inbuf) + conn.kept + len(conn.out)
        if conn.big is not None:
            held += len(conn.big)
        self.held += held - conn.held
        conn.held = held
        if self.held > self.peak_held:
            self.peak_held = self.held
        if held > self.peer_memory_max:
            self._cut_memory(conn, f"(limit {self.peer_memory_max} per client)")
        while self.held > self.global_memory_max and self._conns:
            big = max(self._conns.values(), key=_held_of)
            if not big.held:
                break  # (nobody holds anything: nothing to cut)
            self._cut_memory(big, f"the most of {self.held} held for all clients "
                                  f"(limit {self.global_memory_max})")  # fmt: skip

    def _cut_memory(self, conn: _Conn, why: str) -> None:
        self.cut += 1
        self._warn("memory", f"testbed delegate: dropped a connection that made it hold "
                             f"{conn.held} bytes, {why}")  # fmt: skip
        self._drop(conn)


def _data_path(answer: Answer) -> tuple | None:
    """``(handler, executor)`` for the offload data path where it applies: the
    answerer is the delegate's handler keyed by connection identity (raw ZMTP),
    with an offload executor and no injected delay, and ``TESTBED_FASTPATH`` does
    not turn it off.  Else None: every message goes to ``answer``."""
    if os.environ.get(FASTPATH_ENV, "").strip().lower() in ("0", "off", "no", "false"):
        return None
    handler = getattr(answer, "__self__", None)
    executor = getattr(getattr(handler, "d", None), "offload", None)
    if (executor is None or not hasattr(executor, "tables") or not hasattr(handler, "_client")
            or not getattr(handler, "idents_are_keys", False) or getattr(handler, "delay_ns", 1)):  # fmt: skip
        return None
    return handler, executor


def _held_of(conn: _Conn) -> int:
    return conn.held


def _properties(raw: bytes) -> dict[bytes, bytes] | None:
    """The properties of a READY command; None if they are malformed."""
    props: dict[bytes, bytes] = {}
    pos, n = 0, len(raw)
    while pos < n:
        k = raw[pos]
        if pos + 1 + k + 4 > n:
            return None
        name = raw[pos + 1 : pos + 1 + k]
        (v,) = struct.unpack_from(">I", raw, pos + 1 + k)
        pos += 1 + k + 4
        if pos + v > n:
            return None
        props[name] = raw[pos : pos + v]
        pos += v
    return props


def _ipc_alive(path: str) -> bool:
    """Somebody listens on the Unix socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def prepare_ipc_path(path: str) -> None:
    """Make ``path`` free for an ``ipc://`` listener, or refuse with one line.

    Only a *stale* Unix socket (nobody listens on it) is removed.  Anything
    else at ``path`` is left alone: a regular file, a directory or any other
    non-socket ("exists and is not a socket"), and a live socket ("another
    process listens on it").  Both transports call this before binding (libzmq
    would otherwise unlink whatever is there, a live listener's socket too).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TestbedError(f"cannot listen on ipc://{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise TestbedError(f"cannot listen on ipc://{path}: it exists and is not a socket")
    if _ipc_alive(path):
        raise TestbedError(
            f"cannot listen on ipc://{path}: it is in use (another process listens on it)"
        )
    try:
        os.unlink(path)  # a stale socket file nobody listens on
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TestbedError(f"cannot listen on ipc://{path}: {exc.strerror}") from None
