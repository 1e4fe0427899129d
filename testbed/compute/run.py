"""``testbed run`` as a function: a program with chosen calls forwarded, one run directory.

:func:`run` wires an interposition backend (:mod:`testbed.compute.interpose`), a relay
(:mod:`testbed.compute.relay`, or :mod:`testbed.compute.offload` in offload mode)
connected to a delegate, and a run directory (:mod:`testbed.core.rundir`); in
``kthread`` mode the mktrace module's kernel thread replaces relay and
delegate (:mod:`testbed.compute.kthread`).  The CLI, ``testbed demo`` and ``testbed
bench`` call it in process::

    from testbed.compute.run import run
    from testbed.compute.spec import RunSpec
    spec = RunSpec(("gzip", "-c", "big.tar"), delegate="tcp://10.0.0.2:5555", forward="read,write")
    res = run(spec)
    res.exit_status, res.path, res.summary["f_c_us"]

The options are a :class:`testbed.compute.spec.RunSpec`, checked when it is
built; ``run`` only runs it.

It must run in the main thread (it passes SIGINT/SIGTERM on to the program,
and the seccomp backend waits for calls with a signal watchdog), one run at a
time per process.  The relay's CPU time in ``run.json`` is the calling
process's, so a caller that does other work meanwhile (threads) should start
``testbed run`` as a subprocess instead.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from testbed.compute import escapes, fastpath
from testbed.compute.interpose import Backend, BackendError
from testbed.compute.interpose.kmod import KmodBackend
from testbed.compute.interpose.seccomp import SeccompBackend
from testbed.compute.spec import RunSpec
from testbed.core import cpus, rundir, syscalls
from testbed.core.errors import TestbedError
from testbed.core.hostinfo import host_metadata
from testbed.core.program import exit_status, forward_signals


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory and the ``run.json`` written there."""

    path: Path
    meta: dict[str, Any]

    @property
    def exit_status(self) -> int:
        """The program's exit status (128 + N if killed by signal N)."""
        return int(self.meta["exit_status"])

    @property
    def summary(self) -> dict[str, Any]:
        """Run-wide p50/p99 of rtt and overhead and ``f_c_us`` (empty: no calls)."""
        return self.meta.get("summary") or {}

    @property
    def calls(self) -> dict[str, Any]:
        """Counts: forwarded calls and faults (``run.json`` ``calls``)."""
        return self.meta["calls"]


BACKENDS = {"seccomp": SeccompBackend, "kmod": KmodBackend}


