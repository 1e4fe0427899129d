"""A contention sweep on disk (``testbed contention -o DIR``), and the summary of one cell.

    DIR/contention.json                  the sweep's parameters, host stamp
    DIR/W<w>-N<n>/cell.json              cell parameters, window, machine CPU use, summary
    DIR/W<w>-N<n>/delegate/              the delegate's queue record (:mod:`testbed.core.queue_record`)
    DIR/W<w>-N<n>/callers/c<i>/          one run directory per caller (+ cycles.bin)

Written by :mod:`testbed.jobs.contention`, read by ``analysis.contention``.

Changelog of ``CONTENTION_VERSION``:
  1 - contention.json, cell.json, per-caller run dirs + cycles.bin (2026-12).
  2 - cycles.bin holds (t0, t1, z); queue.bin the drawn service time (2026-12).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from testbed.core.queue_record import load_record, summarize

CONTENTION_VERSION = 2
CYCLES_BIN = "cycles.bin"
CELL_JSON = "cell.json"
SWEEP_JSON = "contention.json"


def split_sweeps(paths) -> tuple[list[Path], list[Path]]:
    """(other paths, sweep directories holding ``contention.json``) of a command line."""
    others, sweeps = [], []
    for p in map(Path, paths):
        (sweeps if (p / SWEEP_JSON).is_file() else others).append(p)
    return others, sweeps


def cell_name(w: int, n: int) -> str:
    return f"W{w}-N{n}"


def load_cycles(cell: Path) -> list[np.ndarray]:
    """Per caller, an ``(calls, 3)`` array of ``(t0, t1, z)`` ns."""
    out = []
    for d in sorted((cell / "callers").iterdir()):
        f = d / CYCLES_BIN
        if d.is_dir() and f.exists():
            out.append(np.fromfile(f, dtype="<i8").reshape(-1, 3))
    return out


def cell_summary(cell: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """X, R (mean, p50, p99), think time, delegate wait/utilisation over the window.

    Calls counted are those that *started* in the window ``[warm-up end,
    end)``; X = calls / window length.  ``think_mean_us`` is the callers' own
    time between a call's return and their next call (sleep overshoot
    included), ``D = R - (wait + service)`` the fixed network/relay cost.
    """
    a, b = meta["window_ns"]
    cyc = load_cycles(cell)
    r, think, over = [], [], []
    for c in cyc:
        sel = (c[:, 0] >= a) & (c[:, 0] < b)
        r.append(c[sel, 1] - c[sel, 0])
        idx = np.nonzero(sel)[0]
        idx = idx[idx + 1 < len(c)]
        think.append(c[idx + 1, 0] - c[idx, 1])
        over.append(c[idx + 1, 0] - c[idx, 1] - c[idx + 1, 2])
    R = np.concatenate(r).astype(float) if r else np.zeros(0)
    Zs = np.concatenate(think).astype(float) if think else np.zeros(0)
    Zo = np.concatenate(over).astype(float) if over else np.zeros(0)
    dmeta, rec = load_record(cell / "delegate")
    d = summarize(rec, meta["W"], a, b)
    out: dict[str, Any] = {"calls": int(R.size), "callers_reporting": len(cyc)}
    if R.size:
        out |= {
            "X_per_s": R.size / ((b - a) / 1e9),
            "R_mean_us": float(R.mean()) / 1e3,
            "R_p50_us": float(np.percentile(R, 50)) / 1e3,
            "R_p99_us": float(np.percentile(R, 99)) / 1e3,
            "R_sem_us": float(R.std(ddof=1) / np.sqrt(R.size)) / 1e3 if R.size > 1 else 0.0,
            "think_mean_us": float(Zs.mean()) / 1e3 if Zs.size else float("nan"),
            # think beyond the drawn time (sleep overshoot, the loop): see service.summarize
            "think_overhead_us": float(Zo.mean()) / 1e3 if Zo.size else float("nan"),
        }
    out["delegate"] = d
    if R.size and d.get("calls"):
        out["D_us"] = out["R_mean_us"] - d["wait_mean_us"] - d["service_mean_us"]
    return out
