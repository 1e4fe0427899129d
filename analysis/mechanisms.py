"""Mechanisms side by side, and the TLB experiment (issue 9 items 3 and 4).

``mechanism_section`` puts every measured mechanism of one analysis next to
the others: per-call ``f_c`` (median and mean with 95 % CIs), each one's
ratio to the cheapest, and per workload the native time, the measured and the
predicted ``t_d`` and ``S_r``.  Predictions are *leave one run out*: a run is
predicted with the pooled mean ``f_c`` of every other run of its mechanism
(for the gain benchmark: the other gamma = 1 runs only), never with its own
calls.  The paper's mktrace figure (40 µs) is not a measurement of this
testbed: it is only the labelled reference line of the ``fc_per_mechanism``
figure.

``tlb_section`` reads gain-benchmark runs of the module's kernel thread with
and without the mktrace-faithful variant: the model's error per variant and
gamma (f_c fitted on gamma = 1 only) and whether the flushes explain the
error growth at large gamma, by comparing each faithful variant's growth with
the default's (which flushes nothing).

Runs stamped as emulated (``host.virtualization.emulated``: QEMU TCG) get
the caveat that only ratios between mechanisms measured in one guest mean
anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import accuracy as A
from analysis import provenance
from analysis.compare import DelegatedRun, NativeRun
from analysis.tables import markdown_table

#: Extra error growth below this (or below the natives' spread) is not attributed to the flushes.
MIN_GROWTH = 0.01


@dataclass
class Section:
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    markdown: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # comparisons refused (resolved sets)


# ---------------------------------------------------------------- stamps


def virtualization(meta: dict) -> dict:
    host = meta.get("host") if isinstance(meta.get("host"), dict) else {}
    v = host.get("virtualization")
    return v if isinstance(v, dict) else {}


def emulated_hosts(runs: list[DelegatedRun], natives: list[NativeRun]) -> list[str]:
    """Hosts (labels) whose runs are stamped as running on an emulated CPU (QEMU TCG)."""
    return sorted({r.host for r in [*runs, *natives] if virtualization(r.meta).get("emulated")})


def emulation_note(hosts: list[str]) -> list[str]:
    if not hosts:
        return []
    return [
        f"**Emulated CPU.** The runs of {', '.join(f'`{h}`' for h in hosts)} are stamped as "
        "virtualised with an emulated CPU (QEMU TCG, `host.virtualization` in run.json): every "
        "absolute time there is the emulator's, not hardware's. Only ratios between mechanisms "
        "measured in one guest (one boot, interleaved) are meaningful; do not compare these "
        "times with runs of other machines or other boots.",
        "",
    ]


# ---------------------------------------------------------------- predictions


def loo_predictions(
    runs: list[DelegatedRun], natives: list[NativeRun], fallback: dict
) -> pd.DataFrame:
    """Per run: the pooled prediction of t_d from every *other* run of its mechanism.

    Gain-benchmark runs are predicted from the other gamma = 1 runs of the
    mechanism only (so every gamma > 1 number is a prediction from gamma = 1),
    with t_nd and C from the gamma = 1 natives (``accuracy.reference``).
    """
    refs = A.native_refs(natives)
    hosts_of: dict[str, set[str]] = {}
    for n in natives:
        hosts_of.setdefault(n.workload, set()).add(n.host)
    stats = [A.run_stats(r) for r in runs]
    base = {id(s): A.reference(s.run, refs, fallback, hosts_of) for s in stats}
    ids = provenance.set_ids(runs)
    rows = []
    for s in stats:
        r = s.run
        g = A._gamma(r)
        train = [t for t in stats if t is not s and t.run.mechanism == r.mechanism
                 and t.run.host == r.host and A._gamma(t.run) in (None, 1)
                 and (g is None) == (A._gamma(t.run) is None)]  # fmt: skip
        f = A._fit(train, base) if train else None
        ref = base[id(s)]
        pred = A._predict("pooled", s, ref, f) if f else np.nan
        rows.append({
            "workload": r.workload, **provenance.columns(r, ids), "family": A.family(r),
            "gamma": g, "run": r.path.name, "forwarded_calls": s.n_total,
            "t_nd_s": ref.t_nd, "C_s": ref.C, "t_nd_source": ref.source,
            "native_spread": ref.spread, "train_runs": len(train),
            "f_c_train_s": f.pooled if f else np.nan,
            "train_run_ids": ";".join(f.train) if f else "", "measured_t_d_s": r.wall,
            "predicted_t_d_s": pred,
            "rel_error": (pred - r.wall) / r.wall if r.wall > 0 else np.nan,
        })  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- mechanisms side by side


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else np.nan


def fc_side_by_side(fits: pd.DataFrame) -> pd.DataFrame:
    """One row per (host,) mechanism: f_c median and mean with CIs (µs) and ratios to the
    cheapest mechanism *of the same host* (ratios across hosts would compare machines).

    The ratio's interval is conservative: the quotient of the two CIs' ends
    (``lo_a/hi_b`` .. ``hi_a/lo_b``)."""
    if not len(fits):
        return pd.DataFrame()
    hosts = fits["host"] if "host" in fits else pd.Series([""] * len(fits), index=fits.index)
    rows = []
    for host in sorted(set(hosts)):
        part = fits[hosts == host]
        ref = part.loc[part["f_c_median_s"].idxmin()]
        for m in part.itertuples():
            own = m.mechanism == ref.mechanism  # the reference's ratio to itself is exactly 1
            row = {"host": host} if "host" in fits else {}
            row.update({
                "mechanism": m.mechanism, "runs": int(m.runs), "calls": int(m.calls),
                "median (µs)": m.f_c_median_s * 1e6, "median lo": m.f_c_median_lo_s * 1e6,
                "median hi": m.f_c_median_hi_s * 1e6, "mean (µs)": m.f_c_mean_s * 1e6,
                "mean lo": m.f_c_mean_lo_s * 1e6, "mean hi": m.f_c_mean_hi_s * 1e6,
                "ratio to": ref.mechanism,
                "median ratio": _ratio(m.f_c_median_s, ref.f_c_median_s),
                "ratio lo": 1.0 if own else _ratio(m.f_c_median_lo_s, ref.f_c_median_hi_s),
                "ratio hi": 1.0 if own else _ratio(m.f_c_median_hi_s, ref.f_c_median_lo_s),
                "mean ratio": _ratio(m.f_c_mean_s, ref.f_c_mean_s),
            })  # fmt: skip
            rows.append(row)
    return pd.DataFrame(rows)


def per_workload(pred: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Per workload x policy x host x mechanism: t_nd, median measured and predicted t_d,
    S = t_nd/t_d; and the lines refusing to compare a workload and policy whose runs
    forwarded different resolved sets (``compared`` False on those rows)."""
    if not len(pred):
        return pd.DataFrame(), []
    rows = []
    keys = ["workload", "policy", "set", "host", "mechanism"]
    for (w, pol, st, h, m), g in pred.groupby(keys, sort=True):
        t_nd = float(g["t_nd_s"].median())
        meas = float(g["measured_t_d_s"].median())
        p = g["predicted_t_d_s"].dropna()
        pm = float(p.median()) if len(p) else np.nan
        rows.append({
            "workload": w, "policy": pol, "set": st, "host": h, "mechanism": m,
            "runs": len(g), "forwarded_calls": int(g["forwarded_calls"].median()),
            "t_nd_s": t_nd, "measured_t_d_s": meas, "predicted_t_d_s": pm,
            "measured_S": _ratio(t_nd, meas), "predicted_S_r": _ratio(t_nd, pm),
            "mean_abs_rel_error": float(g["rel_error"].abs().mean()),
        })  # fmt: skip
    per = pd.DataFrame(rows)
    per["where"] = per["host"] + " " + per["mechanism"]
    kept, refused = provenance.pool_groups(per, ["workload", "policy"], across="where")
    per["compared"] = per.set_index(["workload", "policy"]).index.isin(
        kept.set_index(["workload", "policy"]).index if len(kept) else []
    )
    return per.drop(columns=["where"]), refused


