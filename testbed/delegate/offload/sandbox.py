"""Path resolution confined beneath the delegate's offload root.

Every path an offloaded call names is resolved with ``openat2(2)`` and
``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` against a directory fd of the
root: ``..`` above the root, absolute symlinks, relative symlinks that climb
out and magic links (``/proc/self/root``, ``/proc/PID/fd/N``) all fail with
``EXDEV`` / ``ELOOP`` inside the kernel, with no check-then-use race.

Calls that act on a directory *entry* (unlink, mkdir, rename, link, symlink,
readlink, lstat, anything with ``AT_SYMLINK_NOFOLLOW``) resolve the *parent*
that way and then act on one final name that contains no ``/`` and is not
``.`` or ``..``: a single name inside a confined directory cannot escape.
Calls that follow the final symlink open it with ``O_PATH`` through
``openat2`` and act on that fd.

**Names reach the kernel only as** :class:`CName`, made by :func:`cname`
alone: the bytes the checks above looked at, NUL-terminated, refused if they
hold a NUL themselves.  The kernel reads a name up to its first NUL, so
``b"..\\0x"`` checked as one odd name would be *executed* as ``..`` (the
escape of issue 19); a real program cannot even express such a name.  The
functions that enter the kernel with a name (:func:`openat2`,
:func:`readlink`, ``execute._sys``) accept nothing else.

All functions raise ``OSError`` with the errno the caller should see.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import struct

NR_OPENAT2 = 437
NR_READLINKAT = 267
AT_FDCWD = -100
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RESOLVE_CACHED = 0x20
CONFINE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
PATH_MAX = 4096

_OPEN_HOW = struct.Struct("<QQQ")  # flags, mode, resolve
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class CName(bytes):
    """A name exactly as the kernel will read it: NUL-terminated, no NUL inside.

    Only :func:`cname` makes one; the kernel entry points refuse plain bytes.
    """

    __slots__ = ()

    @property
    def text(self) -> bytes:
        """The name without its terminating NUL (what was checked)."""
        return bytes(self[:-1])


def cname(name: bytes) -> CName:
    """The C string the kernel will read for the (wire) name ``name``.

    A NUL inside is refused with ``EINVAL``: the kernel would stop there and
    act on a prefix nobody checked (``..\\0`` is ``..``).  Truncating as the
    kernel does would execute a name other than the one the client sent and
    the sandbox checked; no relay sends one (it reads the program's string up
    to its NUL), so only a client that does not speak for a real program can,
    and EINVAL is the kernel's answer to an argument it cannot accept (Python's
    ``os`` layer refuses an embedded NUL the same way).  Length limits
    (``ENAMETOOLONG``) are left to the kernel, which sees exactly these bytes.
    """
    if not isinstance(name, bytes):
        raise TypeError(f"a name is bytes, not {type(name).__name__}")
    if b"\0" in name:
        raise OSError(E.EINVAL, "name contains a NUL byte")
    return CName(name + b"\0")


def fd_path(fd: int) -> CName:
    """``/proc/self/fd/N`` of one of the delegate's own fds, as a kernel name."""
    return cname(b"/proc/self/fd/%d" % fd)


def _kname(name: object) -> CName:
    if not isinstance(name, CName):
        raise TypeError("names reach the kernel only through sandbox.cname()")
    return name


