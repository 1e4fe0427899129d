"""The launcher's seccomp filter, run by a small classic-BPF interpreter.

The interpreter executes exactly the instructions the filter uses (``LD W ABS``,
``JEQ K``, ``JGE K``, ``JSET K``, ``RET K``) on a ``struct seccomp_data`` packed as the
kernel packs it, so each case checks what the kernel would decide.  The real
kernel runs the same program in tests/test_offload_cwd.py.
"""

from __future__ import annotations

import struct

import pytest

from testbed.compute.interpose._launch import (
    AUDIT_ARCH_X86_64,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_USER_NOTIF,
    build_filter,
)

pytestmark = pytest.mark.unit

ALLOW, NOTIF, KILL = SECCOMP_RET_ALLOW, SECCOMP_RET_USER_NOTIF, SECCOMP_RET_KILL_PROCESS
CLOSE, DUP2, DUP3, CLOSE_RANGE, READ, OPENAT, EXECVE = 3, 33, 292, 436, 0, 257, 59


def run_bpf(prog: bytes, nr: int, args=(0,) * 6, arch: int = AUDIT_ARCH_X86_64) -> int:
    args = (tuple(args) + (0,) * 6)[:6]
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(a & (1 << 64) - 1 for a in args))
    insns = [struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    for _ in range(len(insns) + 1):  # forward jumps only: at most one pass
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # LD W ABS
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x15:  # JEQ K
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:  # JGE K
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x45:  # JSET K
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x06:  # RET K
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")
    raise AssertionError("the program did not return")


def test_trapped_numbers_and_execs_notify_others_pass():
    prog = build_filter({READ, OPENAT})
    assert run_bpf(prog, READ) == NOTIF
    assert run_bpf(prog, OPENAT) == NOTIF
    assert run_bpf(prog, EXECVE) == NOTIF  # always: the launch hand-off
    assert run_bpf(prog, 1) == ALLOW
    assert run_bpf(prog, CLOSE, (1023,)) == ALLOW  # no cwd_fd: closes never trap
    assert run_bpf(prog, READ, arch=0x40000003) == KILL  # i386
    assert run_bpf(prog, READ | 0x40000000) == ALLOW  # x32 numbers are not x86-64 calls


@pytest.mark.parametrize("fd", [3, 255, 1023])
def test_calls_that_would_drop_the_cwd_token_trap_by_fd_only(fd):
    prog = build_filter({READ}, cwd_fd=fd)
    assert run_bpf(prog, CLOSE, (fd,)) == NOTIF
    assert run_bpf(prog, CLOSE, (fd + 1,)) == ALLOW
    assert run_bpf(prog, CLOSE, (fd - 1,)) == ALLOW
    assert run_bpf(prog, CLOSE, (fd | 1 << 32,)) == NOTIF  # unsigned int fd: low 32 bits
    assert run_bpf(prog, DUP2, (5, fd)) == NOTIF
    assert run_bpf(prog, DUP2, (fd, 5)) == ALLOW  # dup2 *from* it copies it: harmless
    assert run_bpf(prog, DUP3, (5, fd, 0)) == NOTIF
    assert run_bpf(prog, DUP3, (5, fd + 7, 0)) == ALLOW
    for first, last, want in [
        (3, 0xFFFFFFFF, NOTIF),  # closefrom(3): Python's subprocess
        (fd, fd, NOTIF),
        (0, fd - 1, ALLOW),
        (fd + 1, 0xFFFFFFFF, ALLOW),
        (fd, 0xFFFFFFFF, NOTIF),
        (0, fd, NOTIF),
    ]:
        assert run_bpf(prog, CLOSE_RANGE, (first, last, 0)) == want, (first, last)
    assert run_bpf(prog, READ) == NOTIF
    assert run_bpf(prog, 1) == ALLOW


def test_a_number_trapped_outright_stays_trapped_with_a_cwd_fd():
    prog = build_filter({CLOSE, READ}, cwd_fd=1023)
    assert run_bpf(prog, CLOSE, (4,)) == NOTIF
    assert run_bpf(prog, DUP2, (4, 9)) == ALLOW


MMAP, IO_URING_SETUP, IO_URING_ENTER = 9, 425, 426
MAP_PRIVATE, MAP_SHARED, MAP_ANONYMOUS = 0x02, 0x01, 0x20


def test_watched_calls_trap_and_mmap_only_when_file_backed():
    """run.json escapes: io_uring calls always, mmap only without MAP_ANONYMOUS."""
    prog = build_filter({READ}, watch={MMAP, IO_URING_SETUP, IO_URING_ENTER})
    assert run_bpf(prog, IO_URING_SETUP) == NOTIF
    assert run_bpf(prog, IO_URING_ENTER, (3, 1, 1, 1)) == NOTIF
    assert run_bpf(prog, MMAP, (0, 4096, 3, MAP_SHARED, 5, 0)) == NOTIF  # a file
    assert run_bpf(prog, MMAP, (0, 4096, 1, MAP_PRIVATE, 5, 0)) == NOTIF  # the loader's
    anon = (0, 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS, (1 << 64) - 1, 0)
    assert run_bpf(prog, MMAP, anon) == ALLOW  # malloc's: never traps
    assert run_bpf(prog, MMAP, (0, 4096, 3, MAP_SHARED | MAP_ANONYMOUS, -1, 0)) == ALLOW
    assert run_bpf(prog, READ) == NOTIF and run_bpf(prog, 1) == ALLOW
    assert build_filter({READ}) == build_filter({READ}, watch=set())  # nothing watched: as before


def test_a_forwarded_mmap_traps_outright_even_when_watched():
    prog = build_filter({MMAP}, watch={MMAP, IO_URING_ENTER})
    assert run_bpf(prog, MMAP, (0, 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)) == NOTIF
    assert run_bpf(prog, IO_URING_ENTER) == NOTIF


def test_watched_mmap_and_a_cwd_fd_together():
    prog = build_filter({READ}, cwd_fd=7, watch={MMAP})
    assert run_bpf(prog, CLOSE, (7,)) == NOTIF and run_bpf(prog, CLOSE, (8,)) == ALLOW
    assert run_bpf(prog, MMAP, (0, 4096, 3, MAP_SHARED, 7, 0)) == NOTIF
    assert run_bpf(prog, MMAP, (0, 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)) == ALLOW
