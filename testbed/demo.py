"""``testbed demo``: the main job on one machine, with an embedded default.

Starts a delegate on loopback, generates a compressible input file, compresses
it with gzip natively and with ``read,write`` forwarded (three times each),
checks that the outputs are byte-identical, and prints the measured ``f_c``,
the slowdown ``t_d / t_nd`` and what the extended model predicts from ``f_c``
(at gamma = 1: ``t_d = t_nd + 2 f_c sum n(s)``, with the mean ``f_c``: a total
is n times the mean).  Relay and profile run in this process
(:func:`testbed.run.run`, :func:`testbed.profile.profile`).  Needs no root.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from testbed import rundir
from testbed.bench import LocalDelegate
from testbed.errors import TestbedError
from testbed.experiment import generate_input
from testbed.profile import profile
from testbed.run import run

REPEATS = 3


def _native(program: list[str], out_file: Path) -> float:
    with open(out_file, "wb") as f:
        t0 = time.perf_counter()
        res = subprocess.run(program, stdout=f)
        wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise TestbedError(f"native run of {program[0]} failed with status {res.returncode}")
    return wall


def _forwarded(program: list[str], endpoint: str, run_dir: Path, out_file: Path) -> rundir.Run:
    # In process: the delegate is another process and the demo does nothing
    # else while the relay serves, so run.json's relay CPU time stays the relay's.
    with open(out_file, "wb") as f:
        try:
            res = run(program, delegate=endpoint, forward="read,write", output=run_dir, stdout=f)
        except TestbedError as exc:
            raise TestbedError(f"forwarded run failed: {exc}") from None
    if res.exit_status != 0:
        raise TestbedError(f"forwarded run of {program[0]} exited {res.exit_status}")
    return rundir.load(run_dir)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main_demo(args) -> int:
    compressor = shutil.which("gzip")
    if compressor is None:
        raise TestbedError("the demo needs gzip (apt-get install gzip)")
    base = rundir.create(args.output, prefix="demo")
    src = base / "input.txt"
    print(f"demo: generating {args.size_mb} MB of input in {src}", file=sys.stderr)
    generate_input(src, args.size_mb, seed=2026)
    program = [compressor, "-6", "-c", str(src)]

    native_walls, runs = [], []
    with LocalDelegate() as delegate:
        print(f"demo: delegate on {delegate.endpoint}; gzip natively and with read,write "
              f"forwarded, {REPEATS} times each", file=sys.stderr)  # fmt: skip
        for i in range(REPEATS):
            native_walls.append(_native(program, base / "native.gz"))
            runs.append(_forwarded(program, delegate.endpoint, base / f"forwarded-{i + 1}",
                                   base / f"forwarded-{i + 1}.gz"))  # fmt: skip
            print(f"demo: [{i + 1}/{REPEATS}] native {native_walls[-1] * 1e3:.1f} ms, "
                  f"forwarded {runs[-1].meta['wall_s'] * 1e3:.1f} ms", file=sys.stderr)  # fmt: skip

    # a native profile of the same command, so `testbed analyze` of this folder
    # has n(s), g(s), C and an untraced t_nd to predict the forwarded runs from
    try:
        _path, prof = profile(program, base / "profile", native=REPEATS, stdout=subprocess.DEVNULL)
    except TestbedError as exc:
        raise TestbedError(f"native profile failed: {exc}") from None
    if prof["exit_status"] != 0:
        raise TestbedError(f"native profile of {program[0]} exited {prof['exit_status']}")

    want = _digest(base / "native.gz")
    for i in range(REPEATS):
        if _digest(base / f"forwarded-{i + 1}.gz") != want:
            raise TestbedError(f"forwarded output {i + 1} differs from the native output")

    run = runs[-1]
    counts = {row["name"]: int(row["n"]) for row in run.syscalls}
    n_fwd = sum(counts.values())
    calls = np.concatenate([np.asarray(r.calls()) for r in runs])
    f_c = rundir.fc_estimates(calls)  # the fault-free calls, as analysis fits them
    rtt = float(np.nanmedian(rundir.derived(calls)["rtt"])) / 1e3
    t_nd = statistics.median(native_walls)
    t_d = statistics.median(r.meta["wall_s"] for r in runs)
    # a total of n calls is n times the mean (docs/analysis.md), not the median
    predicted = t_nd + 2 * f_c["mean"] * 1e-6 * n_fwd
    faults = sum(r.meta["calls"]["faults"] for r in runs)

    print("")
    print(f"workload        gzip -6 of {args.size_mb} MB (output identical to native: yes)")
    print(f"forwarded       {n_fwd} calls per run ("
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f"), {faults} faults")  # fmt: skip
    print(f"rtt             p50 {rtt:.1f} µs (relay -> delegate -> relay over ZeroMQ)")
    print(f"f_c             {f_c['median']:.1f} µs median, {f_c['mean']:.1f} µs mean  "
          "(per-call overhead / 2, fault-free calls)")  # fmt: skip
    print(f"t_nd (native)   {t_nd * 1e3:.1f} ms   median of {REPEATS}")
    print(f"t_d (forwarded) {t_d * 1e3:.1f} ms   median of {REPEATS}")
    print(f"slowdown        {t_d / t_nd:.2f}x   (model at gamma=1 predicts t_d = "
          f"{predicted * 1e3:.1f} ms, {100 * (predicted - t_d) / t_d:+.0f}%)")  # fmt: skip
    print(f"run directories {base}/forwarded-*, native profile {base}/profile")
    print(f"next            testbed analyze {base} -o {base}/report")
    return 0
