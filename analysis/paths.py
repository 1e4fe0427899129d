"""Where things are: the package's data and the run directories named on a command line.

Light on purpose (no numpy/pandas): the CLI validates paths with it before
importing the analysis stack.
"""

from __future__ import annotations

from pathlib import Path

from testbed.core import rundir

DATA = Path(__file__).resolve().parent / "data"
TABLE1_CSV = DATA / "table1.csv"
PROFILES_DIR = DATA / "profiles"


def expand_rundirs(paths) -> list[Path]:
    """Run directories named by ``paths``: a directory without ``run.json`` stands
    for every run directory beneath it (e.g. an experiment's results tree)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / rundir.RUN_JSON).exists():
            found = sorted(q.parent for q in p.rglob(rundir.RUN_JSON))
            if found:
                out.extend(found)
                continue
        out.append(p)
    return out