def mechanism_section(
    runs: list[DelegatedRun], natives: list[NativeRun], fallback: dict, fits: pd.DataFrame
) -> Section:
    """The report's "Mechanisms side by side" section (two or more mechanisms measured)."""
    if not len(fits) or fits["mechanism"].nunique() < 2:
        return Section()
    pred = loo_predictions(runs, natives, fallback)
    side = fc_side_by_side(fits)
    per, refused = per_workload(pred[pred["gamma"].isna()] if len(pred) else pred)
    hosts = sorted({r.host for r in runs})
    md = [
        "## Mechanisms side by side",
        "",
        f"{len(side)} (host, mechanism) pairs measured in this analysis (hosts: "
        f"{', '.join(f'`{h}`' for h in hosts) or '?'}). `…/same-node` is the mktrace module's "
        "kernel thread on the node itself (`kmod-kthread…`) or a relay to a delegate on the same "
        "node over a Unix socket (`…/ipc/same-node`); `…/loopback` a relay to a delegate on "
        "the same node over loopback TCP; `…/remote` a relay to a delegate on another node; "
        "the middle part names the transport. Per call f_c = overhead/2: median "
        "with a distribution-free 95 % CI, mean with a t CI; ratios are to the cheapest "
        "mechanism by median *of the same host* (`ratio to`), the ratio interval is the "
        "quotient of the CIs' ends. The paper's mktrace same-node figure (40 µs, its reported "
        "maximum) is not measured here: it is only the dashed reference line of the figure "
        "below, never a row.",
        "",
        *emulation_note(emulated_hosts(runs, natives)),
        markdown_table(side),
    ]
    if len(per):
        shown = per[per["compared"]].drop(columns=["compared"])
        md += [
            "Per workload and policy (γ = 1): t_nd = median of the measured native runs; "
            "predicted t_d = t_nd + 2·f_c·N with f_c the pooled mean of every *other* run of "
            "the same host and mechanism (leave one run out; N the run's own forwarded calls); "
            "S = t_nd/t_d, measured and predicted (S_r); error = mean |predicted − measured|/"
            "measured over the runs. Rows of one workload and policy are compared only when "
            "they forwarded the same resolved syscall set (`set`).",
            "",
            markdown_table(shown),
            *refused,
            *([""] if refused else []),
        ]
    md += ["Figure: `figures/fc_per_mechanism.png` (per-call f_c per mechanism).", ""]
    return Section({"mechanisms_fc": side, "mechanisms_per_workload": per,
                    "mechanisms_predictions": pred}, md, refused)  # fmt: skip


