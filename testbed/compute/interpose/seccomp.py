"""seccomp user-notification backend (no kernel module needed).

The program is started by a fresh launcher process (``_launch.py``) that
installs a filter returning ``SECCOMP_RET_USER_NOTIF`` for the forwarded set
and execs the program.  The relay takes the listener fd out of the launcher
with ``pidfd_getfd(2)`` while the launcher's ``execve`` is trapped, so the
hand-off never depends on a call that may itself be forwarded.

Children and threads inherit the filter and are served by the same listener.
Where the kernel has it (6.6+), ``SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP`` is set
on the listener to make the wake-up of the caller cheaper.
"""

from __future__ import annotations

import ctypes
import errno as E
import fcntl
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time

from testbed.compute.interpose import (
    BackendBase,
    BackendError,
    CallerGone,
    Trap,
    count_watched,
    proc_io,
    proc_times,
)
from testbed.compute.interpose._launch import EXEC_NRS
from testbed.compute.interpose.orphans import OrphanGuard, cgroup_of

NR_SECCOMP = 317
NR_PIDFD_GETFD = 438
SECCOMP_GET_NOTIF_SIZES = 3

NOTIF_SIZE = 80  # struct seccomp_notif
RESP_SIZE = 24  # struct seccomp_notif_resp
DATA_SIZE = 64  # struct seccomp_data


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (ord("!") << 8) | nr


IOCTL_NOTIF_RECV = _iowr(0, NOTIF_SIZE)
IOCTL_NOTIF_SEND = _iowr(1, RESP_SIZE)
IOCTL_NOTIF_ID_VALID = _iow(2, 8)
IOCTL_NOTIF_SET_FLAGS = _iow(4, 8)
USER_NOTIF_FD_SYNC_WAKE_UP = 1
USER_NOTIF_FLAG_CONTINUE = 1

_NOTIF = struct.Struct("<QIIiIQ6Q")  # id, pid, flags, nr, arch, ip, args[6]
_RESP = struct.Struct("<QqiI")  # id, val, error, flags
_U64 = struct.Struct("<Q")
_ioctl = fcntl.ioctl  # module-level names: no attribute look-ups on the hot path
#: the launcher, run as a plain file (``python -I -S``: stdlib only, no testbed import)
LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_launch.py")
_mono = time.monotonic_ns
_unpack_notif = _NOTIF.unpack

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def notif_sizes() -> tuple[int, int, int]:
    """(seccomp_notif, seccomp_notif_resp, seccomp_data) sizes from the kernel."""
    sizes = (ctypes.c_uint16 * 3)()
    rc = _libc.syscall(
        ctypes.c_long(NR_SECCOMP), ctypes.c_long(SECCOMP_GET_NOTIF_SIZES), ctypes.c_long(0),
        ctypes.byref(sizes),
    )  # fmt: skip
    if rc != 0:
        err = ctypes.get_errno()
        raise BackendError(f"seccomp user notification unavailable: {os.strerror(err)}")
    return sizes[0], sizes[1], sizes[2]


def pidfd_getfd(pid: int, fd: int) -> int:
    pidfd = os.pidfd_open(pid)
    try:
        res = _libc.syscall(ctypes.c_long(NR_PIDFD_GETFD), ctypes.c_long(pidfd),
                            ctypes.c_long(fd), ctypes.c_long(0))  # fmt: skip
        if res < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return res
    finally:
        os.close(pidfd)


