"""What the forwarded set did not see, per run: the report's table of run.json ``escapes``.

A run records (docs/rundir.md, ``escapes``) the program's io_uring calls, its
file mmaps (writable shared ones apart), and its read/write calls and written
bytes that ``/proc/PID/io`` counted but the relay never saw.  A model fitted on
the forwarded calls does not cover any of it.  Runs written before the key
existed have no row; no run with the key, no section.
"""

from __future__ import annotations

import pandas as pd

from analysis.tables import markdown_table

COLUMNS = ["run", "io_uring_calls", "file_mmaps", "shared_writable_mmaps",
           "read_calls_not_seen", "write_calls_not_seen", "bytes_written_not_seen",
           "vdso_forwarded"]  # fmt: skip


def _get(d, *keys):
    """``d[k0][k1]...``, or None where a level is missing or null."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def row(name: str, meta: dict) -> dict | None:
    """The table row of one run's ``run.json`` (None: it has no ``escapes``)."""
    e = meta.get("escapes")
    if not isinstance(e, dict):
        return None
    uring = e.get("io_uring")
    calls = None
    if isinstance(uring, dict):
        calls = sum(int(v) for v in uring.values() if v is not None)
    return {
        "run": name,
        "io_uring_calls": calls,
        "file_mmaps": _get(e, "mmap_files", "all"),
        "shared_writable_mmaps": _get(e, "mmap_files", "shared_writable"),
        "read_calls_not_seen": _get(e, "unseen", "read_calls"),
        "write_calls_not_seen": _get(e, "unseen", "write_calls"),
        "bytes_written_not_seen": _get(e, "unseen", "write_bytes"),
        "vdso_forwarded": ", ".join(e.get("vdso") or []) or None,
    }


def table(runs) -> pd.DataFrame:
    """One row per run with ``escapes`` (``runs``: anything with ``.path`` and ``.meta``)."""
    rows = [r for run in runs if (r := row(run.path.name, run.meta)) is not None]
    return pd.DataFrame(rows, columns=COLUMNS, dtype=object)  # counts stay ints, – stays None


def markdown(df: pd.DataFrame) -> list[str]:
    """The report section (empty when no run has ``escapes``)."""
    if not len(df):
        return []
    return [
        "## What the forwarded set did not see",
        "",
        "Per run (run.json `escapes`, docs/rundir.md): io_uring calls (`io_uring_setup` + "
        "`io_uring_enter`: the requests in their rings never trap), file-backed `mmap` calls "
        "(the dynamic loader's included; the writable `MAP_SHARED` ones move data with no "
        "call at all), and the read-class/write-class calls and bytes written that the "
        "program's `/proc/PID/io` counted beyond the forwarded ones (clamped at 0; the "
        "kernel's own reads of the executable at `execve` count as reads). – : not counted "
        "for that run (run.json `escapes.why_null` says why). `vdso_forwarded`: forwarded "
        "calls the vDSO serves, which never trap. None of this is in the model.",
        "",
        markdown_table(df),
    ]
