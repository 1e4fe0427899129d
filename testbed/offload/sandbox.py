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

All functions raise ``OSError`` with the errno the caller should see.
"""

from __future__ import annotations

import ctypes
import errno as E
import os
import struct

NR_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10
RESOLVE_CACHED = 0x20
CONFINE = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS

_OPEN_HOW = struct.Struct("<QQQ")  # flags, mode, resolve
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def openat2(dirfd: int, path: bytes, flags: int, mode: int = 0, resolve: int = CONFINE) -> int:
    """``openat2(dirfd, path, {flags | O_CLOEXEC, mode, resolve})`` -> fd."""
    how = ctypes.create_string_buffer(_OPEN_HOW.pack(flags | os.O_CLOEXEC, mode, resolve))
    fd = _libc.syscall(
        ctypes.c_long(NR_OPENAT2), ctypes.c_long(dirfd), ctypes.c_char_p(path),
        how, ctypes.c_long(_OPEN_HOW.size),
    )  # fmt: skip
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def split_parent(path: bytes) -> tuple[bytes, bytes]:
    """(``parent``, ``name``) of a relative path; ``name`` is one plain component.

    Raises EINVAL for a final ``.``/``..`` (or an empty path: ENOENT).
    """
    stripped = path.rstrip(b"/")
    if not stripped:
        raise OSError(E.ENOENT if not path else E.EBUSY, "no entry name")
    parent, _, name = stripped.rpartition(b"/")
    if name in (b".", b".."):
        raise OSError(E.EINVAL, "entry name is . or ..")
    return (parent or b"."), name


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
            target = os.readlink(f"/proc/self/fd/{fd}").encode()
        except OSError:
            raise OSError(E.EBADF, "fd vanished") from None
        root = self.root.encode()
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
        return openat2(self.rootfd, self._join(base, path), flags, mode, resolve | CONFINE)

    def parent(self, base: int | None, path: bytes) -> tuple[int, bytes]:
        """(O_PATH fd of the parent directory, final name); caller closes the fd."""
        parent, name = split_parent(self._join(base, path))
        fd = openat2(self.rootfd, parent, os.O_PATH | os.O_DIRECTORY)
        return fd, name

    def opath(self, base: int | None, path: bytes, follow: bool = True) -> int:
        """An ``O_PATH`` fd of the object ``path`` names (following a final symlink or not)."""
        flags = os.O_PATH | (0 if follow else os.O_NOFOLLOW)
        return self.open(base, path, flags)
