"""``testbed run`` as a function: a program with chosen calls forwarded, one run directory.

:func:`run` wires an interposition backend (:mod:`testbed.interpose`), a relay
(:mod:`testbed.relay`, or :mod:`testbed.offload.client` in offload mode)
connected to a delegate, and a run directory (:mod:`testbed.rundir`); in
``kthread`` mode the mktrace module's kernel thread replaces relay and
delegate (:mod:`testbed.kthread`).  The CLI, ``testbed demo`` and ``testbed
bench`` call it in process::

    from testbed.run import run
    res = run(["gzip", "-c", "big.tar"], delegate="tcp://10.0.0.2:5555", forward="read,write")
    res.exit_status, res.path, res.summary["f_c_us"]

It must run in the main thread (it passes SIGINT/SIGTERM on to the program,
and the seccomp backend waits for calls with a signal watchdog), one run at a
time per process.  The relay's CPU time in ``run.json`` is the calling
process's, so a caller that does other work meanwhile (threads) should start
``testbed run`` as a subprocess instead.
"""

from __future__ import annotations

import os
import resource
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from testbed import cpus, fastpath, rundir, syscalls
from testbed.errors import TestbedError
from testbed.hostinfo import host_metadata
from testbed.program import exit_status, forward_signals

MODES = ("cost", "offload", "kthread")


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


def run(
    program: Sequence[str],
    *,
    delegate: str | None = None,
    forward: Iterable[int] | str | None = None,
    policy: str | None = None,
    profile: str | os.PathLike | None = None,
    mode: str = "cost",
    backend: str = "seccomp",
    output: str | os.PathLike | None = None,
    timeout_s: float = 2.0,
    connect_timeout_s: float = 3.0,
    busy_poll: bool = False,
    curve_keys: str | None = None,
    offload_paths: Sequence[str] | None = None,
    pin_program: Iterable[int] | None = None,
    delay_us: float = 0.0,
    faithful: bool = False,
    flush_caller_tlb: bool = False,
    stdout: int | IO[Any] | None = None,
    stage_trace: str | os.PathLike | None = None,
) -> RunResult:
    """Run ``program`` with calls forwarded; write a run directory; return it.

    The forwarded set is ``forward`` (syscall numbers, or names as in
    ``"read,write"``) or ``policy`` chosen from the native ``profile``; offload
    mode traps the file-I/O calls on ``offload_paths`` itself.  ``kthread``
    mode needs ``backend="kmod"`` and no ``delegate``; ``delay_us``,
    ``faithful`` and ``flush_caller_tlb`` belong to it.  ``stdout`` is the
    program's standard output (default: inherited).  ``stage_trace``: the
    relay also stamps, per call, when the send returned, when the reply was
    decoded and when the record was written, and saves them to this file
    (int64 triples in record order; ``testbed bench --breakdown`` asks for it
    through :data:`testbed.relay.STAGE_TRACE_ENV`).  Every user
    error is a :class:`TestbedError` with one line; a program that cannot be
    started is one too, raised after its run directory was written.
    """
    program = list(program)
    if not program:
        raise TestbedError("no program given (put it after --, e.g. -- gzip -k FILE)")
    if isinstance(forward, str):
        forward = syscalls.parse_set(forward)
    elif forward is not None:
        forward = frozenset(forward)
    pin = frozenset(pin_program) if pin_program else None
    _check_mechanism(mode, backend, delegate, curve_keys, offload_paths, delay_us, faithful,
                     flush_caller_tlb)  # fmt: skip
    if mode == "kthread":
        from testbed.kthread import run_kthread

        forwarded = resolve_forward(forward, policy, profile, offload_paths)
        path, meta = run_kthread(program, forwarded, output=output, delay_us=delay_us,
                                 faithful=faithful, flush_caller_tlb=flush_caller_tlb,
                                 pin_program=pin, policy=policy, profile=profile, stdout=stdout)  # fmt: skip
        return RunResult(path, meta)
    return _run_relay(
        program, delegate, forward, policy, profile, mode, backend, output, timeout_s,
        connect_timeout_s, busy_poll, curve_keys, offload_paths, pin, stdout, stage_trace,
    )  # fmt: skip


