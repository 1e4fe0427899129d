"""The delegate side of offload mode: execute one call for one client.

``Executor.execute(client, call)`` runs an offload-mode ``wire.Call`` and
returns ``(ret, errno, outbufs)``.  The call's layout (``docs/offload.md``):
fd arguments are the client's *handles* (``fdtable``), ``AT_FDCWD`` means the
root, every path travels in ``bufs`` at its argument index, relative to the
root (or to a directory handle), input data at the buffer's argument index
(vectors flattened, total length in ``args[2]``) and output lengths in the
call's own length arguments (capped at ``syscalls.MAX_BUFFER``).  Output
buffers come back at their argument index.  Paths are resolved only through
:class:`~testbed.offload.sandbox.Sandbox`.
"""

from __future__ import annotations

import ctypes
import errno as E
import fcntl
import os
import stat
import struct
from collections.abc import Callable

from testbed import syscalls, wire
from testbed.offload.calls import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_REMOVEDIR,
    AT_SYMLINK_FOLLOW,
    AT_SYMLINK_NOFOLLOW,
    FLOCK_SIZE,
    STAT_SIZE,
    STATFS_SIZE,
    STATX_SIZE,
    as_fd,
)
from testbed.offload.fdtable import IDLE_S, MAX_FDS, MAX_INFLIGHT_BYTES, FdTable, Tables
from testbed.offload.sandbox import Sandbox

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


def _sys(nr: int, *args: int | bytes | ctypes.Array) -> int:
    """A raw system call at the delegate; OSError on failure."""
    conv = [a if isinstance(a, ctypes.Array | bytes) else ctypes.c_long(a) for a in args]
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
            try:
                handle = int(p[1:])
            except ValueError:
                raise OSError(E.EINVAL, "bad handle path") from None
            return self.box.rel_of(self.table.get(handle))
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
    fd = c.box.open(base, path, flags, mode, resolve)
    return c.table.add(fd), ()


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
    fd = c.box.open(c.base(0), c.path(1), flags, mode, resolve)
    return c.table.add(fd), ()


def x_close(c: Ctx) -> Result:
    c.table.close(as_fd(c.args[0]))
    return 0, ()


# ---------------------------------------------------------------- data


def x_read(c: Ctx) -> Result:
    data = os.read(c.fd(0), c.n(2))
    return len(data), ((1, data),)


def x_pread64(c: Ctx) -> Result:
    data = os.pread(c.fd(0), c.n(2), _s(c.args[3]))
    return len(data), ((1, data),)


def _preadv(c: Ctx, offset: int, flags: int = 0) -> Result:
    fd, n = c.fd(0), c.n(2)
    if flags:
        buf = bytearray(n)
        got = os.preadv(fd, [buf], offset, flags)
        data = bytes(buf[:got])
    else:
        data = os.read(fd, n) if offset == -1 else os.pread(fd, n, offset)
    return len(data), ((1, data),)


def x_readv(c: Ctx) -> Result:
    return _preadv(c, -1)


def x_preadv(c: Ctx) -> Result:
    return _preadv(c, _s(c.args[3]))


def x_preadv2(c: Ctx) -> Result:
    return _preadv(c, _s(c.args[3]), as_fd(c.args[5]) & 0xFFFFFFFF)


def _data(c: Ctx) -> bytes:
    return c.bufs.get(1, b"")


def x_write(c: Ctx) -> Result:
    return os.write(c.fd(0), _data(c)), ()


def x_pwrite64(c: Ctx) -> Result:
    return os.pwrite(c.fd(0), _data(c), _s(c.args[3])), ()


def x_writev(c: Ctx) -> Result:
    return os.write(c.fd(0), _data(c)), ()


def x_pwritev(c: Ctx) -> Result:
    return os.pwrite(c.fd(0), _data(c), _s(c.args[3])), ()


def x_pwritev2(c: Ctx) -> Result:
    off, flags = _s(c.args[3]), c.args[5] & 0xFFFFFFFF
    if flags:
        return os.pwritev(c.fd(0), [_data(c)], off, flags), ()
    return (os.write(c.fd(0), _data(c)) if off == -1 else os.pwrite(c.fd(0), _data(c), off)), ()


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
        return fcntl.fcntl(fd, cmd, arg & 0xFFFFFFFF if cmd == fcntl.F_SETFL else 0), ()
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
            (4, _raw_out(NR["statx"], STATX_SIZE, c.fd(0), b"\0", AT_EMPTY_PATH | sync, mask)),
        )
    with _opath(c, c.base(0), path, not flags & AT_SYMLINK_NOFOLLOW) as fd:
        out = _raw_out(NR["statx"], STATX_SIZE, fd, b"\0", AT_EMPTY_PATH | sync, mask)
    return 0, ((4, out),)


