"""Per-connection limits for the delegate's libzmq ROUTER socket, which libzmq lacks.

libzmq bounds each *frame* (``ZMQ_MAXMSGSIZE``) and counts its high-water
marks in *whole messages*, but it buffers a multipart message until its last
part arrives, at about 64 bytes per part however small (a 2-byte empty part
costs the delegate 32 times its size on the wire): a peer that sends parts
marked "more" forever grows the delegate's memory without limit, and nothing
above libzmq ever sees them.  It also accepts connections until the process
runs out of descriptors, and lets a begun message wait forever.

:class:`ConnectionGuard` watches the socket from beside libzmq.  It sees only
what libzmq lets it see: a socket monitor reports each accepted connection
and its fd; ``TCP_INFO`` gives each TCP connection's bytes received and sent;
the serving loop marks the fd of every whole message it takes off the socket
(``ZMQ_SRCFD``, :meth:`delivered`) and says while it is busy with one
(:attr:`current`); glibc's ``mallinfo2()`` gives the bytes the process holds
in ``malloc`` (libzmq allocates there).  From these, every ``TICK_S``:

* beyond ``max_connections`` open connections a new one is shut down at once;
* **backlog**: a connection that has received more than ``max_backlog`` bytes
  since it last delivered a whole message is cut;
* **memory**: the bytes in ``malloc`` above the level at start are what peers
  make the delegate hold.  Above ``peer_memory_max`` the connection that has
  received most bytes without delivering a whole message (delivered nothing
  and still received bytes during the last tick: a whole message that only
  waits for the serving loop is no reason) is cut, if it sent enough to hold that much
  (``PART_AMPLIFICATION``) and the memory is more than twice the bytes all
  such connections sent plus one whole frame each (tiny parts; whole messages
  that merely wait for the serving loop hold about their size, and libzmq
  allocates a frame whole as soon as its header arrives); above ``global_memory_max`` it is cut
  whatever it sent.  One cut at a time: the next waits until libzmq has closed the cut
  connection and freed its message.  Freed memory is handed back to the
  system (``malloc_trim``), so the resident size falls again;
* **message timeout**: a connection that received bytes of a message (more
  than its PINGs, which libzmq answers with PONGs) and delivered no whole
  message for ``message_timeout`` seconds, counted only while the serving loop
  was not stuck in one message, is cut;
* **idle timeout**: a connection that received nothing at all (PINGs count)
  for ``idle_timeout`` seconds is cut;
* offload state keyed by a connection (:meth:`conn_key`) is handed to
  ``on_gone`` once that connection has ended.

A cut aborts a TCP connection (``connect(AF_UNSPEC)`` on libzmq's fd: the
peer gets a reset, unread bytes are dropped, libzmq reads an error at once
and frees the partial message); other sockets are shut down.  The
handshake timeout is libzmq's own (``ZMQ_HANDSHAKE_IVL``, set by the
delegate).  ``ipc://`` connections have no byte counts: only the connection
cap and the global memory bound (a non-delivering connection with bytes
queued in the kernel) apply to them.  The delegate's serving loop takes every
message off the ROUTER in Python, whatever its dispatcher, so that its one
intake step can read ``ZMQ_SRCFD`` (libzmq's C proxy drops it, and no other
message property names the connection).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from testbed.core import limits

#: How often counters and memory are read (s).  A peer can add what arrives in
#: one tick on top of a limit before it is cut.
TICK_S = 0.02

#: How often connections that own offload state are checked for having ended (s).
LIVENESS_S = 0.25

#: Upper bound of bytes libzmq holds per byte a peer sends (an empty part: 2
#: bytes on the wire, a 64-byte ``msg_t`` in the pipe; doubled for margin).
#: Above ``peer_memory_max`` only a connection that sent at least
#: ``peer_memory_max / PART_AMPLIFICATION`` bytes can be the one to blame.
PART_AMPLIFICATION = 64

#: Bytes a connection may receive beyond what PONGs answer before its first
#: whole message without counting as a message begun: its handshake (ZMTP
#: READY with an identity of up to 255 bytes, or CURVE's HELLO and INITIATE,
#: less what the delegate sent back).
HANDSHAKE_SLACK = 512

#: Hand freed memory back (``malloc_trim``) once the bytes in use fell this
#: far below their peak since the last time, at most every ``TRIM_EVERY_S``.
TRIM_STEP = 16 << 20
TRIM_EVERY_S = 1.0

#: After a memory cut, the next one waits for the cut connection to close, at
#: most this long (s).
CUT_SETTLE_S = 0.5

#: Offsets in ``struct tcp_info`` of ``tcpi_bytes_acked``, ``tcpi_bytes_received``
#: (Linux 4.1+) and ``tcpi_bytes_sent`` (4.19+), and the length asked for.
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
_TCPI_BYTES_SENT = 200
_TCP_INFO_LEN = 208
_FIONREAD = 0x541B

_libc = ctypes.CDLL(None, use_errno=True)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


_mallinfo2 = getattr(_libc, "mallinfo2", None)  # glibc 2.33+
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2
    _mallinfo2.argtypes = []
_malloc_trim = getattr(_libc, "malloc_trim", None)


class _SockaddrUnspec(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_char * 14)]


_UNSPEC = _SockaddrUnspec(socket.AF_UNSPEC)


def heap_in_use() -> int | None:
    """Bytes ``malloc`` has handed out and not had back, in every arena and in
    the chunks it mmapped (glibc ``mallinfo2``); None where there is none."""
    if _mallinfo2 is None:
        return None
    m = _mallinfo2()
    return m.uordblks + m.hblkhd


def trim_heap() -> None:
    """Give free ``malloc`` memory back to the system (glibc ``malloc_trim(0)``)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def tcp_counts(fd: int) -> tuple[int, int] | None:
    """``(bytes received, bytes sent)`` of TCP socket ``fd`` (None if not TCP): sent
    is ``tcpi_bytes_sent``, or ``tcpi_bytes_acked`` before Linux 4.19 (which lags
    by the peer's delayed ACKs)."""
    buf = ctypes.create_string_buffer(_TCP_INFO_LEN)
    size = ctypes.c_uint32(_TCP_INFO_LEN)
    rc = _libc.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, buf, ctypes.byref(size))
    if rc != 0 or size.value < _TCPI_BYTES_RECEIVED + 8:
        return None
    acked, received = struct.unpack_from("<QQ", buf, _TCPI_BYTES_ACKED)
    if size.value >= _TCPI_BYTES_SENT + 8:
        return received, struct.unpack_from("<Q", buf, _TCPI_BYTES_SENT)[0]
    return received, acked


