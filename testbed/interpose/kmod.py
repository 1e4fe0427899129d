"""The ``mktrace`` kernel module as an interposition backend, and its ABI mirror.

This module mirrors ``kmod/include/uapi/mktrace.h`` (ctypes structures,
ioctl numbers, constants; ``tests/test_kmod.py`` compiles a C program against
the header and checks that both agree), wraps ``/dev/mktrace`` in
:class:`Device`, and implements the relay's :class:`~testbed.interpose.Backend`
protocol in :class:`KmodBackend`.

A session is one open file of the device.  The backend opens it, sets the
mode and the forwarded set, and launches a *fresh* helper process (a tiny
``python -I -S`` script, :func:`helper_argv`) that inherits the file, sets
``no_new_privs`` (the module requires it), registers itself as the session's
target and ``exec``s the program: the relay process, which runs ZeroMQ
threads, never forks.

kthread-mode runs (``testbed run --backend kmod --mode kthread``) are driven
by ``testbed.kthread``.  Command line::

    python3 -m testbed.interpose.kmod status
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno as errno_mod
import fcntl
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from testbed.errors import TestbedError
from testbed.interpose import BackendBase, BackendError, CallerGone, Trap, proc_times

# ------------------------------------------------------------ uapi mirror

# Changelog of ABI_VERSION (kmod/include/uapi/mktrace.h):
#   1 - first version (ftrace hooks, relay mode)
#   2 - kthread call records (KRecord), F_FAITHFUL / F_FLUSH_CALLER,
#       Status.dropped, REGISTER needs no_new_privs
ABI_VERSION = 2
DEVICE = "/dev/mktrace"
SYSFS = "/sys/module/mktrace"
MAX_SYSCALLS = 1024
SET_WORDS = MAX_SYSCALLS // 64

MODE_KTHREAD = 1
MODE_RELAY = 2
F_DESCENDANTS = 1 << 0
F_FAITHFUL = 1 << 1
F_FLUSH_CALLER = 1 << 2
F_ALL = F_DESCENDANTS | F_FAITHFUL | F_FLUSH_CALLER
KREC_RELEASED = 1 << 0
KREC_FAITHFUL = 1 << 1
KREC_RING = 65536
ACT_CONTINUE = 0
ACT_EIO = 1
REPLY_CONTINUE = 0
REPLY_RETURN = 1
MAX_DELAY_NS = 1_000_000_000
MIN_TIMEOUT_NS = 1_000_000
MAX_TIMEOUT_NS = 3_600_000_000_000

u32 = ctypes.c_uint32
u64 = ctypes.c_uint64
s64 = ctypes.c_int64


class Config(ctypes.Structure):
    _fields_ = [
        ("mode", u32),
        ("flags", u32),
        ("delay_ns", u64),
        ("timeout_ns", u64),
        ("release_action", u32),
        ("reserved", u32),
    ]


class SyscallSet(ctypes.Structure):
    _fields_ = [("bits", u64 * SET_WORDS)]


class Request(ctypes.Structure):
    _fields_ = [
        ("seq", u64),
        ("pid", u32),
        ("tid", u32),
        ("nr", u32),
        ("flags", u32),
        ("args", u64 * 6),
        ("ts_ns", u64),
    ]


class KRecord(ctypes.Structure):
    _fields_ = [
        ("tid", u32),
        ("nr", u32),
        ("flags", u32),
        ("cpu", u32),
        ("ts_trap", u64),
        ("ts_queued", u64),
        ("ts_taken", u64),
        ("ts_arrive", u64),
        ("ts_done", u64),
        ("ts_resume", u64),
    ]


#: ``KRecord`` as a numpy dtype, for reading records in bulk.
KRECORD_FIELDS = [(name, "<u4" if ctype is u32 else "<u8") for name, ctype in KRecord._fields_]


class Reply(ctypes.Structure):
    _fields_ = [("seq", u64), ("action", u32), ("reserved", u32), ("value", s64)]


class Stat(ctypes.Structure):
    _fields_ = [
        ("count", u64),
        ("total_ns", u64),
        ("min_ns", u64),
        ("max_ns", u64),
        ("released", u64),
    ]


class StatsQuery(ctypes.Structure):
    _fields_ = [("buf", u64), ("count", u32), ("reserved", u32)]


class Status(ctypes.Structure):
    _fields_ = [
        ("abi_version", u32),
        ("nr_syscalls", u32),
        ("target_pid", u32),
        ("target_alive", u32),
        ("queued", u32),
        ("inflight", u32),
        ("calls", u64),
        ("released", u64),
        ("delegate_cpu", u32),
        ("reserved", u32),
        ("dropped", u64),
    ]


#: Every mirrored structure, by its C name (used by the layout test).
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "mktrace_config": Config,
    "mktrace_syscall_set": SyscallSet,
    "mktrace_request": Request,
    "mktrace_krecord": KRecord,
    "mktrace_reply": Reply,
    "mktrace_stat": Stat,
    "mktrace_stats_query": StatsQuery,
    "mktrace_status": Status,
}

_IOC_WRITE = 1
_IOC_READ = 2
IOC_MAGIC = 0xB7


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (IOC_MAGIC << 8) | nr


IOC_GET_STATUS = _ioc(_IOC_READ, 0x00, ctypes.sizeof(Status))
IOC_SET_CONFIG = _ioc(_IOC_WRITE, 0x01, ctypes.sizeof(Config))
IOC_GET_CONFIG = _ioc(_IOC_READ, 0x02, ctypes.sizeof(Config))
IOC_SET_SYSCALLS = _ioc(_IOC_WRITE, 0x03, ctypes.sizeof(SyscallSet))
IOC_REGISTER = _ioc(0, 0x04, 0)
IOC_GET_STATS = _ioc(_IOC_WRITE, 0x05, ctypes.sizeof(StatsQuery))
IOC_RESET_STATS = _ioc(0, 0x06, 0)
IOC_IS_PENDING = _ioc(_IOC_WRITE, 0x07, 8)

#: Every mirrored constant and ioctl number, by its C name (layout test).
CONSTANTS: dict[str, int] = {
    "MKTRACE_ABI_VERSION": ABI_VERSION,
    "MKTRACE_MAX_SYSCALLS": MAX_SYSCALLS,
    "MKTRACE_SET_WORDS": SET_WORDS,
    "MKTRACE_MODE_KTHREAD": MODE_KTHREAD,
    "MKTRACE_MODE_RELAY": MODE_RELAY,
    "MKTRACE_F_DESCENDANTS": F_DESCENDANTS,
    "MKTRACE_F_FAITHFUL": F_FAITHFUL,
    "MKTRACE_F_FLUSH_CALLER": F_FLUSH_CALLER,
    "MKTRACE_F_ALL": F_ALL,
    "MKTRACE_KREC_RELEASED": KREC_RELEASED,
    "MKTRACE_KREC_FAITHFUL": KREC_FAITHFUL,
    "MKTRACE_KREC_RING": KREC_RING,
    "MKTRACE_ACT_CONTINUE": ACT_CONTINUE,
    "MKTRACE_ACT_EIO": ACT_EIO,
    "MKTRACE_REPLY_CONTINUE": REPLY_CONTINUE,
    "MKTRACE_REPLY_RETURN": REPLY_RETURN,
    "MKTRACE_MAX_DELAY_NS": MAX_DELAY_NS,
    "MKTRACE_MIN_TIMEOUT_NS": MIN_TIMEOUT_NS,
    "MKTRACE_MAX_TIMEOUT_NS": MAX_TIMEOUT_NS,
    "MKTRACE_IOC_GET_STATUS": IOC_GET_STATUS,
    "MKTRACE_IOC_SET_CONFIG": IOC_SET_CONFIG,
    "MKTRACE_IOC_GET_CONFIG": IOC_GET_CONFIG,
    "MKTRACE_IOC_SET_SYSCALLS": IOC_SET_SYSCALLS,
    "MKTRACE_IOC_REGISTER": IOC_REGISTER,
    "MKTRACE_IOC_GET_STATS": IOC_GET_STATS,
    "MKTRACE_IOC_RESET_STATS": IOC_RESET_STATS,
    "MKTRACE_IOC_IS_PENDING": IOC_IS_PENDING,
}

MODES = {"kthread": MODE_KTHREAD, "relay": MODE_RELAY}
RELEASE_ACTIONS = {"continue": ACT_CONTINUE, "eio": ACT_EIO}

NOT_LOADED = f"mktrace module not loaded: {DEVICE} missing (see docs/kmod.md)"

# ------------------------------------------------------------ device


class SyscallStat(NamedTuple):
    nr: int
    count: int
    total_ns: int
    min_ns: int
    max_ns: int
    released: int

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0


def _bitmap(numbers: Iterable[int]) -> SyscallSet:
    bits = SyscallSet()
    for nr in numbers:
        if not 0 <= nr < MAX_SYSCALLS:
            raise BackendError(f"syscall number {nr} is outside 0-{MAX_SYSCALLS - 1}")
        bits.bits[nr // 64] |= 1 << (nr % 64)
    return bits


def _syscall_name(nr: int) -> str:
    from testbed.syscalls import name_of

    return name_of(nr)


class Device:
    """One session of ``/dev/mktrace`` (one open file).  Thin, typed ioctl wrappers."""

    def __init__(self, path: str = DEVICE, *, fd: int | None = None) -> None:
        self.path = path
        if fd is not None:
            self.fd = fd
            return
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise BackendError(
                NOT_LOADED if path == DEVICE else f"{path} missing (see docs/kmod.md)"
            ) from None
        except PermissionError:
            raise BackendError(f"cannot open {path}: permission denied (run as root)") from None
        except OSError as exc:
            raise BackendError(f"cannot open {path}: {exc.strerror}") from None
        try:
            st = self.status()
        except OSError:
            self.close()
            raise BackendError(
                f"{path} does not answer the mktrace ABI {ABI_VERSION} status ioctl:"
                " rebuild and reload kmod/"
            ) from None
        if st.abi_version != ABI_VERSION:
            self.close()
            raise BackendError(
                f"mktrace module speaks ABI {st.abi_version}, this testbed ABI {ABI_VERSION}:"
                " rebuild and reload kmod/"
            )

    def _ioctl(self, request: int, arg: ctypes.Structure | int = 0) -> None:
        fcntl.ioctl(self.fd, request, arg)

    def status(self) -> Status:
        st = Status()
        self._ioctl(IOC_GET_STATUS, st)
        return st

    def get_config(self) -> Config:
        cfg = Config()
        self._ioctl(IOC_GET_CONFIG, cfg)
        return cfg

    def set_config(
        self,
        mode: str = "kthread",
        *,
        delay_ns: int = 0,
        timeout_ns: int = 5_000_000_000,
        release_action: str = "continue",
        descendants: bool = False,
        faithful: bool | None = None,
        flush_caller: bool = False,
    ) -> None:
        """Configure the session; ``faithful=None`` keeps the module's default
        (parameter ``kthread_faithful``), ``flush_caller`` needs ``faithful``."""
        if mode not in MODES:
            raise BackendError(f"unknown kmod mode {mode!r} (choose kthread or relay)")
        if release_action not in RELEASE_ACTIONS:
            raise BackendError(f"unknown release action {release_action!r} (continue or eio)")
        if not 0 <= delay_ns <= MAX_DELAY_NS:
            raise BackendError(f"delay {delay_ns} ns outside 0-{MAX_DELAY_NS} ns")
        if not MIN_TIMEOUT_NS <= timeout_ns <= MAX_TIMEOUT_NS:
            raise BackendError("kmod timeout must be between 1 ms and 1 h")
        if faithful is None:
            faithful = bool(self.get_config().flags & F_FAITHFUL)
        if flush_caller and not faithful:
            raise BackendError("flushing the caller's TLB needs the faithful kthread variant")
        flags = (
            (F_DESCENDANTS if descendants else 0)
            | (F_FAITHFUL if faithful else 0)
            | (F_FLUSH_CALLER if flush_caller else 0)
        )
        cfg = Config(
            mode=MODES[mode],
            flags=flags,
            delay_ns=delay_ns,
            timeout_ns=timeout_ns,
            release_action=RELEASE_ACTIONS[release_action],
        )
        self._ioctl(IOC_SET_CONFIG, cfg)

    def set_syscalls(self, numbers: Iterable[int]) -> None:
        """Forward exactly ``numbers``; names the culprit if the kernel refuses one."""
        numbers = sorted(set(numbers))
        try:
            self._ioctl(IOC_SET_SYSCALLS, _bitmap(numbers))
        except OSError as exc:
            if exc.errno != errno_mod.EINVAL:
                raise BackendError(
                    f"mktrace: cannot set the forwarded set: {exc.strerror}"
                ) from None
            bad = [nr for nr in numbers if not self._hookable(nr)]
            self._ioctl(IOC_SET_SYSCALLS, _bitmap(()))
            names = ", ".join(f"{_syscall_name(nr)} ({nr})" for nr in bad) or "?"
            raise BackendError(f"mktrace cannot hook {names} on this kernel") from None

    def _hookable(self, nr: int) -> bool:
        try:
            self._ioctl(IOC_SET_SYSCALLS, _bitmap((nr,)))
        except OSError:
            return False
        return True

    def register(self) -> None:
        """Make the calling process the session's target."""
        self._ioctl(IOC_REGISTER)

    def stats(self) -> dict[int, SyscallStat]:
        """Per-syscall statistics of the forwarded calls (syscalls never called left out)."""
        n = min(self.status().nr_syscalls, MAX_SYSCALLS)
        buf = (Stat * n)()
        query = StatsQuery(buf=ctypes.addressof(buf), count=n)
        self._ioctl(IOC_GET_STATS, query)
        return {
            nr: SyscallStat(nr, s.count, s.total_ns, s.min_ns, s.max_ns, s.released)
            for nr, s in enumerate(buf)
            if s.count
        }

    def reset_stats(self) -> None:
        self._ioctl(IOC_RESET_STATS)

    def is_pending(self, seq: int) -> bool:
        try:
            self._ioctl(IOC_IS_PENDING, ctypes.c_uint64(seq))
        except OSError as exc:
            if exc.errno == errno_mod.ENOENT:
                return False
            raise
        return True

    def read_request(self) -> Request | None:
        """One pending request, or None if none is queued (the fd is non-blocking)."""
        req = Request()
        try:
            n = os.readv(self.fd, [req])
        except BlockingIOError:
            return None
        except InterruptedError:
            return None
        if n != ctypes.sizeof(Request):
            raise BackendError(f"mktrace: short read of {n} bytes")
        return req

    def read_records(self, max_records: int = 4096) -> bytes:
        """Drain up to ``max_records`` kthread-mode records (``KRecord`` layout), b"" if none."""
        try:
            return os.read(self.fd, max_records * ctypes.sizeof(KRecord))
        except (BlockingIOError, InterruptedError):
            return b""

    def reply(self, seq: int, action: int, value: int = 0) -> bool:
        """Answer request ``seq``; False if it no longer awaits a reply."""
        try:
            os.write(self.fd, bytes(Reply(seq=seq, action=action, value=value)))
        except OSError as exc:
            if exc.errno == errno_mod.ENOENT:
                return False
            raise
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ------------------------------------------------------------ launcher


