"""The offloaded system calls: which arguments are fds, paths and buffers.

One table used by both sides: the relay reads it to decide whether a
trapped call is offloaded (an fd argument is a placeholder, or a path lies
under an ``--offload-path``), which caller memory to marshal and where the
results go; the delegate's executors (``execute.py``) are keyed by the same
names.  Calls handled without the delegate (refused or answered by the relay)
are listed in ``REFUSED`` with the errno a real program falls back on.
"""

from __future__ import annotations

import ctypes
import errno as E
from dataclasses import dataclass

from testbed.core import syscalls

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_REMOVEDIR = 0x200
AT_SYMLINK_FOLLOW = 0x400
AT_EMPTY_PATH = 0x1000
STAT_SIZE = 144
STATX_SIZE = 256
STATFS_SIZE = 120
FLOCK_SIZE = 32
TIMES_SIZE = 32  # struct timespec[2]
OPEN_HOW_SIZE = 24


class Iovec(ctypes.Structure):
    """``struct iovec``, for the relay's and the delegate's vector system calls."""

    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


@dataclass(frozen=True)
class Spec:
    """Where a call's fds, paths and buffers are (argument indexes)."""

    fds: tuple[int, ...] = ()  # plain fd arguments
    paths: tuple[tuple[int | None, int], ...] = ()  # (dirfd arg or None, path arg)
    content: int | None = None  # a string argument that is data, not a path (symlink target)
    in_buf: tuple[int, int] | None = None  # (arg, length arg)
    in_iov: tuple[int, int] | None = None  # (iovec arg, count arg): flattened into in_buf
    in_struct: tuple[int, int] | None = None  # (arg, size)
    out_buf: tuple[int, int] | None = None  # (arg, capacity arg)
    out_iov: tuple[int, int] | None = None  # (iovec arg, count arg)
    out_struct: tuple[int, int] | None = None  # (arg, size)


OFFLOADED: dict[str, Spec] = {
    # path calls (AT_FDCWD-relative unless a dirfd argument is given)
    "open": Spec(paths=((None, 0),)),
    "creat": Spec(paths=((None, 0),)),
    "openat": Spec(paths=((0, 1),)),
    "openat2": Spec(paths=((0, 1),), in_struct=(2, OPEN_HOW_SIZE)),
    "stat": Spec(paths=((None, 0),), out_struct=(1, STAT_SIZE)),
    "lstat": Spec(paths=((None, 0),), out_struct=(1, STAT_SIZE)),
    "newfstatat": Spec(paths=((0, 1),), out_struct=(2, STAT_SIZE)),
    "statx": Spec(paths=((0, 1),), out_struct=(4, STATX_SIZE)),
    "statfs": Spec(paths=((None, 0),), out_struct=(1, STATFS_SIZE)),
    "access": Spec(paths=((None, 0),)),
    "faccessat": Spec(paths=((0, 1),)),
    "faccessat2": Spec(paths=((0, 1),)),
    "unlink": Spec(paths=((None, 0),)),
    "unlinkat": Spec(paths=((0, 1),)),
    "mkdir": Spec(paths=((None, 0),)),
    "mkdirat": Spec(paths=((0, 1),)),
    "rmdir": Spec(paths=((None, 0),)),
    "rename": Spec(paths=((None, 0), (None, 1))),
    "renameat": Spec(paths=((0, 1), (2, 3))),
    "renameat2": Spec(paths=((0, 1), (2, 3))),
    "link": Spec(paths=((None, 0), (None, 1))),
    "linkat": Spec(paths=((0, 1), (2, 3))),
    "symlink": Spec(paths=((None, 1),), content=0),
    "symlinkat": Spec(paths=((1, 2),), content=0),
    "readlink": Spec(paths=((None, 0),), out_buf=(1, 2)),
    "readlinkat": Spec(paths=((0, 1),), out_buf=(2, 3)),
    "truncate": Spec(paths=((None, 0),)),
    "chmod": Spec(paths=((None, 0),)),
    "fchmodat": Spec(paths=((0, 1),)),
    "chown": Spec(paths=((None, 0),)),
    "lchown": Spec(paths=((None, 0),)),
    "fchownat": Spec(paths=((0, 1),)),
    "utimensat": Spec(paths=((0, 1),), in_struct=(2, TIMES_SIZE)),
    "chdir": Spec(paths=((None, 0),)),
    # fd calls
    "read": Spec(fds=(0,), out_buf=(1, 2)),
    "pread64": Spec(fds=(0,), out_buf=(1, 2)),
    "readv": Spec(fds=(0,), out_iov=(1, 2)),
    "preadv": Spec(fds=(0,), out_iov=(1, 2)),
    "preadv2": Spec(fds=(0,), out_iov=(1, 2)),
    "write": Spec(fds=(0,), in_buf=(1, 2)),
    "pwrite64": Spec(fds=(0,), in_buf=(1, 2)),
    "writev": Spec(fds=(0,), in_iov=(1, 2)),
    "pwritev": Spec(fds=(0,), in_iov=(1, 2)),
    "pwritev2": Spec(fds=(0,), in_iov=(1, 2)),
    "lseek": Spec(fds=(0,)),
    "fstat": Spec(fds=(0,), out_struct=(1, STAT_SIZE)),
    "fstatfs": Spec(fds=(0,), out_struct=(1, STATFS_SIZE)),
    "getdents64": Spec(fds=(0,), out_buf=(1, 2)),
    "fsync": Spec(fds=(0,)),
    "fdatasync": Spec(fds=(0,)),
    "ftruncate": Spec(fds=(0,)),
    "fallocate": Spec(fds=(0,)),
    "fadvise64": Spec(fds=(0,)),
    "fchmod": Spec(fds=(0,)),
    "fchown": Spec(fds=(0,)),
    "flock": Spec(fds=(0,)),
    "fcntl": Spec(fds=(0,)),  # the struct flock of lock commands: see relay/execute
    "fchdir": Spec(fds=(0,)),
}

