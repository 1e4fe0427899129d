"""The delegate side of offload mode: execute one call for one client.

``Executor.execute(client, call)`` runs an offload-mode ``wire.Call`` and
returns ``(ret, errno, outbufs)``.  The call's layout (``docs/offload.md``):
fd arguments are the client's *handles* (``fdtable``), ``AT_FDCWD`` means the
root, every path travels in ``bufs`` at its argument index, relative to the
root (or to a directory handle), input data at the buffer's argument index
(vectors flattened, total length in ``args[2]``) and output lengths in the
call's own length arguments (capped at ``syscalls.MAX_BUFFER``).  Output
buffers come back at their argument index.  Paths are resolved only through
:class:`~testbed.delegate.offload.sandbox.Sandbox`, and every name enters the kernel
as a :class:`~testbed.delegate.offload.sandbox.CName` (``_sys`` refuses other bytes).

**Data calls** (``read pread64 readv preadv preadv2`` and the writes) carry,
instead of the buffer address, ``args[1]``: 0, or the errno the relay's
kernel found in the caller's buffer or iovecs (``EFAULT``, ``EINVAL``:
``client.py`` asks its own kernel); ``args[2]``: the bytes the kernel would
move (the count, or the iovecs' total after the kernel's own cap).  Reads
move at most ``MAX_BUFFER`` of them into one output buffer (arg 1); writes
write the data of arg 1 (vectors flattened, zero-length entries dropped).
The executor first makes the call with no buffer at all, so the checks the
kernel makes *before* it looks at buffers (bad fd, not open for reading,
``ESPIPE``, a negative offset...) win over the relay's errno, in the kernel's
order; then it moves the data with the real call (one iovec for the vector
calls: their offset and ``RWF_*`` flags mean what they mean natively).
"""

from __future__ import annotations

import ctypes
import errno as E
import fcntl
import os
import stat
import struct
import time
from collections.abc import Callable

from testbed.core import syscalls, wire
from testbed.core.offload_calls import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_REMOVEDIR,
    AT_SYMLINK_FOLLOW,
    AT_SYMLINK_NOFOLLOW,
    COPY_MAX,
    FLOCK_SIZE,
    STAT_SIZE,
    STATFS_SIZE,
    STATX_SIZE,
    TIMES_SIZE,
    Iovec,
    as_fd,
)
from testbed.delegate.offload.fdtable import (
    IDLE_S,
    MAX_FDS,
    MAX_INFLIGHT_BYTES,
    MAX_TOTAL_INFLIGHT_BYTES,
    FdTable,
    Tables,
)
from testbed.delegate.offload.sandbox import (
    LAST_DOT,
    LAST_DOTDOT,
    LAST_NORM,
    CName,
    Sandbox,
    cname,
    fd_path,
    split_parent,
)

MAX = syscalls.MAX_BUFFER
NR = syscalls.NR_BY_NAME
F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
_FLOCK = struct.Struct("<hhxxxxqqixxxx")  # l_type, l_whence, l_start, l_len, l_pid
#: open(2) flags a client may pass (openat2 rejects unknown bits, open ignores them)
OPEN_FLAGS = (
    os.O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_APPEND
    | os.O_NONBLOCK | os.O_DSYNC | os.O_SYNC | os.O_DIRECT | os.O_LARGEFILE | os.O_DIRECTORY
    | os.O_NOFOLLOW | os.O_NOATIME | os.O_PATH | os.O_TMPFILE | 0o20000  # FASYNC
)  # fmt: skip

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys(nr: int, *args: int | CName | ctypes.Array) -> int:
    """A raw system call at the delegate; OSError on failure.

    Names only as :class:`CName` (``sandbox.cname``): plain bytes are refused.
    """
    conv: list = []
    for a in args:
        if isinstance(a, int):
            conv.append(ctypes.c_long(a))
        elif isinstance(a, CName):
            conv.append(ctypes.c_char_p(a))
        elif isinstance(a, ctypes.Array):
            conv.append(a)
        else:
            raise TypeError("names reach the kernel only through sandbox.cname()")
    ret = _libc.syscall(ctypes.c_long(nr), *conv)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _s(v: int) -> int:
    """A register argument as a signed 64-bit value."""
    return v - (1 << 64) if v >= 1 << 63 else v


def _u32s(v: int) -> int:
    return as_fd(v)  # uid_t/gid_t -1 and int arguments: low 32 bits, signed


class Ctx:
    """What an executor needs for one call: the sandbox, the client's table, the call."""

    __slots__ = ("box", "table", "args", "bufs")

    def __init__(self, box: Sandbox, table: FdTable, args: tuple[int, ...], bufs: dict):
        self.box, self.table, self.args, self.bufs = box, table, args, bufs

    def fd(self, i: int) -> int:
        return self.table.get(as_fd(self.args[i]))

    def base(self, i: int | None) -> int | None:
        if i is None:
            return None
        v = as_fd(self.args[i])
        return None if v == AT_FDCWD else self.table.get(v)

    def path(self, i: int) -> bytes:
        p = self.bufs.get(i)
        if p is None:
            raise OSError(E.EFAULT, "path missing")
        if p[:1] == b"\0":  # names the object of a handle (a /proc/self/fd/N path)
            digits = p[1:]
            if not digits.isdigit() or len(digits) > 10:
                raise OSError(E.EINVAL, "bad handle path")
            return self.box.rel_of(self.table.get(int(digits)))
        return p

    def n(self, i: int) -> int:
        return min(self.args[i], MAX)