def _check_mechanism(mode, backend, delegate, curve_keys, offload_paths, delay_us, faithful,
                     flush_caller_tlb) -> None:  # fmt: skip
    """One clear error for options that do not go with ``mode`` (or need another)."""
    if mode not in MODES:
        raise TestbedError(f"unknown mode {mode!r} (choose {', '.join(MODES)})")
    if mode == "kthread":
        from testbed.interpose.kmod import MAX_DELAY_NS

        if backend != "kmod":
            raise TestbedError(
                f"--mode kthread needs --backend kmod (the mktrace module's kernel thread), "
                f"not {backend}"
            )
        if delegate:
            raise TestbedError(
                "--mode kthread forwards to the kernel thread on this node: drop --delegate"
            )
        if curve_keys:
            raise TestbedError("--curve-keys is for a delegate endpoint, not --mode kthread")
        if offload_paths:
            raise TestbedError("--offload-path is only used with --mode offload")
        if flush_caller_tlb and not faithful:
            raise TestbedError("--flush-caller-tlb needs --faithful")
        if delay_us < 0:
            raise TestbedError(f"--delay-us must be >= 0, not {delay_us:g}")
        if delay_us * 1000 > MAX_DELAY_NS:
            raise TestbedError(f"--delay-us must be at most {MAX_DELAY_NS // 1000} (1 s per leg)")
        return
    if delay_us or faithful or flush_caller_tlb:
        raise TestbedError(
            "--delay-us, --faithful and --flush-caller-tlb apply to --mode kthread only "
            "(a delegate's delay is testbed delegate --delay-us)"
        )
    if not delegate:
        raise TestbedError("--delegate ENDPOINT is required (or --backend kmod --mode kthread)")


def resolve_forward(
    forward: frozenset[int] | None,
    policy: str | None,
    profile: str | os.PathLike | None,
    offload_paths: Sequence[str] | None = None,
) -> frozenset[int]:
    """The forwarded set of a cost-mode or kthread run: ``forward``, or ``policy`` on ``profile``."""
    if offload_paths:
        raise TestbedError("--offload-path is only used with --mode offload")
    if forward is not None:
        if profile:
            raise TestbedError("--profile is only used with --policy")
        return forward
    if not profile:
        if policy is None:
            raise TestbedError("one of --forward or --policy is required (cost mode)")
        raise TestbedError("--policy needs --profile RUNDIR (a native profile to choose from)")
    from testbed.policy import resolve_policy

    return resolve_policy(policy, profile)


def _run_relay(program, endpoint, forward, policy, profile, mode, backend_name, output,
               timeout_s, connect_timeout_s, busy_poll, curve_keys, offload_paths, pin,
               stdout, stage_trace) -> RunResult:  # fmt: skip
    from testbed import zmtp
    from testbed.interpose import make_backend
    from testbed.relay import Relay, check_timeout, connect

    check_timeout("--timeout", timeout_s)
    check_timeout("--connect-timeout", connect_timeout_s)
    if mode == "offload":
        from testbed.offload.client import check_run_options

        cost_selection = forward is not None or policy is not None or bool(profile)
        forwarded, offload_paths = check_run_options(offload_paths, backend_name, cost_selection)
    else:
        forwarded = resolve_forward(forward, policy, profile, offload_paths)
    backend = make_backend(backend_name, forwarded)  # fails early if unsupported here
    ctx, sock, welcome = connect(endpoint, timeout_s=connect_timeout_s, curve_keys=curve_keys,
                                 info={"mode": mode, "backend": backend_name})  # fmt: skip
    try:
        if mode == "offload" and "offload" not in str(welcome.get("mode", "")):
            raise TestbedError(f"the delegate at {endpoint} does not offload "
                               "(start it with --offload-root DIR)")  # fmt: skip
        out = rundir.create(output)
    except TestbedError:
        sock.close()
        backend.close()
        raise
    recorder = rundir.CallRecorder(out / rundir.CALLS_BIN)
    if mode == "offload":
        from testbed.offload.client import OffloadRelay

        relay = OffloadRelay(backend, sock, recorder, offload_paths,
                             timeout_s=timeout_s, busy_poll=busy_poll)  # fmt: skip
    else:
        relay = Relay(backend, sock, recorder, mode=mode, timeout_s=timeout_s, busy_poll=busy_poll)
    why_python = fastpath.attach(relay)  # the common case in C where it applies
    if stage_trace:
        relay.stages = []
    opts = {"program": program, "mode": mode, "policy": policy, "profile": profile,
            "forwarded": forwarded, "endpoint": endpoint, "timeout_s": timeout_s,
            "busy_poll": busy_poll, "curve": bool(curve_keys), "welcome": welcome,
            "transport": "zmtp" if isinstance(sock, zmtp.Dealer) else "libzmq"}  # fmt: skip
    started = time.time()
    # run.json exists from the start, marked incomplete: a relay killed mid-run
    # leaves a loadable run directory (records flushed at least every second)
    meta = _relay_meta(opts, backend, relay, started, None, None, 0)
    rundir.write_meta(out, {**meta, "exit_status": None, "complete": False})
    status = rusage = child = threads = stats1 = None
    t_exit = 0
    program_cpus = None
    stats0 = cpus.request_stats(sock)  # the delegate's CPU time, wherever it runs
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        child = backend.launch(program, stdout=stdout)
        if backend.orphan_guard:  # known once launched
            meta["orphan_guard"] = backend.orphan_guard
            rundir.write_meta(out, {**meta, "exit_status": None, "complete": False})
        if pin:
            os.sched_setaffinity(child.pid, pin)
        program_cpus = cpus.affinity(child.pid)
        restore = forward_signals(child.pid)
        threads0 = fastpath.thread_cpu_ns()
        try:
            status, rusage, t_exit = relay.serve(child.pid)
            threads = fastpath.cpu_since(threads0)
            if mode == "offload":
                relay.finish()
            lost = getattr(relay, "peer_down", False)
            stats1 = {"error": "delegate lost during the run"} if lost else cpus.request_stats(sock)
        finally:
            restore()
        child.returncode = exit_status(status)
    finally:
        if child is not None and status is None:  # the relay failed: do not leave it running
            child.kill()
            child.wait()
            backend.kill_descendants()
        if relay.fast is not None:
            relay.fast.close()  # its last records first
        recorder.close()
        backend.close()
        sock.close()
    if stage_trace:
        import numpy as np

        np.asarray(relay.stages, dtype=np.int64).reshape(-1, 3).tofile(stage_trace)
    launch_error = backend.launch_error()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    meta = _relay_meta(opts, backend, relay, started, status, rusage, t_exit)
    # the relay's own CPU time (all its threads, ZeroMQ's included) while the program ran
    meta["cpu"] = {"relay_user_s": cpu1.ru_utime - cpu0.ru_utime,
                   "relay_sys_s": cpu1.ru_stime - cpu0.ru_stime,
                   "relay_cpus": cpus.affinity(0), "program_cpus": program_cpus,
                   "cpu_count": os.cpu_count()}  # fmt: skip
    if stats1 is not None:
        meta["cpu"].update(cpus.delegate_cpu(stats0, stats1, program_cpus))
    meta["hot_path"] = {**fastpath.describe(relay, why_python), "thread_cpu_s": threads}
    extra = {"offload": relay.meta()} if mode == "offload" else {}
    meta = finish_rundir(out, meta, extra)
    if launch_error:
        raise TestbedError(launch_error)
    return RunResult(out, meta)


