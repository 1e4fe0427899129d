"""``testbed replay``: re-issue a run's forwarded calls against a delegate (docs/whatif.md).

A run directory holds, per forwarded call, the thread, the number, the bytes
sent and the relay's timestamps.  Replay rebuilds the program's timeline from
them, per call::

    gap   what the thread did between two forwarded calls (its computation, its
          local calls, the trap's own cost before the relay saw the call)
    pre   t_send - t_trap: the relay's work before sending (reading, encoding)
    rtt   t_reply - t_send: wire and delegate, the one part a replay measures anew
    post  t_resume - t_reply: the relay's work after the reply (decoding, resuming)

Each call is *anchored* to the event it followed in the recording: a thread's
next call to its own previous resume, and also to the end (last call) of any
other thread that ended in between (a child it waited for: recorded order is
all a run directory knows of causality); a thread's first call to the latest
earlier event of any thread (e.g. the parent that forked it), the first call
to the program's start; the program's exit to the last event before it.  An
event is due at its latest anchor's replayed time plus the recorded offset,
so a slower delegate delays whatever followed each call, as it would delay
the program.

Two ways to spend the gaps:

* reproduce (default): spin through them, so the replay takes as long as the
  program would, and calls of different threads overlap as they did;
* ``elide_compute``: issue the calls back to back, one at a time, and compose
  the timeline from the measured round trips afterwards (:func:`timeline`):
  fast for compute-bound programs; calls of different threads never overlap.

The payload of each call is synthesised (zero bytes, the recorded size); the
delegate answers in cost mode.  The result is an ordinary run directory
(``mode`` ``replay``, backend ``replay``; ``run.json`` ``replay`` names the
source run), so ``analyze`` reads it unchanged.
"""

from __future__ import annotations

import heapq
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from analysis import model
from testbed.compute.relay import connect
from testbed.core import mechanisms, rundir, syscalls, wire
from testbed.core.errors import TestbedError
from testbed.core.hostinfo import host_metadata

#: run.json fields that say where a replay's calls went (its mechanism)
_TARGET_KEYS = ("endpoint", "transport", "curve", "delegate")
#: Source modes a replay understands: cost mode (and replays of replays).
REPLAYABLE_MODES = ("cost", "replay")

_START, _TRAP, _RESUME = 0, 1, 2  # anchor kinds
_ARGS = (0, 0, 0, 0, 0, 0)
#: How long before a due event the replay stops sleeping for replies and spins.
WAKE_MARGIN_NS = 2_000_000


class ReplayError(TestbedError):
    """A run directory that cannot be replayed, or a replay that could not run."""


@dataclass(frozen=True)
class Schedule:
    """A recorded run's calls in trap order, with their anchors (see module docstring).

    Arrays are indexed by call (recorded ``t_trap`` order).  ``anchor_kind`` is
    0 (the program's start), 1 (the trap of call ``anchor``) or 2 (the resume
    of call ``anchor``); ``offset`` the recorded ns from that event to this
    call's trap.  ``end_kind``/``end_anchor``/``end_offset`` place the
    program's exit the same way.  ``sent`` is False for calls the source never
    had answered (faults): a replay runs them locally (``pre`` only).
    """

    tid: np.ndarray
    nr: np.ndarray
    bytes_in: np.ndarray
    pre: np.ndarray
    post: np.ndarray
    rtt: np.ndarray
    sent: np.ndarray
    anchor_kind: np.ndarray
    anchor: np.ndarray
    offset: np.ndarray
    #: a second anchor: the resume of call ``waits_for`` (-1: none), the last call
    #: of another thread that ended within this call's gap (a child it waited for)
    waits_for: np.ndarray
    wait_offset: np.ndarray
    end_kind: int
    end_anchor: int
    end_offset: int
    #: whether the program's start and exit stamps were recorded (False: run.json
    #: predates ``t_exec_ns``; the time outside calls is all put before the first)
    stamped: bool

    def __len__(self) -> int:
        return len(self.nr)


