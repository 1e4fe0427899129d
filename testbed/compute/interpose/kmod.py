"""The ``mktrace`` kernel module as an interposition backend (launcher, backend, status).

The ABI mirror of ``kmod/include/uapi/mktrace.h`` (ctypes structures, ioctl
numbers, constants) lives in :mod:`testbed.compute.interpose.kmod_abi` and the
``/dev/mktrace`` wrapper :class:`Device` in :mod:`testbed.compute.interpose.kmod_device`;
both are re-exported here.  This module launches programs registered on a
session and implements the relay's :class:`~testbed.compute.interpose.Backend`
protocol in :class:`KmodBackend`.

A session is one open file of the device.  The backend opens it, sets the
mode and the forwarded set, and launches a *fresh* helper process (a tiny
``python -I -S`` run of the launcher the seccomp backend uses, ``_launch.py``:
:func:`helper_argv`) that inherits the file, dies with the relay (as the
seccomp backend's launcher does), sets ``no_new_privs`` (the module requires
it), registers itself as the session's target and ``exec``s the program: the
relay process, which runs ZeroMQ threads, never forks.

kthread-mode runs (``testbed run --backend kmod --mode kthread``) are driven
by ``testbed.compute.kthread``.  ``testbed kmod status`` (:func:`status_line`)
checks that the module is loaded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_mod
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable

from testbed.compute.interpose import (
    BackendBase,
    BackendError,
    CallerGone,
    Trap,
    proc_io,
    proc_times,
)
from testbed.compute.interpose.kmod_abi import (
    ABI_VERSION,
    ACT_CONTINUE,
    ACT_EIO,
    CONSTANTS,
    DEVICE,
    F_ALL,
    F_DESCENDANTS,
    F_FAITHFUL,
    F_FLUSH_CALLER,
    IOC_GET_CONFIG,
    IOC_GET_STATS,
    IOC_GET_STATUS,
    IOC_IS_PENDING,
    IOC_MAGIC,
    IOC_REGISTER,
    IOC_RESET_STATS,
    IOC_SET_CONFIG,
    IOC_SET_SYSCALLS,
    KREC_FAITHFUL,
    KREC_RELEASED,
    KREC_RING,
    KRECORD_FIELDS,
    MAX_DELAY_NS,
    MAX_SYSCALLS,
    MAX_TIMEOUT_NS,
    MIN_TIMEOUT_NS,
    MODE_KTHREAD,
    MODE_RELAY,
    MODES,
    RELEASE_ACTIONS,
    REPLY_CONTINUE,
    REPLY_RETURN,
    SET_WORDS,
    STRUCTS,
    SYSFS,
    Config,
    KRecord,
    Reply,
    Request,
    Stat,
    StatsQuery,
    Status,
    SyscallSet,
    _ioc,
)
from testbed.compute.interpose.kmod_device import (
    NOT_LOADED,
    Device,
    SyscallStat,
    _bitmap,
    _syscall_name,
    module_info,
)
from testbed.core.errors import TestbedError

#: The ABI mirror and the device wrapper are re-exported: ``kmod.Device``,
#: ``kmod.IOC_REGISTER``... keep working for every importer.
__all__ = [
    "ABI_VERSION",
    "DEVICE",
    "SYSFS",
    "MAX_SYSCALLS",
    "SET_WORDS",
    "MODE_KTHREAD",
    "MODE_RELAY",
    "F_DESCENDANTS",
    "F_FAITHFUL",
    "F_FLUSH_CALLER",
    "F_ALL",
    "KREC_RELEASED",
    "KREC_FAITHFUL",
    "KREC_RING",
    "ACT_CONTINUE",
    "ACT_EIO",
    "REPLY_CONTINUE",
    "REPLY_RETURN",
    "MAX_DELAY_NS",
    "MIN_TIMEOUT_NS",
    "MAX_TIMEOUT_NS",
    "Config",
    "SyscallSet",
    "Request",
    "KRecord",
    "KRECORD_FIELDS",
    "Reply",
    "Stat",
    "StatsQuery",
    "Status",
    "STRUCTS",
    "IOC_MAGIC",
    "_ioc",
    "IOC_GET_STATUS",
    "IOC_SET_CONFIG",
    "IOC_GET_CONFIG",
    "IOC_SET_SYSCALLS",
    "IOC_REGISTER",
    "IOC_GET_STATS",
    "IOC_RESET_STATS",
    "IOC_IS_PENDING",
    "CONSTANTS",
    "MODES",
    "RELEASE_ACTIONS",
    "NOT_LOADED",
    "Device",
    "SyscallStat",
    "_bitmap",
    "_syscall_name",
    "module_info",
    "EXEC_NRS",
    "KmodBackend",
    "compute_cpus",
    "helper_argv",
    "launch_registered",
    "parse_status",
    "read_process_memory",
    "status_line",
]

# ------------------------------------------------------------ launcher


#: The helper is the seccomp backend's launcher, ``_launch.py``, run as a plain
#: file (``python -I -S``: no site, no project import, fast start; its
#: ``kmod`` verb, :func:`testbed.compute.interpose._launch.main_kmod`).  Before
#: anything else it asks for SIGKILL when the relay dies
#: (``PR_SET_PDEATHSIG``) and checks that its parent is still the relay; then
#: it marks the session fd close-on-exec, sets no_new_privs (the module
#: forwards only such tasks: no privilege gain by a set-uid execve while
#: traced), registers and execs the program.  Just before registering it
#: writes "exec MONOTONIC_NS USER_S SYS_S" on the status fd (the program's
#: start, and the helper's own CPU time); a failure is one line on the status
#: fd (or stderr without one), exit 126/127 (125: the relay was already gone).
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch.py")


def helper_argv(
    fd: int,
    argv: list[str],
    status_fd: int = -1,
    cpus: Iterable[int] | None = None,
    relay_pid: int | None = None,
) -> list[str]:
    """Command line of the helper that registers on session ``fd`` and execs ``argv``.

    ``cpus``: pin the program to these CPUs (kthread mode keeps it off the
    delegate thread's CPU, as the paper's compute plane).  ``relay_pid``: the
    process that starts the helper (default: this one); the helper and the
    program die with it.
    """
    if not argv:
        raise TestbedError("no program given")
    cpu_list = ",".join(str(c) for c in sorted(cpus)) if cpus else ""
    relay = os.getpid() if relay_pid is None else relay_pid
    return [
        sys.executable, "-I", "-S", LAUNCHER, "kmod",
        str(fd), str(IOC_REGISTER), str(status_fd), str(relay), cpu_list, "--", *argv,
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
    The program is SIGKILLed when the caller dies (more exactly: the calling
    thread, so call this from one that outlives the program, as the relay's
    main thread does), as the seccomp backend's is.
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


# ------------------------------------------------------------ process memory

_libc = ctypes.CDLL(None, use_errno=True)  # the libc already mapped: no ldconfig at import


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
            io = proc_io(req.pid)  # the helper's own I/O, subtracted from the program's
            self.start_io = io if isinstance(io, dict) else None
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


# ------------------------------------------------------------ CPUs and status


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


def status_line(device: str = DEVICE) -> str:
    """``testbed kmod status``: the loaded module's version, ABI and parameters, one line.

    Raises :class:`BackendError` when ``device`` is missing or not the module's,
    :class:`OSError` when it cannot be queried.
    """
    dev = Device(device)
    try:
        st = dev.status()
        cfg = dev.get_config()
    finally:
        dev.close()
    info = module_info()
    params = " ".join(f"{k}={v}" for k, v in info["parameters"].items())
    return (
        f"mktrace {info.get('version') or '?'} (ABI {st.abi_version}), {st.nr_syscalls} syscall"
        f" numbers hookable, delegate thread on CPU {st.delegate_cpu},"
        f" new sessions {'faithful' if cfg.flags & F_FAITHFUL else 'default'} kthread;"
        f" parameters: {params or '?'}"
    )
