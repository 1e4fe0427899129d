"""The relay side of offload mode.

:class:`OffloadRelay` serves the same event loop as :class:`testbed.relay.Relay`
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
"""

from __future__ import annotations

import ctypes
import errno as E
import fcntl as F
import os
import re
import select
import stat
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from testbed import rundir, syscalls, wire
from testbed.errors import TestbedError
from testbed.interpose import CallerGone, Trap
from testbed.offload.calls import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    OFFLOADED,
    REFUSED,
    REFUSED_FDS,
    REFUSED_PATHS,
    Spec,
    as_fd,
    trapped,
)
from testbed.relay import Relay

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
ADDFD_FLAG_SEND = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
NR_PROCESS_VM_WRITEV = 311


class OffloadError(TestbedError):
    pass


class _Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def write_memory(pid: int, chunks: list[tuple[int, bytes]]) -> bool:
    """``process_vm_writev`` the ``(address, bytes)`` chunks into ``pid``; True if all landed."""
    chunks = [(a, b) for a, b in chunks if b]
    for i in range(0, len(chunks), IOV_MAX):
        part = chunks[i : i + IOV_MAX]
        n = len(part)
        bufs = [ctypes.create_string_buffer(b, len(b)) for _a, b in part]
        local = (_Iov * n)(
            *[_Iov(ctypes.addressof(buf), len(b)) for buf, (_a, b) in zip(bufs, part, strict=True)]
        )
        remote = (_Iov * n)(*[_Iov(a, len(b)) for a, b in part])
        total = sum(len(b) for _a, b in part)
        got = _libc.syscall(
            ctypes.c_long(NR_PROCESS_VM_WRITEV), ctypes.c_long(pid), local, ctypes.c_ulong(n),
            remote, ctypes.c_ulong(n), ctypes.c_ulong(0),
        )  # fmt: skip
        if got != total:
            return False
    return True


def addfd_send(listener: int, notif_id: int, srcfd: int, cloexec: bool) -> int:
    """Install ``srcfd`` in the caller and answer the notification with its number."""
    req = _ADDFD.pack(notif_id, ADDFD_FLAG_SEND, srcfd, 0, os.O_CLOEXEC if cloexec else 0)
    return F.ioctl(listener, IOCTL_NOTIF_ADDFD, req)


def norm_prefix(prefix: str) -> str:
    """An ``--offload-path`` as an absolute, normalised path."""
    if not prefix.startswith("/"):
        raise OffloadError(f"--offload-path {prefix!r} must be an absolute path")
    p = os.path.normpath(prefix)
    if p in ("/", "//"):
        raise OffloadError("--offload-path / would offload every file, the program's own included")
    return p


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
        }


