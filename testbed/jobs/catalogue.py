"""Profiling the catalogue's workloads (``testbed.jobs.workloads``), as the shipped profiles were.

The workloads are those ``testbed experiment`` runs (one catalogue, one input
generator: ``testbed/jobs/workloads.py``), so a shipped profile in
``analysis/data/profiles`` is the profile of the experiment's workload of the
same name.  ``scale`` multiplies each workload's default input size.

Re-take the shipped profiles (perf: g(s) closer to native than strace's;
``--fifo``: SCHED_FIFO, so other load on the machine does not end up in g(s))::

    testbed catalogue analysis/data/profiles --method perf --fifo 50
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from testbed.core.errors import TestbedError
from testbed.jobs.workloads import CATALOGUE, expand
from testbed.jobs.workloads import prepare as prepare_inputs

#: The workloads of the shipped profiles (the catalogue's programs with a
#: syscall mix of their own: xz, cat, sha256sum, wc, tar and sqlite3 are read/write loops
#: over one file like gzip).
PROFILED = ("bzip2", "gzip", "tar-tree", "sqlite3-tx", "python", "gcc")
#: The input sizes of the shipped profiles: ``scale`` times the catalogue default.
SHIPPED_SCALE = 1.0
SHIPPED_SEED = 1


def available(names=None) -> list[str]:
    """The workloads whose program is installed (all of :data:`PROFILED` by default)."""
    out = []
    for name in names or PROFILED:
        if name not in CATALOGUE:
            raise TestbedError(f"unknown workload {name!r} (one of {', '.join(CATALOGUE)})")
        if shutil.which(CATALOGUE[name].program):
            out.append(name)
    return out


def prepare(name: str, scratch: Path, scale: float = 1.0, seed: int = SHIPPED_SEED) -> list[str]:
    """Write the inputs of workload ``name`` beneath ``scratch``; return its argv."""
    if name not in CATALOGUE:
        raise TestbedError(f"unknown workload {name!r} (one of {', '.join(CATALOGUE)})")
    spec = CATALOGUE[name]
    d = Path(scratch) / name
    prepare_inputs(d, spec.size_mb * scale, seed, name)
    return expand(spec.argv, d)


def profile_all(
    outdir: Path, scratch: Path, names=None, scale: float = 1.0, method: str = "auto"
) -> list[Path]:
    """Profile each workload into ``outdir/<name>`` (stdout to a file, as in an
    experiment); return the run directories."""
    from testbed.jobs.profile import profile  # lazy: 20 ms; the CLI reads this module's defaults

    paths = []
    for name in available(names):
        argv = prepare(name, scratch, scale)
        extra = {"workload": name, "size_mb": CATALOGUE[name].size_mb * scale,
                 "seed": SHIPPED_SEED, "made_by": "testbed.jobs.catalogue.profile_all",
                 "loadavg_1m": round(os.getloadavg()[0], 2), "scheduler": scheduler()}  # fmt: skip
        with open(Path(scratch) / f"{name}.out", "wb") as out:
            path, meta = profile(argv, Path(outdir) / name, method, extra=extra, stdout=out)
        if meta["exit_status"] != 0:
            raise TestbedError(f"workload {name} exited with status {meta['exit_status']}")
        paths.append(path)
    return paths


def scheduler() -> str:
    """This process's scheduling policy (the profiled programs inherit it)."""
    policy = os.sched_getscheduler(0)
    name = {os.SCHED_OTHER: "SCHED_OTHER", os.SCHED_FIFO: "SCHED_FIFO", os.SCHED_RR: "SCHED_RR",
            os.SCHED_BATCH: "SCHED_BATCH", os.SCHED_IDLE: "SCHED_IDLE"}.get(policy, str(policy))  # fmt: skip
    prio = os.sched_getparam(0).sched_priority
    return f"{name} {prio}" if prio else name


def profile_catalogue(
    outdir: str | os.PathLike,
    names: list[str] | None = None,
    *,
    scale: float = SHIPPED_SCALE,
    method: str = "perf",
    fifo: int | None = None,
) -> list[Path]:
    """``testbed catalogue``: (re-)take the profiles of ``names`` (default :data:`PROFILED`).

    Each installed workload's profile replaces ``outdir/<name>``; the inputs
    are generated in a temporary directory.  ``fifo``: run under SCHED_FIFO at
    this priority (root).  Returns the run directories.
    """
    if fifo is not None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(fifo))
        except (OSError, OverflowError) as exc:
            raise TestbedError(f"--fifo {fifo}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="testbed-workloads-") as scratch:
        for name in available(names or None):
            target = Path(outdir) / name
            if target.exists():
                shutil.rmtree(target)  # rundir.create refuses a non-empty folder
        return profile_all(Path(outdir), Path(scratch), names or None, scale, method)
