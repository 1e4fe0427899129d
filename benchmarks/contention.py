"""Issue 13's benchmark: N callers against one delegate, measured vs predicted.

    python3 benchmarks/contention.py OUTDIR

Three sweeps into OUTDIR (sleep service, exponential, S = 4 ms; think
exponential Z = 8 ms; 10 s per cell, single-caller reference cells between
cells), each to about 2x its saturation point N* and beyond:

    W = 1: N = 1, 2, 3, 4, 6, 8, 12
    W = 2: N = 1, 2, 4, 6, 8, 10, 12, 16, 24
    W = 4: N = 1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 48

then ``testbed analyze OUTDIR -o OUTDIR-report`` and prints the report's
verdict lines (target: mean response time within 10 % for N <= 2 N*).
Takes about 15 minutes; resumable (finished cells are skipped).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's packages

from analysis import contention  # noqa: E402
from testbed.jobs.contention import Sweep, run_sweep  # noqa: E402

PLAN = {1: (1, 2, 3, 4, 6, 8, 12), 2: (1, 2, 4, 6, 8, 10, 12, 16, 24),
        4: (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 48)}  # fmt: skip


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    for w, callers in PLAN.items():
        sweep = Sweep(callers=callers, workers=(w,), service_us=4000, think_us=8000,
                      duration_s=10)  # fmt: skip
        run_sweep(sweep, out)
    report = contention.write_report([out], Path(f"{out}-report"))
    cells = contention.load_sweep(out)
    df = contention.predict(cells, contention.fit(cells))
    print(f"report: {report}")
    for line in contention.verdict(df):
        print(line)


if __name__ == "__main__":
    main()
