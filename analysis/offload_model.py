"""The offload model: an offload run's wall time predicted from *other* runs.

In offload mode the delegate executes the offloaded calls, so the local time
``g(s)`` of those calls is replaced by the delegate's execution time ``e(s)``
plus forwarding there and back.  For a test run with recorded offloaded calls
``c`` (syscall ``s_c``, bytes moved ``x_c = bytes_in + bytes_out``) and
``n_local`` calls trapped but continued locally (``run.json``
``offload.local_calls``, not recorded one by one)::

    G_local = min(sum_c e_loc(s_c, x_c), K)    what the calls cost run locally
    E       = sum_c e_del(s_c, x_c)            what they cost at the delegate
    F       = 2 sum_c f(s_c, x_c)              forwarding there and back
    t_d     = t_nd - G_local + E + F           predictor ``offload``
            (+ k)                              ``offload+fixed``
            (+ k' + c_local n_local)           ``offload+local``

Per call, ``e(s, x) = a_s + b x`` and ``f(s, x) = alpha_s + beta x``
(:class:`CallLine`: an intercept per syscall seen at least ``MIN_CALLS_EXEC``
times in training, a pooled intercept for the rest, one slope per byte common
to all syscalls, least squares within syscalls, a negative slope set to 0; a
prediction below 0 counts 0), fitted on the training runs' usable calls:
``e`` on the delegate's execution time ``d_exec_end - d_exec_start`` and ``f``
on ``f_c = (overhead - exec)/2`` (:func:`testbed.core.rundir.derived`).  ``k``
is the median residual of ``offload`` on the training runs (a per-run cost:
launch, connection, BYE), ``(k', c_local)`` the least-squares line of those
residuals on the training runs' ``n_local`` (every trapped call pays the
seccomp round trip, local or not).  ``t_nd`` is the median of the workload's
measured native runs and ``K`` their median time in the kernel (wall ×
sys/(user + sys)): the local cost of some of a run's calls cannot exceed the
kernel time of all of them (:mod:`analysis.accuracy` passes both in).

``e_loc`` is fitted on the training runs of a *loopback* (or same-node)
offload delegate of the same host (its root on that host's file system); when
the test run's delegate is itself one, ``e_loc = e_del``.  The delegate's execution
window includes its own work around the kernel call (path resolution beneath
the root, the fd table), so ``sum e_loc`` overstates the local cost of short
calls: ``K`` bounds it.  For a remote delegate without loopback offload runs
to train on, ``e_loc = e_del`` is assumed and the row says so.  How much the
execution terms weigh is the ``exec_share`` column (``E / measured``).

Nothing about the test run is used but its call list (syscalls, bytes) and
``n_local``, as the cost-mode predictors use the run's own call counts: its
wall time, its delegate's execution times and its f_c are never seen.  The
training set follows the scheme (same host and mechanism, never the run
itself; ``workload``: other workloads only; ``repetition``: the previous
repetition only; ``policy``: the runs of another forwarded set, which offload
runs, all trapping the same calls, never have).  The predictor is declared or
chosen by nested cross-validation on the training runs only (:func:`select`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from testbed.core import mechanisms
from testbed.core.predictors import DEFAULT_OFFLOAD_PREDICTOR, OFFLOAD_PREDICTORS
from testbed.core.rundir import derived, usable

__all__ = [
    "OFFLOAD_SCHEME",
    "MIN_CALLS_EXEC",
    "is_offload",
    "OffloadStats",
    "offload_stats",
    "CallLine",
    "ExecModel",
    "fit_line",
    "fit_exec",
    "OffloadFit",
    "fit",
    "terms",
    "t_d_offload",
    "predict",
    "training",
    "select",
    "predict_all",
]

#: The scheme of the offload class's headline, declared before any data: the issue's
#: target is "cross-validated by workload".
OFFLOAD_SCHEME = "workload"
#: A syscall's own exec line needs this many training calls; fewer use the pooled line.
MIN_CALLS_EXEC = 20
#: Where a delegate shares the compute node's file system (mechanism ``…/WHERE/offload``).
_LOCAL = ("loopback", "same-node")


def is_offload(r) -> bool:
    """An offload run (mechanism ``…/offload``): never pooled with cost mode."""
    return mechanisms.is_offload(r.mechanism)


@dataclass
class OffloadStats:
    """What the model reads of one offload run: its calls, and its usable samples."""

    run: object  # analysis.compare.DelegatedRun
    nr: np.ndarray  # every recorded call: syscall number
    size: np.ndarray  # every recorded call: bytes_in + bytes_out
    n_local: int  # trapped calls continued locally (not recorded)
    u_nr: np.ndarray = field(repr=False)  # usable calls: syscall, bytes, f_c (s), exec (s)
    u_size: np.ndarray = field(repr=False)
    u_fc: np.ndarray = field(repr=False)
    u_exec: np.ndarray = field(repr=False)

    @property
    def name(self) -> str:
        r = self.run
        return f"{r.host}/{r.path.name}" if r.host else r.path.name


def offload_stats(r) -> OffloadStats:
    calls = np.asarray(r.calls)
    off = r.meta.get("offload") if isinstance(r.meta.get("offload"), dict) else {}
    n_local = int(off.get("local_calls") or 0)
    if not len(calls):
        z = np.zeros(0)
        return OffloadStats(r, z.astype(int), z, n_local, z.astype(int), z, z, z)
    size = calls["bytes_in"].astype(float) + calls["bytes_out"].astype(float)
    d = derived(calls)
    ok = usable(calls, d)
    return OffloadStats(r, calls["nr"].astype(int), size, n_local, calls["nr"][ok].astype(int),
                        size[ok], d["f_c"][ok] / 1e9, d["exec"][ok] / 1e9)  # fmt: skip


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares ``y = a + b x`` (``b = 0`` when x does not vary)."""
    if not len(y):
        return np.nan, np.nan
    var = float(((x - x.mean()) ** 2).sum())
    if var <= 0:
        return float(y.mean()), 0.0
    b = float(((x - x.mean()) * (y - y.mean())).sum() / var)
    return float(y.mean() - b * x.mean()), b


