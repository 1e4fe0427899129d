"""The relay's common case in C: ``data/fastpath.c``, compiled at first use.

:class:`testbed.compute.relay.Relay` serves every call in Python.  For the common
case - cost mode, seccomp backend, no other call in flight, a call with no
input buffer or exactly one sized input buffer (``write``, ``read``,
``pwrite64``, ``sendto`` ...) - :func:`attach` lets the relay's idle wait run
``tb_forward`` instead: blocking ``NOTIF_RECV``, one ``pread``, the
fixed-width CALL frame, ``zmq_send`` on the relay's own DEALER (or, on the raw
ZMTP transport, one ``send`` of the framed CALL on that connection's fd), the
wait for the reply (sleeping in ``zmq_poll``/``poll``, or spinning with ``--busy-poll``), the
fixed-width RESULT, ``NOTIF_SEND`` CONTINUE and one ``calls.bin`` record.
Anything else comes back with the notification in hand and the Python path
serves it from where C stopped, so the semantics are the Python path's:

  exec notifications, other argument kinds      -> ``Relay.on_trap`` (nothing sent)
  a buffer that cannot be read, a send refused  -> ``Relay.on_trap`` (read and sent again)
  a second call, a signal, the wait's limit     -> the call joins ``Relay.inflight``
  a reply other than this call's fixed RESULT   -> ``inflight``, then ``Relay.on_frame``
  NOTIF_SEND failing other than ENOENT          -> ``Relay._release``

In offload mode (:class:`testbed.compute.offload.OffloadRelay`) the same loop
serves the data calls on placeholders - ``read write pread64 pwrite64 readv
writev preadv pwritev lseek fstat`` and ``newfstatat(fd, "", st,
AT_EMPTY_PATH)`` - step for step as the Python path does (docs/offload.md,
"The data fast path"): the placeholder table is mirrored into C
(:class:`_Placeholders`), the caller's buffers are judged on ``/dev/null``,
read with ``process_vm_readv`` straight into the CALL and written with
``process_vm_writev`` straight from the RESULT after ``NOTIF_ID_VALID``, the
reply checked as ``OffloadRelay._invalid`` checks it.  The same calls on local
fds are continued in C.  Whatever it does not reproduce exactly goes back to
Python: before sending as a Trap (Python makes the whole call), after as an
in-flight call with its ``Pending`` (a reply that is another call's, malformed
or invalid, an output that did not land whole).

The C code calls libzmq through pointers taken from the library pyzmq itself
loaded (a socket handle belongs to one copy of libzmq), so it needs no libzmq
headers.  Without a C compiler, with ``TESTBED_FASTPATH=0`` in the
environment, or where it does not apply, the Python path serves everything;
``run.json`` ``hot_path`` says which path served how many calls, and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.compute.interpose import Trap
from testbed.core import syscalls
from testbed.core.offload_calls import OFFLOADED
from testbed.core.syscalls import ArgKind

if TYPE_CHECKING:
    import subprocess as _sp

    import zmq

    from testbed.compute.interpose.seccomp import SeccompBackend
    from testbed.compute.relay import Relay

SOURCE = Path(__file__).with_name("data") / "fastpath.c"
#: ``0``/``off``/``no`` turns the C path off (the Python path serves every call).
ENV = "TESTBED_FASTPATH"
#: A reply not seen within this long is handed back to the Python loop (which
#: applies the per-call timeout, flushes records, notices the program's exit).
WAIT_NS = 1_000_000_000
#: tb_forward returns to Python at least this often (signal handlers run then).
SLICE_NS = 50_000_000
#: shm://: how long C looks at the reply ring before it sleeps on the doorbell
#: (without ``--busy-poll``, which spins to the slice's end);
#: ``TESTBED_SHM_SPIN_US`` (also the delegate's) overrides it.
SHM_SPIN_NS = 0
SHM_SPIN_ENV = "TESTBED_SHM_SPIN_US"
TB_ABI = 6
#: offload: a read or pread above this many bytes travels as chunks of it, pipelined
#: (fastpath.c ra_chunked; docs/offload.md "The data fast path")
CHUNK = 256 << 10
TB_ERROR, TB_NONE, TB_FULL, TB_TRAP, TB_INFLIGHT, TB_FRAME, TB_REPLY = -1, 0, 1, 2, 3, 4, 5
_ZMQ_FUNCS = ("zmq_send", "zmq_poll", "zmq_msg_init", "zmq_msg_recv", "zmq_msg_data",
              "zmq_msg_size", "zmq_msg_more", "zmq_msg_close")  # fmt: skip
_NOTIF = struct.Struct("<QIIiIQ6Q")
RECORD_BYTES = 96


class _Ctx(ctypes.Structure):
    """The shared head of ``struct tb_ctx`` (data/fastpath.c), field by field."""

    _fields_ = [
        *(
            (n, ctypes.c_int64)
            for n in ("abi", "listener", "busy", "wait_ns", "slice_ns", "stages", "trap_only")
        ),
        ("sock", ctypes.c_void_p),
        *((f, ctypes.c_void_p) for f in _ZMQ_FUNCS),
        ("next_id", ctypes.c_uint64),
        ("seq", ctypes.c_uint64),
        *((n, ctypes.c_int64) for n in ("nrec", "served", "caller_gone", "err")),
        *((n, ctypes.c_int64) for n in ("t_trap", "t_send", "t_reply", "t_sent", "nbytes", "ret")),
        ("call_id", ctypes.c_uint64),
        ("stamps", ctypes.c_int64 * 4),
        ("frame", ctypes.c_void_p),
        ("frame_len", ctypes.c_int64),
        ("notif", ctypes.c_uint8 * 80),
        *(
            (n, ctypes.c_int64)
            for n in ("raw_fd", "raw_err", "rpos", "rlen", "tail_off", "tail_len")
        ),
        ("rbuf", ctypes.c_void_p),
        ("outp", ctypes.c_void_p),
        *(
            (n, ctypes.c_int64)
            for n in (
                "offload",
                "pipe_dev",
                "devnull",
                "o_local",
                "o_remote",
                "o_handle",
                "o_want",
                "o_nsegs",
                "o_nmap",
            )  # fmt: skip
        ),
        ("shm_base", ctypes.c_void_p),
        *(
            (n, ctypes.c_int64)
            for n in (
                "shm_size",
                "shm_req_bell",
                "shm_rep_bell",
                "shm_ctl",
                "shm_spin_ns",
                "shm_bad",
            )  # fmt: skip
        ),
        ("shm_tx", ctypes.c_uint64),
        ("shm_rx", ctypes.c_uint64),
        ("watched", ctypes.c_int64 * 4),
        *(
            (n, ctypes.c_int64)
            for n in (
                "ra_depth",
                "ra_timeout_ns",
                "ra_lost",
                "ra_issued",
                "ra_served",
                "ra_wasted",
                "ra_undone",
                "ra_lseeks",
                "chunk",
                "o_chunked",
            )
        ),  # fmt: skip
    ]


#: offload mode: the calls the C path serves on placeholders (fastpath.c ``OK_*``)
OFFLOAD_KINDS = {"read": 1, "pread64": 2, "readv": 3, "preadv": 4, "write": 5, "pwrite64": 6,
                 "writev": 7, "pwritev": 8, "lseek": 9, "fstat": 10, "newfstatat": 11}  # fmt: skip


def disabled_by_env() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "off", "no", "false")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "testbed"


def compile_library() -> Path:
    """Compile data/fastpath.c into a shared library once (cached by source hash).

    Raises OSError (no compiler, or it failed) with a short reason.
    """
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    lib = _cache_dir() / f"fastpath-{digest}.so"
    if lib.exists():
        return lib
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc) found")
    lib.parent.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".tmp{os.getpid()}")
    res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    if res.returncode != 0:
        raise OSError(f"cc failed: {res.stderr.strip()[:200]}")
    os.replace(tmp, lib)
    return lib


def _libzmq() -> ctypes.CDLL:
    """The libzmq pyzmq loaded (its extension's dependency, else from /proc/self/maps)."""
    paths = []
    try:
        from zmq.backend.cython import _zmq  # lazy: pyzmq, only when the C path loads

        paths.append(_zmq.__file__)
    except ImportError:
        pass
    with open("/proc/self/maps") as f:
        paths += sorted({ln.split()[-1] for ln in f if "libzmq" in ln.rsplit("/", 1)[-1]})
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            for name in _ZMQ_FUNCS:
                getattr(lib, name)
            return lib
        except (OSError, AttributeError):
            continue
    raise OSError("cannot find the libzmq that pyzmq uses")


_LOADED: tuple[ctypes.CDLL, ctypes.CDLL] | str | None = None


def load() -> tuple[ctypes.CDLL, ctypes.CDLL] | str:
    """(helper library, libzmq), or the reason the C path is unavailable here."""
    global _LOADED
    if _LOADED is None:
        try:
            lib = ctypes.CDLL(str(compile_library()))
            lib.tb_new.restype = ctypes.c_void_p
            lib.tb_records.restype = lib.tb_stages.restype = ctypes.c_void_p
            lib.tb_records.argtypes = lib.tb_stages.argtypes = [ctypes.c_void_p]
            lib.tb_hdr_size.restype = ctypes.c_size_t
            lib.tb_forward.argtypes = lib.tb_frame_done.argtypes = [ctypes.c_void_p]
            lib.tb_free.argtypes = [ctypes.c_void_p]
            lib.tb_set_kind.argtypes = [ctypes.c_void_p, *(ctypes.c_int,) * 4]
            lib.tb_set_okind.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
            lib.tb_segs.restype = ctypes.c_void_p
            lib.tb_segs.argtypes = [ctypes.c_void_p]
            lib.tb_map_set.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64]
            lib.tb_map_del.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
            if lib.tb_hdr_size() != ctypes.sizeof(_Ctx):
                raise OSError("fastpath.c and fastpath.py disagree on the context layout")
            _LOADED = (lib, _libzmq())
        except OSError as exc:
            _LOADED = str(exc)
    return _LOADED


