"""``testbed contention``: many callers, one delegate, measured.

For every W in ``--workers`` and N in ``--callers`` (one *cell*), a fresh
delegate with W workers serves every call through one FIFO queue with a
service time of mean S (``--service-us``, ``--service sleep|spin``,
``--service-dist``; see :mod:`testbed.delegate.service`), and N callers start
together.  Each caller is a real traced program: ``testbed run --forward
getppid`` (seccomp backend + relay) around :mod:`testbed.jobs.caller`, which
alternates a think phase of mean Z (``--think-us``, ``--think sleep|spin``)
with one forwarded ``getppid`` for ``--duration`` seconds.

Output (``-o DIR``)::

    DIR/contention.json                  the sweep's parameters, host stamp
    DIR/W<w>-N<n>/cell.json              cell parameters, window, machine CPU use, summary
    DIR/W<w>-N<n>/delegate/              the delegate's record (testbed.delegate.service)
    DIR/W<w>-N<n>/callers/c<i>/          one run directory per caller (+ cycles.bin)

``cycles.bin`` holds the caller's own ``(t0, t1)`` ns pair around each call
(CLOCK_MONOTONIC of this machine) and the think time ``z`` drawn before it.  Cells already present are skipped
(resumable).  :func:`cell_summary` derives X, R (p50, mean, p99), the
delegate's queueing delay and utilisation over the measurement window (the
run minus a warm-up); ``analysis.contention`` fits the model on N = 1 and
predicts the rest.

The format (and its changelog) is :mod:`testbed.core.sweep_record`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from testbed.cluster.netns import Topology
from testbed.core.errors import TestbedError
from testbed.core.hostinfo import host_metadata
from testbed.core.procs import free_port, testbed_env
from testbed.core.sweep_record import (
    CELL_JSON,
    CONTENTION_VERSION,
    CYCLES_BIN,
    SWEEP_JSON,
    cell_name,
    cell_summary,
)
from testbed.jobs.localdelegate import wait_ready

FORWARD = "getppid"
#: Rough resident memory of one caller (relay + program), for the capacity check.
CALLER_MB = 45
#: Processes one caller needs (relay, its launcher, the program).
CALLER_PROCS = 3


@dataclass(frozen=True)
class Sweep:
    callers: tuple[int, ...]
    workers: tuple[int, ...]
    service_us: float
    think_us: float
    service: str = "sleep"
    service_dist: str = "exp"
    think: str = "sleep"
    think_dist: str = "exp"
    duration_s: float = 10.0
    warmup_s: float = 1.0
    seed: int = 1
    nodes: int = 0  # 0: callers are processes on this machine (loopback); K: K netns nodes
    references: bool = True  # a single-caller reference cell before each N > 1 cell

    def __post_init__(self) -> None:
        if not self.callers or min(self.callers) < 1:
            raise TestbedError("callers must be whole numbers >= 1")
        if not self.workers or min(self.workers) < 1:
            raise TestbedError(f"workers must be >= 1 (got {min(self.workers or (0,))})")
        if not 0 < self.service_us <= 10e6:
            raise TestbedError(f"service time must be > 0 and <= 10 s, not {self.service_us} µs")
        if not 0 <= self.think_us <= 60e6:
            raise TestbedError(f"think time must be >= 0 and <= 60 s, not {self.think_us} µs")
        if not 0 <= self.nodes <= 200:
            raise TestbedError(f"nodes must be 0 (this machine) to 200, not {self.nodes}")
        if not self.duration_s > 0 or not 0 <= self.warmup_s < self.duration_s:
            raise TestbedError("need duration > 0 s and 0 <= warm-up < duration")

    def cell_duration_s(self, n: int, reference: bool = False) -> float:
        """The first N = 1 cell of a W runs 3x longer: the model's parameters come from it
        (and from the reference cells)."""
        return 3 * self.duration_s if n == 1 and not reference else self.duration_s

    def cells(self) -> list[tuple[int, int, str]]:
        """``(W, N, name)`` in the order they run.

        With ``references``, a single-caller cell ``W<w>-N1-r<j>`` runs right
        before every N > 1 cell and once after the last, so every prediction
        can be fitted on N = 1 measured minutes apart from it, not an hour
        (the machine's load drifts; MEASURING.md: interleave).
        """
        out = []
        for w in self.workers:
            out.append((w, 1, cell_name(w, 1)))
            j = 0
            for n in self.callers:
                if n == 1:
                    continue
                if self.references:
                    out.append((w, 1, f"{cell_name(w, 1)}-r{j}"))
                    j += 1
                out.append((w, n, cell_name(w, n)))
            if self.references and j:
                out.append((w, 1, f"{cell_name(w, 1)}-r{j}"))
        return out


class CellFailed(TestbedError):
    """A cell that may succeed when run again (its delegate died, not our input)."""


def capacity() -> tuple[int, str]:
    """How many callers this machine can start at once, and why that many."""
    try:
        with open("/proc/meminfo") as f:
            mem = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in f)}
        avail_mb = mem.get("MemAvailable", mem["MemFree"]) // 1024
    except (OSError, KeyError, ValueError):
        avail_mb = 1024
    by_mem = avail_mb // CALLER_MB
    soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    by_proc = (soft // CALLER_PROCS) if soft != resource.RLIM_INFINITY else by_mem
    fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    by_fd = max(1, (fds - 64) // 4)  # the driver holds ~4 fds per caller
    limit = min(by_mem, by_proc, by_fd)
    why = (
        f"MemAvailable {avail_mb} MB at ~{CALLER_MB} MB per caller allows {by_mem}, "
        f"RLIMIT_NPROC allows {by_proc}, RLIMIT_NOFILE allows {by_fd}"
    )
    return limit, why


def check_capacity(sweep: Sweep) -> None:
    limit, why = capacity()
    if max(sweep.callers) > limit:
        raise TestbedError(
            f"{max(sweep.callers)} callers: this machine can start at most {limit} ({why})"
        )


def _cpu_sample() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def _sleep_until(t_ns: int) -> None:
    left = t_ns - time.monotonic_ns()
    if left > 0:
        time.sleep(left / 1e9)


def _start_delegate(sweep: Sweep, w: int, cell: Path, topo=None) -> tuple[subprocess.Popen, str]:
    """The cell's delegate: on loopback, or in the topology's ``dlg`` node."""
    host = topo.addr("dlg") if topo is not None else "127.0.0.1"
    ep = f"tcp://{host}:{free_port()}"
    cmd = [sys.executable, "-m", "testbed", "delegate", "--quiet", "--listen", ep,
           "--workers", str(w), "--service-us", repr(sweep.service_us),
           "--service", sweep.service, "--service-dist", sweep.service_dist,
           "--seed", str(sweep.seed), "--record", str(cell / "delegate")]  # fmt: skip
    if topo is not None:
        proc = topo.popen("dlg", cmd, env=testbed_env(), stdin=subprocess.DEVNULL)
        probe = [sys.executable, "-c", "import sys; from testbed.jobs.localdelegate import ping; "
                 "ping(sys.argv[1], 15.0)", ep]  # fmt: skip
        res = topo.run("c0", probe, env=testbed_env(), timeout=30, capture_output=True)
        if res.returncode != 0:
            _stop(proc)
            raise TestbedError(f"delegate at {ep} did not answer from node c0")
        return proc, ep
    proc = subprocess.Popen(cmd, env=testbed_env(), stdin=subprocess.DEVNULL)
    try:
        wait_ready(proc, ep)
    except TestbedError:
        _stop(proc)
        raise
    return proc, ep


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    """Stop ``proc``; return how it ended if not by our signal ("" if it did)."""
    if proc.poll() is not None:
        return f"it had already exited with status {proc.returncode}"
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "it did not stop within 30 s and was killed"
    return "" if proc.returncode == 0 else f"it exited with status {proc.returncode}"


#: Callers starting at once (each start imports the relay: CPU-heavy on a small machine).
START_BATCH = 2


def _err_file(where: Path, i: int) -> Path:
    return where / f"c{i:03d}.err"


def _last_line(path: Path) -> str:
    try:
        lines = path.read_bytes().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def start_timeout_s(n: int) -> float:
    """How long N callers may take to start (each is a relay + a traced program)."""
    return 20.0 + 2.0 * n


def _launch_all(cmds: list[list[str]], where: Path, timeout_s: float) -> list[subprocess.Popen]:
    """Start the callers, at most START_BATCH starting at once; return when all are ready.

    A caller is ready when it wrote its ``.ready`` file (its relay runs and it
    is traced).  Fails with one clear line if the machine cannot start them all.
    """
    n = len(cmds)
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            ready = len(list(where.glob("*.ready")))
            if ready == n:
                return procs
            while len(procs) < n and len(procs) - ready < START_BATCH:
                # stderr to a file, never a pipe: a caller outliving its relay would
                # hold a pipe open and block whoever reads it
                with open(_err_file(where, len(procs)), "wb") as err_f:
                    procs.append(subprocess.Popen(cmds[len(procs)], env=testbed_env(),
                                                  stdin=subprocess.DEVNULL, stderr=err_f))  # fmt: skip
            dead = [i for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                p = procs[dead[0]]
                err = _last_line(_err_file(where, dead[0]))
                raise TestbedError(
                    f"this machine could not start {n} callers: caller {dead[0]} exited with "
                    f"status {p.returncode}" + (f" ({err})" if err else "")
                )
            if time.monotonic() > deadline:
                raise TestbedError(
                    f"only {ready} of {n} callers started within {timeout_s:.0f} s; "
                    f"this machine cannot start {n} callers at once"
                )
            time.sleep(0.02)
    except BaseException:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        raise


def run_cell(sweep: Sweep, w: int, n: int, cell: Path, topo=None) -> dict[str, Any]:
    """Run one cell (W workers, N callers); write and return its cell.json.

    With ``topo`` (a :class:`testbed.cluster.netns.Topology` with nodes ``c0..`` and
    ``dlg``) the delegate runs in ``dlg`` and caller i in node ``c<i mod K>``.
    """
    if cell.exists():
        shutil.rmtree(cell)
    (cell / "callers").mkdir(parents=True)
    caller_py = str(Path(__file__).with_name("caller.py"))
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.monotonic()
    dele, ep = _start_delegate(sweep, w, cell, topo)
    procs: list[subprocess.Popen] = []
    go = cell / "callers" / "go"
    try:
        cmds = []
        for i in range(n):
            out = cell / "callers" / f"c{i:03d}.cycles"
            cmds.append([sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", ep,
                   "--forward", FORWARD, "-o", str(cell / "callers" / f"c{i:03d}"), "--",
                   sys.executable, "-S", "-I", caller_py, str(go), repr(sweep.think_us),
                   sweep.think, sweep.think_dist, str(sweep.seed * 1000 + i), str(out)])  # fmt: skip
            if topo is not None:
                cmds[-1] = topo.exec_argv(f"c{i % sweep.nodes}", cmds[-1])
        procs = _launch_all(cmds, cell / "callers", start_timeout_s(n))
        t0 = time.monotonic_ns() + 300_000_000
        t1 = t0 + int(sweep.cell_duration_s(n, cell.name != cell_name(w, n)) * 1e9)
        tmp = go.with_suffix(".tmp")
        tmp.write_text(f"{t0} {t1}\n")
        tmp.replace(go)  # atomic: a caller reads both numbers or none
        tw = t0 + int(sweep.warmup_s * 1e9)
        _sleep_until(tw)
        cpu_a = _cpu_sample()
        _sleep_until(t1)
        cpu_b = _cpu_sample()
        errors = []
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=max(30.0, 0.5 * n))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.returncode != 0:
                errors.append((i, p.returncode, _last_line(_err_file(cell / "callers", i))))
    finally:
        if not go.exists():  # failed before the start: release the waiting callers
            go.write_text("0 0\n")
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        how = _stop(dele)
    if not (cell / "delegate" / "delegate.json").exists():
        raise CellFailed(f"{cell.name}: the delegate wrote no record ({how or 'no reason given'})")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    late = [e for e in errors if e[1] == 3]
    if late:
        raise TestbedError(
            f"{len(late)} of {n} callers missed the common start; this machine cannot "
            f"start {n} callers at once ({late[0][2]})"
        )
    if errors:
        i, rc, text = errors[0]
        raise TestbedError(f"caller {i} of {cell.name} failed with status {rc}: {text}")
    for f in (*(cell / "callers").glob("*.ready"), *(cell / "callers").glob("*.err")):
        if f.suffix == ".ready" or f.stat().st_size == 0:
            f.unlink()
    for i in range(n):
        src = cell / "callers" / f"c{i:03d}.cycles"
        src.replace(cell / "callers" / f"c{i:03d}" / CYCLES_BIN)
    busy = cpu_b[0] - cpu_a[0]
    total = max(cpu_b[1] - cpu_a[1], 1)
    meta = {
        "version": CONTENTION_VERSION,
        "kind": "contention-cell",
        "W": w,
        "N": n,
        "reference": cell.name != cell_name(w, n),
        **{k: v for k, v in asdict(sweep).items() if k not in ("callers", "workers")},
        "start_ns": t0,
        "end_ns": t1,
        "window_ns": [tw, t1],
        "machine_cpu_busy": busy / total,  # the whole machine, other users included
        "own_cpu_s": own_cpu,  # delegate + relays + callers, start to stop of the cell
        "cell_wall_s": time.monotonic() - wall0,
        "cpus": os.cpu_count(),
        "placement": (
            f"{sweep.nodes} netns nodes, delegate in its own"
            if topo is not None
            else "processes on this machine, loopback"
        ),  # fmt: skip
        "host": host_metadata(),
    }
    meta["summary"] = cell_summary(cell, meta)
    (cell / CELL_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def run_sweep(sweep: Sweep, outdir: Path, out: TextIO = sys.stderr) -> list[dict[str, Any]]:
    """Run every cell not already done; progress on ``out``; return the cells' metadata."""
    check_capacity(sweep)
    outdir.mkdir(parents=True, exist_ok=True)
    sj = outdir / SWEEP_JSON
    params = {"version": CONTENTION_VERSION, **asdict(sweep)}
    if sj.exists():
        old = json.loads(sj.read_text())
        same = {k: old.get(k) for k in params if k not in ("callers", "workers")}
        if same != {k: v for k, v in params.items() if k not in ("callers", "workers")}:
            raise TestbedError(f"{outdir} holds a sweep with other parameters; use another -o")
    sj.write_text(json.dumps(params | {"host": host_metadata()}, indent=1) + "\n")
    topo = None
    if sweep.nodes:
        topo = Topology([f"c{i}" for i in range(sweep.nodes)] + ["dlg"]).up()
    try:
        return _run_cells(sweep, outdir, out, topo)
    finally:
        if topo is not None:
            topo.close()


def _run_cells(sweep: Sweep, outdir: Path, out: TextIO, topo) -> list[dict[str, Any]]:
    cells = sweep.cells()
    metas = []
    for k, (w, n, name) in enumerate(cells, 1):
        cell = outdir / name
        if (cell / CELL_JSON).exists():
            meta = json.loads((cell / CELL_JSON).read_text())
            print(f"contention: [{k}/{len(cells)}] {cell.name}: done before, skipped", file=out)
        else:
            print(f"contention: [{k}/{len(cells)}] {cell.name}: running "
                  f"{sweep.cell_duration_s(n, name != cell_name(w, n)):g} s ...", file=out,
                  flush=True)  # fmt: skip
            try:
                meta = run_cell(sweep, w, n, cell, topo)
            except CellFailed as exc:
                print(f"contention: [{k}/{len(cells)}] {exc}; running it again", file=out)
                meta = run_cell(sweep, w, n, cell, topo)
        s = meta["summary"]
        dd = s.get("delegate", {})
        print(f"contention: [{k}/{len(cells)}] {cell.name}: X {s.get('X_per_s', 0):.0f}/s, "
              f"R mean {s.get('R_mean_us', 0) / 1e3:.2f} ms p99 {s.get('R_p99_us', 0) / 1e3:.2f} ms, "
              f"wait {dd.get('wait_mean_us', 0) / 1e3:.2f} ms, "
              f"utilisation {dd.get('utilisation', 0):.2f}, machine CPU {meta['machine_cpu_busy']:.2f}",
              file=out, flush=True)  # fmt: skip
        metas.append(meta)
    return metas


def main_contention(sweep: Sweep, output: str | os.PathLike) -> int:
    """``testbed contention``: run ``sweep`` into ``output``, say where the results are."""
    outdir = Path(output)
    run_sweep(sweep, outdir)
    print(f"contention: results in {outdir} (analyse with: testbed analyze {outdir})")
    return 0
