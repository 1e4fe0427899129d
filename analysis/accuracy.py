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

from analysis import fit, offload_model, provenance
from analysis import model as M
from analysis.compare import DelegatedRun, NativeRun, Profile, profile_key
from analysis.tables import markdown_table
from testbed.core import mechanisms
from testbed.core.errors import TestbedError
from testbed.core.predictors import ALL_PREDICTORS, BASE, DEFAULT_PREDICTOR, PREDICTORS
from testbed.core.rundir import derived, usable
from testbed.core.syscalls import name_of

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
    """The workload without its gain suffix (``gainbench-g4`` -> ``gainbench``).

    Runs of the gain benchmark made before it was named gainbench are
    ``gain-g<G>``: their family is ``gain``, read and analysed as before.
    """
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
    floor: float = np.nan  # mean |w_i / median(the others) - 1| of those natives


def native_floor(w: np.ndarray) -> float:
    """How well native runs predict each other: the mean over runs of |wall / median of
    the *other* runs' walls - 1| (at least 3 runs, else NaN).  A prediction of a
    forwarded run built on t_nd = the natives' median inherits this error on average,
    so no model of t_d from t_nd is expected to do better (a noise floor)."""
    if len(w) < 3:
        return np.nan
    return float(np.mean([abs(w[i] / np.median(np.delete(w, i)) - 1) for i in range(len(w))]))


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
        floor = native_floor(w)
        if g is None:
            return NativeRef(t_nd, 0.0, f"measured native ({len(w)} runs)", spread, floor=floor)
        C = float(np.median(u))
        return NativeRef(t_nd, C, f"gamma=1 native ({len(w)} runs), C = wall·user/(user+sys)",
                         spread, floor=floor)  # fmt: skip
    other = sorted(h for h in hosts_of.get(key.split(" @ ")[0], ()) if h != r.host)
    flag = f"natives only from host(s) {', '.join(other)}: not used" if other else ""
    if g is not None:
        return NativeRef(np.nan, np.nan, "none", np.nan, flags(flag, "no gamma=1 native runs"))
    t, src = fallback.get(r.key, (np.nan, "none"))
    own = IN_SAMPLE if "intercept" in src else ""  # that fit included this run's wall time
    return NativeRef(t, 0.0, src, np.nan,
                     flags(flag, f"no measured native runs; t_nd from {src}", own))  # fmt: skip


#: The label of every number whose fit includes the run it is compared with.
IN_SAMPLE = "in-sample (fit includes this run)"


def flags(*parts: str) -> str:
    """A row's flags, one after the other, separated by "; " (never run together)."""
    return "; ".join(p.strip().rstrip(";").strip() for p in parts if p and p.strip())


# ---------------------------------------------------------------- fitting on a training set


@dataclass(frozen=True)
class Fitted:
    """Every predictor's parameters, fitted on the runs ``train`` (``host/run`` names)."""

    pooled: float
    per_nr: dict[int, float]
    alpha: float
    beta: float
    whole: float
    fixed: dict[str, float]
    train: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


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
    names = tuple(sorted(run_name(t.run) for t in train))
    groups = tuple(sorted({t.run.group for t in train}))
    f = Fitted(pooled, per_nr, alpha, beta, whole, {}, names, groups)
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


def run_name(r) -> str:
    """``host/run``: a run named so that two nodes' runs of one cell stay apart."""
    return f"{r.host}/{r.path.name}" if r.host else r.path.name


def _training(scheme: str, s: RunStats, stats: list[RunStats]) -> list[RunStats]:
    """The runs of ``stats`` a run is predicted from under ``scheme``: same host and
    mechanism (f_c belongs to one path), gamma = 1 or none, never the run itself."""
    r = s.run

    def eligible(t: RunStats) -> bool:
        g = _gamma(t.run)
        return (t is not s and t.run.mechanism == r.mechanism and t.run.host == r.host
                and g in (None, 1))  # fmt: skip

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


def _kind(r) -> str:
    return "gain" if _gamma(r) is not None else "workload"


@dataclass(frozen=True)
class Choice:
    """The predictor used for one test run and how it was chosen (never on that run)."""

    predictor: str
    how: str  # "declared", "inner cross-validation", "default"
    inner_runs: int = 0  # training runs the inner cross-validation predicted
    inner_error: float = np.nan  # the chosen predictor's mean |error| on them