# Runs in the fresh helper (``python -I -S``: no site, no project import, fast
# start): mark the session fd close-on-exec, set no_new_privs (the module
# forwards only such tasks: no privilege gain by a set-uid execve while
# traced), register, exec the program.  Just before registering it writes
# "exec MONOTONIC_NS USER_S SYS_S" on the status fd (the program's start, and
# the helper's own CPU time); a failure is one line on the status fd (or
# stderr without one), exit 126/127.
_HELPER = """\
import ctypes, fcntl, os, sys, time
fd, request, status, cpus, argv = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                   sys.argv[4], sys.argv[6:])
os.set_inheritable(fd, False)
if status >= 0:
    os.set_inheritable(status, False)
def fail(msg, code):
    os.write(status if status >= 0 else 2, (msg + "\\n").encode())
    sys.exit(code)
if cpus:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
prog = argv[0]
if "/" not in prog:  # search PATH now: after REGISTER only execve itself is traced
    for d in os.get_exec_path():
        cand = os.path.join(d, prog)
        if os.access(cand, os.X_OK) and not os.path.isdir(cand):
            prog = cand
            break
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0):  # PR_SET_NO_NEW_PRIVS
    fail("cannot set no_new_privs: %s" % os.strerror(ctypes.get_errno()), 126)
if status >= 0:  # before REGISTER: after it, any syscall of ours may be forwarded
    t = os.times()
    os.write(status, b"exec %d %r %r\\n" % (time.monotonic_ns(), t.user, t.system))
try:
    fcntl.ioctl(fd, request)
except OSError as exc:
    fail("mktrace register failed: %s" % exc.strerror, 126)
try:
    os.execv(prog, argv)
except OSError as exc:
    fail("cannot execute %s: %s" % (argv[0], exc.strerror), 127)
"""


