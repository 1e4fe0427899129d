"""Forward a million 1-byte writes and report time and the relay's peak memory.

    python3 benchmarks/million_writes.py [N]

Starts a delegate on loopback, runs ``dd bs=1 count=N`` with ``write``
forwarded, then checks the run directory holds N+ records and prints the
relay's peak RSS (from wait4 rusage of the ``testbed run`` process) next to
its RSS for a run 10x smaller, so "bounded memory" is a measured ratio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed.core import rundir
from testbed.jobs.localdelegate import LocalDelegate


def forward_writes(endpoint: str, n: int, out: Path) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "testbed", "run", "--quiet", "--delegate", endpoint,
           "--forward", "write", "-o", str(out), "--",
           "dd", "if=/dev/zero", "of=/dev/null", "bs=1", f"count={n}", "status=none"]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)
    _pid, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"testbed run failed with status {proc.returncode}")
    return time.monotonic() - t0, rusage.ru_maxrss  # KiB


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory(prefix="million-") as t, LocalDelegate() as d:
        small_s, small_rss = forward_writes(d.endpoint, n // 10, Path(t) / "small")
        print(f"{n // 10} writes: {small_s:.1f} s, relay peak RSS {small_rss / 1024:.1f} MiB",
              flush=True)  # fmt: skip
        big_s, big_rss = forward_writes(d.endpoint, n, Path(t) / "big")
        run = rundir.load(Path(t) / "big")
        count = run.meta["calls"]["count"]
        size = (Path(t) / "big" / rundir.CALLS_BIN).stat().st_size
        print(f"{n} writes: {big_s:.1f} s, relay peak RSS {big_rss / 1024:.1f} MiB, "
              f"{count} records ({size / 2**20:.1f} MiB calls.bin), "
              f"{run.meta['calls']['faults']} faults")  # fmt: skip
        print(f"peak RSS ratio (10x the calls): {big_rss / small_rss:.2f}")
        assert count >= n, "records missing"


if __name__ == "__main__":
    main()