def _set_socket(c: _Ctx, sock: zmq.Socket, libzmq: ctypes.CDLL) -> None:
    """pyzmq's own socket handle and the entry points of the libzmq that made it."""
    c.sock = sock.underlying
    for name in _ZMQ_FUNCS:
        setattr(c, name, ctypes.cast(getattr(libzmq, name), ctypes.c_void_p).value)


def call_kinds() -> dict[int, tuple[int, int, int]]:
    """nr -> (kind, buffer arg, size arg) for the calls the C path serves.

    kind 1: nothing to marshal (only output arguments); kind 2: exactly one
    sized input buffer.  Mirrors :class:`testbed.compute.relay.Marshaller`.
    """
    out = {}
    for nr in syscalls.NAME_BY_NR:
        specs = syscalls.arg_specs(nr)
        if nr >= 512:
            continue
        if len(specs) == 1 and specs[0].kind is ArgKind.IN_BUF:
            out[nr] = (2, specs[0].arg, specs[0].size_arg)
        elif all(s.kind in (ArgKind.OUT_BUF, ArgKind.OUT_IOV, ArgKind.OUT_STRUCT) for s in specs):
            out[nr] = (1, 0, 0)
    return out


class FastPath:
    """Drives ``tb_forward`` for one :class:`testbed.compute.relay.Relay` (see module docstring)."""

    def __init__(self, relay: Relay, lib: ctypes.CDLL, libzmq: ctypes.CDLL):
        self.relay = relay
        self.backend = relay.backend
        self.lib = lib
        self.started = False
        self._ptr = lib.tb_new()
        if not self._ptr:
            raise MemoryError("tb_new")
        c = self.ctx = _Ctx.from_address(self._ptr)
        c.busy = int(relay.busy_poll)
        c.wait_ns = min(relay.timeout_ns, WAIT_NS)
        c.slice_ns = SLICE_NS
        from testbed.core import zmtp  # lazy: zmq; run.py imports this module at startup

        #: the relay's raw ZMTP connection (C sends and receives on its fd), or None
        self.raw = relay.sock if isinstance(relay.sock, zmtp.Dealer) else None
        #: the relay's shm:// connection (C uses its mapped rings), or None
        self.shm = relay.sock if getattr(type(relay.sock), "transport", "") == "shm" else None
        c.shm_spin_ns = _spin_ns()
        if self.raw is None and self.shm is None:
            _set_socket(c, relay.sock, libzmq)
        for nr, (kind, arg, size_arg) in call_kinds().items():
            lib.tb_set_kind(self._ptr, nr, kind, arg, size_arg)
        #: watched calls (counted, continued, never forwarded): kind 3, counts in ctx.watched
        self.watch = frozenset(getattr(self.backend, "watch", ()))
        for nr in self.watch:
            lib.tb_set_kind(self._ptr, nr, 3, 0, 0)
        self._forward = lib.tb_forward
        self._records = lib.tb_records(self._ptr)
        self._stages = lib.tb_stages(self._ptr)
        self._gone_seen = 0
        self._served = 0
        #: offload mode: the relay's placeholders are mirrored into C (``_Placeholders``)
        self.offload = relay.mode == "offload"
        self._devnull = -1
        if self.offload:
            self._devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            c.offload, c.pipe_dev, c.devnull = 1, relay._pipe_dev, self._devnull
            for name, kind in OFFLOAD_KINDS.items():
                lib.tb_set_okind(self._ptr, syscalls.NR_BY_NAME[name], kind)
            self._segs = lib.tb_segs(self._ptr)
            relay.by_ino = _Placeholders(relay.by_ino, self)
            ra = relay.ra
            c.ra_timeout_ns = relay.timeout_ns  # reads sent ahead or in chunks: as any call
            if ra.depth:
                c.ra_depth = ra.depth
                ra.active, ra.why = True, ""
            if relay.in_order:  # large reads in chunks need the delegate to run them in order
                c.chunk = CHUNK

    def map_set(self, ino: int, handle: int) -> None:
        if self._ptr:
            self.lib.tb_map_set(self._ptr, ino, handle)

    def map_del(self, ino: int) -> None:
        if self._ptr:
            self.lib.tb_map_del(self._ptr, ino)

    @property
    def served(self) -> int:
        """Calls served entirely in C so far."""
        return self.ctx.served if self._ptr else self._served

    def serve(self) -> Trap | None:
        """The relay's idle wait: serve calls in C; a Trap for ``on_trap``, or None."""
        backend = self.backend
        if not self.started:
            if not backend.program_started():
                return backend.receive()
            self.started = True
            self.ctx.listener = backend.fileno()  # known once launched
            self.ctx.stages = int(self.relay.stages is not None)
        relay, c, raw = self.relay, self.ctx, self.raw
        if self.offload:
            if (relay.lost or relay.stages is not None or getattr(relay, "swaps", None)
                    or getattr(relay, "lost_tokens", None)):  # fmt: skip
                # every offloaded call fails at once / traced / the Python path has work
                # to do at the next trapped call (a placeholder to give back, a cwd token)
                return backend.receive()
            if relay.readers or relay.retries:  # placeholders the program dropped, retries
                relay.expire(time.monotonic_ns())
        if raw is not None:
            if not raw.c_ready():  # bytes buffered on Python's side, or no connection
                return backend.receive()
            c.raw_fd = raw.fileno()
        ch = None
        if self.shm is not None:
            ch = self.shm.c_channel()
            if ch is None:  # no connection, or messages on Python's side
                return backend.receive()
            c.shm_base, c.shm_size = ch.map.address, ch.map.size
            c.shm_req_bell, c.shm_rep_bell = ch.req_bell, ch.rep_bell
            c.shm_ctl = self.shm.control_fd()
            c.shm_tx, c.shm_rx = ch.tx._mine, ch.rx._mine
        c.next_id = relay._next_id
        c.seq = relay.recorder.count
        rc = self._forward(self._ptr)
        relay._next_id = c.next_id
        if ch is not None:
            ch.tx._mine, ch.rx._mine = c.shm_tx, c.shm_rx
            c.shm_base = None  # (the mapping may go before the next call)
            c.shm_bad = 0  # (Python's ring code finds it again, with its error line)
        if c.nrec or self.offload:
            self.drain()
        frame = None
        if raw is not None:
            frame = self._raw_handback(c, raw, rc)
        if rc <= TB_FULL:
            if rc == TB_ERROR:
                raise OSError(c.err, f"seccomp NOTIF_RECV: {os.strerror(c.err)}")
            return None
        if rc == TB_TRAP:
            return backend.take(bytes(c.notif), c.t_trap)
        v = _NOTIF.unpack(bytes(c.notif))
        trap = Trap(v[0], v[1], v[3], v[6:12], c.t_trap)
        if relay.stages is not None:
            relay._t_sent[trap.id] = c.t_sent
        if rc == TB_REPLY:
            relay._release(trap, 0, c.nbytes, c.t_send, c.t_reply, tuple(c.stamps), ret=c.ret)
            return None
        relay.inflight[c.call_id] = (trap, c.t_send, c.nbytes)
        if self.offload:
            relay.pending[c.call_id] = self._pending(trap)
        if rc == TB_FRAME:
            if frame is None:
                frame = ctypes.string_at(c.frame, c.frame_len)
            self.lib.tb_frame_done(self._ptr)
            relay.on_frame(frame)
        return None

    def _pending(self, trap: Trap):
        """The ``Pending`` the Python path would have made for the call C sent."""
        from testbed.compute.offload import READS, Pending  # lazy: as attach

        c = self.ctx
        name = syscalls.NAME_BY_NR[trap.nr]
        n = c.o_nsegs if name in READS else 0
        flat = struct.unpack(f"<{2 * n}Q", ctypes.string_at(self._segs, 16 * n)) if n else ()
        p = Pending(name, OFFLOADED[name], b"", c.nbytes,
                    out_iov=list(zip(flat[::2], flat[1::2], strict=True)),
                    prefix=self.relay.handle_prefix.get(c.o_handle, ""))  # fmt: skip
        p.handle, p.want = c.o_handle, c.o_want
        return p

    def _raw_handback(self, c: _Ctx, raw, rc: int) -> bytes | None:
        """Give the raw connection back to Python: the unsent rest of a CALL, bytes
        read past the reply, a failed connection.  Returns TB_FRAME's frame (copied
        first: it lies in the read buffer)."""
        frame = ctypes.string_at(c.frame, c.frame_len) if rc == TB_FRAME else None
        if c.tail_len:
            raw.queue_raw(ctypes.string_at(c.outp + c.tail_off, c.tail_len))
            c.tail_len = c.tail_off = 0
        if c.rlen > c.rpos:
            raw.feed(ctypes.string_at(c.rbuf + c.rpos, c.rlen - c.rpos))
        c.rpos = c.rlen = 0
        if c.raw_err:
            err = c.raw_err
            c.raw_err = 0
            raw.lost("the peer closed the connection" if err < 0 else os.strerror(err))
        return frame

    def drain(self) -> None:
        """Move the records C wrote into the relay's recorder (in call order)."""
        c, relay = self.ctx, self.relay
        n = c.nrec if c is not None else 0  # (closed: nothing left)
        if not n:
            self._drain_counts()
            return
        relay.recorder.add_packed(ctypes.string_at(self._records, n * RECORD_BYTES), n)
        if relay.stages is not None:
            raw = ctypes.string_at(self._stages, n * 24)
            relay.stages.extend(struct.iter_unpack("<qqq", raw))
        c.nrec = 0
        c.seq = relay.recorder.count
        stats = relay.stats
        stats.forwarded += n
        stats.caller_gone += c.caller_gone - self._gone_seen
        self._gone_seen = c.caller_gone
        if self.offload:
            self._drain_counts()

    def _drain_counts(self) -> None:
        """Offload: the calls C continued locally or sent, into ``OffloadRelay.ostats``."""
        c = self.ctx
        if c is None or not self.offload:
            return
        ostats = self.relay.ostats
        ostats.local += c.o_local
        ostats.remote += c.o_remote
        ostats.chunked += c.o_chunked
        c.o_local = c.o_remote = c.o_chunked = 0
        ra = self.relay.ra
        if ra.depth:
            ra.issued, ra.served, ra.wasted = c.ra_issued, c.ra_served, c.ra_wasted
            ra.undone_bytes, ra.lseeks = c.ra_undone, c.ra_lseeks
            if c.ra_lost:  # a read sent ahead never came back, or did not fit
                c.ra_depth = 0
                self.relay._lose("a read sent ahead got no valid reply within the timeout "
                                 "(its file offset is unknown)")  # fmt: skip
        gone = c.caller_gone - self._gone_seen  # (ID_VALID failed before sending)
        if gone:
            self.relay.stats.caller_gone += gone
            self._gone_seen = c.caller_gone

    def _drain_watched(self) -> None:
        """The watched calls C counted, into the backend's ``watched``."""
        c, counts = self.ctx, self.backend.watched
        if c is None or counts is None:
            return
        for i in range(len(counts)):
            counts[i] += c.watched[i]
            c.watched[i] = 0

    def close(self) -> None:
        if self._ptr:
            self.drain()
            self._drain_watched()
            self._served = self.ctx.served
            self.ctx = None
            self.lib.tb_free(self._ptr)
            self._ptr = None
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1