class _Fits:
    """Fitted parameters per training set (a tuple of run ids), computed once."""

    def __init__(self, base: dict[int, NativeRef]):
        self.base, self.cache = base, {}

    def __call__(self, train: list[RunStats]) -> Fitted | None:
        key = tuple(sorted(id(t) for t in train))
        if key not in self.cache:
            self.cache[key] = _fit(train, self.base) if train else None
        return self.cache[key]


def select(
    scheme: str,
    train: list[RunStats],
    kind: str,
    candidates: tuple[str, ...],
    fits: _Fits,
    paired: dict[int, float],
) -> Choice | None:
    """Nested cross-validation: choose a predictor on the training runs only.

    Each training run of the test run's kind (gain or workload) is predicted,
    by the same ``scheme``, from the *other* training runs; the candidate with
    the lowest mean |error| on those inner predictions wins (ties: the first
    candidate).  Only candidates defined on every inner prediction compete.
    None when no training run can be predicted that way (no inner fold).
    """
    errs: dict[str, list[float]] = {p: [] for p in candidates}
    tested = 0
    for t in train:
        if _kind(t.run) != kind or not t.run.wall > 0:
            continue
        inner = _training(scheme, t, train)
        f = fits(inner) if inner else None
        if f is None:
            continue
        tested += 1
        for p in candidates:
            pred = _predict(p, t, fits.base[id(t)], f, paired[id(t)])
            errs[p].append(abs(pred - t.run.wall) / t.run.wall)
    scores = {p: float(np.mean(e)) for p, e in errs.items()
              if tested and len(e) == tested and np.all(np.isfinite(e))}  # fmt: skip
    if not scores:
        return None
    best_p = min(candidates, key=lambda p: scores.get(p, np.inf))
    return Choice(best_p, "inner cross-validation", tested, scores[best_p])


def _params_from(train: list[RunStats]) -> str:
    """One cell: how many runs of which policies (and host/mechanism) fitted the parameters."""
    if not train:
        return "–"
    r = train[0].run
    pols = sorted({t.run.group for t in train})
    return (f"{len(train)} runs of {r.host or '?'} {r.mechanism}, "
            f"polic{'y' if len(pols) == 1 else 'ies'} {' + '.join(pols)}")  # fmt: skip