def finish_rundir(out: Path, meta: dict[str, Any], extra: dict[str, Any] | None = None) -> dict:
    """Summarise ``calls.bin`` into ``syscalls.csv`` and write the complete ``run.json``.

    ``run.json`` is rewritten first (still incomplete) so a crash while
    summarising leaves the final counts; ``extra`` keys follow ``complete``.
    """
    rundir.write_meta(out, {**meta, "complete": False})
    rows, summary = rundir.summarize_all(out / rundir.CALLS_BIN)
    rundir.write_syscalls(out, rows)
    rundir.write_meta(out, {**meta, "summary": summary, "complete": True, **(extra or {})})
    return rundir.load(out).meta  # as written (JSON types, rundir_version)


def _relay_meta(opts, backend, relay, started, status, rusage, t_exit) -> dict[str, Any]:
    start_user, start_sys = backend.start_rusage
    t0 = backend.launched_at_ns
    st = relay.stats
    program, forwarded = opts["program"], opts["forwarded"]
    return {
        "kind": "delegated",
        "command": list(program),
        "command_line": shlex.join(program),
        "exit_status": exit_status(status),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": (t_exit - t0) / 1e9 if t0 and t_exit else None,
        "user_s": max(0.0, rusage.ru_utime - start_user) if rusage else None,
        "sys_s": max(0.0, rusage.ru_stime - start_sys) if rusage else None,
        "backend": backend.name,
        "sync_wakeup": backend.sync_wakeup,
        "orphan_guard": backend.orphan_guard,
        "mode": opts["mode"],
        "policy": opts["policy"],
        "profile": str(opts["profile"]) if opts["profile"] else None,
        "forwarded": sorted(syscalls.name_of(n) for n in forwarded),
        "forwarded_nrs": sorted(forwarded),
        "endpoint": opts["endpoint"],
        "timeout_s": opts["timeout_s"],
        "busy_poll": opts["busy_poll"],
        "curve": opts["curve"],
        "transport": opts["transport"],
        "delegate": opts["welcome"],
        "host": host_metadata(),
        "calls": {
            "count": relay.recorder.count,
            "file": rundir.CALLS_BIN,
            "record_bytes": rundir.CALL_DTYPE.itemsize,
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
