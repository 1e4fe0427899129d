"""Python mirror of the mktrace module's userspace ABI, ``kmod/include/uapi/mktrace.h``.

ctypes structures, ioctl numbers and constants, nothing else: the device
wrapper is in :mod:`testbed.compute.interpose.kmod_device`, the backend in
:mod:`testbed.compute.interpose.kmod`.  ``tests/test_kmod.py`` compiles a C program
against the header and checks that :data:`STRUCTS` and :data:`CONSTANTS`
agree with it.
"""

from __future__ import annotations

import ctypes

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