def _queued(fd: int) -> int:
    """Bytes waiting in the kernel to be read from socket ``fd`` (0 on any error)."""
    n = ctypes.c_int(0)
    if _libc.ioctl(fd, _FIONREAD, ctypes.byref(n)) != 0:
        return 0
    return n.value


def _shutdown(fd: int) -> None:
    """End libzmq's connection on ``fd`` without closing libzmq's descriptor."""
    _libc.shutdown(fd, socket.SHUT_RDWR)


def _abort(fd: int) -> None:
    """End libzmq's connection on ``fd`` now, without closing libzmq's descriptor.

    A TCP connection is aborted (``connect`` to ``AF_UNSPEC`` disconnects it:
    a reset to the peer, the unread bytes dropped, ``ECONNRESET`` for libzmq's
    next read), so libzmq never decodes what a cut peer had queued; anything
    else is shut down.
    """
    if _libc.connect(fd, ctypes.byref(_UNSPEC), ctypes.sizeof(_UNSPEC)) != 0:
        _shutdown(fd)


class ThrottledLog:
    """One line per ``kind`` at most every ``every_s`` seconds (no log flooding), to
    ``log`` or standard error.  The delegate's limits report through it, under
    libzmq (:class:`ConnectionGuard`) and raw ZMTP (:class:`testbed.delegate.router.Router`)."""

    def __init__(self, log=None, every_s: float = 10.0) -> None:
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def __call__(self, line: str, kind: str = "") -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) >= self.every_s:
            self._last[kind] = now
            self._log(line)


