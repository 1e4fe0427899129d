"""The delegate as a queue: a per-call service time and a record of its queue.

``testbed delegate --service-us S [--service sleep|spin] [--service-dist
exp|fixed] [--record DIR]`` serves calls through one FIFO queue shared by its
``W`` workers (a multi-server FCFS station, the system ``analysis.queueing``
models):

* the delegate's serving loop owns the ROUTER socket: it stamps every frame
  on arrival (``t_recv``, the *receipt*) and hands each request to
  :class:`Queue` (a :class:`testbed.delegate.dispatch.Dispatcher`), which
  appends it to the queue; the loop sends the replies the workers hand back
  over an inproc PULL socket;
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

import functools
import json
import os
import queue
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from testbed.core.errors import TestbedError
from testbed.core.hostinfo import host_metadata
from testbed.core.queue_record import (
    QUEUE_BIN,
    QUEUE_DTYPE,
    RECORD_JSON,
    RECORD_VERSION,
    summarize,
)
from testbed.delegate.dispatch import DRAIN_NS, POLL_MS, Answerer

#: Calls kept in memory for the record (beyond it only the summary counts).
MAX_RECORDS = 5_000_000
KINDS = ("sleep", "spin")
DISTS = ("exp", "fixed")


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

    def dispatcher(self, ctx: zmq.Context, answerers: Sequence[Answerer], endpoint: str) -> Queue:
        """The delegate's dispatcher for one serving run: this queue served by one
        worker per answerer (:class:`testbed.delegate.dispatch.QueueService`)."""
        return Queue(self, ctx, answerers, endpoint)

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


class Queue:
    """The dispatcher of ``--service-us``: one FIFO queue served by one worker
    thread per answerer (:class:`testbed.delegate.dispatch.Dispatcher`).

    The serving loop stamps each request's receipt and :meth:`dispatch` queues
    it, with the number of calls found in the system; a worker takes the oldest,
    answers it, spending the drawn service time in the answerer once the call is
    decoded, records it and hands the reply back on :attr:`replies` (a PULL
    socket bound at ``endpoint``).  Once stopping, new requests are dropped;
    what is still queued when the workers are joined is dropped too.
    """

    replies_per_turn = 0
    drain_ns = DRAIN_NS

    def __init__(
        self, svc: Service, ctx: zmq.Context, answerers: Sequence[Answerer], endpoint: str
    ) -> None:
        self.svc = svc
        self.replies = ctx.socket(zmq.PULL)
        self.replies.setsockopt(zmq.LINGER, 0)
        self.replies.bind(endpoint)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, args=(i, a, ctx, endpoint), daemon=True)
            for i, a in enumerate(answerers)
        ]
        for t in self._threads:
            t.start()

    def dispatch(
        self, env: tuple[bytes, ...], payload: zmq.Frame, t_recv: int, key: bytes | None
    ) -> None:
        if not self._stopping:  # stopping: no new calls
            self._calls.put((env, payload.bytes, t_recv, self.svc.arrived(), key))
        return None

    def stopping(self) -> None:
        self._stopping = True

    def idle(self) -> bool:
        return self._calls.empty() and not self.svc.in_system

    def join(self) -> None:
        self._done.set()
        for t in self._threads:
            t.join(5.0)

    def close(self) -> None:
        self.replies.close(0)

    def _work(self, i: int, answerer: Answerer, ctx: zmq.Context, endpoint: str) -> None:
        svc = self.svc
        svc.pending[i] = None
        calls, done = self._calls, self._done
        handle = answerer.handle
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(endpoint)
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
                env, payload, t_recv, found, key = item
                t_start = time.monotonic_ns()
                # the service time, spent once the call is decoded and delayed
                serve = functools.partial(svc.serve, t_recv, found, i)
                reply = handle(env[0], payload, t_recv, key, serve)
                # leave the system before the reply can reach the caller: a
                # lone caller's next call must never find this one still here
                svc.done(i, t_start, time.monotonic_ns())
                svc.departed()
                push.send_multipart([*env, reply])
        finally:
            push.close()
