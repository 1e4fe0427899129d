"""kthread runs: ``testbed run --backend kmod --mode kthread``, the paper's same-node baseline.

The program's forwarded calls go to the ``mktrace`` module's delegate kernel
thread on this node, which spins ``--delay-us`` D on the way there and D on
the way back; no relay, no network.  The module records every call with its
own timestamps (``KRecord``); this module drains them while the program runs
and writes the same run directory as a relay run (``docs/rundir.md``), with
the timestamps mapped onto the documented fields:

==================  ===============================================  ==========
record field        module timestamp                                 clock
==================  ===============================================  ==========
``t_trap``          call trapped (hook entry)                        this host
``t_send``          queued for the delegate thread
``d_recv`` ...      end of the leg to the delegate (taken + D); all
``d_send``          four delegate stamps are equal: zero residence
``t_reply``         end of the leg back: the delegate completed it
``t_resume``        caller released, about to run the original call
==================  ===============================================  ==========

so ``overhead = t_resume - t_trap`` is ``2 D`` plus the hand-off, and
``f_c = overhead / 2`` as for every mechanism.  All stamps are CLOCK_MONOTONIC
of one host.  ``analysis.compare`` names the mechanism
``kmod-kthread/same-node`` (``kmod-kthread-faithful/same-node`` for the
mktrace-faithful variant, ``kmod-kthread-faithful-flushcaller/same-node``
when the caller's CPU is flushed too; ``+Dus`` when D > 0).
"""

from __future__ import annotations

import os
import select
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from testbed.compute.interpose import kmod as K
from testbed.compute.spec import RunSpec
from testbed.core import rundir, syscalls
from testbed.core.errors import TestbedError
from testbed.core.hostinfo import host_metadata
from testbed.core.mechanisms import mechanism_label
from testbed.core.program import forward_signals

#: Records drained per read(2) of the device.
DRAIN = 4096
#: The launcher drains the module's ring this often (the ring holds 65536 calls).
DRAIN_INTERVAL_S = 0.05
KRECORD_DTYPE = np.dtype(K.KRECORD_FIELDS)


def to_calls(recs: np.ndarray) -> np.ndarray:
    """Module records (``KRECORD_DTYPE``) as run-directory records (``rundir.CALL_DTYPE``)."""
    out = np.zeros(len(recs), dtype=rundir.CALL_DTYPE)
    out["tid"] = recs["tid"].astype(np.int32)
    out["nr"] = recs["nr"].astype(np.int16)
    released = (recs["flags"] & K.KREC_RELEASED) != 0
    out["flags"] = np.where(released, rundir.F_CALLER_GONE, 0).astype(np.uint16)
    out["t_trap"] = recs["ts_trap"]
    out["t_send"] = recs["ts_queued"]
    out["t_reply"] = recs["ts_done"]
    out["t_resume"] = recs["ts_resume"]
    for f in ("d_recv", "d_exec_start", "d_exec_end", "d_send"):
        out[f] = recs["ts_arrive"]
    return out


class _Drain:
    """Moves the module's records into ``calls.bin``."""

    def __init__(self, dev: K.Device, recorder: rundir.CallRecorder):
        self.dev, self.recorder = dev, recorder
        self.released = 0
        self.partial = b""

    def __call__(self) -> None:
        while True:
            data = self.dev.read_records(DRAIN)
            if not data:
                return
            data = self.partial + data
            whole = len(data) - len(data) % KRECORD_DTYPE.itemsize
            self.partial = data[whole:]
            recs = np.frombuffer(data[:whole], dtype=KRECORD_DTYPE)
            self.released += int(((recs["flags"] & K.KREC_RELEASED) != 0).sum())
            self.recorder.add_array(to_calls(recs))
            if whole < DRAIN * KRECORD_DTYPE.itemsize:
                return


def _wait_exec(status_r: int, child, limit_s: float = 300.0) -> tuple[bytes, bool]:
    """Read the helper's status pipe until its exec stamp (or EOF: it failed)."""
    data = b""
    deadline = time.monotonic() + limit_s
    while b"\n" not in data and time.monotonic() < deadline:
        if select.select([status_r], [], [], 0.1)[0]:
            chunk = os.read(status_r, 4096)
            if not chunk:
                return data, True
            data += chunk
        elif child.poll() is not None:
            break
    return data, False


@dataclass(frozen=True)
class _Setup:
    """What the module was told and answered before the program starts."""

    spec: RunSpec
    forwarded: frozenset[int]
    cfg: Any  # the module's configuration as read back (K.Config)
    delegate_cpu: int
    cpus: set[int] | None
    started: float


