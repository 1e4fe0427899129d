"""What one peer, and all peers together, may make the delegate hold.

One table for both transports (the raw ZMTP router, :mod:`testbed.delegate.router`,
and libzmq with :mod:`testbed.delegate.connguard`); docs/security.md prints it with
the flag and the mechanism that enforces each row.  Memory is counted in
bytes the delegate actually holds (a message part costs its bytes plus a
per-part overhead), never in bytes on the wire or in message counts.
File descriptors are shared between connections and offloaded files so that
neither can starve the other, and ``RESERVED_FDS`` stay free for the
delegate's own use (accepting a connection, opening a key, a log line).
"""

from __future__ import annotations

import resource

#: Descriptors never handed to peers (listener, epoll, eventfd, libzmq, logs).
RESERVED_FDS = 64
#: The soft RLIMIT_NOFILE ``testbed delegate`` raises itself to (at most the hard limit).
FD_LIMIT_TARGET = 65536

#: A new connection must finish the ZMTP greeting and READY within this (s).
HANDSHAKE_TIMEOUT_S = 5.0
#: A frame or multipart message, once begun, must be complete within this (s).
MESSAGE_TIMEOUT_S = 10.0
#: A connection that sends nothing at all (heartbeats count) for this long is closed (s).
IDLE_TIMEOUT_S = 3600.0

#: Bytes one peer may make the delegate hold: its message being received
#: (parts with their overhead) and the replies waiting for it to read them.
PEER_MEMORY_MAX = 32 << 20
#: Bytes of replies (and commands such as PONG) waiting for one peer.
OUT_MAX = 8 << 20
#: Bytes all peers together may make the delegate hold.
GLOBAL_MEMORY_MAX = 128 << 20


def fd_limit() -> int:
    """The soft RLIMIT_NOFILE (a large number if unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def raise_fd_limit(target: int = FD_LIMIT_TARGET) -> int:
    """Raise the soft RLIMIT_NOFILE to ``min(hard, target)`` (never lower it); the new soft.

    A service manager's default (systemd: soft 1024, hard 524288) is too few
    for many relays and their offloaded files; daemons raise it themselves.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass
    return fd_limit()
