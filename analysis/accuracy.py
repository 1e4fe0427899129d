"""Model accuracy: several predictors of ``t_d``, each judged on runs it was not fitted on.

Predictors (equations in :mod:`analysis.model`), fitted on a *training* set
of delegated runs of the same mechanism and used on a *test* run::

    pooled        F = 2 f_c N                  f_c = mean per-call f_c of the training calls
    per_syscall   F = 2 sum_s f_c(s) N(s)      f_c(s) per syscall (pooled where seen < 100 times)
    size          F = 2 (alpha N + beta B)     least squares f_c = alpha + beta bytes
    whole_run     F = f_c' 2N                  f_c' = slope of whole-run wall times
    <p>+fixed     the above plus k, the median residual of <p> on the training runs
                  (a per-run cost such as launch and filter install)
    <p>@paired    t_nd = the native run made just before this run (same workload,
                  same gamma: ``testbed experiment`` interleaves them), so drift of
                  the machine hits both; not a prediction from gamma = 1

and ``t_d = C/gamma + (t_nd - C) + F (+ k)`` (``model.t_d_from_native``) with
``N``, ``N(s)``, ``B`` the test run's own forwarded calls and bytes.

Native time: the median of the measured native runs of the same workload on
the same host.  A run of the gain benchmark at gain gamma is predicted from
the gamma = 1 natives only: ``C`` = the median of wall x user/(user + sys),
``t_nd - C`` the rest.  Without measured natives the fallbacks of :func:`compare.native_times`
apply, and the row is flagged.

Cross-validation schemes (training set for a test run; gain runs train on
gamma = 1 only):

    policy       the runs of every *other* policy (forwarded set)
    workload     the runs of every *other* workload
    repetition   the runs of the *previous* repetition (fit on r-1, predict r)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import fit
from analysis import model as M
from analysis.compare import DelegatedRun, NativeRun, Profile, profile_key
from testbed.errors import TestbedError
from testbed.rundir import derived, usable

BASE = ("pooled", "per_syscall", "size", "whole_run")
PREDICTORS = (*BASE, *(f"{p}+fixed" for p in BASE), *(f"{p}@paired" for p in BASE))
SCHEMES = ("policy", "workload", "repetition")
#: f_c(s) of a syscall seen fewer times in training falls back to the pooled mean
#: (a mean of a handful of heavy-tailed samples predicts worse than the pool).
MIN_CALLS_PER_SYSCALL = 100
_GAIN_NAME = re.compile(r"^(?P<family>.+)-g(?P<gamma>\d+)$")


@dataclass
class RunStats:
    """Sufficient statistics of one delegated run's per-call records."""

    run: DelegatedRun
    n_total: int
    n_by_nr: dict[int, int]
    bytes_total: float
    # usable f_c samples: count, sum, sum of size, size^2, size*f
    k: int
    sf: float
    sx: float
    sxx: float
    sxf: float
    f_by_nr: dict[int, tuple[int, float]] = field(default_factory=dict)


def run_stats(r: DelegatedRun) -> RunStats:
    calls = np.asarray(r.calls)
    nrs, counts = np.unique(calls["nr"], return_counts=True) if len(calls) else ([], [])
    n_by_nr = {int(a): int(b) for a, b in zip(nrs, counts, strict=True)}
    total = int(len(calls)) or r.forwarded_calls
    bytes_total = float(calls["bytes_in"].sum() + calls["bytes_out"].sum()) if len(calls) else 0.0
    f, x = fit.fc_samples(calls, str(r.meta.get("mode") or "cost"))
    f_by_nr: dict[int, tuple[int, float]] = {}
    if len(calls):
        d = derived(calls)
        ok = usable(calls, d)
        for nr in n_by_nr:
            sel = ok & (calls["nr"] == nr)
            f_by_nr[nr] = (int(sel.sum()), float(d["f_c"][sel].sum() / 1e9))
    return RunStats(r, total, n_by_nr, bytes_total, len(f), float(f.sum()), float(x.sum()),
                    float((x * x).sum()), float((x * f).sum()), f_by_nr)  # fmt: skip


def family(r: DelegatedRun | NativeRun) -> str:
    """The workload without its gain suffix (``gain-g4`` -> ``gain``)."""
    m = _GAIN_NAME.match(r.workload)
    return m["family"] if m and getattr(r, "gamma", None) is not None else r.workload