def predictions(
    runs: list[DelegatedRun],
    natives: list[NativeRun],
    fallback: dict,
    predictors: tuple[str, ...] = PREDICTORS,
    declared: str | None = None,
) -> pd.DataFrame:
    """One row per (scheme, test run): every predictor's prediction and error, and the
    one *chosen* for the run (``predictor``, ``predicted``, ``rel_error``).

    The choice never sees the test run: ``declared`` when given (the plan's or
    the command line's), else :func:`select` on the training runs (nested
    cross-validation), else ``DEFAULT_PREDICTOR``.  ``params_from`` and
    ``train_run_ids`` say which runs the parameters were fitted on.
    """
    known = (*predictors, *offload_model.OFFLOAD_PREDICTORS)
    if declared is not None and declared not in known:
        raise TestbedError(f"unknown predictor {declared!r} (one of {', '.join(known)})")
    # offload runs are their own class with their own predictors (analysis.offload_model)
    every, runs = runs, [r for r in runs if not offload_model.is_offload(r)]
    off_declared = declared if declared in offload_model.OFFLOAD_PREDICTORS else None
    declared = declared if declared in predictors else None
    refs = native_refs(natives)
    hosts_of: dict[str, set[str]] = {}
    for n in natives:
        hosts_of.setdefault(n.workload, set()).add(n.host)
    stats = [run_stats(r) for r in runs]
    base = {id(s): reference(s.run, refs, fallback, hosts_of) for s in stats}
    native_wall = {n.path.resolve(): n.wall for n in natives}
    stretch = wall_per_cpu(natives)
    paired = {id(s): _paired(s.run, native_wall) for s in stats}
    ids = provenance.set_ids(every)
    fits = _Fits(base)
    choices: dict[tuple, Choice | None] = {}
    rows = []
    for scheme in SCHEMES:
        for s in stats:
            train = _training(scheme, s, stats)
            f = fits(train)
            ref = base[id(s)]
            r = s.run
            row = {
                "scheme": scheme,
                "workload": r.workload,
                **provenance.columns(r, ids),
                "gamma": _gamma(r),
                "repetition": r.repetition,
                "run": r.path.name,
                "forwarded_calls": s.n_total,
                "measured": r.wall,
                "t_nd": ref.t_nd,
                "C": ref.C,
                "t_nd_source": ref.source,
                "paired_native_s": paired[id(s)],
                "native_spread": ref.spread,
                "native_floor": ref.floor,
                "native_wall_per_cpu": stretch.get(r.key, np.nan),
                "train_runs": len(train),
                "params_from": _params_from(train),
                "train_run_ids": ";".join(f.train) if f else "",
                "f_c_pooled_s": f.pooled if f else np.nan,
                "relay_cpu_share": cpu_share(r, "relay"),
                "delegate_cpu_share": cpu_share(r, "delegate"),
                "relay_shares_program_cpus": _shared(r),
                "delegate_shared_cpus": delegate_cpus_shared(r),
                "flag": flags(ref.flag, "" if f else f"nothing to train on ({scheme})"),
            }
            for p in predictors:
                pred = _predict(p, s, ref, f, paired[id(s)]) if f else np.nan
                row[f"pred_{p}"] = pred
                row[f"err_{p}"] = (pred - r.wall) / r.wall if r.wall > 0 else np.nan
            defined = tuple(p for p in predictors if np.isfinite(row[f"pred_{p}"]))
            if declared is not None:
                choice = Choice(declared, "declared")
            elif not defined:
                choice = None
            else:
                key = (tuple(sorted(id(t) for t in train)), _kind(r), defined)
                if key not in choices:
                    choices[key] = select(scheme, train, _kind(r), defined, fits, paired)
                choice = choices[key] or Choice(
                    DEFAULT_PREDICTOR if DEFAULT_PREDICTOR in defined else defined[0], "default"
                )
            row["predictor"] = choice.predictor if choice else ""
            row["chosen_by"] = choice.how if choice else ""
            row["inner_runs"] = choice.inner_runs if choice else 0
            row["inner_error"] = choice.inner_error if choice else np.nan
            row["in_sample"] = IN_SAMPLE in row["flag"]
            row["predicted"] = row.get(f"pred_{choice.predictor}", np.nan) if choice else np.nan
            row["rel_error"] = row.get(f"err_{choice.predictor}", np.nan) if choice else np.nan
            rows.append(row)
    ctx = (refs, fallback, hosts_of, ids, native_wall, stretch)
    rows += _offload_rows([r for r in every if offload_model.is_offload(r)], ctx, off_declared)
    return pd.DataFrame(rows)


#: The offload model's terms, kept in ``tables/model_accuracy.csv`` for offload rows.
OFFLOAD_COLUMNS = ("offload_local_calls", "offload_G_local_s", "offload_E_s", "offload_F_s",
                   "exec_share", "offload_alpha_s", "offload_beta_s_per_byte",
                   "offload_c_local_s", "offload_e_local_from")  # fmt: skip


