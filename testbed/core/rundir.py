"""The run directory: the unit of results.  Documented in ``docs/rundir.md``.

A run directory holds
  run.json      metadata: command, exit status, times, backend, mode, forwarded
                set, endpoint, host stamp, counts and faults (always present)
  calls.bin     one fixed-size little-endian record per forwarded call
                (``CALL_DTYPE``), appended in chunks while the run goes on
  syscalls.csv  one row per syscall: the per-syscall summary (delegated runs)
                or the native profile n(s), g(s) (profile runs)

This module is the only one that writes or reads that layout.

Changelog of ``RUNDIR_VERSION``:
  1 - run.json + calls.bin + syscalls.csv (2026-11).
  2 - crash-consistent: ``run.json`` is written when the run starts with
      ``"complete": false`` and rewritten with ``"complete": true`` at the
      end; ``calls.bin`` is flushed at least every ``FLUSH_NS``; flag 16
      (``F_UNREADABLE``).  Version 1 directories still load (complete) (2026-12).
      Later additive fields (no bump; readers need not know them): run.json
      ``orphan_guard``, ``hot_path`` (2026-12); ``host.virtualization``
      (virtual machine? emulated CPU, e.g. QEMU TCG?
      ``testbed.core.hostinfo.virtualization``) (2026-12); ``t_exec_ns``,
      ``t_exit_ns`` (the program's exec and exit, CLOCK_MONOTONIC ns, the
      clock of calls.bin; 0 unknown) (2026-12); ``escapes`` (relay
      runs: what the forwarded set could not see - the program's
      ``/proc/PID/io`` against the forwarded read/write calls, io_uring
      calls, file mmaps, forwarded vDSO calls; ``testbed.compute.escapes``)
      (2026-12).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shlex
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.core.errors import TestbedError
from testbed.core.program import exit_status

if TYPE_CHECKING:
    import numpy as np
from testbed.core.syscalls import name_of

RUNDIR_VERSION = 2
#: Versions ``load`` accepts (1 differs only by never being incomplete).
READABLE_VERSIONS = (1, 2)

#: Buffered call records reach the file at least this often (ns).
FLUSH_NS = 1_000_000_000

RUN_JSON = "run.json"
CALLS_BIN = "calls.bin"
SYSCALLS_CSV = "syscalls.csv"

# Flags of a call record.
F_TIMEOUT = 1  # no reply within the per-call timeout: released locally
F_PEER_ERROR = 2  # the delegate answered with an error frame
F_CALLER_GONE = 4  # the caller died / notification no longer valid
F_NOT_SENT = 8  # released without being sent (e.g. delegate already lost)
F_UNREADABLE = 16  # the caller's memory could not be read: released locally, not sent
F_BEHIND = 32  # write-behind: answered before the reply (t_resume < t_reply)
F_AHEAD = 64  # read-ahead: answered from a read sent before the call (t_send < t_trap)
F_FAULT_MASK = F_TIMEOUT | F_PEER_ERROR | F_NOT_SENT | F_UNREADABLE

#: One record per forwarded call.  t_* are relay clock, d_* delegate clock, ns
#: since an arbitrary epoch (CLOCK_MONOTONIC); 0 means "not reached".
CALL_FIELDS = (
    ("seq", "<u8"),
    ("tid", "<i4"),
    ("nr", "<i2"),
    ("flags", "<u2"),
    ("ret", "<i8"),
    ("bytes_in", "<u4"),
    ("bytes_out", "<u4"),
    ("t_trap", "<i8"),
    ("t_send", "<i8"),
    ("t_reply", "<i8"),
    ("t_resume", "<i8"),
    ("d_recv", "<i8"),
    ("d_exec_start", "<i8"),
    ("d_exec_end", "<i8"),
    ("d_send", "<i8"),
)
_CALL_STRUCT = struct.Struct("<QihHqII" + "q" * 8)
#: bytes per record in ``calls.bin``
RECORD_BYTES = _CALL_STRUCT.size


def _np():
    """numpy, imported on first use: reading and summarising runs needs it, the
    write path of a run (before and while the program runs) does not."""
    import numpy  # lazy: numpy (55 ms), kept off `testbed run`'s start-up path

    return numpy


@functools.cache
def _call_dtype():
    dtype = _np().dtype(list(CALL_FIELDS))
    assert dtype.itemsize == _CALL_STRUCT.size
    return dtype


@functools.cache
def _edges():
    return _np().logspace(2, 11, 9 * 200 + 1)  # log-spaced ns bins of the summaries


def __getattr__(name: str):
    if name == "CALL_DTYPE":  # ``rundir.CALL_DTYPE``: the numpy dtype of a record
        return _call_dtype()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RunDirError(TestbedError):
    """A run directory that is missing, incomplete or of an unknown version."""


class CallRecorder:
    """Appends call records to ``calls.bin`` in chunks (bounded memory).

    Records reach the file every ``chunk`` records and, through
    :meth:`tick`, at least every ``FLUSH_NS``: a relay killed mid-run loses at
    most the last second of records, and the file always holds whole records.
    """

    def __init__(self, path: Path, chunk: int = 4096):
        self._f = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()
        self._buf: list[bytes] = []
        self._chunk = chunk
        self.count = 0
        self._pack = _CALL_STRUCT.pack
        self._next_flush = time.monotonic_ns() + FLUSH_NS

    def add(
        self,
        tid: int,
        nr: int,
        flags: int,
        ret: int,
        bytes_in: int,
        bytes_out: int,
        t_trap: int,
        t_send: int,
        t_reply: int,
        t_resume: int,
        d_recv: int = 0,
        d_exec_start: int = 0,
        d_exec_end: int = 0,
        d_send: int = 0,
    ) -> None:
        self._buf.append(
            self._pack(
                self.count, tid, nr, flags, ret, bytes_in, bytes_out,
                t_trap, t_send, t_reply, t_resume, d_recv, d_exec_start, d_exec_end, d_send,
            )
        )  # fmt: skip
        self.count += 1
        if len(self._buf) >= self._chunk:
            self.flush()

    def add_packed(self, data: bytes, n: int) -> None:
        """Append ``n`` records already packed as ``CALL_DTYPE`` with seq from ``count``."""
        self._buf.append(data)
        self.count += n
        if len(self._buf) >= self._chunk or n >= 256:  # a big block: write it now
            self.flush()

    def add_array(self, records: np.ndarray) -> None:
        """Append records given as a ``CALL_DTYPE`` array (``seq`` is assigned here)."""
        if not len(records):
            return
        self.flush()
        np = _np()
        records = np.array(records, dtype=_call_dtype())
        records["seq"] = np.arange(self.count, self.count + len(records), dtype=np.uint64)
        self._f.write(records.tobytes())
        self.count += len(records)

    def flush(self) -> None:
        """Write the buffered records with one write(2) (whole records only)."""
        if self._buf:
            self._f.write(b"".join(self._buf))
            self._buf.clear()

    def tick(self, now_ns: int) -> None:
        """Flush if ``FLUSH_NS`` passed since the last periodic flush."""
        if now_ns >= self._next_flush:
            self._next_flush = now_ns + FLUSH_NS
            self.flush()

    def close(self) -> None:
        self.flush()
        self._f.close()


def create(path: str | os.PathLike | None, prefix: str = "run") -> Path:
    """Create a new run directory (``runs/<prefix>-<timestamp>`` if ``path`` is None)."""
    if path is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path("runs") / f"{prefix}-{stamp}"
        p, i = base, 1
        while p.exists():
            i += 1
            p = Path(f"{base}-{i}")
    else:
        p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{p} exists and is not a directory (give a new or empty directory)")
    if p.exists() and any(p.iterdir()):
        raise RunDirError(f"run directory {p} exists and is not empty")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {p}: {exc.strerror}") from None
    return p


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """Write ``run.json`` atomically, stamping ``rundir_version``."""
    meta = {"rundir_version": RUNDIR_VERSION, **meta}
    tmp = path / (RUN_JSON + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path / RUN_JSON)


def write_syscalls(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write the per-syscall table (``syscalls.csv``); columns from the first row."""
    with open(path / SYSCALLS_CSV, "w", newline="") as f:
        if not rows:
            f.write("name,nr\n")
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@dataclass
class Run:
    """A loaded run directory."""

    path: Path
    meta: dict[str, Any]
    syscalls: list[dict[str, str]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "delegated")

    @property
    def complete(self) -> bool:
        """False for a run whose writer never finished (killed relay, crash)."""
        return self.meta.get("complete", True) is not False

    def calls(self) -> np.ndarray:
        """The per-call records as a (memory-mapped) structured array."""
        np = _np()
        p = self.path / CALLS_BIN
        if not p.exists() or p.stat().st_size == 0:
            return np.zeros(0, dtype=_call_dtype())
        size = p.stat().st_size
        whole = size // _CALL_STRUCT.size
        if size % _CALL_STRUCT.size:
            if self.complete:
                raise RunDirError(
                    f"{p} is truncated ({size} bytes is not a whole number of records)"
                )
            if whole == 0:  # an incomplete run: its records up to the last whole one
                return np.zeros(0, dtype=_call_dtype())
        return np.memmap(p, dtype=_call_dtype(), mode="r", shape=(whole,))


