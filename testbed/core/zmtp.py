"""ZMTP 3.0 (the ZeroMQ wire protocol, NULL mechanism) over a plain TCP socket.

The delegate's ROUTER speaks it through libzmq; a peer that speaks it directly
needs no libzmq and no I/O thread of its own.  :class:`Dealer` is the relay's
connection to the delegate by default (:func:`transport`, docs/seccomp.md);
:func:`connect` and the frame helpers serve ``testbed bench --breakdown``'s
"raw ZMTP from C" row and tests that must misbehave below libzmq.  Only what
those need: the greeting, READY, PING/PONG, single-part and multipart
message frames, re-dialling.  No CURVE (that stays with libzmq).
"""

from __future__ import annotations

import errno
import os
import re
import select
import socket
import struct
import time

import zmq

from testbed.core.errors import TestbedError

#: Signature, version 3.0, mechanism NULL, as-server 0, filler (64 bytes).
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32
_FLAG_MORE, _FLAG_LONG, _FLAG_COMMAND = 0x01, 0x02, 0x04


def frame(data: bytes, more: bool = False) -> bytes:
    """One message frame (flag MORE when ``more``)."""
    flags = _FLAG_MORE if more else 0
    if len(data) > 255:
        return bytes([flags | _FLAG_LONG]) + struct.pack(">Q", len(data)) + data
    return bytes([flags, len(data)]) + data


def ready_command(socket_type: bytes) -> bytes:
    """The READY command announcing ``socket_type`` (e.g. ``b"DEALER"``)."""
    body = b"\x05READY" + bytes([11]) + b"Socket-Type"
    body += struct.pack(">I", len(socket_type)) + socket_type
    return bytes([_FLAG_COMMAND, len(body)]) + body


def frame_head(buf, pos: int, n: int) -> tuple[int, int, int] | None:
    """(flags, body size, header length) of the frame at ``buf[pos:n]``; None while
    its header is incomplete."""
    if n - pos < 2:
        return None
    flags = buf[pos]
    if flags & _FLAG_LONG:
        if n - pos < 9:
            return None
        return flags, struct.unpack_from(">Q", buf, pos + 1)[0], 9
    return flags, buf[pos + 1], 2


def read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        data += chunk
    return data


def read_frame(s: socket.socket) -> tuple[int, bytes]:
    """(flags, body) of the next frame, a command or a message part."""
    flags, size = read_exactly(s, 2)
    if flags & _FLAG_LONG:
        size = struct.unpack(">Q", bytes([size]) + read_exactly(s, 7))[0]
    return flags, read_exactly(s, size)


def read_message(s: socket.socket) -> list[bytes]:
    """The next message's parts (commands in between are skipped)."""
    parts: list[bytes] = []
    while True:
        flags, body = read_frame(s)
        if flags & _FLAG_COMMAND:
            continue
        parts.append(body)
        if not flags & _FLAG_MORE:
            return parts


def connect(
    endpoint: str, socket_type: bytes = b"DEALER", timeout: float = 10, handshake: bool = True
) -> socket.socket:
    """A TCP connection to ``tcp://HOST:PORT`` that has sent greeting and READY
    (and, with ``handshake``, read the peer's, so messages may follow)."""
    m = re.fullmatch(r"tcp://([^:/]+):(\d+)", endpoint)
    if not m:
        raise TestbedError(f"raw ZMTP needs a tcp://HOST:PORT endpoint, not {endpoint!r}")
    try:
        s = socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout)
    except OSError as exc:
        raise TestbedError(f"cannot connect to {endpoint}: {exc}") from None
    try:
        s.sendall(GREETING + ready_command(socket_type))
        if handshake:
            peer = read_exactly(s, 64)  # the peer's greeting, then its READY command:
            if peer[0] != 0xFF or peer[9] != 0x7F or peer[10] < 3:
                raise TestbedError(f"{endpoint} does not speak ZMTP 3")
            flags, _ready = read_frame(s)  # only then may messages follow
            if not flags & _FLAG_COMMAND:
                raise TestbedError(f"{endpoint} sent a message before its READY command")
    except BaseException:
        s.close()
        raise
    return s


# ---------------------------------------------------------------- the relay's connection

#: ``0``/``off``/``no``/``false`` in the environment: the relay keeps libzmq.
ENV = "TESTBED_ZMTP"
_TCP = re.compile(r"tcp://([A-Za-z0-9.-]+):(\d+)")
_CMD_PING = b"\x04PING"


def disabled_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


