"""The paper's speedup models (section III), vectorised with numpy.

Naive model (eq. 3)::

    S_n = 1 / (p + (1 - p) / gamma)

Extended model (eqs. 4-11), per syscall type s with total time g(s) of all its
invocations, invocation count n(s) and forwarding indicator b(s)::

    t_nd     = C + sum_s g(s)
    t_local  = sum_s (1 - b(s)) g'(s)            (g' defaults to g)
    t_remote = sum_s b(s) (g(s) + 2 f_c n(s))
    t_d      = C / gamma + t_remote + t_local
    S_r      = t_nd / t_d

Predicting a measured run (``analysis.accuracy``) from a measured native time
``t_nd`` of which ``C`` is computation (eq. 9 with ``sum g = t_nd - C``)::

    t_d = C / gamma + (t_nd - C) + F + k

where the forwarding time ``F`` is one of

    F = 2 f_c sum_s n(s)                        pooled per-call mean f_c
    F = 2 sum_s f_c(s) n(s)                     per-syscall f_c(s)
    F = 2 (alpha sum_s n(s) + beta bytes)       size-aware f_c = alpha + beta bytes

(``n(s)`` the forwarded calls, ``bytes`` their marshalled bytes) and ``k`` a
fixed per-run term (0, or fitted on other runs).

Units: times in seconds (floats), ``f_c`` in seconds per one-way forwarding.

Shapes: per-syscall arrays (``g``, ``n``, ``g_prime``) have the syscall axis
last, shape ``(S,)``; ``b`` has shape ``(..., S)`` (one row per forwarded set);
the sums over syscalls reduce the last axis.  ``gamma`` and ``f_c`` broadcast
against the result with the ordinary numpy rules.  :func:`grid` lays out the
three sweep axes (gamma x f_c x forwarded set) for you.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "S_n",
    "t_nd",
    "t_local",
    "t_remote",
    "t_d",
    "S_r",
    "grid",
    "p_of",
    "forwarding_time",
    "forwarding_time_sized",
    "t_d_from_native",
]


def S_n(p: ArrayLike, gamma: ArrayLike) -> np.ndarray:
    """Naive speedup ``1 / (p + (1 - p)/gamma)`` (eq. 3), broadcast over p and gamma."""
    p = np.asarray(p, dtype=float)
    gamma = np.asarray(gamma, dtype=float)
    return 1.0 / (p + (1.0 - p) / gamma)


def t_nd(C: ArrayLike, g: ArrayLike) -> np.ndarray:
    """Time without delegation, ``C + sum g(s)`` (eq. 4)."""
    return np.asarray(C, dtype=float) + np.asarray(g, dtype=float).sum(axis=-1)


def t_local(b: ArrayLike, g_prime: ArrayLike) -> np.ndarray:
    """Time of the calls kept local, ``sum (1 - b) g'`` (eq. 7)."""
    b = np.asarray(b, dtype=float)
    return ((1.0 - b) * np.asarray(g_prime, dtype=float)).sum(axis=-1)


def t_remote(b: ArrayLike, g: ArrayLike, n: ArrayLike, f_c: ArrayLike) -> np.ndarray:
    """Time of the delegated calls, ``sum b (g + 2 f_c n)`` (eqs. 5, 8).

    ``f_c`` broadcasts against ``b.shape[:-1]``.
    """
    b = np.asarray(b, dtype=float)
    bg = (b * np.asarray(g, dtype=float)).sum(axis=-1)
    bn = (b * np.asarray(n, dtype=float)).sum(axis=-1)
    return bg + 2.0 * np.asarray(f_c, dtype=float) * bn


def t_d(
    C: ArrayLike,
    g: ArrayLike,
    n: ArrayLike,
    b: ArrayLike,
    gamma: ArrayLike,
    f_c: ArrayLike,
    g_prime: ArrayLike | None = None,
) -> np.ndarray:
    """Time with delegation, ``C/gamma + t_remote + t_local`` (eq. 9)."""
    gp = g if g_prime is None else g_prime
    return (
        np.asarray(C, dtype=float) / np.asarray(gamma, dtype=float)
        + t_remote(b, g, n, f_c)
        + t_local(b, gp)
    )


def S_r(
    C: ArrayLike,
    g: ArrayLike,
    n: ArrayLike,
    b: ArrayLike,
    gamma: ArrayLike,
    f_c: ArrayLike,
    g_prime: ArrayLike | None = None,
) -> np.ndarray:
    """Extended speedup ``t_nd / t_d`` (eqs. 10, 11)."""
    return t_nd(C, g) / t_d(C, g, n, b, gamma, f_c, g_prime)


