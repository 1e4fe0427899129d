"""Launcher of the traced program, shared by the seccomp and kmod backends.

Run as a fresh process, never forked from the relay (which runs ZeroMQ
threads).  It imports nothing but the standard library, so it starts quickly
and also runs as a plain file (``python -I -S .../_launch.py``: the kmod
backend's helper, see :func:`main_kmod`).  Both backends get the same
parent-death guarantee from :func:`die_with_parent` (below).

seccomp backend (``python -I -S .../_launch.py``), protocol with the relay:

1. set ``no_new_privs`` and install a filter that returns
   ``SECCOMP_RET_USER_NOTIF`` for the forwarded set *and always for execve /
   execveat*, with ``SECCOMP_FILTER_FLAG_NEW_LISTENER``;
2. make no other system call and ``execve`` the program.  That execve traps,
   so the launcher blocks until the relay has taken the listener fd out of
   this process with ``pidfd_getfd(2)`` (it finds the fd number through
   ``/proc/PID/fd``) and answered the notification.  No hand-off message is
   needed, so no forwarded call can deadlock the hand-off.

If the program cannot be executed the launcher writes one line to the status
fd and exits 127.

The launcher never outlives its relay: before anything else it asks for
``SIGKILL`` when its parent dies (``PR_SET_PDEATHSIG``) and then checks that
its parent is still the relay (``getppid() == RELAY_PID``), which closes the
race with a relay that died before the ``prctl``.  Without this, a relay
killed between starting the launcher and answering its ``execve`` leaves the
launcher blocked forever on its own listener.  The setting survives the
program's ``execve``: a program whose relay dies is killed too (its forwarded
calls could only fail from then on; see docs/seccomp.md).  Children do not
inherit it: the launcher first moves itself into the run's cgroup (CGROUP, the
cgroup directory or ``-``; testbed/compute/interpose/orphans.py), whose sentinel kills
every descendant when the relay dies.  Usage (internal)::

    python -I -S _launch.py STATUS_FD RELAY_PID CGROUP NR,NR,...[/NR,...] CWD_FD PROGRAM [ARGS...]

(``CWD_FD``: ``-``, or the fd that carries an offloaded working directory, whose
close/dup2/dup3/close_range also trap: :func:`build_filter`.  The numbers after
``/`` are *watched*: trapped so the relay can count them (run.json ``escapes``),
then continued at once, never forwarded; ``mmap`` only when file-backed.)

kmod backend (:func:`main_kmod`, started by ``testbed.compute.interpose.kmod.helper_argv``)::

    python -I -S _launch.py kmod FD REQUEST STATUS_FD RELAY_PID CPUS -- PROGRAM [ARGS...]

It inherits the session's open file FD of ``/dev/mktrace``, asks for the same
parent-death signal and checks its parent is still RELAY_PID (exit 125
otherwise: a relay already gone would leave the program unforwarded), pins
itself to CPUS (``0,2``; empty: no pinning), sets ``no_new_privs`` (the module
forwards only such tasks), writes ``exec MONOTONIC_NS USER_S SYS_S`` on
STATUS_FD (-1: none) just before ``ioctl(FD, REQUEST)`` registers it as the
session's target, and execs PROGRAM (searched in PATH before registering:
after it only ``execve`` itself is traced).  A failure is one line on
STATUS_FD (stderr without one), exit 126, or 127 when PROGRAM cannot be
executed.  As with seccomp, a program whose relay dies is killed rather than
left running with its calls released to run locally.

The parent of ``PR_SET_PDEATHSIG`` is the *thread* that started the launcher:
a relay starts it from a thread that outlives the program (the main thread).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import sys
import time

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
PR_SET_NO_NEW_PRIVS = 38
PR_SET_PDEATHSIG = 1
SIGKILL = 9
NR_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_KILL_PROCESS = 0x80000000
EXEC_NRS = (59, 322)  # execve, execveat: always trapped (launch synchronisation)

# classic BPF opcodes
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_JGE_K = 0x35
BPF_JSET_K = 0x45
BPF_RET_K = 0x06
OFF_NR = 0
OFF_ARCH = 4


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("<HBBI", code, jt, jf, k)


#: The calls trapped only when they would close or replace the fd that carries an
#: offloaded working directory (``cwd_fd``): close(fd), dup2/dup3(_, fd),
#: close_range(first <= fd <= last).  Numbers of x86-64.
NR_CLOSE, NR_DUP2, NR_DUP3, NR_CLOSE_RANGE = 3, 33, 292, 436
#: mmap(2): watched only when file-backed (``MAP_ANONYMOUS`` clear in its flags)
NR_MMAP, MAP_ANONYMOUS = 9, 0x20


def build_filter(
    nrs: frozenset[int] | set[int],
    cwd_fd: int | None = None,
    watch: frozenset[int] | set[int] = frozenset(),
) -> bytes:
    """BPF program: USER_NOTIF for ``nrs`` + execve/execveat, ALLOW otherwise.

    With ``cwd_fd``, also USER_NOTIF for the calls that would close or replace
    that fd: close(fd), dup2/dup3(_, fd), close_range(first <= fd <= last).  The
    kernel compares the fd arguments (an ``unsigned int``: the low 32 bits), so
    other closes and dups never trap.  ``watch``: numbers trapped too (the relay
    counts and continues them); ``mmap`` among them traps only when its flags
    lack ``MAP_ANONYMOUS`` (a file mapping).
    """
    watch = set(watch) - set(nrs)
    trapped = sorted(set(nrs) | set(EXEC_NRS) | (watch - {NR_MMAP}))
    # conditional traps: nr -> checks (arg, op, k) that must all hold to trap
    cond: dict[int, list[tuple[int, str, int]]] = {}
    if cwd_fd is not None:
        cond = {
            NR_CLOSE: [(0, "eq", cwd_fd)],
            NR_DUP2: [(1, "eq", cwd_fd)],
            NR_DUP3: [(1, "eq", cwd_fd)],
            NR_CLOSE_RANGE: [(0, "lt", cwd_fd + 1), (1, "ge", cwd_fd)],
        }
    if NR_MMAP in watch:
        cond[NR_MMAP] = [(3, "clear", MAP_ANONYMOUS)]  # (flags: the low 32 bits)
    cond = {nr: c for nr, c in sorted(cond.items()) if nr not in trapped}
    prog = [
        _insn(BPF_LD_W_ABS, 0, 0, OFF_ARCH),
        _insn(BPF_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, 0, 0, OFF_NR),
    ]
    allow_at = len(prog) + 1 + len(trapped) + len(cond)  # RET ALLOW, then RET NOTIF
    notif_at = allow_at + 1
    prog.append(_insn(BPF_JGE_K, allow_at - len(prog) - 1, 0, X32_SYSCALL_BIT))  # x32: ALLOW
    for nr in trapped:
        prog.append(_insn(BPF_JEQ_K, notif_at - len(prog) - 1, 0, nr))
    block_at = notif_at + 1
    for nr, checks in cond.items():
        prog.append(_insn(BPF_JEQ_K, block_at - len(prog) - 1, 0, nr))
        block_at += 2 * len(checks) + 2
    prog.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF))
    for checks in cond.values():
        # each block: (LD arg, Jxx) per check, RET NOTIF, RET ALLOW
        allow = len(prog) + 2 * len(checks) + 1
        for arg, op, k in checks:
            prog.append(_insn(BPF_LD_W_ABS, 0, 0, 16 + 8 * arg))  # low 32 bits of args[arg]
            fail = allow - len(prog) - 1
            if op == "eq":
                prog.append(_insn(BPF_JEQ_K, 0, fail, k))
            elif op == "ge":
                prog.append(_insn(BPF_JGE_K, 0, fail, k))
            elif op == "clear":  # none of the bits of k set
                prog.append(_insn(BPF_JSET_K, fail, 0, k))
            else:  # "lt": not ge
                prog.append(_insn(BPF_JGE_K, fail, 0, k))
        prog.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF))
        prog.append(_insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(prog)


def install(
    nrs: frozenset[int] | set[int],
    cwd_fd: int | None = None,
    watch: frozenset[int] | set[int] = frozenset(),
) -> int:
    """Install the filter in this process; return the listener fd."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    code = build_filter(nrs, cwd_fd, watch)
    insns = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(code) // 8, ctypes.addressof(insns))
    libc.syscall.restype = ctypes.c_long
    for flags in (
        SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV,
        SECCOMP_FILTER_FLAG_NEW_LISTENER,
    ):
        fd = libc.syscall(
            ctypes.c_long(NR_SECCOMP),
            ctypes.c_long(SECCOMP_SET_MODE_FILTER),
            ctypes.c_long(flags),
            ctypes.byref(fprog),
        )
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != 22:  # EINVAL: flag unknown to this kernel, try without it
            break
    raise OSError(err, "seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)")