class _Placeholders(dict):
    """``OffloadRelay.by_ino`` (placeholder inode -> remote handle), every change also
    made in the C path's table, so both paths see the same placeholders."""

    def __init__(self, items: dict[int, int], fast: FastPath):
        super().__init__(items)
        self._fast = fast
        for ino, handle in items.items():
            fast.map_set(ino, handle)

    def __setitem__(self, ino: int, handle: int) -> None:
        super().__setitem__(ino, handle)
        self._fast.map_set(ino, handle)

    def __delitem__(self, ino: int) -> None:
        super().__delitem__(ino)
        self._fast.map_del(ino)

    def pop(self, ino: int, *default):
        had = ino in self
        value = super().pop(ino, *default)
        if had:
            self._fast.map_del(ino)
        return value

    def popitem(self):
        ino, handle = super().popitem()
        self._fast.map_del(ino)
        return ino, handle

    def setdefault(self, ino: int, handle: int):
        if ino not in self:
            self[ino] = handle
        return self[ino]

    def update(self, *args, **kw) -> None:
        for ino, handle in dict(*args, **kw).items():
            self[ino] = handle

    def clear(self) -> None:
        for ino in list(self):
            del self[ino]


def _spin_ns() -> int:
    try:
        return max(0, int(float(os.environ[SHM_SPIN_ENV]) * 1000))
    except (KeyError, ValueError):
        return SHM_SPIN_NS


