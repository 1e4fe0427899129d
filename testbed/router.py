"""The delegate's ROUTER without libzmq: ZMTP 3.0 (NULL) served on plain sockets.

:class:`Router` listens on ``tcp://ADDR:PORT`` (an IPv4 literal or ``*``,
port or ``*``) or ``ipc://PATH`` and serves every connection in one thread
with ``epoll``: the greeting and READY exchange, message frames, PING/PONG.
It is what a libzmq ROUTER is to the delegate's single serving loop, minus
libzmq's I/O thread and its hand-off, which cost the delegate about half its
CPU per call (docs/design-notes.md, "The delegate's side").  Peers are any
ZMTP 3 DEALER, REQ or ROUTER over NULL: the relay's :class:`testbed.zmtp.Dealer`,
its C path, or a libzmq socket.

Each connection gets a ROUTER identity (``b"\\0"`` + 4 bytes, or the peer's
``Identity`` property when it is unused), and every complete message is
handed to the serving callbacks with the time it was read.  The limits the
libzmq path needs :mod:`testbed.connguard` for are kept here directly:

* ``max_connections`` open connections; further ones are closed at once;
* a frame longer than ``max_frame`` ends its connection (``ZMQ_MAXMSGSIZE``);
* a connection that sends more than ``max_backlog`` bytes of one unfinished
  multipart message is cut; only the first ``max_parts`` parts are kept;
* replies a peer does not read wait in at most ``MAX_OUT`` bytes per
  connection; further replies to it are dropped (ROUTER policy), counted.

Nothing is buffered beyond one partial frame per connection: a message is
answered as soon as its last frame is read.
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
from collections.abc import Callable

from testbed.connguard import ThrottledLog
from testbed.errors import TestbedError
from testbed.zmtp import GREETING, frame, frame_head, ready_command

_MORE, _COMMAND = 0x01, 0x04
_EPOLLIN, _EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
_EPOLLRD = select.EPOLLIN | select.EPOLLRDHUP
_PEER_TYPES = (b"DEALER", b"REQ", b"ROUTER")
_TCP_BIND = re.compile(r"tcp://(\*|\d{1,3}(?:\.\d{1,3}){3}):(\*|\d{1,5})")

#: Bytes of replies waiting per connection for a peer that does not read.
MAX_OUT = 8 << 20
#: Bytes taken per read (one buffer, reused).
READ = 1 << 18
#: At most one warning line of each kind per this many seconds.
WARN_EVERY_S = 10.0

_GREETING_STATE, _READY_STATE, _OPEN = 0, 1, 2


def serves(endpoint: str) -> bool:
    """True if :class:`Router` can bind ``endpoint`` (else libzmq must)."""
    m = _TCP_BIND.fullmatch(endpoint)
    if m:
        host = m.group(1)
        return host == "*" or all(0 <= int(x) <= 255 for x in host.split("."))
    return endpoint.startswith("ipc://") and len(endpoint) > 6 and endpoint != "ipc://*"


class _Conn:
    __slots__ = ("sock", "fd", "ident", "state", "inbuf", "out", "parts", "nparts", "nbytes")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.ident = b""
        self.state = _GREETING_STATE
        self.inbuf = bytearray()  # an incomplete frame (or greeting) carried to the next read
        self.out = bytearray()  # reply bytes the kernel did not take yet
        self.parts: list[bytes] = []  # kept parts of an unfinished multipart message
        self.nparts = 0
        self.nbytes = 0


#: answer(identity, payload, t_recv_ns) -> reply, for a single-part message.
Answer = Callable[[bytes, bytes, int], bytes]
#: answer_parts(identity, kept_parts, n_parts, n_bytes, t_recv_ns) -> (reply, envelope).
AnswerParts = Callable[[bytes, list[bytes], int, int, int], tuple[bytes, tuple[bytes, ...]]]


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
    ) -> None:
        if not serves(endpoint):
            raise TestbedError(f"the raw ZMTP delegate serves tcp://ADDR:PORT and ipc://PATH, "
                               f"not {endpoint!r}")  # fmt: skip
        self.endpoint = endpoint
        self.max_connections = max_connections
        self.max_frame = max_frame
        self.max_backlog = max_backlog
        self.max_parts = max_parts
        self.on_close = on_close
        self._log = ThrottledLog(log, WARN_EVERY_S)
        self._listener: socket.socket | None = None
        self._unlink: str | None = None
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_lock = threading.RLock()  # a wake-up never writes to a closed (reused) fd
        self._ep = select.epoll()
        self._conns: dict[int, _Conn] = {}
        self._idents: set[bytes] = set()
        self._next_ident = struct.unpack("<I", os.urandom(4))[0]
        self._hello = GREETING + ready_command(b"ROUTER")
        self._buf = bytearray(READ)
        self._view = memoryview(self._buf)
        self._accept_paused = 0.0
        self.bound = ""
        self.refused = 0
        self.cut = 0
        self.dropped_replies = 0

    # ------------------------------------------------------------ set-up

    def bind(self) -> str:
        """Listen; the bound endpoint (the real port for ``:*``)."""
        if self.endpoint.startswith("ipc://"):
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
        answer_parts: AnswerParts,
        stop: Callable[[], bool],
        drain_ns: int,
        linger_ns: int,
    ) -> None:
        """Answer every message until ``stop()``; then answer what is already
        readable (for at most ``drain_ns``) and send what is queued (``linger_ns``)."""
        self._answer, self._answer_parts = answer, answer_parts
        poll = self._ep.poll
        conns = self._conns
        lfd, wfd = self._listener.fileno(), self._wake_fd
        read = self._read
        timeout = -1
        deadline = None
        while True:
            if stop():
                if deadline is None:
                    deadline = time.monotonic_ns() + drain_ns
                    timeout = 0
                    self._ep.unregister(lfd)  # no new connections while draining
                    self._accept_paused = 0.0
                elif time.monotonic_ns() > deadline:
                    break
            if self._accept_paused:
                timeout = 0.1 if timeout == -1 else timeout
                if time.monotonic() > self._accept_paused:
                    self._accept_paused = 0.0
                    self._ep.modify(lfd, _EPOLLIN)
                    timeout = -1 if deadline is None else 0
            events = poll(timeout)
            if not events and deadline is not None:
                break  # nothing more is readable: drained
            for fd, ev in events:
                conn = conns.get(fd)
                if conn is not None:
                    if ev & _EPOLLOUT:
                        self._flush(conn)
                    if ev & ~_EPOLLOUT and conn.fd in conns:
                        read(conn)
                elif fd == lfd:
                    self._accept()
                elif fd == wfd:
                    try:
                        os.eventfd_read(wfd)
                    except BlockingIOError:
                        pass
        self._linger(linger_ns)

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
            if len(self._conns) >= self.max_connections:
                self.refused += 1
                sock.close()
                self._warn("cap", f"testbed delegate: {len(self._conns)} connections open "
                                  f"(limit {self.max_connections}); refusing new ones")  # fmt: skip
                continue
            sock.setblocking(False)
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock)
            self._conns[conn.fd] = conn
            self._ep.register(conn.fd, _EPOLLRD)
            self._write(conn, self._hello)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        try:
            self._ep.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()
        if conn.ident:
            self._idents.discard(conn.ident)
            if self.on_close is not None:
                self.on_close(conn.ident)

    def _warn(self, kind: str, line: str) -> None:
        self._log(line, kind)

    # ------------------------------------------------------------ bytes in

    def _read(self, conn: _Conn) -> None:
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
        buf = self._buf
        # the measured path: one whole single-part message, nothing carried over
        if not conn.inbuf and conn.state == _OPEN and buf[0] == 0 and buf[1] + 2 == n \
                and not conn.nparts:  # fmt: skip
            reply = self._answer(conn.ident, bytes(self._view[2:n]), t_recv)
            if conn.fd in self._conns:
                self._reply(conn, reply, ())
            return
        if conn.inbuf:
            conn.inbuf += self._view[:n]
            self._parse(conn, conn.inbuf, len(conn.inbuf), t_recv, carried=True)
        else:
            self._parse(conn, self._view, n, t_recv, carried=False)

    def _parse(self, conn: _Conn, data, n: int, t_recv: int, carried: bool) -> None:
        pos = 0
        if conn.state == _GREETING_STATE:
            if n < 64:
                if data[0] != 0xFF or (n >= 10 and data[9] != 0x7F):
                    self._refuse(conn, "does not speak ZMTP")
                    return
                self._carry(conn, data, 0, n, carried)
                return
            if data[0] != 0xFF or data[9] != 0x7F or data[10] < 3:
                self._refuse(conn, "does not speak ZMTP 3")
                return
            if bytes(data[12:17]) != b"NULL\x00":
                self._refuse(conn, "asks for a security mechanism (start the delegate with "
                                   "--curve-keys for CURVE)")  # fmt: skip
                return
            conn.state, pos = _READY_STATE, 64
        max_frame = self.max_frame
        while (fh := frame_head(data, pos, n)) is not None:
            flags, size, head = fh
            if size > max_frame:
                self.cut += 1
                self._warn("frame", f"testbed delegate: dropped a connection that sent a frame "
                                    f"of {size} bytes (limit {max_frame})")  # fmt: skip
                self._drop(conn)
                return
            if n - pos < head + size:
                break
            start, pos = pos + head, pos + head + size
            if flags & _COMMAND:
                if not self._command(conn, bytes(data[start:pos])):
                    return
                continue
            if conn.state != _OPEN:
                self._refuse(conn, "sent a message before its READY command")
                return
            if flags & _MORE:
                conn.nparts += 1
                conn.nbytes += size
                if conn.nparts <= self.max_parts:
                    conn.parts.append(bytes(data[start:pos]))
                if conn.nbytes > self.max_backlog:
                    self._cut_backlog(conn)
                    return
                continue
            body = bytes(data[start:pos])
            if conn.nparts:
                parts, nparts, nbytes = conn.parts, conn.nparts + 1, conn.nbytes + size
                if nparts <= self.max_parts:
                    parts.append(body)
                conn.parts, conn.nparts, conn.nbytes = [], 0, 0
                reply, env = self._answer_parts(conn.ident, parts, nparts, nbytes, t_recv)
            else:
                reply, env = self._answer(conn.ident, body, t_recv), ()
            if conn.fd not in self._conns:
                return
            self._reply(conn, reply, env)
        if conn.nparts and conn.nbytes + (n - pos) > self.max_backlog:
            self._cut_backlog(conn)
            return
        self._carry(conn, data, pos, n, carried)

    def _carry(self, conn: _Conn, data, pos: int, n: int, carried: bool) -> None:
        """Keep ``data[pos:n]`` (an incomplete frame) for the next read."""
        if carried:
            if pos:
                del conn.inbuf[:pos]
        elif pos < n:
            conn.inbuf += data[pos:n]

    def _cut_backlog(self, conn: _Conn) -> None:
        self.cut += 1
        self._warn("backlog", f"testbed delegate: dropped a connection that sent "
                              f"{conn.nbytes} bytes without completing a message "
                              f"(limit {self.max_backlog})")  # fmt: skip
        self._drop(conn)

    def _refuse(self, conn: _Conn, why: str) -> None:
        self._warn("proto", f"testbed delegate: closed a connection that {why}")
        self._drop(conn)

    def _command(self, conn: _Conn, body: bytes) -> bool:
        """Act on one command frame; False if the connection was dropped."""
        if not body:
            self._refuse(conn, "sent an empty command")
            return False
        name = body[1 : 1 + body[0]]
        if conn.state == _READY_STATE:
            if name != b"READY":
                self._refuse(conn, f"sent {name[:16]!r} instead of READY")
                return False
            props = _properties(body[1 + body[0] :])
            if props is None or props.get(b"Socket-Type") not in _PEER_TYPES:
                kind = (props or {}).get(b"Socket-Type", b"no socket type")
                self._refuse(conn, f"is a {kind[:16].decode('latin-1')} socket, "
                                   "not DEALER, REQ or ROUTER")  # fmt: skip
                return False
            conn.ident = self._identity(props.get(b"Identity", b""))
            conn.state = _OPEN
        elif name == b"PING":  # ZMTP 3.1 heartbeat: PONG with its context
            pong = b"\x04PONG" + body[7:][:16]
            self._write(conn, bytes([_COMMAND, len(pong)]) + pong)
        return conn.fd in self._conns

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

    # ------------------------------------------------------------ bytes out

    def _reply(self, conn: _Conn, reply: bytes, env: tuple[bytes, ...]) -> None:
        data = frame(reply)
        if env:
            data = b"".join(frame(e, more=True) for e in env) + data
        if conn.out and len(conn.out) + len(data) > MAX_OUT:
            self.dropped_replies += 1
            self._warn("out", f"testbed delegate: a client does not read its replies; "
                              f"dropped {self.dropped_replies} so far")  # fmt: skip
            return
        self._write(conn, data)

    def _write(self, conn: _Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(conn)
            return
        if sent < len(data):
            conn.out += data[sent:]
            self._ep.modify(conn.fd, _EPOLLRD | _EPOLLOUT)  # until out is empty again

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            self._ep.modify(conn.fd, _EPOLLRD)


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
        raise TestbedError(f"cannot listen on ipc://{path}: it is in use (another process listens on it)")
    try:
        os.unlink(path)  # a stale socket file nobody listens on
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TestbedError(f"cannot listen on ipc://{path}: {exc.strerror}") from None
