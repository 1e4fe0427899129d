"""Native syscall profiles: ``testbed profile [-o RUNDIR] -- PROGRAM ARGS``.

Runs PROGRAM once, natively (no delegation), under a syscall tracer and writes
a run directory (``kind = "profile"``) with one ``syscalls.csv`` row per
syscall type: ``name, nr, n`` (invocations), ``g_ns`` (total time of all its
invocations, ns, the paper's g(s)) and ``errors``.

How it is measured
  * Tracer: ``strace -f -T`` (ptrace, every call timed, counts exact) where
    it is installed; otherwise ``perf trace -s`` (in-kernel raw_syscalls
    tracepoints, per-thread summaries) if ``perf trace -s -- true`` works.
    ``--method`` forces one.  perf slows the program down less (better
    g(s)) but at high call rates (around 10^5 calls/s) it can drop events
    even with its 16 MiB per-CPU buffer: ``lost_events`` counts those perf
    reports (with a warning), and it was measured here to miss up to ~1.5 %
    of a program's calls unreported, which is why ``auto`` prefers strace.
  * Timing: the tracer runs a small Python shim that forks, execs PROGRAM and
    ``wait4``s it: wall time is taken around fork/wait in the shim and
    user/sys time is PROGRAM's own rusage (including its waited-for
    descendants), so neither the tracer's CPU time nor the shim's start-up is
    counted.  The shim's own syscalls (its pid) are dropped from the profile,
    and so are the few calls its forked child makes before ``execve``
    (calibrated once per invocation by tracing the shim with a program that
    cannot be executed; ``shim_calls_removed`` in run.json lists them).
  * g(s) comes from the tracer's entry/exit timestamps, so it includes the
    tracer's per-call overhead (small for perf, large for strace) and, for a
    call that blocks (``wait4`` for a child, ``read`` on a pipe), the time it
    blocked.  For multi-process programs the times of all processes are added.

Derived numbers in ``run.json``
  * ``C_s = user_s``: the paper's C is the time of "all instructions not
    executed in the context of a system call", i.e. user time; it is CPU
    time, so it does not grow when the machine is busy (wall time does), and
    it is well defined for multi-process programs.  Caveat: the kernel splits
    CPU time into user/sys by sampling at the tick, so C is coarse for runs
    of a few tens of ms.  ``C_wall_s = wall - sum g - delay`` (single-threaded
    programs only; ``delay`` = time spent waiting for a CPU, from the exited
    process's ``/proc/PID/schedstat``) is recorded as the alternative; it was
    not chosen because on a loaded machine g is inflated by preemption inside
    syscalls and the subtraction goes to 0.
  * ``t_nd_s = C_s + sum g`` (the model's native time; compare with wall_s).
  * ``p_sys = sys / (user + sys)`` (the paper's Table I definition, from
    ``time``) and ``p_g = sum g / wall``.

The command exits with PROGRAM's exit status (128 + N for signal N).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed.core import rundir
from testbed.core.errors import TestbedError
from testbed.core.hostinfo import host_metadata
from testbed.core.program import exit_status
from testbed.core.syscalls import NR_BY_NAME

METHOD_PERF = "perf trace -s"
METHOD_STRACE = "strace -f -T"
PERF_MMAP_PAGES = "4096"

# Runs inside the tracer: fork, exec PROGRAM, wait4, write the times as JSON.
_SHIM = r"""
import ctypes, json, os, signal, sys, time
out, argv = sys.argv[1], sys.argv[2:]
# Ctrl-C is for the program, like time(1).  A handler (not SIG_IGN) is reset
# to the default by execve itself, so the child makes no extra syscall.
signal.signal(signal.SIGINT, lambda *_: None)
libc = ctypes.CDLL(None, use_errno=True)
syscall = libc.syscall
syscall.restype = ctypes.c_long
c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[a.encode() for a in argv], None)
env = [f"{k}={v}".encode() for k, v in os.environ.items()]
c_env = (ctypes.c_char_p * (len(env) + 1))(*env, None)
path = ctypes.c_char_p(argv[0].encode())
t0 = time.monotonic_ns()
# Raw clone(SIGCHLD) = fork without glibc's and CPython's after-fork work, so
# the child makes no syscall before execve (only its return from clone).
pid = syscall(56, 17, 0, 0, 0, 0)
if pid == 0:
    syscall(59, path, c_argv, c_env)  # execve
    syscall(231, 127)  # exit_group(127) if execve failed
os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
t1 = time.monotonic_ns()
try:  # the zombie's scheduler stats: on-CPU time and time spent waiting for a CPU
    run_ns, delay_ns = (int(x) for x in open(f"/proc/{pid}/schedstat").read().split()[:2])