@dataclass(frozen=True)
class CallLine:
    """``y(s, x) = a_s + b x``: an intercept per syscall (the pooled one for syscalls seen
    fewer than ``MIN_CALLS_EXEC`` times in training) and one slope per byte, common to
    all syscalls (a byte costs a copy whatever the call; what a call costs besides depends
    on its path: the relay serves data calls in C, the rest in Python).  Fitted by least
    squares within syscalls (fixed effects); a negative slope is set to 0."""

    per_nr: dict[int, float]
    rest: float  # the intercept of every other syscall
    slope: float  # s per byte, >= 0

    def predict(self, nr: np.ndarray, size: np.ndarray) -> np.ndarray:
        nr, size = np.asarray(nr), np.asarray(size, dtype=float)
        a = np.full(len(nr), self.rest)
        for s, ai in self.per_nr.items():
            a[nr == s] = ai
        return np.maximum(a + self.slope * size, 0.0)


#: The fitted per-call execution time ``e(s, x)`` and one-way forwarding ``f_c(s, x)``.
ExecModel = CallLine


def fit_line(nr, size, y, min_calls: int = MIN_CALLS_EXEC) -> CallLine:
    """Fit :class:`CallLine` on per-call samples (syscall, bytes, time in s)."""
    nr, size, y = np.asarray(nr), np.asarray(size, dtype=float), np.asarray(y, dtype=float)
    if not len(y):
        return CallLine({}, np.nan, 0.0)
    own = {int(s) for s, c in zip(*np.unique(nr, return_counts=True), strict=True)
           if c >= min_calls}  # fmt: skip
    group = np.where(np.isin(nr, list(own)), nr, -1)
    sxx = sxy = 0.0
    for g in np.unique(group):
        sel = group == g
        dx = size[sel] - size[sel].mean()
        sxx += float((dx * dx).sum())
        sxy += float((dx * (y[sel] - y[sel].mean())).sum())
    b = max(sxy / sxx, 0.0) if sxx > 0 else 0.0
    a = {int(g): float((y[group == g] - b * size[group == g]).mean()) for g in np.unique(group)}
    rest = a.pop(-1, float((y - b * size).mean()))
    return CallLine(a, rest, b)


fit_exec = fit_line


def t_d_offload(t_nd, g_local, e, forwarding, local_cost=0.0, fixed=0.0) -> np.ndarray:
    """``t_nd - G_local + E + F (+ c_local n_local) (+ k)``: the offload model's t_d."""
    return (np.asarray(t_nd, dtype=float) - np.asarray(g_local, dtype=float)
            + np.asarray(e, dtype=float) + np.asarray(forwarding, dtype=float)
            + np.asarray(local_cost, dtype=float) + np.asarray(fixed, dtype=float))  # fmt: skip


@dataclass(frozen=True)
class Native:
    """What the model reads of a run's native reference: its time and its kernel time
    (median wall × sys/(user + sys) of the native runs; NaN if unknown)."""

    t_nd: float
    kernel: float = np.nan


@dataclass(frozen=True)
class OffloadFit:
    """The offload model's parameters, fitted on the runs ``train`` only."""

    exec_del: CallLine  # e(s, x) at the test run's delegate
    exec_loc: CallLine  # e(s, x) on a loopback delegate: the local cost of the calls
    local_source: str  # where exec_loc comes from
    fwd: CallLine  # one-way f_c(s, x) = alpha_s + beta x
    fixed: float = np.nan  # k of offload+fixed
    k_local: float = np.nan  # k' and c_local of offload+local
    c_local: float = np.nan
    train: tuple[str, ...] = ()

    @property
    def alpha(self) -> float:
        """The intercept of the syscalls without their own (s)."""
        return self.fwd.rest

    @property
    def beta(self) -> float:
        """Forwarding cost per byte moved (s/byte)."""
        return self.fwd.slope