def attach(relay: Relay) -> str | None:
    """Give ``relay`` the C path where it applies; returns why not otherwise."""
    from testbed.compute.relay import Relay  # lazy: zmq; run.py imports this module at startup

    if disabled_by_env():
        return f"{ENV}={os.environ.get(ENV)}"
    if relay.mode == "offload":
        if getattr(type(relay.sock), "transport", "") == "shm":
            return "offload mode over shm:// is served by the Python path"
        from testbed.compute.offload import OffloadRelay  # lazy: as Relay

        if type(relay) is not OffloadRelay:
            return "only the offload relay uses it in offload mode"
        if getattr(relay, "wb_limit", 0):
            return "--offload-write-behind is served by the Python path"
    elif type(relay) is not Relay or relay.mode != "cost":
        return "only cost and offload mode use it"
    if getattr(relay.backend, "name", "") != "seccomp":
        return "only the seccomp backend uses it"
    loaded = load()
    if isinstance(loaded, str):
        return loaded
    relay.fast = FastPath(relay, *loaded)
    return None


def describe(relay: Relay, why_not: str | None) -> dict:
    """run.json ``hot_path``: which path served how many forwarded calls."""
    fast = getattr(relay, "fast", None)
    c_calls = fast.served if fast is not None else 0
    return {
        "c": fast is not None,
        "c_calls": c_calls,
        "python_calls": relay.recorder.count - c_calls,
        "why_python": why_not,
        "busy_poll": relay.busy_poll,
    }