def _offload_rows(off: list[DelegatedRun], ctx: tuple, declared: str | None) -> list[dict]:
    """:func:`predictions`' rows of the offload runs (:mod:`analysis.offload_model`): same
    columns, same schemes, the same honest choice (declared, else nested CV on training
    runs only, else ``DEFAULT_OFFLOAD_PREDICTOR``); never pooled with cost-mode runs."""
    if not off:
        return []
    refs, fallback, hosts_of, ids, native_wall, stretch = ctx
    ref = {id(r): reference(r, refs, fallback, hosts_of) for r in off}
    nat = {}
    for r in off:  # kernel time = wall - C of the measured natives (bounds G_local)
        w, u = refs.get(r.key, (np.zeros(0), np.zeros(0)))
        nat[id(r)] = offload_model.Native(
            ref[id(r)].t_nd, float(np.median(w - u)) if len(w) else np.nan
        )
    rows = []
    for o in offload_model.predict_all(off, nat, SCHEMES, declared):
        s, r, f, choice = o["stats"], o["stats"].run, o["fit"], o["choice"]
        rf = ref[id(r)]
        row = {
            "scheme": o["scheme"], "workload": r.workload, **provenance.columns(r, ids),
            "gamma": _gamma(r), "repetition": r.repetition, "run": r.path.name,
            "forwarded_calls": len(s.nr), "measured": r.wall, "t_nd": rf.t_nd, "C": rf.C,
            "t_nd_source": rf.source, "paired_native_s": _paired(r, native_wall),
            "native_spread": rf.spread, "native_floor": np.nan,
            "native_wall_per_cpu": stretch.get(r.key, np.nan),
            "train_runs": len(o["train"]), "params_from": _params_from(o["train"]),
            "train_run_ids": ";".join(f.train) if f else "", "f_c_pooled_s": np.nan,
            "relay_cpu_share": cpu_share(r, "relay"),
            "delegate_cpu_share": cpu_share(r, "delegate"),
            "relay_shares_program_cpus": _shared(r),
            "delegate_shared_cpus": delegate_cpus_shared(r),
            "flag": flags(rf.flag, "" if f else f"nothing to train on ({o['scheme']})",
                          "e_loc " + f.local_source if f and "assumed" in f.local_source
                          else ""),
            **{k: v for k, v in o.items() if k.startswith(("pred_", "err_"))},
            **{k: o[k] for k in OFFLOAD_COLUMNS},
            "predictor": choice.predictor if choice else "",
            "chosen_by": choice.how if choice else "",
            "inner_runs": choice.inner_runs if choice else 0,
            "inner_error": choice.inner_error if choice else np.nan,
        }  # fmt: skip
        row["in_sample"] = IN_SAMPLE in row["flag"]
        row["predicted"] = o[f"pred_{choice.predictor}"] if choice else np.nan
        row["rel_error"] = o[f"err_{choice.predictor}"] if choice else np.nan
        rows.append(row)
    return rows


def klass(df: pd.DataFrame) -> pd.Series:
    """Target classes: gain benchmark at gamma <= 8, at gamma > 8, other workloads, and
    offload runs (mechanism ``…/offload``: their own class, never pooled with cost mode)."""
    g = df["gamma"]
    k = np.where(g.isna(), "workloads", np.where(g.fillna(0) <= 8, "gain γ≤8", "gain γ>8"))
    if "mechanism" in df:
        k = np.where(df["mechanism"].astype(str).map(mechanisms.is_offload), "offload", k)
    return k


def summary(pred: pd.DataFrame) -> pd.DataFrame:
    """Mean and max |error| per scheme x class x predictor (finite rows only)."""
    if not len(pred):
        return pd.DataFrame(columns=["scheme", "class", "predictor", "runs", "mean_abs_error",
                                     "max_abs_error", "mean_error"])  # fmt: skip
    d = pred.assign(**{"class": klass(pred)})
    rows = []
    for (scheme, cls), grp in d.groupby(["scheme", "class"], sort=False):
        for p in [p for p in ALL_PREDICTORS if f"err_{p}" in grp]:
            e = grp[f"err_{p}"].dropna()
            if len(e):
                rows.append({"scheme": scheme, "class": cls, "predictor": p, "runs": len(e),
                             "mean_abs_error": float(e.abs().mean()),
                             "max_abs_error": float(e.abs().max()),
                             "mean_error": float(e.mean())})  # fmt: skip
    return pd.DataFrame(rows)


def diagnosis(summ: pd.DataFrame, scheme: str) -> pd.DataFrame:
    """Predictor x class table of mean |error| for one scheme (the report's compact view)."""
    d = summ[summ["scheme"] == scheme] if len(summ) else summ
    if not len(d):
        return pd.DataFrame()
    t = d.pivot(index="predictor", columns="class", values="mean_abs_error")
    return t.reindex([p for p in ALL_PREDICTORS if p in t.index]).reset_index()


