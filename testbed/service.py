"""The delegate as a queue: a per-call service time and a record of its queue.

``testbed delegate --service-us S [--service sleep|spin] [--service-dist
exp|fixed] [--record DIR]`` serves calls through one FIFO queue shared by its
``W`` workers (a multi-server FCFS station, the system ``analysis.queueing``
models):

* one receiver thread owns the ROUTER socket: it stamps every frame on
  arrival (``t_recv``, the *receipt*), appends it to the queue, and sends the
  replies the workers hand back over an inproc PULL socket;
* each worker takes the oldest call, stamps the start of service, spends the
  service time (``sleep``: ``time.sleep``, leaves the CPUs to the callers;
  ``spin``: busy-waits, yielding the GIL), and builds the reply with the
  ordinary handler (so ``d_recv`` in a caller's run directory is the receipt
  and ``residence = d_send - d_recv`` is queueing + service).

The service time is drawn per call: ``exp`` (default; exponential with mean
S, what makes the closed model exact) or ``fixed``.  ``--record DIR`` writes
on exit ``DIR/delegate.json`` (summary: busy time, utilisation, mean wait,
time-average queue length) and ``DIR/queue.bin`` (one ``QUEUE_DTYPE`` record
per call: receipt, start and end of service, worker, queue length found on
arrival, the drawn service time).  All times CLOCK_MONOTONIC ns.  *Service* is the whole time a
worker is busy with a call: from taking it off the queue until its reply is
ready to hand back (the drawn service time plus decoding and encoding, ~0.1 ms in
Python); *wait* is receipt to that start.

Changelog of ``RECORD_VERSION``:
  1 - delegate.json + queue.bin (2026-12).
  2 - queue.bin records the drawn service time per call (2026-12).
"""

from __future__ import annotations

import json
import os
import queue
import random
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from testbed.errors import TestbedError
from testbed.hostinfo import host_metadata

if TYPE_CHECKING:
    from testbed.delegate import Delegate

RECORD_VERSION = 2
RECORD_JSON = "delegate.json"
QUEUE_BIN = "queue.bin"
QUEUE_DTYPE = np.dtype(
    [
        ("t_recv", "<i8"),
        ("t_start", "<i8"),
        ("t_end", "<i8"),
        ("worker", "<i4"),
        ("queue", "<i4"),  # calls at the delegate (waiting or in service) found on arrival
        ("drawn", "<i8"),  # the service time drawn for the call (ns); service - drawn = overhead
    ]
)
#: Calls kept in memory for the record (beyond it only the summary counts).
MAX_RECORDS = 5_000_000
KINDS = ("sleep", "spin")
DISTS = ("exp", "fixed")
POLL_MS = 50


