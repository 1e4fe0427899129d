"""Where every number of a report comes from: host, mechanism, transport, policy as resolved.

A run is traced by the columns of :func:`columns`: the *host* it was measured
on (the experiment's host label, else run.json's host name), the
*mechanism* (``backend/transport/where``), the *transport* (ZMTP or libzmq, CURVE or
not; ``kthread`` for the module's kernel thread), the *policy* as written in
the plan and the syscall set it *resolved to* (run.json ``forwarded``; once
for the whole experiment, or per host: :func:`resolved_how`), and the
experiment *cell* (``experiment.json`` ``run_id``).

Resolved sets get short ids (``S1``, ``S2`` …, :func:`set_ids`) so that a
table can say which set a row forwarded without spelling out nine syscall
names; :func:`resolved_sets` is the table of those ids.  :func:`pool_groups`
splits rows that a comparison would pool (one workload and policy, several
mechanisms or hosts) by their resolved set, and says in one line per group
which ones it refuses to compare: ``max-freq:20%`` resolved from each node's
own profile can be 9 syscall types on one node and 7 on another, and those
runs are two experiments, not one.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

#: The provenance columns every per-run table carries, in this order.
COLUMNS = ("host", "mechanism", "transport", "policy", "set", "cell")


def forwarded_set(r) -> tuple[str, ...]:
    """The syscall set the run actually forwarded (sorted names, as run.json records it)."""
    return tuple(sorted(str(x) for x in (r.meta.get("forwarded") or [])))


def transport(meta: dict) -> str:
    """``zmtp``, ``libzmq``, ``libzmq+curve``, ``kthread`` (no wire), or ``–`` when unrecorded."""
    if meta.get("mode") == "kthread":
        return "kthread"
    t = str(meta.get("transport") or "").strip()
    if not t:
        return "–"
    return f"{t}+curve" if meta.get("curve") else t


def cell(r) -> str:
    """The experiment cell (``run_id``), else the run directory's name."""
    return str((r.cell or {}).get("run_id") or r.path.name)


def set_ids(runs: Iterable) -> dict[tuple[str, ...], str]:
    """``{resolved set: "S1"}``, numbered by size then names (stable for one input)."""
    sets = sorted({forwarded_set(r) for r in runs}, key=lambda s: (len(s), s))
    return {s: f"S{i}" for i, s in enumerate(sets, start=1)}


def columns(r, ids: dict[tuple[str, ...], str]) -> dict[str, str]:
    """The provenance columns of one run (``COLUMNS``)."""
    return {
        "host": r.host or "–",
        "mechanism": r.mechanism,
        "transport": transport(r.meta),
        "policy": r.group,
        "set": ids.get(forwarded_set(r), "?"),
        "cell": cell(r),
    }


def resolved_how(r) -> str:
    """How the run's policy became its set (``experiment.json`` ``resolution``):
    ``once on HOST`` (the same set for every node), ``per host``, or ``–`` (a list)."""
    res = (r.cell or {}).get("resolution")
    if not isinstance(res, dict):
        return "per host" if (r.cell or {}).get("policy") or r.meta.get("policy") else "–"
    if res.get("how") == "once":
        return f"once on {res.get('on') or '?'}"
    return "per host"


def resolved_sets(runs: list) -> pd.DataFrame:
    """One row per (host, workload, policy, resolved set): how each policy resolved for
    each workload on each host (a policy resolves against one workload's profile)."""
    ids = set_ids(runs)
    acc: dict[tuple[str, str, str, str, tuple[str, ...]], int] = {}
    for r in runs:
        k = (r.host or "–", r.workload, r.group, resolved_how(r), forwarded_set(r))
        acc[k] = acc.get(k, 0) + 1
    rows = [
        {"host": h, "workload": w, "policy": p, "resolved": how, "set": ids[s],
         "types": len(s), "syscalls": ",".join(s), "runs": n}
        for (h, w, p, how, s), n in sorted(acc.items())
    ]  # fmt: skip
    cols = ["host", "workload", "policy", "resolved", "set", "types", "syscalls", "runs"]
    return pd.DataFrame(rows, columns=cols)


def pool_groups(
    df: pd.DataFrame, by: list[str], across: str = "mechanism"
) -> tuple[pd.DataFrame, list[str]]:
    """Rows of ``df`` whose ``by`` group forwarded one resolved set, and refusals.

    ``df`` has the ``by`` columns, ``across`` and ``set``.  A group (e.g. one
    workload and policy) whose rows forwarded different sets is dropped, and
    one line says so: which set each ``across`` value (mechanism, host)
    forwarded.
    """
    if not len(df):
        return df, []
    keep, lines = [], []
    for key, g in df.groupby(by, sort=True, dropna=False):
        sets = sorted(set(g["set"]))
        if len(sets) <= 1:
            keep.append(g)
            continue
        key = key if isinstance(key, tuple) else (key,)
        what = ", ".join(
            f"{a}: {'+'.join(sorted(set(gg['set'])))}"
            for a, gg in g.groupby(across, sort=True)
        )  # fmt: skip
        lines.append(
            f"- Not pooled: {' / '.join(map(str, key))} forwarded different syscall sets "
            f"({what}; sets in *Policies as resolved*): not the same experiment."
        )
    out = pd.concat(keep, ignore_index=True) if keep else df.iloc[0:0]
    return out, lines