# ---------------------------------------------------------------- the TLB experiment


def tlb_table(pred: pd.DataFrame) -> pd.DataFrame:
    """Per kthread variant and gamma: runs, f_c (γ = 1 fit), mean and mean |error|."""
    d = pred[pred["gamma"].notna() & pred["mechanism"].str.startswith("kmod-kthread")]
    rows = []
    for (m, g), grp in d.groupby(["mechanism", "gamma"], sort=True):
        e = grp["rel_error"].dropna()
        rows.append({
            "mechanism": m, "gamma": int(g), "runs": len(grp), "predicted_runs": len(e),
            "forwarded_calls": int(grp["forwarded_calls"].median()),
            "f_c_gamma1_us": float(grp["f_c_train_s"].median()) * 1e6,
            "measured_t_d_s": float(grp["measured_t_d_s"].median()),
            "predicted_t_d_s": float(grp["predicted_t_d_s"].median()),
            "mean_error": float(e.mean()) if len(e) else np.nan,
            "mean_abs_error": float(e.abs().mean()) if len(e) else np.nan,
            "native_spread": float(grp["native_spread"].median()),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _growth(t: pd.DataFrame, mech: str) -> tuple[float, int, int]:
    """|error| at the largest predicted gamma minus at the smallest gamma > 1 (or 1)."""
    d = t[(t["mechanism"] == mech) & t["mean_abs_error"].notna()].sort_values("gamma")
    if len(d) < 2:
        return np.nan, 0, 0
    lo, hi = d.iloc[0], d.iloc[-1]
    return float(hi.mean_abs_error - lo.mean_abs_error), int(lo.gamma), int(hi.gamma)


def tlb_verdict(t: pd.DataFrame) -> list[str]:
    """Does a faithful variant's error grow with gamma beyond the default's?"""
    mechs = sorted(t["mechanism"].unique()) if len(t) else []
    default = [m for m in mechs if "faithful" not in m]
    out = []
    for d in default:
        gd, g0, g1 = _growth(t, d)
        if not np.isfinite(gd):
            continue
        spread = float(t[(t["mechanism"] == d) & (t["gamma"] == g1)]["native_spread"].median())
        noise = max(spread if np.isfinite(spread) else 0.0, MIN_GROWTH)
        for f in (
            m for m in mechs if "faithful" in m and m.partition("/")[2] == d.partition("/")[2]
        ):
            gf, _, _ = _growth(t, f)
            if not np.isfinite(gf):
                continue
            extra = gf - gd
            if gf <= noise:
                verdict = ("the flushes do not explain the error growth here: with them the "
                           "error does not grow by more than the threshold")  # fmt: skip
            elif extra > noise:
                verdict = (f"the flushes add {extra:+.1%} of error growth beyond the default's: "
                           "they explain that part of it here")  # fmt: skip
            else:
                verdict = ("the flushes do not explain the error growth here: the default, "
                           "which flushes nothing, grows within the threshold of it")  # fmt: skip
            out.append(
                f"- `{f}` vs `{d}`: mean |error| grows by {gf:+.1%} from γ = {g0} to γ = {g1} "
                f"with the flushes and by {gd:+.1%} without (threshold {noise:.1%}: the "
                f"natives' spread at γ = {g1}, at least {MIN_GROWTH:.0%}): {verdict}."
            )
    return out


def tlb_section(runs: list[DelegatedRun], natives: list[NativeRun], fallback: dict) -> Section:
    """The report's "TLB experiment" section (gain runs under >= 2 kthread variants)."""
    gain = [r for r in runs if r.gamma is not None and r.meta.get("mode") == "kthread"]
    if len({r.mechanism for r in gain}) < 2 or not any("faithful" in r.mechanism for r in gain):
        return Section()
    pred = loo_predictions(gain, natives, fallback)
    t = tlb_table(pred)
    emulated = emulated_hosts(gain, natives)
    md = [
        "## TLB experiment (kernel thread: default vs mktrace-faithful)",
        "",
        "The gain benchmark under the module's kernel thread, default (no `mm` borrowed, no "
        "flush) and mktrace-faithful (`kthread_use_mm` of the caller, `__flush_tlb_all()` on "
        "the delegate's CPU on both legs; `-flushcaller`: the caller's CPU flushed too, before "
        "and after every call). Each run's t_d is predicted from γ = 1 only: f_c the pooled "
        "mean of the other γ = 1 runs of the same variant, t_nd and C from the γ = 1 natives "
        "(`t_d = C/γ + (t_nd − C) + 2·f_c·N`). The paper attributes its model's growing error "
        "at large γ to mktrace's TLB flushes; if so, the faithful variants' error grows with γ "
        "and the default's does not.",
        "",
        *emulation_note(emulated),
        markdown_table(t),
    ]
    verdict = tlb_verdict(t)
    md += (verdict or ["- Not enough γ values predicted to compare error growth."]) + [""]
    if emulated:
        md += [
            "What TCG cannot show: QEMU emulates the TLB in software, so a flush empties QEMU's "
            "soft TLB and the refills are emulator work, not page walks; hardware page-walk "
            "caches, PCID-tagged entries, the cost of refilling a real TLB and cross-CPU "
            "shootdown IPIs are not represented. Whether the flushes explain the error growth "
            "on hardware needs the same plan run on a node that loads the module "
            "(`testbed experiment playbooks/plans/tlb.yml`).",
            "",
        ]
    return Section({"tlb_experiment": t, "tlb_predictions": pred}, md)