def transport(endpoint: str, curve_keys: str | None = None) -> str:
    """``"zmtp"`` (the relay speaks ZMTP itself, :class:`Dealer`), ``"shm"`` or ``"libzmq"``.

    Raw ZMTP serves ``tcp://HOST:PORT`` (IPv4 or a name) and ``ipc://PATH``
    without CURVE; CURVE, any other endpoint and ``TESTBED_ZMTP=0`` keep libzmq.
    ``shm://PATH`` is always ``"shm"`` (rings in shared memory,
    :mod:`testbed.core.shmring`; libzmq has no such transport).
    """
    if endpoint.startswith("shm://") and len(endpoint) > 6:
        return "shm"
    if curve_keys or disabled_by_env():
        return "libzmq"
    if _TCP.fullmatch(endpoint) or (endpoint.startswith("ipc://") and len(endpoint) > 6):
        return "zmtp"
    return "libzmq"


class Dealer:
    """What the relay uses of a pyzmq DEALER, speaking ZMTP 3.0 (NULL) itself.

    One non-blocking TCP (``tcp://``) or Unix (``ipc://``) socket, no libzmq
    and no I/O thread.  ``send`` frames a message and writes it at once (what
    the kernel does not take waits in a buffer of at most ``MAX_OUT`` bytes,
    beyond which ``send`` raises ``zmq.Again`` as a full DEALER does);
    ``recv`` returns the next message part.  Reading happens only while no
    complete part is buffered, so at most one read's worth (``READ``) of parts
    waits here.  ``poll`` counts buffered parts as ready even when the fd is
    not readable.  Messages wait (``MAX_OUT`` bytes at most) until the peer's
    READY arrived, as libzmq's do.  PONGs answering the peer's PINGs share
    ``MAX_OUT`` with messages: beyond it they are dropped (``dropped_pongs``),
    so a peer that pings and never reads cannot grow the relay.  A connection the peer closes is dropped
    (what was written in part is lost); the next ``send`` dials again and redoes
    the greeting, and while the dial fails ``poll`` (or :class:`Poller`) retries
    every ``RECONNECT_S``, as libzmq reconnects.  There is no I/O thread: the
    connection progresses only inside ``send``, ``recv`` and ``poll``.  While
    unconnected, ``fileno`` is a pipe that never becomes readable.
    """

    MAX_OUT = 8 << 20
    MAX_FRAME = 16 << 20  # (the delegate's own limit is 4 MiB, WELCOME max_frame)
    READ = 1 << 18
    RECONNECT_S = 0.1

    def __init__(self, endpoint: str, socket_type: bytes = b"DEALER") -> None:
        self.endpoint = endpoint
        m = _TCP.fullmatch(endpoint)
        if m:
            try:
                info = socket.getaddrinfo(m.group(1), int(m.group(2)), socket.AF_INET,
                                          socket.SOCK_STREAM)  # fmt: skip
            except (OSError, ValueError) as exc:
                raise TestbedError(f"cannot connect to {endpoint}: {exc}") from None
            self._family, self._addr = socket.AF_INET, info[0][4]
        elif endpoint.startswith("ipc://") and len(endpoint) > 6:
            self._family, self._addr = socket.AF_UNIX, endpoint[6:]
        else:
            raise TestbedError(f"raw ZMTP serves tcp://HOST:PORT and ipc://PATH, not {endpoint!r}")
        self._hello = GREETING + ready_command(socket_type)
        self._idle_r, self._idle_w = os.pipe()
        self._sock: socket.socket | None = None
        self._connecting = False
        self._greeted = False
        self._ready = False  # the peer's READY seen: messages may go
        self._out = bytearray()
        self._held = bytearray()  # messages sent before that (libzmq waits too)
        self._in = bytearray()
        self._rbuf = bytearray(self.READ)  # reused by every read
        self._rview = memoryview(self._rbuf)
        self._parts: list[bytes] = []  # complete message parts, oldest first
        self._next = 0  # index of the next part to return
        self._dropped_at = -1e9
        self.dials = 0
        self.drops = 0
        self.dropped_pongs = 0
        self.last_error = ""
        self.closed = False
        self._dial()

    # ---------------------------------------------------------- connection
    @property
    def connected(self) -> bool:
        """A connection is up (or being made)."""
        return self._sock is not None

    def _dial(self) -> None:
        s = socket.socket(self._family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        if self._family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dials += 1
        rc = s.connect_ex(self._addr)
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            self._dropped_at = time.monotonic()
            self._out.clear()
            self.last_error = f"cannot connect: {errno.errorcode.get(rc, rc)}"
            return
        self._sock = s
        self._connecting = rc != 0
        self._greeted = self._ready = False
        self._in.clear()
        self._out[:0] = self._hello
        if not self._connecting:
            self._flush()

    def _drop(self, why: str) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.drops += 1
        self._connecting = self._greeted = self._ready = False
        self._in.clear()
        self._out.clear()  # (what was written in part cannot go on another connection)
        self._dropped_at = time.monotonic()
        self.last_error = why

    def queue_raw(self, data: bytes) -> None:
        """Bytes of a frame already begun on the connection (the C path's unsent rest)."""
        self._out += data

    def lost(self, why: str) -> None:
        """The connection failed (seen by the C path): drop it, as a failed read would."""
        self._drop(why)

    def _flush(self) -> None:
        if not self._out or self._connecting or self._sock is None:
            return
        try:
            n = self._sock.send(self._out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(f"send: {exc.strerror}")
            return
        del self._out[:n]

    def _read(self) -> None:
        if self._sock is None or self._connecting:
            return
        try:
            n = self._sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(f"recv: {exc.strerror}")
            return
        if not n:
            self._drop("the peer closed the connection")
            return
        self.feed(self._rview[:n])

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes read from the connection (also by the C path): parse what is complete."""
        buf = self._in
        buf += data
        pos = 0
        if not self._greeted:
            if len(buf) < 64:
                return
            if buf[0] != 0xFF or buf[9] != 0x7F or buf[10] < 3:
                self._drop(f"{self.endpoint} does not speak ZMTP 3")
                return
            self._greeted, pos = True, 64
        n = len(buf)
        while (fh := frame_head(buf, pos, n)) is not None:
            flags, size, head = fh
            if size > self.MAX_FRAME:
                self._drop(f"a frame of {size} bytes from {self.endpoint}")
                return
            if n - pos < head + size:
                break
            body = bytes(buf[pos + head : pos + head + size])
            pos += head + size
            if flags & _FLAG_COMMAND:
                if body.startswith(_CMD_PING):  # heartbeat (libzmq's ZMQ_HEARTBEAT_IVL)
                    ctx = body[5 + 2 :][:16]
                    pong = b"\x04PONG" + ctx
                    if self._out and len(self._out) + 2 + len(pong) > self.MAX_OUT:
                        self.dropped_pongs += 1  # a peer that pings and never reads
                    else:
                        self._out += bytes([_FLAG_COMMAND, len(pong)]) + pong
                elif not self._ready:  # its READY (a NULL-mechanism peer sends nothing else)
                    self._ready = True
                    self._out += self._held
                    self._held.clear()
                continue
            self._parts.append(body)
        if pos:
            del buf[:pos]
        if self._out:
            self._flush()

    def _events(self, ev: int) -> None:
        """Act on poll events of the connection's fd."""

        if self._connecting and ev & (select.POLLOUT | select.POLLERR | select.POLLHUP):
            err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._drop(f"cannot connect: {os.strerror(err)}")
                return
            self._connecting = False
        if self._out and ev & select.POLLOUT:
            self._flush()
        if ev & (select.POLLIN | select.POLLERR | select.POLLHUP) and not self.has_message():
            self._read()

    def want(self) -> int:
        """Poll events the connection's fd needs now."""

        if self._out or self._connecting:
            return select.POLLIN | select.POLLOUT
        return select.POLLIN

    def redial_in(self) -> float | None:
        """Seconds until the next dial (0: due), None: connected or nothing to send."""
        if self._sock is not None or not self._held or self.closed:
            return None

        return max(0.0, self._dropped_at + self.RECONNECT_S - time.monotonic())

    def redial_if_due(self) -> None:
        if self.redial_in() == 0:
            self._dial()

    def has_message(self) -> bool:
        return self._next < len(self._parts)

    def c_ready(self) -> bool:
        """Nothing buffered either way and the handshake seen: C may use the fd directly."""
        return (self._sock is not None and self._ready and not self._connecting and not self._out
                and not self._held and not self._in and not self.has_message())  # fmt: skip

    # ---------------------------------------------------------- the pyzmq subset
    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else self._idle_r

    def send(self, data: bytes, flags: int = 0) -> None:
        """Queue one single-part message; ``zmq.Again`` when ``MAX_OUT`` is reached."""

        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "the raw ZMTP connection is closed")
        n = len(data)
        head = bytes([_FLAG_LONG]) + struct.pack(">Q", n) if n > 255 else bytes([0, n])
        if not self._ready:
            if self._held and len(self._held) + n > self.MAX_OUT:
                raise zmq.Again()
            self._held += head
            self._held += data
            self.redial_if_due()
            return
        if self._out and len(self._out) + n > self.MAX_OUT:
            self._flush()
            if flags & zmq.NOBLOCK:
                if len(self._out) + n > self.MAX_OUT:
                    raise zmq.Again()
            else:
                self._wait_room(n)
            if self._sock is None:
                return
        if self._out or self._connecting:
            self._out += head
            self._out += data
            return
        try:
            sent = self._sock.sendmsg((head, data), (), socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._drop(f"send: {exc.strerror}")
            return
        if sent < len(head) + n:
            self._out += (head + data)[sent:]

    def _wait_room(self, n: int, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self._sock is not None and self._out and len(self._out) + n > self.MAX_OUT:
            left = deadline - time.monotonic()
            if left <= 0:
                raise zmq.Again()
            p = select.poll()
            p.register(self._sock.fileno(), self.want())
            for _fd, ev in p.poll(int(left * 1000) + 1):
                self._events(ev)

    def recv(self, flags: int = 0) -> bytes:
        """The next message part (``zmq.Again`` with ``NOBLOCK`` when none is complete)."""

        if not self.has_message():
            if flags & zmq.NOBLOCK:
                self._flush()
                self._read()
                if not self.has_message():
                    raise zmq.Again()
            else:
                while not self.poll(1000):
                    pass
        part = self._parts[self._next]
        self._next += 1
        if self._next == len(self._parts):
            self._parts.clear()
            self._next = 0
        return part

    def poll(self, timeout: int | None = None, flags: int = 1) -> int:
        """``zmq.POLLIN`` when a part can be received within ``timeout`` ms (None: wait),
        ``zmq.POLLOUT`` (with that flag) when ``send`` would not refuse; else 0."""

        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        p = select.poll()
        while True:
            if flags & 1 and self.has_message():
                return 1
            if flags & 2 and len(self._out) < self.MAX_OUT:
                return 2
            fd = self.fileno()
            p.register(fd, self.want() if self._sock is not None else select.POLLIN)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            redial = self.redial_in()
            if redial is not None:
                left = redial if left is None else min(left, redial)
            ready = p.poll(None if left is None else int(left * 1000 + 0.999))
            p.unregister(fd)
            for _fd, ev in ready:
                self._events(ev)
            self.redial_if_due()
            if not ready and left is not None and time.monotonic() >= deadline:
                return 1 if flags & 1 and self.has_message() else 0

    def close(self, linger: int | None = None) -> None:
        if self.closed:
            return
        if self._sock is not None:
            if self._out and not self._connecting:
                self._flush()  # e.g. a BYE: one best-effort write, no lingering
            self._sock.close()
            self._sock = None
        os.close(self._idle_r)
        os.close(self._idle_w)
        self.closed = True


class Poller:
    """``zmq.Poller`` for a :class:`Dealer` and plain fds (the relay's loop).

    A dealer with a buffered message part is reported at once (timeout 0 for
    the rest); its fd's events drive its connection (connect, flush, read).
    """

    def __init__(self) -> None:
        self._p = select.poll()
        self._fds: dict[int, object] = {}
        self._dealer: Dealer | None = None
        self._dfd = -1
        self._dev = 0

    def register(self, obj: object, events: int = 1) -> None:
        if isinstance(obj, Dealer):
            self._dealer = obj
            return
        self._fds[obj] = obj
        self._p.register(obj, events)

    def unregister(self, obj: object) -> None:
        if obj is self._dealer:
            if self._dfd >= 0:
                self._p.unregister(self._dfd)
            self._dealer, self._dfd = None, -1
            return
        del self._fds[obj]
        self._p.unregister(obj)

    def poll(self, timeout: int | None = None) -> list[tuple[object, int]]:
        d = self._dealer
        if d is None:
            return self._p.poll(timeout)
        if d.has_message():
            timeout = 0
        redial = d.redial_in()
        if redial is not None:
            ms = int(redial * 1000) + 1
            timeout = ms if timeout is None or timeout < 0 else min(timeout, ms)
        fd, ev = d.fileno(), d.want()
        if fd != self._dfd or ev != self._dev:
            if self._dfd >= 0:
                self._p.unregister(self._dfd)
            self._p.register(fd, ev)
            self._dfd, self._dev = fd, ev
        out: list[tuple[object, int]] = []
        for f, e in self._p.poll(timeout):
            if f == fd:
                d._events(e)
            else:
                out.append((self._fds[f], e))
        d.redial_if_due()
        if d.has_message():
            out.insert(0, (d, 1))
        return out
