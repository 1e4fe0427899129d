"""``testbed demo``: the main job on one machine, with an embedded default.

Starts a delegate on loopback, generates a compressible input file, compresses
it with gzip natively and with ``read,write`` forwarded (three times each),
checks that the outputs are byte-identical, and prints the measured ``f_c``,
the slowdown ``t_d / t_nd`` and what the extended model predicts for the last
forwarded run from the earlier ones (at gamma = 1: ``t_d = t_nd + 2 f_c n``,
``f_c`` the mean over the earlier runs' calls only, a total being n times the
mean; ``n`` the last run's forwarded calls): a prediction of a run the fit did
not see.  Relay and profile run in this process
(:func:`testbed.compute.run.run`, :func:`testbed.jobs.profile.profile`).  Needs no root.
"""

from __future__ import annotations

import hashlib
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from testbed.compute.run import run
from testbed.compute.spec import RunSpec
from testbed.core import rundir
from testbed.core.errors import TestbedError
from testbed.jobs.localdelegate import LocalDelegate
from testbed.jobs.profile import profile
from testbed.jobs.workloads import generate_input

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
            spec = RunSpec(program, delegate=endpoint, forward="read,write", output=run_dir)
            res = run(spec, stdout=f)
        except TestbedError as exc:
            raise TestbedError(f"forwarded run failed: {exc}") from None
    if res.exit_status != 0:
        raise TestbedError(f"forwarded run of {program[0]} exited {res.exit_status}")
    return rundir.load(run_dir)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _say_nothing(_text: str) -> None:
    pass


def demo(
    output: str | Path | None = None, size_mb: int = 4, say: Callable[[str], None] = _say_nothing
) -> dict[str, Any]:
    """Run the demo into ``output`` (default ``runs/demo-TIME``); return its numbers.

    ``say`` gets one progress line at a time.  Keys: ``base``, ``size_mb``,
    ``counts`` (forwarded calls per run by name), ``faults``, ``rtt_p50_us``,
    ``f_c`` (:func:`testbed.core.rundir.fc_estimates`), ``t_nd_s``, ``t_d_s``, and
    :func:`holdout`'s ``predicted_t_d_s`` (the last run, predicted from the earlier
    ones), ``holdout_f_c_us``, ``holdout_measured_t_d_s``.
    """
    compressor = shutil.which("gzip")
    if compressor is None:
        raise TestbedError("the demo needs gzip (apt-get install gzip)")
    base = rundir.create(output, prefix="demo")
    src = base / "input.txt"
    say(f"demo: generating {size_mb} MB of input in {src}")
    generate_input(src, size_mb, seed=2026)
    program = [compressor, "-6", "-c", str(src)]

    native_walls, runs = [], []
    with LocalDelegate() as delegate:
        say(f"demo: delegate on {delegate.endpoint}; gzip natively and with read,write "
            f"forwarded, {REPEATS} times each")  # fmt: skip
        for i in range(REPEATS):
            native_walls.append(_native(program, base / "native.gz"))
            runs.append(_forwarded(program, delegate.endpoint, base / f"forwarded-{i + 1}",
                                   base / f"forwarded-{i + 1}.gz"))  # fmt: skip
            say(f"demo: [{i + 1}/{REPEATS}] native {native_walls[-1] * 1e3:.1f} ms, "
                f"forwarded {runs[-1].meta['wall_s'] * 1e3:.1f} ms")  # fmt: skip

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

    counts = {row["name"]: int(row["n"]) for row in runs[-1].syscalls}
    calls = np.concatenate([np.asarray(r.calls()) for r in runs])
    f_c = rundir.fc_estimates(calls)  # the fault-free calls, as analysis fits them
    t_nd = statistics.median(native_walls)
    earlier = np.concatenate([np.asarray(r.calls()) for r in runs[:-1]])
    return {
        "base": base,
        "size_mb": size_mb,
        "counts": counts,
        "faults": sum(r.meta["calls"]["faults"] for r in runs),
        "rtt_p50_us": float(np.nanmedian(rundir.derived(calls)["rtt"])) / 1e3,
        "f_c": f_c,
        "t_nd_s": t_nd,
        "t_d_s": statistics.median(r.meta["wall_s"] for r in runs),
        **holdout(t_nd, earlier, runs[-1]),
    }


def holdout(t_nd: float, earlier_calls: np.ndarray, last: rundir.Run) -> dict[str, Any]:
    """The model's prediction of the ``last`` run from the *earlier* runs' calls only.

    ``t_d = t_nd + 2 f_c n``: ``f_c`` the mean per-call cost of ``earlier_calls``
    (a total of n calls is n times the mean, docs/analysis.md), ``n`` the last
    run's forwarded calls; nothing of the last run but its call count is used.
    """
    f_c_us = rundir.fc_estimates(earlier_calls)["mean"]
    n = int(last.meta["calls"]["count"])
    return {
        "holdout_f_c_us": f_c_us,
        "holdout_measured_t_d_s": float(last.meta["wall_s"]),
        "predicted_t_d_s": t_nd + 2 * f_c_us * 1e-6 * n,
    }


def report_lines(r: dict[str, Any]) -> list[str]:
    """The demo's result as the lines ``testbed demo`` prints."""
    base, f_c, t_d, predicted = r["base"], r["f_c"], r["t_d_s"], r["predicted_t_d_s"]
    last = r["holdout_measured_t_d_s"]
    calls = ", ".join(f"{k} {v}" for k, v in sorted(r["counts"].items()))
    return [
        "",
        f"workload        gzip -6 of {r['size_mb']} MB (output identical to native: yes)",
        f"forwarded       {sum(r['counts'].values())} calls per run ({calls}), "
        f"{r['faults']} faults",
        f"rtt             p50 {r['rtt_p50_us']:.1f} µs (relay -> delegate -> relay over ZeroMQ)",
        f"f_c             {f_c['median']:.1f} µs median, {f_c['mean']:.1f} µs mean  "
        "(per-call overhead / 2, fault-free calls)",
        f"t_nd (native)   {r['t_nd_s'] * 1e3:.1f} ms   median of {REPEATS}",
        f"t_d (forwarded) {t_d * 1e3:.1f} ms   median of {REPEATS}",
        f"slowdown        {t_d / r['t_nd_s']:.2f}x   (median of {REPEATS} forwarded runs)",
        f"model           run {REPEATS} predicted from runs 1-{REPEATS - 1} (gamma=1, f_c "
        f"{r['holdout_f_c_us']:.1f} µs mean of their calls): t_d = {predicted * 1e3:.1f} ms, "
        f"measured {last * 1e3:.1f} ms, {100 * (predicted - last) / last:+.0f}%",
        f"run directories {base}/forwarded-*, native profile {base}/profile",
        f"next            testbed analyze {base} -o {base}/report",
    ]
