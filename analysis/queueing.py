"""Many callers, one delegate: a closed queueing model of delegated calls.

N callers (compute nodes, or processes) each alternate a *think* phase of mean
``Z`` (everything the program does between two forwarded calls) with one
forwarded call.  A call spends a fixed ``D`` in the network and the relays
(both legs, no contention: a *delay* station) and then queues at the delegate,
a station of ``W`` servers with mean service time ``S`` (FCFS).  This is the
machine-repairman model with ``W`` repairmen; with exponential think and
service times it is a product-form network and mean-value analysis (MVA) is
exact.

Exact MVA for a load-dependent station (Reiser & Lavenberg), used here with
the multi-server rate ``mu(j) = min(j, W) / S``::

    R_q(n)  = sum_{j=1..n} j / mu(j) * p(j-1 | n-1)
    X(n)    = n / (Z + D + R_q(n))
    p(j|n)  = X(n) / mu(j) * p(j-1 | n-1),   j = 1..n
    p(0|n)  = p(0 | n-1) * (Z + D) * X(n) / n

(the last from the product form; the textbook ``1 - sum_{j>=1} p(j|n)``
cancels catastrophically for many servers and many callers).

``R(n) = D + R_q(n)`` is the response time a caller sees per call; the
queueing delay at the delegate is ``R_q - S``.

Asymptotic bounds (valid for any N; the upper response bound is the arrival
theorem with every other caller queued ahead)::

    X(N) <= min(N / (Z + D + S), W / S)
    R(N) >= max(D + S, N S / W - Z)
    R(N) <= D + S + max(0, N - W) S / W
    N*    = W (Z + D + S) / S          (where the two X asymptotes meet)

Contended speedup: a forwarded call costs ``2 f_c`` one way and back in the
paper's model (``analysis.model``); under contention
``2 f_c(N) = D + R_q(N)``, so ``f_c(1) = (D + S)/2`` is the single-caller
forwarding cost and :func:`S_r_contended` feeds ``f_c(N)`` into
``analysis.model.S_r``.  The think time of a profiled program is the time it
spends between forwarded calls, ``(C/gamma + t_remote(f_c=0) + t_local) /
sum b n``.

Units: any one time unit throughout (the CLI and report use seconds).
Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from analysis import model

__all__ = [
    "Station",
    "MVA",
    "mva",
    "mva_load_dependent",
    "repairman",
    "ctmc",
    "bounds",
    "saturation",
    "f_c_of_N",
    "think_time",
    "S_r_contended",
]


@dataclass(frozen=True)
class Station:
    """The closed system: think ``Z``, fixed delay ``D``, ``W`` servers of mean ``S``."""

    Z: float
    D: float
    S: float
    W: int

    def __post_init__(self) -> None:
        for name in ("Z", "D", "S"):
            v = getattr(self, name)
            if not (v >= 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a finite time >= 0, not {v}")
        if self.S <= 0:
            raise ValueError(f"S must be > 0, not {self.S}")
        if int(self.W) != self.W or self.W < 1:
            raise ValueError(f"W must be a whole number of servers >= 1, not {self.W}")


@dataclass(frozen=True)
class MVA:
    """MVA results for N = 1..len: arrays indexed by N - 1."""

    N: np.ndarray  # 1..N_max
    X: np.ndarray  # throughput (calls per time unit)
    R: np.ndarray  # response time per call, D + R_q
    R_q: np.ndarray  # residence at the delegate (waiting + service)
    Q: np.ndarray  # mean number at the delegate
    U: np.ndarray  # delegate utilisation per server, X S / W
    p: np.ndarray  # p[N-1, j]: probability of j callers at the delegate
    S: float  # the service time the results were computed with

    @property
    def wait(self) -> np.ndarray:
        """Mean queueing delay at the delegate (receipt to start of service)."""
        return np.maximum(self.R_q - self.S, 0.0)  # no rounding noise below zero


def _check_N(N: int) -> int:
    if int(N) != N or N < 1:
        raise ValueError(f"N must be a whole number of callers >= 1, not {N}")
    return int(N)


def mva_load_dependent(N: int, think: float, mu: ArrayLike) -> tuple[np.ndarray, ...]:
    """Exact MVA, one delay station of mean ``think`` and one load-dependent station.

    ``mu[j-1]`` is the station's service rate with ``j`` customers present
    (``j = 1..N``).  Returns ``(X, R_q, Q, p)`` for n = 1..N; ``p[n-1, j]``
    is the marginal probability of ``j`` at the station with ``n`` in the system.
    """
    N = _check_N(N)
    mu = np.asarray(mu, dtype=float)
    if mu.shape != (N,) or np.any(mu <= 0):
        raise ValueError("mu must hold N positive rates")
    j = np.arange(1, N + 1, dtype=float)
    X = np.empty(N)
    Rq = np.empty(N)
    Q = np.empty(N)
    p = np.zeros((N, N + 1))
    prev = np.zeros(N + 1)
    prev[0] = 1.0  # p(0 | 0) = 1
    for n in range(1, N + 1):
        Rq[n - 1] = float(np.sum(j[:n] / mu[:n] * prev[:n]))
        X[n - 1] = n / (think + Rq[n - 1])
        cur = np.zeros(N + 1)
        cur[1 : n + 1] = X[n - 1] / mu[:n] * prev[:n]
        # p(0|n) = p(0|n-1) Z' X(n) / n (ratio of normalising constants), not
        # 1 - sum p(j|n): the subtraction cancels catastrophically for many servers
        cur[0] = prev[0] * think * X[n - 1] / n
        p[n - 1] = cur
        Q[n - 1] = X[n - 1] * Rq[n - 1]
        prev = cur
    return X, Rq, Q, p


def mva(st: Station, N: int) -> MVA:
    """Exact MVA of the closed system for 1..N callers (multi-server station)."""
    N = _check_N(N)
    mu = np.minimum(np.arange(1, N + 1), st.W) / st.S
    X, Rq, Q, p = mva_load_dependent(N, st.Z + st.D, mu)
    U = X * st.S / st.W
    return MVA(N=np.arange(1, N + 1), X=X, R=st.D + Rq, R_q=Rq, Q=Q, U=U, p=p, S=st.S)


def repairman(st: Station, N: int) -> tuple[float, float]:
    """Closed-form machine-repairman (M/M/1//N) throughput and response, W = 1.

    ``p0 = 1 / sum_k N!/(N-k)! (S/Z')^k`` with ``Z' = Z + D``;
    ``X = (1 - p0)/S``, ``R = N/X - Z``.
    """
    if st.W != 1:
        raise ValueError("the closed form is for one server")
    N = _check_N(N)
    Zp = st.Z + st.D
    if Zp == 0:
        return 1.0 / st.S, st.D + N * st.S
    terms = np.ones(N + 1)
    for k in range(1, N + 1):
        terms[k] = terms[k - 1] * (N - k + 1) * st.S / Zp
    p0 = 1.0 / terms.sum()
    X = (1.0 - p0) / st.S
    return float(X), float(N / X - st.Z)


def ctmc(st: Station, N: int) -> tuple[float, float, np.ndarray]:
    """Brute force: the continuous-time Markov chain of think -> delay -> delegate.

    States ``(a, b, c)`` = callers thinking, in the delay, at the delegate
    (``a + b + c = N``); rates ``a/Z``, ``b/D``, ``min(c, W)/S``.  Builds the
    generator matrix, solves ``pi Q = 0, sum pi = 1``; returns ``(X, R,
    p_c)`` with ``R`` the response time (delay + delegate) and ``p_c`` the
    distribution of the number at the delegate.  Needs ``Z, D > 0``.
    """
    N = _check_N(N)
    if st.Z <= 0 or st.D <= 0:
        raise ValueError("the chain needs Z > 0 and D > 0")
    states = [(a, b, N - a - b) for a in range(N + 1) for b in range(N + 1 - a)]
    index = {s: i for i, s in enumerate(states)}
    M = len(states)
    Qm = np.zeros((M, M))
    for i, (a, b, c) in enumerate(states):
        moves = []
        if a:
            moves.append(((a - 1, b + 1, c), a / st.Z))
        if b:
            moves.append(((a, b - 1, c + 1), b / st.D))
        if c:
            moves.append(((a + 1, b, c - 1), min(c, st.W) / st.S))
        for s, rate in moves:
            Qm[i, index[s]] += rate
            Qm[i, i] -= rate
    A = np.vstack([Qm.T, np.ones(M)])
    rhs = np.zeros(M + 1)
    rhs[-1] = 1.0
    pi = np.linalg.lstsq(A, rhs, rcond=None)[0]
    X = sum(pi[i] * min(c, st.W) / st.S for i, (_, _, c) in enumerate(states))
    pc = np.zeros(N + 1)
    for i, (_, _, c) in enumerate(states):
        pc[c] += pi[i]
    return float(X), float(N / X - st.Z), pc


def bounds(st: Station, N: ArrayLike) -> dict[str, np.ndarray]:
    """Asymptotic bounds on X(N) and R(N) (see the module docstring)."""
    N = np.asarray(N, dtype=float)
    zds = st.Z + st.D + st.S
    x_hi = np.minimum(N / zds, st.W / st.S)
    r_lo = np.maximum(st.D + st.S, N * st.S / st.W - st.Z)
    r_hi = st.D + st.S + np.maximum(0.0, N - st.W) * st.S / st.W
    return {"X_hi": x_hi, "X_lo": N / (st.Z + r_hi), "R_lo": r_lo, "R_hi": r_hi}


def saturation(st: Station) -> float:
    """N* = W (Z + D + S) / S: callers at which the delegate saturates."""
    return st.W * (st.Z + st.D + st.S) / st.S


def f_c_of_N(st: Station, N: int) -> np.ndarray:
    """Contended one-way forwarding cost ``(D + R_q(n)) / 2`` for n = 1..N."""
    res = mva(st, N)
    return (st.D + res.R_q) / 2.0


def think_time(
    C: float,
    g: ArrayLike,
    n: ArrayLike,
    b: ArrayLike,
    gamma: float,
    g_prime: ArrayLike | None = None,
) -> float:
    """Mean time a program spends between two forwarded calls (the ``Z`` of its callers)."""
    calls = float(np.sum(np.asarray(b, dtype=float) * np.asarray(n, dtype=float)))
    if calls <= 0:
        raise ValueError("the forwarded set makes no calls")
    busy = float(model.t_d(C, g, n, b, gamma, 0.0, g_prime))
    return busy / calls


def S_r_contended(
    C: float,
    g: ArrayLike,
    n: ArrayLike,
    b: ArrayLike,
    gamma: float,
    D: float,
    S: float,
    W: int,
    N: int,
    g_prime: ArrayLike | None = None,
) -> np.ndarray:
    """Extended-model speedup with ``f_c(N)`` from MVA, for N = 1..N identical nodes.

    Every node runs the profiled program with forwarded set ``b``; its think
    time is :func:`think_time`; the contended ``f_c(n)`` replaces the fixed
    ``f_c`` in ``analysis.model.S_r``.
    """
    Z = think_time(C, g, n, b, gamma, g_prime)
    fc = f_c_of_N(Station(Z=Z, D=D, S=S, W=W), N)
    return model.S_r(C, g, n, b, gamma, fc[:, None] if np.ndim(b) > 1 else fc, g_prime)
