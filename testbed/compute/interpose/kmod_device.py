"""``/dev/mktrace`` as a Python object: one open file (a session), typed ioctl wrappers.

Also :func:`module_info`, the loaded module's version and parameters from sysfs.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from testbed.compute.interpose import BackendError
from testbed.compute.interpose.kmod_abi import (
    ABI_VERSION,
    DEVICE,
    F_DESCENDANTS,
    F_FAITHFUL,
    F_FLUSH_CALLER,
    IOC_GET_CONFIG,
    IOC_GET_STATS,
    IOC_GET_STATUS,
    IOC_IS_PENDING,
    IOC_REGISTER,
    IOC_RESET_STATS,
    IOC_SET_CONFIG,
    IOC_SET_SYSCALLS,
    MAX_DELAY_NS,
    MAX_SYSCALLS,
    MAX_TIMEOUT_NS,
    MIN_TIMEOUT_NS,
    MODES,
    RELEASE_ACTIONS,
    SYSFS,
    Config,
    KRecord,
    Reply,
    Request,
    Stat,
    StatsQuery,
    Status,
    SyscallSet,
)
from testbed.core.syscalls import name_of

NOT_LOADED = f"mktrace module not loaded: {DEVICE} missing (see docs/kmod.md)"


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