def schedule(calls: np.ndarray, wall_s: float, t_exec_ns: int = 0, t_exit_ns: int = 0) -> Schedule:
    """The :class:`Schedule` of a run's ``calls`` (``CALL_DTYPE``) lasting ``wall_s``.

    ``t_exec_ns``/``t_exit_ns``: the program's start and exit on the relay's
    clock (``run.json``); without them the time outside the calls' span is
    put before the first call.
    """
    order = np.argsort(calls["t_trap"], kind="stable")
    c = calls[order]
    n = len(c)
    trap = c["t_trap"].astype(np.int64)
    answered = (c["t_send"] > 0) & (c["t_reply"] >= c["t_send"]) & (c["t_resume"] >= c["t_reply"])
    resume = np.where(c["t_resume"] > 0, c["t_resume"], trap).astype(np.int64)
    resume = np.maximum(resume, trap)
    pre = np.where(answered, c["t_send"] - trap, resume - trap).astype(np.int64)
    post = np.where(answered, resume - c["t_reply"], 0).astype(np.int64)
    rtt = np.where(answered, c["t_reply"] - c["t_send"], 0).astype(np.int64)
    stamped = bool(t_exec_ns and t_exit_ns and n and t_exec_ns <= trap[0])
    if n == 0:
        t0 = 0
        t_end = int(round(wall_s * 1e9))
    elif stamped:
        t0, t_end = int(t_exec_ns), int(max(t_exit_ns, resume.max()))
    else:
        span = int(resume.max() - trap[0])
        t0 = int(trap[0] - max(0, round(wall_s * 1e9) - span))
        t_end = int(resume.max())
    kind = np.zeros(n, dtype=np.int8)
    anchor = np.full(n, -1, dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    # events so far, as (time, kind, call) with the latest kept per thread and overall
    last_of_tid: dict[int, int] = {}
    by_resume = np.argsort(resume, kind="stable")
    r = 0  # resumes at or before the current trap, in time order
    latest = (t0, _START, -1)  # latest event seen so far (time, kind, call)
    for i in range(n):
        t = int(trap[i])
        while r < n and resume[by_resume[r]] <= t:
            j = int(by_resume[r])
            if j < i and resume[j] >= latest[0]:
                latest = (int(resume[j]), _RESUME, j)
            r += 1
        tid = int(c["tid"][i])
        prev = last_of_tid.get(tid)
        if prev is not None and resume[prev] <= t:
            kind[i], anchor[i], offset[i] = _RESUME, prev, t - resume[prev]
        else:
            kind[i], anchor[i], offset[i] = latest[1], latest[2], t - latest[0]
        last_of_tid[tid] = i
        if t >= latest[0]:
            latest = (t, _TRAP, i)
    # a thread's next call also waits for the threads that ended within its gap
    waits_for = np.full(n, -1, dtype=np.int64)
    wait_offset = np.zeros(n, dtype=np.int64)
    last = np.array(sorted(last_of_tid.values(), key=lambda j: resume[j]), dtype=np.int64)
    ends = resume[last] if n else np.zeros(0, dtype=np.int64)
    for i in range(n):
        if kind[i] != _RESUME:
            continue
        k = int(np.searchsorted(ends, trap[i], side="right")) - 1
        if k >= 0 and ends[k] > resume[anchor[i]] and last[k] != anchor[i]:
            waits_for[i], wait_offset[i] = last[k], trap[i] - ends[k]
    # the exit follows the latest event before it
    end = (t0, _START, -1)
    if n:
        j = int(np.argmax(resume))
        end = (int(resume[j]), _RESUME, j)
        if trap[-1] > end[0]:
            end = (int(trap[-1]), _TRAP, n - 1)
    return Schedule(
        tid=c["tid"].astype(np.int64), nr=c["nr"].astype(np.int64),
        bytes_in=c["bytes_in"].astype(np.int64), pre=pre, post=post, rtt=rtt, sent=answered,
        anchor_kind=kind, anchor=anchor, offset=np.maximum(offset, 0),
        waits_for=waits_for, wait_offset=wait_offset, end_kind=end[1], end_anchor=end[2], end_offset=max(0, t_end - end[0]), stamped=stamped,
    )  # fmt: skip


def timeline(
    s: Schedule, rtt: np.ndarray, async_writes: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """Compose the replayed timeline: (trap, resume, end) in ns from the start,
    each call held ``pre + rtt + post`` (``rtt`` per call; 0 for unsent calls).

    With the recorded round trips it gives back the recorded timeline, so the
    program's wall time with other round trips is ``end``.

    ``async_writes`` W > 0 composes asynchronous forwarding of writes (as NFS
    async, FlexSC's exception-less calls): a write (:data:`ASYNC_CALLS`) is held
    ``pre + post`` only, its reply arriving ``rtt`` after it was sent, while
    fewer than W of its thread's writes are unanswered (else it is sent when
    the oldest answer arrives); a flushing call (:data:`FLUSH_CALLS`) and the
    thread's last call (its exit closes its files) wait for all of them.
    """
    n = len(s)
    trap = np.zeros(n, dtype=np.int64)
    resume = np.zeros(n, dtype=np.int64)
    rtt = np.where(s.sent, rtt, 0).astype(np.int64)
    held = s.pre + rtt + s.post
    kind, anchor, offset = s.anchor_kind, s.anchor, s.offset
    is_async = np.isin(s.nr, _ASYNC_NRS) & s.sent if async_writes else np.zeros(n, dtype=bool)
    flushes = np.isin(s.nr, _FLUSH_NRS)
    last = {}
    if async_writes:
        for i in range(n):
            last[int(s.tid[i])] = i
    pending: dict[int, list[int]] = {}  # tid -> reply times of its unanswered writes (sorted)
    for i in range(n):
        k = kind[i]
        base = 0 if k == _START else (trap[anchor[i]] if k == _TRAP else resume[anchor[i]])
        trap[i] = base + offset[i]
        if s.waits_for[i] >= 0:
            trap[i] = max(trap[i], resume[s.waits_for[i]] + s.wait_offset[i])
        if not async_writes:
            resume[i] = trap[i] + held[i]
            continue
        tid = int(s.tid[i])
        out = [t for t in pending.get(tid, ()) if t > trap[i]]
        send = trap[i] + s.pre[i]
        if is_async[i]:
            if len(out) >= async_writes:  # the window is full: wait for its oldest answer
                send = max(send, out[len(out) - async_writes])
                out = [t for t in out if t > send]
            out.append(send + rtt[i])
            out.sort()
            resume[i] = send + s.post[i]
        else:
            reply = send + rtt[i]
            if flushes[i] and out:
                reply = max(reply, out[-1])
                out = []
            resume[i] = reply + s.post[i]
        if last[tid] == i and out:  # the thread ends: its files close, its writes land
            resume[i] = max(resume[i], out[-1])
            out = []
        pending[tid] = out
    k = s.end_kind
    base = 0 if k == _START else (trap[s.end_anchor] if k == _TRAP else resume[s.end_anchor])
    return trap, resume, int(base + s.end_offset)


def batches(s: Schedule, k: int) -> np.ndarray:
    """Per call, the call whose message carries it when a thread's consecutive writes
    (:data:`ASYNC_CALLS`) are sent ``k`` to a message: the group's last call (its
    *leader*, which waits for the one round trip); -1 for calls not batched.

    A group ends at ``k`` calls, at the thread's next call that is not a write, and
    at the thread's last call.  Only the leader's result is waited for: the others
    return at once, as if the program did not read their results before its next
    call (what a write's caller may do; in cost mode nothing fails).
    """
    leader = np.full(len(s), -1, dtype=np.int64)
    if k < 2:
        return leader
    batchable = np.isin(s.nr, _ASYNC_NRS) & s.sent
    open_: dict[int, list[int]] = {}  # tid -> its group so far

    def close(tid: int) -> None:
        group = open_.pop(tid, [])
        for j in group:
            leader[j] = group[-1]

    for i in range(len(s)):
        tid = int(s.tid[i])
        if not batchable[i]:
            close(tid)
            continue
        open_.setdefault(tid, []).append(i)
        if len(open_[tid]) >= k:
            close(tid)
    for tid in list(open_):
        close(tid)
    return leader


#: Calls ``async_writes`` answers before their reply: the data-moving writes.
ASYNC_CALLS = ("write", "pwrite64", "writev", "pwritev", "pwritev2")
#: Calls that wait for a thread's unanswered writes (and its exit does).
FLUSH_CALLS = ("fsync", "fdatasync", "close", "sync", "syncfs", "sync_file_range", "msync")
_ASYNC_NRS = np.array([syscalls.NR_BY_NAME[c] for c in ASYNC_CALLS if c in syscalls.NR_BY_NAME])
_FLUSH_NRS = np.array([syscalls.NR_BY_NAME[c] for c in FLUSH_CALLS if c in syscalls.NR_BY_NAME])


def load_source(path: str | Path) -> tuple[rundir.Run, Schedule]:
    """The run at ``path`` and its :class:`Schedule` (:class:`ReplayError` if it cannot be
    replayed: incomplete, another mode, no calls, no wall time)."""
    try:
        run = rundir.load(path)
    except rundir.RunDirError as exc:
        raise ReplayError(str(exc)) from None
    meta = run.meta
    mode = meta.get("mode")
    if meta.get("kind") != "delegated" or mode not in REPLAYABLE_MODES:
        raise ReplayError(f"{path}: a {mode or meta.get('kind')} run; replay re-issues the "
                          f"calls of {' or '.join(REPLAYABLE_MODES)} mode runs")  # fmt: skip
    if not run.complete:
        raise ReplayError(f"{path}: the run did not finish (run.json says complete: false)")
    wall = meta.get("wall_s")
    if not wall or wall <= 0:
        raise ReplayError(f"{path}: run.json has no wall time to replay")
    calls = run.calls()
    if not len(calls):
        raise ReplayError(f"{path}: no forwarded calls to replay")
    return run, schedule(calls, float(wall), int(meta.get("t_exec_ns") or 0),
                         int(meta.get("t_exit_ns") or 0))  # fmt: skip


class _Link:
    """The connection to the delegate and the frames sent over it."""

    def __init__(self, endpoint: str, curve_keys: str | None, connect_timeout_s: float):
        self.ctx, self.sock, self.welcome = connect(endpoint, timeout_s=connect_timeout_s,
                                                    curve_keys=curve_keys,
                                                    info={"mode": "cost", "backend": "replay"})  # fmt: skip
        self.transport = getattr(type(self.sock), "transport", None) or (
            "libzmq" if isinstance(self.sock, zmq.Socket) else "zmtp"
        )
        self._payload = b""

    def frame(self, call_id: int, tid: int, nr: int, size: int) -> bytes:
        """A cost-mode CALL of ``nr`` on thread ``tid`` carrying ``size`` zero bytes."""
        if len(self._payload) < size:
            self._payload = bytes(max(size, 2 * len(self._payload)))
        bufs = ((0, self._payload[:size]),) if size else ()
        return wire.encode_call_fields(call_id, tid, nr, _ARGS, bufs, "cost")

    def replies(self, timeout_ms: int):
        """Yield (t_reply, call_id, stamps, flags) for each frame waiting (after a poll)."""
        if not self.sock.poll(timeout_ms):
            return
        while True:
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame is None:
                return
            t = time.monotonic_ns()
            try:
                kind, p = wire.decode(frame)
            except wire.WireError as exc:
                if exc.call_id:
                    yield t, exc.call_id, (0, 0, 0, 0), rundir.F_PEER_ERROR
                continue
            if kind == wire.RESULT:
                yield t, p.call_id, (p.t_recv, p.t_exec_start, p.t_exec_end, p.t_send), 0
            elif kind == wire.ERROR and p.call_id:
                yield t, p.call_id, (0, 0, 0, 0), rundir.F_PEER_ERROR

    def close(self) -> None:
        try:
            self.sock.send(wire.encode_bye({}), zmq.NOBLOCK)
        except (zmq.ZMQError, OSError):
            pass
        self.sock.close()


@dataclass
class Outcome:
    """What a replay measured: per call (trap order) its stamps and flags, and the end."""

    t_trap: np.ndarray
    t_send: np.ndarray
    t_reply: np.ndarray
    t_resume: np.ndarray
    d: np.ndarray  # (n, 4) delegate stamps
    flags: np.ndarray
    t_start: int
    t_end: int
    #: how late the replay issued calls against their due time (ns, per call)
    late: np.ndarray
    #: the call after which the delegate was taken as lost (-1: never)
    lost_at: int = -1


def _new_outcome(n: int) -> Outcome:
    z = np.zeros(n, dtype=np.int64)
    return Outcome(z.copy(), z.copy(), z.copy(), z.copy(), np.zeros((n, 4), dtype=np.int64),
                   np.zeros(n, dtype=np.int64), 0, 0, z.copy())  # fmt: skip


def reproduce(
    s: Schedule,
    link: _Link,
    timeout_ns: int,
    progress: Callable[[int], None],
    busy_poll: bool = False,
    own_ns: int = 0,
) -> Outcome:
    """Replay in real time: spin through the gaps, calls overlap as recorded.

    While calls are in flight and nothing is due within ``WAKE_MARGIN_NS``, the
    replay waits for replies as the source's relay did: asleep in ``poll``
    (its wake-up is part of the round trip a sleeping relay pays), or spinning
    when the source ran with ``busy_poll``.  ``own_ns``, the replay client's
    own cost per round trip beyond the relay's (:func:`client_overhead`), is
    taken off each call's hold.
    """
    n = len(s)
    out = _new_outcome(n)
    on_trap: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    on_resume: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    at_start: list[int] = []
    need = np.ones(n, dtype=np.int64)  # anchors still to happen, per call
    due_at = np.zeros(n, dtype=np.int64)
    for i in range(n):
        k = s.anchor_kind[i]
        if k == _START:
            at_start.append(i)
        else:
            (on_trap if k == _TRAP else on_resume)[s.anchor[i]].append((i, int(s.offset[i])))
        if s.waits_for[i] >= 0:
            on_resume[s.waits_for[i]].append((i, int(s.wait_offset[i])))
            need[i] += 1
    heap: list[tuple[int, int, int]] = []  # (due ns, action, call); END is call -1
    TRAP, SEND, RESUME, END = 0, 1, 2, 3
    mono = time.monotonic_ns
    t_start = mono()
    out.t_start = t_start
    frames: dict[int, bytes] = {}  # built at the trap: the recorded pre already paid it

    def anchored(event_t: int, i: int, offset: int) -> None:
        due_at[i] = max(due_at[i], event_t + offset)
        need[i] -= 1
        if not need[i]:
            heapq.heappush(heap, (int(due_at[i]), TRAP, i))

    def end_after(kind: int, i: int, t: int) -> None:
        if s.end_kind == kind and s.end_anchor == i:
            heapq.heappush(heap, (t + s.end_offset, END, -1))

    for i in at_start:
        anchored(t_start, i, int(s.offset[i]))
    end_after(_START, -1, t_start)
    inflight: dict[int, int] = {}  # call_id -> call (its frame built, maybe not sent yet)
    sent: set[int] = set()  # calls whose frame went out
    next_id = 1
    done = 0
    next_progress = t_start + 1_000_000_000
    sock = link.sock
    while True:
        now = mono()
        while heap and heap[0][0] <= now:
            t_due, action, i = heapq.heappop(heap)
            if action == END:
                out.t_end = t_due
                return out
            if action == TRAP:
                # events happen at their due time: the loop's own lateness (a few µs,
                # out.late) is not the program's, and is not passed on
                out.t_trap[i], out.late[i] = t_due, now - t_due
                for j, off in on_trap[i]:
                    anchored(t_due, j, off)
                end_after(_TRAP, i, t_due)
                if s.sent[i] and out.lost_at < 0:
                    frames[i] = link.frame(next_id, int(s.tid[i]), int(s.nr[i]), int(s.bytes_in[i]))
                    inflight[next_id] = i
                    next_id += 1
                    heapq.heappush(heap, (t_due + int(s.pre[i]), SEND, i))
                else:
                    out.flags[i] = rundir.F_NOT_SENT
                    heapq.heappush(heap, (t_due + int(s.pre[i]), RESUME, i))
            elif action == SEND:
                frame = frames.pop(i)
                if out.lost_at >= 0:  # lost while this call's pre ran: it stays local
                    out.flags[i] = rundir.F_NOT_SENT
                    inflight = {c: j for c, j in inflight.items() if j != i}
                    heapq.heappush(heap, (t_due, RESUME, i))
                    continue
                out.t_send[i] = mono()
                try:
                    sock.send(frame, zmq.NOBLOCK)
                except zmq.Again:
                    out.flags[i] = rundir.F_NOT_SENT
                    inflight = {c: j for c, j in inflight.items() if j != i}
                    heapq.heappush(heap, (out.t_send[i], RESUME, i))
                    continue
                sent.add(i)
            else:  # RESUME
                out.t_resume[i] = max(t_due, out.t_reply[i])
                done += 1
                for j, off in on_resume[i]:
                    anchored(t_due, j, off)
                end_after(_RESUME, i, t_due)
            now = mono()
        if sent:
            wait = 0
            if not busy_poll:
                # sleep until shortly before the next due event, then spin: a wake-up
                # from poll can come late by far more than a millisecond's rounding
                first = heap[0][0] if heap else now + 100_000_000
                wait = max(0, (first - now - WAKE_MARGIN_NS) // 1_000_000)
            for t_reply, call_id, stamps, flags in link.replies(wait):
                i = inflight.pop(call_id, -1)
                if i < 0:
                    continue
                sent.discard(i)
                out.t_reply[i], out.d[i], out.flags[i] = t_reply, stamps, flags
                heapq.heappush(heap, (t_reply + int(s.post[i]) - own_ns, RESUME, i))
            for call_id, i in list(inflight.items()):
                if i not in sent:
                    continue
                if now - out.t_send[i] <= timeout_ns:
                    break  # sent in order: the rest are younger
                del inflight[call_id]
                sent.discard(i)
                out.flags[i] = rundir.F_TIMEOUT
                if out.lost_at < 0:  # as the relay: no reply in time, the delegate is lost
                    out.lost_at = i
                    _warn_lost(link, timeout_ns)
                heapq.heappush(heap, (now, RESUME, i))
        elif not heap:
            raise ReplayError("replay stalled: nothing due and nothing in flight (a schedule bug)")
        if now >= next_progress:
            next_progress = now + 1_000_000_000
            progress(done)


def back_to_back(
    s: Schedule,
    link: _Link,
    timeout_ns: int,
    progress: Callable[[int], None],
    leader: np.ndarray | None = None,
) -> Outcome:
    """Replay with the computation elided: one call at a time, no gaps.

    The stamps written are composed: ``t_trap = t_send - pre`` and ``t_resume =
    t_reply + post`` (the recorded relay work around the measured round trip).
    With ``leader`` (from :func:`batches`), the writes of a group travel in their
    leader's message (the group's bytes); the others are answered at once
    (``F_BEHIND``).
    """
    n = len(s)
    out = _new_outcome(n)
    mono = time.monotonic_ns
    out.t_start = mono()
    next_progress = out.t_start + 1_000_000_000
    if leader is None:
        leader = np.full(n, -1, dtype=np.int64)
    carried = np.zeros(n, dtype=np.int64)  # bytes a leader's message carries
    for i in range(n):
        if leader[i] >= 0:
            carried[leader[i]] += s.bytes_in[i]
    for i in range(n):
        if leader[i] >= 0 and leader[i] != i and out.lost_at < 0:  # goes with its leader
            t = mono()
            out.t_trap[i], out.t_resume[i] = t, t + int(s.pre[i] + s.post[i])
            out.flags[i] = rundir.F_BEHIND
            continue
        if not s.sent[i] or out.lost_at >= 0:
            t = mono()
            out.t_trap[i], out.t_resume[i] = t, t + int(s.pre[i])
            out.flags[i] = rundir.F_NOT_SENT
            continue
        call_id = i + 1
        size = int(carried[i]) if leader[i] == i else int(s.bytes_in[i])
        frame = link.frame(call_id, int(s.tid[i]), int(s.nr[i]), size)
        t_send = mono()
        try:
            link.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            out.t_trap[i] = out.t_resume[i] = t_send
            out.flags[i] = rundir.F_NOT_SENT
            continue
        out.t_send[i] = t_send
        deadline = t_send + timeout_ns
        while not out.t_reply[i]:
            left = deadline - mono()
            if left <= 0:
                out.flags[i] = rundir.F_TIMEOUT
                out.lost_at = i
                _warn_lost(link, timeout_ns)
                break
            for t_reply, cid, stamps, flags in link.replies(max(1, left // 1_000_000)):
                if cid == call_id:
                    out.t_reply[i], out.d[i], out.flags[i] = t_reply, stamps, flags
        out.t_trap[i] = t_send - int(s.pre[i])
        out.t_resume[i] = (out.t_reply[i] or mono()) + int(s.post[i])
        if out.t_resume[i] >= next_progress:
            next_progress = out.t_resume[i] + 1_000_000_000
            progress(i + 1)
    out.t_end = mono()
    return out


def _warn_lost(link: _Link, timeout_ns: int) -> None:
    print(f"testbed: warning: no reply from the delegate within {timeout_ns / 1e9:g} s; "
          "it is taken as lost and the remaining calls are replayed locally, unsent",
          file=sys.stderr, flush=True)  # fmt: skip


#: Round trips per side when measuring the replay client's own cost: at most
#: CALIBRATION_CALLS, at least CALIBRATION_MIN, else as many as the run has calls
#: (the correction's total error scales with the calls it is taken off).
CALIBRATION_CALLS = 300
CALIBRATION_MIN = 60
#: ... and the longest it may take, and the largest message it uses (a slow link
#: must not make the calibration longer than the replay).
CALIBRATION_S = 2.0
CALIBRATION_MAX_SIZE = 4096


def client_overhead(
    link: _Link, endpoint: str, size: int, busy: bool, calls: int = CALIBRATION_CALLS
) -> tuple[int, str]:
    """The replay client's own cost per round trip beyond the relay's, in ns, and how
    it was found.

    The recorded round trips were mostly measured by the relay's C path; this
    client is Python.  On raw ZMTP (tcp://, ipc://) both are measured here on
    the same delegate, in alternating blocks, with a ``size``-byte write: the
    difference of the medians (at least 0), from as many round trips per side as
    the replay has ``calls`` (within CALIBRATION_MIN..CALIBRATION_CALLS).  Other
    transports have no C client here: 0, and the reason.
    """
    if link.transport != "zmtp":
        return 0, f"not measured: no C client for the {link.transport} transport (taken as 0)"
    from testbed.jobs.latency import raw_zmtp_lat  # lazy: compiles the C path, zmtp only

    py: list[int] = []
    c: list[float] = []
    block = min(max(calls, CALIBRATION_MIN), CALIBRATION_CALLS) // 3
    t_end = time.monotonic() + CALIBRATION_S
    try:
        for b in range(3):
            if b and time.monotonic() > t_end:
                break
            c.extend(raw_zmtp_lat(endpoint, block, size, busy).tolist())
            for k in range(block):
                cid = 1_000_000_000 + b * block + k
                t0 = time.monotonic_ns()
                link.sock.send(link.frame(cid, 0, 1, size), zmq.NOBLOCK)
                got = 0
                while not got and time.monotonic_ns() - t0 < 2_000_000_000:
                    for t, rid, _st, _f in link.replies(0 if busy else 100):
                        if rid == cid:
                            got = t
                if got:
                    py.append(got - t0)
    except (TestbedError, zmq.ZMQError, OSError) as exc:
        return 0, f"not measured: {exc} (taken as 0)"
    if len(py) < block or len(c) < block or len(py) != len(c):
        return 0, "not measured: the delegate did not answer the calibration (taken as 0)"
    own = max(0, int(np.median(py) - np.median(c)))
    return own, (f"measured: median round trip of this client {np.median(py) / 1e3:.1f} µs, "
                 f"of the relay's C path {np.median(c) / 1e3:.1f} µs, {len(py)} each, "
                 f"{size} B writes")  # fmt: skip


def _write(out_dir: Path, s: Schedule, o: Outcome) -> None:
    rec = np.zeros(len(s), dtype=rundir.CALL_DTYPE)
    rec["tid"], rec["nr"], rec["flags"] = s.tid, s.nr, o.flags
    rec["bytes_in"] = s.bytes_in
    rec["t_trap"], rec["t_send"], rec["t_reply"], rec["t_resume"] = (
        o.t_trap, o.t_send, o.t_reply, o.t_resume)  # fmt: skip
    rec["d_recv"], rec["d_exec_start"], rec["d_exec_end"], rec["d_send"] = o.d.T
    recorder = rundir.CallRecorder(out_dir / rundir.CALLS_BIN)
    try:
        recorder.add_array(rec[np.argsort(o.t_trap, kind="stable")])
    finally:
        recorder.close()


def replay(
    source: str | Path,
    delegate: str,
    *,
    output: str | Path | None = None,
    elide_compute: bool = False,
    curve_keys: str | None = None,
    timeout_s: float = 2.0,
    connect_timeout_s: float = 3.0,
    progress: Callable[[int, int], None] | None = None,
    async_writes: int = 0,
    batch: int = 0,
) -> rundir.Run:
    """Replay the run at ``source`` against the delegate at ``delegate``; write a run
    directory (``output``, or ``runs/replay-<stamp>``) and return it loaded.

    ``async_writes`` W > 0 (with ``elide_compute``): the wall time composes
    asynchronous forwarding of writes, W unanswered per thread (:func:`timeline`)."""
    if (async_writes or batch) and not elide_compute:
        what = "--async-writes" if async_writes else "--batch"
        raise ReplayError(f"{what} is composed from the measured round trips: "
                          "use it with --elide-compute")  # fmt: skip
    if async_writes and batch:
        raise ReplayError("--async-writes and --batch are two answers to one question: "
                          "give one")  # fmt: skip
    if batch == 1 or batch < 0:
        raise ReplayError(f"--batch must be at least 2 calls per message, not {batch}")
    if async_writes < 0:
        raise ReplayError(f"--async-writes must be >= 1, not {async_writes}")
    run, s = load_source(source)
    n = len(s)
    lead = batches(s, batch)
    link = _Link(delegate, curve_keys, connect_timeout_s)
    try:
        welcome = link.welcome
        if "offload" in str(welcome.get("mode", "")):
            raise ReplayError(f"the delegate at {delegate} offloads file I/O; replay sends "
                              "synthesised payloads and needs a cost-mode delegate")  # fmt: skip
        out_dir = rundir.create(output, prefix="replay")
        started = time.time()
        base = _meta(run, s, delegate, link, curve_keys, timeout_s, elide_compute)
        rundir.write_meta(out_dir, {**base, "started_at": _stamp(started), "exit_status": None,
                                    "complete": False})  # fmt: skip
        step = (lambda done: progress(done, n)) if progress else (lambda done: None)
        busy = bool(run.meta.get("busy_poll"))
        sent = s.bytes_in[s.sent]
        size = min(int(np.median(sent)) if len(sent) else 0, CALIBRATION_MAX_SIZE)
        own_ns, own_how = client_overhead(link, delegate, size, busy, n)
        if elide_compute:
            o = back_to_back(s, link, int(timeout_s * 1e9), step, lead)
        else:
            o = reproduce(s, link, int(timeout_s * 1e9), step, busy, own_ns)
    finally:
        link.close()
    _write(out_dir, s, o)
    measured_rtt = np.where(o.t_reply > 0, np.maximum(0, o.t_reply - o.t_send - own_ns), 0)
    riders = int(((lead >= 0) & (lead != np.arange(n))).sum())  # writes in another's message
    unwaited = int(np.isin(s.nr, _ASYNC_NRS).sum()) if async_writes else riders
    composed_end = timeline(s, measured_rtt, async_writes)[2]
    recorded_end = timeline(s, s.rtt)[2]
    faults = {f: int(((o.flags & bit) != 0).sum()) for f, bit in
              (("timeouts", rundir.F_TIMEOUT), ("peer_errors", rundir.F_PEER_ERROR),
               ("not_sent", rundir.F_NOT_SENT))}  # fmt: skip
    wall = composed_end / 1e9 if elide_compute else (o.t_end - o.t_start) / 1e9
    meta = {
        **base,
        "started_at": _stamp(started),
        "wall_s": wall,
        "calls": {
            "count": n,
            "file": rundir.CALLS_BIN,
            "record_bytes": rundir.RECORD_BYTES,
            "faults": faults["timeouts"]
            + faults["peer_errors"]
            + (faults["not_sent"] - int((~s.sent).sum())),
            **faults,
            "unreadable": 0,
            "caller_gone": 0,
            "late_replies": 0,
        },  # fmt: skip
    }
    meta["replay"].update({
        "wall_s_how": ("composed from the measured round trips"
                       + (", writes asynchronous" if async_writes else "")
                       + (f", writes {batch} to a message" if batch else "")) if elide_compute
                      else "measured: the replay spun through the recorded gaps (events at their due "
        "times, the loop's own lateness not passed on)",
        "composed_wall_s": composed_end / 1e9,
        "source_composed_wall_s": recorded_end / 1e9,
        "replay_duration_s": (o.t_end - o.t_start) / 1e9,
        "issued_late_p50_us": float(np.median(o.late)) / 1e3 if not elide_compute else None,
        "issued_late_max_us": float(o.late.max()) / 1e3 if not elide_compute else None,
        "unsent_in_source": int((~s.sent).sum()),
        "delegate_lost_at_call": None if o.lost_at < 0 else int(o.lost_at),
        "async_writes": async_writes,
        "batch": batch,
        "batched_calls": riders,
        "model_wall_s": _model_wall(run.meta, {k: base[k] for k in _TARGET_KEYS}, n, unwaited),
        "model_how": "analysis.model.t_d_what_if: the source's wall time + n x (this "
        "delegate's --delay-us - the source delegate's), less 2 f_c + delay for each write "
        "not waited for (--async-writes: every write; --batch: all but each message's last); "
        "null: the replay changed more than that (transport, place), for which the model "
        "has no term",
        "client_overhead_us": own_ns / 1e3,
        "client_overhead_how": own_how,
    })  # fmt: skip
    rundir.finish(out_dir, meta)
    return rundir.load(out_dir)


def _model_wall(
    src: dict[str, Any], target: dict[str, Any], n: int, async_writes: int = 0
) -> float | None:
    """The model's what-if for the same change, where the model has a term for it: a
    change of the delegate's injected delay, and ``async_writes`` writes no longer
    waited for (``target`` is the replay's run.json fields: endpoint, transport,
    delegate).  None for a change of transport or place."""
    if _DELAY.sub("", mechanisms.mechanism(src)) != _DELAY.sub(
        "", mechanisms.mechanism({**src, **target})
    ):
        return None
    before = float((src.get("delegate") or {}).get("delay_us") or 0.0)
    after = float((target.get("delegate") or {}).get("delay_us") or 0.0)
    f_c = float((src.get("summary") or {}).get("f_c_us") or 0.0) * 1e-6
    return float(model.t_d_what_if(src["wall_s"], n, (after - before) * 1e-6, async_writes, f_c))


_DELAY = re.compile(r"\+[0-9.]+us")


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def _meta(run: rundir.Run, s: Schedule, delegate: str, link: _Link, curve_keys, timeout_s: float,
          elide: bool) -> dict[str, Any]:  # fmt: skip
    src = run.meta
    source_root = src.get("replay", {}).get("source") if src.get("mode") == "replay" else None
    return {
        "kind": "delegated",
        "command": src.get("command", []),
        "command_line": src.get("command_line", ""),
        "exit_status": src.get("exit_status"),
        "wall_s": None,
        "user_s": None,
        "sys_s": None,
        "backend": "replay",
        "mode": "replay",
        "policy": src.get("policy"),
        "profile": src.get("profile"),
        "forwarded": src.get("forwarded", []),
        "forwarded_nrs": src.get("forwarded_nrs", []),
        "endpoint": delegate,
        "timeout_s": timeout_s,
        "busy_poll": bool(src.get("busy_poll")),  # waits for replies as the source did
        "curve": bool(curve_keys),
        "transport": link.transport,
        "delegate": link.welcome,
        "host": host_metadata(),
        "replay": {
            "source": str(Path(run.path).resolve()),
            "source_root": source_root or str(Path(run.path).resolve()),
            "source_mechanism": mechanisms.mechanism(src),
            "source_endpoint": src.get("endpoint"),
            "source_wall_s": src.get("wall_s"),
            "source_stamped": s.stamped,
            "elide_compute": elide,
        },
    }


def summary_lines(r: rundir.Run) -> list[str]:
    """What ``testbed replay`` prints: predicted wall time against the source's."""
    m, rp = r.meta, r.meta["replay"]
    src_wall, wall = rp["source_wall_s"], m["wall_s"]
    ratio = wall / src_wall if src_wall else float("nan")
    lines = [
        f"testbed: replayed {m['calls']['count']} calls of {Path(rp['source']).name} "
        f"({rp['source_mechanism']}) against {m['endpoint']} ({mechanisms.mechanism(m)})",
        f"testbed: predicted wall time {wall:.4f} s ({rp['wall_s_how']}); "
        f"the source took {src_wall:.4f} s: ×{ratio:.3f}",
    ]
    if rp.get("model_wall_s") is not None and rp["model_wall_s"] != src_wall:
        lines.append(f"testbed: the model's what-if for the same change: "
                     f"{rp['model_wall_s']:.4f} s ({rp['model_how'].split(':')[0]})")  # fmt: skip
    if rp.get("batch"):
        lines.append(f"testbed: writes sent {rp['batch']} to a message: {rp['batched_calls']} "
                     "of them in another call's message (composed)")  # fmt: skip
    if rp.get("async_writes"):
        lines.append(f"testbed: writes forwarded asynchronously, at most {rp['async_writes']} "
                     "unanswered per thread (composed)")  # fmt: skip
    s = m.get("summary") or {}
    if s:
        lines.append(f"testbed: rtt p50 {s['rtt_p50_us']:.1f} µs p99 {s['rtt_p99_us']:.1f} µs")
    c = m["calls"]
    if c["faults"]:
        lines.append(f"testbed: FAULTS: {c['timeouts']} calls got no reply within "
                     f"{m['timeout_s']:g} s, {c['not_sent']} replayed unsent, "
                     f"{c['peer_errors']} delegate errors: the prediction does not hold")  # fmt: skip
    if not rp["source_stamped"]:
        lines.append("testbed: note: the source run.json predates t_exec_ns: the time "
                     "outside its calls is replayed before the first call")  # fmt: skip
    return [*lines, f"testbed: run directory {r.path}"]


def print_progress(done: int, total: int) -> None:
    print(f"testbed: replay: {done}/{total} calls", file=sys.stderr, flush=True)