def die_with_parent(relay_pid: int) -> bool:
    """SIGKILL this process when its parent dies; False if the relay is already gone."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    return os.getppid() == relay_pid  # checked after the prctl: no window left


def main_kmod(argv: list[str]) -> int:
    """The kmod backend's helper (see the module docstring); returns only on failure."""

    fd, request, status_fd, relay_pid = (int(a) for a in argv[:4])
    cpus, program = argv[4], argv[6:]  # argv[5] is "--"
    os.set_inheritable(fd, False)  # the session's file is the relay's alone after execve
    if status_fd >= 0:
        os.set_inheritable(status_fd, False)

    def fail(message: str, code: int) -> int:
        os.write(status_fd if status_fd >= 0 else 2, (message + "\n").encode())
        return code

    try:
        if not die_with_parent(relay_pid):
            return 125  # the relay died before we started: nobody would serve the session
    except OSError as exc:
        return fail(f"cannot set the parent-death signal: {exc}", 126)
    if not program:
        return fail("no program given", 127)
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    prog = program[0]
    if "/" not in prog:  # search PATH now: after REGISTER only execve itself is traced
        for d in os.get_exec_path():
            cand = os.path.join(d, prog)
            if os.access(cand, os.X_OK) and not os.path.isdir(cand):
                prog = cand
                break
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return fail(f"cannot set no_new_privs: {os.strerror(ctypes.get_errno())}", 126)
    if status_fd >= 0:  # before REGISTER: after it, any call of ours may be forwarded
        t = os.times()
        os.write(status_fd, b"exec %d %r %r\n" % (time.monotonic_ns(), t.user, t.system))
    try:
        fcntl.ioctl(fd, request)
    except OSError as exc:
        return fail(f"mktrace register failed: {exc.strerror}", 126)
    try:
        os.execv(prog, program)
    except OSError as exc:
        return fail(f"cannot execute {program[0]}: {exc.strerror}", 127)
    return 127  # not reached