except (OSError, ValueError):
    run_ns = delay_ns = -1
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as f:
    json.dump({"shim_pid": os.getpid(), "pid": pid, "status": status,
               "wall_s": (t1 - t0) / 1e9, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
               "maxrss_kb": ru.ru_maxrss, "sched_run_s": run_ns / 1e9,
               "sched_delay_s": delay_ns / 1e9}, f)
"""


class ProfileError(TestbedError):
    """The program could not be profiled."""


# ---------------------------------------------------------------- parsers

_PERF_HEAD = re.compile(r"^\s*(?P<comm>.*?) \((?P<tid>\d+)\), (?P<events>\d+) events")
_PERF_ROW = re.compile(
    r"^\s+(?P<name>[a-z_][a-z0-9_]*)\s+(?P<calls>\d+)\s+(?P<errors>\d+)\s+(?P<total>[\d.]+)\s"
)


def parse_perf_summary(text: str, exclude_tids: Sequence[int] = ()) -> dict[str, dict]:
    """Aggregate ``perf trace -s`` per-thread summaries: name -> {n, g_ns, errors}."""
    out: dict[str, dict] = {}
    tid = None
    for line in text.splitlines():
        m = _PERF_HEAD.match(line)
        if m:
            tid = int(m["tid"])
            continue
        m = _PERF_ROW.match(line)
        if m and tid is not None and tid not in exclude_tids:
            row = out.setdefault(m["name"], {"n": 0, "g_ns": 0, "errors": 0})
            row["n"] += int(m["calls"])
            row["errors"] += int(m["errors"])
            row["g_ns"] += round(float(m["total"]) * 1e6)  # msec -> ns
    return out


_ST_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<rest>.*)$")
_ST_CALL = re.compile(r"^(?P<name>[a-z_][a-z0-9_]*)\(")
_ST_RESUMED = re.compile(r"^<\.\.\. (?P<name>[a-z_][a-z0-9_]*) resumed>")
_ST_RET = re.compile(r"\)\s+=\s+(?P<ret>-?\d+|\?|0x[0-9a-f]+)(?P<tail>.*?)(?:<(?P<t>[\d.]+)>)?\s*$")


def parse_strace(text: str, exclude_pids: Sequence[int] = ()) -> dict[str, dict]:
    """Aggregate ``strace -f -T -qq`` output: name -> {n, g_ns, errors}.

    A call split into ``<unfinished ...>`` / ``<... resumed>`` counts once
    (at its resumed line, which carries the time).
    """
    out: dict[str, dict] = {}
    for line in text.splitlines():
        m = _ST_LINE.match(line)
        if not m or int(m["pid"]) in exclude_pids:
            continue
        rest = m["rest"]
        if rest.endswith("<unfinished ...>") or rest.startswith(("---", "+++")):
            continue
        r = _ST_RESUMED.match(rest)
        name = r["name"] if r else None
        if name is None:
            c = _ST_CALL.match(rest)
            if not c:
                continue
            name = c["name"]
        row = out.setdefault(name, {"n": 0, "g_ns": 0, "errors": 0})
        row["n"] += 1
        ret = _ST_RET.search(rest)
        if ret:
            if ret["ret"].startswith("-") and ret["tail"].strip()[:1].isalpha():
                row["errors"] += 1
            if ret["t"]:
                row["g_ns"] += round(float(ret["t"]) * 1e9)
    return out


# ---------------------------------------------------------------- tracing


@functools.cache
def perf_works() -> bool:
    """Does ``perf trace -s`` work here (tracepoints readable, perf installed)?"""
    perf = shutil.which("perf")
    if not perf:
        return False
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "perf.txt"
        try:
            r = subprocess.run(
                [perf, "trace", "-s", "-o", str(out), "--", "true"],
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        if r.returncode != 0 or not out.exists():
            return False
        return bool(parse_perf_summary(out.read_text(errors="replace")))


def choose_method(method: str = "auto") -> str:
    if method == "perf":
        if not perf_works():
            raise ProfileError("perf trace -s does not work here (try --method strace)")
        return METHOD_PERF
    if method == "strace":
        if not shutil.which("strace"):
            raise ProfileError("strace is not installed")
        return METHOD_STRACE
    # auto: strace first.  Its counts n(s) are exact; perf trace -s was measured
    # here to drop up to ~1.5% of a program's calls (tar: openat 202-205 of 205
    # over 8 runs, unreported), and n(s) is what f(s) = 2 f_c n(s) multiplies.
    # perf's lower overhead gives better g(s): ask for it with --method perf.
    if shutil.which("strace"):
        return METHOD_STRACE
    if perf_works():
        return METHOD_PERF
    raise ProfileError("neither strace nor perf trace is available to profile with")


def _resolve(program: str) -> str:
    path = program if "/" in program else (shutil.which(program) or "")
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise ProfileError(f"program {program!r} not found or not executable")
    return os.path.abspath(path)


def _traced_run(method: str, argv: Sequence[str], stdout: Any = None) -> tuple[dict, str]:
    """Run ``argv`` under the shim and the tracer; return (shim times, tracer output)."""
    with tempfile.TemporaryDirectory(prefix="testbed-profile-") as d:
        times_path = Path(d) / "times.json"
        trace_path = Path(d) / "trace.txt"
        shim = [sys.executable, "-c", _SHIM, str(times_path), *argv]
        if method == METHOD_PERF:
            # 16 MiB of ring buffer per CPU: at hundreds of thousands of calls per
            # second perf otherwise drops events (reported as lost_events).
            # --sort-events: perf reads one buffer per CPU and, unsorted, can see a
            # migrated thread's sys_exit before its sys_enter and silently drop the
            # pair (seen on a loaded machine: 140 of 145 openat counted, no LOST).
            cmd = ["perf", "trace", "-s", "--sort-events", "--mmap-pages", PERF_MMAP_PAGES,
                   "-o", str(trace_path), "--", *shim]  # fmt: skip
        else:
            cmd = ["strace", "-f", "-T", "-qq", "-o", str(trace_path), "--", *shim]
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the program's status is reported
        try:
            r = subprocess.run(cmd, stdin=None, stdout=stdout, stderr=subprocess.PIPE, check=False)
        except OSError as exc:
            raise ProfileError(f"cannot start {cmd[0]}: {exc.strerror}") from None
        finally:
            signal.signal(signal.SIGINT, old)
        if not times_path.exists():
            err = r.stderr.decode(errors="replace").strip().splitlines()
            raise ProfileError(
                f"{method} failed (status {r.returncode}): {err[-1] if err else 'no output'}"
            )
        times = json.loads(times_path.read_text())
        text = trace_path.read_text(errors="replace") if trace_path.exists() else ""
    return times, text


def _table(method: str, text: str, exclude: Sequence[int]) -> dict[str, dict]:
    if method == METHOD_PERF:
        return parse_perf_summary(text, exclude)
    return parse_strace(text, exclude)


@functools.cache
def shim_calls(method: str) -> dict[str, dict]:
    """The calls the shim's forked child makes before its ``execve`` (calibrated).

    Measured once per process by tracing the shim with a program that cannot
    be executed: whatever its child does apart from the failed ``execve`` and
    the ``exit_group`` also precedes every real exec and is subtracted from
    profiles.  The shim forks with a raw ``clone`` so this is just the child's
    return from ``clone`` under perf and nothing under strace.
    """
    times, text = _traced_run(method, ["/nonexistent/testbed-profile-calibration"])
    table = _table(method, text, [times["shim_pid"]])
    for name in ("execve", "exit_group", "exit"):
        table.pop(name, None)
    return table


def _subtract(table: dict[str, dict], noise: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, row in table.items():
        z = noise.get(name, {"n": 0, "g_ns": 0, "errors": 0})
        n = row["n"] - min(z["n"], row["n"])
        if n > 0:
            out[name] = {
                "n": n,
                "g_ns": max(row["g_ns"] - z["g_ns"], 0),
                "errors": max(row["errors"] - z["errors"], 0),
            }
    return out


def trace(
    program: Sequence[str], method: str = "auto", stdout: Any = None
) -> tuple[dict, dict[str, dict], str]:
    """Run ``program`` natively under a tracer (``stdout``: the program's, default inherited).

    Returns ``(times, table, method)``: the shim's times/status, the per-name
    table ``{name: {n, g_ns, errors}}`` (the shim's own calls and its child's
    pre-exec calls removed) and the method used.
    """
    method = choose_method(method)
    argv = [_resolve(program[0]), *program[1:]]
    noise = shim_calls(method)
    times, text = _traced_run(method, argv, stdout)
    exclude = [times["shim_pid"]]
    table = _subtract(_table(method, text, exclude), noise)
    times["lost_events"] = (
        sum(int(x) for x in re.findall(r"LOST (\d+) events", text)) if method == METHOD_PERF else 0
    )
    times["threads"] = count_threads(text, method, exclude)
    times["shim_calls_removed"] = {k: v["n"] for k, v in noise.items()}
    return times, table, method


def count_threads(text: str, method: str, exclude: Sequence[int] = ()) -> int:
    """How many threads/processes of the program made syscalls (shim excluded)."""
    if method == METHOD_PERF:
        tids = {int(m["tid"]) for m in map(_PERF_HEAD.match, text.splitlines()) if m}
    else:
        tids = {int(m["pid"]) for m in map(_ST_LINE.match, text.splitlines()) if m}
    return len(tids - set(exclude))


def profile_rows(table: dict[str, dict]) -> list[dict]:
    """syscalls.csv rows, most time first: name, nr, n, g_ns, errors."""
    rows = [
        {
            "name": name,
            "nr": NR_BY_NAME.get(name, -1),
            "n": v["n"],
            "g_ns": v["g_ns"],
            "errors": v["errors"],
        }
        for name, v in table.items()
        if v["n"] > 0
    ]
    rows.sort(key=lambda r: (-r["g_ns"], -r["n"], r["name"]))
    return rows


def native_runs(program: Sequence[str], runs: int, stdout: Any = None) -> dict:
    """Time ``runs`` untraced runs of ``program`` (same shim, no tracer), their output
    where the traced run's went (``tar -cf -`` skips its reads into /dev/null).

    Returns ``{"wall_s": median, "walls_s": [...], "user_s": median, "sys_s":
    median, "runs": runs}``; the tracer's overhead makes the traced wall time an
    overestimate of t_nd, these are the native times ``testbed analyze``
    prefers.  Only for commands that can run repeatedly with the same effect.
    """
    argv = [_resolve(program[0]), *program[1:]]
    walls, users, syss = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="testbed-native-") as d:
            times_path = Path(d) / "times.json"
            subprocess.run([sys.executable, "-c", _SHIM, str(times_path), *argv],
                           stdout=stdout, check=False)  # fmt: skip
            if not times_path.exists():
                raise ProfileError(f"native run of {program[0]} failed")
            t = json.loads(times_path.read_text())
        walls.append(t["wall_s"])
        users.append(t["user_s"])
        syss.append(t["sys_s"])

    def med(v: list[float]) -> float:
        v = sorted(v)
        return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2

    return {"wall_s": med(walls), "walls_s": walls, "user_s": med(users), "sys_s": med(syss),
            "runs": runs}  # fmt: skip


def profile(
    program: Sequence[str],
    output=None,
    method: str = "auto",
    extra: dict | None = None,
    native: int = 0,
    stdout: Any = None,
) -> tuple[Path, dict]:
    """Profile ``program``; write and return its run directory and metadata.

    ``extra`` adds keys to run.json (e.g. ``{"workload": "bzip2"}``);
    ``native > 0`` also times that many untraced runs (``run.json["native"]``);
    ``stdout`` is where the traced run's output goes (default: inherited).
    """
    if not program:
        raise ProfileError("no program given")
    if native < 0:
        raise ProfileError("--native-runs must be >= 0")
    out = rundir.create(output, prefix="profile")
    times, table, used = trace(program, method, stdout)
    rows = profile_rows(table)
    g_s = sum(r["g_ns"] for r in rows) / 1e9
    user, sys_t, wall = times["user_s"], times["sys_s"], times["wall_s"]
    cpu = user + sys_t
    delay = times.get("sched_delay_s", -1.0)
    C_wall = max(wall - g_s - max(delay, 0.0), 0.0) if times["threads"] <= 1 else None
    meta = {
        "kind": "profile",
        "command": list(program),
        "exit_status": exit_status(times["status"]),
        "wall_s": wall,
        "user_s": user,
        "sys_s": sys_t,
        "C_s": user,
        "C_definition": "user time of the program and its descendants (wait4 rusage)",
        "C_wall_s": C_wall,
        "g_total_s": g_s,
        "t_nd_s": user + g_s,
        "p_sys": sys_t / cpu if cpu > 0 else 0.0,
        "p_g": g_s / wall if wall > 0 else 0.0,
        "n_total": sum(r["n"] for r in rows),
        "syscall_types": len(rows),
        "method": used,
        "lost_events": times["lost_events"],
        "threads": times["threads"],
        "shim_calls_removed": times["shim_calls_removed"],
        "maxrss_kb": times.get("maxrss_kb"),
        "sched_run_s": times.get("sched_run_s"),
        "sched_delay_s": times.get("sched_delay_s"),
        "host": host_metadata(),
        **(extra or {}),
    }
    if native and times["status"] == 0:
        meta["native"] = native_runs(program, native, stdout)
    rundir.write_meta(out, meta)
    rundir.write_syscalls(out, rows)
    return out, meta