class _Conn:
    """What the guard knows of one accepted connection."""

    __slots__ = ("tcp", "base", "begun", "stall_ns", "rx", "tx", "active_ns", "delivered")

    def __init__(self, tcp: bool, now: int) -> None:
        # counted from the connection's start (the TCP counters start at 0): what
        # came before this guard saw the accept counts too
        self.tcp = tcp
        self.base = 0  # bytes received when it last delivered a whole message
        self.begun = 0  # 7 x bytes received since then that no PONG answered (see _tick)
        self.stall_ns = 0  # time a message of it has been begun, the loop not stuck
        self.rx = 0  # bytes received at the last tick
        self.tx = 0  # bytes sent at the last tick
        self.active_ns = now  # when it last received anything
        self.delivered = False  # has delivered a whole message (handshake over)


class ConnectionGuard:
    """Connection cap, backlog, memory, message and idle bounds (module docstring)."""

    def __init__(
        self,
        ctx: zmq.Context,
        sock: zmq.Socket,
        max_connections: int,
        max_backlog: int | None,
        log=None,
        *,
        message_timeout: float | None = limits.MESSAGE_TIMEOUT_S,
        idle_timeout: float | None = limits.IDLE_TIMEOUT_S,
        peer_memory_max: int | None = limits.PEER_MEMORY_MAX,
        global_memory_max: int | None = limits.GLOBAL_MEMORY_MAX,
        max_frame: int = 0,
        loop_marks: bool = True,
        on_gone: Callable[[bytes], None] | None = None,
    ):
        self.max_connections = max_connections
        self.max_backlog = max_backlog
        self.message_timeout = message_timeout
        self.idle_timeout = idle_timeout
        self.peer_memory_max = peer_memory_max
        self.global_memory_max = global_memory_max
        #: bytes libzmq allocates for one frame as soon as its header arrives
        #: (``ZMQ_MAXMSGSIZE``): what a connection with a frame under way may hold
        #: beyond the bytes it sent
        self.max_frame = max_frame
        #: the serving loop clears :attr:`current` after each reply (else it never
        #: counts as stuck, and the message timeout runs whatever it does)
        self.loop_marks = loop_marks
        self.on_gone = on_gone
        #: fd of the message the serving loop is handling now, -1 while it waits
        #: (set by :meth:`delivered`, cleared by the loop)
        self.current = -1
        self.refused = 0  # connections shut down at accept (over the cap)
        self.cut = 0  # connections cut for their backlog
        self.memory_cuts = 0  # connections cut for the memory they made the delegate hold
        self.timed_out = 0  # connections cut for a message begun too long ago, or idle
        self.heap_base: int | None = None  # bytes in malloc at start
        self._warn = ThrottledLog(log)  # one line per kind at most every 10 s
        self._mon = sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        )
        self._mon.setsockopt(zmq.LINGER, 0)
        self._conns: dict[int, _Conn] = {}
        self._seen: set[int] = set()  # fds that delivered since the last tick (serving thread)
        self._prev: set[int] = set()  # the previous tick's set, and what of it was read then
        self._prev_read: set[int] = set()
        self._was_busy = False
        self._last_ns = 0
        self._peak = 0  # bytes in use at their highest since the last trim
        self._trimmed = 0  # when (monotonic ns)
        self._settle_fd = -1  # the connection of the last memory cut, until it closed
        self._settle_until = 0
        self._keys: dict[bytes, tuple[int, int]] = {}  # offload key -> (fd, socket inode)
        self._keys_lock = threading.Lock()
        self._keys_due = 0  # next liveness check (monotonic ns)
        self._stop = threading.Event()
        self._sock = sock
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ serving thread(s)

    def delivered(self, fd: int) -> None:
        """Called by the serving loop for every whole message received from ``fd``."""
        self._seen.add(fd)
        self.current = fd

    def conn_key(self, ident: bytes, fd: int) -> bytes:
        """A key for state of the connection on ``fd`` with routing identity ``ident``
        (``ident``, NUL, the socket's inode): unique to that connection, whatever
        identity a later one chooses; ``on_gone(key)`` is called once it ended.
        Raises :class:`OSError` if ``fd`` is no longer a socket (the connection ended)."""
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.ENOTCONN, "the connection has ended")
        key = ident + b"\0" + st.st_ino.to_bytes(8, "little")
        with self._keys_lock:
            self._keys[key] = (fd, st.st_ino)
        return key

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.heap_base = heap_in_use()
        self._peak = self.heap_base or 0
        self._last_ns = time.monotonic_ns()
        self._thread = threading.Thread(target=self._run, name="tb-delegate-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(0)

    def _run(self) -> None:
        # The monitor queue must always be drained: libzmq's I/O thread blocks
        # on a full monitor socket, so this loop survives any error of its own.
        mon = self._mon
        mono = time.monotonic_ns
        tick_ns = int(TICK_S * 1e9)
        next_tick = mono() + tick_ns
        while not self._stop.is_set():
            try:
                wait_ms = max(0, -((mono() - next_tick) // 1_000_000))  # rounded up
                if mon.poll(wait_ms):
                    for _ in range(1000):  # bounded: ticks go on under a flood of events
                        self._event(parse_monitor_message(mon.recv_multipart()))
                        if not mon.poll(0):
                            break
                now = mono()
                if now >= next_tick:
                    next_tick = now + tick_ns
                    self._tick(now)
            except zmq.ZMQError:
                return  # the context is closing
            except Exception as exc:  # a bug here must not stall the delegate
                self._warn(f"testbed delegate: connection guard: {exc!r:.200}", "bug")

    # ------------------------------------------------------------ guard thread

    def _event(self, ev: dict) -> None:
        fd = int(ev["value"])
        now = time.monotonic_ns()
        if ev["event"] == zmq.EVENT_ACCEPTED:
            if len(self._conns) >= self.max_connections:
                self.refused += 1
                _shutdown(fd)
                self._warn(
                    f"testbed delegate: {len(self._conns)} connections open (limit "
                    f"{self.max_connections}); refusing new ones",
                    "cap",
                )
                return
            self._conns[fd] = _Conn(tcp_counts(fd) is not None, now)
        else:
            self._conns.pop(fd, None)
            if fd == self._settle_fd:  # its message is freed by the next tick
                self._settle_fd = -1
                self._settle_until = now + int(2 * TICK_S * 1e9)
            if self._keys:
                self._keys_due = now  # offload state of that connection: check now

    def _cut(self, fd: int, kind: str, line: str) -> None:
        _abort(fd)
        self._conns.pop(fd, None)  # until its fd is accepted again
        self._warn(f"testbed delegate: {line}", kind)

    def _delivered_fds(self) -> set[int]:
        """Fds that delivered a whole message since the last tick.  An ``add`` the
        serving thread made to the previous tick's set after it was read counts now."""
        cur, self._seen = self._seen, set()
        snap = cur.copy()  # atomic: the serving thread may still add to ``cur``
        seen = snap
        prev, prev_read = self._prev, self._prev_read
        if len(prev) != len(prev_read):
            seen = snap | (prev - prev_read)
        self._prev, self._prev_read = cur, snap
        return seen

    def _tick(self, now: int) -> None:
        dt = now - self._last_ns
        self._last_ns = now
        seen = self._delivered_fds()
        busy = self.loop_marks and self.current >= 0
        stuck = busy and self._was_busy and not seen  # one message for a whole tick
        self._was_busy = busy
        backlog = self.max_backlog
        timeout_ns = None if self.message_timeout is None else int(self.message_timeout * 1e9)
        idle_ns = None if self.idle_timeout is None else int(self.idle_timeout * 1e9)
        pending: list[tuple[int, int]] = []  # (bytes since its last whole message, fd)
        growing: set[int] = set()  # fds of those that received bytes this tick
        for fd, c in list(self._conns.items()):
            if not c.tcp:
                if fd in seen:
                    c.delivered = True
                continue
            counts = tcp_counts(fd)
            if counts is None:
                continue
            rx, tx = counts
            drx, dtx = rx - c.rx, tx - c.tx
            c.rx, c.tx = rx, tx
            if drx:
                c.active_ns = now
            elif idle_ns is not None and now - c.active_ns > idle_ns:
                self.timed_out += 1
                self._cut(fd, "idle", f"closed a connection idle for {self.idle_timeout:g} s")
                continue
            if fd in seen or rx < c.base:  # delivered lately, or the fd was reused
                c.base, c.begun, c.stall_ns = rx, 0, 0
                c.delivered = c.delivered or fd in seen
                continue
            undelivered = rx - c.base
            if backlog is not None and undelivered > backlog:
                self.cut += 1
                self._cut(fd, "backlog", f"dropped a connection that sent {undelivered} bytes "
                          f"without completing a message (limit {backlog})")  # fmt: skip
                continue
            # A message begun: bytes received that no PONG answered (a PING of 9 bytes
            # gets a PONG of 7, in the same tick or the next).  Bytes sent only offset
            # bytes received that tick or before (``begun`` never goes below 0), so
            # replies sent before a message began explain none of it.  Before its
            # first whole message a connection may also send its handshake.
            c.begun = max(0, c.begun + 7 * drx - 9 * dtx)
            slack = 0 if c.delivered else HANDSHAKE_SLACK
            if c.begun > 7 * slack:
                if not stuck:
                    c.stall_ns += dt
                if timeout_ns is not None and c.stall_ns > timeout_ns:
                    self.timed_out += 1
                    self._cut(fd, "timeout", f"dropped a connection that began a message and "
                              f"did not complete it within {self.message_timeout:g} s")  # fmt: skip
                    continue
            else:
                c.stall_ns = 0
            if undelivered > 0:
                pending.append((undelivered, fd))
                if drx:
                    growing.add(fd)
        self._memory(now, seen, pending, growing)
        if self._keys and now >= self._keys_due:
            self._keys_due = now + int(LIVENESS_S * 1e9)
            self._check_keys()

    def _memory(self, now: int, seen: set[int], pending: list[tuple[int, int]],
                growing: set[int] = frozenset()) -> None:  # fmt: skip
        """The memory bounds (module docstring), and handing freed memory back."""
        inuse = heap_in_use()
        if inuse is None or self.heap_base is None:
            return
        if inuse > self._peak:
            self._peak = inuse
        elif self._peak - inuse > TRIM_STEP and now - self._trimmed > TRIM_EVERY_S * 1e9:
            trim_heap()
            self._peak, self._trimmed = inuse, now
        excess = inuse - self.heap_base
        peer_max, global_max = self.peer_memory_max, self.global_memory_max
        over_peer = peer_max is not None and excess > peer_max
        over_global = global_max is not None and excess > global_max
        if not (over_peer or over_global):
            return
        if now < self._settle_until:
            return  # the last cut connection has not closed (and freed its message) yet
        # Whole messages waiting for the serving loop look like unfinished ones from
        # here; they hold about their size, unfinished ones of tiny parts 32 times it.
        # libzmq allocates a frame whole when its header arrives, so each of them may
        # also hold one frame it has not sent yet (40 honest 1 MiB messages under way
        # hold 40 MiB having sent a few).
        honest = sum(2 * undelivered + self.max_frame for undelivered, _fd in pending)
        amplified = excess > honest
        for fd, c in self._conns.items():  # ipc: non-delivering, with bytes queued to read
            if not c.tcp and fd not in seen and (queued := _queued(fd)) > 0:
                pending.append((queued, fd))
        if not pending:
            return
        if over_global:
            undelivered, fd = max(pending)
            blame = True
        else:  # only a connection still sending: a whole message that waits holds its size,
            # and libzmq allocates a message at its header, so partial messages of honest
            # peers can make the memory look amplified (their bytes still arriving)
            growing_pending = [(n, f) for n, f in pending if f in growing]
            if not growing_pending:
                return
            undelivered, fd = max(growing_pending)
            blame = (
                over_peer
                and amplified
                and self._conns[fd].tcp
                and undelivered * PART_AMPLIFICATION >= peer_max
            )
        if not blame:
            return
        self.memory_cuts += 1
        self._settle_fd = fd
        self._settle_until = now + int(CUT_SETTLE_S * 1e9)
        limit = global_max if over_global else peer_max
        self._cut(fd, "memory", f"dropped a connection that sent {undelivered} bytes without "
                  f"completing a message while peers made the delegate hold {excess >> 20} MiB "
                  f"(limit {limit >> 20} MiB)")  # fmt: skip

    def _check_keys(self) -> None:
        """Hand the keys of connections that ended to ``on_gone``."""
        with self._keys_lock:
            items = list(self._keys.items())
        for key, (fd, ino) in items:
            try:
                alive = os.fstat(fd).st_ino == ino
            except OSError:
                alive = False
            if alive:
                continue
            with self._keys_lock:
                if self._keys.get(key) != (fd, ino):
                    continue  # tracked again meanwhile (a late message of it)
                del self._keys[key]
            if self.on_gone is not None:
                self.on_gone(key)
