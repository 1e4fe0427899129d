"""Carry one guest TCP connection to a port on the host's loopback (QEMU ``guestfwd``).

QEMU's user network runs ``python3 -I -S guestfwd.py PORT`` once per
connection the guest opens to a forwarded address (``guestfwd=...-cmd:``);
stdin/stdout is a socket carrying that connection.  This copies bytes both
ways between it and ``127.0.0.1:PORT`` until both sides have closed.  The
address is fixed: a guest can reach nothing but the one host port it was
given.  Standard library only (it starts before every connection).
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

#: The only address a forwarded connection can reach.
TARGET = "127.0.0.1"


def pump(guest: socket.socket, host: socket.socket) -> None:
    """Copy both ways; half-close each direction at its EOF; return when both are done."""
    peer = {guest: host, host: guest}
    sel = selectors.DefaultSelector()
    for s in peer:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_sides = 2
    while open_sides:
        for key, _ in sel.select():
            src = key.fileobj
            try:
                data = src.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            dst = peer[src]
            if not data:
                sel.unregister(src)
                open_sides -= 1
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                continue
            dst.setblocking(True)
            try:
                dst.sendall(data)
            except OSError:
                return
            dst.setblocking(False)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[1].isdigit() or not 0 < int(argv[1]) < 65536:
        return 2
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 2)  # stderr is the guest's socket too: never write to it
    guest = socket.socket(fileno=os.dup(0))
    os.dup2(null, 0)
    os.dup2(null, 1)
    try:
        host = socket.create_connection((TARGET, int(argv[1])), timeout=10)
    except OSError:
        return 1  # the guest sees its connection closed
    host.settimeout(None)
    pump(guest, host)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