def _samples(train: list[OffloadStats]) -> tuple[np.ndarray, ...]:
    """(syscall, bytes, f_c, exec) of the usable calls of ``train``."""
    return tuple(np.concatenate([getattr(t, a) for t in train] or [np.zeros(0)])
                 for a in ("u_nr", "u_size", "u_fc", "u_exec"))  # fmt: skip


def fit(train: list[OffloadStats], native: dict[int, Native],
        local_train: list[OffloadStats] | None = None) -> OffloadFit | None:  # fmt: skip
    """Fit on ``train`` (``native``: id(stats) -> its :class:`Native`); ``local_train``:
    the loopback offload runs e_loc is fitted on (None: the delegate's own e is it)."""
    nr, size, fc, ex = _samples(train)
    if not len(fc):
        return None
    fwd = fit_line(nr, size, fc)
    e_del = fit_line(nr, size, ex)
    e_loc, src = e_del, "delegate's e (loopback: same file system)"
    if local_train is not None:
        lnr, lsize, _, lex = _samples(local_train)
        if len(lex):
            e_loc = fit_line(lnr, lsize, lex)
            src = f"e of {len(local_train)} loopback offload run(s)"
        else:
            src = "assumed = delegate's e (no loopback offload runs to train on)"
    base = OffloadFit(e_del, e_loc, src, fwd, train=tuple(sorted(t.name for t in train)))
    res, nl = [], []
    for t in train:
        nat = native.get(id(t), Native(np.nan))
        if np.isfinite(nat.t_nd) and t.run.wall > 0:
            res.append(t.run.wall - predict("offload", t, nat, base))
            nl.append(float(t.n_local))
    res_a, nl_a = np.array(res), np.array(nl)
    k = float(np.median(res_a)) if len(res_a) else np.nan
    kl, cl = _line(nl_a, res_a) if len(res_a) >= 3 and np.ptp(nl_a) > 0 else (np.nan, np.nan)
    return OffloadFit(e_del, e_loc, src, fwd, k, kl, cl, base.train)


def terms(s: OffloadStats, f: OffloadFit, kernel: float = np.nan) -> dict[str, float]:
    """The test run's G_local, E and F (s) under the fitted parameters.  ``G_local`` is at
    most ``kernel``, the native run's time in the kernel (when known): the local cost of
    some of its system calls cannot exceed that of all of them."""
    g = float(f.exec_loc.predict(s.nr, s.size).sum())
    return {
        "G_local": min(g, kernel) if np.isfinite(kernel) else g,
        "E": float(f.exec_del.predict(s.nr, s.size).sum()),
        "F": float(2.0 * f.fwd.predict(s.nr, s.size).sum()),
    }


def predict(p: str, s: OffloadStats, native: Native, f: OffloadFit) -> float:
    """Predictor ``p`` (``OFFLOAD_PREDICTORS``) of run ``s``'s wall time."""
    tm = terms(s, f, native.kernel)
    if p == "offload":
        extra = 0.0
    elif p == "offload+fixed":
        extra = f.fixed
    elif p == "offload+local":
        extra = f.k_local + f.c_local * s.n_local
    else:
        raise ValueError(p)
    return float(t_d_offload(native.t_nd, tm["G_local"], tm["E"], tm["F"], extra))


def training(scheme: str, s: OffloadStats, stats: list[OffloadStats],
             mechanism: bool = True) -> list[OffloadStats]:  # fmt: skip
    """The runs ``s`` is predicted from under ``scheme``: same host (and mechanism unless
    ``mechanism=False``), offload only, never ``s`` itself."""
    r = s.run

    def eligible(t: OffloadStats) -> bool:
        return (t is not s and is_offload(t.run) and t.run.host == r.host
                and (not mechanism or t.run.mechanism == r.mechanism))  # fmt: skip

    if scheme == "policy":
        return [t for t in stats if eligible(t) and t.run.group != r.group]
    if scheme == "workload":
        return [t for t in stats if eligible(t) and t.run.workload != r.workload]
    if scheme == "repetition":
        if r.repetition is None:
            return []
        return [t for t in stats if eligible(t) and t.run.repetition == r.repetition - 1]
    raise ValueError(scheme)


