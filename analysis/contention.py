"""Contention sweeps (``testbed contention``): load, fit on N = 1, predict, figures, report.

Stages, in order:

``load_sweep(dir)``
    one tidy row per cell (W, N): measured X, R (mean, p50, p99), think time,
    the delegate's queueing delay, utilisation and service time, the fixed
    cost ``D = R - wait - service``, the machine's CPU use.
``fit(cells)``
    one :class:`analysis.queueing.Station` per W from its **N = 1 cells only**
    (see :func:`_station`); ``predict`` fits each N > 1 cell on the N = 1
    reference cells run right before and after it.
``predict(cells, stations)``
    exact MVA at every N; relative errors; bounds; N*.  Rows with N = 1 are
    fits (marked ``fitted``; their small error is the control-variate S against
    the realised one); every other row is a prediction.
figures, ``write_report(sweeps, outdir)``
    ``contention.md`` with the error table, figures and ``tables/contention.csv``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from analysis import figures, model, queueing  # noqa: E402
from analysis.profiles import shipped_profiles  # noqa: E402
from analysis.queueing import Station  # noqa: E402
from analysis.tables import markdown_table  # noqa: E402
from testbed.core.errors import TestbedError  # noqa: E402
from testbed.core.rundir import derived, usable  # noqa: E402
from testbed.core.sweep_record import CELL_JSON, SWEEP_JSON, cell_summary, split_sweeps  # noqa: E402

#: The target of issue 13: mean response predicted within this fraction.
TARGET = 0.10


def is_sweep(path: str | Path) -> bool:
    return (Path(path) / SWEEP_JSON).is_file()


split = split_sweeps


def load_sweep(path: str | Path) -> pd.DataFrame:
    """One row per finished cell of a sweep directory."""
    p = Path(path)
    if not is_sweep(p):
        raise TestbedError(f"{p}: not a contention sweep (no {SWEEP_JSON})")
    rows = []
    for cj in sorted(p.glob(f"*/{CELL_JSON}")):
        m = json.loads(cj.read_text())
        s = cell_summary(cj.parent, m)  # derived afresh from the raw records
        d = s.get("delegate", {})
        rows.append(
            {
                "sweep": str(p),
                "name": cj.parent.name,
                "reference": bool(m.get("reference", False)),
                "start_ns": m.get("start_ns", 0),
                "W": m["W"],
                "N": m["N"],
                "calls": s.get("calls", 0),
                "X": s.get("X_per_s", np.nan),
                "R_mean": s.get("R_mean_us", np.nan) / 1e6,
                "R_p50": s.get("R_p50_us", np.nan) / 1e6,
                "R_p99": s.get("R_p99_us", np.nan) / 1e6,
                "R_sem": s.get("R_sem_us", np.nan) / 1e6,
                "Z": s.get("think_mean_us", np.nan) / 1e6,
                "Z_over": s.get("think_overhead_us", np.nan) / 1e6,
                "S_over": d.get("overhead_mean_us", np.nan) / 1e6,
                "wait": d.get("wait_mean_us", np.nan) / 1e6,
                "wait_p99": d.get("wait_p99_us", np.nan) / 1e6,
                "S": d.get("service_mean_us", np.nan) / 1e6,
                "U": d.get("utilisation", np.nan),
                "queue_mean": d.get("queue_mean", np.nan),
                "D": s.get("D_us", np.nan) / 1e6,
                "machine_cpu": m.get("machine_cpu_busy", np.nan),
                "own_cpu": m.get("own_cpu_s", np.nan) / m.get("cell_wall_s", np.nan),
                "service_us": m.get("service_us"),
                "think_us": m.get("think_us"),
                "service": f"{m.get('service')}/{m.get('service_dist')}",
                "think": f"{m.get('think')}/{m.get('think_dist')}",
                "host": (m.get("host") or {}).get("hostname", ""),
            }
        )
    if not rows:
        raise TestbedError(f"{p}: no finished cells")
    return pd.DataFrame(rows).sort_values(["W", "N", "start_ns"], ignore_index=True)


def _station(ones: pd.DataFrame, w: int) -> Station:
    """A Station from single-caller cells, pooled (weights: calls).

    ``S`` and ``Z`` are the configured means plus the measured overheads
    beyond the drawn times (sleep overshoot, decoding, the caller's loop): the
    drawn exponential times are a control variate whose mean is known, so a
    few hundred calls give S and Z to a fraction of a per cent instead of the
    1/sqrt(n) of the raw means.  ``D = R − S_realised`` of the same calls.
    """
    wt = ones["calls"].to_numpy(dtype=float)

    def avg(col: str) -> float:
        return float(np.average(ones[col].to_numpy(dtype=float), weights=wt))

    # D: everything of a lone caller's response that is not service, the
    # delegate's dispatch (receipt to a worker, ~0.1 ms) included
    D = max(avg("R_mean") - avg("S"), 0.0)
    S = avg("service_us") / 1e6 + avg("S_over")
    Z = avg("think_us") / 1e6 + avg("Z_over")
    return Station(Z=Z, D=D, S=S, W=int(w))


def fit(cells: pd.DataFrame) -> dict[int, Station]:
    """A Station per W from all that W's N = 1 cells, pooled (single-caller measurements only)."""
    out = {}
    for w, g in cells.groupby("W"):
        ones = g[g["N"] == 1]
        if ones.empty:
            raise TestbedError(f"W={w}: no N = 1 cell to take the model's parameters from")
        out[int(w)] = _station(ones, int(w))
    return out


def adjacent(cells: pd.DataFrame, row: pd.Series) -> pd.DataFrame:
    """The N = 1 cells of ``row``'s W that ran right before and right after it."""
    ones = cells[(cells["W"] == row["W"]) & (cells["N"] == 1)]
    before = ones[ones["start_ns"] < row["start_ns"]].nlargest(1, "start_ns")
    after = ones[ones["start_ns"] > row["start_ns"]].nsmallest(1, "start_ns")
    return pd.concat([before, after])


def predict(cells: pd.DataFrame, stations: dict[int, Station]) -> pd.DataFrame:
    """Predicted X, R, wait, U, bounds, N* and relative errors for every non-reference cell.

    Each N > 1 cell is predicted from the single-caller cells run right
    before and after it (``fit`` = their names) when the sweep has reference
    cells, else from ``stations`` (all N = 1 cells pooled); ``R_err_pooled``
    is the error with the pooled fit, for comparison.  N = 1 rows are fits.
    """
    df = cells[~cells["reference"]].copy() if "reference" in cells else cells.copy()
    keys = ("X_pred", "R_pred", "wait_pred", "U_pred", "X_hi", "R_lo", "R_hi", "N_star",
            "R_pred_pooled", "fit")  # fmt: skip
    cols: dict[str, list] = {k: [] for k in keys}
    for _, r in df.iterrows():
        n = int(r["N"])
        pooled = stations[int(r["W"])]
        adj = adjacent(cells, r) if n > 1 and "start_ns" in cells else pd.DataFrame()
        st = _station(adj, int(r["W"])) if len(adj) else pooled
        res = queueing.mva(st, n)
        b = queueing.bounds(st, n)
        cols["X_pred"].append(res.X[-1])
        cols["R_pred"].append(res.R[-1])
        cols["wait_pred"].append(res.wait[-1])
        cols["U_pred"].append(res.U[-1])
        cols["X_hi"].append(float(b["X_hi"]))
        cols["R_lo"].append(float(b["R_lo"]))
        cols["R_hi"].append(float(b["R_hi"]))
        cols["N_star"].append(queueing.saturation(st))
        cols["R_pred_pooled"].append(queueing.mva(pooled, n).R[-1])
        cols["fit"].append("+".join(adj["name"]) if len(adj) else "all N = 1 pooled")
    for k, v in cols.items():
        df[k] = v
    df["R_err"] = df["R_pred"] / df["R_mean"] - 1.0
    df["R_err_pooled"] = df["R_pred_pooled"] / df["R_mean"] - 1.0
    df["X_err"] = df["X_pred"] / df["X"] - 1.0
    df["fitted"] = df["N"] == 1
    df["within_2x_sat"] = df["N"] <= 2 * df["N_star"]
    return df


# ---------------------------------------------------------------- figures

_COLORS = {1: "tab:blue", 2: "tab:orange", 4: "tab:green", 8: "tab:red"}


def _color(w: int) -> str:
    return _COLORS.get(w, "tab:gray")


def _curve(st: Station, n_max: int):
    return queueing.mva(st, n_max), queueing.bounds(st, np.arange(1, n_max + 1))


def fig_response(df: pd.DataFrame, stations: dict[int, Station]) -> Figure:
    """R(N): measured mean (p50, p99 marks) vs MVA prediction, with bounds, per W."""
    ws = sorted(stations)
    fig, axes = plt.subplots(1, len(ws), figsize=(4.2 * len(ws), 3.6), squeeze=False)
    for ax, w in zip(axes[0], ws, strict=True):
        g = df[df["W"] == w]
        n_max = int(g["N"].max())
        res, b = _curve(stations[w], n_max)
        ax.fill_between(res.N, b["R_lo"] * 1e3, b["R_hi"] * 1e3, color=_color(w), alpha=0.12,
                        label="asymptotic bounds")  # fmt: skip
        ax.plot(res.N, res.R * 1e3, "-", color=_color(w), label="MVA prediction (fit: N = 1)")
        ax.errorbar(g["N"], g["R_mean"] * 1e3, yerr=1.96 * g["R_sem"] * 1e3, fmt="o",
                    color="k", ms=4, label="measured mean (95 % CI)")  # fmt: skip
        ax.plot(g["N"], g["R_p50"] * 1e3, "v", color="0.45", ms=4, label="measured p50")
        ax.plot(g["N"], g["R_p99"] * 1e3, "^", color="0.45", ms=4, label="measured p99")
        ax.set_title(f"W = {w}")
        ax.set_xlabel("callers N (count)")
        ax.set_ylabel("response time per call (ms)")
        ax.set_yscale("log")
        top = float(np.nanmax([*(b["R_hi"] * 1e3), *(g["R_p99"] * 1e3)]))
        bottom = float(np.nanmin([*(b["R_lo"] * 1e3), *(g["R_p50"] * 1e3)]))
        ax.vlines(
            queueing.saturation(stations[w]), bottom / 1.5, top, color="0.6", ls=":", label="N*"
        )  # up to the data only: the legend sits above it
        ax.set_ylim(bottom / 1.5, top * 30)  # headroom: the legend sits above the data
    axes[0][0].legend(fontsize=6, loc="upper left", ncol=2)
    fig.tight_layout()
    return fig


def fig_throughput(df: pd.DataFrame, stations: dict[int, Station]) -> Figure:
    """X(N): measured vs MVA, with the asymptotic bounds, all W on one plot."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for w in sorted(stations):
        g = df[df["W"] == w]
        res, b = _curve(stations[w], int(g["N"].max()))
        ax.fill_between(res.N, b["X_lo"], b["X_hi"], color=_color(w), alpha=0.12)
        ax.plot(res.N, res.X, "-", color=_color(w), label=f"W = {w}: MVA")
        ax.plot(g["N"], g["X"], "o", color=_color(w), ms=4, label=f"W = {w}: measured")
    ax.set_xlabel("callers N (count)")
    ax.set_ylabel("throughput X (calls/s)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def fig_speedup(profile, D: float, S: float, workers=(1, 2, 4), gammas=(1.0, 2.0, 10.0),
                n_max: int = 64, note: str = "") -> Figure:  # fmt: skip
    """Predicted S_r vs N for a profile, every call forwarded, f_c(N) from MVA; ``note``
    says where D and S come from (a second title line)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    b = np.ones_like(profile.n, dtype=float)
    styles = ["-", "--", ":", "-."]
    for i, gam in enumerate(gammas):
        for w in workers:
            sr = queueing.S_r_contended(profile.C, profile.g, profile.n, b, gam, D, S, w, n_max)
            ax.plot(np.arange(1, n_max + 1), sr, styles[i % 4], color=_color(w),
                    label=f"γ = {gam:g}, W = {w}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("compute nodes N sharing the delegate (count)")
    ax.set_ylabel("predicted S_r (×)")
    title = f"{profile.name}: D = {D * 1e6:.0f} µs, S = {S * 1e6:.0f} µs"
    ax.set_title(f"{title}\n{note}" if note else title, fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- report


def _pick_profile(name: str = "gzip"):
    profs = shipped_profiles()
    for p in profs:
        if p.name == name:
            return p
    return profs[0] if profs else None


def error_table(df: pd.DataFrame) -> pd.DataFrame:
    t = df[["W", "N", "N_star", "calls", "X", "X_pred", "X_err", "R_mean", "R_pred", "R_err",
            "R_err_pooled",
            "R_p50", "R_p99", "wait", "wait_pred", "U", "U_pred", "D", "machine_cpu", "own_cpu",
            "fitted", "fit"]].copy()  # fmt: skip
    for c in ("R_mean", "R_pred", "R_p50", "R_p99", "wait", "wait_pred", "D"):
        t[c] = t[c] * 1e3
    for c in ("X_err", "R_err", "R_err_pooled"):
        t[c] = t[c] * 100
    return t.rename(
        columns={
            c: f"{c} (ms)" for c in ("R_mean", "R_pred", "R_p50", "R_p99", "wait", "wait_pred", "D")
        }  # fmt: skip
        | {
            "X_err": "X err %",
            "R_err": "R err %",
            "R_err_pooled": "R err % (pooled fit)",
            "X": "X (/s)",
            "X_pred": "X_pred (/s)",
        }
    )


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per W: the predictions for 1 < N <= 2 N*, their worst and median |R error|."""
    rows = []
    for w, g in df[~df["fitted"] & df["within_2x_sat"]].groupby("W"):
        e, ep = g["R_err"].abs() * 100, g["R_err_pooled"].abs() * 100
        rows.append({"W": w, "N*": g["N_star"].mean(), "cells (1 < N <= 2 N*)": len(g),
                     "N": ",".join(str(n) for n in g["N"]), "max abs R err %": e.max(),
                     "median abs R err %": e.median(), "within 10 %": int((e <= 10).sum()),
                     "max abs R err % (pooled fit)": ep.max()})  # fmt: skip
    return pd.DataFrame(rows)


def verdict(df: pd.DataFrame) -> list[str]:
    """Plain sentences: the target, the largest N, where the machine took over."""
    lines = []
    pred = df[~df["fitted"] & df["within_2x_sat"]]
    if len(pred):
        worst = pred.loc[pred["R_err"].abs().idxmax()]
        ok = bool((pred["R_err"].abs() <= TARGET).all())
        wp = pred.loc[pred["R_err_pooled"].abs().idxmax()]
        ok_p = bool((pred["R_err_pooled"].abs() <= TARGET).all())
        lines.append(
            f"Mean response time, predictions for 1 < N <= 2 N*: {len(pred)} cells, "
            f"worst error {worst['R_err'] * 100:+.1f} % at W = {worst['W']}, N = {worst['N']} "
            f"(fit: the N = 1 cells around each) — target |error| <= {TARGET * 100:.0f} % "
            f"{'met' if ok else 'NOT met'}; with all N = 1 cells pooled: worst "
            f"{wp['R_err_pooled'] * 100:+.1f} % at W = {wp['W']}, N = {wp['N']} — "
            f"{'met' if ok_p else 'NOT met'}."
        )
    qd = df[~df["fitted"] & df["within_2x_sat"] & (df["wait"] > 0.5e-3)]
    if len(qd):
        werr = qd["wait_pred"] / qd["wait"] - 1
        lines.append(
            f"Queueing delay at the delegate (receipt to start of service, from its own "
            f"record), in those cells where it exceeds 0.5 ms: predicted within "
            f"{werr.abs().max() * 100:.0f} % (median |error| {werr.abs().median() * 100:.0f} %, "
            f"{len(qd)} cells); the rest of the response-time error is D, the part "
            f"outside the delegate."
        )
    big = df.loc[df["N"].idxmax()]
    lines.append(
        f"Largest N run: {big['N']} callers (W = {big['W']}), X = {big['X']:.0f} calls/s "
        f"(predicted {big['X_pred']:.0f}), delegate utilisation {big['U']:.2f}, machine CPU "
        f"busy {big['machine_cpu'] * 100:.0f} %."
    )
    for w, g in df.groupby("W"):
        g = g.sort_values("N")
        short = g[(g["X"] < 0.9 * g["X_pred"]) & ~g["fitted"]]
        d1, dmax = g["D"].iloc[0], g["D"].iloc[-1]
        grow = (f"D (R − wait − S: relays, ZeroMQ, wake-ups on the shared CPUs) went from "
                f"{d1 * 1e3:.2f} ms at N = 1 to {dmax * 1e3:.2f} ms at N = {g['N'].iloc[-1]}")  # fmt: skip
        if len(short):
            r = short.iloc[0]
            lines.append(
                f"W = {w}: from N = {r['N']} the measured X fell more than 10 % below the "
                f"model ({r['X']:.0f} vs {r['X_pred']:.0f} calls/s) with the delegate "
                f"{r['U'] * 100:.0f} % busy and the machine's CPUs {r['machine_cpu'] * 100:.0f} % "
                f"busy: the machine, not the delegate, limited throughput there; {grow}."
            )
        else:
            lines.append(
                f"W = {w}: X within 10 % of the model (or above it) at every N — the "
                f"delegate (utilisation up to {g['U'].max() * 100:.0f} %) stayed the "
                f"bottleneck; {grow}."
            )
    return lines


def _sizing_section(prof, st: Station, n_max: int) -> list[str]:
    """Direct sizing answers for this sweep's D and S: the smallest W for a 10 % slowdown,
    and for keeping the slowdown within 10 % of the uncontended one."""
    out = ["### Sizing with this delegate's D and S\n"]
    for nodes in sorted({n_max, 64}):
        sz = size_delegate(prof, st.D, st.S, nodes, 0.10)
        out += [f"- {line}" for line in sizing_lines(sz)]
        rel = size_delegate(prof, st.D, st.S, nodes, sz.floor * 1.10 + 1e-12)
        if rel.workers is not None:
            r = rel.table.iloc[-1]
            out.append(f"- A slowdown of at most 1.1 × the uncontended one ({sz.floor:.0%}) "
                       f"for {nodes} node(s): W = {rel.workers} (N* = {r['N*']:.1f} at that "
                       "W).")  # fmt: skip
    out.append("\nAny profile, slowdown and N: `analysis.contention.size_delegate` "
               "(docs/analysis.md).\n")  # fmt: skip
    return out


def write_report(sweeps, outdir: str | Path) -> Path:
    """Analyse sweep directories; write ``outdir/contention.md`` (+ figures, tables)."""
    out = Path(outdir)
    figdir, tabdir = out / "figures", out / "tables"
    for d in (out, figdir, tabdir):
        d.mkdir(parents=True, exist_ok=True)
    parts = ["# Contention: many callers, one delegate\n"]
    all_rows = []
    for k, sw in enumerate(map(Path, sweeps)):
        cells = load_sweep(sw)
        stations = fit(cells)
        df = predict(cells, stations)
        all_rows.append(df)
        tag = f"contention{k}" if len(sweeps) > 1 else "contention"
        figures.save(fig_response(df, stations), figdir, f"{tag}_response")
        figures.save(fig_throughput(df, stations), figdir, f"{tag}_throughput")
        r0 = cells.iloc[0]
        parts.append(f"## Sweep `{sw}`\n")
        parts.append(
            f"Service {r0['service']} S = {r0['service_us']:g} µs at the delegate, think "
            f"{r0['think']} Z = {r0['think_us']:g} µs, host {r0['host']}. The model's "
            "parameters come from single-caller (N = 1) cells only; every N > 1 row is a "
            "prediction. Below: the parameters pooled over all N = 1 cells of a W (the "
            "curves in the figures). Each N > 1 row of the error table is predicted from "
            "the N = 1 cells run right before and after it (column `fit`; the machine's "
            "load drifts), `R err % (pooled fit)` from the pooled parameters.\n"
        )
        fit_rows = pd.DataFrame(
            [
                {
                    "W": w,
                    "Z (ms)": s.Z * 1e3,
                    "D (ms)": s.D * 1e3,
                    "S (ms)": s.S * 1e3,
                    "N*": queueing.saturation(s),
                    "X max (/s)": s.W / s.S,
                }
                for w, s in stations.items()
            ]  # fmt: skip
        )
        parts.append(markdown_table(fit_rows))
        parts += ["", *[f"- {line}" for line in verdict(df)], ""]
        parts.append(markdown_table(summary_table(df)))
        parts.append("\n### Prediction error per (N, W)\n")
        parts.append(markdown_table(error_table(df)))
        parts.append(f"\n![R(N)](figures/{tag}_response.png)\n")
        parts.append(f"![X(N)](figures/{tag}_throughput.png)\n")
        prof = _pick_profile()
        if prof is not None and 1 in stations:
            st = stations[1]
            note = (f"S: this sweep's configured {r0['service_us']:g} µs service + overhead, "
                    "not a real delegate's")  # fmt: skip
            figures.save(fig_speedup(prof, st.D, st.S, tuple(sorted(stations)), note=note),
                         figdir, f"{tag}_speedup")  # fmt: skip
            fc1 = (st.D + st.S) / 2
            parts.append(
                f"Predicted S_r of the shipped `{prof.name}` profile (every call forwarded) "
                f"when N nodes share this delegate, with D and S of the W = 1 fit. S is "
                f"this sweep's *configured* service time ({r0['service']}, "
                f"{r0['service_us']:g} µs per call) plus the delegate's measured overhead "
                f"({st.S * 1e6:.0f} µs in all), not a real delegate's: every forwarded "
                f"call costs D + S = {2 * fc1 * 1e3:.2f} ms, so S_r falls below 1 wherever the "
                f"program's {int(prof.n.sum())} calls cost more than its computation saves "
                f"(single-caller slowdown at γ = 1: "
                f"{slowdown_of(prof.C, prof.g, prof.n, np.ones_like(prof.n), 1.0, fc1)[0]:.0%}"
                f"):\n\n![S_r(N)](figures/{tag}_speedup.png)\n"
            )
            parts += _sizing_section(prof, st, int(cells["N"].max()))
    pd.concat(all_rows).to_csv(tabdir / "contention.csv", index=False)
    report = out / "contention.md"
    report.write_text("\n".join(parts) + "\n")
    return report


# ---------------------------------------------------------------- sizing a delegate


@dataclass(frozen=True)
class Sizing:
    """How many workers a delegate needs for ``nodes`` compute nodes of one profile.

    ``workers``: the smallest W whose predicted slowdown at ``nodes`` is at most
    ``target`` (None: none up to ``w_max``); ``floor``: the slowdown with no
    queueing at all (f_c = (D + S)/2, any W); ``table``: per W, N* and the
    predicted slowdown and S_r at ``nodes``.
    """

    profile: str
    nodes: int
    target: float
    gamma: float
    D: float
    S: float
    Z: float
    workers: int | None
    floor: float
    table: pd.DataFrame


def slowdown_of(C, g, n, b, gamma: float, f_c) -> np.ndarray:
    """``t_d(f_c) / t_d(f_c = 0) - 1``: what forwarding at ``f_c`` costs the program at gain
    ``gamma`` (at gamma = 1, ``t_d / t_nd - 1``)."""
    free = float(model.t_d(C, g, n, b, gamma, 0.0))
    fc = np.atleast_1d(np.asarray(f_c, dtype=float))
    return np.array([float(model.t_d(C, g, n, b, gamma, x)) for x in fc]) / free - 1.0


def size_delegate(
    profile,
    D: float,
    S: float,
    nodes: int,
    target: float,
    b=None,
    gamma: float = 1.0,
    w_max: int = 256,
) -> Sizing:
    """The smallest W for which ``nodes`` nodes running ``profile`` (forwarded set ``b``,
    default every call) see a predicted slowdown of at most ``target`` (0.1 = 10 %).

    Each node forwards a call every ``Z`` (:func:`queueing.think_time`); the
    delegate's W workers serve calls of mean ``S``; a call also spends ``D``
    outside the delegate; exact MVA gives ``f_c(N)`` (:func:`queueing.f_c_of_N`).
    """
    if nodes < 1 or int(nodes) != nodes:
        raise TestbedError(f"--size must be a whole number of nodes >= 1, not {nodes}")
    if not target >= 0:
        raise TestbedError(f"the target slowdown must be >= 0, not {target}")
    b = np.ones_like(profile.n, dtype=float) if b is None else np.asarray(b, dtype=float)
    C, g, n = profile.C, profile.g, profile.n
    Z = queueing.think_time(C, g, n, b, gamma)
    floor = float(slowdown_of(C, g, n, b, gamma, (D + S) / 2)[0])
    rows, workers = [], None
    for w in range(1, w_max + 1):
        st = Station(Z=Z, D=D, S=S, W=w)
        fc = float(queueing.f_c_of_N(st, int(nodes))[-1])
        sd = float(slowdown_of(C, g, n, b, gamma, fc)[0])
        rows.append({"W": w, "N*": queueing.saturation(st), "f_c_s": fc, "slowdown": sd,
                     "S_r": float(model.S_r(C, g, n, b, gamma, fc)),
                     "meets": sd <= target})  # fmt: skip
        if sd <= target:
            workers = w
            break
        if w > 1 and sd - floor < 1e-4 * max(floor, 1e-12):
            break  # queueing all but gone (within 0.01 % of the floor): more workers cannot help
    return Sizing(profile.name, int(nodes), float(target), float(gamma), D, S, Z, workers,
                  floor, pd.DataFrame(rows))  # fmt: skip


def sizing_lines(sz: Sizing) -> list[str]:
    """The answer in sentences: the smallest W and its N*, or why there is none."""
    what = (f"{sz.nodes} node(s) running `{sz.profile}` (γ = {sz.gamma:g}; a forwarded call "
            f"every {sz.Z * 1e6:.0f} µs of the program's own time; D = {sz.D * 1e6:.0f} µs, "
            f"S = {sz.S * 1e6:.0f} µs)")  # fmt: skip
    if sz.workers is not None:
        r = sz.table.iloc[-1]
        return [f"{what}: slowdown ≤ {sz.target:.0%} needs W = {sz.workers} worker(s) "
                f"(predicted slowdown {r['slowdown']:.1%}, N* = {r['N*']:.1f} nodes at that W; "
                f"with no queueing at all the slowdown would be {sz.floor:.1%})."]  # fmt: skip
    if sz.floor > sz.target:
        return [f"{what}: no W reaches a slowdown ≤ {sz.target:.0%}: even without queueing "
                f"(f_c = (D + S)/2) the slowdown is {sz.floor:.1%}; a cheaper call (D + S) or "
                "fewer forwarded calls is needed, not more workers."]  # fmt: skip
    return [f"{what}: no W up to {int(sz.table['W'].max())} reaches a slowdown ≤ "
            f"{sz.target:.0%}."]  # fmt: skip


def station_from_runs(runs) -> tuple[float, float, str]:
    """``(D, S, where from)`` of delegated runs: S = the delegate's mean residence per call
    (receipt to reply), D = the mean per-call overhead minus S."""
    over, res = [], []
    for r in runs:
        calls = np.asarray(r.calls)
        if not len(calls):
            continue
        d = derived(calls)
        ok = usable(calls, d) & np.isfinite(d["residence"])
        over.append(d["overhead"][ok])
        res.append(d["residence"][ok])
    if not over or not sum(len(x) for x in over):
        raise TestbedError("no usable forwarded calls to take D and S from")
    o, s = np.concatenate(over) / 1e9, np.concatenate(res) / 1e9
    S = float(s.mean())
    return max(float(o.mean()) - S, 0.0), S, f"{len(o)} calls of {len(runs)} delegated run(s)"


def station_from_sweep(path) -> tuple[float, float, str]:
    """``(D, S, where from)``: the W = 1 (else smallest W) single-caller fit of a sweep."""
    st = fit(load_sweep(path))
    w = min(st)
    return st[w].D, st[w].S, f"the N = 1 cells of W = {w} in {path}"