Result = tuple[int, tuple[tuple[int, bytes], ...]]


def _raw_out(nr: int, size: int, *args: int | bytes) -> bytes:
    buf = ctypes.create_string_buffer(size)
    _sys(nr, *args, buf)
    return buf.raw


class _Tmp:
    """An fd closed on exit (O_PATH and parent fds of one call)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


# ---------------------------------------------------------------- open / close


def _open(c: Ctx, base: int | None, path: bytes, flags: int, mode: int, resolve: int = 0) -> Result:
    flags &= OPEN_FLAGS
    if not (flags & os.O_CREAT or flags & os.O_TMPFILE == os.O_TMPFILE):
        mode = 0
    mode &= 0o7777
    return _opened(c, lambda: c.box.open(base, path, flags, mode, resolve)), ()


def _opened(c: Ctx, opener: Callable[[], int]) -> int:
    """A handle for the fd ``opener`` opens; EMFILE at a limit before anything is opened."""
    handle = c.table.reserve()
    fd = None
    try:
        fd = opener()
    finally:
        c.table.place(handle, fd)
    return handle


def x_open(c: Ctx) -> Result:
    return _open(c, None, c.path(0), c.args[1], c.args[2])


def x_creat(c: Ctx) -> Result:
    return _open(c, None, c.path(0), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, c.args[1])


def x_openat(c: Ctx) -> Result:
    return _open(c, c.base(0), c.path(1), c.args[2], c.args[3])


def x_openat2(c: Ctx) -> Result:
    how = c.bufs.get(2, b"")
    if len(how) < 24:
        raise OSError(E.EINVAL, "short open_how")
    flags, mode, resolve = struct.unpack_from("<QQQ", how)
    if flags & ~OPEN_FLAGS & ~os.O_CLOEXEC or mode & ~0o7777:
        raise OSError(E.EINVAL, "bad open_how")
    base, path = c.base(0), c.path(1)
    return _opened(c, lambda: c.box.open(base, path, flags, mode, resolve)), ()


def x_close(c: Ctx) -> Result:
    c.table.close(as_fd(c.args[0]))
    return 0, ()


# ---------------------------------------------------------------- data


#: each data call's vector form (makes the kernel's checks before any buffer)
_VECTOR = {"read": "readv", "readv": "readv", "pread64": "preadv", "preadv": "preadv",
           "preadv2": "preadv2", "write": "writev", "writev": "writev", "pwrite64": "pwritev",
           "pwritev": "pwritev", "pwritev2": "pwritev2"}  # fmt: skip
_AT_OFFSET = frozenset(("pread64", "preadv", "pwrite64", "pwritev"))
I64_MAX = (1 << 63) - 1


def _transfer(c: Ctx, name: str, data: bytes | None) -> Result:
    """One read-like (``data`` None) or write-like call: see the module docstring."""
    a = c.args
    fd = c.fd(0)
    pos, flags = _s(a[3]), a[5] & 0xFFFFFFFF
    verdict = a[1] if a[1] < 4096 else E.EINVAL  # the relay's errno for the caller's buffers
    requested = a[2]
    n = min(requested, MAX) if data is None else min(len(data), MAX)
    vector = NR[_VECTOR[name]]
    at = name in _AT_OFFSET or (name in ("preadv2", "pwritev2") and pos != -1)
    if not verdict and at and requested > n and pos >= 0 and requested > I64_MAX - pos:
        verdict = E.EINVAL  # the kernel checks offset + count with the whole count
    if verdict:
        _sys(vector, fd, 0, 0, pos, 0, flags)  # checks made before the buffers: theirs first
        raise OSError(verdict, os.strerror(verdict))
    if n and not (flags and name in ("preadv2", "pwritev2")):
        # the common case, with one buffer: read/pread64 (write/pwrite64) are what the
        # vector calls do for it, and Python moves the bytes without extra copies
        if data is None:
            got_data = os.pread(fd, n, pos) if at else os.read(fd, n)
            return len(got_data), ((1, got_data),)
        data = data if len(data) == n else data[:n]
        return (os.pwrite(fd, data, pos) if at else os.write(fd, data)), ()
    if data is None:
        buf = ctypes.create_string_buffer(n)
        addr = ctypes.addressof(buf)
    else:
        data = data[:n]
        addr = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    if name in ("read", "write"):
        got = _sys(NR[name], fd, addr, n)
    elif name in ("pread64", "pwrite64"):
        got = _sys(NR[name], fd, addr, n, pos)
    else:
        iov = (Iovec * 1)(Iovec(addr, n))
        got = _sys(vector, fd, iov, 1 if n else 0, pos, 0, flags)
    if data is None:
        return got, ((1, ctypes.string_at(buf, got)),)
    return got, ()


def x_read(c: Ctx) -> Result:
    return _transfer(c, "read", None)


def x_pread64(c: Ctx) -> Result:
    return _transfer(c, "pread64", None)


def x_readv(c: Ctx) -> Result:
    return _transfer(c, "readv", None)


def x_preadv(c: Ctx) -> Result:
    return _transfer(c, "preadv", None)


def x_preadv2(c: Ctx) -> Result:
    return _transfer(c, "preadv2", None)


def _data(c: Ctx) -> bytes:
    return c.bufs.get(1, b"")


def x_write(c: Ctx) -> Result:
    return _transfer(c, "write", _data(c))


def x_pwrite64(c: Ctx) -> Result:
    return _transfer(c, "pwrite64", _data(c))


def x_writev(c: Ctx) -> Result:
    return _transfer(c, "writev", _data(c))


def x_pwritev(c: Ctx) -> Result:
    return _transfer(c, "pwritev", _data(c))


def x_pwritev2(c: Ctx) -> Result:
    return _transfer(c, "pwritev2", _data(c))


def x_lseek(c: Ctx) -> Result:
    return os.lseek(c.fd(0), _s(c.args[1]), c.args[2] & 0xFFFFFFFF), ()


def x_getdents64(c: Ctx) -> Result:
    n = c.n(2)
    buf = ctypes.create_string_buffer(n)
    got = _sys(NR["getdents64"], c.fd(0), buf, n)
    return got, ((1, buf.raw[:got]),)


# ---------------------------------------------------------------- fd metadata


def x_fstat(c: Ctx) -> Result:
    return 0, ((1, _raw_out(NR["fstat"], STAT_SIZE, c.fd(0))),)


def x_fstatfs(c: Ctx) -> Result:
    return 0, ((1, _raw_out(NR["fstatfs"], STATFS_SIZE, c.fd(0))),)


def x_fsync(c: Ctx) -> Result:
    os.fsync(c.fd(0))
    return 0, ()


def x_fdatasync(c: Ctx) -> Result:
    os.fdatasync(c.fd(0))
    return 0, ()


def x_ftruncate(c: Ctx) -> Result:
    os.ftruncate(c.fd(0), _s(c.args[1]))
    return 0, ()


def x_fallocate(c: Ctx) -> Result:
    a = c.args
    return _sys(NR["fallocate"], c.fd(0), a[1] & 0xFFFFFFFF, _s(a[2]), _s(a[3])), ()


def x_fadvise64(c: Ctx) -> Result:
    a = c.args
    os.posix_fadvise(c.fd(0), _s(a[1]), _s(a[2]), a[3] & 0xFFFFFFFF)
    return 0, ()


def x_fchmod(c: Ctx) -> Result:
    os.fchmod(c.fd(0), c.args[1] & 0o7777)
    return 0, ()


def x_fchown(c: Ctx) -> Result:
    os.fchown(c.fd(0), _u32s(c.args[1]), _u32s(c.args[2]))
    return 0, ()


def x_flock(c: Ctx) -> Result:
    # never block a delegate worker: the relay retries a blocking request on EAGAIN
    fcntl.flock(c.fd(0), (c.args[1] & 0xFFFFFFFF) | fcntl.LOCK_NB)
    return 0, ()


def x_fcntl(c: Ctx) -> Result:
    fd, cmd, arg = c.fd(0), c.args[1] & 0xFFFFFFFF, c.args[2]
    if cmd in (fcntl.F_GETFL, fcntl.F_SETFL):
        return fcntl.fcntl(fd, cmd, as_fd(arg) if cmd == fcntl.F_SETFL else 0), ()
    ofd = {F_GETLK: F_OFD_GETLK, F_SETLK: F_OFD_SETLK, F_SETLKW: F_OFD_SETLK,
           F_OFD_GETLK: F_OFD_GETLK, F_OFD_SETLK: F_OFD_SETLK, F_OFD_SETLKW: F_OFD_SETLK}  # fmt: skip
    if cmd not in ofd:
        raise OSError(E.EINVAL, f"fcntl command {cmd} not offloaded")
    raw = c.bufs.get(2, b"")
    if len(raw) < FLOCK_SIZE:
        raise OSError(E.EFAULT, "struct flock missing")
    l_type, whence, start, length, _pid = _FLOCK.unpack_from(raw)
    # record locks become open-file-description locks at the delegate (one process
    # serves every client, so POSIX per-process locks would never conflict)
    out = fcntl.fcntl(fd, ofd[cmd], _FLOCK.pack(l_type, whence, start, length, 0))
    if ofd[cmd] == F_OFD_GETLK:
        return 0, ((2, out),)
    return 0, ()


def x_fchdir(c: Ctx) -> Result:
    fd = c.fd(0)
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        raise OSError(E.ENOTDIR, "not a directory")
    return 0, ((0, c.box.rel_of(fd)),)


# ---------------------------------------------------------------- path calls


def _opath(c: Ctx, base: int | None, path: bytes, follow: bool) -> _Tmp:
    return _Tmp(c.box.opath(base, path, follow))


def _stat(c: Ctx, base: int | None, path: bytes, follow: bool, arg: int) -> Result:
    with _opath(c, base, path, follow) as fd:
        return 0, ((arg, _raw_out(NR["fstat"], STAT_SIZE, fd)),)


def x_stat(c: Ctx) -> Result:
    return _stat(c, None, c.path(0), True, 1)


def x_lstat(c: Ctx) -> Result:
    return _stat(c, None, c.path(0), False, 1)


def x_newfstatat(c: Ctx) -> Result:
    flags = c.args[3]
    path = c.path(1)
    if not path and flags & AT_EMPTY_PATH:
        return 0, ((2, _raw_out(NR["fstat"], STAT_SIZE, c.fd(0))),)
    return _stat(c, c.base(0), path, not flags & AT_SYMLINK_NOFOLLOW, 2)


def x_statx(c: Ctx) -> Result:
    flags, mask = c.args[2] & 0xFFFFFFFF, c.args[3] & 0xFFFFFFFF
    path = c.path(1)
    sync = flags & 0x6000  # AT_STATX_SYNC_TYPE
    if not path and flags & AT_EMPTY_PATH:
        return 0, (
            (4, _raw_out(NR["statx"], STATX_SIZE, c.fd(0), cname(b""), AT_EMPTY_PATH | sync, mask)),
        )
    with _opath(c, c.base(0), path, not flags & AT_SYMLINK_NOFOLLOW) as fd:
        out = _raw_out(NR["statx"], STATX_SIZE, fd, cname(b""), AT_EMPTY_PATH | sync, mask)
    return 0, ((4, out),)


def x_statfs(c: Ctx) -> Result:
    with _opath(c, None, c.path(0), True) as fd:
        return 0, ((1, _raw_out(NR["fstatfs"], STATFS_SIZE, fd)),)


AT_EACCESS = 0x200


def _access(c: Ctx, base: int | None, path: bytes, mode: int, flags: int) -> Result:
    mode, flags = mode & 0xFFFFFFFF, flags & 0xFFFFFFFF
    if mode & ~7 or flags & ~(AT_EACCESS | AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
        raise OSError(E.EINVAL, "bad access mode or flags")
    with _opath(c, base, path, not flags & AT_SYMLINK_NOFOLLOW) as fd:
        _sys(NR["faccessat2"], AT_FDCWD, fd_path(fd), mode, flags & AT_EACCESS)
    return 0, ()


def x_access(c: Ctx) -> Result:
    return _access(c, None, c.path(0), c.args[1], 0)


def x_faccessat(c: Ctx) -> Result:
    return _access(c, c.base(0), c.path(1), c.args[2], 0)


def x_faccessat2(c: Ctx) -> Result:
    return _access(c, c.base(0), c.path(1), c.args[2], c.args[3])


# Entry calls act on one plain name in a confined parent (sandbox.parent).  A
# final ".", ".." or "/" and trailing slashes get the kernel's answers here,
# call by call, without ever handing the kernel more than that one plain name.
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _lmode(pfd: int, name: CName) -> int:
    """``st_mode`` of entry ``name`` in directory ``pfd``, not following it (ENOENT if none)."""
    buf = ctypes.create_string_buffer(STAT_SIZE)
    _sys(NR["newfstatat"], pfd, name, buf, AT_SYMLINK_NOFOLLOW)
    return struct.unpack_from("<I", buf.raw, 24)[0]


def _new_entry(pfd: int, name: CName, kind: int, slash: bool) -> None:
    """The kernel's checks of a name link/symlink are to create (filename_create)."""
    if kind != LAST_NORM:
        raise OSError(E.EEXIST, "exists")
    if slash:  # "new/" names a directory these calls cannot make
        try:
            _lmode(pfd, name)
        except FileNotFoundError:
            raise OSError(E.ENOENT, "no such directory") from None
        raise OSError(E.EEXIST, "exists")