def _local_train(s: OffloadStats, allowed: list[OffloadStats]) -> list[OffloadStats] | None:
    """The runs e_loc is fitted on for ``s``: None on a loopback delegate (its own e is the
    local one), else the loopback offload runs among ``allowed`` (the scheme's training
    runs of any mechanism: never ``s``, nor what the scheme holds out)."""
    if mechanisms.place(s.run.mechanism) in _LOCAL:
        return None
    return [t for t in allowed if mechanisms.place(t.run.mechanism) in _LOCAL]


class Fits:
    """Fitted parameters per (training set, e_loc set), computed once."""

    def __init__(self, native: dict[int, Native]):
        self.native, self.cache = native, {}

    def __call__(self, train: list[OffloadStats], loc: list[OffloadStats] | None):
        key = (tuple(sorted(id(t) for t in train)),
               None if loc is None else tuple(sorted(id(t) for t in loc)))  # fmt: skip
        if key not in self.cache:
            self.cache[key] = fit(train, self.native, loc) if train else None
        return self.cache[key]


@dataclass(frozen=True)
class Choice:
    predictor: str
    how: str  # "declared", "inner cross-validation", "default"
    inner_runs: int = 0
    inner_error: float = np.nan


def select(scheme: str, train: list[OffloadStats], allowed: list[OffloadStats], fits: Fits,
           candidates: tuple[str, ...] = OFFLOAD_PREDICTORS) -> Choice | None:  # fmt: skip
    """Nested cross-validation on the training runs only: each training run is predicted,
    by the same scheme, from the *other* training runs (e_loc from the other runs of
    ``allowed``, the outer fold's runs of any mechanism); the candidate with the lowest
    mean |error| wins (ties: the first).  None without an inner fold."""
    errs: dict[str, list[float]] = {p: [] for p in candidates}
    tested = 0
    for t in train:
        nat = fits.native.get(id(t), Native(np.nan))
        inner = training(scheme, t, train)
        loc = _local_train(t, training(scheme, t, allowed, mechanism=False))
        f = fits(inner, loc) if inner else None
        if f is None or not np.isfinite(nat.t_nd) or not t.run.wall > 0:
            continue
        tested += 1
        for p in candidates:
            errs[p].append(abs(predict(p, t, nat, f) - t.run.wall) / t.run.wall)
    scores = {p: float(np.mean(e)) for p, e in errs.items()
              if tested and len(e) == tested and np.all(np.isfinite(e))}  # fmt: skip
    if not scores:
        return None
    best = min(candidates, key=lambda p: scores.get(p, np.inf))
    return Choice(best, "inner cross-validation", tested, scores[best])


def predict_all(runs: list, native_of: dict[int, Native], schemes: tuple[str, ...],
                declared: str | None = None) -> list[dict]:  # fmt: skip
    """One dict per (scheme, offload run): every offload predictor's prediction and error,
    the chosen one and how, the model's terms.  ``native_of``: id(run) -> :class:`Native`."""
    stats = [offload_stats(r) for r in runs if is_offload(r)]
    native = {id(s): native_of.get(id(s.run), Native(np.nan)) for s in stats}
    fits = Fits(native)
    out = []
    for scheme in schemes:
        for s in stats:
            train = training(scheme, s, stats)
            allowed = training(scheme, s, stats, mechanism=False)
            f = fits(train, _local_train(s, allowed)) if train else None
            nat, r = native[id(s)], s.run
            row: dict = {"scheme": scheme, "stats": s, "train": train, "fit": f}
            for p in OFFLOAD_PREDICTORS:
                pred = predict(p, s, nat, f) if f is not None else np.nan
                row[f"pred_{p}"] = pred
                row[f"err_{p}"] = (pred - r.wall) / r.wall if r.wall > 0 else np.nan
            defined = tuple(p for p in OFFLOAD_PREDICTORS if np.isfinite(row[f"pred_{p}"]))
            if declared is not None:
                choice = Choice(declared, "declared")
            elif not defined:
                choice = None
            else:
                choice = select(scheme, train, allowed, fits, defined) or Choice(
                    DEFAULT_OFFLOAD_PREDICTOR if DEFAULT_OFFLOAD_PREDICTOR in defined
                    else defined[0], "default")  # fmt: skip
            row["choice"] = choice
            tm = terms(s, f, nat.kernel) if f is not None else {}
            row.update({
                "offload_local_calls": s.n_local,
                "offload_G_local_s": tm.get("G_local", np.nan),
                "offload_E_s": tm.get("E", np.nan),
                "offload_F_s": tm.get("F", np.nan),
                "exec_share": tm["E"] / r.wall if tm and r.wall > 0 else np.nan,
                "offload_alpha_s": f.alpha if f else np.nan,
                "offload_beta_s_per_byte": f.beta if f else np.nan,
                "offload_c_local_s": f.c_local if f else np.nan,
                "offload_e_local_from": f.local_source if f else "",
            })  # fmt: skip
            out.append(row)
    return out
