"""The relay side of offload mode.

:class:`OffloadRelay` serves the same event loop as :class:`testbed.compute.relay.Relay`
but decides, call by call, whether the call is offloaded:

* a path at or under an ``--offload-path PREFIX`` (relative paths joined to the
  caller's cwd, read from ``/proc/TID/cwd``, or to a local dirfd, read from
  ``/proc/TID/fd/N``) is sent to the delegate with the path made relative to
  the delegate's root;
* an fd argument that is a *placeholder* is sent with the delegate's handle;
* everything else continues locally (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``).

**Placeholders.**  A successful remote open installs, with
``SECCOMP_IOCTL_NOTIF_ADDFD`` (``SECCOMP_ADDFD_FLAG_SEND``, so the new fd
number is the call's return value), the write end of a fresh pipe whose read
end only the relay holds.  The pipe's inode names the remote handle.  The
kernel then does everything fd tables do by itself: ``dup``/``dup2``/``dup3``/
``fcntl(F_DUPFD)`` share the placeholder, ``fork`` copies it,
``clone(CLONE_FILES)`` shares it, ``execve`` closes it if ``O_CLOEXEC`` was
asked for, ``close``/``close_range``/``exit`` drop references.  When the last
reference is gone the relay's read end reports ``POLLHUP`` and the relay closes
the remote fd.  Local fds and placeholders never collide because a placeholder
*is* a real local fd.

**Results.**  Output buffers are written into the caller with
``process_vm_writev`` after ``SECCOMP_IOCTL_NOTIF_ID_VALID`` confirmed the
caller is still waiting in that call.  A call the delegate did not confirm
(timeout, error frame, delegate lost) returns ``EIO``; after the first
unconfirmed call every later offloaded call fails with ``EIO`` too (the
delegate's fd state is unknown), local calls go on.

**Buffers and iovecs as the kernel reads them.**  Whether a data call's
buffer or iovec array is acceptable (``EFAULT``, ``EINVAL``, the total after
the kernel's cap) is asked of the relay's own kernel: the same ``read``,
``write`` or ``writev`` on ``/dev/null``, which validates addresses and
lengths exactly as for the program and never touches the memory
(:class:`_Probe`).  The answer travels in ``args[1]`` (``execute.py``), so the
checks the kernel makes earlier (a write to a read-only fd) still win.  Data
is read from and written to the caller with ``process_vm_readv``/``writev``:
what the program itself could not read or write (a hole, a ``PROT_NONE``
page) ends a transfer short there, as natively, and a read that lands short
moves the remote offset back by the bytes that did not land.

**Replies are checked before they touch the program** (:meth:`_invalid`):
``ret`` within the bytes asked for, output buffers only where the call has
them, of the right size and consistent with ``ret``, an errno only as
``ret == -errno`` in 1..4095.  Anything else fails that call with ``EIO``
(one throttled warning line; ``run.json`` ``offload.bad_replies``).
"""

from __future__ import annotations

import ctypes
import errno as E
import fcntl as F
import os
import re
import resource
import select
import signal
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from testbed.compute.interpose import CallerGone, Trap
from testbed.compute.interpose.seccomp import pidfd_getfd
from testbed.compute.relay import Relay
from testbed.compute.spec import norm_prefix
from testbed.core import rundir, syscalls, wire
from testbed.core.errors import TestbedError
from testbed.core.offload_calls import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    COPY_MAX,
    EXECS,
    OFFLOADED,
    REFUSED,
    REFUSED_FDS,
    REFUSED_PATHS,
    Iovec,
    Spec,
    as_fd,
)

MAX = syscalls.MAX_BUFFER
NR = syscalls.NR_BY_NAME
NAME = syscalls.NAME_BY_NR
U64 = (1 << 64) - 1
_IOVEC = struct.Struct("<QQ")
IOV_MAX = 1024
LOCK_RETRY_NS = 2_000_000  # a blocking lock request is retried this often
OPEN_NAMES = frozenset(("open", "creat", "openat", "openat2"))
LOCAL_FCNTL = frozenset((F.F_GETFD, F.F_SETFD, F.F_DUPFD, F.F_DUPFD_CLOEXEC))
LOCK_FCNTL = frozenset((5, 6, 7, 36, 37, 38))  # F_GETLK.. F_SETLKW, F_OFD_*
BLOCKING_FCNTL = frozenset((7, 38))  # F_SETLKW, F_OFD_SETLKW

# seccomp ADDFD (linux/seccomp.h): struct seccomp_notif_addfd {u64 id; u32 flags,
# srcfd, newfd, newfd_flags}; _IOW('!', 3, ...)
_ADDFD = struct.Struct("<QIIII")
IOCTL_NOTIF_ADDFD = (1 << 30) | (_ADDFD.size << 16) | (ord("!") << 8) | 3
ADDFD_FLAG_SETFD = 1
ADDFD_FLAG_SEND = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_PROCESS_VM_READV = 310
NR_PROCESS_VM_WRITEV = 311
SEEK_CUR = 1
I32_MAX = (1 << 31) - 1
#: the data calls (buffers checked by the relay's kernel, ``args[1]`` = its errno)
READS = frozenset(("read", "pread64", "readv", "preadv", "preadv2"))
WRITES = frozenset(("write", "pwrite64", "writev", "pwritev", "pwritev2"))
VECTORS = frozenset(("readv", "preadv", "preadv2", "writev", "pwritev", "pwritev2"))
#: calls whose success value is not 0 (others must answer exactly 0)
COUNTING = READS | WRITES | {"getdents64", "readlink", "readlinkat", "copy_file_range"}
#: one warning line per kind at most this often (seconds)
WARN_INTERVAL_S = 10.0


class OffloadError(TestbedError):
    pass


def write_memory(pid: int, chunks: list[tuple[int, bytes]]) -> bool:
    """``process_vm_writev`` the ``(address, bytes)`` chunks into ``pid``; True if all landed."""
    return write_memory_count(pid, chunks) == sum(len(b) for _a, b in chunks)


def write_memory_count(pid: int, chunks: list[tuple[int, bytes]]) -> int:
    """``process_vm_writev`` the chunks in order; the bytes that landed before the
    first one the program could not write (a hole, a read-only page)."""
    chunks = [(a, b) for a, b in chunks if b]
    landed = 0
    for i in range(0, len(chunks), IOV_MAX):
        part = chunks[i : i + IOV_MAX]
        n = len(part)
        bufs = [ctypes.create_string_buffer(b, len(b)) for _a, b in part]
        local = (Iovec * n)(
            *[Iovec(ctypes.addressof(buf), len(b)) for buf, (_a, b) in zip(bufs, part, strict=True)]
        )
        remote = (Iovec * n)(*[Iovec(a, len(b)) for a, b in part])
        total = sum(len(b) for _a, b in part)
        got = _libc.syscall(
            ctypes.c_long(NR_PROCESS_VM_WRITEV), ctypes.c_long(pid), local, ctypes.c_ulong(n),
            remote, ctypes.c_ulong(n), ctypes.c_ulong(0),
        )  # fmt: skip
        landed += max(got, 0)
        if got != total:
            break
    return landed


def read_memory_segments(pid: int, segs: list[tuple[int, int]]) -> bytes | None:
    """``process_vm_readv`` the ``(address, length)`` segments of ``pid`` in order: the
    bytes up to the first the program itself could not read (a hole, ``PROT_NONE``).

    None if the call is not permitted here (the caller falls back to
    ``/proc/PID/mem``); raises :class:`CallerGone` if the task is gone.
    """
    segs = [(a, n) for a, n in segs if n > 0]
    total = sum(n for _a, n in segs)
    if not segs:
        return b""
    buf = ctypes.create_string_buffer(total)
    local = (Iovec * 1)(Iovec(ctypes.addressof(buf), total))
    done = 0
    for i in range(0, len(segs), IOV_MAX):
        part = segs[i : i + IOV_MAX]
        want = sum(n for _a, n in part)
        local[0] = Iovec(ctypes.addressof(buf) + done, want)
        remote = (Iovec * len(part))(*[Iovec(a, n) for a, n in part])
        got = _libc.syscall(
            ctypes.c_long(NR_PROCESS_VM_READV), ctypes.c_long(pid), local, ctypes.c_ulong(1),
            remote, ctypes.c_ulong(len(part)), ctypes.c_ulong(0),
        )  # fmt: skip
        if got < 0:
            err = ctypes.get_errno()
            if err == E.ESRCH:
                raise CallerGone(pid)
            if err == E.EFAULT:
                break
            if done == 0:
                return None  # EPERM, ENOSYS...: not usable here
            break
        done += got
        if got != want:
            break
    return buf.raw[:done]