def _unlink(c: Ctx, base: int | None, path: bytes, flags: int) -> Result:
    flags &= 0xFFFFFFFF
    if flags & ~AT_REMOVEDIR:
        raise OSError(E.EINVAL, "bad unlinkat flags")
    pfd, name, kind, slash = c.box.parent(base, path)
    with _Tmp(pfd):
        if flags & AT_REMOVEDIR:
            if kind != LAST_NORM:
                err = {LAST_DOT: E.EINVAL, LAST_DOTDOT: E.ENOTEMPTY}.get(kind, E.EBUSY)
                raise OSError(err, os.strerror(err))
        elif kind != LAST_NORM:
            raise OSError(E.EISDIR, "is a directory")
        elif slash:  # unlink("x/") never removes anything
            isdir = stat.S_ISDIR(_lmode(pfd, name))
            raise OSError(E.EISDIR if isdir else E.ENOTDIR, "trailing slash")
        _sys(NR["unlinkat"], pfd, name, flags)
    return 0, ()


def x_unlink(c: Ctx) -> Result:
    return _unlink(c, None, c.path(0), 0)


def x_unlinkat(c: Ctx) -> Result:
    return _unlink(c, c.base(0), c.path(1), c.args[2])


def x_rmdir(c: Ctx) -> Result:
    return _unlink(c, None, c.path(0), AT_REMOVEDIR)