def helper_argv(
    fd: int, argv: list[str], status_fd: int = -1, cpus: Iterable[int] | None = None
) -> list[str]:
    """Command line of the helper that registers on session ``fd`` and execs ``argv``.

    ``cpus``: pin the program to these CPUs (kthread mode keeps it off the
    delegate thread's CPU, as the paper's compute plane).
    """
    if not argv:
        raise TestbedError("no program given")
    cpu_list = ",".join(str(c) for c in sorted(cpus)) if cpus else ""
    return [
        sys.executable, "-I", "-S", "-c", _HELPER,
        str(fd), str(IOC_REGISTER), str(status_fd), cpu_list, "--", *argv,
    ]  # fmt: skip


def launch_registered(
    device: Device,
    argv: list[str],
    env: dict[str, str] | None = None,
    status_fd: int = -1,
    cpus: Iterable[int] | None = None,
    **popen,
) -> subprocess.Popen:
    """Start ``argv`` in a fresh helper that registers itself on ``device`` then execs.

    The caller (the relay, which runs ZeroMQ threads) never forks itself:
    ``subprocess`` spawns the helper, which inherits the session's open file.
    """
    if shutil.which(argv[0] if argv else "", path=(env or os.environ).get("PATH")) is None:
        raise BackendError(f"program not found: {argv[0] if argv else '(none)'}")
    fds = (device.fd,) if status_fd < 0 else (device.fd, status_fd)
    return subprocess.Popen(
        helper_argv(device.fd, argv, status_fd, cpus), env=env, pass_fds=fds, **popen
    )


