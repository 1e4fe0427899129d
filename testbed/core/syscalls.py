"""The x86-64 system-call table: numbers, names and argument specs.

One table used by the seccomp filter, the relay, the delegate, policies and
the kernel module's Python bindings.  Numbers come from the generated
``_syscall_numbers`` module (the kernel's uapi ``asm/unistd_64.h``).

An *argument spec* says which arguments of a call point at memory the relay
marshals: input buffers (their bytes travel in the request so message size is
realistic), output buffers (their length is sent; the delegate returns bytes
in offload mode), NUL-terminated paths, iovec arrays and fixed-size structs.
"""

from __future__ import annotations

import difflib
import enum
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from testbed.core._syscall_numbers import SYSCALLS
from testbed.core.errors import TestbedError

NAME_BY_NR: dict[int, str] = dict(SYSCALLS)
NR_BY_NAME: dict[str, int] = {name: nr for nr, name in SYSCALLS}
MAX_NR = max(NAME_BY_NR)

#: Upper bound on the bytes marshalled for any one buffer (bounded messages).
MAX_BUFFER = 1 << 20
#: Upper bound on a NUL-terminated path read from the caller.
MAX_PATH = 4096


class ArgKind(enum.Enum):
    IN_BUF = "in"  # bytes at args[arg], length in args[size_arg]
    OUT_BUF = "out"  # caller buffer filled by the call, capacity args[size_arg]
    PATH = "path"  # NUL-terminated string at args[arg]
    IN_IOV = "in_iov"  # struct iovec[args[size_arg]] at args[arg], read side
    OUT_IOV = "out_iov"  # struct iovec[args[size_arg]] at args[arg], filled by the call
    IN_STRUCT = "in_struct"  # fixed-size struct of `size` bytes at args[arg]
    OUT_STRUCT = "out_struct"  # fixed-size struct of `size` bytes filled at args[arg]


@dataclass(frozen=True, slots=True)
class ArgSpec:
    kind: ArgKind
    arg: int
    size_arg: int | None = None
    size: int | None = None


def _in(arg: int, size_arg: int) -> ArgSpec:
    return ArgSpec(ArgKind.IN_BUF, arg, size_arg=size_arg)


def _out(arg: int, size_arg: int) -> ArgSpec:
    return ArgSpec(ArgKind.OUT_BUF, arg, size_arg=size_arg)


def _path(arg: int) -> ArgSpec:
    return ArgSpec(ArgKind.PATH, arg)


def _struct_in(arg: int, size: int) -> ArgSpec:
    return ArgSpec(ArgKind.IN_STRUCT, arg, size=size)


def _struct_out(arg: int, size: int) -> ArgSpec:
    return ArgSpec(ArgKind.OUT_STRUCT, arg, size=size)


STAT_SIZE = 144  # struct stat on x86-64
STATX_SIZE = 256
TIMESPEC_SIZE = 16
SOCKADDR_MAX = 128

