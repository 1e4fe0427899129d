"""Soak: good clients while one hostile peer at a time attacks the delegate (issue 19).

    python3 benchmarks/soak.py [--seconds S] [--quiet-seconds Q] [--attacks a,b,...]
                               [--transport zmtp|libzmq|both] [--clients N] [--ulimit N]
                               [--json OUT]

For every (transport, attack) it starts a fresh ``python -m testbed delegate
--listen tcp://127.0.0.1:* --transport T`` from this checkout (with
``--offload-root SCRATCH --insecure`` for the attacks that need offload mode,
under ``prlimit --nofile=N:N`` with ``--ulimit N``), then:

  quiet     Q seconds of good clients only (each its own process: HELLO, then
            cost-mode CALLs at ``--rate`` per second, each with a timeout)
  attack    S seconds of the same good clients plus one attacker process
  recovery  the attacker is stopped (its process exits, its sockets close);
            seconds until the delegate's RSS and fd count are back within a
            margin of what they were before the attack AND a brand-new client
            gets a WELCOME (capped: ">15")

One table row per (transport, attack): the good clients' p50 and p99 during the
attack as ratios to the quiet phase of the same run, the delegate's peak
(``VmHWM``) and current (``VmRSS``) memory growth over its RSS before the
attack, its fd growth at the end of the attack (and the peak, sampled every
0.1 s), its CPU seconds during the attack (``/proc/PID/stat`` utime + stime;
``cpu0`` is the quiet phase's CPU scaled to the attack's length), the good
clients' errors and timeouts during the attack, and the recovery time; under
each row, what the attacker counted (dials, bytes sent, cuts, refusals).

Attackers (each bounded in time, connections and its own memory):

  parts         raw ZMTP peer streaming empty MORE parts (``b"\\x01\\x00" * 131072``
                per write), never finishing the message; re-dials when cut
  fds           offload client opening one file until refused (at most 1100
                opens), holding them 1 s, then dropping the connection without
                BYE and starting over on a new one (also when an open is not
                answered within 2 s)
  silent        1000 TCP connections that never send a byte (re-dialled when cut)
  slowloris     256 connections sending greeting + READY, then one byte of a
                1 MiB frame every 0.5 s each (re-dialled when cut)
  pings         raw peer sending ZMTP 3.1 PING commands in a loop, never reading
  empty-frames  raw peer sending complete empty messages (``b"\\x00\\x00"``...),
                never reading
  big-unread    8 offload peers sending pread64 calls of 1 MiB of a 1 MiB file,
                never reading the replies
  huge-frame    4 peers at a time announcing a frame longer than the delegate's
                limit, waiting to be cut, re-dialling (at most 1000 dials/s)

Safety valve: an attack is ended early (``aborted`` in the row) when the
delegate's RSS passes ``--rss-limit`` MiB or the delegate dies.  Progress goes
to stderr; the table to stdout; ``--json OUT`` writes every row with the host
facts (``testbed.core.hostinfo.host_metadata``).  The numbers are what today's
delegate does: nothing here judges them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import multiprocessing as mp
import os
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from pathlib import Path

import numpy as np

TOP = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, TOP)

from testbed.core import syscalls, wire  # noqa: E402
from testbed.core.zmtp import GREETING, frame, frame_head, ready_command  # noqa: E402

ATTACKS = (
    "parts",
    "fds",
    "silent",
    "slowloris",
    "pings",
    "empty-frames",
    "big-unread",
    "huge-frame",
)
#: attacks that need the delegate in offload mode
OFFLOAD_ATTACKS = frozenset({"fds", "big-unread"})
TRANSPORTS = ("zmtp", "libzmq")

#: files the offload attackers use, created in the scratch root
FDS_FILE = b"soak-fds"
BIG_FILE = b"soak-big"
BIG_SIZE = 1 << 20

# attackers' sizes (see the module docstring)
PARTS_CHUNK = b"\x01\x00" * 131072
FDS_OPENS = 1100
FDS_HOLD_S = 1.0
FDS_MAX_CYCLES = 1000
SILENT_CONNS = 1000
SLOW_CONNS = 256
SLOW_EVERY_S = 0.5
SLOW_FRAME = b"\x02" + struct.pack(">Q", 1 << 20) + b"s" * (1 << 20)
PING_CONTEXT = b"soak-ping-ctx-16"  # 16 bytes: the longest context a PONG echoes
PINGS_PER_WRITE = 4096
EMPTY_PER_WRITE = 65536
BIG_PEERS = 8
HUGE_PEERS = 4
HUGE_MAX_DIALS_PER_S = 1000
HUGE_SIZES = (wire.MAX_FRAME + (64 << 10) + 1, 1 << 40)  # just above the hard limit; absurd
#: re-dials an attacker makes at most (whatever the duration)
MAX_REDIALS = 200_000

# good clients' call: a cost-mode write(1, buf, 64) carrying 64 bytes
GOOD_PAYLOAD = b"x" * 64
NR_WRITE = syscalls.NR_BY_NAME["write"]
NR_OPEN = syscalls.NR_BY_NAME["open"]
NR_PREAD = syscalls.NR_BY_NAME["pread64"]

# status of a good client's call
OK, TIMEOUT, ERROR_REPLY, CONN_ERROR = 0, 1, 2, 3

SAMPLE_EVERY_S = 0.1


def progress(msg: str) -> None:
    print(f"soak: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc


def proc_mem(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status") as f:
        text = f.read()
    rss = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    if not rss or not hwm:
        raise ProcessLookupError(pid)  # a zombie has no memory lines
    return int(rss.group(1)) / 1024, int(hwm.group(1)) / 1024


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_cpu(pid: int) -> float:
    """utime + stime of every thread of ``pid``, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        raise ProcessLookupError(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snapshot(pid: int) -> dict | None:
    """The delegate's memory, fds and CPU now; None once it is gone."""
    try:
        rss, hwm = proc_mem(pid)
        return {
            "t": time.monotonic(),
            "rss": rss,
            "hwm": hwm,
            "fds": proc_fds(pid),
            "cpu": proc_cpu(pid),
        }
    except (OSError, ProcessLookupError, ValueError, IndexError):
        return None


# ---------------------------------------------------------------- raw ZMTP peer

_ENDPOINT = re.compile(r"tcp://([^:/]+):(\d+)")


def address(endpoint: str) -> tuple[str, int]:
    m = _ENDPOINT.fullmatch(endpoint)
    if not m:
        raise ValueError(f"not a tcp://HOST:PORT endpoint: {endpoint!r}")
    return m.group(1), int(m.group(2))


def dial(endpoint: str, data: bytes = b"", timeout: float = 2.0) -> socket.socket:
    """A TCP connection that has sent ``data`` (nothing is read)."""
    s = socket.create_connection(address(endpoint), timeout=timeout)
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if data:
            s.sendall(data)
    except BaseException:
        s.close()
        raise
    return s


class Peer:
    """A blocking raw ZMTP DEALER that keeps partial input across timeouts, so a
    call that timed out leaves the stream intact (its late reply is skipped)."""

    def __init__(self, endpoint: str, timeout: float, hello: bytes | None = None):
        self.sock = dial(endpoint, hello or GREETING + ready_command(b"DEALER"), timeout)
        self.buf = bytearray()
        deadline = time.monotonic() + timeout
        try:
            self._need(64, deadline)
            if self.buf[0] != 0xFF or self.buf[9] != 0x7F or self.buf[10] < 3:
                raise ConnectionError(f"{endpoint} does not speak ZMTP 3")
            del self.buf[:64]
            flags, _ = self._frame(deadline)  # its READY
            if not flags & 0x04:
                raise ConnectionError("a message before READY")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _need(self, n: int, deadline: float) -> None:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply in time")
            self.sock.settimeout(left)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("the delegate closed the connection")
            self.buf += chunk

    def _frame(self, deadline: float) -> tuple[int, bytes]:
        while True:
            head = frame_head(self.buf, 0, len(self.buf))
            if head is not None and len(self.buf) >= head[2] + head[1]:
                flags, size, hl = head
                body = bytes(self.buf[hl : hl + size])
                del self.buf[: hl + size]
                return flags, body
            self._need(len(self.buf) + 1, deadline)

    def recv(self, deadline: float) -> tuple[str, object]:
        """The next message, decoded (commands skipped; the last part of a multipart one)."""
        while True:
            flags, body = self._frame(deadline)
            if flags & 0x04 or flags & 0x01:
                continue
            return wire.decode(body)

    def send(self, payload: bytes, timeout: float) -> None:
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(frame(payload))
        except TimeoutError:  # part of a frame may be out: the stream is lost
            raise ConnectionError("send timed out") from None

    def request(self, payload: bytes, timeout: float, call_id: int | None = None):
        """Send; the reply to ``call_id`` (any reply when None), skipping late ones."""
        deadline = time.monotonic() + timeout
        self.send(payload, timeout)
        while True:
            kind, res = self.recv(deadline)
            if call_id is None:
                return kind, res
            if kind == wire.RESULT and res.call_id == call_id:
                return kind, res
            if kind == wire.ERROR and res.call_id in (call_id, None):
                return kind, res


def hello(peer: Peer, timeout: float) -> None:
    kind, res = peer.request(wire.encode_hello({"host": "soak", "pid": os.getpid()}), timeout)
    if kind != wire.WELCOME:
        raise ConnectionError(f"HELLO answered with {kind}: {res}")


def offload_call(call_id: int, nr: int, args: tuple[int, ...], bufs=()) -> bytes:
    full = tuple(args) + (0,) * (6 - len(args))
    return wire.encode_call(wire.Call(call_id, os.getpid() & 0x7FFFFFFF, nr, full, bufs, "offload"))


def probe_welcome(endpoint: str, timeout: float = 1.0) -> bool:
    """A brand-new client gets a WELCOME within ``timeout``."""
    try:
        peer = Peer(endpoint, timeout)
    except (OSError, ValueError):
        return False
    try:
        hello(peer, timeout)
        return True
    except (OSError, wire.WireError, ValueError):
        return False
    finally:
        peer.close()


def _child_setup() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops and kills us


# ---------------------------------------------------------------- good clients


def good_client(endpoint: str, idx: int, rate: float, call_timeout: float, stop, q) -> None:
    """HELLO, then paced cost-mode CALLs until ``stop``; (t_send, latency, status) to ``q``."""
    _child_setup()
    interval = 1.0 / rate
    ts, lat, st = array("q"), array("q"), array("b")
    peer: Peer | None = None
    call_id = idx << 40
    tid = (os.getpid() + idx) & 0x7FFFFFFF
    ready_sent = False
    next_t = time.monotonic()
    hard_end = next_t + 24 * 3600
    while not stop.is_set() and time.monotonic() < hard_end:
        now = time.monotonic()
        if next_t > now:
            time.sleep(next_t - now)
        next_t = max(next_t + interval, time.monotonic())
        if peer is None:
            t0 = time.monotonic_ns()
            try:
                peer = Peer(endpoint, call_timeout)
                hello(peer, call_timeout)
            except (OSError, wire.WireError, ValueError):
                if peer is not None:
                    peer.close()
                peer = None
                ts.append(t0), lat.append(-1), st.append(CONN_ERROR)
                time.sleep(0.1)
                continue
            if not ready_sent:
                q.put(("ready", idx))
                ready_sent = True
        call_id += 1
        frame_ = wire.encode_call(
            wire.Call(
                call_id, tid, NR_WRITE, (1, 0x1000, 64, 0, 0, 0), ((1, GOOD_PAYLOAD),), "cost"
            )
        )
        t0 = time.monotonic_ns()
        try:
            kind, _ = peer.request(frame_, call_timeout, call_id)
            status = OK if kind == wire.RESULT else ERROR_REPLY
        except TimeoutError:
            status = TIMEOUT  # the connection stays; a late reply is skipped
        except (OSError, wire.WireError):
            status = CONN_ERROR
            peer.close()
            peer = None
        ts.append(t0), lat.append(time.monotonic_ns() - t0), st.append(status)
    if peer is not None:
        peer.close()
    q.put(("done", idx, ts.tobytes(), lat.tobytes(), st.tobytes()))


# ---------------------------------------------------------------- attackers


class Stats(dict):
    def add(self, key: str, n: int = 1) -> None:
        self[key] = self.get(key, 0) + n


def _running(stop, end: float) -> bool:
    return not stop.is_set() and time.monotonic() < end


def _pump(s: socket.socket, data: memoryview, pos: int, wait: float) -> tuple[int, int]:
    """Send ``data`` from ``pos`` (wrapping: it is whole frames) for up to ``wait``
    seconds on a non-blocking socket; (new pos, bytes sent).  OSError when cut."""
    sent, until = 0, time.monotonic() + wait
    while True:
        try:
            n = s.send(data[pos:], socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            left = until - time.monotonic()
            if left <= 0:
                return pos, sent
            select.select([], [s], [], min(left, 0.05))
            continue
        sent += n
        pos = (pos + n) % len(data)
        if time.monotonic() >= until:
            return pos, sent


def _stream(endpoint: str, stop, end: float, st: Stats, payload: bytes, hello_: bytes) -> None:
    """One connection writing ``payload`` (whole frames) over and over; never reads;
    re-dials when cut."""
    data = memoryview(payload)
    s, pos = None, 0
    while _running(stop, end):
        if s is None:
            if st.get("dials", 0) >= MAX_REDIALS:
                break
            st.add("dials")
            try:
                s = dial(endpoint, hello_)
                s.setblocking(False)
                pos = 0
            except OSError:
                st.add("dial_errors")
                s = None
                time.sleep(0.05)
                continue
        try:
            pos, n = _pump(s, data, pos, 0.2)
            st.add("bytes_sent", n)
        except OSError:
            st.add("cut")
            s.close()
            s = None
    if s is not None:
        s.close()


def attack_parts(endpoint: str, stop, end: float, st: Stats) -> None:
    _stream(endpoint, stop, end, st, PARTS_CHUNK, GREETING + ready_command(b"DEALER"))


def attack_pings(endpoint: str, stop, end: float, st: Stats) -> None:
    body = b"\x04PING" + b"\x00\x00" + PING_CONTEXT  # TTL 0, 16-byte context
    ping = bytes([0x04, len(body)]) + body
    greeting31 = GREETING[:11] + b"\x01" + GREETING[12:]  # ZMTP 3.1: heartbeats
    _stream(endpoint, stop, end, st, ping * PINGS_PER_WRITE, greeting31 + ready_command(b"DEALER"))


def attack_empty_frames(endpoint: str, stop, end: float, st: Stats) -> None:
    _stream(endpoint, stop, end, st, b"\x00\x00" * EMPTY_PER_WRITE,
            GREETING + ready_command(b"DEALER"))  # fmt: skip


def attack_fds(endpoint: str, stop, end: float, st: Stats) -> None:
    """Open one file until refused, hold, drop the connection (no BYE), start over."""
    open_ = (0, os.O_RDONLY, 0)
    while _running(stop, end) and st.get("cycles", 0) < FDS_MAX_CYCLES:
        try:
            peer = Peer(endpoint, 2.0)
        except OSError:
            st.add("dial_errors")
            time.sleep(0.1)
            continue
        st.add("cycles")
        try:
            hello(peer, 2.0)
            for i in range(FDS_OPENS):
                if not _running(stop, end):
                    break
                kind, res = peer.request(offload_call(i, NR_OPEN, open_, ((0, FDS_FILE),)),
                                         2.0, i)  # fmt: skip
                if kind == wire.RESULT and res.errno == 0:
                    st.add("opened")
                    continue
                st.add("refused")
                why = f"errno {res.errno}" if kind == wire.RESULT else f"{res.code}: {res}"
                st.setdefault("first_refusal", f"after {i} opens: {why}")
                break
            hold_end = min(end, time.monotonic() + FDS_HOLD_S)
            while _running(stop, hold_end):
                time.sleep(0.05)
        except TimeoutError:
            st.add("unanswered")  # no reply within 2 s: start over on a new connection
        except (OSError, wire.WireError) as exc:
            st.add("cut")
            st.setdefault("first_cut", f"{exc.__class__.__name__}: {exc}")
        finally:
            peer.close()


def _raise_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            hard = need  # root may raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def nb_dial(endpoint: str) -> socket.socket:
    """A non-blocking TCP socket whose connect is under way (the kernel retries SYNs
    a full accept queue dropped, so thousands can be dialled without waiting)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    rc = s.connect_ex(address(endpoint))
    if rc not in (0, errno.EINPROGRESS):
        s.close()
        raise OSError(rc, os.strerror(rc))
    return s


def attack_silent(endpoint: str, stop, end: float, st: Stats) -> None:
    """SILENT_CONNS connections that never send a byte; cut ones are re-dialled."""
    _raise_nofile(SILENT_CONNS + 256)
    socks: dict[int, socket.socket] = {}
    up: set[int] = set()  # connected (the others are still connecting)
    poller = select.poll()
    pending = select.POLLOUT | select.POLLIN | select.POLLRDHUP

    def drop(fd: int) -> None:
        poller.unregister(fd)
        up.discard(fd)
        socks.pop(fd).close()

    while _running(stop, end):
        while len(socks) < SILENT_CONNS and st.get("dials", 0) < MAX_REDIALS:
            st.add("dials")
            try:
                s = nb_dial(endpoint)
            except OSError:
                st.add("dial_errors")
                break
            socks[s.fileno()] = s
            poller.register(s.fileno(), pending)
        for fd, ev in poller.poll(200):
            s = socks[fd]
            if fd not in up and ev & select.POLLOUT:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    st.add("dial_errors")
                    drop(fd)
                    continue
                up.add(fd)
                poller.modify(fd, select.POLLIN | select.POLLRDHUP)
            if ev & (select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR):
                try:
                    gone = s.recv(4096) == b""  # the delegate's greeting, or EOF
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    st.add("cut")
                    drop(fd)
        st["held_max"] = max(st.get("held_max", 0), len(up))
    st["held_at_end"] = len(up)
    for s in socks.values():
        s.close()


def attack_slowloris(endpoint: str, stop, end: float, st: Stats) -> None:
    """SLOW_CONNS connections: greeting + READY, then one byte of a frame every
    SLOW_EVERY_S each; cut ones are re-dialled."""
    _raise_nofile(SLOW_CONNS + 256)
    hello_ = GREETING + ready_command(b"DEALER")
    conns: list[list] = [[None, -1] for _ in range(SLOW_CONNS)]  # socket, pos (-1: hello due)
    while _running(stop, end):
        round_end = time.monotonic() + SLOW_EVERY_S
        for c in conns:
            if c[0] is None:
                if st.get("dials", 0) >= MAX_REDIALS:
                    continue
                st.add("dials")
                try:
                    c[0], c[1] = nb_dial(endpoint), -1
                except OSError:
                    st.add("dial_errors")
                    continue
            s, pos = c
            try:
                with contextlib.suppress(BlockingIOError):
                    s.recv(4096)  # its greeting; EOF shows in the send below
                if pos < 0:
                    s.send(hello_, socket.MSG_NOSIGNAL)  # (small: all or nothing here)
                    c[1] = 0
                else:
                    s.send(SLOW_FRAME[pos : pos + 1], socket.MSG_NOSIGNAL)
                    st.add("bytes_sent")
                    c[1] = (pos + 1) % len(SLOW_FRAME)
            except BlockingIOError:
                pass  # still connecting
            except OSError:
                st.add("cut")
                s.close()
                c[0] = None
        st["trickling_max"] = max(st.get("trickling_max", 0), sum(c[1] > 0 for c in conns))
        left = round_end - time.monotonic()
        if left > 0:
            stop.wait(left)
    for s, _ in conns:
        if s is not None:
            s.close()


def attack_big_unread(endpoint: str, stop, end: float, st: Stats) -> None:
    """BIG_PEERS offload peers sending 1 MiB pread64 calls, never reading a reply."""
    peers: list[list] = [[None, None, 0] for _ in range(BIG_PEERS)]  # socket, calls, pos
    call_len = len(frame(offload_call(2, NR_PREAD, (3, 0x1000, BIG_SIZE, 0))))

    def setup(p: list) -> None:
        peer = Peer(endpoint, 2.0)
        try:
            hello(peer, 2.0)
            kind, res = peer.request(
                offload_call(1, NR_OPEN, (0, os.O_RDONLY, 0), ((0, BIG_FILE),)), 5.0, 1
            )
            if kind != wire.RESULT or res.errno:
                raise ConnectionError(f"open refused: {res}")
        except BaseException:
            peer.close()
            raise
        call = frame(offload_call(2, NR_PREAD, (res.ret, 0x1000, BIG_SIZE, 0)))
        peer.sock.setblocking(False)
        p[:] = [peer.sock, memoryview(call * 64), 0]

    while _running(stop, end):
        for p in peers:
            if p[0] is None:
                if st.get("dials", 0) >= MAX_REDIALS:
                    continue
                st.add("dials")
                try:
                    setup(p)
                except (OSError, wire.WireError) as exc:
                    st.add("dial_errors")
                    st.setdefault("first_dial_error", f"{exc.__class__.__name__}: {exc}")
                    continue
            try:
                p[2], n = _pump(p[0], p[1], p[2], 0.02)
                st.add("bytes_sent", n)
            except OSError:
                st.add("cut")
                p[0].close()
                p[0] = None
        if all(p[0] is None for p in peers):
            time.sleep(0.1)
    st["calls_sent"] = st.get("bytes_sent", 0) // call_len
    for p in peers:
        if p[0] is not None:
            p[0].close()


def attack_huge_frame(endpoint: str, stop, end: float, st: Stats) -> None:
    """HUGE_PEERS connections at a time announce a frame above the limit and wait to
    be cut; then again (at most HUGE_MAX_DIALS_PER_S)."""
    hello_ = GREETING + ready_command(b"DEALER")
    heads = [b"\x02" + struct.pack(">Q", n) + b"z" * 65536 for n in HUGE_SIZES]
    i = 0
    while _running(stop, end) and st.get("dials", 0) < MAX_REDIALS:
        t0 = time.monotonic()
        socks = []
        for _ in range(HUGE_PEERS):
            st.add("dials")
            try:
                s = dial(endpoint, hello_, timeout=1.0)
            except OSError:
                st.add("dial_errors")
                continue
            try:
                s.sendall(heads[i % len(heads)])
                st.add("bytes_sent", len(heads[i % len(heads)]))
            except OSError:
                pass  # cut while sending: counted below
            i += 1
            socks.append(s)
        for s in socks:  # the delegate should close each one at once
            s.settimeout(0.5)
            try:
                while s.recv(65536):
                    pass
                st.add("cut")
            except TimeoutError:
                st.add("not_cut")
            except OSError:
                st.add("cut")
            s.close()
        pace = HUGE_PEERS / HUGE_MAX_DIALS_PER_S - (time.monotonic() - t0)
        if pace > 0:
            time.sleep(pace)
        if not socks:
            time.sleep(0.05)


ATTACKERS = {
    "parts": attack_parts,
    "fds": attack_fds,
    "silent": attack_silent,
    "slowloris": attack_slowloris,
    "pings": attack_pings,
    "empty-frames": attack_empty_frames,
    "big-unread": attack_big_unread,
    "huge-frame": attack_huge_frame,
}


def attacker(name: str, endpoint: str, seconds: float, go, stop, q) -> None:
    """Process body: wait for ``go``, attack until ``stop`` (or ``seconds`` + 5 s)."""
    _child_setup()
    q.put(("ready", name))
    st = Stats()
    if go.wait(120):
        end = time.monotonic() + seconds + 5.0  # a bound even if the parent is gone
        try:
            ATTACKERS[name](endpoint, stop, end, st)
        except Exception as exc:  # report, never hang the benchmark
            st["crashed"] = f"{exc.__class__.__name__}: {exc}"
    q.put(("done", dict(st)))


# ---------------------------------------------------------------- one case


class CaseError(Exception):
    pass


class Sampler(threading.Thread):
    """Samples the delegate every SAMPLE_EVERY_S; flags RSS above the limit or death."""

    def __init__(self, pid: int, rss_limit: float):
        super().__init__(daemon=True)
        self.pid, self.rss_limit = pid, rss_limit
        self.samples: list[dict] = []
        self.alarm = threading.Event()
        self.why = ""
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            s = snapshot(self.pid)
            if s is None:
                self.why = self.why or "delegate died"
                self.alarm.set()
                return
            self.samples.append(s)
            if s["rss"] > self.rss_limit and not self.why:
                self.why = f"RSS {s['rss']:.0f} MiB > --rss-limit {self.rss_limit:.0f}"
                self.alarm.set()
            self.halt.wait(SAMPLE_EVERY_S)

    def peak(self, key: str, t0: float, t1: float) -> float | None:
        vals = [s[key] for s in self.samples if t0 <= s["t"] <= t1]
        return max(vals) if vals else None


def start_delegate(transport: str, offload_root: str | None, ulimit: int | None, log: Path):
    argv = [sys.executable, "-m", "testbed", "delegate", "--listen", "tcp://127.0.0.1:*",
            "--transport", transport]  # fmt: skip
    if offload_root:
        argv += ["--offload-root", offload_root, "--insecure"]
    if ulimit:
        argv = ["prlimit", f"--nofile={ulimit}:{ulimit}", "--", *argv]
    env = dict(os.environ)
    env["PYTHONPATH"] = TOP + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=f, cwd=TOP, env=env)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on (\S+) ", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
    stop_process(proc)
    raise CaseError(f"the delegate did not start: {last}")


def stop_process(proc: subprocess.Popen) -> int | None:
    """SIGTERM, then SIGKILL after 3 s; the exit status."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)
    return proc.returncode


def _kill_children(children: list) -> None:
    for p in children:
        if p.is_alive():
            p.kill()
        p.join(5)


def _collect(q, n: int, kind: str, timeout: float) -> list[tuple]:
    """``n`` messages of ``kind`` from ``q`` (fewer if ``timeout`` passes)."""
    out, deadline = [], time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = q.get(timeout=left)
        except Exception:  # queue.Empty
            break
        if msg[0] == kind:
            out.append(msg)
    return out


def _latency_stats(ts, lat, st, t0_ns: int, t1_ns: int) -> dict:
    sel = (ts >= t0_ns) & (ts < t1_ns)
    ok = lat[sel & (st == OK)] / 1e3
    return {
        "calls": int(sel.sum()),
        "ok": int(ok.size),
        "p50_us": float(np.percentile(ok, 50)) if ok.size else None,
        "p99_us": float(np.percentile(ok, 99)) if ok.size else None,
        "timeouts": int((sel & (st == TIMEOUT)).sum()),
        "errors": int((sel & ((st == ERROR_REPLY) | (st == CONN_ERROR))).sum()),
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def _log_lines(log: Path, limit: int = 12) -> list[str]:
    """The delegate's distinct warning lines (not its status and accounting lines)."""
    seen: list[str] = []
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return seen
    for line in lines:
        line = line.strip()
        if not line or "listening on" in line or "client " in line or "stopped after" in line:
            continue
        short = re.sub(r"\d+", "N", line)[:200]
        if short not in seen:
            seen.append(short)
        if len(seen) >= limit:
            break
    return seen


def run_case(transport: str, attack: str, args: argparse.Namespace) -> dict:
    tag = f"[{transport}/{attack}]"
    scratch = Path(tempfile.mkdtemp(prefix="soak-"))
    root = scratch / "root"
    root.mkdir()
    (root / FDS_FILE.decode()).write_bytes(b"soak\n")
    (root / BIG_FILE.decode()).write_bytes(os.urandom(BIG_SIZE))
    log = scratch / "delegate.log"
    ctx = mp.get_context("spawn")
    q_good, q_atk = ctx.Queue(), ctx.Queue()
    stop_good, go, stop_atk = ctx.Event(), ctx.Event(), ctx.Event()
    children: list = []
    proc = None
    sampler = None
    row: dict = {"transport": transport, "attack": attack}
    try:
        offload = str(root) if attack in OFFLOAD_ATTACKS else None
        proc, endpoint = start_delegate(transport, offload, args.ulimit, log)
        pid = proc.pid
        progress(f"{tag} delegate pid {pid} on {endpoint}"
                 f"{' (offload mode)' if offload else ''}; starting {args.clients} clients")  # fmt: skip
        for i in range(args.clients):
            p = ctx.Process(target=good_client, name=f"soak-good-{i}", daemon=True,
                            args=(endpoint, i, args.rate, args.call_timeout, stop_good, q_good))  # fmt: skip
            p.start()
            children.append(p)
        atk = ctx.Process(target=attacker, name=f"soak-{attack}", daemon=True,
                          args=(attack, endpoint, args.seconds, go, stop_atk, q_atk))  # fmt: skip
        atk.start()
        children.append(atk)
        if len(_collect(q_good, args.clients, "ready", 60)) < args.clients:
            raise CaseError("the good clients never got a WELCOME")
        if not _collect(q_atk, 1, "ready", 60):
            raise CaseError("the attacker process did not start")
        sampler = Sampler(pid, args.rss_limit)
        sampler.start()

        progress(f"{tag} quiet phase: {args.quiet_seconds:g} s of good clients only")
        t_q0 = time.monotonic()
        q0 = snapshot(pid)
        if sampler.alarm.wait(args.quiet_seconds):
            raise CaseError(f"the delegate failed in the quiet phase: {sampler.why}")
        t_a0 = time.monotonic()
        before = snapshot(pid)
        if q0 is None or before is None:
            raise CaseError("the delegate died in the quiet phase")

        progress(f"{tag} attack phase: {args.seconds:g} s")
        go.set()
        aborted = sampler.why if sampler.alarm.wait(args.seconds) else ""
        t_a1 = time.monotonic()
        end = snapshot(pid)
        if aborted:
            progress(f"{tag} attack ended early: {aborted}")
        stop_atk.set()
        atk_stats = _collect(q_atk, 1, "done", 10)
        atk.join(5)
        if atk.is_alive():
            atk.kill()
            atk.join(5)
        t_stop = time.monotonic()

        progress(f"{tag} recovery: waiting up to {args.recovery_cap:g} s")
        recovery = None
        while proc.poll() is None and time.monotonic() - t_stop < args.recovery_cap:
            now = snapshot(pid)
            if (
                now is not None
                and now["rss"] <= before["rss"] + args.margin_mib
                and now["fds"] <= before["fds"] + args.margin_fds
                and probe_welcome(endpoint)
            ):
                recovery = time.monotonic() - t_stop
                break
            time.sleep(0.2)
        after = snapshot(pid)

        stop_good.set()
        done = _collect(q_good, args.clients, "done", args.call_timeout + 15)
        ts = np.frombuffer(b"".join(d[2] for d in done), dtype=np.int64)
        lat = np.frombuffer(b"".join(d[3] for d in done), dtype=np.int64)
        st = np.frombuffer(b"".join(d[4] for d in done), dtype=np.int8)
        ns = 1_000_000_000
        quiet = _latency_stats(ts, lat, st, int(t_q0 * ns), int(t_a0 * ns))
        during = _latency_stats(ts, lat, st, int(t_a0 * ns), int(t_stop * ns))
        alive = end is not None and after is not None
        last = end or (sampler.samples[-1] if sampler.samples else before)
        quiet_s, attack_s = t_a0 - t_q0, t_a1 - t_a0
        cpu_quiet = before["cpu"] - q0["cpu"]
        fds_peak = max(sampler.peak("fds", t_a0, t_stop) or 0, last["fds"])
        row.update(
            {
                "seconds": attack_s,
                "quiet_seconds": quiet_s,
                "clients": args.clients,
                "rate_per_client": args.rate,
                "offload": bool(offload),
                "delegate_pid": pid,
                "quiet_p50_us": quiet["p50_us"],
                "quiet_p99_us": quiet["p99_us"],
                "attack_p50_us": during["p50_us"],
                "attack_p99_us": during["p99_us"],
                "p50_ratio": _ratio(during["p50_us"], quiet["p50_us"]),
                "p99_ratio": _ratio(during["p99_us"], quiet["p99_us"]),
                "quiet_calls": quiet["calls"],
                "quiet_errors": quiet["errors"],
                "quiet_timeouts": quiet["timeouts"],
                "attack_calls": during["calls"],
                "attack_ok": during["ok"],
                "attack_errors": during["errors"],
                "attack_timeouts": during["timeouts"],
                "rss_before_mib": before["rss"],
                "hwm_before_mib": before["hwm"],
                "rss_end_mib": last["rss"],
                "hwm_end_mib": last["hwm"],
                "hwm_growth_mib": last["hwm"] - before["rss"],
                "rss_growth_mib": last["rss"] - before["rss"],
                "fds_before": before["fds"],
                "fds_end": last["fds"],
                "fds_peak": fds_peak,
                "fds_growth": last["fds"] - before["fds"],
                "fds_peak_growth": fds_peak - before["fds"],
                "cpu_attack_s": last["cpu"] - before["cpu"],
                "cpu_quiet_s": cpu_quiet,
                "cpu_quiet_scaled_s": cpu_quiet * attack_s / quiet_s if quiet_s > 0 else 0.0,
                "recovered": recovery is not None,
                "recovery_s": recovery if recovery is not None else float(args.recovery_cap),
                "recovery_cap_s": float(args.recovery_cap),
                "rss_after_mib": after["rss"] if after else None,
                "fds_after": after["fds"] if after else None,
                "delegate_alive": alive,
                "aborted": aborted,
                "attacker": atk_stats[0][1] if atk_stats else {"lost": "no report"},
            }
        )
        progress(f"{tag} done")
    finally:
        stop_atk.set()
        stop_good.set()
        if sampler is not None:
            sampler.halt.set()
            sampler.join(2)
        if children:
            for p in children:
                p.join(max(0.1, args.call_timeout + 2) if p.is_alive() else 0)
            _kill_children(children)
        if proc is not None:
            row["delegate_rc"] = stop_process(proc)
            row["delegate_log"] = _log_lines(log)
        for q in (q_good, q_atk):
            q.close()
            q.cancel_join_thread()
        shutil.rmtree(scratch, ignore_errors=True)
    return row


# ---------------------------------------------------------------- table


COLUMNS = (
    f"{'transport':<9} {'attack':<12} {'p50x':>6} {'p99x':>7} {'peak+MiB':>9} {'rss+MiB':>8} "
    f"{'fds+':>6} {'fds^':>6} {'cpu s':>6} {'cpu0 s':>6} {'err':>5} {'tmo':>5} {'recovery':>8}  note"
)


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def table_row(r: dict) -> str:
    if "error" in r:
        return f"{r['transport']:<9} {r['attack']:<12} case failed: {r['error']}"
    cap = r["recovery_cap_s"]
    rec = f"{r['recovery_s']:.1f} s" if r["recovered"] else f">{cap:g}"
    notes = []
    if not r["delegate_alive"]:
        notes.append(f"DELEGATE DIED (rc {r.get('delegate_rc')})")
    if r["aborted"]:
        notes.append(f"ended early: {r['aborted']}")
    atk = ", ".join(f"{k} {str(v)[:90]}" for k, v in r["attacker"].items())
    return (
        f"{r['transport']:<9} {r['attack']:<12} {_fmt(r['p50_ratio'], '6.2f'):>6} "
        f"{_fmt(r['p99_ratio'], '7.2f'):>7} {r['hwm_growth_mib']:>+9.1f} "
        f"{r['rss_growth_mib']:>+8.1f} {r['fds_growth']:>+6d} {r['fds_peak_growth']:>+6d} "
        f"{r['cpu_attack_s']:>6.2f} {r['cpu_quiet_scaled_s']:>6.2f} {r['attack_errors']:>5d} "
        f"{r['attack_timeouts']:>5d} {rec:>8}  {'; '.join(notes)}".rstrip()
        + f"\n{'':<9} attacker: {atk or 'no report'}"
    )


LEGEND = (
    "p50x/p99x: good clients' latency during the attack / quiet phase (same run); "
    "peak+MiB: VmHWM at the attack's end - VmRSS before; rss+MiB: VmRSS then - before; "
    "fds+: fds at the attack's end - before; fds^: peak (0.1 s samples) - before; "
    "cpu s: delegate CPU during the attack; cpu0 s: quiet phase's CPU scaled to the attack's "
    "length; err/tmo: good clients' errors and timed-out calls during the attack; "
    "recovery: s after the attacker stopped until RSS and fds are within the margin of "
    "before and a new client gets a WELCOME; attacker: what the attacker process counted"
)


# ---------------------------------------------------------------- options


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(v) or v <= 0 or v > 24 * 3600:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, not {text!r}")
    return v


def _positive(text: str, lo: float = 0.0, hi: float = math.inf, kind=float):
    """A number in (lo, hi]; an int when ``kind`` is int."""
    try:
        v = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
    if not (math.isfinite(v) and lo < v <= hi):
        if kind is int:
            raise argparse.ArgumentTypeError(
                f"must be an integer from {int(lo) + 1} to {int(hi)}, not {text!r}"
            )
        raise argparse.ArgumentTypeError(f"must be > {lo:g} and <= {hi:g}, not {text!r}")
    return v


def _attacks(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one attack")
    bad = [n for n in names if n not in ATTACKS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown attack {bad[0]!r} (choose from {', '.join(ATTACKS)})"
        )
    return list(dict.fromkeys(names))


def _json_out(text: str) -> str:
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory")
    if not p.resolve().parent.is_dir():
        raise argparse.ArgumentTypeError(f"the directory of {text!r} does not exist")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="soak.py",
        description="Good clients' latency and the delegate's memory, fds, CPU and recovery "
        "while one attacker at a time misbehaves (issue 19).",
    )
    ap.add_argument("--seconds", type=_seconds, default=60.0, metavar="S",
                    help="length of each attack (default 60)")  # fmt: skip
    ap.add_argument("--quiet-seconds", type=_seconds, metavar="Q",
                    help="length of the quiet phase before each attack (default: S)")  # fmt: skip
    ap.add_argument("--attacks", type=_attacks, default=list(ATTACKS), metavar="A,B,...",
                    help=f"attacks to run (default all: {','.join(ATTACKS)})")  # fmt: skip
    ap.add_argument("--transport", choices=("zmtp", "libzmq", "both"), default="both",
                    help="the delegate's --transport (default both)")  # fmt: skip
    ap.add_argument("--clients", type=lambda t: int(_positive(t, 0, 64, int)), default=3,
                    metavar="N", help="good clients, one process each (default 3, at most 64)")  # fmt: skip
    ap.add_argument("--rate", type=lambda t: _positive(t, 0, 20000), default=200.0,
                    metavar="R", help="calls per second per good client (default 200)")  # fmt: skip
    ap.add_argument("--call-timeout", type=lambda t: _positive(t, 0, 60), default=1.0,
                    metavar="T", help="a good call's timeout in seconds (default 1)")  # fmt: skip
    ap.add_argument("--recovery-cap", type=lambda t: _positive(t, 0, 600), default=15.0,
                    metavar="C", help="longest wait for recovery, s (default 15)")  # fmt: skip
    ap.add_argument("--margin-mib", type=lambda t: _positive(t, 0, 1 << 20), default=16.0,
                    metavar="M", help="RSS within M MiB of before counts as recovered (default 16)")  # fmt: skip
    ap.add_argument("--margin-fds", type=lambda t: int(_positive(t, -1, 1 << 20, int)),
                    default=16, metavar="F",
                    help="fds within F of before count as recovered (default 16)")  # fmt: skip
    ap.add_argument("--rss-limit", type=lambda t: _positive(t, 0, 1 << 24), default=4096.0,
                    metavar="MIB", help="end an attack early when the delegate's RSS passes "
                    "this (protects the host; default 4096)")  # fmt: skip
    ap.add_argument("--ulimit", type=lambda t: int(_positive(t, 63, 1 << 24, int)),
                    metavar="N", help="start the delegate under prlimit --nofile=N:N (default: "
                    "this process's limit)")  # fmt: skip
    ap.add_argument("--json", type=_json_out, metavar="OUT",
                    help="write every row and the host facts to OUT")  # fmt: skip
    args = ap.parse_args(argv)
    if args.quiet_seconds is None:
        args.quiet_seconds = args.seconds
    if args.ulimit and shutil.which("prlimit") is None:
        ap.error("--ulimit needs prlimit (util-linux), which is not installed")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    from testbed.core.hostinfo import host_metadata

    host = host_metadata()
    cases = [(t, a) for t in transports for a in args.attacks]
    progress(f"{len(cases)} cases, {args.seconds:g} s attack + {args.quiet_seconds:g} s quiet "
             f"each, {args.clients} good clients at {args.rate:g} calls/s")  # fmt: skip
    print(f"soak: {args.clients} good clients x {args.rate:g} calls/s, attack {args.seconds:g} s, "
          f"quiet {args.quiet_seconds:g} s, recovery cap {args.recovery_cap:g} s, "
          f"margins {args.margin_mib:g} MiB / {args.margin_fds} fds"
          f"{f', delegate ulimit -n {args.ulimit}' if args.ulimit else ''}")  # fmt: skip
    print(COLUMNS, flush=True)
    rows = []
    failed = 0
    for transport, attack in cases:
        try:
            row = run_case(transport, attack, args)
        except CaseError as exc:
            failed += 1
            progress(f"[{transport}/{attack}] failed: {exc}")
            row = {"transport": transport, "attack": attack, "error": str(exc)}
        rows.append(row)
        print(table_row(row), flush=True)
    print(LEGEND)
    print(f"host {host.get('hostname')} kernel {host.get('kernel')} cpu {host.get('cpu_model')} "
          f"x{host.get('cores')}, python {host.get('python')}, libzmq {host.get('libzmq')}")  # fmt: skip
    if args.json:
        report = {
            "host": host,
            "options": {k: v for k, v in vars(args).items() if k != "json"},
            "rows": rows,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
