"""The delegate's queue record: ``delegate.json`` + ``queue.bin`` (``testbed delegate --record DIR``).

Written by :mod:`testbed.delegate.service` (a delegate serving through one FIFO
queue), read by the contention job and ``analysis.contention``.  One
``QUEUE_DTYPE`` record per call: receipt, start and end of service, worker,
queue length found on arrival, the drawn service time; CLOCK_MONOTONIC ns.

Changelog of ``RECORD_VERSION``:
  1 - delegate.json + queue.bin (2026-12).
  2 - queue.bin records the drawn service time per call (2026-12).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from testbed.core.errors import TestbedError

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