class Service:
    """Service time per call and the delegate's own record of its queue."""

    def __init__(
        self, service_us: float, kind: str = "sleep", dist: str = "exp", seed: int = 0
    ) -> None:
        if not service_us >= 0 or service_us != service_us:
            raise TestbedError(f"service time must be >= 0 µs, not {service_us}")
        if kind not in KINDS:
            raise TestbedError(f"service must be one of {', '.join(KINDS)}, not {kind!r}")
        if dist not in DISTS:
            raise TestbedError(f"service distribution must be one of {', '.join(DISTS)}")
        self.service_us = float(service_us)
        self.kind = kind
        self.dist = dist
        self.seed = seed
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.rows: list[tuple[int, int, int, int, int, int]] = []
        self.dropped = 0
        self.in_system = 0  # receiver increments, workers decrement (under _lock)
        self.max_in_system = 0
        self.pending: dict[int, tuple[int, int, int] | None] = {}

    def info(self) -> dict[str, Any]:
        return {"service_us": self.service_us, "service": self.kind, "service_dist": self.dist}

    def draw_ns(self) -> int:
        if self.service_us == 0:
            return 0
        if self.dist == "fixed":
            return round(self.service_us * 1000)
        return round(self._rng.expovariate(1.0 / (self.service_us * 1000)))

    def arrived(self) -> int:
        with self._lock:
            self.in_system += 1
            self.max_in_system = max(self.max_in_system, self.in_system)
            return self.in_system - 1

    def departed(self) -> None:
        with self._lock:
            self.in_system -= 1

    def serve(self, t_recv: int, found: int, worker: int) -> None:
        """Spend one call's service time in the calling worker (a CALL, not HELLO/BYE)."""
        d = self.draw_ns()
        self.pending[worker] = (t_recv, found, d)
        if d:
            if self.kind == "sleep":
                time.sleep(d / 1e9)
            else:
                mono = time.monotonic_ns
                end = mono() + d
                while mono() < end:
                    os.sched_yield()

    def done(self, worker: int, t_start: int, t_end: int) -> None:
        """Record the call ``worker`` served: busy from ``t_start`` to ``t_end``."""
        p = self.pending[worker]
        if p is None:
            return  # not a call (HELLO, BYE, an error reply)
        self.pending[worker] = None
        with self._lock:
            if len(self.rows) < MAX_RECORDS:
                self.rows.append((p[0], t_start, t_end, worker, p[1], p[2]))
            else:
                self.dropped += 1

    def records(self) -> np.ndarray:
        with self._lock:
            return np.array(self.rows, dtype=QUEUE_DTYPE)

    def summary(self, workers: int) -> dict[str, Any]:
        return summarize(self.records(), workers) | {"dropped_records": self.dropped}

    def write(self, directory: str | os.PathLike, delegate_info: dict[str, Any]) -> Path:
        """Write ``delegate.json`` and ``queue.bin`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        rec = self.records()
        rec.tofile(out / QUEUE_BIN)
        meta = {
            "version": RECORD_VERSION,
            "kind": "delegate-record",
            "delegate": delegate_info,
            **self.info(),
            "seed": self.seed,
            "clock": "CLOCK_MONOTONIC",
            "queue_file": QUEUE_BIN,
            "queue_dtype": [[n, QUEUE_DTYPE[n].str] for n in QUEUE_DTYPE.names],
            "summary": summarize(rec, int(delegate_info.get("workers", 1)))
            | {"dropped_records": self.dropped, "max_in_system": self.max_in_system},
            "host": host_metadata(),
        }
        (out / RECORD_JSON).write_text(json.dumps(meta, indent=1) + "\n")
        return out


def summarize(rec: np.ndarray, workers: int, t0: int | None = None, t1: int | None = None):
    """Busy time, utilisation, waits and queue length over the window ``[t0, t1)``.

    Waits and service times are those of the calls *received* in the window;
    busy time and utilisation are exact: every call's service clipped to the
    window, over ``workers`` x window.  ``queue_mean`` is the time-average
    number of calls waiting (Little: total wait of the window's calls / window).
    """
    if rec.size == 0:
        return {"calls": 0}
    t0 = int(rec["t_recv"].min()) if t0 is None else t0
    t1 = int(rec["t_end"].max()) if t1 is None else t1
    sel = rec[(rec["t_recv"] >= t0) & (rec["t_recv"] < t1)]
    span = max(t1 - t0, 1)
    if sel.size == 0:
        return {"calls": 0, "window_s": span / 1e9}
    wait = (sel["t_start"] - sel["t_recv"]).astype(float)
    svc = (sel["t_end"] - sel["t_start"]).astype(float)
    busy = np.clip(np.minimum(rec["t_end"], t1) - np.maximum(rec["t_start"], t0), 0, None)
    return {
        "calls": int(sel.size),
        "window_s": span / 1e9,
        "busy_s": float(busy.sum()) / 1e9,
        "utilisation": float(busy.sum()) / (workers * span),
        "service_mean_us": float(svc.mean()) / 1e3,
        "service_cv2": float(svc.var() / svc.mean() ** 2) if svc.mean() > 0 else float("nan"),
        # service beyond the drawn time (sleep overshoot, decode, encode): low variance,
        # so S_nominal + overhead estimates the mean service far better than a few
        # hundred exponential draws do (a control variate)
        "overhead_mean_us": float((svc - sel["drawn"]).mean()) / 1e3,
        "wait_mean_us": float(wait.mean()) / 1e3,
        "wait_p99_us": float(np.percentile(wait, 99)) / 1e3,
        "queue_mean": float(wait.sum()) / span,
        "in_system_mean": float((wait + svc).sum()) / span,
        "found_mean": float(sel["queue"].mean()),
    }


def load_record(directory: str | os.PathLike) -> tuple[dict[str, Any], np.ndarray]:
    """Read a delegate record (``delegate.json``, ``queue.bin``)."""
    p = Path(directory)
    try:
        meta = json.loads((p / RECORD_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{p}: not a delegate record ({exc})") from None
    if meta.get("version") != RECORD_VERSION:
        raise TestbedError(f"{p}: delegate record version {meta.get('version')!r} not supported")
    return meta, np.fromfile(p / QUEUE_BIN, dtype=QUEUE_DTYPE)


def serve_queued(d: Delegate) -> None:
    """Serve ``d``'s ROUTER through one FIFO queue shared by ``d.workers`` workers."""
    from testbed.delegate import KEY_IDENT, KEY_TAG, MAX_PARTS, SNDMORE, _Handler, mark_delivered

    svc: Service = d.service
    ctx, router = d._ctx, d._router
    back_ep = f"inproc://tb-delegate-{id(d):x}-replies"
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(back_ep)
    calls: queue.SimpleQueue = queue.SimpleQueue()
    done = threading.Event()

    def worker(i: int) -> None:
        svc.pending[i] = None
        # offload state belongs to the connection: the front loop keys each call (libzmq)
        handler = _Handler(d, KEY_TAG if keyed else KEY_IDENT)
        d._handlers.append(handler)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(back_ep)
        try:
            while True:
                try:
                    item = calls.get(timeout=POLL_MS / 1000)
                except queue.Empty:
                    if done.is_set():
                        return
                    continue
                if done.is_set():  # stopping: what is still queued is dropped
                    return
                env, payload, t_recv, found, handler.tag = item
                t_start = time.monotonic_ns()
                handler.service_slot = (t_recv, found, i)
                reply = handler.handle(env[0], payload, t_recv)
                # leave the system before the reply can reach the caller: a
                # lone caller's next call must never find this one still here
                svc.done(i, t_start, time.monotonic_ns())
                svc.departed()
                push.send_multipart([*env, reply])
        finally:
            push.close()

    keyed = d.offload is not None and d._guard is not None
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(d.workers)]
    for t in threads:
        t.start()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(pull, zmq.POLLIN)
    mono = time.monotonic_ns
    rx = _Handler(d)  # accounting of malformed envelopes
    d._handlers.append(rx)
    deadline = None
    try:
        while True:
            if d.stop_requested and deadline is None:
                deadline = mono() + 200_000_000
            if deadline is not None and (
                mono() > deadline or (calls.empty() and not svc.in_system)
            ):
                break
            for sock, _ in poller.poll(POLL_MS):
                if sock is pull:
                    parts = pull.recv_multipart()
                    try:
                        for part in parts[:-1]:
                            router.send(part, SNDMORE)
                        router.send(parts[-1])
                    except zmq.ZMQError:
                        pass
                    continue
                ident = router.recv()
                frame = router.recv(copy=False)  # libzmq delivers whole messages
                t_recv = mono()
                if ident == d._ctl_id:
                    continue
                fd = mark_delivered(d._guard, frame)
                env, payload, parts, nbytes = (ident,), frame.bytes, 1, len(frame)
                if frame.more:  # [identity, "", payload] (REQ) or malformed: bounded parts
                    frames = [frame.bytes]
                    while frame.more:
                        frame = router.recv(copy=False)
                        parts += 1
                        nbytes += len(frame)
                        if parts <= MAX_PARTS:
                            frames.append(frame.bytes)
                    if parts == 2 and frames[0] == b"":
                        env, payload = (ident, b""), frames[1]
                    else:
                        router.send_multipart(
                            [ident, rx.bad_envelope(ident, parts, nbytes, t_recv)]
                        )
                        continue
                if deadline is not None:
                    continue  # stopping: no new calls
                key = d.connection_key(ident, payload, fd) if keyed and fd >= 0 else None
                calls.put((env, payload, t_recv, svc.arrived(), key))
    finally:
        done.set()
        for t in threads:
            t.join(5.0)
        while pull.poll(0):
            parts = pull.recv_multipart()
            try:
                router.send_multipart(parts)
            except zmq.ZMQError:
                pass
        pull.close(0)
