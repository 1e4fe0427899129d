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
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from testbed import rundir, syscalls
from testbed.errors import TestbedError
from testbed.hostinfo import host_metadata
from testbed.interpose import kmod as K

#: Records drained per read(2) of the device.
DRAIN = 4096
#: The launcher drains the module's ring this often (the ring holds 65536 calls).
DRAIN_INTERVAL_S = 0.05
KRECORD_DTYPE = np.dtype(K.KRECORD_FIELDS)


def mechanism_label(faithful: bool, flush_caller: bool = False) -> str:
    """The mechanism a kthread run measures (``analysis.compare.mechanism`` adds ``+Dus``)."""
    if faithful:
        return f"kmod-kthread-faithful{'-flushcaller' if flush_caller else ''}/same-node"
    return "kmod-kthread/same-node"


def check_args(args: Any) -> None:
    """One clear error for options that do not go with ``--mode kthread`` (or need it)."""
    kthread = args.mode == "kthread"
    if kthread:
        if args.backend != "kmod":
            raise TestbedError(
                f"--mode kthread needs --backend kmod (the mktrace module's kernel thread), "
                f"not {args.backend}"
            )
        if args.delegate:
            raise TestbedError(
                "--mode kthread forwards to the kernel thread on this node: drop --delegate"
            )
        if getattr(args, "curve_keys", None):
            raise TestbedError("--curve-keys is for a delegate endpoint, not --mode kthread")
        if getattr(args, "offload_path", None):
            raise TestbedError("--offload-path is only used with --mode offload")
        if args.flush_caller_tlb and not args.faithful:
            raise TestbedError("--flush-caller-tlb needs --faithful")
        if args.delay_us * 1000 > K.MAX_DELAY_NS:
            raise TestbedError(f"--delay-us must be at most {K.MAX_DELAY_NS // 1000} (1 s per leg)")
        return
    if args.delay_us or args.faithful or args.flush_caller_tlb:
        raise TestbedError(
            "--delay-us, --faithful and --flush-caller-tlb apply to --mode kthread only "
            "(a delegate's delay is testbed delegate --delay-us)"
        )
    if not args.delegate:
        raise TestbedError("--delegate ENDPOINT is required (or --backend kmod --mode kthread)")


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


def main_run_kthread(args: Any) -> int:
    """``testbed run --backend kmod --mode kthread``: run the program, write a run directory."""
    from testbed.relay import _forward_signals, _resolve_forward

    forwarded = _resolve_forward(args)
    delay_ns = round(args.delay_us * 1000)
    if shutil.which(args.program[0]) is None:
        raise TestbedError(f"program not found: {args.program[0]}")
    dev = K.Device()
    try:
        dev.set_config("kthread", delay_ns=delay_ns, descendants=True,
                       faithful=args.faithful or None, flush_caller=args.flush_caller_tlb)  # fmt: skip
        dev.set_syscalls(forwarded)
        cfg = dev.get_config()
        delegate_cpu = dev.status().delegate_cpu
        pinned = getattr(args, "pin_program", None)
        cpus = set(pinned) if pinned else K.compute_cpus("auto", delegate_cpu)
        out = rundir.create(args.output)
    except BaseException:
        dev.close()
        raise
    faithful = bool(cfg.flags & K.F_FAITHFUL)
    recorder = rundir.CallRecorder(out / rundir.CALLS_BIN)
    drain = _Drain(dev, recorder)  # records reach calls.bin within DRAIN_INTERVAL_S
    started = time.time()
    # run.json exists from the start, marked incomplete (docs/rundir.md, version 2)
    rundir.write_meta(out, {**_meta(args, forwarded, cfg, delegate_cpu, cpus, started, None, None,
                                    0, None, 0, 0, {}, 0), "exit_status": None, "complete": False})  # fmt: skip
    status_r, status_w = os.pipe()
    status = rusage = None
    t_exit = 0
    try:
        try:
            child = K.launch_registered(dev, args.program, status_fd=status_w, cpus=cpus)
        finally:
            os.close(status_w)
        restore = _forward_signals(child.pid)
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
    meta = _meta(args, forwarded, cfg, delegate_cpu, cpus, started, status, rusage, t_exit,
                 stamp, recorder.count, drain.released, stats, st.dropped)  # fmt: skip
    rundir.write_meta(out, {**meta, "complete": False})
    rows, summary = rundir.summarize_all(out / rundir.CALLS_BIN)
    rundir.write_syscalls(out, rows)
    meta["summary"] = summary
    meta["complete"] = True
    rundir.write_meta(out, meta)
    if launch_error:
        raise TestbedError(launch_error)
    if st.dropped:
        print(f"testbed: warning: {st.dropped} call records lost (the launcher fell behind "
              "the module's ring); counts in run.json kmod.stats are complete", file=sys.stderr)  # fmt: skip
    if not args.quiet:
        _print_summary(args, meta, summary, out, faithful)
    return meta["exit_status"]