def _mkdir(c: Ctx, base: int | None, path: bytes, mode: int) -> Result:
    pfd, name, kind, _slash = c.box.parent(base, path)  # "d/" makes d
    with _Tmp(pfd):
        if kind != LAST_NORM:  # mkdir of ".", ".." or the root: exists
            raise OSError(E.EEXIST, "exists")
        _sys(NR["mkdirat"], pfd, name, mode & 0o7777)
    return 0, ()


def x_mkdir(c: Ctx) -> Result:
    return _mkdir(c, None, c.path(0), c.args[1])


def x_mkdirat(c: Ctx) -> Result:
    return _mkdir(c, c.base(0), c.path(1), c.args[2])


def _rename(c: Ctx, ob: int | None, op: bytes, nb: int | None, np: bytes, flags: int) -> Result:
    opfd, oname, okind, oslash = c.box.parent(ob, op)
    with _Tmp(opfd):
        npfd, nname, nkind, nslash = c.box.parent(nb, np)
        with _Tmp(npfd):
            if okind != LAST_NORM:
                raise OSError(E.EBUSY, "cannot rename . or ..")
            if nkind != LAST_NORM:
                err = E.EEXIST if flags & RENAME_NOREPLACE else E.EBUSY
                raise OSError(err, os.strerror(err))
            if oslash or nslash:  # then both must be directories
                if not stat.S_ISDIR(_lmode(opfd, oname)) and (
                    oslash or (nslash and not flags & RENAME_EXCHANGE)
                ):
                    raise OSError(E.ENOTDIR, "not a directory")
                if nslash and flags & RENAME_EXCHANGE and not stat.S_ISDIR(_lmode(npfd, nname)):
                    raise OSError(E.ENOTDIR, "not a directory")
            _sys(NR["renameat2"], opfd, oname, npfd, nname, flags)
    return 0, ()