def x_statfs(c: Ctx) -> Result:
    with _opath(c, None, c.path(0), True) as fd:
        return 0, ((1, _raw_out(NR["fstatfs"], STATFS_SIZE, fd)),)


def _access(c: Ctx, base: int | None, path: bytes, mode: int, flags: int) -> Result:
    with _opath(c, base, path, not flags & AT_SYMLINK_NOFOLLOW) as fd:
        eff = bool(flags & 0x200)  # AT_EACCESS
        ok = os.access(f"/proc/self/fd/{fd}", mode & 7, effective_ids=eff)
    if not ok:
        raise OSError(E.EACCES, "access denied")
    return 0, ()


def x_access(c: Ctx) -> Result:
    return _access(c, None, c.path(0), c.args[1], 0)


def x_faccessat(c: Ctx) -> Result:
    return _access(c, c.base(0), c.path(1), c.args[2], 0)


def x_faccessat2(c: Ctx) -> Result:
    return _access(c, c.base(0), c.path(1), c.args[2], c.args[3])


def _unlink(c: Ctx, base: int | None, path: bytes, flags: int) -> Result:
    pfd, name = c.box.parent(base, path)
    with _Tmp(pfd):
        if flags & AT_REMOVEDIR:
            os.rmdir(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
    return 0, ()


def x_unlink(c: Ctx) -> Result:
    return _unlink(c, None, c.path(0), 0)


def x_unlinkat(c: Ctx) -> Result:
    return _unlink(c, c.base(0), c.path(1), c.args[2])


def x_rmdir(c: Ctx) -> Result:
    return _unlink(c, None, c.path(0), AT_REMOVEDIR)


def _mkdir(c: Ctx, base: int | None, path: bytes, mode: int) -> Result:
    try:
        pfd, name = c.box.parent(base, path)
    except OSError as exc:
        if exc.errno in (E.EINVAL, E.EBUSY):  # mkdir of ".", ".." or the root: exists
            raise OSError(E.EEXIST, "exists") from None
        raise
    with _Tmp(pfd):
        os.mkdir(name, mode & 0o7777, dir_fd=pfd)
    return 0, ()


def x_mkdir(c: Ctx) -> Result:
    return _mkdir(c, None, c.path(0), c.args[1])


def x_mkdirat(c: Ctx) -> Result:
    return _mkdir(c, c.base(0), c.path(1), c.args[2])


def _rename(c: Ctx, ob: int | None, op: bytes, nb: int | None, np: bytes, flags: int) -> Result:
    opfd, oname = c.box.parent(ob, op)
    with _Tmp(opfd):
        npfd, nname = c.box.parent(nb, np)
        with _Tmp(npfd):
            _sys(NR["renameat2"], opfd, oname + b"\0", npfd, nname + b"\0", flags)
    return 0, ()


def x_rename(c: Ctx) -> Result:
    return _rename(c, None, c.path(0), None, c.path(1), 0)


def x_renameat(c: Ctx) -> Result:
    return _rename(c, c.base(0), c.path(1), c.base(2), c.path(3), 0)


def x_renameat2(c: Ctx) -> Result:
    return _rename(c, c.base(0), c.path(1), c.base(2), c.path(3), c.args[4] & 0xFFFFFFFF)


def _link(c: Ctx, ob: int | None, op: bytes, nb: int | None, np: bytes, flags: int) -> Result:
    npfd, nname = c.box.parent(nb, np)
    with _Tmp(npfd):
        if flags & AT_SYMLINK_FOLLOW:
            with _opath(c, ob, op, True) as fd:
                os.link(f"/proc/self/fd/{fd}", nname, dst_dir_fd=npfd, follow_symlinks=True)
        else:
            opfd, oname = c.box.parent(ob, op)
            with _Tmp(opfd):
                os.link(oname, nname, src_dir_fd=opfd, dst_dir_fd=npfd, follow_symlinks=False)
    return 0, ()


def x_link(c: Ctx) -> Result:
    return _link(c, None, c.path(0), None, c.path(1), 0)


def x_linkat(c: Ctx) -> Result:
    return _link(c, c.base(0), c.path(1), c.base(2), c.path(3), c.args[4])


def _symlink(c: Ctx, target: bytes, base: int | None, path: bytes) -> Result:
    pfd, name = c.box.parent(base, path)
    with _Tmp(pfd):
        os.symlink(target, name, dir_fd=pfd)
    return 0, ()


def x_symlink(c: Ctx) -> Result:
    return _symlink(c, c.path(0), None, c.path(1))


def x_symlinkat(c: Ctx) -> Result:
    return _symlink(c, c.path(0), c.base(1), c.path(2))


def _readlink(c: Ctx, base: int | None, path: bytes, arg: int, size: int) -> Result:
    with _opath(c, base, path, False) as fd:
        buf = ctypes.create_string_buffer(max(size, 1))
        got = _sys(NR["readlinkat"], fd, b"\0", buf, size)
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
        os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)
    return 0, ()