def run_kthread(
    spec: RunSpec, forwarded: frozenset[int], *, stdout: Any = None
) -> tuple[Path, dict[str, Any]]:
    """Run ``spec.program`` with ``forwarded`` handed to the kernel thread; (run directory, run.json).

    Called by :func:`testbed.compute.run.run` for a ``--mode kthread`` spec
    (checked when it was built: ``spec.kthread`` is set).
    """
    program, kt = list(spec.program), spec.kthread
    if shutil.which(program[0]) is None:
        raise TestbedError(f"program not found: {program[0]}")
    dev = K.Device()
    try:
        dev.set_config("kthread", delay_ns=round(kt.delay_us * 1000), descendants=True,
                       faithful=kt.faithful or None, flush_caller=kt.flush_caller_tlb)  # fmt: skip
        dev.set_syscalls(forwarded)
        cfg = dev.get_config()
        delegate_cpu = dev.status().delegate_cpu
        pin = spec.pin_program
        cpus = set(pin) if pin else K.compute_cpus("auto", delegate_cpu)
        out = rundir.create(spec.output)
    except BaseException:
        dev.close()
        raise
    recorder = rundir.CallRecorder(out / rundir.CALLS_BIN)
    drain = _Drain(dev, recorder)  # records reach calls.bin within DRAIN_INTERVAL_S
    setup = _Setup(spec=spec, forwarded=forwarded, cfg=cfg, delegate_cpu=delegate_cpu,
                   cpus=cpus, started=time.time())  # fmt: skip
    # run.json exists from the start, marked incomplete (docs/rundir.md, version 2)
    rundir.write_meta(out, {**_meta(setup), "exit_status": None, "complete": False})
    status_r, status_w = os.pipe()
    status = rusage = None
    t_exit = 0
    try:
        try:
            child = K.launch_registered(dev, program, status_fd=status_w, cpus=cpus, stdout=stdout)
        finally:
            os.close(status_w)
        restore = forward_signals(child.pid)
        try:
            head, eof = _wait_exec(status_r, child)
            pidfd = os.pidfd_open(child.pid)
            try:
                while status is None:
                    if select.select([pidfd], [], [], DRAIN_INTERVAL_S)[0]:
                        _pid, status, rusage = os.wait4(child.pid, 0)
                        t_exit = time.monotonic_ns()
                    drain()
            finally:
                os.close(pidfd)
        finally:
            restore()
        drain()
        tail = b"" if eof else os.read(status_r, 4096)
        stats = dev.stats()
        st = dev.status()
    finally:
        os.close(status_r)
        recorder.close()
        dev.close()
    stamp, launch_error = K.parse_status(head + tail)
    end = _End(status=status, rusage=rusage, t_exit=t_exit, stamp=stamp, count=recorder.count,
               released=drain.released, stats=stats, dropped=st.dropped)  # fmt: skip
    meta = rundir.finish(out, _meta(setup, end))
    if launch_error:
        raise TestbedError(launch_error)
    if st.dropped:
        print(f"testbed: warning: {st.dropped} call records lost (the launcher fell behind "
              "the module's ring); counts in run.json kmod.stats are complete", file=sys.stderr)  # fmt: skip
    return out, meta


@dataclass(frozen=True)
class _End:
    """How the program ended and what the module counted."""

    status: int | None = None
    rusage: Any = None
    t_exit: int = 0
    stamp: tuple[int, float, float] | None = None  # the helper's exec stamp (t0, user, sys)
    count: int = 0
    released: int = 0
    stats: dict = field(default_factory=dict)
    dropped: int = 0


def _meta(setup: _Setup, end: _End | None = None) -> dict[str, Any]:
    """``run.json`` of a kthread run (``end`` None: the program is still running)."""
    end = end or _End()
    t0, start_user, start_sys = end.stamp or (0, 0.0, 0.0)
    cfg, cpus, forwarded, spec = setup.cfg, setup.cpus, setup.forwarded, setup.spec
    status, rusage, t_exit, stats, dropped = (
        end.status,
        end.rusage,
        end.t_exit,
        end.stats,
        end.dropped,
    )
    faithful = bool(cfg.flags & K.F_FAITHFUL)
    info = K.module_info()
    return {
        "kind": "delegated",
        **rundir.program_meta(
            spec.program, status, setup.started, t0, t_exit, rusage, start_user, start_sys
        ),
        "backend": "kmod",
        "mode": "kthread",
        "mechanism": mechanism_label(faithful, bool(cfg.flags & K.F_FLUSH_CALLER)),
        "policy": spec.policy,
        "profile": spec.profile,
        "forwarded": sorted(syscalls.name_of(n) for n in forwarded),
        "forwarded_nrs": sorted(forwarded),
        "endpoint": None,
        "cpus": sorted(cpus) if cpus else None,
        "delegate": {
            "kind": "kthread",
            "host": os.uname().nodename,
            "cpu": setup.delegate_cpu,
            "delay_us": cfg.delay_ns / 1000,
            "faithful": faithful,
            "flush_caller_tlb": bool(cfg.flags & K.F_FLUSH_CALLER),
            "descendants": bool(cfg.flags & K.F_DESCENDANTS),
        },
        "kmod": {
            **info,
            "config_flags": cfg.flags,
            "stats": {
                "count": sum(s.count for s in stats.values()),
                "released": sum(s.released for s in stats.values()),
                "by_syscall": {syscalls.name_of(nr): s.count for nr, s in sorted(stats.items())},
            },
            "records_dropped": dropped,
        },
        "host": host_metadata(),
        "calls": {
            "count": end.count,
            "file": rundir.CALLS_BIN,
            "record_bytes": rundir.RECORD_BYTES,
            "faults": 0,
            "timeouts": 0,
            "peer_errors": 0,
            "not_sent": 0,
            "caller_gone": end.released,
            "late_replies": 0,
            "dropped": dropped,
        },
    }
