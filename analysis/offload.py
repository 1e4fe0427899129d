"""Offload runs in the report: local I/O, cost-mode forwarding and offload side by side,
and many compute nodes offloading to one delegate (``docs/offload.md``).

Inputs are the delegated runs :func:`analysis.compare.load_runs` returns and
the native times of :func:`analysis.compare.native_times`.  Per-call numbers
come from :func:`analysis.fit.fc_samples` (``f_c = (overhead - exec)/2`` as
:func:`testbed.core.rundir.derived` defines it, bytes moved = ``bytes_in +
bytes_out``); nothing here derives them a second time.

*Same workload*: runs are grouped by workload name (a ``testbed experiment``
cell's ``experiment.json``, else ``run.json`` ``workload``, else the program's
basename), since an offload run names the offloaded prefix where a native or
cost run names a local directory.  Its native (local I/O) time is the median
of the runs' native wall times (``run.json`` ``native``, else the cell's
``native_wall_s``), else of those :func:`~analysis.compare.native_times` found
for their command lines.

*Many clients*: offload runs answered by the same delegate process (WELCOME
host and pid) whose spans on the delegate's clock (first ``d_recv`` to last
``d_send``) overlap ran concurrently.  Every client's span is on that one
clock, so this holds across compute nodes whose own clocks differ.  Per client
throughput is its bytes moved over its span; aggregate throughput is all
clients' bytes over the union of the spans.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import fit
from analysis.compare import DelegatedRun
from analysis.tables import markdown_table
from testbed.core import mechanisms
from testbed.core.rundir import F_FAULT_MASK, derived

__all__ = ["OffloadSection", "run_rows", "side_by_side", "many_clients", "figure", "section",
           "prediction_frame", "prediction_figure"]  # fmt: skip

MB = 1e6


def _cell(r: DelegatedRun) -> dict:
    """``experiment.json`` of a ``testbed experiment`` cell (workload name, native time)."""
    p = r.path / "experiment.json"
    try:
        d = json.loads(p.read_text()) if p.exists() else {}
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def workload_of(r: DelegatedRun) -> str:
    return str(_cell(r).get("workload") or r.workload)


def native_of(r: DelegatedRun) -> float | None:
    if r.native_wall is not None:
        return r.native_wall
    v = _cell(r).get("native_wall_s")
    return float(v) if isinstance(v, int | float) else None


def mode_of(r: DelegatedRun) -> str:
    return str(r.meta.get("mode") or "cost")


def _delegate_id(r: DelegatedRun) -> str | None:
    d = r.meta.get("delegate")
    if not isinstance(d, dict) or d.get("pid") is None:
        return None
    return json.dumps([d.get("host"), d.get("pid")], sort_keys=True, default=str)


def _span(calls: np.ndarray) -> tuple[float, float]:
    """First ``d_recv`` and last ``d_send`` (delegate clock, s) of the answered calls."""
    ok = (calls["d_send"] > 0) & ((calls["flags"] & F_FAULT_MASK) == 0)
    if not ok.any():
        return np.nan, np.nan
    return float(calls["d_recv"][ok].min()) / 1e9, float(calls["d_send"][ok].max()) / 1e9


def _native_by_workload(runs: list[DelegatedRun], native: dict) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for r in runs:
        if native_of(r) is not None:
            acc.setdefault(workload_of(r), []).append(native_of(r))
    for r in runs:
        if workload_of(r) not in acc and r.key in native:
            acc.setdefault(workload_of(r), []).append(native[r.key][0])
    return {w: float(np.median(v)) for w, v in acc.items()}


def run_rows(runs: list[DelegatedRun], native: dict) -> pd.DataFrame:
    """One row per delegated run of a workload that has an offload run."""
    t_nd = _native_by_workload(runs, native)
    offloaded = {workload_of(r) for r in runs if mode_of(r) == "offload"}
    rows = []
    for r in runs:
        w = workload_of(r)
        if w not in offloaded:
            continue
        fc, size = fit.fc_samples(r.calls, mode_of(r))
        ok = (r.calls["flags"] & F_FAULT_MASK) == 0
        exec_ns = derived(r.calls)["exec"][ok] if len(r.calls) else np.zeros(0)
        moved = int(r.calls["bytes_in"].sum()) + int(r.calls["bytes_out"].sum())
        t0, t1 = _span(r.calls)
        nat = t_nd.get(w, np.nan)
        rows.append(
            {
                "run": r.path.name,
                "workload": w,
                "mode": mode_of(r),
                "mechanism": r.mechanism,
                "wall_s": r.wall,
                "t_nd_s": nat,
                "slowdown": r.wall / nat if nat and nat > 0 else np.nan,
                "calls": len(r.calls),
                "f_c_median_s": float(np.median(fc)) if len(fc) else np.nan,
                "exec_median_s": float(np.median(exec_ns)) / 1e9 if len(exec_ns) else np.nan,
                "bytes_moved": moved,
                "d_start_s": t0,
                "d_end_s": t1,
                "delegate": _delegate_id(r),
            }
        )
    return pd.DataFrame(rows)


def side_by_side(runs: list[DelegatedRun], native: dict, level: float = 0.95) -> pd.DataFrame:
    """Per workload: native (local I/O), each cost-mode mechanism and forwarded set
    (or policy), each offload mechanism."""
    t_nd = _native_by_workload(runs, native)
    offloaded = sorted({workload_of(r) for r in runs if mode_of(r) == "offload"})
    rows = []
    for w in offloaded:
        nat = t_nd.get(w, np.nan)
        rows.append({"workload": w, "how": "native (local I/O)", "runs": np.nan,
                     "wall_median_s": nat, "slowdown": 1.0 if np.isfinite(nat) else np.nan})  # fmt: skip
        groups: dict[tuple[str, str, str], list[DelegatedRun]] = {}
        for r in runs:
            if workload_of(r) == w:  # cost runs: one row per forwarded set or policy
                what = "" if mode_of(r) == "offload" else f" [{r.group}]"
                groups.setdefault((mode_of(r), r.mechanism, what), []).append(r)
        for (mode, mech, what), rs in sorted(groups.items()):
            walls = np.array([r.wall for r in rs])
            fcs = [fit.fc_samples(r.calls, mode) for r in rs]
            fc = np.concatenate([f for f, _ in fcs])
            size = np.concatenate([s for _, s in fcs])
            ex = np.concatenate(
                [
                    derived(r.calls)["exec"][(r.calls["flags"] & F_FAULT_MASK) == 0]
                    for r in rs
                    if len(r.calls)
                ]
                or [np.zeros(0)]
            )
            pc = fit.per_call(fc, level)
            sz = fit.size_aware(fc, size, level)
            moved = np.array(
                [int(r.calls["bytes_in"].sum() + r.calls["bytes_out"].sum()) for r in rs]
            )
            rows.append(
                {
                    "workload": w,
                    "how": f"{mode}: {mech}{what}",
                    "runs": len(rs),
                    "wall_median_s": float(np.median(walls)),
                    "wall_min_s": float(walls.min()),
                    "wall_max_s": float(walls.max()),
                    "slowdown": float(np.median(walls)) / nat if nat > 0 else np.nan,
                    "calls_per_run": float(np.mean([len(r.calls) for r in rs])),
                    "f_c_median_s": pc.median.value,
                    "f_c_median_lo_s": pc.median.lo,
                    "f_c_median_hi_s": pc.median.hi,
                    "exec_median_s": float(np.median(ex)) / 1e9 if len(ex) else np.nan,
                    "alpha_s": sz.alpha.value,
                    "beta_ns_per_byte": sz.beta.value * 1e9,
                    "beta_significant": sz.significant,
                    "bytes_moved_per_run": float(moved.mean()),
                    "MB_per_s": float((moved / walls).mean()) / MB,
                }
            )
    cols = ["workload", "how", "runs", "wall_median_s", "wall_min_s", "wall_max_s", "slowdown",
            "calls_per_run", "f_c_median_s", "f_c_median_lo_s", "f_c_median_hi_s", "exec_median_s",
            "alpha_s", "beta_ns_per_byte", "beta_significant", "bytes_moved_per_run", "MB_per_s"]  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def many_clients(rows: pd.DataFrame) -> pd.DataFrame:
    """Concurrent offload clients of one delegate: a row per client and an aggregate row.

    ``rows`` is :func:`run_rows`' table.  Groups of one client are left out.
    """
    cols = ["group", "client", "run", "workload", "span_s", "bytes_moved", "MB_per_s",
            "clients", "overlap_s"]  # fmt: skip
    if not len(rows):
        return pd.DataFrame(columns=cols)
    off = rows[(rows["mode"] == "offload") & rows["delegate"].notna() & rows["d_start_s"].notna()]
    out = []
    gi = 0
    for _, dr in off.groupby("delegate"):
        dr = dr.sort_values("d_start_s")
        clusters: list[list] = []
        end = -np.inf
        for row in dr.itertuples():
            if row.d_start_s <= end:
                clusters[-1].append(row)
                end = max(end, row.d_end_s)
            else:
                clusters.append([row])
                end = row.d_end_s
        for cl in clusters:
            if len(cl) < 2:
                continue
            gi += 1
            for i, row in enumerate(cl, start=1):
                span = row.d_end_s - row.d_start_s
                out.append({"group": gi, "client": str(i), "run": row.run, "workload": row.workload,
                            "span_s": span, "bytes_moved": row.bytes_moved,
                            "MB_per_s": row.bytes_moved / span / MB if span > 0 else np.nan})  # fmt: skip
            t0 = min(r.d_start_s for r in cl)
            t1 = max(r.d_end_s for r in cl)
            overlap = min(r.d_end_s for r in cl) - max(r.d_start_s for r in cl)
            total = sum(r.bytes_moved for r in cl)
            out.append({"group": gi, "client": "aggregate", "run": "", "workload": "",
                        "span_s": t1 - t0, "bytes_moved": total,
                        "MB_per_s": total / (t1 - t0) / MB if t1 > t0 else np.nan,
                        "clients": len(cl), "overlap_s": max(overlap, 0.0)})  # fmt: skip
    return pd.DataFrame(out, columns=cols)


def figure(side: pd.DataFrame, many: pd.DataFrame):
    """Slowdown per workload and mode; per-client and aggregate throughput."""
    from analysis.figures import plt  # lazy: matplotlib (analysis.figures selects Agg)

    ncols = 2 if len(many) else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.2), squeeze=False)
    ax = axes[0][0]
    hows = list(dict.fromkeys(side["how"])) if len(side) else []
    workloads = list(dict.fromkeys(side["workload"])) if len(side) else []
    width = 0.8 / max(len(hows), 1)
    for j, how in enumerate(hows):
        vals = [
            side[(side["workload"] == w) & (side["how"] == how)]["slowdown"].mean()
            for w in workloads
        ]
        ax.bar(np.arange(len(workloads)) + j * width, vals, width, label=how)
    ax.set_xticks(np.arange(len(workloads)) + width * (len(hows) - 1) / 2, workloads, fontsize=8)
    ax.set_xlabel("workload")
    ax.set_ylabel("slowdown: median wall / native local I/O (×)")
    ax.set_title("Local I/O, cost-mode forwarding and offload", fontsize=10)
    if hows:  # headroom above the bars for the legend (mechanism labels are long)
        top = np.nanmax(side["slowdown"].to_numpy(float)) if len(side) else np.nan
        if np.isfinite(top) and top > 0:
            ax.set_ylim(0, top * (1.25 + 0.12 * len(hows)))
        ax.legend(fontsize=7, loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    if len(many):
        ax = axes[0][1]
        labels = [f"g{g}:{c}" for g, c in zip(many["group"], many["client"], strict=True)]
        colors = ["C3" if c == "aggregate" else "C0" for c in many["client"]]
        ax.bar(range(len(many)), many["MB_per_s"], color=colors)
        ax.set_xticks(range(len(many)), labels, rotation=30, fontsize=7)
        ax.set_xlabel("group:client")
        ax.set_ylabel("throughput (MB/s of bytes_in + bytes_out)")
        ax.set_title("Many clients, one delegate: per client and aggregate", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def prediction_frame(acc: pd.DataFrame) -> pd.DataFrame:
    """Per offload run of ``model_accuracy`` (the offload class's headline scheme): measured
    and predicted slowdown, ``t_d / t_nd``, with the predictor chosen for the run."""
    cols = ["workload", "run", "repetition", "mechanism", "t_nd", "measured", "predicted",
            "measured_slowdown", "predicted_slowdown", "predictor", "scheme"]  # fmt: skip
    if not len(acc) or "mechanism" not in acc:
        return pd.DataFrame(columns=cols)
    d = acc[acc["mechanism"].astype(str).map(mechanisms.is_offload)]
    d = d[d["predicted"].notna() & (d["t_nd"] > 0)].copy()
    d["measured_slowdown"] = d["measured"] / d["t_nd"]
    d["predicted_slowdown"] = d["predicted"] / d["t_nd"]
    return d[cols].reset_index(drop=True)


def prediction_figure(frame: pd.DataFrame):
    """Predicted vs measured offload slowdown per workload, one point per run."""
    from analysis.figures import plt  # lazy: matplotlib (analysis.figures selects Agg)

    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    workloads = sorted(set(frame["workload"])) if len(frame) else []
    x = {w: i for i, w in enumerate(workloads)}
    for col, dx, marker, color, label in (
        ("measured_slowdown", -0.15, "o", "C0", "measured (one point per run)"),
        ("predicted_slowdown", 0.15, "x", "C3", "predicted from other runs"),
    ):
        if len(frame):
            ax.scatter([x[w] + dx for w in frame["workload"]], frame[col], marker=marker,
                       color=color, s=22, label=label, zorder=3)  # fmt: skip
    vals = frame[["measured_slowdown", "predicted_slowdown"]].to_numpy(float) if len(frame) else []
    vals = np.asarray(vals, float)
    vals = vals[np.isfinite(vals) & (vals > 0)]
    log = len(vals) and vals.max() / max(vals.min(), 1e-9) > 20
    if log:
        ax.set_yscale("log")
        ax.set_ylim(vals.min() / 1.5, vals.max() * 8)  # headroom: the legend covers no point
    elif len(vals):
        ax.set_ylim(0, vals.max() * 1.45)
    ax.set_xticks(range(len(workloads)), workloads, rotation=25, fontsize=8)
    ax.set_xlim(-0.6, max(len(workloads) - 0.4, 0.6))
    ax.set_xlabel("workload")
    ax.set_ylabel("slowdown: wall / native local I/O (×" + (", log)" if log else ")"))
    scheme = str(frame["scheme"].iloc[0]) if len(frame) else "–"
    ax.set_title(f"Offload: predicted vs measured slowdown ({scheme} scheme)", fontsize=10)
    if len(frame):
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


@dataclass
class OffloadSection:
    """What the report adds when there are offload runs (its figure: :func:`figure` of
    the ``offload_side_by_side`` and ``offload_many_clients`` tables)."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    markdown: list[str] = field(default_factory=list)


def _us(df: pd.DataFrame) -> pd.DataFrame:
    d = df.copy()
    for c in [
        c for c in d.columns if c.endswith("_s") and ("f_c" in c or "exec" in c or "alpha" in c)
    ]:
        d[c] = d[c] * 1e6
        d = d.rename(columns={c: c.removesuffix("_s") + " (µs)"})
    return d


def section(runs: list[DelegatedRun], native: dict) -> OffloadSection:
    """Tables and Markdown of the offload section (empty without offload runs)."""
    if not any(mode_of(r) == "offload" for r in runs):
        return OffloadSection()
    rows = run_rows(runs, native)
    side = side_by_side(runs, native)
    many = many_clients(rows)
    md = [
        "## Offload: local I/O, cost-mode forwarding and offload",
        "",
        "Each workload with an offload run, its native (local I/O) time and every mode and "
        "mechanism it ran with (cost mode: per forwarded set or policy, in brackets). slowdown = median wall / native. Per call: f_c = "
        "(overhead − exec)/2 (`testbed.core.rundir.derived`; exec, the delegate's execution "
        "time, is 0 in cost mode), median with a 95% order-statistic CI; exec median; "
        "size-aware `f_c = α + β·bytes` with bytes = bytes_in + bytes_out actually moved "
        "(offload: data and paths sent plus data returned). MB/s = bytes moved / wall.",
        "",
        markdown_table(_us(side)),
    ]
    if len(many):
        md += [
            "### Many clients, one delegate",
            "",
            "Offload runs answered by one delegate process whose spans on the delegate's "
            "clock (first d_recv to last d_send) overlap. Per client: its bytes moved / its "
            "span; aggregate: all bytes / the union of the spans; overlap_s: the time all "
            "clients were active together.",
            "",
            markdown_table(many),
        ]
    md += ["![Offload: slowdown and throughput](figures/offload.png)", ""]
    return OffloadSection(
        {"offload_runs": rows, "offload_side_by_side": side, "offload_many_clients": many}, md
    )
