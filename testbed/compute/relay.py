"""The relay: one event loop between an interposition backend and a delegate.

It polls the backend's fd (calls trapped in the program), its connection to
the delegate (replies; a :class:`testbed.core.zmtp.Dealer` speaking ZMTP itself, or
a pyzmq DEALER for CURVE and other endpoints) and the program's pidfd.  Each trapped
call is marshalled (number, six arguments, input-buffer bytes), sent, and the
caller is released when the reply arrives (cost mode: continue locally) or
when its per-call timeout expires (released locally, counted as a fault).
Many calls can be in flight at once, one per calling thread.

Every forwarded call gets a record with the relay timestamps ``t_trap``,
``t_send``, ``t_reply``, ``t_resume`` and the delegate's ``d_recv``,
``d_exec_start``, ``d_exec_end``, ``d_send`` (see ``testbed.core.rundir``).

Every trapped call is answered exactly once, whatever fails: a caller whose
memory cannot be read (``/proc/TID/mem`` refused, e.g. a program that made
itself non-dumpable) is released locally unsent (``F_UNREADABLE``), a reply
the wire module refuses is a delegate error for that call, and an exception
in the loop releases every call in flight before the relay gives up.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from dataclasses import dataclass, field

import zmq

from testbed.compute import escapes
from testbed.compute.interpose import Backend, CallerGone, Trap
from testbed.compute.spec import check_timeout
from testbed.core import keys, rundir, shmring, syscalls, wire, zmtp
from testbed.core.errors import TestbedError
from testbed.core.syscalls import ArgKind

_IOVEC = struct.Struct("<QQ")
PROBE_INTERVAL_NS = 1_000_000_000
_POLLIN = int(zmq.POLLIN)  # plain ints: IntFlag arithmetic is slow on the hot path
_NOBLOCK = int(zmq.NOBLOCK)


class DelegateUnreachable(TestbedError):
    pass


def connect(
    endpoint: str,
    timeout_s: float = 3.0,
    ctx: zmq.Context | None = None,
    info: dict | None = None,
    curve_keys: str | None = None,
    transport: str | None = None,
) -> tuple[zmq.Context | None, zmq.Socket | zmtp.Dealer, dict]:
    """Open a DEALER to ``endpoint`` and complete the HELLO/WELCOME handshake.

    With ``curve_keys`` (a directory made by ``testbed keys new``, see :mod:`testbed.core.keys`)
    the connection is CURVE-authenticated and encrypted.  ``transport``
    ``"zmtp"`` (the default where :func:`testbed.core.zmtp.transport` allows it) is a
    :class:`testbed.core.zmtp.Dealer` speaking ZMTP itself; ``"libzmq"`` a pyzmq socket;
    ``"shm"`` (``shm://PATH``, same node) a :class:`testbed.core.shmring.Dealer`.
    """
    transport = transport or zmtp.transport(endpoint, curve_keys)
    if transport == "shm":
        if curve_keys:
            raise DelegateUnreachable(f"{endpoint}: CURVE is not available over shared memory "
                                      "(a same-node delegate; use ipc:// with CURVE)")  # fmt: skip
        try:
            sock = shmring.Dealer(endpoint)
        except TestbedError as exc:
            raise DelegateUnreachable(str(exc)) from None
        return ctx, sock, _handshake(sock, endpoint, timeout_s, info, curve_keys)
    if transport == "zmtp":
        try:
            sock = zmtp.Dealer(endpoint)
        except TestbedError as exc:
            raise DelegateUnreachable(str(exc)) from None
        return ctx, sock, _handshake(sock, endpoint, timeout_s, info, curve_keys)
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    if curve_keys:
        try:
            keys.setup_client(sock, curve_keys)
        except TestbedError:
            sock.close()
            raise
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        sock.close()
        raise DelegateUnreachable(f"cannot connect to {endpoint}: {exc}") from None
    return ctx, sock, _handshake(sock, endpoint, timeout_s, info, curve_keys)


def _handshake(sock, endpoint: str, timeout_s: float, info: dict | None, curve_keys) -> dict:
    """HELLO, then the WELCOME (closing ``sock`` on failure)."""
    hello = wire.encode_hello({"host": os.uname().nodename, "pid": os.getpid(), **(info or {})})
    sock.send(hello)  # (a refused dial is retried inside poll, as libzmq does)
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000) + 1):
            continue
        try:
            kind, payload = wire.decode(sock.recv())
        except wire.WireError as exc:
            if exc.code != wire.E_VERSION:
                continue
            sock.close()
            raise DelegateUnreachable(f"delegate at {endpoint} answered in another wire "
                                      f"protocol version: {exc}") from None  # fmt: skip
        if kind == wire.WELCOME:
            return payload
        if kind == wire.ERROR:
            sock.close()
            raise DelegateUnreachable(f"delegate at {endpoint} refused the handshake: {payload}")
    sock.close()
    hint = " (does it need --curve-keys?)" if not curve_keys else " (are the CURVE keys right?)"
    raise DelegateUnreachable(f"no delegate answering at {endpoint} within {timeout_s:g} s{hint}")


class Marshaller:
    """Reads a trapped call's input buffers out of the caller (argument specs)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._specs = {nr: syscalls.arg_specs(nr) for nr in syscalls.NAME_BY_NR}
        # calls whose only input is one sized buffer (write, pwrite64, sendto, ...):
        # (buffer argument, size argument), read without walking the specs
        self._one_buf = {
            nr: (specs[0].arg, specs[0].size_arg)
            for nr, specs in self._specs.items()
            if len(specs) == 1 and specs[0].kind is ArgKind.IN_BUF
        }

    def buffers(self, trap: Trap) -> tuple[tuple[tuple[int, bytes], ...], int]:
        one = self._one_buf.get(trap.nr)
        if one is not None:
            args = trap.args
            addr = args[one[0]]
            if not addr:
                return (), 0
            data = self.backend.read_memory(trap.tid, addr, min(args[one[1]], syscalls.MAX_BUFFER))
            return ((one[0], data),), len(data)
        specs = self._specs.get(trap.nr, ())
        if not specs:
            return (), 0
        out = []
        total = 0
        read = self.backend.read_memory
        args = trap.args
        for spec in specs:
            addr = args[spec.arg]
            if not addr:
                continue
            if spec.kind is ArgKind.IN_BUF:
                data = read(trap.tid, addr, min(args[spec.size_arg], syscalls.MAX_BUFFER))
            elif spec.kind is ArgKind.PATH:
                data = self._path(trap.tid, addr)
            elif spec.kind is ArgKind.IN_STRUCT:
                data = read(trap.tid, addr, spec.size)
            elif spec.kind is ArgKind.IN_IOV:
                data = self._iov(trap.tid, addr, min(args[spec.size_arg], 1024))
            else:
                continue  # output buffers: nothing to send in cost mode
            out.append((spec.arg, data))
            total += len(data)
        return tuple(out), total

    def _path(self, tid: int, addr: int) -> bytes:
        data = b""
        while len(data) < syscalls.MAX_PATH:
            chunk_len = 4096 - ((addr + len(data)) % 4096)  # never cross into an unmapped page
            chunk = self.backend.read_memory(tid, addr + len(data), chunk_len)
            if not chunk:
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                return data + chunk[:nul]
            data += chunk
        return data[: syscalls.MAX_PATH]

    def _iov(self, tid: int, addr: int, count: int) -> bytes:
        raw = self.backend.read_memory(tid, addr, count * _IOVEC.size)
        parts, total = [], 0
        for i in range(len(raw) // _IOVEC.size):
            base, length = _IOVEC.unpack_from(raw, i * _IOVEC.size)
            if total >= syscalls.MAX_BUFFER:
                break
            if not length:
                continue  # a zero-length entry moves nothing; the next ones do (writev(2))
            length = min(length, syscalls.MAX_BUFFER - total)
            parts.append(self.backend.read_memory(tid, base, length))
            total += length
        return b"".join(parts)


@dataclass
class RunStats:
    forwarded: int = 0
    timeouts: int = 0
    peer_errors: int = 0
    not_sent: int = 0
    unreadable: int = 0
    caller_gone: int = 0
    late_replies: int = 0
    peer_lost_at: list[float] = field(default_factory=list)


class Relay:
    """Serve one program's trapped calls against one delegate (see module docstring)."""

    def __init__(
        self,
        backend: Backend,
        sock: zmq.Socket | zmtp.Dealer,
        recorder: rundir.CallRecorder,
        mode: str = "cost",
        timeout_s: float = 2.0,
        busy_poll: bool = False,
    ):
        self.backend = backend
        self.busy_poll = busy_poll
        self.sock = sock
        self.recorder = recorder
        self.mode = mode
        self.timeout_ns = int(check_timeout("timeout", timeout_s) * 1e9)
        self.marshal = Marshaller(backend)
        self.stats = RunStats()
        self.inflight: dict[int, tuple[Trap, int, int]] = {}  # call_id -> (trap, t_send, bytes_in)
        self.peer_down = False
        #: the program's /proc/PID/io when it exited, before it was reaped (or why not)
        self.exit_io: dict[str, int] | str | None = None
        self._next_probe = 0
        self._next_id = 1
        self._last_released: Trap | None = None
        self._warned: set[str] = set()
        #: per-call (t_sent, t_decoded, t_recorded) when tracing stages (None: off;
        #: a list when the run's ``RunSpec.stage_trace`` names a file)
        self.stages: list[tuple[int, int, int]] | None = None
        self._t_sent: dict[int, int] = {}
        self._t_decoded = 0
        #: the common case in C (testbed.compute.fastpath.attach), None: Python serves all
        self.fast = None

    # ------------------------------------------------------------ calls
    def on_trap(self, trap: Trap) -> None:
        """Forward one trapped call; whatever fails, the call is answered once."""
        try:
            self._forward(trap)
        except Exception as exc:  # a bug must not leave a program blocked in its call
            if not self._answered_or_inflight(trap):
                self._warn_once("internal", f"relay failed on a {trap.nr} call: {exc!r:.200}")
                self._release(trap, rundir.F_NOT_SENT, 0, 0, 0)

    def _answered_or_inflight(self, trap: Trap) -> bool:
        return self._last_released is trap or any(e[0] is trap for e in self.inflight.values())

    def _warn_once(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            print(f"testbed: warning: {text}", file=sys.stderr, flush=True)

    def _forward(self, trap: Trap) -> None:
        try:
            bufs, nbytes = self.marshal.buffers(trap)
        except CallerGone as exc:
            # gone, or its memory is unreadable: answer anyway (a gone caller
            # makes resume fail, and the record says F_CALLER_GONE instead)
            self._warn_once("unreadable", f"cannot read the memory of thread {trap.tid} ({exc}); "
                            "such calls run locally without being forwarded and count as faults")  # fmt: skip
            self._release(trap, rundir.F_UNREADABLE, 0, 0, 0)
            return
        # The bytes only size the message in cost mode; offload mode acts on them,
        # so there the notification must still be valid after reading (TOCTOU).
        if self.mode == "offload" and not self.backend.is_valid(trap):
            self.stats.caller_gone += 1
            return
        if self.peer_down:
            self._release(trap, rundir.F_NOT_SENT, nbytes, 0, 0)
            return
        call_id = self._next_id
        self._next_id += 1
        frame = wire.encode_call_fields(call_id, trap.tid, trap.nr, trap.args, bufs, self.mode)
        t_send = time.monotonic_ns()
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self._release(trap, rundir.F_NOT_SENT, nbytes, 0, 0)
            return
        self.inflight[call_id] = (trap, t_send, nbytes)
        if self.stages is not None:
            self._t_sent[trap.id] = time.monotonic_ns()

    def on_frame(self, frame: bytes) -> None:
        t_reply = time.monotonic_ns()
        try:
            kind, payload = wire.decode(frame)
        except wire.WireError as exc:
            entry = self.inflight.pop(exc.call_id, None) if exc.call_id else None
            self._warn_once("malformed", f"malformed frame from the delegate: {exc}")
            if entry is not None:  # e.g. a result out of range: an error for that call
                trap, t_send, nbytes = entry
                self.stats.peer_errors += 1
                self._release(trap, rundir.F_PEER_ERROR, nbytes, t_send, t_reply)
            return
        if self.stages is not None:
            self._t_decoded = time.monotonic_ns()
        if kind == wire.WELCOME:
            self.peer_down = False
            return
        if kind == wire.RESULT:
            entry = self.inflight.pop(payload.call_id, None)
            if entry is None:
                self.stats.late_replies += 1
                return
            trap, t_send, nbytes = entry
            stamps = (payload.t_recv, payload.t_exec_start, payload.t_exec_end, payload.t_send)
            self._release(trap, 0, nbytes, t_send, t_reply, stamps, ret=payload.ret)
        elif kind == wire.ERROR:
            entry = self.inflight.pop(payload.call_id, None) if payload.call_id else None
            if entry is None:
                print(
                    f"testbed: warning: delegate error: {payload.code}: {payload}", file=sys.stderr
                )
                return
            trap, t_send, nbytes = entry
            self.stats.peer_errors += 1
            self._release(trap, rundir.F_PEER_ERROR, nbytes, t_send, t_reply)

    def _release(
        self,
        trap: Trap,
        flags: int,
        nbytes: int,
        t_send: int,
        t_reply: int,
        stamps: tuple[int, int, int, int] = (0, 0, 0, 0),
        ret: int = 0,
    ) -> None:
        self._last_released = trap
        if self.fast is not None:
            self.fast.drain()  # its records come first: they are older
        if not self.backend.resume_continue(trap):
            flags = (flags & ~rundir.F_UNREADABLE) | rundir.F_CALLER_GONE
            self.stats.caller_gone += 1
        t_resume = time.monotonic_ns()
        # the caller runs again: what follows is off its path
        stats = self.stats
        if flags:
            if flags & rundir.F_NOT_SENT:
                stats.not_sent += 1
            if flags & rundir.F_UNREADABLE:
                stats.unreadable += 1
        stats.forwarded += 1
        self.recorder.add(trap.tid, trap.nr, flags, ret, nbytes, 0,
                          trap.t_trap, t_send, t_reply, t_resume, *stamps)  # fmt: skip
        if self.stages is not None:
            t_sent = self._t_sent.pop(trap.id, 0)
            self.stages.append((t_sent, self._t_decoded, time.monotonic_ns()))
            self._t_decoded = 0

    def release_all(self) -> None:
        """Release every call in flight locally (the relay is giving up)."""
        while self.inflight:
            _id, (trap, t_send, nbytes) = self.inflight.popitem()
            self.stats.timeouts += 1
            self._release(trap, rundir.F_TIMEOUT, nbytes, t_send, 0)

    def expire(self, now: int) -> None:
        """Release calls whose timeout passed (oldest first: dict keeps send order)."""
        while self.inflight:
            call_id, (trap, t_send, nbytes) = next(iter(self.inflight.items()))
            if now - t_send < self.timeout_ns:
                break
            del self.inflight[call_id]
            self.stats.timeouts += 1
            if not self.peer_down:
                self.peer_down = True
                self.stats.peer_lost_at.append(time.time())
                print(f"testbed: warning: no reply from the delegate within {self.timeout_ns / 1e9:g} s; "
                      "releasing calls locally until it answers again", file=sys.stderr)  # fmt: skip
            self._release(trap, rundir.F_TIMEOUT, nbytes, t_send, 0)

    def _shm_lost(self, shm: shmring.Dealer, now: int) -> int:
        """The shm delegate is gone (EOF/HUP on its socket, or a malformed ring): no reply
        can come, so the calls in flight end now as if their timeout had passed (cost
        mode: released locally; offload mode: EIO).  Returns the drops seen."""
        if self.inflight:
            print(f"testbed: warning: lost the delegate at {shm.endpoint} ({shm.last_error}); "
                  f"ending {len(self.inflight)} call(s) in flight", file=sys.stderr)  # fmt: skip
            # known lost, not timed out: expire must not say "no reply within ..."
            self.peer_gone(f"lost the delegate at {shm.endpoint} ({shm.last_error})")
            self.expire(now + self.timeout_ns)
        return shm.drops

    def peer_gone(self, why: str) -> None:
        """The delegate is known to be gone (``why``): calls are released locally from
        now on, until a probe finds it again."""
        if not self.peer_down:
            self.peer_down = True
            self.stats.peer_lost_at.append(time.time())

    def probe(self, now: int) -> None:
        if self.peer_down and now >= self._next_probe:
            self._next_probe = now + PROBE_INTERVAL_NS
            try:
                self.sock.send(wire.encode_hello({"probe": True}), zmq.NOBLOCK)
            except zmq.Again:
                pass

    def next_timeout_ms(self, now: int) -> int:
        wait = 1000
        if self.inflight:
            t_send = next(iter(self.inflight.values()))[1]
            wait = min(wait, max(0, (t_send + self.timeout_ns - now) // 1_000_000 + 1))
        if self.peer_down:
            wait = min(wait, max(0, (self._next_probe - now) // 1_000_000 + 1))
        return int(wait)

    # ------------------------------------------------------------ loop
    def serve(self, child_pid: int, linger_s: float = 10.0) -> tuple[int, object, int]:
        """Serve until the program and every task holding the filter are gone.

        Returns (wait status, rusage, exit time ns) of the program's main process.
        """
        bfd = self.backend.fileno()
        pidfd = os.pidfd_open(child_pid)
        sock = self.sock
        shm = sock if isinstance(sock, shmring.Dealer) else None  # (its drops: a dead peer)
        shm_drops = shm.drops if shm is not None else 0
        if shm is not None:
            poller = shmring.Poller()
        else:
            poller = zmtp.Poller() if isinstance(sock, zmtp.Dealer) else zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(bfd, zmq.POLLIN)
        poller.register(pidfd, zmq.POLLIN)
        poll = poller.poll
        status = rusage = None
        t_exit = 0
        linger_deadline = None
        recv = sock.recv
        receive = self.backend.receive
        on_trap, on_frame = self.on_trap, self.on_frame
        inflight = self.inflight
        recorder = self.recorder
        mono = time.monotonic_ns
        busy_poll = self.busy_poll
        blocking = self.backend.begin_serving()
        fast = self.fast
        try:
            while True:
                if blocking and status is None and not inflight:
                    # Idle: wait inside NOTIF_RECV (the kernel's synchronous wake-up
                    # applies there, not to poll).  SIGCHLD or the watchdog timer
                    # interrupts it (EINTR -> None) so the exit is seen.
                    trap = fast.serve() if fast is not None and not self.peer_down else receive()
                    if trap is not None:
                        on_trap(trap)
                        continue
                    timeout_ms = 0
                elif busy_poll and inflight:
                    timeout_ms = 0  # spin while a reply is due: no idle wake-up on the way back
                else:
                    timeout_ms = self.next_timeout_ms(mono())
                for what, ev in poll(timeout_ms):
                    if not ev & _POLLIN:
                        continue
                    if what is sock:
                        # one frame per wake-up: the next poll returns at once if more
                        # are queued (cheaper than ending a drain loop on zmq.Again)
                        on_frame(recv(_NOBLOCK))
                    elif what == bfd:
                        trap = receive()
                        if trap is not None:
                            on_trap(trap)
                    elif what == pidfd and status is None:
                        t_exit = mono()
                        self.exit_io = escapes.exit_io(child_pid, pidfd)  # still a zombie
                        _pid, status, rusage = os.wait4(child_pid, 0)
                        poller.unregister(pidfd)
                        linger_deadline = time.monotonic() + linger_s
                now = mono()
                if shm is not None and shm.drops != shm_drops:
                    shm_drops = self._shm_lost(shm, now)
                if inflight:
                    self.expire(now)
                if self.peer_down:
                    self.probe(now)
                recorder.tick(now)
                if status is not None and not inflight and self.backend.finished():
                    break
                if linger_deadline is not None and time.monotonic() > linger_deadline:
                    print("testbed: warning: descendants of the program still run; "
                          "stopping the relay (their calls now fail with ENOSYS)", file=sys.stderr)  # fmt: skip
                    break
        finally:
            self.backend.end_serving()
            os.close(pidfd)
            self.release_all()  # only non-empty if the loop raised
        return status, rusage, t_exit