def trap_only(backend: SeccompBackend, child: _sp.Popen, deadline: float) -> bool:
    """``testbed bench``'s trap-only row through the C loop: continue every call at once.

    Serves ``backend`` until ``child`` exited and nothing holds the filter;
    False if ``deadline`` (``time.monotonic``) passed first.  The caller runs
    it in the main thread with the relay's watchdog started.
    """
    loaded = load()
    if isinstance(loaded, str):
        raise OSError(loaded)
    lib = loaded[0]
    ptr = lib.tb_new()
    c = _Ctx.from_address(ptr)
    try:
        c.listener = backend.fileno()
        c.trap_only = 1
        c.slice_ns = SLICE_NS
        for nr in call_kinds():
            lib.tb_set_kind(ptr, nr, 1, 0, 0)
        while time.monotonic() < deadline:
            started = backend.program_started()
            rc = lib.tb_forward(ptr) if started else TB_TRAP
            trap = None
            if rc == TB_TRAP:
                trap = backend.take(bytes(c.notif), c.t_trap) if started else backend.receive()
            elif rc == TB_ERROR:
                raise OSError(c.err, os.strerror(c.err))
            if trap is not None:
                backend.resume_continue(trap)
            elif child.poll() is not None and backend.finished():
                return True
        return False
    finally:
        lib.tb_free(ptr)


