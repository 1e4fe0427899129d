"""A raw ZMTP 3.0 peer over a plain TCP socket, for tests that must misbehave
below libzmq (unterminated multipart messages, never reading replies) without
the sender's own libzmq buffering anything."""

from __future__ import annotations

import re
import socket
import struct

GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 32


def connect(
    endpoint: str, socket_type: bytes = b"DEALER", timeout: float = 10, handshake: bool = True
) -> socket.socket:
    """A TCP connection to ``tcp://HOST:PORT`` that has sent greeting and READY
    (and, with ``handshake``, read the peer's, so messages may follow)."""
    m = re.fullmatch(r"tcp://([^:]+):(\d+)", endpoint)
    assert m, endpoint
    s = socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout)
    s.sendall(GREETING)
    body = b"\x05READY" + bytes([11]) + b"Socket-Type"
    body += struct.pack(">I", len(socket_type)) + socket_type
    s.sendall(bytes([0x04, len(body)]) + body)
    if not handshake:
        return s
    _read_exactly(s, 64)  # the delegate's greeting, then its READY command:
    flags, size = _read_exactly(s, 2)  # only then may messages follow
    if flags & 0x02:
        size = struct.unpack(">Q", bytes([size]) + _read_exactly(s, 7))[0]
    _read_exactly(s, size)
    return s


def _read_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection during the handshake")
        data += chunk
    return data


def frame(data: bytes, more: bool = False) -> bytes:
    """One ZMTP message frame (flag MORE when ``more``)."""
    flags = 1 if more else 0
    if len(data) > 255:
        return bytes([flags | 2]) + struct.pack(">Q", len(data)) + data
    return bytes([flags, len(data)]) + data


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (or its peak, ``VmHWM``) of process ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert m, field
    return int(m.group(1)) / 1024