def x_rename(c: Ctx) -> Result:
    return _rename(c, None, c.path(0), None, c.path(1), 0)


def x_renameat(c: Ctx) -> Result:
    return _rename(c, c.base(0), c.path(1), c.base(2), c.path(3), 0)


def x_renameat2(c: Ctx) -> Result:
    return _rename(c, c.base(0), c.path(1), c.base(2), c.path(3), c.args[4] & 0xFFFFFFFF)


def _link(c: Ctx, ob: int | None, op: bytes, nb: int | None, np: bytes, flags: int) -> Result:
    flags &= 0xFFFFFFFF
    if flags & ~(AT_SYMLINK_FOLLOW | AT_EMPTY_PATH):
        raise OSError(E.EINVAL, "bad linkat flags")
    if flags & AT_SYMLINK_FOLLOW:
        with _opath(c, ob, op, True) as fd:
            npfd, nname, nkind, nslash = c.box.parent(nb, np)
            with _Tmp(npfd):
                _new_entry(npfd, nname, nkind, nslash)
                _sys(NR["linkat"], AT_FDCWD, fd_path(fd), npfd, nname, AT_SYMLINK_FOLLOW)
        return 0, ()
    _p, _n, okind, oslash = split_parent(op)
    if okind != LAST_NORM or oslash:  # ".", ".." or "x/": a directory, if anything
        with _opath(c, ob, op, False):  # the kernel's lookup errors first
            pass
        npfd, nname, nkind, nslash = c.box.parent(nb, np)
        with _Tmp(npfd):
            _new_entry(npfd, nname, nkind, nslash)
        raise OSError(E.EPERM, "hard link to a directory")
    opfd, oname, _k, _s2 = c.box.parent(ob, op)
    with _Tmp(opfd):
        npfd, nname, nkind, nslash = c.box.parent(nb, np)
        with _Tmp(npfd):
            _new_entry(npfd, nname, nkind, nslash)
            _sys(NR["linkat"], opfd, oname, npfd, nname, 0)
    return 0, ()


def x_link(c: Ctx) -> Result:
    return _link(c, None, c.path(0), None, c.path(1), 0)


def x_linkat(c: Ctx) -> Result:
    return _link(c, c.base(0), c.path(1), c.base(2), c.path(3), c.args[4])


def _symlink(c: Ctx, target: bytes, base: int | None, path: bytes) -> Result:
    content = cname(target)  # stored as is, never resolved here; still no NUL inside
    if not target:
        raise OSError(E.ENOENT, "empty symlink target")
    pfd, name, kind, slash = c.box.parent(base, path)
    with _Tmp(pfd):
        _new_entry(pfd, name, kind, slash)
        _sys(NR["symlinkat"], content, pfd, name)
    return 0, ()


def x_symlink(c: Ctx) -> Result:
    return _symlink(c, c.path(0), None, c.path(1))


def x_symlinkat(c: Ctx) -> Result:
    return _symlink(c, c.path(0), c.base(1), c.path(2))


def _readlink(c: Ctx, base: int | None, path: bytes, arg: int, size: int) -> Result:
    with _opath(c, base, path, False) as fd:
        if not stat.S_ISLNK(os.fstat(fd).st_mode):  # natively EINVAL ("" on a file: ENOENT)
            raise OSError(E.EINVAL, "not a symbolic link")
        buf = ctypes.create_string_buffer(max(size, 1))
        got = _sys(NR["readlinkat"], fd, cname(b""), buf, size)
    return got, ((arg, buf.raw[:got]),)