def zmq_rtt(sock: zmq.Socket, frame: bytes, n: int, busy: bool) -> list[int] | None:
    """``testbed bench``'s raw ZeroMQ row from C: n round trips of ``frame`` on ``sock``.

    Latencies in ns, or None where the C path is unavailable or a round trip failed.
    """
    loaded = load()
    if isinstance(loaded, str):
        return None
    lib, libzmq = loaded
    ptr = lib.tb_new()
    c = _Ctx.from_address(ptr)
    try:
        _set_socket(c, sock, libzmq)
        c.busy = int(busy)
        lat = (ctypes.c_uint32 * n)()
        rc = lib.tb_zmq_rtt(ctypes.c_void_p(ptr), frame, ctypes.c_size_t(len(frame)),
                            ctypes.c_long(n), lat)  # fmt: skip
        return None if rc else list(lat)
    finally:
        lib.tb_free(ptr)


def zmtp_rtt(fd: int, message: bytes, n: int, busy: bool) -> list[int] | None:
    """``testbed bench --breakdown``'s raw ZMTP row: n round trips of ``message`` (one
    message in ZMTP frames, :mod:`testbed.core.zmtp`) on the connected TCP socket ``fd``.

    Latencies in ns, or None where the C path is unavailable or a round trip failed.
    """
    loaded = load()
    if isinstance(loaded, str):
        return None
    lib = loaded[0]
    lat = (ctypes.c_uint32 * n)()
    cap = 1 << 20
    body = ctypes.create_string_buffer(cap)
    rc = lib.tb_zmtp_rtt(ctypes.c_int(fd), message, ctypes.c_size_t(len(message)),
                         ctypes.c_long(n), ctypes.c_int(int(busy)), lat, body,
                         ctypes.c_size_t(cap))  # fmt: skip
    return None if rc else list(lat)


def thread_cpu_ns(pid: int | str = "self") -> dict[str, int]:
    """CPU time (ns, schedstat) of the threads of ``pid``: "main", "zmq" (libzmq's), others by name."""
    out: dict[str, int] = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"{base}/{tid}/comm") as f:
                comm = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue  # ended in between
        main = tid == str(pid) or (pid == "self" and int(tid) == os.getpid())
        key = "main" if main else "zmq" if comm.startswith("ZMQbg") else comm
        out[key] = out.get(key, 0) + ns
    return out


def cpu_since(before: dict[str, int], pid: int | str = "self") -> dict[str, float]:
    """Seconds of CPU per thread group since ``before`` (:func:`thread_cpu_ns`)."""
    now = thread_cpu_ns(pid)
    return {k: (v - before.get(k, 0)) / 1e9 for k, v in sorted(now.items())}