def parse_status(data: bytes) -> tuple[tuple[int, float, float] | None, str | None]:
    """The helper's status-fd output: (exec stamp ``(ns, user_s, sys_s)`` or None, error or None)."""
    stamp, errors = None, []
    for line in data.decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "exec":
            try:
                stamp = (int(parts[1]), float(parts[2]), float(parts[3]))
                continue
            except ValueError:
                pass
        if line.strip():
            errors.append(line.strip())
    return stamp, "; ".join(errors) or None


def module_info() -> dict:
    """Version and parameters of the loaded module (``/sys/module/mktrace``)."""
    info: dict = {"abi": ABI_VERSION}
    for key in ("version", "srcversion"):
        try:
            info[key] = Path(SYSFS, key).read_text().strip()
        except OSError:
            info[key] = None
    params = {}
    try:
        names = sorted(os.listdir(f"{SYSFS}/parameters"))
    except OSError:
        names = []
    for name in names:
        try:
            value = Path(SYSFS, "parameters", name).read_text().strip()
        except OSError:
            continue
        params[name] = int(value) if value.lstrip("-").isdigit() else value
    info["parameters"] = params
    return info


# ------------------------------------------------------------ process memory

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_readv.argtypes = [
    ctypes.c_int,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.POINTER(_IoVec),
    ctypes.c_ulong,
    ctypes.c_ulong,
]