def best(pred: pd.DataFrame, scheme: str, paired: bool = True) -> tuple[str, float, float, int]:
    """(predictor, mean |error|, max |error|, runs) of the predictor with the lowest error
    *on the test runs* of ``scheme``: a post-hoc diagnostic, never a headline (it chooses
    after seeing the errors it reports; the headline uses :func:`select`).

    Only predictors available on every run the scheme predicts compete;
    ``paired=False`` leaves out the ``@paired`` ones (predictions from gamma = 1)."""
    d = pred[pred["scheme"] == scheme]
    d = d[d["pred_pooled"].notna()]
    if not len(d):
        return ("", np.nan, np.nan, 0)
    cands = []
    names = [c[4:] for c in d.columns if c.startswith("err_")]
    for p in names if paired else [p for p in names if "@" not in p]:
        e = d[f"err_{p}"]
        if e.notna().all():
            cands.append((float(e.abs().mean()), float(e.abs().max()), p))
    m, mx, p = min(cands)
    return p, m, mx, len(d)


def headline_scheme(pred: pd.DataFrame) -> str:
    """policy if it predicts anything, else repetition, else workload."""
    for s in ("policy", "repetition", "workload"):
        if len(pred) and pred[(pred["scheme"] == s)]["predicted"].notna().any():
            return s
    return "policy"


def model_accuracy(pred: pd.DataFrame, scheme: str) -> pd.DataFrame:
    """The ``tables/model_accuracy.csv`` rows: one per run of the headline scheme, with
    its provenance, the predictor chosen for it (``predictor``, ``chosen_by``) and the
    runs its parameters came from (``params_from``, ``train_run_ids``).  Offload rows are
    those of ``offload_model.OFFLOAD_SCHEME``, declared for that class."""
    off = klass(pred) == "offload" if len(pred) else np.zeros(0, dtype=bool)
    want = np.where(off, offload_model.OFFLOAD_SCHEME, scheme)
    d = pred[pred["scheme"] == want].copy()
    preds = [c[5:] for c in d.columns if c.startswith("pred_")]
    lead = ["workload", *provenance.COLUMNS, "gamma", "repetition", "measured", "predictor",
            "chosen_by", "inner_runs", "inner_error", "predicted", "rel_error", "in_sample",
            "params_from",
            "relay_cpu_share", "delegate_cpu_share", "relay_shares_program_cpus",
            "delegate_shared_cpus", "t_nd", "C", "t_nd_source", "paired_native_s",
            "native_spread", "native_floor", "native_wall_per_cpu", "run", "forwarded_calls", "train_runs",
            "train_run_ids", "f_c_pooled_s", *[f"pred_{p}" for p in preds],
            *[f"err_{p}" for p in preds], "scheme", "flag",
            *[c for c in OFFLOAD_COLUMNS if c in d]]  # fmt: skip
    return d[lead].reset_index(drop=True)


# ---------------------------------------------------------------- the headline