def _meta(args, forwarded, cfg, delegate_cpu, cpus, started, status, rusage, t_exit, stamp,
          count, released, stats, dropped) -> dict[str, Any]:  # fmt: skip
    t0, start_user, start_sys = stamp or (0, 0.0, 0.0)
    faithful = bool(cfg.flags & K.F_FAITHFUL)
    info = K.module_info()
    return {
        "kind": "delegated",
        "command": list(args.program),
        "command_line": shlex.join(args.program),
        "exit_status": _exit_status(status),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": (t_exit - t0) / 1e9 if t0 and t_exit else None,
        "user_s": max(0.0, rusage.ru_utime - start_user) if rusage else None,
        "sys_s": max(0.0, rusage.ru_stime - start_sys) if rusage else None,
        "backend": "kmod",
        "mode": "kthread",
        "mechanism": mechanism_label(faithful, bool(cfg.flags & K.F_FLUSH_CALLER)),
        "policy": getattr(args, "policy", None),
        "profile": str(args.profile) if getattr(args, "profile", None) else None,
        "forwarded": sorted(syscalls.name_of(n) for n in forwarded),
        "forwarded_nrs": sorted(forwarded),
        "endpoint": None,
        "cpus": sorted(cpus) if cpus else None,
        "delegate": {
            "kind": "kthread",
            "host": os.uname().nodename,
            "cpu": delegate_cpu,
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
            "count": count,
            "file": rundir.CALLS_BIN,
            "record_bytes": rundir.CALL_DTYPE.itemsize,
            "faults": 0,
            "timeouts": 0,
            "peer_errors": 0,
            "not_sent": 0,
            "caller_gone": released,
            "late_replies": 0,
            "dropped": dropped,
        },
    }


def _exit_status(status: int | None) -> int:
    from testbed.relay import _exit_code

    return _exit_code(status) if status is not None else 1


def _print_summary(args, meta: dict, s: dict, out: Path, faithful: bool) -> None:
    from testbed.relay import _fmt_us

    c, d = meta["calls"], meta["delegate"]
    wall = meta["wall_s"]
    print(f"testbed: {Path(args.program[0]).name} exited {meta['exit_status']}"
          + (f" after {wall:.3f} s" if wall else "")
          + f"; {c['count']} calls forwarded to the kernel thread on CPU {d['cpu']}"
          f" (D = {d['delay_us']:g} µs per leg{', faithful' if faithful else ''})", file=sys.stderr)  # fmt: skip
    if s:
        print(f"testbed: overhead p50 {_fmt_us(s['overhead_p50_us'])} p99 "
              f"{_fmt_us(s['overhead_p99_us'])}; f_c ≈ {_fmt_us(s['f_c_us'])}", file=sys.stderr)  # fmt: skip
    print(f"testbed: run directory {out}", file=sys.stderr)
