"""Fitting the forwarding cost ``f_c`` from measurements.

Three estimators, all returning seconds:

``per_call(calls)``
    From a relay trace (``calls.bin``): each answered, fault-free call gives
    ``f_c = overhead / 2`` (DESIGN.md section 4).  Reports the median with a
    distribution-free confidence interval (binomial order statistics: exact
    for any continuous distribution, no resampling) and the mean with a
    Student-t interval.  The median is the headline: per-call overheads have
    a heavy right tail (scheduling, interrupts).

``whole_run(obs)``
    From whole-run times of runs with different forwarded sets: at gamma = 1
    the model says ``t_d - t_nd = 2 f_c sum_s b(s) n(s)``.  With ``x = 2 sum
    b n`` (forwarded calls x 2) this is the least-squares fit
    ``t_d = t_nd(workload) + f_c x`` with one intercept per workload (its
    native time; a native run is simply an observation with ``x = 0``) and a
    common slope ``f_c``; CI from the t distribution with ``N - W - 1``
    degrees of freedom.

``size_aware(calls)``
    ``f_c(s) = alpha + beta * bytes`` per call (the paper's footnote 6), with
    ``bytes = bytes_in + bytes_out`` marshalled; OLS with heteroscedasticity-
    robust (HC1) standard errors; ``beta`` is *significant* when its two-sided
    p-value is below ``1 - level``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats

from testbed.core.errors import TestbedError
from testbed.core.rundir import derived, usable

__all__ = [
    "Estimate",
    "PerCallFit",
    "WholeRunFit",
    "SizeFit",
    "per_call_fc",
    "per_call",
    "whole_run",
    "size_aware",
    "fc_samples",
]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a confidence interval (seconds unless stated)."""

    value: float
    lo: float
    hi: float
    level: float = 0.95

    def __post_init__(self) -> None:
        for k in ("value", "lo", "hi"):
            object.__setattr__(self, k, float(getattr(self, k)))

    def contains(self, x: float) -> bool:
        return bool(self.lo <= x <= self.hi)


@dataclass(frozen=True)
class PerCallFit:
    n: int
    median: Estimate
    mean: Estimate
    p99: float

    def as_row(self) -> dict:
        return {
            "calls": self.n,
            "f_c_median_s": self.median.value,
            "f_c_median_lo_s": self.median.lo,
            "f_c_median_hi_s": self.median.hi,
            "f_c_mean_s": self.mean.value,
            "f_c_mean_lo_s": self.mean.lo,
            "f_c_mean_hi_s": self.mean.hi,
            "f_c_p99_s": self.p99,
        }


@dataclass(frozen=True)
class WholeRunFit:
    f_c: Estimate
    se: float
    dof: int
    intercepts: dict[str, float]  # t_nd per workload (s)
    residuals: np.ndarray
    n_runs: int


@dataclass(frozen=True)
class SizeFit:
    alpha: Estimate
    beta: Estimate  # seconds per byte
    p_value: float
    significant: bool
    n: int

    def as_dict(self) -> dict:
        d = asdict(self)
        return d


def fc_samples(calls: np.ndarray, mode: str = "cost") -> tuple[np.ndarray, np.ndarray]:
    """Per-call ``f_c`` (s) and bytes moved of the usable calls.

    ``f_c = (overhead - exec) / 2`` as :func:`testbed.core.rundir.derived` defines
    it (DESIGN.md section 4; ``exec``, the delegate's execution time, is
    recorded as 0 in cost mode, where the call runs locally after the reply, so
    ``mode`` changes nothing and is kept for callers).  Bytes moved are
    ``bytes_in + bytes_out``: in cost mode the marshalled input, in offload
    mode the data and paths sent plus the data returned (a ``read``'s bytes
    travel back in ``bytes_out``).  Usable (:func:`testbed.core.rundir.usable`): not
    a fault (timeout, peer error, not sent, unreadable) and with a positive ``f_c``.
    """
    if len(calls) == 0:
        return np.zeros(0), np.zeros(0)
    d = derived(calls)
    ok = usable(calls, d)
    fc = d["f_c"][ok] / 1e9
    size = calls["bytes_in"][ok].astype(float) + calls["bytes_out"][ok].astype(float)
    return fc, size