def x_readlink(c: Ctx) -> Result:
    return _readlink(c, None, c.path(0), 1, c.n(2))


def x_readlinkat(c: Ctx) -> Result:
    return _readlink(c, c.base(0), c.path(1), 2, c.n(3))


def x_truncate(c: Ctx) -> Result:
    with _Tmp(c.box.open(None, c.path(0), os.O_WRONLY)) as fd:
        os.ftruncate(fd, _s(c.args[1]))
    return 0, ()


def _chmod(c: Ctx, base: int | None, path: bytes, mode: int, flags: int) -> Result:
    with _opath(c, base, path, not flags & AT_SYMLINK_NOFOLLOW) as fd:
        if flags & AT_SYMLINK_NOFOLLOW and stat.S_ISLNK(os.fstat(fd).st_mode):
            raise OSError(E.EOPNOTSUPP, "symlink modes cannot change")
        _sys(NR["fchmodat"], AT_FDCWD, fd_path(fd), mode & 0o7777)
    return 0, ()


def x_chmod(c: Ctx) -> Result:
    return _chmod(c, None, c.path(0), c.args[1], 0)


def x_fchmodat(c: Ctx) -> Result:
    return _chmod(c, c.base(0), c.path(1), c.args[2], 0)


def _chown(c: Ctx, base: int | None, path: bytes, uid: int, gid: int, follow: bool) -> Result:
    with _opath(c, base, path, follow) as fd:
        _sys(NR["fchownat"], fd, cname(b""), _u32s(uid), _u32s(gid), AT_EMPTY_PATH)
    return 0, ()


def x_chown(c: Ctx) -> Result:
    return _chown(c, None, c.path(0), c.args[1], c.args[2], True)


def x_lchown(c: Ctx) -> Result:
    return _chown(c, None, c.path(0), c.args[1], c.args[2], False)


def x_fchownat(c: Ctx) -> Result:
    a = c.args
    if not c.path(1) and a[4] & AT_EMPTY_PATH:
        os.fchown(c.fd(0), _u32s(a[2]), _u32s(a[3]))
        return 0, ()
    return _chown(c, c.base(0), c.path(1), a[2], a[3], not a[4] & AT_SYMLINK_NOFOLLOW)


def x_utimensat(c: Ctx) -> Result:
    times = c.bufs.get(2)
    if times is not None and len(times) != TIMES_SIZE:  # the kernel reads exactly two timespecs
        raise OSError(E.EFAULT, "struct timespec[2] missing")
    tbuf = ctypes.create_string_buffer(times, len(times)) if times else None
    targs = (tbuf,) if tbuf is not None else (0,)
    flags = c.args[3] & 0xFFFFFFFF
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
        raise OSError(E.EINVAL, "bad utimensat flags")
    if c.bufs.get(1) is None:  # futimens(fd, times)
        _sys(NR["utimensat"], c.fd(0), 0, *targs, 0)
        return 0, ()
    path = c.path(1)
    if flags & AT_SYMLINK_NOFOLLOW:
        pfd, name, kind, slash = c.box.parent(c.base(0), path)
        with _Tmp(pfd):
            if kind == LAST_NORM and not slash:  # a trailing slash follows, as natively
                _sys(NR["utimensat"], pfd, name, *targs, AT_SYMLINK_NOFOLLOW)
                return 0, ()
    with _opath(c, c.base(0), path, True) as fd:
        _sys(NR["utimensat"], AT_FDCWD, fd_path(fd), *targs, 0)
    return 0, ()


def x_chdir(c: Ctx) -> Result:
    with _Tmp(c.box.open(None, c.path(0), os.O_PATH | os.O_DIRECTORY)) as fd:
        _sys(NR["faccessat2"], AT_FDCWD, fd_path(fd), os.X_OK, 0)
    return 0, ()


def x_copy_file_range(c: Ctx) -> Result:
    """Server-side copy between two of the client's fds.  ``bufs[1]``/``bufs[3]``: the
    caller's ``*off_in``/``*off_out`` when it passed them (8 bytes), given back moved."""
    a = c.args
    fin, fout = c.fd(0), c.fd(2)
    offs: dict[int, ctypes.Array] = {}
    for i in (1, 3):
        raw = c.bufs.get(i)
        if raw is not None:
            if len(raw) != 8:
                raise OSError(E.EFAULT, "offset missing")
            offs[i] = (ctypes.c_int64 * 1)(struct.unpack("<q", raw)[0])
    n = min(a[4], COPY_MAX)
    got = _sys(NR["copy_file_range"], fin, offs.get(1, 0), fout, offs.get(3, 0), n,
               a[5] & 0xFFFFFFFF)  # fmt: skip
    return got, tuple((i, struct.pack("<q", v[0])) for i, v in sorted(offs.items()))


EXECUTORS: dict[int, Callable[[Ctx], Result]] = {
    NR[name.removeprefix("x_")]: fn
    for name, fn in list(globals().items())
    if name.startswith("x_") and name.removeprefix("x_") in NR
}


