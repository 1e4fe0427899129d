"""Interposition backends: how forwarded system calls reach the relay.

A backend launches the program with the forwarded set intercepted and hands
the relay one pollable file descriptor.  The relay drives every backend the
same way (see ``testbed.compute.relay`` and ``testbed.compute.run``), through :class:`Backend`
and nothing else:

    backend = SeccompBackend(forwarded)          # or KmodBackend(forwarded, ...)
    child = backend.launch(argv)                 # subprocess.Popen of the program
    blocking = backend.begin_serving()           # may receive() block when idle?
    poll(backend.fileno())                        # readable -> a call is pending
    call = backend.receive()                     # Trap or None (spurious / gone)
    data = backend.read_memory(call.tid, addr, n) # caller memory, for input buffers
    backend.is_valid(call)                        # still pending? (TOCTOU check)
    backend.resume_continue(call)                 # run the call locally (cost mode)
    backend.resume_return(call, value, errno)     # return a result (offload mode)
    backend.finished()                            # True once no task can trap any more
    backend.end_serving()
    backend.launch_error()                        # the program could not be started?
    backend.kill_descendants()                    # the relay failed: end the run
    backend.close()

plus what ``run.json`` records: ``launched_at_ns``, ``start_rusage`` and
``start_io`` (when the program's own ``execve`` was released, and the
launcher's CPU time and ``/proc/PID/io`` counters until then), ``sync_wakeup``,
``orphan_guard`` and ``watched`` (the counts of the calls trapped only to be
counted, :data:`WATCHED`; None where the backend does not watch).  :class:`BackendBase` gives the
defaults of a backend that has no such machinery.

``Trap.t_trap`` is taken (``time.monotonic_ns``) as soon as the call is seen.
All methods raise :class:`BackendError` (a ``TestbedError``) for failures a
user must see; a caller that died meanwhile is *not* an error: ``resume_*``
return False and ``read_memory`` raises :class:`CallerGone`.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any, NamedTuple, Protocol

from testbed.core.errors import TestbedError
from testbed.core.syscalls import NR_BY_NAME


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


#: Calls a seccomp run traps only to count them for run.json ``escapes`` (continued at
#: once, never forwarded, not in calls.bin): ``mmap`` only when file-backed (the filter
#: tests ``MAP_ANONYMOUS``, testbed.compute.interpose._launch.build_filter).
NR_IO_URING_SETUP = NR_BY_NAME["io_uring_setup"]
NR_IO_URING_ENTER = NR_BY_NAME["io_uring_enter"]
NR_MMAP = NR_BY_NAME["mmap"]
WATCHED = frozenset({NR_IO_URING_SETUP, NR_IO_URING_ENTER, NR_MMAP})
#: the counters of ``Backend.watched``, in this order (data/fastpath.c ``watched[]``)
WATCH_KEYS = ("io_uring_setup", "io_uring_enter", "mmap_file", "mmap_file_shared_write")
PROT_WRITE, MAP_TYPE, MAP_SHARED, MAP_SHARED_VALIDATE = 0x2, 0x0F, 0x01, 0x03


def count_watched(counts: list[int], nr: int, args) -> None:
    """Add one watched call (``nr``, its six arguments) to ``counts`` (``WATCH_KEYS``)."""
    if nr == NR_IO_URING_SETUP:
        counts[0] += 1
    elif nr == NR_IO_URING_ENTER:
        counts[1] += 1
    elif nr == NR_MMAP:
        counts[2] += 1
        if args[2] & PROT_WRITE and args[3] & MAP_TYPE in (MAP_SHARED, MAP_SHARED_VALIDATE):
            counts[3] += 1  # its stores reach the file with no call at all


class Backend(Protocol):
    """What the relay and ``testbed run`` use of a backend (see the module docstring)."""

    name: str
    #: time.monotonic_ns() when the program's own execve was released (0: not yet)
    launched_at_ns: int
    #: (user, sys) seconds the launcher had used by then (subtracted from the rusage)
    start_rusage: tuple[float, float]
    #: seccomp: SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP is on (None: not applicable)
    sync_wakeup: bool | None
    #: seccomp: "cgroup" or "pdeathsig-only", known once launched (None: not applicable)
    orphan_guard: str | None
    #: /proc/PID/io of the launcher when its execve was released (None: not read)
    start_io: dict[str, int] | None
    #: counts of the watched calls (``WATCH_KEYS`` order; None: this backend does not watch)
    watched: list[int] | None

    def launch(
        self, argv: list[str], env: dict[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen: ...
    def launch_error(self) -> str | None: ...
    def begin_serving(self) -> bool: ...
    def end_serving(self) -> None: ...
    def fileno(self) -> int: ...
    def receive(self) -> Trap | None: ...
    def read_memory(self, tid: int, addr: int, length: int) -> bytes: ...
    def is_valid(self, trap: Trap) -> bool: ...
    def resume_continue(self, trap: Trap) -> bool: ...
    def resume_return(self, trap: Trap, value: int, errno: int = 0) -> bool: ...
    def finished(self) -> bool: ...
    def kill_descendants(self) -> None: ...
    def close(self) -> None: ...


class BackendBase:
    """Defaults for the optional parts of :class:`Backend`."""

    launched_at_ns: int = 0
    start_rusage: tuple[float, float] = (0.0, 0.0)
    sync_wakeup: bool | None = None
    orphan_guard: str | None = None
    start_io: dict[str, int] | None = None
    watched: list[int] | None = None

    def launch_error(self) -> str | None:
        """The launcher's message if the program could not be started (None: it was)."""
        return None

    def begin_serving(self) -> bool:
        """Called by the relay before its loop; True if ``receive()`` may then block.

        A backend whose ``receive()`` can wait for the next call sets up here
        whatever interrupts that wait when the program exits; the default
        never blocks (the relay polls ``fileno()``).
        """
        return False

    def end_serving(self) -> None:
        """Undo :meth:`begin_serving` (called once, in the relay's ``finally``)."""

    def kill_descendants(self) -> None:
        """Kill every process of the run now (the relay failed); default: nothing to do."""


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


#: the counters of ``/proc/PID/io`` run.json ``escapes.proc_io`` keeps
PROC_IO_FIELDS = ("rchar", "wchar", "syscr", "syscw", "read_bytes", "write_bytes")


def proc_io(pid: int) -> dict[str, int] | str:
    """``/proc/PID/io`` (:data:`PROC_IO_FIELDS`), or why it cannot be read.

    Of a whole process: its live threads, its dead threads and the children it
    reaped (the kernel adds theirs in ``__exit_signal`` and ``wait_task_zombie``);
    also of a zombie not yet reaped, which is when the relay reads it.
    """
    try:
        with open(f"/proc/{pid}/io") as f:
            pairs = (line.split(":", 1) for line in f)
            io = {k.strip(): int(v) for k, v in pairs}
        return {k: io[k] for k in PROC_IO_FIELDS}
    except OSError as exc:
        return f"/proc/{pid}/io: {exc.strerror}"
    except (KeyError, ValueError):
        return f"/proc/{pid}/io: unexpected format"