def make_backend(name: str, forwarded: frozenset[int], **options) -> Backend:
    """Instantiate the backend called ``name`` ("seccomp" or "kmod")."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r} (choose seccomp or kmod)")
    return BACKENDS[name](forwarded, **options)


def run(spec: RunSpec, *, stdout: int | IO[Any] | None = None) -> RunResult:
    """Run ``spec.program`` with calls forwarded as ``spec`` asks; write a run directory.

    ``spec`` was checked when it was built (:class:`testbed.compute.spec.RunSpec`);
    what only running finds out (the policy's profile, the backend on this
    kernel, the delegate, the program) fails here.  ``stdout`` is the
    program's standard output (default: inherited).  Every user error is a
    :class:`TestbedError` with one line; a program that cannot be started is
    one too, raised after its run directory was written.
    """
    forwarded = forwarded_calls(spec)
    for name in escapes.vdso_forwarded(forwarded):
        print(f"testbed: warning: {name} is served by the vDSO and never traps: forwarding "
              "it forwards nothing (run.json escapes.vdso)", file=sys.stderr)  # fmt: skip
    if spec.mode == "kthread":
        from testbed.compute.kthread import run_kthread  # lazy: kmod device, --mode kthread only

        return RunResult(*run_kthread(spec, forwarded, stdout=stdout))
    return _run_relay(spec, forwarded, stdout)


def forwarded_calls(spec: RunSpec) -> frozenset[int]:
    """The calls a run traps: the offload table, ``forward``, or ``policy`` on ``profile``."""
    if spec.mode == "offload":
        from testbed.core.offload_calls import trapped  # lazy: ctypes table, offload only

        # write-behind: close flushes the fd's writes first, so it traps too
        return trapped() | ({syscalls.NR_BY_NAME["close"]} if spec.offload.write_behind else set())
    if spec.forward is not None:
        return spec.forward
    from testbed.core.policy import resolve_policy  # lazy: fractions, --policy runs only

    return resolve_policy(spec.policy, spec.profile)


@dataclass
class _Session:
    """A relay run's parts, from the delegate's WELCOME to the closed recorder."""

    spec: RunSpec
    forwarded: frozenset[int]
    backend: Any
    sock: Any
    welcome: dict[str, Any]
    transport: str  # "zmtp" (ZMTP spoken by the relay) or "libzmq"
    relay: Any = None
    started: float = 0.0


def _run_relay(spec: RunSpec, forwarded: frozenset[int], stdout) -> RunResult:
    from testbed.compute.relay import connect  # lazy: zmq, relay modes only (not kthread)
    from testbed.core import zmtp  # lazy: as the relay

    watch = escapes.watch_set(spec.mode, spec.backend)  # counted only: run.json escapes
    options = {"watch": watch} if watch else {}
    backend = make_backend(spec.backend, forwarded, **options)  # fails early if unsupported here
    ctx, sock, welcome = connect(spec.delegate, timeout_s=spec.connect_timeout_s,
                                 curve_keys=spec.curve_keys,
                                 info={"mode": spec.mode, "backend": spec.backend})  # fmt: skip
    try:
        if spec.mode == "offload" and "offload" not in str(welcome.get("mode", "")):
            raise TestbedError(f"the delegate at {spec.delegate} does not offload "
                               "(start it with --offload-root DIR)")  # fmt: skip
        for opt, on in (
            ("--offload-write-behind", spec.offload and spec.offload.write_behind),
            ("--offload-read-ahead", spec.offload and spec.offload.read_ahead),
        ):
            if spec.mode == "offload" and on and welcome.get("workers", 1) > 1:
                raise TestbedError(f"{opt} needs a delegate that executes each "
                                   f"connection's calls in order (--workers 1); {spec.delegate} "
                                   f"has {welcome.get('workers')} workers")  # fmt: skip
        out = rundir.create(spec.output)
    except TestbedError:
        sock.close()
        backend.close()
        raise
    # "shm" (testbed.core.shmring.Dealer names itself), "zmtp" or "libzmq"
    transport = getattr(type(sock), "transport", None) or (
        "zmtp" if isinstance(sock, zmtp.Dealer) else "libzmq"
    )
    s = _Session(spec=spec, forwarded=forwarded, backend=backend, sock=sock, welcome=welcome,
                 transport=transport)  # fmt: skip
    s.relay = _make_relay(s, rundir.CallRecorder(out / rundir.CALLS_BIN))
    if spec.offload and spec.offload.write_behind:  # the window and its waits are the relay's
        why_python = "--offload-write-behind is served by the Python path"
    else:
        why_python = fastpath.attach(s.relay)  # the common case in C where it applies
    if spec.offload and spec.offload.read_ahead and why_python:
        s.relay.ra.why = f"the relay's C path does not serve this run: {why_python}"
        print(f"testbed: warning: --offload-read-ahead has no effect: {s.relay.ra.why}",
              file=sys.stderr)  # fmt: skip
    if spec.stage_trace:
        s.relay.stages = []
    s.started = time.time()
    status = rusage = child = threads = stats0 = stats1 = meta = None
    t_exit = 0
    program_cpus = None
    relay = s.relay
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        # the program starts first: its forwarded calls wait for relay.serve anyway,
        # and the host facts and the delegate's CPU baseline take ~20 ms
        child = backend.launch(list(spec.program), stdout=stdout)
        # run.json exists from here on, marked incomplete: a relay killed mid-run
        # leaves a loadable run directory (records flushed at least every second)
        meta = _relay_meta(s)
        rundir.write_meta(out, {**meta, "exit_status": None, "complete": False})
        stats0 = cpus.request_stats(sock)  # the delegate's CPU time, wherever it runs
        if spec.pin_program:
            os.sched_setaffinity(child.pid, spec.pin_program)
        program_cpus = cpus.affinity(child.pid)
        restore = forward_signals(child.pid)
        threads0 = fastpath.thread_cpu_ns()
        try:
            status, rusage, t_exit = relay.serve(child.pid)
            threads = fastpath.cpu_since(threads0)
            if spec.mode == "offload":
                relay.finish()
            lost = getattr(relay, "peer_down", False)
            stats1 = {"error": "delegate lost during the run"} if lost else cpus.request_stats(sock)
        finally:
            restore()
        child.returncode = exit_status(status)
    finally:
        if meta is None:  # the launch failed: the run directory still says what was asked
            rundir.write_meta(out, {**_relay_meta(s), "exit_status": None, "complete": False})
        if child is not None and status is None:  # the relay failed: do not leave it running
            child.kill()
            child.wait()
            backend.kill_descendants()
        if relay.fast is not None:
            relay.fast.close()  # its last records first
        relay.recorder.close()
        backend.close()
        sock.close()
    if spec.stage_trace:
        import numpy as np  # lazy: numpy (55 ms), --stage-trace only, after the program

        np.asarray(relay.stages, dtype=np.int64).reshape(-1, 3).tofile(spec.stage_trace)
    launch_error = backend.launch_error()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    meta = _relay_meta(s, status, rusage, t_exit)
    # the relay's own CPU time (all its threads, ZeroMQ's included) while the program ran
    meta["cpu"] = {"relay_user_s": cpu1.ru_utime - cpu0.ru_utime,
                   "relay_sys_s": cpu1.ru_stime - cpu0.ru_stime,
                   "relay_cpus": cpus.affinity(0), "program_cpus": program_cpus,
                   "cpu_count": os.cpu_count()}  # fmt: skip
    if stats0 is not None and stats1 is not None:
        meta["cpu"].update(cpus.delegate_cpu(stats0, stats1, program_cpus))
    meta["hot_path"] = {**fastpath.describe(relay, why_python), "thread_cpu_s": threads}
    extra = {"offload": relay.meta()} if spec.mode == "offload" else {}

    def escaped(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return {"escapes": escapes.build(
            forwarded=forwarded, mode=spec.mode, backend=backend.name, watched=backend.watched,
            start_io=backend.start_io, end_io=relay.exit_io, rows=rows)}  # fmt: skip

    meta = rundir.finish(out, meta, extra, escaped)
    if launch_error:
        raise TestbedError(launch_error)
    return RunResult(out, meta)


def _make_relay(s: _Session, recorder: rundir.CallRecorder):
    spec = s.spec
    if spec.mode == "offload":
        from testbed.compute.offload import OffloadRelay  # lazy: offload relay, offload only

        return OffloadRelay(s.backend, s.sock, recorder, list(spec.offload.paths),
                            timeout_s=spec.timeout_s, busy_poll=spec.busy_poll,
                            write_behind=spec.offload.write_behind,
                            read_ahead=spec.offload.read_ahead,
                            in_order=int(s.welcome.get("workers", 1)) <= 1)  # fmt: skip
    from testbed.compute.relay import Relay  # lazy: zmq, relay modes only (not kthread)

    return Relay(s.backend, s.sock, recorder, mode=spec.mode, timeout_s=spec.timeout_s,
                 busy_poll=spec.busy_poll)  # fmt: skip


def _relay_meta(s: _Session, status=None, rusage=None, t_exit: int = 0) -> dict[str, Any]:
    """``run.json`` of a relay run (``status`` None: the program has not exited yet)."""
    spec, backend, relay = s.spec, s.backend, s.relay
    start_user, start_sys = backend.start_rusage
    t0 = backend.launched_at_ns
    st = relay.stats
    return {
        "kind": "delegated",
        **rundir.program_meta(
            spec.program, status, s.started, t0, t_exit, rusage, start_user, start_sys
        ),
        "backend": backend.name,
        "sync_wakeup": backend.sync_wakeup,
        "orphan_guard": backend.orphan_guard,
        "mode": spec.mode,
        "policy": spec.policy,
        "profile": spec.profile,
        "forwarded": sorted(syscalls.name_of(n) for n in s.forwarded),
        "forwarded_nrs": sorted(s.forwarded),
        "endpoint": spec.delegate,
        "timeout_s": spec.timeout_s,
        "busy_poll": spec.busy_poll,
        "curve": bool(spec.curve_keys),
        "transport": s.transport,
        "delegate": s.welcome,
        "host": host_metadata(),
        "calls": {
            "count": relay.recorder.count,
            "file": rundir.CALLS_BIN,
            "record_bytes": rundir.RECORD_BYTES,
            "faults": st.timeouts + st.peer_errors + st.not_sent + st.unreadable,
            "timeouts": st.timeouts,
            "peer_errors": st.peer_errors,
            "not_sent": st.not_sent,
            "unreadable": st.unreadable,
            "caller_gone": st.caller_gone,
            "late_replies": st.late_replies,
        },
    }


# ---------------------------------------------------------------- summary text


def _fmt_us(v: float) -> str:
    return "n/a" if v != v else f"{v:.1f} µs"


def summary_lines(result: RunResult) -> list[str]:
    """The human summary of a run (what ``testbed run`` prints on stderr)."""
    meta, s = result.meta, result.summary
    c = meta["calls"]
    wall = meta["wall_s"]
    head = f"testbed: {Path(meta['command'][0]).name} exited {meta['exit_status']}" + (
        f" after {wall:.3f} s" if wall else ""
    )
    if meta["mode"] == "kthread":
        d = meta["delegate"]
        faithful = ", faithful" if d.get("faithful") else ""
        lines = [f"{head}; {c['count']} calls forwarded to the kernel thread on CPU {d['cpu']}"
                 f" (D = {d['delay_us']:g} µs per leg{faithful})"]  # fmt: skip
        if s:
            lines.append(f"testbed: overhead p50 {_fmt_us(s['overhead_p50_us'])} p99 "
                         f"{_fmt_us(s['overhead_p99_us'])}; f_c ≈ {_fmt_us(s['f_c_us'])}")  # fmt: skip
        return [*lines, f"testbed: run directory {result.path}"]
    lines = [f"{head}; {c['count']} calls forwarded to {meta['endpoint']}, {c['faults']} faults"]
    if s:
        lines.append(f"testbed: rtt p50 {_fmt_us(s['rtt_p50_us'])} p99 {_fmt_us(s['rtt_p99_us'])}; "
                     f"overhead p50 {_fmt_us(s['overhead_p50_us'])} p99 {_fmt_us(s['overhead_p99_us'])}; "
                     f"f_c ≈ {_fmt_us(s['f_c_us'])}")  # fmt: skip
    if c["faults"]:
        lines.append(f"testbed: FAULTS: {c['timeouts']} timed out, {c['not_sent']} released unsent, "
                     f"{c['peer_errors']} delegate errors, {c['unreadable']} with unreadable memory "
                     + ("(calls failed with EIO)" if meta["mode"] == "offload"
                        else "(calls ran locally)"))  # fmt: skip
    return [*lines, f"testbed: run directory {result.path}"]