#: Argument specs for the calls whose memory is marshalled.  Calls not listed
#: are forwarded with their six register arguments only.
ARG_SPECS: dict[str, tuple[ArgSpec, ...]] = {
    "read": (_out(1, 2),),
    "write": (_in(1, 2),),
    "pread64": (_out(1, 2),),
    "pwrite64": (_in(1, 2),),
    "readv": (ArgSpec(ArgKind.OUT_IOV, 1, size_arg=2),),
    "writev": (ArgSpec(ArgKind.IN_IOV, 1, size_arg=2),),
    "preadv": (ArgSpec(ArgKind.OUT_IOV, 1, size_arg=2),),
    "pwritev": (ArgSpec(ArgKind.IN_IOV, 1, size_arg=2),),
    "sendto": (_in(1, 2),),
    "recvfrom": (_out(1, 2),),
    "open": (_path(0),),
    "creat": (_path(0),),
    "openat": (_path(1),),
    "stat": (_path(0), _struct_out(1, STAT_SIZE)),
    "lstat": (_path(0), _struct_out(1, STAT_SIZE)),
    "fstat": (_struct_out(1, STAT_SIZE),),
    "newfstatat": (_path(1), _struct_out(2, STAT_SIZE)),
    "statx": (_path(1), _struct_out(4, STATX_SIZE)),
    "access": (_path(0),),
    "faccessat": (_path(1),),
    "faccessat2": (_path(1),),
    "unlink": (_path(0),),
    "unlinkat": (_path(1),),
    "mkdir": (_path(0),),
    "mkdirat": (_path(1),),
    "rmdir": (_path(0),),
    "chdir": (_path(0),),
    "chmod": (_path(0),),
    "fchmodat": (_path(1),),
    "chown": (_path(0),),
    "lchown": (_path(0),),
    "fchownat": (_path(1),),
    "truncate": (_path(0),),
    "rename": (_path(0), _path(1)),
    "renameat": (_path(1), _path(3)),
    "renameat2": (_path(1), _path(3)),
    "link": (_path(0), _path(1)),
    "linkat": (_path(1), _path(3)),
    "symlink": (_path(0), _path(1)),
    "symlinkat": (_path(0), _path(2)),
    "readlink": (_path(0), _out(1, 2)),
    "readlinkat": (_path(1), _out(2, 3)),
    "getdents64": (_out(1, 2),),
    "getcwd": (_out(0, 1),),
    "execve": (_path(0),),
    "execveat": (_path(1),),
    "utimensat": (_path(1),),
    "nanosleep": (_struct_in(0, TIMESPEC_SIZE),),
    "clock_nanosleep": (_struct_in(2, TIMESPEC_SIZE),),
    "getrandom": (_out(0, 1),),
}


#: Calls the x86-64 vDSO serves in user space: a program (through libc) that makes
#: them never enters the kernel, so forwarding them forwards nothing (run.json
#: ``escapes.vdso``; ``testbed run`` warns).
VDSO_CALLS = ("clock_gettime", "gettimeofday", "time", "getcpu")


class UnknownSyscall(TestbedError):
    """A syscall name or number that is not in the x86-64 table."""


def lookup(token: str | int) -> int:
    """Return the syscall number for a name (``"write"``) or number (``"1"``, ``1``).

    Raises :class:`UnknownSyscall` with close-match suggestions otherwise.
    """
    if isinstance(token, int):
        if token in NAME_BY_NR:
            return token
        raise UnknownSyscall(f"unknown x86-64 syscall number {token} (valid: 0-{MAX_NR})")
    text = token.strip()
    if text.isdigit():
        return lookup(int(text))
    name = text.lower().removeprefix("sys_").removeprefix("__x64_sys_")
    if name in NR_BY_NAME:
        return NR_BY_NAME[name]
    close = difflib.get_close_matches(name, NR_BY_NAME.keys(), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownSyscall(f"unknown syscall {text!r}{hint}")


def name_of(nr: int) -> str:
    """Linux name of syscall ``nr`` (``"syscall_<nr>"`` for unassigned numbers)."""
    return NAME_BY_NR.get(nr, f"syscall_{nr}")


def parse_set(spec: str | Iterable[str | int]) -> frozenset[int]:
    """Parse ``"read,write,1"`` (or an iterable of names/numbers) into numbers."""
    tokens = spec.split(",") if isinstance(spec, str) else list(spec)
    tokens = [t for t in tokens if not (isinstance(t, str) and not t.strip())]
    if not tokens:
        raise TestbedError("empty syscall set")
    return frozenset(lookup(t) for t in tokens)


def arg_specs(nr: int) -> tuple[ArgSpec, ...]:
    """The marshalling spec of syscall ``nr`` (empty for register-only calls)."""
    return ARG_SPECS.get(name_of(nr), ())


def _regenerate(header: str) -> None:
    with open(header) as f:
        rows = re.findall(r"#define __NR_(\w+)\s+(\d+)", f.read())
    print(f"{len(rows)} syscalls in {header}; edit testbed/core/_syscall_numbers.py from:")
    for name, nr in sorted(rows, key=lambda r: int(r[1])):
        print(f"    ({nr}, {name!r}),")


if __name__ == "__main__":  # pragma: no cover - maintenance helper
    if len(sys.argv) == 3 and sys.argv[1] == "--regenerate":
        _regenerate(sys.argv[2])
    else:
        print("usage: python -m testbed.core.syscalls --regenerate HEADER", file=sys.stderr)
        sys.exit(2)