def load(path: str | os.PathLike) -> Run:
    """Load a run directory, checking its version; one clear error otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise RunDirError(f"{p}: no such run directory")
    meta_path = p / RUN_JSON
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise RunDirError(f"{p}: not a run directory (no {RUN_JSON})") from None
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{meta_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{meta_path}: not a JSON object")
    version = meta.get("rundir_version")
    if version not in READABLE_VERSIONS:
        raise RunDirError(
            f"{p}: run directory version {version!r} not supported (this is {RUNDIR_VERSION})"
        )
    rows: list[dict[str, str]] = []
    if (p / SYSCALLS_CSV).exists():
        with open(p / SYSCALLS_CSV, newline="") as f:
            rows = list(csv.DictReader(f))
    return Run(p, meta, rows)


def derived(calls: np.ndarray) -> dict[str, np.ndarray]:
    """Per-call derived quantities of DESIGN.md section 4, in ns (float64).

    The one definition every reader uses (summary, ``demo``, ``bench``,
    kthread runs, ``analysis``)::

        rtt       = t_reply - t_send            (relay clock; NaN if never answered)
        residence = d_send - d_recv             (delegate clock; NaN if never answered)
        wire      = rtt - residence
        exec      = d_exec_end - d_exec_start   (offload mode; 0 in cost mode)
        held      = t_resume - t_trap           (how long the caller was held)
        overhead  = held - exec
        f_c       = overhead / 2                (the paper's one-way forwarding cost)

    Which calls an estimate may use is :func:`usable`.
    """
    np = _np()
    answered = (calls["t_reply"] > 0) & (calls["d_send"] > 0)
    rtt = np.where(answered, calls["t_reply"] - calls["t_send"], np.nan).astype(np.float64)
    residence = np.where(answered, calls["d_send"] - calls["d_recv"], np.nan).astype(np.float64)
    exec_ns = np.where(answered, calls["d_exec_end"] - calls["d_exec_start"], 0).astype(np.float64)
    held = (calls["t_resume"] - calls["t_trap"]).astype(np.float64)
    overhead = held - exec_ns
    return {
        "rtt": rtt,
        "residence": residence,
        "wire": rtt - residence,
        "exec": exec_ns,
        "held": held,
        "overhead": overhead,
        "f_c": overhead / 2,
    }


def usable(calls: np.ndarray, d: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Mask of the calls an ``f_c`` estimate uses: no fault, and a finite ``f_c`` > 0.

    Faults (timeout, delegate error, not sent, unreadable memory) ran locally
    without a reply, so their time is not a forwarding cost; write-behind calls
    (``F_BEHIND``) were answered before their reply, so theirs is not either, nor
    is that of reads answered from a read sent ahead (``F_AHEAD``).
    """
    np = _np()
    fc = (d if d is not None else derived(calls))["f_c"]
    ok = (calls["flags"] & (F_FAULT_MASK | F_BEHIND | F_AHEAD)) == 0
    return ok & np.isfinite(fc) & (fc > 0)


def fc_estimates(calls: np.ndarray) -> dict[str, float]:
    """``f_c`` of the usable calls, in µs: ``median`` (the headline: overheads have a
    heavy right tail), ``mean`` (what a total of n calls is: n × mean) and ``n``."""
    np = _np()
    d = derived(calls)
    fc = d["f_c"][usable(calls, d)] / 1e3
    if not fc.size:
        return {"median": float("nan"), "mean": float("nan"), "n": 0}
    return {"median": float(np.median(fc)), "mean": float(fc.mean()), "n": int(fc.size)}


#: Log-spaced histogram edges for streaming percentiles: 100 ns .. 100 s,
#: 200 bins per decade (each bin ~1.2 % wide).  Summaries are computed chunk by
#: chunk so a run of any length needs constant memory.
SUMMARY_CHUNK = 1 << 16


class _Hist:
    __slots__ = ("counts",)

    def __init__(self) -> None:
        np = _np()
        self.counts = np.zeros(_edges().size + 1, dtype=np.int64)

    def add(self, ns: np.ndarray) -> None:
        np = _np()
        ns = ns[~np.isnan(ns)]
        if ns.size:
            self.counts += np.bincount(np.searchsorted(_edges(), ns), minlength=self.counts.size)

    def percentile(self, q: float) -> float:
        """q-th percentile in µs (geometric middle of its bin), NaN if empty."""
        np = _np()
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        k = int(np.searchsorted(np.cumsum(self.counts), q / 100 * total, side="left"))
        lo = _edges()[max(k - 1, 0)] if k > 0 else _edges()[0] / 10
        hi = _edges()[min(k, _edges().size - 1)]
        return float(np.sqrt(lo * hi)) / 1e3


class _SyscallStats:
    __slots__ = ("n", "faults", "bytes_in", "overhead_sum", "rtt", "overhead")

    def __init__(self) -> None:
        self.n = self.faults = self.bytes_in = self.overhead_sum = 0
        self.rtt, self.overhead = _Hist(), _Hist()


def iter_chunks(calls: np.ndarray | Path, chunk: int = SUMMARY_CHUNK):
    """Yield record chunks of an array, or of a ``calls.bin`` file read piecewise."""
    np = _np()
    if isinstance(calls, np.ndarray):
        for start in range(0, calls.size, chunk):
            yield np.asarray(calls[start : start + chunk])
        return
    with open(calls, "rb") as f:
        while True:
            part = np.fromfile(f, dtype=_call_dtype(), count=chunk)
            if part.size == 0:
                return
            yield part


def summarize_all(calls: np.ndarray | Path) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-syscall rows (``syscalls.csv``) and run-wide percentiles, in constant memory.

    Percentiles come from log-spaced histograms (resolution ~1.2 %).
    """
    np = _np()

    per: dict[int, _SyscallStats] = {}
    run_rtt, run_ovh, run_res, run_wire = _Hist(), _Hist(), _Hist(), _Hist()
    for part in iter_chunks(calls):
        d = derived(part)
        faulty = (part["flags"] & F_FAULT_MASK) != 0
        # a read answered from one sent ahead: its reply was taken when the program
        # asked, so t_reply - t_send is no round trip
        timed = (part["flags"] & F_AHEAD) == 0
        ok = ~faulty & timed
        run_rtt.add(d["rtt"][ok])
        run_ovh.add(d["overhead"][usable(part, d)])
        run_res.add(d["residence"][ok])
        run_wire.add(np.maximum(d["wire"][ok], 1.0))
        for nr in np.unique(part["nr"]):
            sel = part["nr"] == nr
            st = per.setdefault(int(nr), _SyscallStats())
            st.n += int(sel.sum())
            st.faults += int(faulty[sel].sum())
            st.bytes_in += int(part["bytes_in"][sel].sum())
            st.overhead_sum += int(np.nansum(d["overhead"][sel]))
            st.rtt.add(d["rtt"][sel & timed])
            st.overhead.add(d["overhead"][sel])
    rows = [
        {
            "name": name_of(nr),
            "nr": nr,
            "n": st.n,
            "faults": st.faults,
            "bytes_in": st.bytes_in,
            "rtt_p50_us": round(st.rtt.percentile(50), 3),
            "rtt_p99_us": round(st.rtt.percentile(99), 3),
            "overhead_p50_us": round(st.overhead.percentile(50), 3),
            "overhead_p99_us": round(st.overhead.percentile(99), 3),
            "overhead_sum_ns": st.overhead_sum,
        }
        for nr, st in per.items()
    ]
    rows.sort(key=lambda r: (-r["n"], r["nr"]))
    if not per:
        return rows, {}
    return rows, {
        "rtt_p50_us": run_rtt.percentile(50),
        "rtt_p99_us": run_rtt.percentile(99),
        "residence_p50_us": run_res.percentile(50),
        "wire_p50_us": run_wire.percentile(50),
        "overhead_p50_us": run_ovh.percentile(50),
        "overhead_p99_us": run_ovh.percentile(99),
        "f_c_us": run_ovh.percentile(50) / 2,  # the median: as derived/usable define it
        "percentile_resolution": "log histogram, 200 bins/decade (~1.2 %)",
    }


def summarize(calls: np.ndarray | Path) -> list[dict[str, Any]]:
    """Per-syscall summary rows (the delegated-run ``syscalls.csv``), most frequent first."""
    return summarize_all(calls)[0]


def overall(calls: np.ndarray | Path) -> dict[str, float]:
    """Run-wide p50/p99 of rtt and overhead (µs) and ``f_c_us`` (median usable overhead / 2)."""
    return summarize_all(calls)[1]


def program_meta(
    program,
    status,
    started: float,
    t0_ns: int,
    t_exit_ns: int,
    rusage,
    start_user: float,
    start_sys: float,
) -> dict[str, Any]:
    """The ``run.json`` fields every delegated run shares: the program, its exit, its times.

    ``status`` is the ``wait`` status (None: not exited yet), ``started`` the
    wall-clock start, ``t0_ns``/``t_exit_ns`` the monotonic exec and exit
    stamps (0: unknown), ``rusage`` the children's rusage at exit and
    ``start_user``/``start_sys`` the launcher's share to subtract.
    """
    program = list(program)
    return {
        "command": program,
        "command_line": shlex.join(program),
        "exit_status": exit_status(status),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": (t_exit_ns - t0_ns) / 1e9 if t0_ns and t_exit_ns else None,
        "user_s": max(0.0, rusage.ru_utime - start_user) if rusage else None,
        "sys_s": max(0.0, rusage.ru_stime - start_sys) if rusage else None,
        # the program's exec and exit on the relay's clock (0: unknown): where the
        # calls of calls.bin fall within the run (``testbed replay``)
        "t_exec_ns": int(t0_ns or 0),
        "t_exit_ns": int(t_exit_ns or 0),
    }


def finish(
    out: Path,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
    from_rows: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Summarise ``calls.bin`` into ``syscalls.csv`` and write the complete ``run.json``.

    The end of every delegated run (relay and kthread).  ``run.json`` is
    rewritten first (still incomplete) so a crash while summarising leaves
    the final counts; ``extra`` keys follow ``complete``, then the keys
    ``from_rows`` makes of the per-syscall rows (e.g. ``escapes``).  Returns
    ``run.json`` as written (JSON types, ``rundir_version``).
    """
    write_meta(out, {**meta, "complete": False})
    rows, summary = summarize_all(out / CALLS_BIN)
    write_syscalls(out, rows)
    more = from_rows(rows) if from_rows is not None else {}
    write_meta(out, {**meta, "summary": summary, "complete": True, **(extra or {}), **more})
    return load(out).meta
