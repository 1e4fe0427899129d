"""What the forwarded set could not see: run.json ``escapes`` (docs/rundir.md).

Interception sees a call only if the program enters the kernel through it.
Three ways around it are counted here, where the kernel lets us:

* **io_uring**: requests go through shared rings; only ``io_uring_setup`` and
  ``io_uring_enter`` enter the kernel.  A seccomp run traps both to count them
  (:data:`testbed.compute.interpose.WATCHED`: continued at once, never
  forwarded, not in ``calls.bin``).
* **memory-mapped files**: loads and stores on a file mapping move data with no
  call at all.  A seccomp run traps every file-backed ``mmap`` (the filter
  lets anonymous ones pass) and counts the writable ``MAP_SHARED`` ones apart:
  their stores reach the file.  (The dynamic loader maps each library too.)
* **the vDSO**: ``clock_gettime``, ``gettimeofday``, ``time`` and ``getcpu`` run
  in user space and never trap; forwarding them forwards nothing.

And the program's own I/O counters, ``/proc/PID/io``, read when its main
process has exited and before it is reaped (``waitid(..., WNOWAIT)``), so they
include its dead threads and the children it reaped, minus what the launcher
did before its ``execve`` (``Backend.start_io``).  ``syscr``/``syscw`` count
the read-class and write-class calls (``read``, ``readv``, ``pread64``...,
also ``sendfile``, ``copy_file_range`` and the kernel's own reads of the
executable at ``execve``); against the forwarded calls of the same classes they
bound what the forwarded set did not see.
"""

from __future__ import annotations

import os
from typing import Any

from testbed.compute.interpose import (
    NR_IO_URING_ENTER,
    NR_IO_URING_SETUP,
    NR_MMAP,
    PROC_IO_FIELDS,
    WATCH_KEYS,
    WATCHED,
    proc_io,
)
from testbed.core import syscalls

#: The calls ``/proc/PID/io`` counts in ``syscr`` / ``syscw`` that the relay can forward
#: (``sendto``/``recvfrom`` and friends are counted in neither).
READ_CLASS = ("read", "pread64", "readv", "preadv", "preadv2")
WRITE_CLASS = ("write", "pwrite64", "writev", "pwritev", "pwritev2")


def watch_set(mode: str, backend: str) -> frozenset[int]:
    """The calls a run traps only to count them: seccomp relay runs, not offload mode
    (which traps ``mmap`` and refuses ``io_uring_setup`` itself)."""
    return WATCHED if backend == "seccomp" and mode != "offload" else frozenset()


def exit_io(pid: int, pidfd: int) -> dict[str, int] | str:
    """``/proc/PID/io`` of the exited, not yet reaped program (or why it cannot be read).

    Called once ``pidfd`` is readable; ``waitid(P_PIDFD, ..., WNOWAIT)`` checks the
    process is a zombie and leaves it one, so the counters are final and whole.
    """
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOWAIT)
    except OSError as exc:
        return f"waitid: {exc.strerror}"
    return proc_io(pid)


def vdso_forwarded(forwarded: frozenset[int]) -> list[str]:
    """The calls of ``forwarded`` the vDSO serves (they never trap)."""
    names = {syscalls.name_of(n) for n in forwarded}
    return [n for n in syscalls.VDSO_CALLS if n in names]


def build(
    *,
    forwarded: frozenset[int],
    mode: str,
    backend: str,
    watched: list[int] | None,
    start_io: dict[str, int] | None,
    end_io: dict[str, int] | str | None,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """run.json ``escapes`` from the run's counts and its per-syscall rows (``summarize``)."""
    by_name = {syscalls.name_of(int(r["nr"])): r for r in rows}
    fwd = {
        "read_calls": sum(int(by_name[n]["n"]) for n in READ_CLASS if n in by_name),
        "write_calls": sum(int(by_name[n]["n"]) for n in WRITE_CLASS if n in by_name),
        "write_bytes": sum(int(by_name[n]["bytes_in"]) for n in WRITE_CLASS if n in by_name),
    }
    why: dict[str, str] = {}
    proc = _proc(start_io, end_io, why)
    unseen = None
    if proc is None:
        why["unseen"] = "no proc_io"
    elif mode == "offload":
        why["unseen"] = ("offload mode: forwarded calls run at the delegate, so the "
                         "program's counters hold only the calls run locally")  # fmt: skip
    else:
        unseen = {
            "read_calls": max(0, proc["syscr"] - fwd["read_calls"]),
            "write_calls": max(0, proc["syscw"] - fwd["write_calls"]),
            "write_bytes": max(0, proc["wchar"] - fwd["write_bytes"]),
        }
    counts = dict(zip(WATCH_KEYS, watched, strict=True)) if watched is not None else None
    return {
        "proc_io": proc,
        "forwarded_io": fwd,
        "unseen": unseen,
        "io_uring": _io_uring(forwarded, counts, by_name, mode, backend, why),
        "mmap_files": _mmap(forwarded, counts, mode, backend, why),
        "vdso": vdso_forwarded(forwarded),
        "why_null": why,
    }


def _proc(start_io, end_io, why: dict[str, str]) -> dict[str, Any] | None:
    if not isinstance(end_io, dict):
        why["proc_io"] = end_io or "the relay did not see the program exit"
        return None
    if start_io is None:
        return {**end_io, "since": "launch"}
    return {**{k: max(0, end_io[k] - start_io.get(k, 0)) for k in PROC_IO_FIELDS}, "since": "exec"}


def _io_uring(forwarded, counts, by_name, mode: str, backend: str, why) -> dict | None:
    setup, enter = NR_IO_URING_SETUP, NR_IO_URING_ENTER
    if counts is None and not {setup, enter} <= forwarded:
        why["io_uring"] = (
            "offload mode answers io_uring_setup with ENOSYS (no ring can be made); not counted"
            if mode == "offload"
            else f"the {backend} backend traps only the forwarded set; not counted"
        )
        return None
    out = {}
    for nr, key in ((setup, "setup"), (enter, "enter")):
        name = syscalls.name_of(nr)
        if nr in forwarded:  # forwarded: in calls.bin
            out[key] = int(by_name[name]["n"]) if name in by_name else 0
        else:
            out[key] = counts[f"io_uring_{key}"]
    return out


def _mmap(forwarded, counts, mode: str, backend: str, why) -> dict | None:
    if NR_MMAP in forwarded:
        why["mmap_files"] = "mmap is forwarded: calls.bin does not keep the flags that tell "
        why["mmap_files"] += "file mappings from anonymous ones"
        return None
    if counts is None:
        why["mmap_files"] = (
            "offload mode traps mmap itself (docs/offload.md); not counted"
            if mode == "offload"
            else f"the {backend} backend traps only the forwarded set; not counted"
        )
        return None
    return {"all": counts["mmap_file"], "shared_writable": counts["mmap_file_shared_write"]}