def median_ci(x: np.ndarray, level: float = 0.95) -> Estimate:
    """Median with the binomial order-statistic CI (distribution-free)."""
    x = np.sort(np.asarray(x, dtype=float))
    n = len(x)
    if n == 0:
        return Estimate(np.nan, np.nan, np.nan, level)
    med = float(np.median(x))
    # [x_(j), x_(n-j+1)] (1-based) with j the binomial(n, 1/2) quantile at
    # (1-level)/2 covers the median with probability >= level.
    j = max(int(stats.binom.ppf((1 - level) / 2, n, 0.5)), 1)
    lo, hi = x[j - 1], x[n - j]
    return Estimate(med, float(lo), float(hi), level)


def mean_ci(x: np.ndarray, level: float = 0.95) -> Estimate:
    x = np.asarray(x, dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(np.nan, np.nan, np.nan, level)
    m = float(x.mean())
    if n < 2:
        return Estimate(m, np.nan, np.nan, level)
    h = stats.t.ppf((1 + level) / 2, n - 1) * x.std(ddof=1) / np.sqrt(n)
    return Estimate(m, m - h, m + h, level)


def per_call(fc: np.ndarray, level: float = 0.95) -> PerCallFit:
    """Fit from per-call ``f_c`` samples (seconds)."""
    fc = np.asarray(fc, dtype=float)
    p99 = float(np.percentile(fc, 99)) if len(fc) else np.nan
    return PerCallFit(len(fc), median_ci(fc, level), mean_ci(fc, level), p99)


def per_call_fc(calls: np.ndarray, level: float = 0.95, mode: str = "cost") -> PerCallFit:
    """Fit ``f_c`` from a relay trace (a ``CALL_DTYPE`` array)."""
    return per_call(fc_samples(calls, mode)[0], level)


def whole_run(obs: pd.DataFrame, level: float = 0.95) -> WholeRunFit:
    """Least-squares ``f_c`` from whole runs.

    ``obs`` has one row per run with columns ``workload``, ``t_d`` (s, the
    measured wall time; a native run's wall time with ``x = 0``) and ``x``
    (``2 * sum b(s) n(s)``, i.e. twice the number of forwarded calls).
    """
    obs = obs.dropna(subset=["t_d", "x"])
    workloads = sorted(obs["workload"].unique())
    N, W = len(obs), len(workloads)
    if N == 0 or not (obs["x"] > 0).any():
        raise TestbedError("whole-run fit needs runs with forwarded calls")
    X = np.zeros((N, W + 1))
    idx = {w: i for i, w in enumerate(workloads)}
    for r, w in enumerate(obs["workload"]):
        X[r, idx[w]] = 1.0
    X[:, W] = obs["x"].to_numpy(dtype=float)
    y = obs["t_d"].to_numpy(dtype=float)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    dof = N - np.linalg.matrix_rank(X)
    if dof > 0:
        s2 = float(resid @ resid) / dof
        cov = s2 * np.linalg.pinv(X.T @ X)
        se = float(np.sqrt(cov[W, W]))
        h = stats.t.ppf((1 + level) / 2, dof) * se
    else:
        se, h = np.nan, np.nan
    fc = float(beta[W])
    return WholeRunFit(
        Estimate(fc, fc - h, fc + h, level),
        se,
        int(dof),
        {w: float(beta[i]) for w, i in idx.items()},
        resid,
        N,
    )


def size_aware(fc: np.ndarray, size: np.ndarray, level: float = 0.95) -> SizeFit:
    """OLS ``f_c = alpha + beta * bytes`` with HC1 robust standard errors."""
    y = np.asarray(fc, dtype=float)
    x = np.asarray(size, dtype=float)
    n = len(y)
    nan = Estimate(np.nan, np.nan, np.nan, level)
    if n < 3 or np.ptp(x) == 0:
        a = mean_ci(y, level) if n else nan
        return SizeFit(a, nan, np.nan, False, n)
    xm = x.mean()
    sxx = float(((x - xm) ** 2).sum())
    beta = float(((x - xm) * (y - y.mean())).sum() / sxx)
    alpha = float(y.mean() - beta * xm)
    e = y - alpha - beta * x
    X = np.column_stack([np.ones(n), x])
    bread = np.linalg.inv(X.T @ X)
    meat = (X * (e**2)[:, None]).T @ X
    cov = bread @ meat @ bread * n / (n - 2)  # HC1
    se_a, se_b = np.sqrt(np.diag(cov))
    q = stats.t.ppf((1 + level) / 2, n - 2)
    p = float(2 * stats.t.sf(abs(beta / se_b), n - 2)) if se_b > 0 else 0.0
    return SizeFit(
        Estimate(alpha, alpha - q * se_a, alpha + q * se_a, level),
        Estimate(beta, beta - q * se_b, beta + q * se_b, level),
        p,
        bool(p < 1 - level),
        n,
    )