def _gamma(r) -> int | None:
    g = r.cell.get("gamma") if r.cell else None
    return int(g) if g is not None else None


# ---------------------------------------------------------------- native references


@dataclass(frozen=True)
class NativeRef:
    t_nd: float
    C: float
    source: str
    spread: float  # (max - min) / median of the native walls used (noise)
    flag: str = ""


def native_refs(natives: list[NativeRun]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{key: (wall times, computation times)}`` of the measured native runs.

    Computation ``C`` of one run = wall x user/(user + sys): the wall time split
    as the CPU time is.  (User time alone is not C on a shared machine: waiting
    for a CPU stretches the computation's wall time, and shrinks with it.)
    """
    acc: dict[str, list[tuple[float, float]]] = {}
    for n in natives:
        if int(n.meta.get("exit_status") or 0) == 0:
            cpu = n.user + float(n.meta.get("sys_s") or 0.0)
            acc.setdefault(n.key, []).append((n.wall, n.wall * n.user / cpu if cpu > 0 else 0.0))
    return {k: (np.array([a for a, _ in v]), np.array([b for _, b in v])) for k, v in acc.items()}


def wall_per_cpu(natives: list[NativeRun]) -> dict[str, float]:
    """Median wall / (user + sys) of the natives of each key: ~1 for a CPU-bound
    program on an idle machine, more when other processes took its CPU."""
    acc: dict[str, list[float]] = {}
    for n in natives:
        cpu = n.user + float(n.meta.get("sys_s") or 0.0)
        if cpu > 0:
            acc.setdefault(n.key, []).append(n.wall / cpu)
    return {k: float(np.median(v)) for k, v in acc.items()}


def reference(r: DelegatedRun, refs: dict, fallback: dict, hosts_of: dict) -> NativeRef:
    """The native time (and C) a run is predicted from; flagged when not measured here."""
    g = _gamma(r)
    key = r.key if g is None else f"{family(r)}-g1 @ {r.host}" if r.host else f"{family(r)}-g1"
    if key in refs:
        w, u = refs[key]
        t_nd, med = float(np.median(w)), float(np.median(w))
        spread = float((w.max() - w.min()) / med) if med > 0 else np.nan
        if g is None:
            return NativeRef(t_nd, 0.0, f"measured native ({len(w)} runs)", spread)
        C = float(np.median(u))
        return NativeRef(t_nd, C, f"gamma=1 native ({len(w)} runs), C = wall·user/(user+sys)",
                         spread)  # fmt: skip
    other = sorted(h for h in hosts_of.get(key.split(" @ ")[0], ()) if h != r.host)
    flag = f"natives only from host(s) {', '.join(other)}: not used; " if other else ""
    if g is not None:
        return NativeRef(np.nan, np.nan, "none", np.nan, flag + "no gamma=1 native runs")
    t, src = fallback.get(r.key, (np.nan, "none"))
    return NativeRef(t, 0.0, src, np.nan, flag + f"no measured native runs; t_nd from {src}")


# ---------------------------------------------------------------- fitting on a training set


@dataclass(frozen=True)
class Fitted:
    pooled: float
    per_nr: dict[int, float]
    alpha: float
    beta: float
    whole: float
    fixed: dict[str, float]


def _fit(train: list[RunStats], base: dict[int, NativeRef]) -> Fitted | None:
    k = sum(s.k for s in train)
    if k == 0:
        return None
    sf = sum(s.sf for s in train)
    pooled = sf / k
    per: dict[int, list[float]] = {}
    for s in train:
        for nr, (c, tot) in s.f_by_nr.items():
            a = per.setdefault(nr, [0, 0.0])
            a[0] += c
            a[1] += tot
    per_nr = {nr: tot / c for nr, (c, tot) in per.items() if c >= MIN_CALLS_PER_SYSCALL}
    sx, sxx, sxf = (sum(getattr(s, a) for s in train) for a in ("sx", "sxx", "sxf"))
    var = sxx - sx * sx / k
    if var > 0:
        beta = (sxf - sx * sf / k) / var
        alpha = (sf - beta * sx) / k
    else:
        alpha, beta = pooled, 0.0
    obs = []
    for s in train:
        ref = base[id(s)]
        if np.isfinite(ref.t_nd):
            obs.append({"workload": s.run.key, "t_d": s.run.wall, "x": 2.0 * s.n_total})
            obs.append({"workload": s.run.key, "t_d": ref.t_nd, "x": 0.0})
    whole = np.nan
    if obs:
        try:
            whole = fit.whole_run(pd.DataFrame(obs).drop_duplicates()).f_c.value
        except (TestbedError, np.linalg.LinAlgError):  # not identifiable: no such predictor
            whole = np.nan
    f = Fitted(pooled, per_nr, alpha, beta, whole, {})
    for p in BASE:
        res = [s.run.wall - _predict(p, s, base[id(s)], f) for s in train]
        res = [x for x in res if np.isfinite(x)]
        f.fixed[p] = float(np.median(res)) if res else np.nan
    return f


def _forwarding(p: str, s: RunStats, f: Fitted) -> float:
    if p == "pooled":
        return float(M.forwarding_time(s.n_total, f.pooled))
    if p == "per_syscall":
        nrs = list(s.n_by_nr)
        n = [s.n_by_nr[x] for x in nrs]
        fc = [f.per_nr.get(x, f.pooled) for x in nrs]
        return float(M.forwarding_time(n, fc))
    if p == "size":
        return float(M.forwarding_time_sized(s.n_total, s.bytes_total, f.alpha, f.beta))
    if p == "whole_run":
        return float(M.forwarding_time(s.n_total, f.whole))
    raise ValueError(p)


def _predict(p: str, s: RunStats, ref: NativeRef, f: Fitted, paired: float = np.nan) -> float:
    if p.endswith("@paired"):
        return float(M.t_d_from_native(paired, 0.0, 1.0, _forwarding(p[:-7], s, f)))
    base, _, fixed = p.partition("+")
    k = f.fixed.get(base, np.nan) if fixed else 0.0
    gamma = _gamma(s.run) or 1
    return float(M.t_d_from_native(ref.t_nd, ref.C, gamma, _forwarding(base, s, f), k))


def _training(scheme: str, s: RunStats, stats: list[RunStats]) -> list[RunStats]:
    r = s.run

    def eligible(t: RunStats) -> bool:
        g = _gamma(t.run)
        return t is not s and t.run.mechanism == r.mechanism and g in (None, 1)

    if scheme == "policy":
        return [t for t in stats if eligible(t) and t.run.group != r.group]
    if scheme == "workload":
        return [t for t in stats if eligible(t) and family(t.run) != family(r)]
    if scheme == "repetition":
        if r.repetition is None:
            return []
        return [t for t in stats if eligible(t) and t.run.repetition == r.repetition - 1]
    raise ValueError(scheme)


def cpu_share(r: DelegatedRun, who: str) -> float:
    """CPU seconds of the relay or delegate during the run, per second of the run."""
    cpu = r.cell.get("cpu") if isinstance(r.cell.get("cpu"), dict) else {}
    v = cpu.get(f"{who}_cpu_s")
    m = r.meta.get("cpu") or {}
    if v is None and who == "relay" and "relay_user_s" in m:
        v = float(m["relay_user_s"]) + float(m.get("relay_sys_s") or 0.0)
    if v is None and who == "delegate":  # its stats replies, recorded by the relay
        v = m.get("delegate_cpu_s")
    return float(v) / r.wall if v is not None and r.wall > 0 else np.nan


def delegate_cpus_shared(r: DelegatedRun) -> str:
    """Which CPUs the delegate shared with the program: "0,1", "none", "other kernel", "–"."""
    cpu = r.cell.get("cpu") if isinstance(r.cell.get("cpu"), dict) else {}
    m = r.meta.get("cpu") or {}
    if cpu.get("delegate_same_kernel", m.get("delegate_same_kernel")) is False:
        return "other kernel"
    v = cpu.get("delegate_shared_cpus", m.get("delegate_shared_cpus"))
    if v is None:
        return "–"
    return ",".join(str(c) for c in v) if v else "none"


def _shared(r: DelegatedRun) -> object:
    cpu = r.cell.get("cpu") if isinstance(r.cell.get("cpu"), dict) else {}
    v = cpu.get("relay_shares_program_cpus")
    if v is None:
        m = r.meta.get("cpu") or {}
        a, b = m.get("relay_cpus"), m.get("program_cpus")
        v = bool(set(a) & set(b)) if a and b else None
    return "–" if v is None else ("yes" if v else "no")


def _paired(r: DelegatedRun, native_wall: dict) -> float:
    """Wall time of the native run made just before ``r`` (experiment.json native_run)."""
    rel = r.cell.get("native_run")
    if not rel:
        return np.nan
    return float(native_wall.get((r.path.parent / str(rel)).resolve(), np.nan))


def predictions(runs: list[DelegatedRun], natives: list[NativeRun], fallback: dict) -> pd.DataFrame:
    """One row per (scheme, test run) with every predictor's prediction and error."""
    refs = native_refs(natives)
    hosts_of: dict[str, set[str]] = {}
    for n in natives:
        hosts_of.setdefault(n.workload, set()).add(n.host)
    stats = [run_stats(r) for r in runs]
    base = {id(s): reference(s.run, refs, fallback, hosts_of) for s in stats}
    native_wall = {n.path.resolve(): n.wall for n in natives}
    stretch = wall_per_cpu(natives)
    paired = {id(s): _paired(s.run, native_wall) for s in stats}
    rows = []
    cache: dict[tuple, Fitted | None] = {}
    for scheme in SCHEMES:
        for s in stats:
            train = _training(scheme, s, stats)
            tkey = tuple(sorted(id(t) for t in train))
            if tkey not in cache:
                cache[tkey] = _fit(train, base) if train else None
            f = cache[tkey]
            ref = base[id(s)]
            r = s.run
            row = {
                "scheme": scheme,
                "workload": r.workload,
                "policy": r.group,
                "gamma": _gamma(r),
                "mechanism": r.mechanism,
                "host": r.host,
                "repetition": r.repetition,
                "run": r.path.name,
                "forwarded_calls": s.n_total,
                "measured": r.wall,
                "t_nd": ref.t_nd,
                "C": ref.C,
                "t_nd_source": ref.source,
                "paired_native_s": paired[id(s)],
                "native_spread": ref.spread,
                "native_wall_per_cpu": stretch.get(r.key, np.nan),
                "train_runs": len(train),
                "f_c_pooled_s": f.pooled if f else np.nan,
                "relay_cpu_share": cpu_share(r, "relay"),
                "delegate_cpu_share": cpu_share(r, "delegate"),
                "relay_shares_program_cpus": _shared(r),
                "delegate_shared_cpus": delegate_cpus_shared(r),
                "flag": ref.flag + ("" if f else f"nothing to train on ({scheme}); "),
            }
            for p in PREDICTORS:
                pred = _predict(p, s, ref, f, paired[id(s)]) if f else np.nan
                row[f"pred_{p}"] = pred
                row[f"err_{p}"] = (pred - r.wall) / r.wall if r.wall > 0 else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def klass(df: pd.DataFrame) -> pd.Series:
    """Target classes: gain benchmark at gamma <= 8, at gamma > 8, other workloads."""
    g = df["gamma"]
    return np.where(g.isna(), "workloads", np.where(g.fillna(0) <= 8, "gain γ≤8", "gain γ>8"))


def summary(pred: pd.DataFrame) -> pd.DataFrame:
    """Mean and max |error| per scheme x class x predictor (finite rows only)."""
    if not len(pred):
        return pd.DataFrame(columns=["scheme", "class", "predictor", "runs", "mean_abs_error",
                                     "max_abs_error", "mean_error"])  # fmt: skip
    d = pred.assign(**{"class": klass(pred)})
    rows = []
    for (scheme, cls), grp in d.groupby(["scheme", "class"], sort=False):
        for p in PREDICTORS:
            e = grp[f"err_{p}"].dropna()
            if len(e):
                rows.append({"scheme": scheme, "class": cls, "predictor": p, "runs": len(e),
                             "mean_abs_error": float(e.abs().mean()),
                             "max_abs_error": float(e.abs().max()),
                             "mean_error": float(e.mean())})  # fmt: skip
    return pd.DataFrame(rows)


def best(pred: pd.DataFrame, scheme: str, paired: bool = True) -> tuple[str, float, float, int]:
    """(predictor, mean |error|, max |error|, runs) of the best predictor of ``scheme``.

    Only predictors available on every run the scheme predicts compete;
    ``paired=False`` leaves out the ``@paired`` ones (predictions from gamma = 1)."""
    d = pred[pred["scheme"] == scheme]
    d = d[d["pred_pooled"].notna()]
    if not len(d):
        return ("", np.nan, np.nan, 0)
    cands = []
    for p in PREDICTORS if paired else [p for p in PREDICTORS if "@" not in p]:
        e = d[f"err_{p}"]
        if e.notna().all():
            cands.append((float(e.abs().mean()), float(e.abs().max()), p))
    m, mx, p = min(cands)
    return p, m, mx, len(d)


def headline_scheme(pred: pd.DataFrame) -> str:
    """policy if it predicts anything, else repetition, else workload."""
    for s in ("policy", "repetition", "workload"):
        if len(pred) and pred[(pred["scheme"] == s)]["pred_pooled"].notna().any():
            return s
    return "policy"


def model_accuracy(pred: pd.DataFrame, scheme: str, predictor: str) -> pd.DataFrame:
    """The ``tables/model_accuracy.csv`` rows: one per run of the headline scheme."""
    d = pred[pred["scheme"] == scheme].copy()
    d["best_predictor"] = predictor
    d["predicted"] = d[f"pred_{predictor}"] if predictor else np.nan
    d["rel_error"] = d[f"err_{predictor}"] if predictor else np.nan
    lead = ["workload", "policy", "gamma", "measured", *[f"pred_{p}" for p in PREDICTORS],
            "best_predictor", "predicted", "rel_error", "relay_cpu_share", "delegate_cpu_share",
            "relay_shares_program_cpus", "delegate_shared_cpus", "t_nd", "C", "t_nd_source",
            "paired_native_s", "native_spread", "native_wall_per_cpu",
            "mechanism", "host", "repetition", "run", "forwarded_calls", "train_runs",
            "f_c_pooled_s", *[f"err_{p}" for p in PREDICTORS], "scheme", "flag"]  # fmt: skip
    return d[lead].reset_index(drop=True)


def error_terms(acc: pd.DataFrame) -> pd.DataFrame:
    """Per class, the size of each candidate error term next to the error itself.

    noise: spread of the native runs (and their wall/CPU ratio: other processes
    taking the CPU); interference: relay and delegate CPU share, the
    correlation of the error with the relay's and the error below / above a
    relay share of 20 %; launch: the fixed per-run term relative
    to t_d; per-syscall and size: how far those predictors move from pooled.
    """
    if not len(acc) or acc["predicted"].isna().all():
        return pd.DataFrame()
    d = acc.assign(**{"class": klass(acc)})
    rows = []
    for cls, g in d.groupby("class", sort=False):
        g = g[g["rel_error"].notna()]
        if not len(g):
            continue
        share = g["relay_cpu_share"]
        corr = (
            float(np.corrcoef(share, g["rel_error"])[0, 1])
            if share.notna().all() and len(g) > 2 and share.std() > 0 and g["rel_error"].std() > 0
            else np.nan
        )
        m = g["measured"]
        rows.append({
            "class": cls,
            "runs": len(g),
            "mean_abs_error": float(g["rel_error"].abs().mean()),
            "mean_error (bias)": float(g["rel_error"].mean()),
            "noise: native spread (max-min)/median": float(g["native_spread"].mean()),
            "contention: native wall/CPU": float(g["native_wall_per_cpu"].mean()),
            "interference: relay CPU share": float(share.mean()),
            "corr(error, relay share)": corr,
            "|error| at relay share < 20 %": float(g["rel_error"][share < 0.2].abs().mean()),
            "|error| at relay share ≥ 20 %": float(g["rel_error"][share >= 0.2].abs().mean()),
            "interference: delegate CPU share": float(g["delegate_cpu_share"].mean()),
            "launch: |fixed term|/t_d": float(((g["pred_pooled+fixed"] - g["pred_pooled"]).abs()
                                                / m).mean()),
            "per-syscall vs pooled": float(((g["pred_per_syscall"] - g["pred_pooled"]).abs()
                                             / m).mean()),
            "size-aware vs pooled": float(((g["pred_size"] - g["pred_pooled"]).abs() / m).mean()),
        })  # fmt: skip
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the gain sweep (Fig. 13)


def _gain_profile(profiles: list[Profile], fam: str, host: str) -> Profile | None:
    want = f"{fam}-g1 @ {host}" if host else f"{fam}-g1"
    for p in profiles:
        if profile_key(p) == want:
            return p
    return None


def gain_speedups(
    runs: list[DelegatedRun], natives: list[NativeRun], profiles: list[Profile]
) -> pd.DataFrame:
    """Fig. 13 data: per (family, host, mechanism, forwarded set, gamma) the measured
    speedup ``t_nd(gamma=1) / t_d(gamma)`` (median, CI from the min/max ratio of the
    order-statistic CIs), the naive ``S_n`` and the refined ``S_r``, both predicted
    from the gamma = 1 native runs and profile and the pooled f_c fitted on the
    gamma = 1 forwarded runs only.  Also one ``native`` series: ``t_nd(1)/t_nd(gamma)``.
    """
    refs = native_refs(natives)
    gr = [r for r in runs if _gamma(r) is not None]
    rows = []
    groups: dict[tuple, list[DelegatedRun]] = {}
    for r in gr:
        groups.setdefault((family(r), r.host, r.mechanism), []).append(r)
    for (fam, host, mech), rs in sorted(groups.items()):
        key1 = f"{fam}-g1 @ {host}" if host else f"{fam}-g1"
        if key1 not in refs:
            continue
        w1, u1 = refs[key1]
        t1, C = float(np.median(w1)), float(np.median(u1))
        t1_ci = fit.median_ci(w1)
        G = t1 - C
        train = [run_stats(r) for r in rs if _gamma(r) == 1]
        k = sum(s.k for s in train)
        f_c = sum(s.sf for s in train) / k if k else np.nan
        prof = _gain_profile(profiles, fam, host)
        gammas = sorted({_gamma(r) for r in rs})
        p = G / t1 if t1 > 0 else np.nan
        for g in gammas:
            key = f"{fam}-g{g} @ {host}" if host else f"{fam}-g{g}"
            if key in refs:
                wn = refs[key][0]
                ci = fit.median_ci(wn)
                rows.append({"family": fam, "host": host, "mechanism": mech, "set": "native",
                             "gamma": g, "runs": len(wn),
                             "measured": t1 / float(np.median(wn)),
                             "measured_lo": t1_ci.lo / ci.hi, "measured_hi": t1_ci.hi / ci.lo,
                             "S_n": float(M.S_n(p, g)), "S_r": float(M.S_n(p, g)),
                             "f_c_s": 0.0})  # fmt: skip
        sets: dict[str, list[DelegatedRun]] = {}
        for r in rs:
            sets.setdefault(r.group, []).append(r)
        for label, srs in sorted(sets.items()):
            one = [r for r in srs if _gamma(r) == 1] or srs
            nrs = sorted({int(x) for r in one for x in (r.meta.get("forwarded_nrs") or [])})
            if prof is not None:
                b = np.isin(prof.nrs, nrs).astype(float)
                n = prof.n
                gsum = float(prof.g.sum())
                gv = prof.g * (G / gsum) if gsum > 0 else np.full(len(n), G / max(len(n), 1))
            else:  # no profile: the gamma = 1 runs' own forwarded count
                n = np.array([float(np.median([r.forwarded_calls for r in one])), 0.0])
                b = np.array([1.0, 0.0])
                gv = np.array([0.0, G])
            for g in sorted({_gamma(r) for r in srs}):
                walls = np.array([r.wall for r in srs if _gamma(r) == g])
                ci = fit.median_ci(walls)
                rows.append({"family": fam, "host": host, "mechanism": mech, "set": label,
                             "gamma": g, "runs": len(walls),
                             "measured": t1 / float(np.median(walls)),
                             "measured_lo": t1_ci.lo / ci.hi, "measured_hi": t1_ci.hi / ci.lo,
                             "S_n": float(M.S_n(p, g)),
                             "S_r": float(M.S_r(C, gv, n, b, g, f_c)),
                             "f_c_s": f_c})  # fmt: skip
    out = pd.DataFrame(rows)
    if len(out):
        out["S_r_rel_error"] = out["S_r"] / out["measured"] - 1.0
        out["S_n_rel_error"] = out["S_n"] / out["measured"] - 1.0
    return out


def gain_profile_frame(profiles: list[Profile]) -> pd.DataFrame:
    """Fig. 12 data: n(s) and share of the gain benchmark's gamma = 1 profile(s)."""
    rows = []
    for p in profiles:
        cell = p.meta.get("experiment") or {}
        if cell.get("gamma") != 1:
            continue
        total = float(p.n.sum())
        for name, k in sorted(zip(p.names, p.n, strict=True), key=lambda t: -t[1]):
            if k > 0:
                rows.append({"workload": p.name, "syscall": name, "n": int(k),
                             "share": k / total if total else np.nan})  # fmt: skip
    return pd.DataFrame(rows, columns=["workload", "syscall", "n", "share"])


# ---------------------------------------------------------------- report section


@dataclass
class Section:
    """What ``testbed analyze`` adds: tables, figure data and Markdown."""

    tables: dict[str, pd.DataFrame]
    headline: list[str]
    body: list[str]
    fig12: pd.DataFrame
    fig13: pd.DataFrame


def _pct(v: float) -> str:
    return "–" if v != v else f"{v:.1%}"


def analyse(
    profiles: list[Profile], runs: list[DelegatedRun], natives: list[NativeRun], fallback: dict,
    markdown_table,
) -> Section:  # fmt: skip
    """Every predictor under every scheme, model_accuracy, error terms, gain sweep."""
    pred = predictions(runs, natives, fallback) if runs else pd.DataFrame()
    scheme = headline_scheme(pred)
    name, mean, mx, n = best(pred, scheme) if len(pred) else ("", np.nan, np.nan, 0)
    acc = model_accuracy(pred, scheme, name) if len(pred) else pd.DataFrame()
    summ = summary(pred)
    terms = error_terms(acc) if len(acc) else pd.DataFrame()
    fig13 = gain_speedups(runs, natives, profiles)
    fig12 = gain_profile_frame(profiles)
    flagged = int((acc["flag"].astype(str) != "").sum()) if len(acc) else 0
    uses_intercept = (
        bool(acc["t_nd_source"].astype(str).str.contains("intercept").any()) if len(acc) else False
    )
    if n:
        headline = [
            f"**Model accuracy: mean |error| {_pct(mean)}, max {_pct(mx)}** over {n} runs — "
            f"best predictor `{name}`, each run predicted with parameters fitted on other runs "
            f"(cross-validation by {scheme}; `tables/model_accuracy.csv`).",
        ]
        name1, mean1, mx1, _ = best(pred, scheme, paired=False)
        for label, pname in ((name, name), (f"{name1} (from γ = 1 / median natives)", name1)):
            if label != name and name1 == name:
                continue
            if label != name:
                headline.append(
                    f"Best predictor not using the paired natives: `{name1}`, mean |error| "
                    f"{_pct(mean1)}, max {_pct(mx1)}."
                )
            sel = summ[(summ["scheme"] == scheme) & (summ["predictor"] == pname)]
            for cls, g in sel.groupby("class", sort=False):
                r = g.iloc[0]
                headline.append(
                    f"- `{pname}`, {cls}: mean |error| {_pct(r.mean_abs_error)}, max "
                    f"{_pct(r.max_abs_error)}, bias {r.mean_error:+.1%} ({int(r.runs)} runs)"
                )
        if flagged:
            headline.append(f"- {flagged} row(s) flagged (see the `flag` column)")
        if uses_intercept:
            headline.append("- some t_nd come from the whole-run fit intercept (flagged rows)")
        headline.append("")
    else:
        headline = ["**Model accuracy: no run could be predicted from other runs** "
                    "(needs delegated runs of at least two policies, workloads or repetitions "
                    "of one mechanism).", ""]  # fmt: skip
    body = [
        "## Model accuracy (cross-validated)",
        "",
        "Predictors: `pooled` 2·f_c·N with the mean per-call f_c; `per_syscall` 2·Σ f_c(s)·N(s); "
        "`size` 2·(α·N + β·bytes); `whole_run` the slope of wall times over 2·N; `+fixed` adds "
        "the median residual of the training runs (a per-run term); `@paired` uses the native "
        "run made just before as t_nd (same γ: drift shared, not a γ = 1 prediction). "
        "t_d = C/γ + (t_nd − C) + "
        "forwarding (+ k), t_nd = median of measured native runs of the same workload on the "
        "same host (gain runs: the γ = 1 natives, C = wall·user/(user+sys)). Schemes: `policy` fits "
        "on the other policies' runs, `workload` on the other workloads', `repetition` on the "
        "previous repetition's; gain runs train on γ = 1 only.",
        "",
        "Mean and max |error| per scheme, target class and predictor:",
        "",
        markdown_table(summ),
        "Error terms next to the error (headline predictor): native spread (noise), relay CPU "
        "share and its correlation with the error (interference), the fixed per-run term "
        "(launch), and how far per-syscall and size-aware predictions move from pooled:",
        "",
        markdown_table(terms),
        "Per-syscall f_c(s) (mean with t CI; `tables/fc_per_syscall.csv`): see the CSV.",
        "",
        "Per run (headline scheme; relay / delegate CPU share = CPU seconds of the relay / the "
        "whole delegate process, every client it served, per second of the run, the delegate's "
        "from its `stats` replies wherever it runs; delegate_shared_cpus = the CPUs it could "
        "share with the program, `other kernel` when it runs on another machine):",
        "",
        markdown_table(
            acc[
                [
                    "workload",
                    "policy",
                    "gamma",
                    "measured",
                    "predicted",
                    "rel_error",
                    "relay_cpu_share",
                    "delegate_cpu_share",
                    "relay_shares_program_cpus",
                    "delegate_shared_cpus",
                    "t_nd_source",
                    "flag",
                ]
            ]
            if len(acc)
            else acc
        ),  # fmt: skip
    ]
    fwd13 = fig13[fig13["set"] != "native"] if len(fig13) else fig13
    if len(fwd13):
        for lo, hi, label in ((1, 8, "γ ≤ 8"), (9, 10**9, "γ > 8")):
            sel = fwd13[(fwd13["gamma"] >= lo) & (fwd13["gamma"] <= hi)]
            if len(sel):
                headline.insert(len(headline) - 1, (
                    f"- Fig. 13 (median speedup per set and γ, {label}, {len(sel)} points): "
                    f"refined S_r mean |error| {_pct(sel['S_r_rel_error'].abs().mean())}, max "
                    f"{_pct(sel['S_r_rel_error'].abs().max())}; naive S_n mean |error| "
                    f"{_pct(sel['S_n_rel_error'].abs().mean())}"
                ))  # fmt: skip
    if len(fig13):
        body += [
            "## Gain benchmark (Figs. 12-13)",
            "",
            "Speedup t_nd(γ=1)/t(γ), measured (median over repetitions, CI from the order-"
            "statistic CIs of both medians) vs naive S_n (p = (t_nd − C)/t_nd at γ = 1) and "
            "refined S_r from the γ = 1 native runs and profile and the pooled f_c fitted on the "
            "γ = 1 forwarded runs only.",
            "",
            markdown_table(fig13),
        ]
    tables = {"model_accuracy": acc, "model_accuracy_all_schemes": pred,
              "fc_per_syscall": per_syscall_fc(runs),
              "model_accuracy_summary": summ, "error_terms": terms,
              "gain_speedup": fig13, "gain_profile": fig12}  # fmt: skip
    return Section(tables, headline, body, fig12, fig13)


def per_syscall_fc(runs: list[DelegatedRun], level: float = 0.95) -> pd.DataFrame:
    """Per mechanism and syscall: calls, mean f_c(s) with its t CI, median (s)."""
    from testbed.syscalls import name_of

    rows = []
    by: dict[tuple[str, int], list[np.ndarray]] = {}
    for r in runs:
        calls = np.asarray(r.calls)
        if not len(calls):
            continue
        for nr in np.unique(calls["nr"]):
            f, _ = fit.fc_samples(calls[calls["nr"] == nr], str(r.meta.get("mode") or "cost"))
            by.setdefault((r.mechanism, int(nr)), []).append(f)
    for (mech, nr), parts in sorted(by.items()):
        f = np.concatenate(parts)
        m = fit.mean_ci(f, level)
        rows.append({"mechanism": mech, "syscall": name_of(nr), "nr": nr, "calls": len(f),
                     "f_c_mean_s": m.value, "f_c_mean_lo_s": m.lo, "f_c_mean_hi_s": m.hi,
                     "f_c_median_s": float(np.median(f)) if len(f) else np.nan})  # fmt: skip
    return pd.DataFrame(rows, columns=["mechanism", "syscall", "nr", "calls", "f_c_mean_s",
                                       "f_c_mean_lo_s", "f_c_mean_hi_s", "f_c_median_s"])  # fmt: skip
