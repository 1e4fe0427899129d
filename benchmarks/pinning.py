"""Issue 8 item 3: does pinning remove the interference term? (real workloads)

    python3 benchmarks/pinning.py OUTDIR

Runs ``playbooks/plans/workloads.yml`` (gzip, bzip2, xz, tar, sqlite3 under
min-freq:20 %, max-freq:20 % and read,write, 3 repetitions, natives
interleaved, a delegate on loopback; arm A: ``pin: false``) and
``workloads-pinned.yml`` (the same with ``pin: true``, arm B: program on the
first CPU, relay and delegate on the second) in the order A B B A, so a
linear drift of the machine hits both arms alike, into OUTDIR/{A1,B1,B2,A2}.
Prints /proc/loadavg before and after each block, then analyses each arm
(``testbed analyze`` of A1+A2 and of B1+B2 into OUTDIR/report-{A,B}), and each
block alone (OUTDIR/report-A1 ...: the machine's load drifts between blocks),
and prints one line for each: the best cross-validated predictor's mean and
max |error| and bias (with and without the paired natives), the relay's and
delegate's CPU share, the error at a relay share below and above 20 %, the
natives' wall/CPU (1 = nobody else took the CPU) and spread.  6 min 17 s on
the project's 2 vCPUs when quiet, 19 min at a load average of 7-12.
Resumable (finished runs are skipped).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's packages

from analysis.report import write_report  # noqa: E402

ORDER = (("A1", "workloads"), ("B1", "workloads-pinned"), ("B2", "workloads-pinned"),
         ("A2", "workloads"))  # fmt: skip


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def run_blocks(out: Path) -> None:
    for block, plan in ORDER:
        before, t0 = loadavg(), time.monotonic()
        res = subprocess.run(
            [sys.executable, "-m", "testbed", "experiment", str(ROOT / "playbooks/plans" /
             f"{plan}.yml"), "-o", str(out / block), "--host-label", "here"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        last = (res.stdout.strip().splitlines() or ["?"])[-1]
        print(f"{block} {plan}: {time.monotonic() - t0:.0f} s, loadavg before {before}, "
              f"after {loadavg()}: {last}", flush=True)  # fmt: skip
        if res.returncode:
            sys.exit(f"block {block} failed (exit {res.returncode})")


def _best(d: pd.DataFrame) -> str:
    b = d.sort_values("mean_abs_error").iloc[0]
    return (f"`{b.predictor}` {b.mean_abs_error:.1%} (max {b.max_abs_error:.1%}, "
            f"bias {b.mean_error:+.1%})")  # fmt: skip


def line(name: str, report: Path) -> str:
    """One line: best predictors (real workloads, cross-validation by policy) and error terms."""
    t = report / "tables"
    summ = pd.read_csv(t / "model_accuracy_summary.csv")
    acc = pd.read_csv(t / "model_accuracy.csv")
    w = pd.read_csv(t / "error_terms.csv").set_index("class").loc["workloads"]
    d = summ[(summ["scheme"] == "policy") & (summ["class"] == "workloads")]
    return (f"{name}: {int(d['runs'].max())} runs; mean |error| best {_best(d)}, best from the "
            f"median natives {_best(d[~d['predictor'].str.contains('@')])}; relay CPU share "
            f"{acc['relay_cpu_share'].mean():.1%}, delegate {acc['delegate_cpu_share'].mean():.1%}; "
            f"|error| at relay share <20 % {w['|error| at relay share < 20 %']:.1%}, >=20 % "
            f"{w['|error| at relay share ≥ 20 %']:.1%}; natives wall/CPU "
            f"{w['contention: native wall/CPU']:.2f}, spread {w['noise: native spread (max-min)/median']:.0%}")  # fmt: skip


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1]).absolute()
    run_blocks(out)
    arms = [("A unpinned", ("A1", "A2")), ("B pinned", ("B1", "B2"))]
    for name, blocks in arms + [(b, (b,)) for b, _ in ORDER]:
        report = out / f"report-{name.split()[0]}"
        with contextlib.redirect_stdout(io.StringIO()):
            write_report([out / b for b in blocks], report)
        print(line(name, report), flush=True)


if __name__ == "__main__":
    main()
