"""Profiles: the per-syscall inputs of the extended model, and the paper's Table I.

A :class:`Profile` holds, for one native run of one program, the arrays the
model needs (syscall axis last): names, numbers, ``n(s)`` and ``g(s)`` (s),
plus ``C`` (s), the wall time and the paper's ``p``.  Profiles come from run
directories written by ``testbed profile`` (:func:`load_profile`); the
profiles measured for the figures ship in ``analysis/data/profiles``
(:func:`shipped_profiles`).  :func:`table1` returns the paper's Table I.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.paths import PROFILES_DIR, TABLE1_CSV
from testbed.core import policy as _policy
from testbed.core import rundir
from testbed.core.errors import TestbedError

#: Calls whose g(s) is time blocked waiting for the program's own children.
WAIT_CALLS = frozenset({"wait4", "waitid", "vfork"})


@dataclass
class Profile:
    """One native profile: ``C`` and per-syscall ``n``, ``g`` (seconds)."""

    name: str
    names: list[str]
    nrs: np.ndarray
    n: np.ndarray
    g: np.ndarray
    C: float
    wall: float
    p_sys: float
    meta: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def key(self) -> str:
        """The command line, used to match delegated runs of the same workload."""
        return " ".join(map(str, self.meta.get("command") or [self.name]))

    @property
    def t_nd(self) -> float:
        """The model's native time ``C + sum g``."""
        return float(self.C + self.g.sum())

    @property
    def p(self) -> float:
        """``sum g / t_nd``: the p for which the extended model reduces to the naive one."""
        return float(self.g.sum() / self.t_nd) if self.t_nd > 0 else 0.0

    @property
    def counts(self) -> dict[int, int]:
        """``{nr: n(s)}`` for the syscalls this table knows (input to policies)."""
        return {
            int(nr): int(k) for nr, k in zip(self.nrs, self.n, strict=True) if nr >= 0 and k > 0
        }

    def b(self, policy: str | _policy.Policy) -> np.ndarray:
        """The forwarding indicator ``b(s)`` (0/1 floats, shape ``(S,)``) of a policy."""
        pol = _policy.parse_policy(policy) if isinstance(policy, str) else policy
        chosen = _policy.choose(pol, self.counts)
        return np.isin(self.nrs, list(chosen)).astype(float)

    def b_sweep(self, kind: str, percents, seed: int = 0) -> np.ndarray:
        """``(K, S)`` indicators of ``kind`` at each of ``percents`` (0-100).

        Uses one ordering of the types (:func:`testbed.core.policy.order`), so the
        forwarded sets are nested, exactly as :func:`testbed.core.policy.choose`
        picks them for each K.
        """
        ranked = _policy.order(kind, self.counts, seed)
        rank = {nr: i for i, nr in enumerate(ranked)}
        r = np.array([rank.get(int(nr), len(ranked) + 1) for nr in self.nrs])
        m = np.array([_policy.count_of(k, len(ranked)) for k in np.atleast_1d(percents)])
        return (r[None, :] < m[:, None]).astype(float)


def _name_of(meta: dict, path: Path) -> str:
    if meta.get("workload"):
        return str(meta["workload"])
    cmd = meta.get("command") or []
    if cmd:
        return os.path.basename(str(cmd[0]))
    return path.name


def from_run(run: rundir.Run, name: str | None = None) -> Profile:
    """A :class:`Profile` from a loaded ``kind = "profile"`` run directory.

    In a multi-process profile (``threads > 1``) the time a parent spends
    blocked in ``wait4``/``waitid``/``vfork`` is its children's time, already counted in
    their own C and g; it is set to 0 in ``g`` (``n`` is kept) so t_nd does
    not count that time twice.  ``meta["g_wait_s"]`` keeps what was removed.
    """
    if run.kind != "profile":
        raise TestbedError(f"{run.path}: not a profile run directory (kind {run.kind!r})")
    meta = run.meta
    try:
        names = [r["name"] for r in run.syscalls]
        nrs = np.array([int(r["nr"]) for r in run.syscalls], dtype=int)
        n = np.array([float(r["n"]) for r in run.syscalls])
        g = np.array([float(r["g_ns"]) for r in run.syscalls]) / 1e9
        C = float(meta["C_s"])
        wall = float(meta["wall_s"])
        p_sys = float(meta.get("p_sys", 0.0))
    except (KeyError, ValueError, TypeError) as exc:
        raise TestbedError(
            f"{run.path}: malformed profile ({exc.__class__.__name__}: {exc})"
        ) from None
    if int(meta.get("threads", 1) or 1) > 1:
        wait = np.isin(names, list(WAIT_CALLS))
        meta = {**meta, "g_wait_s": float(g[wait].sum())}
        g = np.where(wait, 0.0, g)
    return Profile(
        name or _name_of(meta, run.path), names, nrs, n, g, C, wall, p_sys, meta, run.path
    )


def load_profile(path: str | os.PathLike, name: str | None = None) -> Profile:
    """Load a profile run directory (``testbed profile -o PATH``)."""
    return from_run(rundir.load(path), name)


def shipped_profiles() -> list[Profile]:
    """The profiles of real programs measured on the project's machine (data/profiles)."""
    if not PROFILES_DIR.is_dir():
        return []
    return [load_profile(p, p.name) for p in sorted(PROFILES_DIR.iterdir()) if p.is_dir()]


def table1() -> pd.DataFrame:
    """The paper's Table I: benchmark, description, p (a fraction, not percent)."""
    return pd.read_csv(TABLE1_CSV)


def profiles_frame(profiles: list[Profile]) -> pd.DataFrame:
    """One row per profile: name, C, sum g, t_nd, wall, p, p_sys, n, types, method."""
    return pd.DataFrame(
        [
            {
                "workload": p.name,
                "C_s": p.C,
                "g_total_s": float(p.g.sum()),
                "t_nd_s": p.t_nd,
                "wall_s": p.wall,
                "p": p.p,
                "p_sys": p.p_sys,
                "calls": int(p.n.sum()),
                "types": int((p.n > 0).sum()),
                "method": p.meta.get("method", ""),
            }
            for p in profiles
        ]
    )


def syscalls_frame(profiles: list[Profile]) -> pd.DataFrame:
    """Tidy per-syscall table: workload, name, nr, n, g_s (one row per syscall type)."""
    rows = []
    for p in profiles:
        for name, nr, k, g in zip(p.names, p.nrs, p.n, p.g, strict=True):
            rows.append({"workload": p.name, "name": name, "nr": int(nr), "n": int(k), "g_s": g})
    return pd.DataFrame(rows, columns=["workload", "name", "nr", "n", "g_s"])