def x_chmod(c: Ctx) -> Result:
    return _chmod(c, None, c.path(0), c.args[1], 0)


def x_fchmodat(c: Ctx) -> Result:
    return _chmod(c, c.base(0), c.path(1), c.args[2], 0)


def _chown(c: Ctx, base: int | None, path: bytes, uid: int, gid: int, follow: bool) -> Result:
    with _opath(c, base, path, follow) as fd:
        _sys(NR["fchownat"], fd, b"\0", _u32s(uid), _u32s(gid), AT_EMPTY_PATH)
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
    tbuf = ctypes.create_string_buffer(times, len(times)) if times else None
    targs = (tbuf,) if tbuf is not None else (0,)
    flags = c.args[3] & 0xFFFFFFFF
    path = c.bufs.get(1)
    if path is None:  # futimens(fd, times)
        _sys(NR["utimensat"], c.fd(0), 0, *targs, 0)
        return 0, ()
    if flags & AT_SYMLINK_NOFOLLOW:
        pfd, name = c.box.parent(c.base(0), path)
        with _Tmp(pfd):
            _sys(NR["utimensat"], pfd, name + b"\0", *targs, AT_SYMLINK_NOFOLLOW)
        return 0, ()
    with _opath(c, c.base(0), path, True) as fd:
        _sys(NR["utimensat"], AT_FDCWD, f"/proc/self/fd/{fd}\0".encode(), *targs, 0)
    return 0, ()


def x_chdir(c: Ctx) -> Result:
    with _Tmp(c.box.open(None, c.path(0), os.O_PATH | os.O_DIRECTORY)) as fd:
        if not os.access(f"/proc/self/fd/{fd}", os.X_OK):
            raise OSError(E.EACCES, "no search permission")
    return 0, ()


EXECUTORS: dict[int, Callable[[Ctx], Result]] = {
    NR[name.removeprefix("x_")]: fn
    for name, fn in list(globals().items())
    if name.startswith("x_") and name.removeprefix("x_") in NR
}


def out_size(nr: int, args: tuple[int, ...]) -> int:
    """Bytes of output a call may return (for the in-flight budget)."""
    name = syscalls.name_of(nr)
    if name in ("read", "pread64", "readv", "preadv", "preadv2", "getdents64"):
        return min(args[2], MAX)
    return 4096


class Executor:
    """Executes offload-mode calls beneath ``root`` for many isolated clients."""

    def __init__(
        self,
        root: str,
        max_fds: int = MAX_FDS,
        max_inflight: int = MAX_INFLIGHT_BYTES,
        idle_s: float = IDLE_S,
    ):
        self.box = Sandbox(root)
        self.tables = Tables(max_fds, max_inflight, idle_s)

    def execute(self, client: bytes, call: wire.Call) -> tuple[int, int, tuple]:
        fn = EXECUTORS.get(call.nr)
        if fn is None:
            return -E.ENOSYS, E.ENOSYS, ()
        table = self.tables.of(client)
        need = sum(len(b) for _a, b in call.bufs) + out_size(call.nr, call.args)
        try:
            with table.budget(need):
                ret, outs = fn(Ctx(self.box, table, call.args, dict(call.bufs)))
        except OSError as exc:
            err = exc.errno if exc.errno and 0 < exc.errno < 4096 else E.EIO
            return -err, err, ()
        return ret, 0, outs

    def forget(self, client: bytes) -> None:
        self.tables.forget(client)

    def close(self) -> None:
        self.tables.close()
        self.box.close()