def out_size(nr: int, args: tuple[int, ...]) -> int:
    """Bytes of output a call may return (for the in-flight budget)."""
    name = syscalls.name_of(nr)
    if name in ("read", "pread64", "readv", "preadv", "preadv2", "getdents64", "readlink"):
        return min(args[2], MAX)
    if name == "readlinkat":
        return min(args[3], MAX)
    return 4096


class Executor:
    """Executes offload-mode calls beneath ``root`` for many isolated clients."""

    def __init__(
        self,
        root: str,
        max_fds: int = MAX_FDS,
        max_inflight: int = MAX_INFLIGHT_BYTES,
        idle_s: float = IDLE_S,
        max_total_fds: int | None = None,
        max_total_inflight: int = MAX_TOTAL_INFLIGHT_BYTES,
    ):
        """Limits in ``fdtable``; ``max_total_fds`` None: half of what the fd limit
        (``testbed.core.limits.fd_limit()``, read now) leaves after ``RESERVED_FDS``."""
        self.box = Sandbox(root)
        self.tables = Tables(max_fds, max_inflight, idle_s, max_total_fds, max_total_inflight)

    def execute(self, client: bytes, call: wire.Call) -> tuple[int, int, tuple]:
        fn = EXECUTORS.get(call.nr)
        if fn is None:
            return -E.ENOSYS, E.ENOSYS, ()
        need = sum(len(b) for _a, b in call.bufs) + out_size(call.nr, call.args)
        try:
            with self.tables.use(client, need) as table:
                ret, outs = fn(Ctx(self.box, table, call.args, dict(call.bufs)))
        except OSError as exc:
            err = exc.errno if exc.errno and 0 < exc.errno < 4096 else E.EIO
            return -err, err, ()
        except (ValueError, OverflowError):  # an argument Python refuses: the kernel's EINVAL
            return -E.EINVAL, E.EINVAL, ()
        return ret, 0, outs

    def forget(self, client: bytes) -> None:
        """Forget ``client`` (any thread; fds of a running call close when it ends)."""
        self.tables.forget(client)

    def close(self) -> None:
        self.tables.close()
        self.box.close()


# ---------------------------------------------------------------- the data fast path
#
# The raw-ZMTP router hands the offload data calls here straight from its receive
# buffer (testbed.delegate.router, "The offload data path"): the fixed-width CALL
# (docs/wire.md) is parsed in place, written data goes to the kernel from a
# memoryview of the frame, read data lands in the reply buffer after the RESULT's
# head, and the RESULT is packed around it.  What it answers it answers exactly as
# ``Executor.execute`` does (same checks, same kernel calls for the data, same
# errno); any other frame, or a call it does not take, gets None and goes the
# general way (``wire.decode``, ``execute``).

_CALL_FIX = struct.Struct(">7sBQBIBHB" + "BQ" * 6 + "B")  # wire.py's fixed-width CALL head
_CALL_PREFIX = b"\x98\x02\xa4call"
_CALL_MARKS = (0xCF, 0xCE, 0xCD, 0x96, *(0xCF,) * 6)
_BUF_HEAD = struct.Struct(">BBBI")
_OFFLOAD_TAIL = b"\xa7offload"
_RESULT_HEAD = struct.Struct(">9sBQBqBHB" + "BQ" * 4 + "B")  # wire.py's fixed RESULT (68 bytes)
_RESULT_PREFIX = b"\x97\x02\xa6result"
_OUT_HEAD = struct.Struct(">BBBI")  # [arg, bin32]: fixarray 2, arg, bin32 marker, length
#: bytes before a read's data in the reply: the RESULT's head and one output entry's head
RESULT_ROOM = _RESULT_HEAD.size + _OUT_HEAD.size
_DATA_CALLS = frozenset(("read", "pread64", "readv", "preadv", "write", "pwrite64", "writev",
                         "pwritev", "lseek", "fstat", "newfstatat"))  # fmt: skip
_DATA_NAMES = {NR[n]: n for n in _DATA_CALLS}
_READS = frozenset(("read", "pread64", "readv", "preadv"))


def parse_data_call(frame: memoryview):
    """``(call_id, nr, name, args, data)`` of a fixed-width offload CALL of a data call
    (``data``: a memoryview of its input buffer, or None), else None."""
    n = len(frame)
    if n < _CALL_FIX.size + 8 or frame[:7] != _CALL_PREFIX:
        return None
    v = _CALL_FIX.unpack_from(frame)
    name = _DATA_NAMES.get(v[6])
    nbufs = v[20] - 0x90
    if (name is None or not 0 <= nbufs <= 1 or v[4] >= 1 << 31
            or (v[1], v[3], v[5], v[7], v[8], v[10], v[12], v[14], v[16], v[18]) != _CALL_MARKS):  # fmt: skip
        return None
    off, data = _CALL_FIX.size, None
    if nbufs:
        a2, arg, b32, length = _BUF_HEAD.unpack_from(frame, off)
        off += _BUF_HEAD.size
        if a2 != 0x92 or b32 != 0xC6 or arg != 1 or off + length + 8 != n:
            return None
        data = frame[off : off + length]
        off += length
    if frame[off:] != _OFFLOAD_TAIL:
        return None
    return v[2], v[6], name, (v[9], v[11], v[13], v[15], v[17], v[19]), data


