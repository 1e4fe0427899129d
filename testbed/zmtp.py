"""ZMTP 3.0 (the ZeroMQ wire protocol, NULL mechanism) over a plain TCP socket.

The delegate's ROUTER speaks it through libzmq; a peer that speaks it directly
needs no libzmq and no I/O thread of its own.  Used by ``testbed bench
--breakdown``'s "raw ZMTP from C" row (what a relay without libzmq's I/O thread
would gain, docs/design-notes.md) and by tests that must misbehave below libzmq.
Only what those need: the greeting, the READY command, single-part and
multipart message frames.  No CURVE, no heartbeats, no reconnection.
"""

from __future__ import annotations

import re
import socket
import struct

from testbed.errors import TestbedError

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
