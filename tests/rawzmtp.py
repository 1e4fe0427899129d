"""A raw ZMTP 3.0 peer over a plain TCP socket, for tests that must misbehave
below libzmq (unterminated multipart messages, never reading replies) without
the sender's own libzmq buffering anything; the framing is :mod:`testbed.zmtp`'s."""

from __future__ import annotations

import re

from testbed.zmtp import connect, frame

__all__ = ["connect", "frame", "rss_mib"]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (or its peak, ``VmHWM``) of process ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert m, field
    return int(m.group(1)) / 1024
