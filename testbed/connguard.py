"""Per-connection limits for the delegate's ROUTER socket, which libzmq lacks.

libzmq bounds each *frame* (``ZMQ_MAXMSGSIZE``) and counts its high-water
marks in *whole messages*, but it buffers a multipart message until its last
part arrives: a peer that sends parts marked "more" forever grows the
delegate's memory without limit, and nothing above libzmq ever sees them.
It also accepts connections until the process runs out of descriptors.

:class:`ConnectionGuard` watches the socket from beside libzmq:

* a socket monitor reports every accepted connection and its fd; beyond
  ``max_connections`` open connections a new one is shut down at once;
* every ``TICK_S`` it reads ``tcpi_bytes_received`` (``TCP_INFO``) of each
  connection.  The serving loop marks the fd of every message it takes off
  the socket (``ZMQ_SRCFD``) with :meth:`delivered`; a connection that has
  received more than ``max_backlog`` bytes since it last delivered a whole
  message is shut down (``shutdown(2)`` on libzmq's fd: libzmq sees the
  connection end and frees the partial message).  The legitimate backlog of
  a peer is at most ``RCVHWM`` whole messages plus the kernel's receive
  buffer, which ``max_backlog`` must exceed (the delegate sizes it so).

Only TCP connections have a byte count; ``ipc://`` peers are only counted
against ``max_connections``.  With ``max_backlog=None`` only the connection
cap applies.  Every serving layout of the delegate takes messages off the
ROUTER in its own Python loop so that it can read ``ZMQ_SRCFD`` (libzmq's C
proxy drops it, and no other message property names the connection).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import sys
import threading
import time

import zmq
from zmq.utils.monitor import parse_monitor_message

#: How often byte counts are read (s).  A peer can add what arrives in one
#: tick on top of ``max_backlog`` before it is cut off.
TICK_S = 0.02

#: Offset and size of ``tcpi_bytes_received`` in ``struct tcp_info`` (Linux 4.1+).
_TCPI_BYTES_RECEIVED = 128
_TCP_INFO_LEN = 136

_libc = ctypes.CDLL(None, use_errno=True)


class ThrottledLog:
    """One line per ``kind`` at most every ``every_s`` seconds (no log flooding), to
    ``log`` or standard error.  The delegate's limits report through it, under
    libzmq (:class:`ConnectionGuard`) and raw ZMTP (:class:`testbed.router.Router`)."""

    def __init__(self, log=None, every_s: float = 10.0) -> None:
        self._log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.every_s = every_s
        self._last: dict[str, float] = {}

    def __call__(self, line: str, kind: str = "") -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) >= self.every_s:
            self._last[kind] = now
            self._log(line)


def bytes_received(fd: int) -> int | None:
    """``tcpi_bytes_received`` of TCP socket ``fd`` (None if not a TCP socket)."""
    buf = ctypes.create_string_buffer(_TCP_INFO_LEN)
    size = ctypes.c_uint32(_TCP_INFO_LEN)
    rc = _libc.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, buf, ctypes.byref(size))
    if rc != 0 or size.value < _TCPI_BYTES_RECEIVED + 8:
        return None
    return struct.unpack_from("<Q", buf, _TCPI_BYTES_RECEIVED)[0]


def _shutdown(fd: int) -> None:
    """End libzmq's connection on ``fd`` without closing libzmq's descriptor."""
    _libc.shutdown(fd, socket.SHUT_RDWR)


class ConnectionGuard:
    """Connection cap and per-connection backlog cap (see module docstring)."""

    def __init__(
        self,
        ctx: zmq.Context,
        sock: zmq.Socket,
        max_connections: int,
        max_backlog: int | None,
        log=None,
    ):
        self.max_connections = max_connections
        self.max_backlog = max_backlog
        self.refused = 0  # connections shut down at accept (over the cap)
        self.cut = 0  # connections shut down for their backlog
        self._warn = ThrottledLog(log)  # one line for both kinds at most every 10 s
        self._mon = sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
        )
        self._mon.setsockopt(zmq.LINGER, 0)
        self._conns: dict[int, int] = {}  # fd -> bytes received when it last delivered
        self._seen: set[int] = set()  # fds that delivered since the last tick (serving thread)
        self._stop = threading.Event()
        self._sock = sock
        self._thread: threading.Thread | None = None

    def delivered(self, fd: int) -> None:
        """Called by the serving loop for every whole message received from ``fd``."""
        self._seen.add(fd)

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
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
        while not self._stop.is_set():
            try:
                while mon.poll(int(TICK_S * 1000)):
                    self._event(parse_monitor_message(mon.recv_multipart()))
                self._tick()
            except zmq.ZMQError:
                return  # the context is closing
            except Exception as exc:  # a bug here must not stall the delegate
                self._warn(f"testbed delegate: connection guard: {exc!r:.200}")

    def _event(self, ev: dict) -> None:
        fd = int(ev["value"])
        if ev["event"] == zmq.EVENT_ACCEPTED:
            if len(self._conns) >= self.max_connections:
                self.refused += 1
                _shutdown(fd)
                self._warn(
                    f"testbed delegate: {len(self._conns)} connections open (limit "
                    f"{self.max_connections}); refusing new ones"
                )
                return
            self._conns[fd] = bytes_received(fd) or 0
        else:
            self._conns.pop(fd, None)
            self._seen.discard(fd)

    def _tick(self) -> None:
        if self.max_backlog is None:
            return
        seen, self._seen = self._seen, set()
        for fd, base in list(self._conns.items()):
            now = bytes_received(fd)
            if now is None:
                continue
            if fd in seen or now < base:  # delivered lately, or the fd was reused
                self._conns[fd] = now
            elif now - base > self.max_backlog:
                self.cut += 1
                self._conns[fd] = now
                _shutdown(fd)
                self._warn(
                    f"testbed delegate: dropped a connection that sent {now - base} bytes "
                    f"without completing a message (limit {self.max_backlog})"
                )