def main(argv: list[str]) -> int:
    if argv and argv[0] == "kmod":
        return main_kmod(argv[1:])
    status_fd = int(argv[0])
    relay_pid = int(argv[1])
    cgroup = argv[2]
    forwarded, _, watched = argv[3].partition("/")
    nrs = frozenset(int(t) for t in forwarded.split(",") if t)
    watch = frozenset(int(t) for t in watched.split(",") if t)
    cwd_fd = None if argv[4] == "-" else int(argv[4])
    program = argv[5:]
    os.set_inheritable(status_fd, False)  # closed by execve in the program
    try:
        if not die_with_parent(relay_pid):
            return 125  # the relay died before we started: nobody would serve the filter
    except OSError as exc:
        os.write(status_fd, f"cannot set the parent-death signal: {exc}\n".encode())
        return 126
    if cgroup != "-":
        try:  # the relay checks /proc/PID/cgroup and reports pdeathsig-only if this failed
            with open(f"{cgroup}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
        except OSError:
            pass
    try:
        install(nrs, cwd_fd, watch)
    except OSError as exc:
        os.write(status_fd, f"cannot install seccomp filter: {exc}\n".encode())
        return 126
    try:
        os.execvp(program[0], program)
    except OSError as exc:
        os.write(status_fd, f"cannot execute {program[0]}: {exc.strerror}\n".encode())
        return 127
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