def bootstrap_mean_ci(
    x, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``x`` (resampling its elements, seeded:
    the same input gives the same interval)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (np.nan, np.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    a = (1.0 - level) / 2.0
    return float(np.quantile(means, a)), float(np.quantile(means, 1.0 - a))


#: The accuracy CI half-width the "how many runs" guide aims at (2 points of |error|).
TARGET_HALF_WIDTH = 0.02


def headline_table(acc: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Per target class: mean |error| of the chosen predictions with a bootstrap CI over
    runs, max, bias, which predictors were chosen and how, and how many runs would bring
    the CI under +-2 points (``TARGET_HALF_WIDTH``; the half-width shrinks as 1/sqrt(runs)
    if the errors spread as they did here)."""
    cols = ["class", "runs", "mean_abs_error", "ci_lo", "ci_hi", "max_abs_error", "bias",
            "predictors", "chosen_by", "hosts", "native_spread", "native_floor", "repetitions",
            "runs_for_2pt", "repetitions_for_2pt"]  # fmt: skip
    if not len(acc) or acc["rel_error"].isna().all():
        return pd.DataFrame(columns=cols)
    ok = acc["rel_error"].notna()
    if "in_sample" in acc:
        ok &= ~acc["in_sample"].astype(bool)  # out-of-sample predictions only
    d = acc[ok].assign(**{"class": lambda x: klass(x)})
    if not len(d):
        return pd.DataFrame(columns=cols)
    rows = []
    for cls, g in d.groupby("class", sort=False):
        e = g["rel_error"].abs().to_numpy()
        lo, hi = bootstrap_mean_ci(e, seed=seed)
        half = (hi - lo) / 2.0
        need = int(np.ceil(len(e) * (half / TARGET_HALF_WIDTH) ** 2)) if half == half else 0
        reps = int(g["repetition"].nunique()) if g["repetition"].notna().any() else 0
        per_rep = len(e) / reps if reps else np.nan
        counts = g["predictor"].value_counts()
        rows.append({
            "class": cls, "runs": len(e), "mean_abs_error": float(e.mean()), "ci_lo": lo,
            "ci_hi": hi, "max_abs_error": float(e.max()), "bias": float(g["rel_error"].mean()),
            "predictors": ", ".join(f"{p} ×{n}" for p, n in counts.items()),
            "chosen_by": ", ".join(sorted(set(g["chosen_by"]))),
            "hosts": ", ".join(sorted(set(g["host"]))),
            "native_spread": float(g["native_spread"].median()),
            "native_floor": float(g["native_floor"].mean()) if "native_floor" in g else np.nan,
            "repetitions": reps, "runs_for_2pt": max(need, len(e)),
            "repetitions_for_2pt": int(np.ceil(max(need, len(e)) / per_rep)) if reps else 0,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


_TERM_COLS = ("pred_pooled", "pred_pooled+fixed", "pred_per_syscall", "pred_size")


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
        g = g.reindex(columns=[*g.columns, *(c for c in _TERM_COLS if c not in g)])  # offload only
        rows.append({
            "class": cls,
            "runs": len(g),
            "mean_abs_error": float(g["rel_error"].abs().mean()),
            "mean_error (bias)": float(g["rel_error"].mean()),
            "noise: native spread (max-min)/median": float(g["native_spread"].mean()),
            "noise floor: |native / median of the other natives - 1|": float(
                g["native_floor"].mean()
            ),
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
        # at gamma = 1 the refined S_r uses f_c fitted on these very runs
        out["in_sample"] = (out["gamma"] == 1) & (out["set"] != "native")
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


def _ci(lo: float, hi: float) -> str:
    return "" if lo != lo else f" [95 % CI {lo:.1%}, {hi:.1%}]"


def headline_lines(
    head: pd.DataFrame, acc: pd.DataFrame, scheme: str, declared_in: str = ""
) -> list[str]:
    """The report's first lines: per target class, the chosen predictions' mean |error| with
    its CI, how the predictor was chosen, what it was fitted on and what it predicted."""
    n_in = int(acc["in_sample"].sum()) if len(acc) and "in_sample" in acc else 0
    in_sample = (
        [f"{n_in} prediction(s) are {IN_SAMPLE}: their t_nd is the whole-run fit's intercept, "
         "fitted on runs that include them (no measured natives; column `in_sample`). They are "
         "left out of the numbers above."] if n_in else []
    )  # fmt: skip
    if not len(head):
        return ["**Model accuracy: no run could be predicted from other runs** (needs "
                "delegated runs of at least two policies, workloads or repetitions of one "
                "mechanism on one host, and their native runs).", "", *in_sample,
                *([""] if in_sample else [])]  # fmt: skip
    how = set(acc["chosen_by"].dropna()) - {""}
    if how == {"declared"}:
        chosen = (f"`{acc['predictor'].iloc[0]}`, declared before the analysis"
                  + (f" {declared_in}" if declared_in else ""))  # fmt: skip
    else:
        chosen = ("chosen for each run as the one that best predicted *its training runs* "
                  "from each other (nested cross-validation: the run itself never takes part"
                  + ("; `pooled` where the training runs left no inner fold" if "default" in how
                     else "") + ")")  # fmt: skip
    train = {"policy": "the runs of every *other* policy", "workload":
             "the runs of every *other* workload", "repetition":
             "the runs of the *previous* repetition"}[scheme]  # fmt: skip
    lines = []
    for h in head.itertuples():
        lines.append(
            f"**Model accuracy: mean |error| {h.mean_abs_error:.1%}"
            f"{_ci(h.ci_lo, h.ci_hi)} for {h[1]}** over {h.runs} runs (max {h.max_abs_error:.1%}, bias "
            f"{h.bias:+.1%}; hosts {h.hosts}; predictors used: {h.predictors})."
        )
    lines += [
        "",
        f"How: each run's t_d is predicted with parameters fitted on {train} of the same host "
        f"and mechanism (gain runs: γ = 1 runs only); the predictor is {chosen}. The CI is a "
        "bootstrap over runs (2000 resamples, seed 0). Which runs fitted each prediction: "
        "`params_from` and `train_run_ids` in `tables/model_accuracy.csv`.",
    ]
    if (head["class"] == "offload").any():
        lines.append(
            f"Offload class: the training runs are instead the offload runs of the *other* "
            f"workloads ({offload_model.OFFLOAD_SCHEME} scheme, declared for this class before "
            "the analysis); t_d = t_nd − G_local + E + 2·Σ f(s, bytes) (+ a per-run term, or "
            "a per-run term and a cost per trapped call continued locally), with the "
            "delegate's execution time e(s, bytes), the local one G_local (at most the "
            "natives' kernel time) and the forwarding cost f(s, bytes) = α_s + β·bytes fitted "
            'on those runs only (`analysis/offload_model.py`, docs/offload.md "Model"); '
            "the predictor is chosen as above among the offload predictors."
        )
    flagged = int((acc["flag"].astype(str) != "").sum())
    if flagged:
        lines.append(f"{flagged} row(s) flagged (column `flag` of `tables/model_accuracy.csv`).")
    lines += in_sample
    return [*lines, ""]


def runs_guide(head: pd.DataFrame) -> list[str]:
    """How many runs the accuracy needs: the natives' spread and the runs for a +-2 pt CI."""
    out = []
    for h in head.itertuples():
        if h.ci_lo != h.ci_lo:
            continue
        half = (h.ci_hi - h.ci_lo) / 2
        reps = (f" (about {h.repetitions_for_2pt} repetitions of this plan instead of "
                f"{h.repetitions})" if h.repetitions else "")  # fmt: skip
        verdict = ("already within ±2 points" if half <= TARGET_HALF_WIDTH else
                   f"±2 points would need about {h.runs_for_2pt} runs{reps}")  # fmt: skip
        spread = ("" if h.native_spread != h.native_spread else
                  f"the natives of one workload spread by {h.native_spread:.0%} of their median; ")  # fmt: skip
        if h.native_floor == h.native_floor:
            spread += (f"a native run differs from the median of the others by "
                       f"{h.native_floor:.1%} on average (a floor: t_d is predicted from that "
                       "median); ")  # fmt: skip
        out.append(f"- {h[1]}: {spread}{h.runs} runs give a CI of ±{half * 100:.1f} points: "
                   f"{verdict}.")  # fmt: skip
    if out:
        out = ["How many runs (the CI half-width shrinks as 1/√runs if the errors spread as "
               "they did here; noisier natives need more):", "", *out, ""]  # fmt: skip
    return out


def analyse(
    profiles: list[Profile],
    runs: list[DelegatedRun],
    natives: list[NativeRun],
    fallback: dict,
    predictor: str | None = None,
    declared_in: str = "",
) -> Section:
    """Every predictor under every scheme, the chosen predictions, model_accuracy, the
    headline with CIs, error terms, gain sweep.  ``predictor``: declared, not chosen
    (``declared_in``: where, for the headline: "in the plan (NAME)", "on the command line")."""
    pred = predictions(runs, natives, fallback, declared=predictor) if runs else pd.DataFrame()
    scheme = headline_scheme(pred) if len(pred) else "policy"
    acc = model_accuracy(pred, scheme) if len(pred) else pd.DataFrame()
    head = headline_table(acc)
    summ = summary(pred)
    terms = error_terms(acc) if len(acc) else pd.DataFrame()
    fig13 = gain_speedups(runs, natives, profiles)
    fig12 = gain_profile_frame(profiles)
    headline = headline_lines(head, acc, scheme, declared_in)
    fwd13 = fig13[(fig13["set"] != "native") & (fig13["gamma"] > 1)] if len(fig13) else fig13
    for lo, hi, label in ((2, 8, "γ = 2–8"), (9, 10**9, "γ > 8")):
        sel = fwd13[(fwd13["gamma"] >= lo) & (fwd13["gamma"] <= hi)] if len(fwd13) else fwd13
        if len(sel):
            headline.insert(len(headline) - 1, (
                f"Fig. 13 ({label}, median speedup per set, {len(sel)} points, each predicted "
                f"from γ = 1 runs only): refined S_r mean |error| "
                f"{_pct(sel['S_r_rel_error'].abs().mean())}, max "
                f"{_pct(sel['S_r_rel_error'].abs().max())}; naive S_n mean |error| "
                f"{_pct(sel['S_n_rel_error'].abs().mean())}."
            ))  # fmt: skip
    per_run = ["workload", *provenance.COLUMNS, "gamma", "measured", "predictor", "predicted",
               "rel_error", "params_from", "relay_cpu_share", "delegate_cpu_share",
               "delegate_shared_cpus", "t_nd_source", "flag"]  # fmt: skip
    body = [
        "## Model accuracy (cross-validated)",
        "",
        "Predictors: `pooled` 2·f_c·N with the mean per-call f_c; `per_syscall` 2·Σ f_c(s)·N(s); "
        "`size` 2·(α·N + β·bytes); `whole_run` the slope of wall times over 2·N; `+fixed` adds "
        "the median residual of the training runs (a per-run term); `@paired` uses the native "
        "run made just before as t_nd (same γ: drift shared, not a γ = 1 prediction). "
        "t_d = C/γ + (t_nd − C) + forwarding (+ k), t_nd = median of measured native runs of "
        "the same workload on the same host (gain runs: the γ = 1 natives, "
        "C = wall·user/(user+sys)). Schemes: `policy` fits on the other policies' runs, "
        "`workload` on the other workloads', `repetition` on the previous repetition's; always "
        "the same host and mechanism; gain runs train on γ = 1 only.",
        "",
        f"Per target class ({scheme} scheme"
        + (
            f"; offload: {offload_model.OFFLOAD_SCHEME} scheme"
            if len(head) and (head["class"] == "offload").any()
            else ""
        )  # fmt: skip
        + "; the chosen predictor per run, CI by bootstrap over runs):",
        "",
        markdown_table(
            head.drop(columns=["runs_for_2pt", "repetitions_for_2pt"]) if len(head) else head
        ),  # fmt: skip
        *runs_guide(head),
        "Per run (headline scheme; `set` is the syscall set the policy resolved to, see "
        "*Policies as resolved*; `params_from` the runs the parameters were fitted on; relay / "
        "delegate CPU share = CPU seconds per second of the run, the delegate's counting every "
        "client it served; delegate_shared_cpus = the CPUs it could share with the program):",
        "",
        markdown_table(acc[per_run] if len(acc) else acc),
        f"Every predictor's mean |error| per class ({scheme} scheme; all schemes, max and bias: "
        "`tables/model_accuracy_summary.csv`), *for diagnosis only*: picking the smallest "
        "number of this table would choose on the test runs, which the headline does not do.",
        "",
        markdown_table(diagnosis(summ, scheme)),
        "Error terms next to the error (chosen predictions): native spread (noise), relay CPU "
        "share and its correlation with the error (interference), the fixed per-run term "
        "(launch), and how far per-syscall and size-aware predictions move from pooled:",
        "",
        markdown_table(terms),
        "Per-syscall f_c(s) (mean with t CI): `tables/fc_per_syscall.csv`.",
        "",
    ]
    if len(fig13):
        body += [
            "## Gain benchmark (Figs. 12-13)",
            "",
            "Speedup t_nd(γ=1)/t(γ), measured (median over repetitions, CI from the order-"
            "statistic CIs of both medians) vs naive S_n (p = (t_nd − C)/t_nd at γ = 1) and "
            "refined S_r from the γ = 1 native runs and profile and the pooled f_c fitted on the "
            "γ = 1 forwarded runs only. The γ = 1 rows are **in-sample (fit includes these "
            "runs)** (`in_sample`); every γ > 1 row is a prediction.",
            "",
            markdown_table(fig13),
        ]
    tables = {"model_accuracy": acc, "accuracy_headline": head,
              "model_accuracy_all_schemes": pred, "fc_per_syscall": per_syscall_fc(runs),
              "model_accuracy_summary": summ, "error_terms": terms,
              "gain_speedup": fig13, "gain_profile": fig12}  # fmt: skip
    return Section(tables, headline, body, fig12, fig13)


def per_syscall_fc(runs: list[DelegatedRun], level: float = 0.95) -> pd.DataFrame:
    """Per mechanism and syscall: calls, mean f_c(s) with its t CI, median (s)."""
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