class _Probe:
    """``/dev/null``, on which the relay's kernel judges a caller's buffer or iovec
    array exactly as the program's kernel would (``access_ok``, ``UIO_MAXIOV``,
    negative lengths, the ``MAX_RW_COUNT`` cap) without touching the memory."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)

    def _call(self, nr: int, addr: int | ctypes.Array, count: int) -> int:
        ptr = addr if isinstance(addr, ctypes.Array) else ctypes.c_ulong(addr & U64)
        ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(self.fd), ptr,
                            ctypes.c_ulong(count & U64))  # fmt: skip
        return ret if ret >= 0 else -(ctypes.get_errno() or E.EINVAL)

    def buffer(self, addr: int, count: int, write: bool) -> int:
        """0, or the errno a ``read``/``write`` of ``count`` bytes at ``addr`` gets."""
        ret = self._call(NR["write" if write else "read"], addr, count)
        return -ret if ret < 0 else 0

    def iovecs(self, array: bytes, count: int) -> int:
        """The total ``writev`` with these iovecs moves (after the kernel's cap), or -errno."""
        arr = ctypes.create_string_buffer(array, max(len(array), 1))
        return self._call(NR["writev"], arr, count)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _addfd(listener: int, req: bytes) -> int:
    """``SECCOMP_IOCTL_NOTIF_ADDFD`` with the relay's signals blocked.

    A signal (the relay's watchdog, SIGCHLD) that interrupts the ioctl's wait for
    the caller makes the kernel withdraw the request unprocessed; with
    ``SECCOMP_ADDFD_FLAG_SEND`` the notification stays marked answered, so the
    caller's call returns 0 with no fd installed and a retry fails with
    ``EINPROGRESS`` (seen 2 runs in 6 opening 300 files under load).  Blocked,
    signals wait until the ioctl is done.  Only a stop signal, which cannot be
    blocked, can still interrupt it: then the retry below is right without
    ``FLAG_SEND`` and reports ``EINPROGRESS`` with it."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _ALL_SIGNALS)
    try:
        for _ in range(1000):
            try:
                return F.ioctl(listener, IOCTL_NOTIF_ADDFD, req)
            except InterruptedError:
                continue
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    raise OSError(E.EINTR, "SECCOMP_IOCTL_NOTIF_ADDFD interrupted 1000 times")


_ALL_SIGNALS = signal.valid_signals()


def addfd_send(listener: int, notif_id: int, srcfd: int, cloexec: bool) -> int:
    """Install ``srcfd`` in the caller and answer the notification with its number."""
    req = _ADDFD.pack(notif_id, ADDFD_FLAG_SEND, srcfd, 0, os.O_CLOEXEC if cloexec else 0)
    return _addfd(listener, req)


def addfd_at(listener: int, notif_id: int, srcfd: int, newfd: int, cloexec: bool = False) -> None:
    """Install ``srcfd`` in the caller as fd ``newfd`` (replacing what was there, like
    ``dup2``); the notification stays pending."""
    flags = os.O_CLOEXEC if cloexec else 0
    _addfd(listener, _ADDFD.pack(notif_id, ADDFD_FLAG_SETFD, srcfd, newfd, flags))


def cwd_token_fd() -> int:
    """The fd at which a process carries its offloaded working directory: the
    highest below both the soft ``RLIMIT_NOFILE`` and 1024 (so no fd table grows
    for it, and programs that number their own fds from the bottom never meet it)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return min(soft if soft != resource.RLIM_INFINITY else 1024, 1024) - 1


@dataclass
class Pending:
    """What the relay must remember about one offloaded call in flight."""

    name: str
    spec: Spec
    frame: bytes
    nbytes: int
    out_iov: list[tuple[int, int]] = field(default_factory=list)
    cloexec: bool = False
    prefix: str = ""
    new_cwd: str | None = None
    retry_eagain: bool = False
    handle: int = -1  # the remote fd of an fd call
    want: int = 0  # most bytes a read-like call may return / a write-like call was given
    getfl: bool = False  # fcntl(F_GETFL): answers flags
    fetch: MapFetch | None = None  # a chunk of an mmap's range
    behind: bool = False  # a write answered before its reply (write-behind)
    t_answer: int = 0  # when a write-behind call was answered
    oflags: int = 0  # an open's flags (the handle's access mode)
    copy_offs: tuple[int, ...] = ()  # copy_file_range: the offset pointers it was given


@dataclass(frozen=True)
class CwdToken:
    """What a cwd token says: the process's working directory is the offloaded
    ``path``; or, with ``target`` (dev, inode), that it asked to move to that
    local directory and is there exactly if the kernel says its cwd is it."""

    path: str
    target: tuple[int, int] | None = None


@dataclass
class MapFetch:
    """An ``mmap`` of a placeholder in progress: the range is read from the
    delegate into a memfd, chunk by chunk, before the caller maps that memfd."""

    fd: int  # the caller's fd (the placeholder)
    handle: int
    offset: int
    length: int
    memfd: int
    got: int = 0
    t_send: int = 0  # the first chunk's


@dataclass
class Swap:
    """A memfd standing in the caller's fd table where its placeholder was, for
    one ``mmap``; the placeholder (``saved``, the relay's dup of it) goes back at
    that process's next trapped call."""

    tgid: int
    fd: int
    memfd_ino: int
    saved: int
    cloexec: bool


#: mmap(2) flags and protections (asm-generic/mman-common.h, linux/mman.h)
MAP_SHARED, MAP_PRIVATE, MAP_SHARED_VALIDATE, MAP_ANONYMOUS = 0x01, 0x02, 0x03, 0x20
PROT_WRITE = 0x2
PAGE = os.sysconf("SC_PAGE_SIZE")


#: calls that trap only when they would close or replace the cwd token
TOKEN_CALLS = frozenset(("close", "close_range", "dup2", "dup3"))


@dataclass
class WriteBehindStats:
    window: int = 0
    async_writes: int = 0
    async_bytes: int = 0
    peak_bytes: int = 0
    waits: int = 0  # calls that waited for a handle's async writes
    errors: int = 0  # async writes that failed
    reported: int = 0  # errors returned to the program by a later call
    at_exit: list[str] = field(default_factory=list)  # errors no call could report

    def as_dict(self) -> dict[str, Any]:
        return {"window_bytes": self.window, "async_writes": self.async_writes,
                "async_bytes": self.async_bytes, "peak_bytes": self.peak_bytes,
                "waits": self.waits, "errors": self.errors, "reported": self.reported,
                "unreported": self.at_exit}  # fmt: skip


@dataclass
class ReadAheadStats:
    depth: int = 0  # reads in flight ahead of a sequential reader, at most
    active: bool = False  # False: the C path does not serve this run (``why``)
    why: str = ""
    issued: int = 0  # reads sent ahead
    served: int = 0  # program reads answered from them
    wasted: int = 0  # reads sent ahead and not used (given back)
    undone_bytes: int = 0  # their bytes, moved back with lseek
    lseeks: int = 0  # the relay's own lseeks (seekable? and give back)

    def as_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "active": self.active,
                **({"inactive_because": self.why} if not self.active else {}),
                "issued": self.issued, "served": self.served, "wasted": self.wasted,
                "undone_bytes": self.undone_bytes, "lseeks": self.lseeks}  # fmt: skip


@dataclass
class OffloadStats:
    remote: int = 0
    local: int = 0
    eio: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    remote_opens: int = 0
    remote_closes: int = 0
    lock_retries: int = 0
    cross_device: int = 0
    bad_replies: int = 0
    chunked: int = 0  # large reads the C path sent as pipelined chunks

    def as_dict(self) -> dict[str, Any]:
        return {
            "remote_calls": self.remote,
            "local_calls": self.local,
            "eio": self.eio,
            "refused": dict(sorted(self.refused.items())),
            "remote_opens": self.remote_opens,
            "remote_closes": self.remote_closes,
            "lock_retries": self.lock_retries,
            "cross_device": self.cross_device,
            "bad_replies": self.bad_replies,
            "chunked_reads": self.chunked,
        }