def openat2(dirfd: int, path: CName, flags: int, mode: int = 0, resolve: int = CONFINE) -> int:
    """``openat2(dirfd, path, {flags | O_CLOEXEC, mode, resolve})`` -> fd."""
    how = ctypes.create_string_buffer(_OPEN_HOW.pack(flags | os.O_CLOEXEC, mode, resolve))
    fd = _libc.syscall(
        ctypes.c_long(NR_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(_kname(path)),
        how, ctypes.c_long(_OPEN_HOW.size),
    )  # fmt: skip
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def readlink(dirfd: int, path: CName, size: int = PATH_MAX) -> bytes:
    """``readlinkat(dirfd, path)`` -> the link's bytes (at most ``size``)."""
    buf = ctypes.create_string_buffer(max(size, 1))
    got = _libc.syscall(
        ctypes.c_long(NR_READLINKAT), ctypes.c_long(dirfd), ctypes.c_char_p(_kname(path)),
        buf, ctypes.c_long(size),
    )  # fmt: skip
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return buf.raw[:got]


#: What the last component of a path is (the kernel's ``LAST_*``).
LAST_NORM, LAST_DOT, LAST_DOTDOT, LAST_ROOT = range(4)


def split_parent(path: bytes) -> tuple[bytes, bytes, int, bool]:
    """``(parent, name, kind, slash)`` of a path, as the kernel splits it.

    ``name`` is one component without ``/``; ``kind`` says whether it is a plain
    name (``LAST_NORM``, the only kind an entry call may act on), ``.``, ``..``
    or nothing (``/``); ``slash``: trailing slashes followed it (the kernel then
    wants a directory).  An empty path is ENOENT.  The parent of an absolute
    name stays absolute (``/x`` -> ``/``), so the confined resolution refuses it
    as it refuses every absolute path.
    """
    if not path:
        raise OSError(E.ENOENT, "empty path")
    stripped = path.rstrip(b"/")
    if not stripped:
        return b"/", b"", LAST_ROOT, True
    parent, _, name = stripped.rpartition(b"/")
    if not parent and stripped.startswith(b"/"):
        parent = b"/"
    kind = LAST_DOT if name == b"." else LAST_DOTDOT if name == b".." else LAST_NORM
    return (parent or b"."), name, kind, len(stripped) != len(path)


class Sandbox:
    """One offload root.  ``base`` arguments are real fds of directories beneath it."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self.rootfd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.rootfd >= 0:
            os.close(self.rootfd)
            self.rootfd = -1

    # ------------------------------------------------------------ resolution
    def rel_of(self, fd: int) -> bytes:
        """Root-relative path of an fd beneath the root (as it is named now)."""
        try:
            target = readlink(AT_FDCWD, fd_path(fd))
        except OSError:
            raise OSError(E.EBADF, "fd vanished") from None
        root = os.fsencode(self.root)
        if target == root:
            return b"."
        if not target.startswith(root + b"/") or target.endswith(b" (deleted)"):
            raise OSError(E.ENOENT, "directory no longer beneath the root")
        return target[len(root) + 1 :]

    def _join(self, base: int | None, path: bytes) -> bytes:
        if not path:
            raise OSError(E.ENOENT, "empty path")
        if path.startswith(b"/"):
            return path  # openat2 with RESOLVE_BENEATH refuses it (EXDEV)
        if base is None:
            return path
        return self.rel_of(base) + b"/" + path

    def open(
        self, base: int | None, path: bytes, flags: int, mode: int = 0, resolve: int = 0
    ) -> int:
        """Open ``path`` (relative to root, or to directory fd ``base``) confined."""
        name = cname(path)  # refused before anything else is looked at
        return openat2(self.rootfd, cname(self._join(base, name.text)), flags, mode,
                       resolve | CONFINE)  # fmt: skip

    def parent(self, base: int | None, path: bytes) -> tuple[int, CName, int, bool]:
        """``(O_PATH fd of the parent directory, final name, kind, slash)``
        (:func:`split_parent`); the caller closes the fd and must refuse to act on
        an entry whose kind is not ``LAST_NORM`` (``.``, ``..``, the root)."""
        parent, name, kind, slash = split_parent(self._join(base, cname(path).text))
        final = cname(name)
        fd = openat2(self.rootfd, cname(parent), os.O_PATH | os.O_DIRECTORY)
        return fd, final, kind, slash

    def opath(self, base: int | None, path: bytes, follow: bool = True) -> int:
        """An ``O_PATH`` fd of the object ``path`` names (following a final symlink or not)."""
        flags = os.O_PATH | (0 if follow else os.O_NOFOLLOW)
        return self.open(base, path, flags)