def read_process_memory(tid: int, addr: int, length: int) -> bytes:
    """Bytes at ``addr`` in thread ``tid``'s address space (short if unmapped).

    Raises :class:`CallerGone` if the task no longer exists.
    """
    if length <= 0:
        return b""
    buf = ctypes.create_string_buffer(length)
    local = _IoVec(ctypes.cast(buf, ctypes.c_void_p), length)
    remote = _IoVec(addr, length)
    n = _libc.process_vm_readv(tid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n >= 0:
        return buf.raw[:n]
    err = ctypes.get_errno()
    if err == errno_mod.ESRCH:
        raise CallerGone(tid)
    if err == errno_mod.EFAULT:
        return b""
    try:  # no process_vm_readv permission: /proc/PID/mem
        with open(f"/proc/{tid}/mem", "rb", buffering=0) as mem:
            mem.seek(addr)
            return mem.read(length)
    except FileNotFoundError:
        raise CallerGone(tid) from None
    except OSError:
        return b""


# ------------------------------------------------------------ backend


EXEC_NRS = (59, 322)  # execve, execveat: always trapped in relay mode (launch time)


class KmodBackend(BackendBase):
    """Relay-mode interposition through ``/dev/mktrace`` (see the module docstring).

    ``timeout_s`` is the module's per-call safety net (a relay that is alive
    but stuck); a relay that dies closes the device, which releases every
    caller at once.  ``release_action`` ("continue" or "eio") is what a
    released call does.  As in the seccomp backend, ``execve``/``execveat`` are
    always trapped (relay mode) so the program's start is timed
    (``launched_at_ns``, ``start_rusage``); they are forwarded only if asked.
    ``Trap.t_trap`` is the module's CLOCK_MONOTONIC stamp taken when the call
    entered the kernel (same clock as ``time.monotonic_ns``), so a call's
    overhead includes the wake-up of the relay.
    """

    name = "kmod"

    def __init__(
        self,
        forwarded: frozenset[int],
        mode: str = "relay",
        timeout_s: float = 30.0,
        device: str = DEVICE,
        descendants: bool = True,
        release_action: str = "continue",
        delay_ns: int = 0,
    ) -> None:
        if mode not in MODES:
            raise BackendError(f"unknown kmod mode {mode!r} (choose relay or kthread)")
        if not forwarded:
            raise BackendError("empty forwarded set")
        self.forwarded = frozenset(forwarded)
        self.mode = mode
        self.child: subprocess.Popen | None = None
        self.launched_at_ns = 0
        self.start_rusage: tuple[float, float] = (0.0, 0.0)
        self._launching = True
        self._status_r = -1
        self._dev = Device(device)
        trapped = self.forwarded | set(EXEC_NRS) if mode == "relay" else self.forwarded
        try:
            self._dev.set_config(
                mode,
                delay_ns=delay_ns,
                timeout_ns=int(timeout_s * 1e9),
                release_action=release_action,
                descendants=descendants,
            )
            self._dev.set_syscalls(trapped)
        except BaseException:
            self._dev.close()
            raise

    @property
    def device(self) -> Device:
        return self._dev

    def launch(
        self, argv: list[str], env: dict[str, str] | None = None, **popen
    ) -> subprocess.Popen:
        """Start ``argv`` registered on this session (``popen``: e.g. ``stdout=``)."""
        if self.child is not None:
            raise BackendError("KmodBackend launches one program per session")
        r, w = os.pipe()
        try:
            self.child = launch_registered(self._dev, argv, env, status_fd=w, **popen)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self._status_r = r
        if self.mode == "kthread":
            self.launched_at_ns = time.monotonic_ns()
            self._launching = False
        return self.child

    def launch_error(self) -> str | None:
        """The helper's message if the program could not be started."""
        if self._status_r < 0 or not select.select([self._status_r], [], [], 0)[0]:
            return None
        return parse_status(os.read(self._status_r, 4096))[1]

    def program_started(self) -> bool:
        return not self._launching

    def fileno(self) -> int:
        return self._dev.fd

    def receive(self) -> Trap | None:
        req = self._dev.read_request()
        if req is None:
            return None
        if self._launching or (req.nr in EXEC_NRS and req.nr not in self.forwarded):
            self._internal(req)
            return None
        return Trap(req.seq, req.tid, req.nr, tuple(req.args), req.ts_ns)

    def _internal(self, req: Request) -> None:
        """Calls served without forwarding: the helper's own, and execs."""
        child = self.child
        if self._launching and child is not None and req.pid == child.pid and req.nr in EXEC_NRS:
            self.start_rusage = proc_times(req.pid)
            self.launched_at_ns = time.monotonic_ns()
            self._launching = False
        self._dev.reply(req.seq, REPLY_CONTINUE)

    def read_memory(self, tid: int, addr: int, length: int) -> bytes:
        return read_process_memory(tid, addr, length)

    def is_valid(self, trap: Trap) -> bool:
        return self._dev.is_pending(trap.id)

    def resume_continue(self, trap: Trap) -> bool:
        return self._dev.reply(trap.id, REPLY_CONTINUE)

    def resume_return(self, trap: Trap, value: int, errno: int = 0) -> bool:
        return self._dev.reply(trap.id, REPLY_RETURN, -errno if errno else value)

    def finished(self) -> bool:
        """True once the registered process is gone and no call awaits a reply."""
        if self._dev.fd < 0:
            return True
        st = self._dev.status()
        if st.queued or st.inflight:
            return False
        if st.target_pid:
            return not st.target_alive
        # Not registered yet: finished only if the helper died before registering.
        return self.child is not None and self.child.poll() is not None

    def stats(self) -> dict[int, SyscallStat]:
        """The module's per-syscall counters (count, forwarding time) for this run."""
        return self._dev.stats()

    def close(self) -> None:
        self._dev.close()
        if self._status_r >= 0:
            os.close(self._status_r)
            self._status_r = -1


# ------------------------------------------------------------ command line


def compute_cpus(spec: str, delegate_cpu: int) -> set[int] | None:
    """CPUs for the program: "auto" = every allowed CPU but the delegate's, "all" = no pinning."""
    allowed = os.sched_getaffinity(0)
    if spec == "all":
        return None
    if spec == "auto":
        rest = allowed - {delegate_cpu}
        return rest or None
    try:
        cpus = {int(c) for c in spec.split(",") if c.strip()}
    except ValueError:
        raise TestbedError(f"--cpus {spec!r}: expected auto, all or a list like 0,2") from None
    if not cpus or not cpus <= allowed:
        raise TestbedError(f"--cpus {spec!r}: not a subset of the allowed CPUs {sorted(allowed)}")
    return cpus


def _run_status(args: argparse.Namespace) -> int:
    dev = Device(args.device)
    try:
        st = dev.status()
        cfg = dev.get_config()
    finally:
        dev.close()
    info = module_info()
    params = " ".join(f"{k}={v}" for k, v in info["parameters"].items())
    print(
        f"mktrace {info.get('version') or '?'} (ABI {st.abi_version}), {st.nr_syscalls} syscall"
        f" numbers hookable, delegate thread on CPU {st.delegate_cpu},"
        f" new sessions {'faithful' if cfg.flags & F_FAITHFUL else 'default'} kthread;"
        f" parameters: {params or '?'}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m testbed.interpose.kmod",
        description="Check the mktrace module (kthread runs: testbed run --backend kmod "
        "--mode kthread).",
    )
    sub = p.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("status", help="check that the module is loaded; version and parameters")
    s.add_argument("--device", default=DEVICE)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run_status(args)
    except TestbedError as exc:
        print(f"testbed: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"testbed: error: mktrace: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
