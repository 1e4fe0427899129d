"""Interposition backends: how forwarded system calls reach the relay.

A backend launches the program with the forwarded set intercepted and hands
the relay one pollable file descriptor.  The relay drives every backend the
same way (see ``testbed.relay``):

    backend = SeccompBackend(forwarded)          # or KmodBackend(forwarded, ...)
    child = backend.launch(argv)                 # subprocess.Popen of the program
    poll(backend.fileno())                        # readable -> a call is pending
    call = backend.receive()                     # Trap or None (spurious / gone)
    data = backend.read_memory(call.tid, addr, n) # caller memory, for input buffers
    backend.is_valid(call)                        # still pending? (TOCTOU check)
    backend.resume_continue(call)                 # run the call locally (cost mode)
    backend.resume_return(call, value, errno)     # return a result (offload mode)
    backend.finished()                            # True once no task can trap any more
    backend.close()

``Trap.t_trap`` is taken (``time.monotonic_ns``) as soon as the call is seen.
All methods raise :class:`BackendError` (a ``TestbedError``) for failures a
user must see; a caller that died meanwhile is *not* an error: ``resume_*``
return False and ``read_memory`` raises :class:`CallerGone`.
"""

from __future__ import annotations

import os
import subprocess
from typing import NamedTuple, Protocol

from testbed.errors import TestbedError


class BackendError(TestbedError):
    """The interposition backend cannot work here (unsupported kernel, no module...)."""


class CallerGone(Exception):
    """The calling task exited or the notification is no longer valid."""


class Trap(NamedTuple):
    id: int  # backend-specific cookie (seccomp notification id, kmod sequence number)
    tid: int  # calling thread (as seen in the relay's pid namespace)
    nr: int  # syscall number
    args: tuple[int, int, int, int, int, int]
    t_trap: int  # time.monotonic_ns() when the relay saw the call


class Backend(Protocol):
    name: str

    def launch(self, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen: ...
    def fileno(self) -> int: ...
    def receive(self) -> Trap | None: ...
    def read_memory(self, tid: int, addr: int, length: int) -> bytes: ...
    def is_valid(self, trap: Trap) -> bool: ...
    def resume_continue(self, trap: Trap) -> bool: ...
    def resume_return(self, trap: Trap, value: int, errno: int = 0) -> bool: ...
    def finished(self) -> bool: ...
    def close(self) -> None: ...


def make_backend(name: str, forwarded: frozenset[int], **options) -> Backend:
    """Instantiate the backend called ``name`` ("seccomp" or "kmod")."""
    if name == "seccomp":
        from testbed.interpose.seccomp import SeccompBackend

        return SeccompBackend(forwarded, **options)
    if name == "kmod":
        from testbed.interpose.kmod import KmodBackend

        return KmodBackend(forwarded, **options)
    raise BackendError(f"unknown backend {name!r} (choose seccomp or kmod)")


def proc_times(pid: int) -> tuple[float, float]:
    """(user, sys) seconds process ``pid`` has used so far (clock-tick resolution).

    Backends read it when the program's own execve is released, so the
    launcher's share can be subtracted from the run's rusage.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0