#: ``copy_file_range`` between two offloaded fds runs at the delegate (no byte
#: crosses the network), at most this many bytes per call (the caller loops, as
#: for any short count): the delegate's serving thread is busy for one chunk.
COPY_MAX = 8 << 20

#: Calls refused on an offloaded fd or path, with the errno real programs fall
#: back on (documented in docs/offload.md).  ``io_uring_setup`` is refused
#: whenever offload mode is on (its I/O would bypass seccomp).
REFUSED: dict[str, int] = {
    "mmap": E.ENODEV,  # writable MAP_SHARED only (others get a local copy): "no mmap here"
    "sendfile": E.EINVAL,  # as for a file without splice support: read/write fallback
    "splice": E.EINVAL,
    "tee": E.EINVAL,
    "copy_file_range": E.EXDEV,  # one fd local, one offloaded: cp falls back to read/write
    "vmsplice": E.EBADF,  # as for any non-pipe fd
    "ioctl": E.ENOTTY,  # no ioctl on an offloaded file (isatty false, FICLONE unsupported)
    "io_uring_setup": E.ENOSYS,
    "getxattr": E.EOPNOTSUPP,  # no extended attributes on the offloaded tree
    "lgetxattr": E.EOPNOTSUPP,
    "fgetxattr": E.EOPNOTSUPP,
    "listxattr": E.EOPNOTSUPP,
    "llistxattr": E.EOPNOTSUPP,
    "flistxattr": E.EOPNOTSUPP,
    "setxattr": E.EOPNOTSUPP,
    "lsetxattr": E.EOPNOTSUPP,
    "fsetxattr": E.EOPNOTSUPP,
}

#: fd arguments of the refused calls (a path argument for the path xattr calls).
REFUSED_FDS: dict[str, tuple[int, ...]] = {
    "mmap": (4,),
    "sendfile": (0, 1),
    "splice": (0, 2),
    "tee": (0, 1),
    "copy_file_range": (0, 2),
    "vmsplice": (0,),
    "ioctl": (0,),
    "fgetxattr": (0,),
    "flistxattr": (0,),
    "fsetxattr": (0,),
}
REFUSED_PATHS: dict[str, int] = {
    "getxattr": 0, "lgetxattr": 0, "listxattr": 0, "llistxattr": 0,
    "setxattr": 0, "lsetxattr": 0,
}  # fmt: skip

#: Calls the relay answers itself when the caller's cwd is offloaded.
RELAY_ONLY = ("getcwd",)

#: Trapped so that nothing runs from the offloaded tree (EACCES, as on a noexec
#: mount) and a process gets its cwd token back before it execs.
EXECS = ("execve", "execveat")

SPEC_BY_NR: dict[int, tuple[str, Spec]] = {
    syscalls.NR_BY_NAME[n]: (n, s) for n, s in OFFLOADED.items() if n in syscalls.NR_BY_NAME
}


def trapped() -> frozenset[int]:
    """Every syscall number the relay traps in offload mode."""
    names = set(OFFLOADED) | set(REFUSED) | set(RELAY_ONLY) | set(EXECS)
    return frozenset(syscalls.NR_BY_NAME[n] for n in names if n in syscalls.NR_BY_NAME)


def as_fd(value: int) -> int:
    """A register argument read as the kernel reads an ``int fd`` (low 32 bits, signed)."""
    v = value & 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v