class OffloadRelay(Relay):
    """A relay whose offloaded calls execute at the delegate (module docstring)."""

    def __init__(self, backend, sock: zmq.Socket, recorder: rundir.CallRecorder,
                 prefixes: list[str], timeout_s: float = 2.0, busy_poll: bool = False,
                 write_behind: int = 0, read_ahead: int = 0,
                 in_order: bool = False):  # fmt: skip
        if backend.name != "seccomp":
            raise OffloadError("offload mode needs the seccomp backend (ADDFD placeholders)")
        super().__init__(backend, sock, recorder, mode="offload", timeout_s=timeout_s,
                         busy_poll=busy_poll)  # fmt: skip
        self.prefixes = sorted({norm_prefix(p) for p in prefixes}, key=len, reverse=True)
        self.ostats = OffloadStats()
        self.pending: dict[int, Pending] = {}
        self.by_ino: dict[int, int] = {}  # placeholder pipe inode -> remote handle
        self.readers: dict[int, tuple[int, int, str]] = {}  # read-end fd -> (ino, handle, prefix)
        self.handle_prefix: dict[int, str] = {}
        self.hup = select.poll()
        # working directories (docs/offload.md): a process whose cwd is offloaded
        # carries a token fd at cwd_fd, a pipe end whose inode names its cwd here
        self.cwd_fd = cwd_token_fd()
        backend.cwd_fd = self.cwd_fd  # the launcher traps what would close it
        self.cwd_tokens: dict[int, CwdToken] = {}  # token pipe inode -> its meaning
        self.token_readers: dict[int, int] = {}  # relay's read end -> token inode
        self.token_hup = select.poll()
        self.lost_tokens: dict[int, CwdToken] = {}  # tgid -> token its close_range took
        self.swaps: list[Swap] = []  # memfds standing where placeholders were (mmap)
        # write-behind (docs/offload.md): writes answered at once, up to this many bytes
        # in flight; the handle's other calls wait for them; errors surface later
        self.wb_limit = write_behind
        self.wb_bytes = 0
        self.wb_inflight: dict[int, int] = {}  # handle -> async writes in flight
        self.wb_errors: dict[int, int] = {}  # handle -> errno an async write met, not yet told
        self.wb_blocked: dict[int, list[tuple[Trap, int, Pending]]] = {}  # waiting for them
        self.handle_mode: dict[int, int] = {}  # handle -> O_ACCMODE of its open
        self.wb = WriteBehindStats(window=write_behind)
        # read-ahead (docs/offload.md): served by the C path (fastpath.c), counted here
        self.ra = ReadAheadStats(depth=read_ahead, why="the relay's C path does not serve this run")
        #: the delegate runs this connection's calls in order (--workers 1): large reads
        #: may then travel in pipelined chunks
        self.in_order = in_order
        self.tgid: dict[int, int] = {}
        self.retries: list[tuple[int, Trap, int, Pending]] = []  # (due, trap, call_id, pending)
        self.own_calls: set[int] = set()  # call ids of the relay's own closes
        self.lost = False
        self._pipe_dev = self._pipefs_dev()
        self.judge = _Probe()  # not .probe: the base relay's reconnect method
        self._throttle: dict[str, tuple[float, int]] = {}

    @staticmethod
    def _pipefs_dev() -> int:
        r, w = os.pipe()
        try:
            return os.fstat(w).st_dev
        finally:
            os.close(r)
            os.close(w)

    # ------------------------------------------------------------ classification
    def handle_of(self, tid: int, fd: int) -> int | None:
        """The remote handle if ``fd`` of task ``tid`` is a placeholder."""
        if fd < 0 or not self.by_ino:
            return None
        try:
            st = os.stat(f"/proc/{tid}/fd/{fd}")
        except OSError:
            return None
        if st.st_dev != self._pipe_dev or not stat.S_ISFIFO(st.st_mode):
            return None
        return self.by_ino.get(st.st_ino)

    def _tgid_of(self, tid: int) -> int:
        tg = self.tgid.get(tid)
        if tg is None:
            tg = tid
            try:
                with open(f"/proc/{tid}/status") as f:
                    for line in f:
                        if line.startswith("Tgid:"):
                            tg = int(line.split()[1])
                            break
            except OSError:
                pass
            if len(self.tgid) > 65536:
                self.tgid.clear()
            self.tgid[tid] = tg
        return tg

    def _token(self, tid: int) -> CwdToken | None:
        """The cwd token task ``tid`` carries (None: its cwd is its own)."""
        try:
            st = os.stat(f"/proc/{tid}/fd/{self.cwd_fd}")
        except OSError:
            return None  # no such fd (or no such task: its cwd lookup says so)
        if st.st_dev != self._pipe_dev or not stat.S_ISFIFO(st.st_mode):
            return None  # the program's own fd
        return self.cwd_tokens.get(st.st_ino)

    def offloaded_cwd(self, tid: int) -> str | None:
        """Task ``tid``'s working directory if it is offloaded, else None."""
        token = self._token(tid) if self.cwd_tokens else None
        if token is None:
            return None
        if token.target is None:
            return token.path
        try:  # a local chdir was let through: did it happen?
            st = os.stat(f"/proc/{tid}/cwd")
        except OSError:
            raise CallerGone(tid) from None
        return None if (st.st_dev, st.st_ino) == token.target else token.path

    def cwd_of(self, tid: int) -> str:
        """The directory the kernel would resolve ``tid``'s relative paths against."""
        cwd = self.offloaded_cwd(tid)
        if cwd is not None:
            return cwd
        try:
            return os.readlink(f"/proc/{tid}/cwd")
        except OSError:
            raise CallerGone(tid) from None

    def classify(
        self, tid: int, dirfd: int | None, path: bytes
    ) -> tuple[int | None, bytes, str] | None:
        """``(handle or None, root-relative path, prefix)`` if offloaded, else None (local).

        An empty path, or one of ``MAX_PATH`` bytes or more (cut where the relay
        stopped reading), runs locally: the kernel refuses it (ENOENT,
        ENAMETOOLONG) as it reads it, and acts on nothing.
        """
        if not path or len(path) >= syscalls.MAX_PATH:
            return None
        text = os.fsdecode(path)
        magic = _FD_LINK.match(text)
        if magic:  # /proc/self/fd/N of a placeholder names the remote object itself
            pid = tid if magic.group(2) in (None, "self", "thread-self") else int(magic.group(2))
            handle = self.handle_of(pid, int(magic.group(3)))
            if handle is not None:
                return None, b"\0%d" % handle, self.handle_prefix.get(handle, "")
        vcwd = None
        if text.startswith("/"):
            full = text
        elif dirfd is None or dirfd == AT_FDCWD:
            vcwd = self.offloaded_cwd(tid)
            full = (vcwd if vcwd is not None else self.cwd_of(tid)) + "/" + text
        else:
            handle = self.handle_of(tid, dirfd)
            if handle is not None:
                return handle, path, self.handle_prefix.get(handle, "")
            try:
                full = os.readlink(f"/proc/{tid}/fd/{dirfd}") + "/" + text
            except OSError:
                return None  # a bad dirfd: the local call fails as it should
        norm = os.path.normpath(full)
        if norm.startswith("//"):
            norm = norm[1:]
        for prefix in self.prefixes:
            base = "" if prefix == "/" else prefix
            if norm == prefix or norm.startswith(base + "/"):
                return None, os.fsencode(self._rel(full, norm, base, text)), prefix
        if not text.startswith("/") and (dirfd is None or dirfd == AT_FDCWD) and vcwd is not None:
            # the kernel would resolve it against the process's own (local) cwd, not
            # against the offloaded one: refuse rather than act in the wrong place
            self._warn_throttled("leave", f"relative path {text!r} leaves the offloaded "
                                 f"tree from working directory {vcwd}: refused (EXDEV)")  # fmt: skip
            raise _Fault(E.EXDEV)
        return None

    @staticmethod
    def _rel(full: str, norm: str, base: str, text: str) -> str:
        raw = full[len(base) + 1 :] if full.startswith(base + "/") else None
        if raw is not None and not os.path.normpath(raw or ".").startswith(".."):
            return raw or "."  # keep ".." and trailing "/": the delegate resolves them
        rel = norm[len(base) + 1 :] or "."
        return rel + "/" if text.endswith("/") and rel != "." else rel

    # ------------------------------------------------------------ calls
    def _forward(self, trap: Trap) -> None:
        """Offload, refuse or continue one trapped call (the base's on_trap guards it)."""
        name = NAME.get(trap.nr, "")
        try:
            decision = self._decide(trap, name)
        except CallerGone:
            # gone, or its memory cannot be read: where the call belongs is unknown,
            # so it fails (EIO) rather than run locally
            self.stats.unreadable += 1
            self._fail(trap, Pending(name, Spec(), b"", 0), rundir.F_UNREADABLE, 0, 0)
            return
        except _Fault as exc:
            decision = exc.errno
        if decision is _ANSWERED:
            self._last_released = trap
            return
        if decision is None:
            self.ostats.local += 1
            self._last_released = trap
            self.backend.resume_continue(trap)
            return
        if isinstance(decision, int):  # answered here with an errno
            self._last_released = trap
            self.backend.resume_return(trap, -1, decision)
            return
        args, bufs, pending = decision
        if not self.backend.is_valid(trap):  # what we read must still be the caller's (TOCTOU)
            self._last_released = trap
            self.stats.caller_gone += 1
            return
        self.ostats.remote += 1
        if self.lost:
            self._fail(trap, pending, rundir.F_NOT_SENT, 0, 0)
            return
        call_id = self._next_id
        self._next_id += 1
        pending.frame = wire.encode_call(
            wire.Call(call_id, trap.tid, trap.nr, args, bufs, "offload")
        )
        if self.wb_limit and pending.handle >= 0:
            self._gate(trap, call_id, pending, args)
            return
        self._send_pending(trap, call_id, pending)

    def _send_pending(self, trap: Trap, call_id: int, pending: Pending) -> bool:
        """Send the call and put it in flight; False if it could not be sent (EIO)."""
        t_send = time.monotonic_ns()
        try:
            self.sock.send(pending.frame, zmq.NOBLOCK)
        except zmq.Again:
            self._fail(trap, pending, rundir.F_NOT_SENT, 0, 0)
            return False
        self.inflight[call_id] = (trap, t_send, pending.nbytes)
        self.pending[call_id] = pending
        return True

    def _refuse(self, name: str, errno: int | None = None) -> int:
        self.ostats.refused[name] = self.ostats.refused.get(name, 0) + 1
        return REFUSED[name] if errno is None else errno

    def _decide(self, trap: Trap, name: str):
        """None: run locally; an int: fail with that errno; else (args, bufs, Pending)."""
        tid, args = trap.tid, trap.args
        if self.lost_tokens:
            err = self._reinstall_token(trap)
            if err:
                return err
        if self.swaps:
            self._swap_back(trap)
        if self.readers and name in OPEN_NAMES:
            self._reap()  # before an open: a program that opens and closes many files
            # would otherwise reach the delegate's fd limit while traps keep the loop busy
        if name == "mmap":
            return self._mmap(trap)
        if name == "copy_file_range":
            return self._copy_range(trap)
        if name == "close" and self.wb_limit:
            handle = self.handle_of(tid, as_fd(args[0]))
            if handle is not None and (self.wb_inflight.get(handle) or handle in self.wb_errors):
                pending = Pending("close", Spec(fds=(0,)), b"", 0)
                pending.handle = handle
                self._gate(trap, 0, pending, args)  # close flushes: after the fd's writes
                return _ANSWERED
        if name in TOKEN_CALLS:
            return self._token_fd_call(trap, name)
        if name in EXECS:
            return self._exec(trap, name)
        if name == "io_uring_setup":
            return self._refuse(name)
        if name in REFUSED:
            if name in REFUSED_PATHS:
                path = self.marshal._path(tid, args[REFUSED_PATHS[name]])
                return self._refuse(name) if self.classify(tid, None, path) else None
            if any(self.handle_of(tid, as_fd(args[i])) is not None for i in REFUSED_FDS[name]):
                return self._refuse(name)
            return None
        if name == "getcwd":
            return self._getcwd(trap)
        spec = OFFLOADED.get(name)
        if spec is None:
            return None
        if spec.fds:
            return self._fd_call(trap, name, spec)
        return self._path_call(trap, name, spec)

    def _exec(self, trap: Trap, name: str):
        """execve/execveat: a program in the offloaded tree cannot run here (EACCES,
        as from a ``noexec`` mount); any other runs locally."""
        tid, args = trap.tid, trap.args
        token = self._token(tid) if self.cwd_tokens else None
        if token is not None and _cloexec(tid, self.cwd_fd):
            # FD_CLOEXEC set on it (fcntl, FIOCLEX, close_range): the exec would drop it
            err = self._give_token(trap, token)
            if err:
                return err
        dirfd = None if name == "execve" else as_fd(args[0])
        path = self.marshal._path(tid, args[0 if name == "execve" else 1])
        if not path and dirfd is not None:  # execveat(fd, "", AT_EMPTY_PATH)
            offloaded = self.handle_of(tid, dirfd) is not None
        else:
            offloaded = self.classify(tid, dirfd, path) is not None
        if not offloaded:
            return None
        self._warn_throttled("exec", f"{os.fsdecode(path) or 'an offloaded fd'} is in the "
                             "offloaded tree, whose programs cannot run here: refused (EACCES)")  # fmt: skip
        return self._refuse(name, E.EACCES)

    def _getcwd(self, trap: Trap):
        cwd = self.offloaded_cwd(trap.tid)
        if cwd is None:
            return None
        data = os.fsencode(cwd) + b"\0"
        if trap.args[1] < len(data):
            return E.ERANGE
        if not self.backend.is_valid(trap) or not write_memory(trap.tid, [(trap.args[0], data)]):
            return E.EFAULT
        self.backend.resume_return(trap, len(data))
        return _ANSWERED

    def _fd_call(self, trap: Trap, name: str, spec: Spec):
        args = list(trap.args)
        handle = self.handle_of(trap.tid, as_fd(args[spec.fds[0]]))
        if handle is None:
            if name == "fchdir":
                return self._local_chdir(trap, f"/proc/{trap.tid}/fd/{as_fd(args[0])}")
            return None
        args[spec.fds[0]] = handle
        bufs: list[tuple[int, bytes]] = []
        pending = Pending(name, spec, b"", 0, prefix=self.handle_prefix.get(handle, ""))
        pending.handle = handle
        if name == "fcntl":
            cmd = args[1] & 0xFFFFFFFF
            if cmd in LOCAL_FCNTL:
                return None  # fd flags and dup act on the placeholder itself
            pending.getfl = cmd == F.F_GETFL
            if cmd in LOCK_FCNTL:
                bufs.append((2, self.backend.read_memory(trap.tid, args[2], 32)))
                pending.retry_eagain = cmd in BLOCKING_FCNTL
                if cmd in (5, 36):
                    pending.spec = Spec(fds=(0,), out_struct=(2, 32))
        elif name == "flock":
            pending.retry_eagain = not args[1] & F.LOCK_NB
        self._marshal_buffers(trap, spec, args, bufs, pending)
        return tuple(args), tuple(bufs), pending

    def _path_call(self, trap: Trap, name: str, spec: Spec):
        tid, args = trap.tid, list(trap.args)
        # *at calls naming their dirfd itself (AT_EMPTY_PATH, futimens) act on an fd
        if name in ("newfstatat", "statx", "fchownat", "utimensat"):
            flags_arg = {"newfstatat": 3, "statx": 2, "fchownat": 4, "utimensat": 3}[name]
            if name == "utimensat" and args[1] == 0:
                return self._fd_like(trap, name, spec, args, b"")
            path = self.marshal._path(tid, args[1])
            if not path and args[flags_arg] & AT_EMPTY_PATH:
                return self._fd_like(trap, name, spec, args, b"")
        bufs: list[tuple[int, bytes]] = []
        results = []
        for dirarg, patharg in spec.paths:
            path = self.marshal._path(tid, args[patharg])
            dirfd = as_fd(args[dirarg]) if dirarg is not None else None
            results.append((dirarg, patharg, self.classify(tid, dirfd, path)))
        remote = [r for r in results if r[2] is not None]
        if not remote:
            if name == "chdir":
                path = os.fsdecode(self.marshal._path(tid, args[0]))
                return self._local_chdir(trap, path if path.startswith("/") else
                                         f"/proc/{tid}/cwd/{path}")  # fmt: skip
            return None
        if len(remote) != len(results):  # rename/link between local and offloaded trees
            self.ostats.cross_device += 1
            return E.EXDEV
        pending = Pending(name, spec, b"", 0)
        for dirarg, patharg, (handle, rel, prefix) in remote:
            if dirarg is not None:
                args[dirarg] = (handle if handle is not None else AT_FDCWD) & U64
            elif handle is not None:  # cannot happen: no dirfd, no handle
                return E.EINVAL
            bufs.append((patharg, rel))
            pending.prefix = prefix
        if name == "chdir":
            path = os.fsdecode(self.marshal._path(tid, args[0]))
            full = path if path.startswith("/") else self.cwd_of(tid) + "/" + path
            pending.new_cwd = os.path.normpath(full)
        if name in OPEN_NAMES:
            flags = args[1] if name == "open" else args[2] if name == "openat" else 0
            if name == "openat2":
                how = self.backend.read_memory(tid, args[2], 8)
                flags = struct.unpack("<Q", how)[0] if len(how) == 8 else 0
            pending.cloexec = bool(flags & os.O_CLOEXEC)
            pending.oflags = flags
        if spec.content is not None:
            bufs.append((spec.content, self.marshal._path(tid, args[spec.content])))
        self._marshal_buffers(trap, spec, args, bufs, pending)
        return tuple(args), tuple(bufs), pending

    def _fd_like(self, trap: Trap, name: str, spec: Spec, args: list[int], path: bytes):
        handle = self.handle_of(trap.tid, as_fd(args[0]))
        if handle is None:
            return None
        args[0] = handle
        bufs: list[tuple[int, bytes]] = [] if name == "utimensat" else [(1, path)]
        pending = Pending(name, spec, b"", 0)
        self._marshal_buffers(trap, spec, args, bufs, pending)
        return tuple(args), tuple(bufs), pending

    def _marshal_buffers(
        self, trap: Trap, spec: Spec, args: list[int], bufs: list, pending: Pending
    ) -> None:
        tid, name = trap.tid, pending.name
        if name in READS or name in WRITES:
            self._marshal_data(trap, name, args, bufs, pending)
        elif spec.out_buf is not None:  # getdents64, readlink, readlinkat
            _arg, len_arg = spec.out_buf
            count = args[len_arg] & 0xFFFFFFFF  # unsigned int count / int bufsiz
            if name != "getdents64" and as_fd(count) <= 0:
                raise _Fault(E.EINVAL)  # readlink: bufsiz <= 0, before anything else
            pending.want = args[len_arg] = min(count, MAX)
        if spec.in_struct is not None:
            arg, size = spec.in_struct
            if args[arg]:
                data = self._read(tid, [(args[arg], size)])
                if len(data) < size:
                    raise _Fault()
                bufs.append((arg, data))
        pending.nbytes = sum(len(b) for _a, b in bufs)

    def _marshal_data(self, trap: Trap, name: str, args: list[int], bufs: list, p: Pending) -> None:
        """A data call: args[1] = the kernel's verdict on the caller's buffers, args[2] =
        the bytes the kernel would move; the data (writes) or where it goes (reads)."""
        tid, addr, count = trap.tid, trap.args[1], trap.args[2]
        write = name in WRITES
        if name in VECTORS:
            verdict, segs, total = self._iovecs(tid, addr, count)
        else:
            verdict, total = self.judge.buffer(addr, count, write), count
            segs = [(addr, min(count, MAX))] if count else []
        if verdict:
            segs = []
        if write:
            data = self._read(tid, segs) if segs else b""
            if segs and not data:
                verdict = E.EFAULT  # not one byte readable: the kernel's EFAULT
            bufs.append((1, data))
            p.want = len(data)
        else:
            p.out_iov = segs
            p.want = sum(n for _a, n in segs)
        args[1] = verdict
        args[2] = total

    def _read(self, tid: int, segs: list[tuple[int, int]]) -> bytes:
        """The caller's bytes in ``segs``, in order, up to the first it could not read."""
        data = read_memory_segments(tid, segs)
        if data is not None:
            return data
        parts = []
        for base, n in segs:  # no process_vm_readv here: /proc/PID/mem
            part = self.backend.read_memory(tid, base, n)
            parts.append(part)
            if len(part) < n:
                break
        return b"".join(parts)

    def _iovecs(self, tid: int, addr: int, count: int) -> tuple[int, list[tuple[int, int]], int]:
        """``(errno or 0, segments, total)`` of a caller's iovec array, as the kernel reads
        it: the count truncated to unsigned int, at most ``IOV_MAX`` entries, a length
        that is negative as ``ssize_t`` EINVAL, a range outside user space EFAULT, the
        total capped at ``MAX_RW_COUNT`` (the relay's kernel says, on ``/dev/null``).
        The segments skip zero-length entries and stop at ``MAX`` bytes."""
        nr = count & 0xFFFFFFFF
        if nr == 0:
            return 0, [], 0
        if nr > IOV_MAX:
            return E.EINVAL, [], 0
        raw = self._read(tid, [(addr, nr * _IOVEC.size)])
        entries = [_IOVEC.unpack_from(raw, i * _IOVEC.size) for i in range(len(raw) // _IOVEC.size)]
        if len(entries) < nr:  # the kernel reads entries in order until the fault
            bad = any(length >= 1 << 63 for _b, length in entries)
            return (E.EINVAL if bad else E.EFAULT), [], 0
        total = self.judge.iovecs(raw, count)
        if total < 0:
            return -total, [], 0
        segs, left = [], min(total, MAX)
        for base, length in entries:
            if left <= 0:
                break
            take = min(length, left)
            if take:
                segs.append((base, take))
                left -= take
        return 0, segs, total

    # ------------------------------------------------------------ reply checks
    def _invalid(self, p: Pending, res: wire.Result) -> str | None:
        """Why this reply cannot be the answer to call ``p`` (None: it can)."""
        ret, err = res.ret, res.errno
        outs = [a for a, _b in res.outbufs]
        if len(set(outs)) != len(outs):
            return "an output buffer twice"
        if err:
            if not 0 < err < 4096 or ret != -err:
                return f"errno {err} with ret {ret}"
            return "output buffers with an error" if outs else None
        if ret < 0:
            return f"ret {ret} without an errno"
        expect = self._outputs(p)
        for arg, data in res.outbufs:
            if arg not in expect:
                return f"an output buffer at argument {arg}"
            kind, size = expect[arg]
            if kind == "ret" and len(data) != ret:
                return f"{len(data)} bytes of output for ret {ret}"
            if kind == "struct" and len(data) != size:
                return f"a {len(data)}-byte struct where {size} are due"
            if kind == "path" and not _plain_rel(data):
                return "a directory path that is not plain and relative"
        if p.name in OPEN_NAMES:
            return None if ret <= I32_MAX else f"handle {ret}"
        if p.name in COUNTING:
            if ret > p.want:
                return f"ret {ret} for {p.want} bytes asked"
            if ret and expect and not outs:
                return f"ret {ret} without its data"
            return None
        if p.name == "lseek":
            return None
        if p.name == "fcntl" and p.getfl:
            return None if ret <= I32_MAX else f"flags {ret}"
        return None if ret == 0 else f"ret {ret} where 0 is due"

    @staticmethod
    def _outputs(p: Pending) -> dict[int, tuple[str, int]]:
        """Output buffers call ``p`` may get back: arg -> (kind, size)."""
        spec = p.spec
        if p.name in READS:
            return {1: ("ret", p.want)}
        if spec.out_buf is not None:
            return {spec.out_buf[0]: ("ret", p.want)}
        if spec.out_struct is not None:
            return {spec.out_struct[0]: ("struct", spec.out_struct[1])}
        if p.name == "fchdir":
            return {0: ("path", syscalls.MAX_PATH)}
        if p.name == "copy_file_range":  # the offsets it was given, moved
            return {i: ("struct", 8) for i in p.copy_offs}
        return {}

    def _warn_throttled(self, key: str, text: str) -> None:
        """One warning line per ``key`` at most every ``WARN_INTERVAL_S`` seconds."""
        now = time.monotonic()
        last, quiet = self._throttle.get(key, (None, 0))
        if last is not None and now - last < WARN_INTERVAL_S:
            self._throttle[key] = (last, quiet + 1)
            return
        more = f" ({quiet} more since the last such line)" if quiet else ""
        print(f"testbed: warning: {text}{more}", file=sys.stderr, flush=True)
        self._throttle[key] = (now, 0)

    # ------------------------------------------------------------ replies
    def on_frame(self, frame: bytes) -> None:
        t_reply = time.monotonic_ns()
        try:
            kind, payload = wire.decode(frame)
        except wire.WireError as exc:
            self._warn_once("malformed", f"malformed frame from the delegate: {exc}")
            entry = self.inflight.pop(exc.call_id, None) if exc.call_id else None
            pending = self.pending.pop(exc.call_id, None) if exc.call_id else None
            if entry is not None and pending is not None:  # that call is not confirmed: EIO
                self.stats.peer_errors += 1
                self._fail(entry[0], pending, rundir.F_PEER_ERROR, entry[1], t_reply)
            return
        if kind not in (wire.RESULT, wire.ERROR):
            return
        call_id = payload.call_id
        if call_id in self.own_calls:
            self.own_calls.discard(call_id)
            return
        entry = self.inflight.pop(call_id, None) if call_id else None
        pending = self.pending.pop(call_id, None) if call_id else None
        if entry is None or pending is None:
            if kind == wire.RESULT:
                self.stats.late_replies += 1
            else:
                print(
                    f"testbed: warning: delegate error: {payload.code}: {payload}", file=sys.stderr
                )
            return
        trap, t_send, _n = entry
        if kind == wire.ERROR:
            self.stats.peer_errors += 1
            self._lose(f"delegate error {payload.code}: {payload}")
            self._fail(trap, pending, rundir.F_PEER_ERROR, t_send, t_reply)
            return
        stamps = (payload.t_recv, payload.t_exec_start, payload.t_exec_end, payload.t_send)
        why = self._invalid(pending, payload)
        if why is not None:
            self.ostats.bad_replies += 1
            self.stats.peer_errors += 1
            self._warn_throttled("reply", f"invalid reply from the delegate to {pending.name}: "
                                 f"{why}; the call fails with EIO")  # fmt: skip
            self._fail(trap, pending, rundir.F_PEER_ERROR, t_send, t_reply)
            return
        if pending.fetch is not None:
            self._fetched(trap, pending, payload, t_send, t_reply, stamps)
            return
        if pending.behind:  # a write that stopped short: the rest would have found no space
            err = payload.errno or (0 if payload.ret == pending.want else E.ENOSPC)
            self._behind_done(trap, pending, err, t_send, t_reply, stamps)
            return
        if payload.errno == E.EAGAIN and pending.retry_eagain:
            self.ostats.lock_retries += 1
            self.retries.append((time.monotonic_ns() + LOCK_RETRY_NS, trap, call_id, pending))
            return
        self._complete(trap, pending, payload, t_send, t_reply, stamps)

    def _complete(self, trap: Trap, p: Pending, res: wire.Result, t_send: int, t_reply: int,
                  stamps: tuple[int, int, int, int]) -> None:  # fmt: skip
        flags = 0
        self._last_released = trap
        nout = sum(len(b) for _a, b in res.outbufs)
        seen = res.ret if not res.errno else -res.errno  # what the program gets
        if res.errno:
            ok = self.backend.resume_return(trap, -1, res.errno)
        elif p.name in OPEN_NAMES:
            ok = self._install(trap, res.ret, p)
        elif p.name in READS:
            ok = self.backend.is_valid(trap)
            if ok:
                ret = self._deliver(trap, p, res)
                seen = ret if ret >= 0 else -E.EFAULT
                ok = self.backend.resume_return(trap, *((-1, E.EFAULT) if ret < 0 else (ret,)))
        else:
            ok = self.backend.is_valid(trap)
            if ok and res.outbufs and not write_memory(trap.tid, self._placements(trap, p, res)):
                ok = self.backend.resume_return(trap, -1, E.EFAULT)
            elif ok:
                err = self._set_cwd(trap, p, res) if p.name in ("chdir", "fchdir") else 0
                if err:
                    seen = -err
                    ok = self.backend.resume_return(trap, -1, err)
                else:
                    ok = self.backend.resume_return(trap, res.ret)
        if not ok:
            flags |= rundir.F_CALLER_GONE
            self.stats.caller_gone += 1
        t_resume = time.monotonic_ns()
        self.stats.forwarded += 1
        self.recorder.add(trap.tid, trap.nr, flags, seen, p.nbytes, nout, trap.t_trap, t_send,
                          t_reply, t_resume, *stamps)  # fmt: skip

    def _deliver(self, trap: Trap, p: Pending, res: wire.Result) -> int:
        """Write a read's data into the caller's buffer or iovecs in order: the bytes that
        landed (-1: none of ``ret > 0``).  Bytes that did not land (a hole in the
        caller's buffer) are given back to the remote offset, as the kernel moves it
        only by what it copied."""
        data = dict(res.outbufs).get(1, b"")
        chunks, pos = [], 0
        for base, length in p.out_iov:
            if pos >= len(data):
                break
            chunks.append((base, data[pos : pos + length]))
            pos += length
        landed = write_memory_count(trap.tid, chunks)
        short = len(data) - landed
        if short and (p.name in ("read", "readv") or
                      (p.name == "preadv2" and trap.args[3] == U64)):  # fmt: skip
            self._own_call(NR["lseek"], (p.handle, -short & U64, SEEK_CUR))
        return landed if landed or not data else -1

    def _placements(self, trap: Trap, p: Pending, res: wire.Result) -> list[tuple[int, bytes]]:
        if p.name == "copy_file_range":
            return [(trap.args[i], data) for i, data in res.outbufs]
        out = []
        spec = p.spec
        for arg, data in res.outbufs:
            if p.name == "fchdir":
                continue
            cap = None
            if spec.out_buf is not None and arg == spec.out_buf[0]:
                cap = trap.args[spec.out_buf[1]]
            elif spec.out_struct is not None and arg == spec.out_struct[0]:
                cap = spec.out_struct[1]
            if cap is not None and trap.args[arg]:
                out.append((trap.args[arg], data[:cap]))
        return out

    def _set_cwd(self, trap: Trap, p: Pending, res: wire.Result) -> int:
        """A confirmed offloaded chdir/fchdir: give the caller its token (0, or the
        errno the call then fails with)."""
        if p.name == "chdir" and p.new_cwd:
            path = p.new_cwd
        else:
            rel = dict(res.outbufs).get(0, b".")
            base = p.prefix.rstrip("/") or ""
            path = base + ("" if rel == b"." else "/" + os.fsdecode(rel)) or "/"
        return self._give_token(trap, CwdToken(path))

    def _local_chdir(self, trap: Trap, target: str):
        """A chdir/fchdir to a local directory by a process whose cwd may be
        offloaded: let it through (None) with a token that says where it was, so
        its outcome is read from the kernel (its cwd is then ``target`` or not)."""
        if not self.cwd_tokens:
            return None
        token = self._token(trap.tid)
        if token is None:
            return None
        try:
            st = os.stat(target)
        except OSError:
            return None  # the kernel refuses it: the cwd stays as it was
        was = self.offloaded_cwd(trap.tid)
        if was is None:
            return None  # its cwd is already local: nothing to track
        err = self._give_token(trap, CwdToken(was, (st.st_dev, st.st_ino)))
        return err or None

    def _give_token(self, trap: Trap, token: CwdToken) -> int:
        """Install ``token`` at the caller's ``cwd_fd`` (0, or the errno of failing)."""
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        ino = os.fstat(w).st_ino
        _fill(w)
        try:
            addfd_at(self.backend.fileno(), trap.id, w, self.cwd_fd)
        except OSError as exc:
            os.close(r)
            os.close(w)
            return exc.errno or E.EMFILE
        os.close(w)
        self.cwd_tokens[ino] = token
        self.token_readers[r] = ino
        self.token_hup.register(r, 0)  # POLLHUP: no process carries it any more
        return 0

    def _token_fd_call(self, trap: Trap, name: str):
        """close/dup2/dup3/close_range that would close or replace the cwd token: the
        token outlives them (docs/offload.md).  The filter traps only those, unless
        the call traps for another reason (close, with write-behind): others run."""
        a, fd = trap.args, self.cwd_fd
        if name == "close_range":
            hits = (a[0] & 0xFFFFFFFF) <= fd <= (a[1] & 0xFFFFFFFF)
        else:
            hits = (a[0 if name == "close" else 1] & 0xFFFFFFFF) == fd
        token = self._token(trap.tid) if hits else None
        if token is None:
            return None  # the program's own fd at that number
        if name == "close":  # the program never opened it: closing it changes nothing
            self._last_released = trap
            self.backend.resume_return(trap, 0)
            return _ANSWERED
        if name == "close_range":  # the others close; the token comes back at the next call
            self.lost_tokens[self._tgid_of(trap.tid)] = token
            return None
        self._warn_throttled("token", f"{name} onto fd {self.cwd_fd}, which carries an "
                             "offloaded working directory: refused (EBADF)")  # fmt: skip
        return E.EBADF

    def _reinstall_token(self, trap: Trap) -> int:
        """Give a process its token back after a close_range took it (0 or errno)."""
        token = self.lost_tokens.pop(self._tgid_of(trap.tid), None)
        if token is None or self._token(trap.tid) is not None:
            return 0
        err = self._give_token(trap, token)
        if err:
            self._warn_throttled("token", f"cannot give back the working directory token "
                                 f"({os.strerror(err)}): the call fails with EIO")  # fmt: skip
            return E.EIO
        return 0

    def _copy_range(self, trap: Trap):
        """``copy_file_range``: between two offloaded fds it runs at the delegate (no
        byte crosses the network); one local and one offloaded: EXDEV, as between
        file systems (programs fall back to read/write); none: local."""
        tid, a = trap.tid, trap.args
        h_in, h_out = self.handle_of(tid, as_fd(a[0])), self.handle_of(tid, as_fd(a[2]))
        if h_in is None and h_out is None:
            return None
        if h_in is None or h_out is None:
            return self._refuse("copy_file_range")
        bufs = []
        for i in (1, 3):
            if a[i]:
                raw = self.backend.read_memory(tid, a[i], 8)
                if len(raw) != 8:
                    return E.EFAULT
                bufs.append((i, raw))
        want = min(a[4], COPY_MAX)
        p = Pending("copy_file_range", Spec(fds=(0, 2)), b"", 16, want=want,
                    copy_offs=tuple(i for i, _b in bufs))  # fmt: skip
        p.handle = h_out  # write-behind: after the output fd's writes in flight
        p.prefix = self.handle_prefix.get(h_out, "")
        return (h_in, 0, h_out, 0, want, a[5]), tuple(bufs), p

    # ------------------------------------------------------------ write-behind
    def _gate(self, trap: Trap, call_id: int, p: Pending, args) -> None:
        """A call on a handle, with write-behind on: a write that fits the window is
        answered now and sent behind; any other call waits for the handle's writes
        in flight, then fails with the error one of them met, or goes (close: locally)."""
        h = p.handle
        fits = (p.name in WRITES and p.want > 0 and not args[1] and
                self.handle_mode.get(h) != os.O_RDONLY and
                self.wb_bytes + p.want <= self.wb_limit and h not in self.wb_errors)  # fmt: skip
        if fits:
            self._send_behind(trap, call_id, p)
        elif self.wb_inflight.get(h):
            self.wb.waits += 1
            self.wb_blocked.setdefault(h, []).append((trap, call_id, p))
        else:
            self._go(trap, call_id, p)

    def _go(self, trap: Trap, call_id: int, p: Pending) -> None:
        err = self.wb_errors.pop(p.handle, 0)
        if err:  # an earlier write failed after the program was told it succeeded
            self.wb.reported += 1
            self._last_released = trap
            ok = self.backend.resume_return(trap, -1, err)
            self.stats.forwarded += 1
            self.recorder.add(trap.tid, trap.nr, 0 if ok else rundir.F_CALLER_GONE, -err, 0, 0,
                              trap.t_trap, 0, 0, time.monotonic_ns())  # fmt: skip
        elif p.name == "close":
            self._last_released = trap
            self.backend.resume_continue(trap)
        else:
            self._send_pending(trap, call_id, p)

    def _send_behind(self, trap: Trap, call_id: int, p: Pending) -> None:
        if not self._send_pending(trap, call_id, p):
            return
        p.behind = True
        self.wb_bytes += p.want
        self.wb_inflight[p.handle] = self.wb_inflight.get(p.handle, 0) + 1
        self.wb.async_writes += 1
        self.wb.async_bytes += p.want
        self.wb.peak_bytes = max(self.wb.peak_bytes, self.wb_bytes)
        self._last_released = trap
        if not self.backend.resume_return(trap, p.want):  # as if written: the data is ours now
            self.stats.caller_gone += 1
        p.t_answer = time.monotonic_ns()

    def _behind_done(self, trap: Trap, p: Pending, err: int, t_send: int, t_reply: int,
                     stamps, flags: int = 0) -> None:  # fmt: skip
        """The reply to (or loss of) a write answered earlier."""
        h = p.handle
        self.wb_bytes -= p.want
        left = self.wb_inflight[h] = self.wb_inflight.get(h, 1) - 1
        if err:
            self.wb.errors += 1
            self.wb_errors.setdefault(h, err)  # the first one is what a later call reports
        self.stats.forwarded += 1
        self.recorder.add(trap.tid, trap.nr, flags | rundir.F_BEHIND, p.want, p.nbytes, 0,
                          trap.t_trap, t_send, t_reply, p.t_answer, *stamps)  # fmt: skip
        if left <= 0:
            self.wb_inflight.pop(h, None)
            for trap2, call_id, p2 in self.wb_blocked.pop(h, []):
                self._gate(trap2, call_id, p2, (0, 0))

    def _drain_behind(self, timeout_s: float) -> None:
        """After the program: wait for the writes still behind, then say which failed."""
        deadline = time.monotonic() + timeout_s
        while self.wb_inflight and not self.lost and (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                self.on_frame(self.sock.recv())
            self.expire(time.monotonic_ns())
        for h, err in sorted(self.wb_errors.items()):
            self.wb.at_exit.append(f"handle {h}: {os.strerror(err)}")
        if self.wb.at_exit:
            print(f"testbed: warning: {len(self.wb.at_exit)} offloaded file(s) lost writes the "
                  f"program was told had succeeded (write-behind): {'; '.join(self.wb.at_exit)}",
                  file=sys.stderr)  # fmt: skip

    # ------------------------------------------------------------ mmap
    def _mmap(self, trap: Trap):
        """``mmap`` of a placeholder: private mappings (and read-only shared ones)
        get a local copy of the range (docs/offload.md); a writable shared mapping
        cannot be kept coherent with the delegate's file: ENODEV, as before."""
        args = trap.args
        fd = as_fd(args[4])
        handle = self.handle_of(trap.tid, fd) if not args[3] & MAP_ANONYMOUS else None
        if handle is None:
            return None
        length, prot, flags, offset = args[1], args[2], args[3] & 0x3, args[5]
        if flags in (MAP_SHARED, MAP_SHARED_VALIDATE) and prot & PROT_WRITE:
            return self._refuse("mmap")
        if flags == 0 or not length or offset % PAGE or length > 1 << 40 or offset > 1 << 62:
            return E.EINVAL  # as the kernel checks them (an absurd length: ENOMEM there)
        fetch = MapFetch(fd, handle, offset, length,
                         os.memfd_create("testbed-offload-mmap", os.MFD_CLOEXEC))  # fmt: skip
        pending = self._chunk(fetch)
        if not self.backend.is_valid(trap):
            os.close(fetch.memfd)
            self.stats.caller_gone += 1
            self._last_released = trap
            return _ANSWERED
        self.ostats.remote += 1
        fetch.t_send = time.monotonic_ns()
        return self._send_chunk(trap, pending)

    def _chunk(self, fetch: MapFetch) -> Pending:
        want = min(MAX, fetch.length - fetch.got)
        p = Pending("pread64", OFFLOADED["pread64"], b"", 0, want=want, fetch=fetch)
        p.handle = fetch.handle
        return p

    def _send_chunk(self, trap: Trap, p: Pending):
        f = p.fetch
        if self.lost:
            self._fail(trap, p, rundir.F_NOT_SENT, 0, 0)
            os.close(f.memfd)
            return _ANSWERED
        call_id = self._next_id
        self._next_id += 1
        args = (f.handle, 0, p.want, f.offset + f.got, 0, 0)
        p.frame = wire.encode_call(wire.Call(call_id, trap.tid, NR["pread64"], args, (), "offload"))
        self._send_pending(trap, call_id, p)
        return _ANSWERED

    def _fetched(self, trap: Trap, p: Pending, res: wire.Result, t_send: int, t_reply: int,
                 stamps: tuple[int, int, int, int]) -> None:  # fmt: skip
        """One chunk of an mmap's range arrived: the next, or map it."""
        f = p.fetch
        data = dict(res.outbufs).get(1, b"")
        if res.errno:  # a write-only fd cannot be mapped: EACCES, as natively
            os.close(f.memfd)
            err = E.EACCES if res.errno == E.EBADF else res.errno
            self._last_released = trap
            self.backend.resume_return(trap, -1, err)
            self._record_map(trap, -err, f, t_reply, stamps)
            return
        if data:
            os.pwrite(f.memfd, data, f.offset + f.got)
            f.got += len(data)
        if len(data) == p.want and f.got < f.length:
            self._send_chunk(trap, self._chunk(f))
            return
        self._map(trap, f, t_reply, stamps)

    def _map(self, trap: Trap, f: MapFetch, t_reply: int, stamps) -> None:
        """Put the memfd where the placeholder is and let the kernel map it."""
        self._last_released = trap
        try:
            os.ftruncate(f.memfd, f.offset + f.got)  # the file's end (SIGBUS beyond, as natively)
            ino = os.fstat(f.memfd).st_ino
            tgid = self._tgid_of(trap.tid)
            cloexec = _cloexec(trap.tid, f.fd)
            saved = pidfd_getfd(tgid, f.fd)
        except OSError:
            os.close(f.memfd)
            ok = self.backend.resume_return(trap, -1, E.EIO)
            self._record_map(trap, -E.EIO if ok else 0, f, t_reply, stamps)
            return
        try:
            addfd_at(self.backend.fileno(), trap.id, f.memfd, f.fd, cloexec)
        except OSError:
            os.close(saved)
            ok = False
        else:
            self.swaps.append(Swap(tgid, f.fd, ino, saved, cloexec))
            ok = self.backend.resume_continue(trap)
        finally:
            os.close(f.memfd)
        self._record_map(trap, f.got, f, t_reply, stamps, gone=not ok)

    def _record_map(self, trap: Trap, seen: int, f: MapFetch, t_reply: int, stamps,
                    gone: bool = False) -> None:  # fmt: skip
        flags = rundir.F_CALLER_GONE if gone else 0
        if gone:
            self.stats.caller_gone += 1
        self.stats.forwarded += 1
        self.recorder.add(trap.tid, trap.nr, flags, seen, 0, f.got, trap.t_trap, f.t_send,
                          t_reply, time.monotonic_ns(), *stamps)  # fmt: skip

    def _swap_back(self, trap: Trap) -> None:
        """Give the placeholders back that a memfd stood in for (see :class:`Swap`)."""
        tgid = self._tgid_of(trap.tid)
        keep = []
        for sw in self.swaps:
            if sw.tgid != tgid:
                if os.path.exists(f"/proc/{sw.tgid}"):
                    keep.append(sw)
                else:
                    os.close(sw.saved)
                continue
            try:
                st = os.stat(f"/proc/{trap.tid}/fd/{sw.fd}")
                here = st.st_ino == sw.memfd_ino and not stat.S_ISFIFO(st.st_mode)
            except OSError:
                here = False  # the program closed it meanwhile: so is the placeholder
            if here:
                try:
                    addfd_at(self.backend.fileno(), trap.id, sw.saved, sw.fd, sw.cloexec)
                except OSError as exc:
                    if exc.errno != E.ENOENT:  # not gone: try again at its next call
                        self._warn_throttled("swap", f"cannot put fd {sw.fd} back after an "
                                             f"mmap ({exc.strerror}); retrying")  # fmt: skip
                        keep.append(sw)
                        continue
            os.close(sw.saved)
        self.swaps = keep

    def _install(self, trap: Trap, handle: int, p: Pending) -> bool:
        """Give the caller a placeholder fd for remote ``handle``; False if it is gone."""
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        ino = os.fstat(w).st_ino
        _fill(w)
        try:
            addfd_send(self.backend.fileno(), trap.id, w, p.cloexec)
        except OSError as exc:
            os.close(r)
            os.close(w)
            self._close_remote(handle)
            if exc.errno == E.ENOENT:
                return False
            if exc.errno == E.EINPROGRESS:  # answered already (_addfd): nothing to send
                self._warn_throttled("addfd", "an open was interrupted by a stop signal "
                                     "while its fd was installed; it returned 0")  # fmt: skip
                return False
            return self.backend.resume_return(trap, -1, exc.errno or E.EMFILE)
        os.close(w)
        self.handle_mode[handle] = p.oflags & os.O_ACCMODE
        self.by_ino[ino] = handle
        self.readers[r] = (ino, handle, p.prefix)
        self.handle_prefix[handle] = p.prefix
        self.hup.register(r, 0)  # POLLHUP is always reported
        self.ostats.remote_opens += 1
        return True

    def _close_remote(self, handle: int) -> None:
        if self._own_call(NR["close"], (handle,)):
            self.ostats.remote_closes += 1

    def _own_call(self, nr: int, args: tuple[int, ...]) -> bool:
        """Send a call of the relay's own (its reply is dropped); False if not sent."""
        call_id = self._next_id
        self._next_id += 1
        frame = wire.encode_call(
            wire.Call(call_id, 0, nr, args + (0,) * (6 - len(args)), (), "offload")
        )
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False  # a close: the delegate drops the client's fds at BYE
        self.own_calls.add(call_id)
        return True

    def _fail(self, trap: Trap, p: Pending, flags: int, t_send: int, t_reply: int) -> None:
        """An unconfirmed offloaded call: the caller sees EIO, the record says why."""
        if p.behind:  # answered already: the error waits for the fd's next call
            self._behind_done(trap, p, E.EIO, t_send, t_reply, (0, 0, 0, 0), flags)
            return
        if p.fetch is not None:  # an mmap's range was being read
            os.close(p.fetch.memfd)
        self.ostats.eio += 1
        self._last_released = trap
        if not self.backend.resume_return(trap, -1, E.EIO):
            flags |= rundir.F_CALLER_GONE
            self.stats.caller_gone += 1
        if flags & rundir.F_NOT_SENT:
            self.stats.not_sent += 1
        self.stats.forwarded += 1
        self.recorder.add(trap.tid, trap.nr, flags, -E.EIO, p.nbytes, 0, trap.t_trap, t_send,
                          t_reply, time.monotonic_ns())  # fmt: skip

    def _release(self, trap: Trap, flags: int, nbytes: int, t_send: int, t_reply: int,
                 stamps: tuple[int, int, int, int] = (0, 0, 0, 0), ret: int = 0) -> None:  # fmt: skip
        """Never continue an offloaded call locally (the base relay's fallback): EIO."""
        if not flags & (rundir.F_TIMEOUT | rundir.F_PEER_ERROR | rundir.F_UNREADABLE):
            flags |= rundir.F_NOT_SENT
        self._fail(
            trap, Pending(NAME.get(trap.nr, ""), Spec(), b"", nbytes), flags, t_send, t_reply
        )

    def peer_gone(self, why: str) -> None:
        """The delegate is known to be gone: offloaded calls fail with EIO from now on."""
        self._lose(why)

    def _lose(self, why: str) -> None:
        if not self.lost:
            self.lost = True
            self.stats.peer_lost_at.append(time.time())
            print(f"testbed: error: {why}; offloaded calls now fail with EIO", file=sys.stderr)

    # ------------------------------------------------------------ timers
    def expire(self, now: int) -> None:
        while self.inflight:
            call_id, (trap, t_send, _n) = next(iter(self.inflight.items()))
            if now - t_send < self.timeout_ns:
                break
            del self.inflight[call_id]
            pending = self.pending.pop(call_id)
            self.stats.timeouts += 1
            self._lose(f"no reply from the delegate within {self.timeout_ns / 1e9:g} s")
            self._fail(trap, pending, rundir.F_TIMEOUT, t_send, 0)
        if self.retries:
            due = [r for r in self.retries if r[0] <= now]
            self.retries = [r for r in self.retries if r[0] > now]
            for _due, trap, _old, pending in due:
                if self.lost:
                    self._fail(trap, pending, rundir.F_NOT_SENT, 0, 0)
                    continue
                call_id = self._next_id
                self._next_id += 1
                # same call, new id: re-encode by patching the id in a fresh decode
                _k, call = wire.decode(pending.frame)
                pending.frame = wire.encode_call(call._replace(call_id=call_id))
                self._send_pending(trap, call_id, pending)
        self._reap()

    def _reap(self) -> None:
        """Close the remote fds of placeholders no process holds any more (POLLHUP on
        the relay's read end), and forget cwd tokens nobody carries."""
        if self.token_readers:
            for fd, _ev in self.token_hup.poll(0):
                self.token_hup.unregister(fd)
                os.close(fd)
                self.cwd_tokens.pop(self.token_readers.pop(fd), None)
        if self.readers:
            for fd, _ev in self.hup.poll(0):
                ino, handle, _prefix = self.readers.pop(fd)
                self.hup.unregister(fd)
                os.close(fd)
                self.by_ino.pop(ino, None)
                self.handle_prefix.pop(handle, None)
                if not self.lost:
                    self._close_remote(handle)

    def probe(self, now: int) -> None:
        """No reconnection in offload mode: a lost delegate's fds are gone."""

    def next_timeout_ms(self, now: int) -> int:
        ms = super().next_timeout_ms(now)
        return min(ms, 2) if self.retries else min(ms, 50)

    def finish(self, timeout_s: float = 2.0) -> None:
        """After the program: close what is left and say BYE (the delegate drops our fds)."""
        if self.wb_limit:
            self._drain_behind(max(timeout_s, self.timeout_ns / 1e9))
        self.expire(time.monotonic_ns())
        self.judge.close()
        for fd in list(self.readers):
            self.hup.unregister(fd)
            os.close(fd)
        self.readers.clear()
        if self.lost:  # still say BYE: a delegate that is only slow then drops our fds
            timeout_s = min(timeout_s, 0.5)
        try:
            self.sock.send(wire.encode_bye({"offload": self.ostats.as_dict()}), zmq.NOBLOCK)
        except zmq.Again:
            return
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0 and self.sock.poll(int(left * 1000) + 1):
            try:
                kind, _p = wire.decode(self.sock.recv())
            except wire.WireError:
                continue
            if kind == wire.BYE:
                return

    def meta(self) -> dict[str, Any]:
        return {
            "paths": self.prefixes,
            **self.ostats.as_dict(),
            "delegate_lost": self.lost,
            "cwd_fd": self.cwd_fd,
            **({"write_behind": self.wb.as_dict()} if self.wb_limit else {}),
            **({"read_ahead": self.ra.as_dict()} if self.ra.depth else {}),
        }


class _Fault(Exception):
    """The call fails at once with ``errno`` (default EFAULT), as the kernel's would."""

    def __init__(self, errno: int = E.EFAULT):
        super().__init__(errno)
        self.errno = errno


def _plain_rel(path: bytes) -> bool:
    """A root-relative directory path as ``rel_of`` gives it: ``.`` or plain components."""
    if path == b".":
        return True
    parts = path.split(b"/")
    return (
        0 < len(path) <= syscalls.MAX_PATH
        and b"\0" not in path
        and all(part not in (b"", b".", b"..") for part in parts)
    )


_ANSWERED = object()
_FD_LINK = re.compile(r"^/(proc/(self|thread-self|\d+)|dev)/fd/(\d+)/?$")


def _cloexec(tid: int, fd: int) -> bool:
    """Whether fd ``fd`` of task ``tid`` has FD_CLOEXEC (from ``/proc/TID/fdinfo``)."""
    try:
        with open(f"/proc/{tid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return bool(int(line.split()[1], 8) & os.O_CLOEXEC)
    except (OSError, ValueError, IndexError):
        pass
    return False


def _fill(w: int) -> None:
    """Shrink the placeholder pipe to one page and fill it: the write end stays
    non-blocking, so a write that ever reached it locally would fail (EAGAIN)
    instead of succeeding silently."""
    try:
        F.fcntl(w, F.F_SETPIPE_SZ, 4096)
    except OSError:
        pass
    try:
        while os.write(w, bytes(4096)):
            pass
    except BlockingIOError:
        pass
