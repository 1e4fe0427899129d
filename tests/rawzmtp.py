"""A raw ZMTP 3.0 peer over a plain TCP socket, for tests that must misbehave
below libzmq (unterminated multipart messages, never reading replies, slow or
silent handshakes) without the sender's own libzmq buffering anything; the
framing is :mod:`testbed.core.zmtp`'s."""

from __future__ import annotations

import re
import socket
import struct
import time

from testbed.core.zmtp import GREETING, connect, frame, read_exactly, read_frame

__all__ = ["closed_within", "connect", "connect_as", "frame", "ping", "ready", "rss_mib", "silent"]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (or its peak, ``VmHWM``) of process ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert m, field
    return int(m.group(1)) / 1024


def _addr(endpoint: str) -> tuple[str, int]:
    host, port = endpoint[6:].rsplit(":", 1)
    return host, int(port)


def ready(socket_type: bytes = b"DEALER", identity: bytes = b"") -> bytes:
    """A READY command with ``Socket-Type`` and, if given, ``Identity``."""
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", len(socket_type))
    body += socket_type
    if identity:
        body += bytes([8]) + b"Identity" + struct.pack(">I", len(identity)) + identity
    return bytes([0x04, len(body)]) + body


def ping(context: bytes = b"", ttl: int = 0) -> bytes:
    """A ZMTP 3.1 PING command (the peer answers PONG with ``context``)."""
    body = b"\x04PING" + struct.pack(">H", ttl) + context
    return bytes([0x04, len(body)]) + body


def connect_as(endpoint: str, identity: bytes, timeout: float = 10) -> socket.socket:
    """A handshaken DEALER connection that asks for ROUTER identity ``identity``."""
    s = socket.create_connection(_addr(endpoint), timeout=timeout)
    s.sendall(GREETING + ready(b"DEALER", identity))
    read_exactly(s, 64)
    read_frame(s)
    return s


def silent(endpoint: str, timeout: float = 10) -> socket.socket:
    """A TCP connection to ``endpoint`` that sends nothing."""
    return socket.create_connection(_addr(endpoint), timeout=timeout)


def closed_within(s: socket.socket, timeout: float) -> bool:
    """True once the peer closed ``s`` (EOF or reset), reading and discarding
    whatever it sent; False if it is still open after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        s.settimeout(left)
        try:
            if not s.recv(1 << 16):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False