def _fast_transfer(fd: int, name: str, a: tuple[int, ...], data, out: memoryview) -> int:
    """``_transfer`` for read/write and their p/v forms with the data in buffers:
    the bytes moved (a read's land in ``out``).  OSError as ``_transfer``."""
    pos = _s(a[3])
    verdict = a[1] if a[1] < 4096 else E.EINVAL
    requested = a[2]
    read = name in _READS
    n = min(requested, MAX) if read else min(len(data) if data is not None else 0, MAX)
    at = name in _AT_OFFSET
    if not verdict and at and requested > n and pos >= 0 and requested > I64_MAX - pos:
        verdict = E.EINVAL
    if verdict or not n or (at and pos < 0):
        return -1  # the general path: first checks, zero-length calls, a negative offset
        # (os.preadv may reach preadv2, where -1 means the current position)
    if read:
        buf = out[:n]
        return os.preadv(fd, (buf,), pos) if at else os.readv(fd, (buf,))
    data = data if len(data) == n else data[:n]
    return os.pwrite(fd, data, pos) if at else os.write(fd, data)


def _use(tables: Tables, client: bytes, nbytes: int) -> FdTable:
    """``Tables.use``'s entry without the generator (a few µs per call on this path)."""
    with tables._lock:
        table = tables._table(client)
        if table.inflight + nbytes > table.max_inflight:
            raise OSError(E.ENOBUFS, "too many bytes in flight for this client")
        if tables.inflight + nbytes > tables.max_total_inflight:
            raise OSError(E.ENOBUFS, "too many bytes in flight for all clients")
        table.inflight += nbytes
        tables.inflight += nbytes
        table.busy += 1
        table.last_ns = time.monotonic_ns()
    return table


def _unuse(tables: Tables, table: FdTable, nbytes: int) -> None:
    """``Tables.use``'s exit (see ``_use``)."""
    with tables._lock:
        table.inflight -= nbytes
        tables.inflight -= nbytes
        table.busy -= 1
        table.last_ns = time.monotonic_ns()
        close_now = table.dead and table.busy == 0
    if close_now:
        table.close_all()


def _serve_data(
    ex: Executor, client: bytes, call, out: memoryview
) -> tuple[int, int, int, int] | None:
    """Execute one parsed data call: ``(ret, errno, output arg, output bytes)``, the
    output at ``out[RESULT_ROOM:]``; None where ``execute`` must answer it."""
    _id, nr, name, args, data = call
    if name == "newfstatat" and (data is None or len(data) or not args[3] & AT_EMPTY_PATH):
        return None
    # out_size(nr, args) for these calls: a read's capacity, else 4096
    need = (len(data) if data is not None else 0) + (min(args[2], MAX) if name in _READS else 4096)
    tables = ex.tables
    try:
        table = _use(tables, client, need)
        try:
            fd = table.get(as_fd(args[0]))
            if name == "lseek":
                return os.lseek(fd, _s(args[1]), args[2] & 0xFFFFFFFF), 0, 0, 0
            if name in ("fstat", "newfstatat"):
                st = _raw_out(NR["fstat"], STAT_SIZE, fd)
                out[RESULT_ROOM : RESULT_ROOM + STAT_SIZE] = st
                return 0, 0, 1 if name == "fstat" else 2, STAT_SIZE
            got = _fast_transfer(
                fd, name, args, data if name not in _READS else None, out[RESULT_ROOM:]
            )  # fmt: skip
            if got < 0:
                return None
            return got, 0, 1 if name in _READS else 0, got if name in _READS else 0
        finally:
            _unuse(tables, table, need)
    except OSError as exc:
        err = exc.errno if exc.errno and 0 < exc.errno < 4096 else E.EIO
        return -err, err, 0, 0
    except (ValueError, OverflowError):
        return -E.EINVAL, E.EINVAL, 0, 0


def serve_data(ex: Executor, client: bytes, frame: memoryview, out: memoryview,
               t_recv: int) -> int | None:  # fmt: skip
    """Answer ``frame`` if it is a fixed-width offload data CALL: the RESULT (stamps
    from ``t_recv``) is packed at ``out[0:]`` and its length returned; None: not
    one (``out`` untouched), the general path answers it.  ``out`` has room for
    ``RESULT_ROOM + syscalls.MAX_BUFFER`` bytes."""
    call = parse_data_call(frame)
    if call is None:
        return None
    mono = time.monotonic_ns
    t_exec_start = mono()
    done = _serve_data(ex, client, call, out)
    if done is None:
        return None
    ret, err, arg, nout = done
    t_exec_end = mono()
    head = _RESULT_HEAD.size
    _RESULT_HEAD.pack_into(out, 0, _RESULT_PREFIX, 0xCF, call[0], 0xD3, ret, 0xCD, err, 0x94,
                           0xCF, t_recv, 0xCF, t_exec_start, 0xCF, t_exec_end, 0xCF, mono(),
                           0x91 if arg else 0x90)  # fmt: skip
    if not arg:
        return head
    _OUT_HEAD.pack_into(out, head, 0x92, arg, 0xC6, nout)  # the output follows it
    return RESULT_ROOM + nout