class OffloadRelay(Relay):
    """A relay whose offloaded calls execute at the delegate (module docstring)."""

    def __init__(self, backend, sock: zmq.Socket, recorder: rundir.CallRecorder,
                 prefixes: list[str], timeout_s: float = 2.0, busy_poll: bool = False):  # fmt: skip
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
        self.vcwd: dict[int, str] = {}  # tgid -> offloaded cwd
        self.tgid: dict[int, int] = {}
        self.seen_tgid: set[int] = set()
        self.retries: list[tuple[int, Trap, int, Pending]] = []  # (due, trap, call_id, pending)
        self.own_calls: set[int] = set()  # call ids of the relay's own closes
        self.lost = False
        self._pipe_dev = self._pipefs_dev()

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

    def cwd_of(self, tid: int) -> str:
        tg = self._tgid_of(tid)
        if self.vcwd:
            if tg not in self.seen_tgid:  # a new process inherits its parent's cwd
                self.seen_tgid.add(tg)
                parent = _ppid(tg)
                if parent in self.vcwd and tg not in self.vcwd:
                    self.vcwd[tg] = self.vcwd[parent]
            if tg in self.vcwd:
                return self.vcwd[tg]
        self.seen_tgid.add(tg)
        try:
            return os.readlink(f"/proc/{tid}/cwd")
        except OSError:
            raise CallerGone(tid) from None

    def classify(
        self, tid: int, dirfd: int | None, path: bytes
    ) -> tuple[int | None, bytes, str] | None:
        """``(handle or None, root-relative path, prefix)`` if offloaded, else None (local)."""
        if not path:
            return None
        text = os.fsdecode(path)
        magic = _FD_LINK.match(text)
        if magic:  # /proc/self/fd/N of a placeholder names the remote object itself
            pid = tid if magic.group(2) in (None, "self", "thread-self") else int(magic.group(2))
            handle = self.handle_of(pid, int(magic.group(3)))
            if handle is not None:
                return None, b"\0%d" % handle, self.handle_prefix.get(handle, "")
        if text.startswith("/"):
            full = text
        elif dirfd is None or dirfd == AT_FDCWD:
            full = self.cwd_of(tid) + "/" + text
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
        except _Fault:
            decision = E.EFAULT
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
        self._send_pending(trap, call_id, pending)

    def _send_pending(self, trap: Trap, call_id: int, pending: Pending) -> None:
        t_send = time.monotonic_ns()
        try:
            self.sock.send(pending.frame, zmq.NOBLOCK)
        except zmq.Again:
            self._fail(trap, pending, rundir.F_NOT_SENT, 0, 0)
            return
        self.inflight[call_id] = (trap, t_send, pending.nbytes)
        self.pending[call_id] = pending

    def _refuse(self, name: str) -> int:
        self.ostats.refused[name] = self.ostats.refused.get(name, 0) + 1
        return REFUSED[name]

    def _decide(self, trap: Trap, name: str):
        """None: run locally; an int: fail with that errno; else (args, bufs, Pending)."""
        tid, args = trap.tid, trap.args
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

    def _getcwd(self, trap: Trap):
        tg = self._tgid_of(trap.tid)
        if not self.vcwd:
            return None
        cwd = self.cwd_of(trap.tid)
        if tg not in self.vcwd:
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
                self.vcwd.pop(self._tgid_of(trap.tid), None)
            return None
        args[spec.fds[0]] = handle
        bufs: list[tuple[int, bytes]] = []
        pending = Pending(name, spec, b"", 0, prefix=self.handle_prefix.get(handle, ""))
        if name == "fcntl":
            cmd = args[1] & 0xFFFFFFFF
            if cmd in LOCAL_FCNTL:
                return None  # fd flags and dup act on the placeholder itself
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
                self.vcwd.pop(self._tgid_of(tid), None)
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
        read = self.backend.read_memory
        tid = trap.tid
        if spec.in_buf is not None:
            arg, len_arg = spec.in_buf
            n = min(args[len_arg], MAX)
            data = read(tid, args[arg], n) if n else b""
            if len(data) < n:
                raise _Fault()
            bufs.append((arg, data))
            args[len_arg] = n
        if spec.in_iov is not None:
            arg, cnt = spec.in_iov
            parts = [
                read(tid, base, length) for base, length in self._iovecs(tid, args[arg], args[cnt])
            ]
            data = b"".join(parts)
            bufs.append((arg, data))
            args[2] = len(data)
        if spec.out_iov is not None:
            arg, cnt = spec.out_iov
            pending.out_iov = self._iovecs(tid, args[arg], args[cnt])
            args[2] = sum(n for _b, n in pending.out_iov)
        if spec.in_struct is not None:
            arg, size = spec.in_struct
            if args[arg]:
                data = read(tid, args[arg], size)
                if len(data) < size:
                    raise _Fault()
                bufs.append((arg, data))
        pending.nbytes = sum(len(b) for _a, b in bufs)

    def _iovecs(self, tid: int, addr: int, count: int) -> list[tuple[int, int]]:
        count = min(count, IOV_MAX)
        raw = self.backend.read_memory(tid, addr, count * _IOVEC.size) if count else b""
        out, total = [], 0
        for i in range(len(raw) // _IOVEC.size):
            base, length = _IOVEC.unpack_from(raw, i * _IOVEC.size)
            length = min(length, MAX - total)
            if length <= 0:
                break
            out.append((base, length))
            total += length
        return out

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
        if res.errno:
            ok = self.backend.resume_return(trap, -1, res.errno)
        elif p.name in OPEN_NAMES:
            ok = self._install(trap, res.ret, p)
        else:
            ok = self.backend.is_valid(trap)
            if ok and res.outbufs and not write_memory(trap.tid, self._placements(trap, p, res)):
                ok = self.backend.resume_return(trap, -1, E.EFAULT)
            elif ok:
                if p.name in ("chdir", "fchdir"):
                    self._set_cwd(trap, p, res)
                ok = self.backend.resume_return(trap, res.ret)
        if not ok:
            flags |= rundir.F_CALLER_GONE
            self.stats.caller_gone += 1
        t_resume = time.monotonic_ns()
        self.stats.forwarded += 1
        self.recorder.add(trap.tid, trap.nr, flags, res.ret if not res.errno else -res.errno,
                          p.nbytes, nout, trap.t_trap, t_send, t_reply, t_resume, *stamps)  # fmt: skip

    def _placements(self, trap: Trap, p: Pending, res: wire.Result) -> list[tuple[int, bytes]]:
        out = []
        spec = p.spec
        for arg, data in res.outbufs:
            if p.name == "fchdir":
                continue
            if spec.out_iov is not None and arg == spec.out_iov[0]:
                pos = 0
                for base, length in p.out_iov:
                    if pos >= len(data):
                        break
                    out.append((base, data[pos : pos + length]))
                    pos += length
                continue
            cap = None
            if spec.out_buf is not None and arg == spec.out_buf[0]:
                cap = trap.args[spec.out_buf[1]]
            elif spec.out_struct is not None and arg == spec.out_struct[0]:
                cap = spec.out_struct[1]
            if cap is not None and trap.args[arg]:
                out.append((trap.args[arg], data[:cap]))
        return out

    def _set_cwd(self, trap: Trap, p: Pending, res: wire.Result) -> None:
        tg = self._tgid_of(trap.tid)
        if p.name == "chdir" and p.new_cwd:
            self.vcwd[tg] = p.new_cwd
        elif p.name == "fchdir":
            rel = dict(res.outbufs).get(0, b".")
            base = p.prefix.rstrip("/") or ""
            self.vcwd[tg] = base + ("" if rel == b"." else "/" + os.fsdecode(rel)) or "/"
        self.seen_tgid.add(tg)

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
            return self.backend.resume_return(trap, -1, exc.errno or E.EMFILE)
        os.close(w)
        self.by_ino[ino] = handle
        self.readers[r] = (ino, handle, p.prefix)
        self.handle_prefix[handle] = p.prefix
        self.hup.register(r, 0)  # POLLHUP is always reported
        self.ostats.remote_opens += 1
        return True

    def _close_remote(self, handle: int) -> None:
        call_id = self._next_id
        self._next_id += 1
        frame = wire.encode_call(
            wire.Call(call_id, 0, NR["close"], (handle,) + (0,) * 5, (), "offload")
        )
        try:
            self.sock.send(frame, zmq.NOBLOCK)
            self.own_calls.add(call_id)
            self.ostats.remote_closes += 1
        except zmq.Again:
            pass  # the delegate drops the client's fds at BYE

    def _fail(self, trap: Trap, p: Pending, flags: int, t_send: int, t_reply: int) -> None:
        """An unconfirmed offloaded call: the caller sees EIO, the record says why."""
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
        self.expire(time.monotonic_ns())
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
        return {"paths": self.prefixes, **self.ostats.as_dict(), "delegate_lost": self.lost}


class _Fault(Exception):
    pass


_ANSWERED = object()
_FD_LINK = re.compile(r"^/(proc/(self|thread-self|\d+)|dev)/fd/(\d+)/?$")


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


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def check_run_options(
    offload_paths: list[str] | tuple[str, ...] | None,
    backend: str,
    cost_selection: bool = False,
) -> tuple[frozenset[int], list[str]]:
    """Validate ``testbed run --mode offload`` options: (trapped set, normalised prefixes).

    ``cost_selection``: --forward, --policy or --profile was given (cost mode only).
    """
    if cost_selection:
        raise OffloadError("--forward/--policy/--profile choose calls for cost mode; "
                           "offload mode traps the file-I/O calls itself")  # fmt: skip
    if not offload_paths:
        raise OffloadError("--mode offload needs at least one --offload-path PREFIX")
    if backend != "seccomp":
        raise OffloadError("offload mode needs --backend seccomp (ADDFD placeholders)")
    return trapped(), [norm_prefix(p) for p in offload_paths]
