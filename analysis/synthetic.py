"""Synthetic delegated run directories with a known ``f_c`` (known-answer tests).

:func:`delegated_run` writes a run directory in exactly the format of
``testbed run`` (through :mod:`testbed.core.rundir`): per-call records whose
``overhead = t_resume - t_trap`` is ``2 (alpha + beta * bytes)`` times
log-normal noise with median 1, and a wall time ``t_nd + sum overhead`` plus
Gaussian run-to-run noise.  Used by the tests and to try the analysis without
a delegate.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from testbed.core import rundir
from testbed.core.hostinfo import host_metadata
from testbed.core.syscalls import lookup


def delegated_run(
    path: str | Path,
    command: list[str],
    forwarded: dict[str, int],
    f_c: float | dict[str, float],
    t_nd: float,
    *,
    beta: float = 0.0,
    max_bytes: int = 8192,
    call_noise: float = 0.1,
    run_noise_s: float = 0.0,
    backend: str = "seccomp",
    mode: str = "cost",
    endpoint: str = "tcp://127.0.0.1:5555",
    delay_us: float = 0.0,
    policy: str | None = None,
    native: bool = True,
    seed: int = 0,
    hostname: str | None = None,
    cell: dict | None = None,
) -> Path:
    """Write one synthetic delegated run; ``forwarded`` maps names to call counts.

    ``f_c`` is alpha (s, one way), or a map name -> alpha (per-syscall truths);
    ``beta`` is s per marshalled byte.  ``hostname`` overrides the host stamp;
    ``cell`` is written as ``experiment.json`` (as ``testbed experiment`` does).
    """
    rng = np.random.default_rng(seed)
    out = rundir.create(path)
    rec = rundir.CallRecorder(out / rundir.CALLS_BIN)
    t = 1_000_000_000
    total_overhead = 0.0
    for name, n in forwarded.items():
        nr = lookup(name)
        size = rng.integers(0, max_bytes + 1, n) if max_bytes else np.zeros(n, dtype=int)
        alpha = f_c[name] if isinstance(f_c, dict) else f_c
        ovh = 2.0 * (alpha + beta * size) * rng.lognormal(0.0, call_noise, n)
        ovh_ns = np.maximum(np.round(ovh * 1e9).astype(np.int64), 4)
        for b, o in zip(size, ovh_ns, strict=True):
            q = o // 4
            rec.add(1000, nr, 0, 0, int(b), 0, t, t + q, t + 3 * q, t + o,
                    5_000 + t + q, 5_000 + t + 2 * q, 5_000 + t + 2 * q, 5_000 + t + 2 * q)  # fmt: skip
            t += o + 1000
        total_overhead += ovh_ns.sum() / 1e9
    rec.close()
    # syscalls.csv and the summary as testbed run writes them (rundir's one derivation)
    rows, summary = rundir.summarize_all(out / rundir.CALLS_BIN)
    wall = t_nd + total_overhead + (rng.normal(0.0, run_noise_s) if run_noise_s else 0.0)
    meta = {
        "kind": "delegated",
        "synthetic": True,
        "command": list(command),
        "exit_status": 0,
        "wall_s": wall,
        "user_s": t_nd * 0.9,
        "sys_s": t_nd * 0.1,
        "backend": backend,
        "mode": mode,
        "forwarded": sorted(forwarded),
        "forwarded_nrs": sorted(lookup(x) for x in forwarded),
        "endpoint": endpoint,
        "delegate": {"delay_us": delay_us},
        "host": _host(hostname),
        "calls": {"count": rec.count, "faults": 0},
        "summary": summary,
    }
    if policy:
        meta["policy"] = policy
    if native:
        meta["native"] = {"wall_s": t_nd}
    rows, meta["summary"] = rundir.summarize_all(out / rundir.CALLS_BIN)  # as testbed run does
    rundir.write_meta(out, meta)
    rundir.write_syscalls(out, rows)
    if cell is not None:
        (out / "experiment.json").write_text(json.dumps(cell, indent=2) + "\n")
    return out


def _host(hostname: str | None) -> dict:
    host = host_metadata()
    if hostname is not None:
        host["hostname"] = hostname
    return host


def native_run(
    path: str | Path,
    command: list[str],
    wall_s: float,
    user_s: float | None = None,
    sys_s: float = 0.0,
    *,
    hostname: str | None = None,
    cell: dict | None = None,
) -> Path:
    """Write one native run directory (``kind = "native"``, as ``testbed experiment`` does)."""
    out = rundir.create(path)
    meta = {
        "kind": "native",
        "synthetic": True,
        "command": list(command),
        "exit_status": 0,
        "wall_s": wall_s,
        "user_s": wall_s * 0.9 if user_s is None else user_s,
        "sys_s": sys_s,
        "host": _host(hostname),
    }
    rundir.write_meta(out, meta)
    if cell is not None:
        (out / "experiment.json").write_text(json.dumps(cell, indent=2) + "\n")
    return out