def _find_listener(pid: int) -> int | None:
    """Number of the seccomp listener fd in process ``pid`` (None if not there yet)."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except FileNotFoundError:
        return None
    for name in names:
        try:
            if os.readlink(f"{base}/{name}") == "anon_inode:seccomp notify":
                return int(name)
        except OSError:
            continue
    return None


#: Period (s) of the watchdog timer that interrupts a blocking NOTIF_RECV.
WATCHDOG_S = 0.05


def _ignore_signal(_signum, _frame) -> None:
    """Installed for SIGCHLD/SIGALRM: its only job is to interrupt NOTIF_RECV."""


def start_watchdog() -> bool:
    """SIGCHLD + a periodic SIGALRM so a blocking NOTIF_RECV always returns.

    Only possible in the main thread; returns False elsewhere (then poll).
    """
    try:
        signal.signal(signal.SIGCHLD, _ignore_signal)
        signal.signal(signal.SIGALRM, _ignore_signal)
    except ValueError:
        return False
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG_S, WATCHDOG_S)
    return True


def stop_watchdog() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


class SeccompBackend(BackendBase):
    """Interposition through seccomp user notification (see module docstring)."""

    name = "seccomp"

    def __init__(
        self,
        forwarded: frozenset[int],
        handoff_timeout: float = 10.0,
        watch: frozenset[int] = frozenset(),
    ):
        kernel_sizes = notif_sizes()
        if kernel_sizes[0] < NOTIF_SIZE or kernel_sizes[1] < RESP_SIZE:
            raise BackendError(f"unexpected seccomp notification sizes {kernel_sizes}")
        self.forwarded = frozenset(forwarded)
        #: trapped only to be counted (testbed.compute.interpose.WATCHED): continued at
        #: once in ``take`` (or by the C path), counted in ``watched``
        self.watch = frozenset(watch) - self.forwarded
        self.watched: list[int] | None = [0, 0, 0, 0] if self.watch else None
        self.start_io: dict[str, int] | None = None
        self.handoff_timeout = handoff_timeout
        self.sync_wakeup = False
        self.fd = -1
        self.child: subprocess.Popen | None = None
        self.launched_at_ns = 0  # when the program's own execve was released
        self._launching = True
        self._recv_buf = bytearray(NOTIF_SIZE)
        self._zero = bytes(NOTIF_SIZE)
        self._poll = select.poll()
        self._status_r = -1
        self._mem_fds: dict[int, int] = {}
        self.start_rusage: tuple[float, float] = (0.0, 0.0)
        self.guard: OrphanGuard | None = None
        self.orphan_guard: str | None = None  # run.json: "cgroup" | "pdeathsig-only"
        self._watchdog = False
        #: offload mode: the fd carrying an offloaded cwd (its close/dup2/dup3/
        #: close_range trap too); set by the relay before launch
        self.cwd_fd: int | None = None

    # ------------------------------------------------------------ launch
    def launch(
        self, argv: list[str], env: dict[str, str] | None = None, **popen
    ) -> subprocess.Popen:
        """Start ``argv`` under the filter (``popen``: e.g. ``stdout=``)."""
        if shutil.which(argv[0], path=(env or os.environ).get("PATH")) is None:
            raise BackendError(f"program not found: {argv[0]}")
        self.guard = guard = OrphanGuard()
        r, w = os.pipe()
        nrs = ",".join(str(n) for n in sorted(self.forwarded))
        if self.watch:
            nrs += "/" + ",".join(str(n) for n in sorted(self.watch))
        cwd_fd = "-" if self.cwd_fd is None else str(self.cwd_fd)
        # a plain file without site (stdlib only): no testbed import before the program
        cmd = [sys.executable, "-I", "-S", LAUNCHER, str(w), str(os.getpid()),
               guard.path or "-", nrs, cwd_fd, *argv]  # fmt: skip
        self.child = subprocess.Popen(cmd, pass_fds=(w,), env=env, **popen)
        os.close(w)
        self._status_r = r
        try:
            self._take_listener()
        except BaseException:
            self._kill_child()
            raise
        # the launcher joined its cgroup before installing the filter we now hold
        if guard.mode == "cgroup" and cgroup_of(self.child.pid) != guard.rel:
            guard.demote("the launcher could not join its cgroup")
        self.orphan_guard = guard.mode
        if guard.warning():
            print(guard.warning(), file=sys.stderr)
        self._poll.register(self.fd, select.POLLIN)
        return self.child

    def _take_listener(self) -> None:
        assert self.child is not None
        deadline = time.monotonic() + self.handoff_timeout
        while time.monotonic() < deadline:
            if self.child.poll() is not None:
                raise BackendError(self._launch_failure())
            num = _find_listener(self.child.pid)
            if num is not None:
                try:
                    self.fd = pidfd_getfd(self.child.pid, num)
                except OSError as exc:
                    if exc.errno in (E.EBADF, E.ESRCH):
                        continue
                    raise BackendError(f"cannot take the seccomp listener: {exc}") from None
                self._set_sync_wakeup()
                return
            time.sleep(0.0005)
        raise BackendError(
            f"launcher did not install its seccomp filter within {self.handoff_timeout} s"
        )

    def _launch_failure(self) -> str:
        try:
            msg = os.read(self._status_r, 4096).decode(errors="replace").strip()
        except OSError:
            msg = ""
        code = self.child.returncode if self.child else None
        return msg or f"launcher exited with status {code} before starting the program"

    def _set_sync_wakeup(self) -> None:
        try:
            fcntl.ioctl(self.fd, IOCTL_NOTIF_SET_FLAGS, USER_NOTIF_FD_SYNC_WAKE_UP)  # by value
            self.sync_wakeup = True
        except OSError:
            self.sync_wakeup = False  # kernel < 6.6

    def _kill_child(self) -> None:
        if self.child and self.child.poll() is None:
            self.child.kill()
            self.child.wait()

    def begin_serving(self) -> bool:
        """Let ``receive()`` block when the relay is idle (the watchdog ends the wait).

        Waiting inside NOTIF_RECV rather than in poll is where the kernel's
        SYNC_WAKE_UP applies.  SIGCHLD and a periodic SIGALRM interrupt the
        wait (EINTR -> ``receive()`` returns None) so the program's exit is
        seen.  Needs the main thread (signal handlers); False elsewhere.
        """
        self._watchdog = start_watchdog()
        return self._watchdog

    def end_serving(self) -> None:
        if self._watchdog:
            stop_watchdog()
            self._watchdog = False

    def launch_error(self) -> str | None:
        """The launcher's message if the program could not be executed."""
        if self._status_r < 0:
            return None
        r = select.select([self._status_r], [], [], 0)[0]
        if not r:
            return None
        data = os.read(self._status_r, 4096)
        return data.decode(errors="replace").strip() or None

    # ------------------------------------------------------------ serving
    def fileno(self) -> int:
        return self.fd

    def receive(self) -> Trap | None:
        """Take one pending notification; None if it vanished or was internal."""
        buf = self._recv_buf
        buf[:] = self._zero
        try:
            _ioctl(self.fd, IOCTL_NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (E.ENOENT, E.EINTR, E.EAGAIN):
                return None  # the caller was interrupted / died before we took it
            raise
        return self.take(buf, _mono())

    def take(self, buf: bytes | bytearray, t: int) -> Trap | None:
        """A notification already received into ``buf`` (seen at ``t``), as ``receive``."""
        v = _unpack_notif(buf)
        nr = v[3]
        if nr in EXEC_NRS:
            self._forget_mem(v[1])  # a new address space follows
            if nr not in self.forwarded:
                self._internal(v[0], v[1], nr)
                return None
        if self._launching:
            self._internal(v[0], v[1], nr)
            return None
        if nr in self.watch:  # counted, continued, never forwarded
            count_watched(self.watched, nr, v[6:12])
            self._send(v[0], 0, 0, USER_NOTIF_FLAG_CONTINUE)
            return None
        return Trap(v[0], v[1], nr, v[6:12], t)

    def _internal(self, nid: int, pid: int, nr: int) -> None:
        """Calls the relay serves without forwarding: the launcher's, and execs."""
        if self._launching and pid == self.child.pid and nr in EXEC_NRS:
            self.start_rusage = proc_times(pid)
            io = proc_io(pid)  # the launcher's own I/O, subtracted from the program's
            self.start_io = io if isinstance(io, dict) else None
            self.launched_at_ns = time.monotonic_ns()
            self._launching = False
        self._send(nid, 0, 0, USER_NOTIF_FLAG_CONTINUE)

    def program_started(self) -> bool:
        return not self._launching

    def read_memory(self, tid: int, addr: int, length: int) -> bytes:
        """Read caller memory with pread(2) on a cached ``/proc/TID/mem`` fd."""
        if length <= 0:
            return b""
        fd = self._mem_fds.get(tid)
        if fd is not None:  # the common case: one pread on the cached fd
            try:
                data = os.pread(fd, length, addr)
                if data:
                    return data
            except OSError:
                pass  # decided below, with a reopen where it may help
        if fd is None:
            fd = self._open_mem(tid)
        for attempt in (0, 1):
            try:
                data = os.pread(fd, length, addr)
            except OSError as exc:
                if exc.errno not in (E.EIO, E.EFAULT):
                    self._forget_mem(tid)
                    raise CallerGone(f"/proc/{tid}/mem: {exc.strerror}") from None
                data = b""  # bad pointer, or an fd of a pre-exec address space
            if data or attempt:
                return data  # b"" on retry: bad pointer, the real call fails with EFAULT
            self._forget_mem(tid)  # the task may have exec'd: reopen once
            fd = self._open_mem(tid)
        return b""

    def _open_mem(self, tid: int) -> int:
        if len(self._mem_fds) >= 256:
            for old in list(self._mem_fds)[:128]:
                self._forget_mem(old)
        try:
            fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:  # gone (ENOENT/ESRCH) or refused (EACCES: not dumpable)
            raise CallerGone(f"/proc/{tid}/mem: {exc.strerror}") from None
        self._mem_fds[tid] = fd
        return fd

    def _forget_mem(self, tid: int) -> None:
        fd = self._mem_fds.pop(tid, None)
        if fd is not None:
            os.close(fd)

    def is_valid(self, trap: Trap) -> bool:
        try:
            fcntl.ioctl(self.fd, IOCTL_NOTIF_ID_VALID, _U64.pack(trap.id))
            return True
        except OSError:
            return False

    def _send(self, nid: int, val: int, error: int, flags: int) -> bool:
        resp = _RESP.pack(nid, val, error, flags)
        for _ in range(100):
            try:
                fcntl.ioctl(self.fd, IOCTL_NOTIF_SEND, resp)
                return True
            except OSError as exc:
                if exc.errno == E.ENOENT:
                    return False  # caller gone or interrupted
                if exc.errno != E.EINTR:  # the watchdog's signal (begin_serving): retry
                    raise
        raise BackendError("seccomp NOTIF_SEND kept failing with EINTR")

    def resume_continue(self, trap: Trap) -> bool:
        try:  # the hot path: one ioctl; any failure is decided (and retried) by _send
            _ioctl(self.fd, IOCTL_NOTIF_SEND, _RESP.pack(trap[0], 0, 0, USER_NOTIF_FLAG_CONTINUE))
            return True
        except OSError:
            return self._send(trap.id, 0, 0, USER_NOTIF_FLAG_CONTINUE)

    def resume_return(self, trap: Trap, value: int, errno: int = 0) -> bool:
        return self._send(trap.id, 0 if errno else value, -errno, 0)

    def finished(self) -> bool:
        """True once no task holds the filter any more (listener hung up)."""
        if self.fd < 0:
            return True
        return any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in self._poll.poll(0))

    def kill_descendants(self) -> None:
        """Kill every process of the run now (the relay failed; see orphans.py)."""
        if self.guard is not None:
            self.guard.kill()

    def close(self) -> None:
        self.end_serving()
        if self.guard is not None:  # descendants outliving the program are left alone
            self.guard.close(clean=True)
        for tid in list(self._mem_fds):
            self._forget_mem(tid)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._status_r >= 0:
            os.close(self._status_r)
            self._status_r = -1