def grid(
    C: float,
    g: ArrayLike,
    n: ArrayLike,
    B: ArrayLike,
    gamma: ArrayLike,
    f_c: ArrayLike,
    g_prime: ArrayLike | None = None,
) -> np.ndarray:
    """S_r over the outer product gamma x f_c x forwarded sets.

    ``B`` is a ``(K, S)`` matrix of forwarding indicators (one row per
    forwarded set, e.g. min-freq at K different proportions).  Returns an
    array of shape ``(len(gamma), len(f_c), K)``; no Python loop runs over
    grid points.
    """
    B = np.atleast_2d(np.asarray(B, dtype=float))
    g = np.asarray(g, dtype=float)
    gp = g if g_prime is None else np.asarray(g_prime, dtype=float)
    bg = B @ g  # (K,)
    bn = B @ np.asarray(n, dtype=float)  # (K,)
    lg = (1.0 - B) @ gp  # (K,)
    gam = np.asarray(gamma, dtype=float).reshape(-1, 1, 1)
    fc = np.asarray(f_c, dtype=float).reshape(1, -1, 1)
    td = C / gam + bg + 2.0 * fc * bn + lg
    return (C + g.sum()) / td


def p_of(C: ArrayLike, g: ArrayLike) -> np.ndarray:
    """The system-call proportion ``sum g / t_nd`` the naive model uses."""
    g = np.asarray(g, dtype=float)
    return g.sum(axis=-1) / t_nd(C, g)


def forwarding_time(n: ArrayLike, f_c: ArrayLike) -> np.ndarray:
    """``2 sum_s f_c(s) n(s)``: ``f_c`` a scalar (pooled) or per syscall (last axis)."""
    n = np.asarray(n, dtype=float)
    return 2.0 * (np.asarray(f_c, dtype=float) * n).sum(axis=-1)


def forwarding_time_sized(
    n_total: ArrayLike, bytes_total: ArrayLike, alpha: ArrayLike, beta: ArrayLike
) -> np.ndarray:
    """``2 (alpha N + beta B)``: the size-aware cost summed over N calls of B bytes in all."""
    return 2.0 * (
        np.asarray(alpha, dtype=float) * np.asarray(n_total, dtype=float)
        + np.asarray(beta, dtype=float) * np.asarray(bytes_total, dtype=float)
    )


def t_d_from_native(
    t_nd: ArrayLike, C: ArrayLike, gamma: ArrayLike, forwarding: ArrayLike, fixed: ArrayLike = 0.0
) -> np.ndarray:
    """``C/gamma + (t_nd - C) + forwarding + fixed``: eq. 9 with ``sum g = t_nd - C``."""
    C = np.asarray(C, dtype=float)
    return (
        C / np.asarray(gamma, dtype=float)
        + (np.asarray(t_nd, dtype=float) - C)
        + np.asarray(forwarding, dtype=float)
        + np.asarray(fixed, dtype=float)
    )


def t_d_with_delay(t_d: ArrayLike, n: ArrayLike, delay: ArrayLike) -> np.ndarray:
    """What-if: the delegate spins ``delay`` s more per call (``testbed delegate
    --delay-us``).  A serial caller waits for each of its ``n`` forwarded calls,
    whose round trip grows by ``delay`` (``f_c`` by ``delay / 2``), so
    ``t_d + n delay``.  The model term ``testbed replay`` against such a
    delegate is compared with (docs/whatif.md); calls that overlap (threads,
    processes running at once) make it an upper bound.
    """
    return np.asarray(t_d, dtype=float) + np.asarray(n, dtype=float) * np.asarray(
        delay, dtype=float
    )


def t_d_what_if(
    t_d: ArrayLike, n: ArrayLike, delay: ArrayLike, n_async: ArrayLike = 0, f_c: ArrayLike = 0.0
) -> np.ndarray:
    """The model's what-ifs together: the delegate ``delay`` s slower per call
    (:func:`t_d_with_delay`), and ``n_async`` of the ``n`` calls - writes -
    forwarded asynchronously, no longer waited for: each saves its ``2 f_c``
    and the added delay.  An upper bound of the gain: a full window, a flush
    or the program's exit waits for unanswered writes (``testbed replay
    --async-writes`` composes those waits; docs/whatif.md).
    """
    n_async = np.asarray(n_async, dtype=float)
    delay = np.asarray(delay, dtype=float)
    waited = np.asarray(n, dtype=float) - n_async
    return np.asarray(t_d_with_delay(t_d, waited, delay)) - n_async * 2.0 * np.asarray(
        f_c, dtype=float
    )


def t_d_with_bandwidth(t_d: ArrayLike, nbytes: ArrayLike, rate_bps: ArrayLike) -> np.ndarray:
    """What-if: the link to the delegate carries ``rate_bps`` bit/s (``testbed lab up
    --link-rate``).  Each forwarded message is held for its transmission, so a
    serial caller's ``t_d`` grows by ``8 nbytes / rate`` (``nbytes``: the bytes
    of its requests and replies; the unshaped link's own transmission time is
    taken as nothing next to it)."""
    return np.asarray(t_d, dtype=float) + 8.0 * np.asarray(nbytes, dtype=float) / np.asarray(
        rate_bps, dtype=float
    )
