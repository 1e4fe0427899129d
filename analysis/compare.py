"""Comparisons: predicted vs measured ``t_d``, cross-validation, mechanisms.

Inputs are run directories: profiles (``kind = "profile"``) and delegated
runs (``kind = "delegated"``, written by ``testbed run``).  Everything is
returned as tidy pandas tables, one row per observation.

Matching: a delegated run belongs to the *workload* named by its command
line (``" ".join(command)``); its native time ``t_nd`` is taken, in order,
from ``run.json["native"]["wall_s"]``, from delegated runs of the same command
with nothing forwarded, from untraced native runs recorded with a profile of
the same command (``testbed profile --native-runs N``), from the intercept of
the whole-run fit (runs of the command with different forwarded sets; only
fits whose f_c CI lies above 0), or else from the profile's traced wall time
(an overestimate by the tracer's overhead).

The *mechanism* of a run is ``backend/transport/where[+delay]``
(:mod:`testbed.core.mechanisms`): ``transport`` is what carried the calls
(``tcp``/``ipc`` raw ZMTP, ``libzmq-tcp`` …), ``where`` is ``loopback`` for a
tcp endpoint on 127.0.0.0/8 / ::1 / localhost, ``same-node`` for an ipc
endpoint, ``remote`` otherwise; kthread runs of the mktrace module
(``testbed run --backend kmod --mode kthread``, the paper's same-node
baseline) are ``kmod-kthread/same-node``, ``kmod-kthread-faithful/same-node``
for the mktrace-faithful variant (``-flushcaller`` when the caller's CPU is
flushed too); ``+Dus`` is the delegate's injected delay (the kernel thread's
spin per leg for kthread runs); ``/offload`` marks offload-mode runs
(analysis/offload.py).  Prediction at gamma = 1 with g' = g:
``t_d = t_nd + 2 f_c sum b n``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import fit, provenance
from analysis import model as M
from analysis.profiles import Profile, from_run
from testbed.core import rundir
from testbed.core.errors import TestbedError
from testbed.core.mechanisms import mechanism

#: The paper's same-node number (section IV-B: mktrace, max measured f_c): a labelled
#: reference line in figures, never a data row.
PAPER_MKTRACE_FC_S = 40e-6


def read_cell(path: Path) -> dict:
    """The experiment cell of a run directory (``experiment.json``), or {} outside experiments."""
    try:
        cell = json.loads((Path(path) / "experiment.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{path}/experiment.json: unreadable ({exc})") from None
    return cell if isinstance(cell, dict) else {}


def identity(meta: dict, cell: dict) -> str:
    """A workload's identity: the experiment cell's workload name, else the run's
    ``workload``, else the full command line (never argv[0] alone: two different
    ``sh -c`` scripts are two workloads)."""
    if cell.get("workload"):
        return str(cell["workload"])
    if meta.get("workload"):
        return str(meta["workload"])
    return " ".join(map(str, meta.get("command") or [])) or "?"


def host_of(meta: dict, cell: dict) -> str:
    """Where a run was measured: the experiment's host label, else run.json's host name."""
    if cell.get("host"):
        return str(cell["host"])
    return str((meta.get("host") or {}).get("hostname") or "")


def run_key(meta: dict, cell: dict) -> str:
    """``identity @ host``: runs are compared only with natives of the same workload and host."""
    host = host_of(meta, cell)
    return f"{identity(meta, cell)} @ {host}" if host else identity(meta, cell)


class _Identified:
    """Key, workload identity and host of a run, from its run.json and experiment cell."""

    meta: dict
    cell: dict

    @property
    def key(self) -> str:
        return run_key(self.meta, self.cell)

    @property
    def workload(self) -> str:
        return identity(self.meta, self.cell)

    @property
    def host(self) -> str:
        return host_of(self.meta, self.cell)


@dataclass
class DelegatedRun(_Identified):
    """A delegated run directory, with the numbers the comparisons need."""

    path: Path
    meta: dict
    calls: np.ndarray = field(repr=False)
    cell: dict = field(default_factory=dict)

    @property
    def gamma(self) -> int | None:
        g = self.cell.get("gamma", self.meta.get("gamma"))
        return int(g) if g is not None else None

    @property
    def repetition(self) -> int | None:
        r = self.cell.get("repetition")
        return int(r) if r is not None else None

    @property
    def wall(self) -> float:
        return float(self.meta["wall_s"])

    @property
    def forwarded_calls(self) -> int:
        """``sum_s b(s) n(s)``: calls that were forwarded in this run."""
        if len(self.calls):
            return len(self.calls)
        return int((self.meta.get("calls") or {}).get("count", 0))

    @property
    def forwarded(self) -> list[str]:
        return list(self.meta.get("forwarded") or [])

    @property
    def group(self) -> str:
        """Policy label for cross-validation: the policy, else the forwarded set."""
        if self.cell.get("policy") or self.meta.get("policy"):
            return str(self.cell.get("policy") or self.meta["policy"])
        return ",".join(sorted(self.forwarded)) or "(none)"

    @property
    def native_wall(self) -> float | None:
        nat = self.meta.get("native")
        if isinstance(nat, dict) and nat.get("wall_s") is not None:
            return float(nat["wall_s"])
        return None

    @property
    def mechanism(self) -> str:
        return mechanism(self.meta)


@dataclass
class NativeRun(_Identified):
    """A measured native run (``kind = "native"``, written by ``testbed experiment``)."""

    path: Path
    meta: dict
    cell: dict = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return float(self.meta["wall_s"])

    @property
    def user(self) -> float:
        return float(self.meta.get("user_s") or 0.0)


def load_all(paths) -> tuple[list[Profile], list[DelegatedRun], list[NativeRun]]:
    """Load run directories, split into profiles, delegated runs and native runs."""
    profiles, runs, natives = [], [], []
    for p in paths:
        run = rundir.load(p)
        if not run.complete:
            continue  # its relay never finished (no wall time): `testbed analyze` warns
        cell = read_cell(run.path)
        if run.kind in ("delegated", "native"):
            for k in ("wall_s", "command"):
                if run.meta.get(k) is None:
                    raise TestbedError(
                        f"{run.path}: run.json has no {k!r} (malformed run directory)"
                    )
        if run.kind == "profile":
            prof = from_run(run)
            if cell:
                prof.meta = {**prof.meta, "experiment": cell}
                if cell.get("workload"):
                    prof.name = str(cell["workload"])
            profiles.append(prof)
        elif run.kind == "delegated":
            runs.append(DelegatedRun(run.path, run.meta, run.calls(), cell))
        elif run.kind == "native":
            natives.append(NativeRun(run.path, run.meta, cell))
        else:
            raise TestbedError(f"{run.path}: unknown run kind {run.kind!r}")
    _unique_names(profiles)
    return profiles, runs, natives


def load_runs(paths) -> tuple[list[Profile], list[DelegatedRun]]:
    """Load run directories, split into profiles and delegated runs (natives dropped)."""
    profiles, runs, _ = load_all(paths)
    return profiles, runs


def profile_key(p: Profile) -> str:
    return run_key(p.meta, p.meta.get("experiment") or {})


def _unique_names(profiles: list[Profile]) -> None:
    """Profiles of one workload from several hosts are named ``name @ host``; a name
    still repeated (two profiles of one host) gets ``#2``, ``#3``."""
    hosts: dict[str, set[str]] = {}
    for p in profiles:
        hosts.setdefault(p.name, set()).add(host_of(p.meta, p.meta.get("experiment") or {}))
    for p in profiles:
        h = host_of(p.meta, p.meta.get("experiment") or {})
        if len(hosts[p.name]) > 1 and h:
            p.name = f"{p.name} @ {h}"
    seen: dict[str, int] = {}
    for p in profiles:
        if p.name in seen:
            seen[p.name] += 1
            p.name = f"{p.name}#{seen[p.name]}"
        else:
            seen[p.name] = 1


def runs_frame(runs: list[DelegatedRun]) -> pd.DataFrame:
    """One row per delegated run, with its provenance (``analysis.provenance``)."""
    ids = provenance.set_ids(runs)
    cols = ["run", "workload", *provenance.COLUMNS, "mode", "group", "forwarded_calls",
            "faults", "wall_s", "exit_status"]  # fmt: skip
    return pd.DataFrame(
        [
            {
                "run": r.path.name,
                "workload": r.workload,
                **provenance.columns(r, ids),
                "mode": r.meta.get("mode", ""),
                "group": r.group,
                "forwarded_calls": r.forwarded_calls,
                "faults": int((r.meta.get("calls") or {}).get("faults", 0)),
                "wall_s": r.wall,
                "exit_status": r.meta.get("exit_status"),
            }
            for r in runs
        ],
        columns=cols,
    )


def native_times(
    profiles: list[Profile],
    runs: list[DelegatedRun],
    intercepts: dict[str, float] | None = None,
    natives: list[NativeRun] | None = None,
) -> dict[str, tuple[float, str]]:
    """``{workload key: (t_nd seconds, source)}`` following the module's order.

    ``intercepts`` come from :func:`whole_run_intercepts`; ``natives`` (measured
    native runs of ``testbed experiment``) come first: their median wall time.
    """
    out: dict[str, tuple[float, str]] = {}
    meas: dict[str, list[float]] = {}
    for nr in natives or []:
        meas.setdefault(nr.key, []).append(nr.wall)
    for k, v in meas.items():
        out[k] = (float(np.median(v)), f"measured native runs (median of {len(v)})")
    by_key: dict[str, list[float]] = {}
    for r in runs:
        if r.native_wall is not None:
            by_key.setdefault(r.key, []).append(r.native_wall)
    for k, v in by_key.items():
        out.setdefault(k, (float(np.median(v)), "run.json native"))
    zero: dict[str, list[float]] = {}
    for r in runs:
        if r.forwarded_calls == 0 and r.key not in out:
            zero.setdefault(r.key, []).append(r.wall)
    for k, v in zero.items():
        out[k] = (float(np.median(v)), "run with nothing forwarded")
    for p in profiles:
        nat, pk = p.meta.get("native"), profile_key(p)
        if pk not in out and isinstance(nat, dict) and nat.get("wall_s") is not None:
            out[pk] = (float(nat["wall_s"]), "profile native runs (untraced)")
    for k, v in (intercepts or {}).items():
        if k not in out:
            out[k] = (v, "whole-run fit intercept")
    for p in profiles:
        if profile_key(p) not in out:
            out[profile_key(p)] = (p.wall, "profile wall (traced)")
    return out


def whole_run_intercepts(runs: list[DelegatedRun], native: dict) -> dict[str, float]:
    """t_nd per command from the whole-run fit of each mechanism (mean over mechanisms)."""
    acc: dict[str, list[float]] = {}
    for rs in by_mechanism(runs).values():
        obs = whole_run_obs(rs, native)
        if len(obs) and (obs["x"] > 0).any():
            w = fit.whole_run(obs)
            if w.f_c.lo > 0:  # only a fit whose f_c is significantly positive
                for k, v in w.intercepts.items():
                    acc.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def pooled_samples(runs: list[DelegatedRun]) -> tuple[np.ndarray, np.ndarray]:
    fcs, sizes = [], []
    for r in runs:
        fc, size = fit.fc_samples(r.calls, str(r.meta.get("mode") or "cost"))
        fcs.append(fc)
        sizes.append(size)
    if not fcs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(fcs), np.concatenate(sizes)


def by_mechanism(runs: list[DelegatedRun]) -> dict[str, list[DelegatedRun]]:
    out: dict[str, list[DelegatedRun]] = {}
    for r in runs:
        out.setdefault(r.mechanism, []).append(r)
    return dict(sorted(out.items()))


def by_host_mechanism(runs: list[DelegatedRun]) -> dict[tuple[str, str], list[DelegatedRun]]:
    """Runs per (host, mechanism): f_c belongs to one path, from one host."""
    out: dict[tuple[str, str], list[DelegatedRun]] = {}
    for r in runs:
        out.setdefault((r.host, r.mechanism), []).append(r)
    return dict(sorted(out.items()))


def loo_fc(runs: list[DelegatedRun]) -> dict[Path, tuple[float, str]]:
    """Per run: the pooled mean per-call f_c of every *other* run of its host and
    mechanism (gamma = 1 or none), and which runs those were (``host/run;...``)."""
    out: dict[Path, tuple[float, str]] = {}
    for (host, _), rs in by_host_mechanism(runs).items():
        parts = {id(r): fit.fc_samples(r.calls, str(r.meta.get("mode") or "cost"))[0]
                 for r in rs}  # fmt: skip
        for r in rs:
            others = [o for o in rs if o is not r and (o.gamma is None or o.gamma == 1)]
            k = sum(len(parts[id(o)]) for o in others)
            fc = sum(float(parts[id(o)].sum()) for o in others) / k if k else np.nan
            names = ";".join(f"{host}/{o.path.name}" if host else o.path.name for o in others)
            out[r.path] = (fc, names)
    return out


def whole_run_obs(runs: list[DelegatedRun], native: dict) -> pd.DataFrame:
    """Observations for :func:`analysis.fit.whole_run`; workloads with one x only are dropped."""
    rows = [{"workload": r.key, "t_d": r.wall, "x": 2.0 * r.forwarded_calls} for r in runs]
    for key in {r.key for r in runs}:
        if key in native and native[key][1].startswith(("run.json native", "measured native")):
            rows.append({"workload": key, "t_d": native[key][0], "x": 0.0})
    obs = pd.DataFrame(rows, columns=["workload", "t_d", "x"])
    keep = obs.groupby("workload")["x"].transform("nunique") >= 2
    return obs[keep].reset_index(drop=True)


def fit_mechanisms(
    runs: list[DelegatedRun], native: dict, level: float = 0.95, by_host: bool = False
) -> pd.DataFrame:
    """One row per mechanism (per host and mechanism with ``by_host``): per-call f_c
    (median, CI, mean), whole-run f_c, size term; ``hosts`` says whose runs were pooled."""
    rows = []
    groups = (by_host_mechanism(runs) if by_host
              else {("", m): rs for m, rs in by_mechanism(runs).items()})  # fmt: skip
    for (host, mech), rs in groups.items():
        fc, size = pooled_samples(rs)
        pc = fit.per_call(fc, level)
        row = {"host": host, "mechanism": mech} if by_host else {"mechanism": mech}
        row.update(runs=len(rs), **pc.as_row())
        row["hosts"] = ",".join(sorted({r.host or "–" for r in rs}))
        obs = whole_run_obs(rs, native)
        row.update(whole_fc_s=np.nan, whole_lo_s=np.nan, whole_hi_s=np.nan, whole_dof=0)
        if len(obs) and (obs["x"] > 0).any():
            w = fit.whole_run(obs, level)
            row.update(
                whole_fc_s=w.f_c.value, whole_lo_s=w.f_c.lo, whole_hi_s=w.f_c.hi, whole_dof=w.dof
            )
        sz = fit.size_aware(fc, size, level)
        row.update(
            alpha_s=sz.alpha.value,
            beta_ns_per_byte=sz.beta.value * 1e9,
            beta_lo_ns_per_byte=sz.beta.lo * 1e9,
            beta_hi_ns_per_byte=sz.beta.hi * 1e9,
            beta_p=sz.p_value,
            size_significant=sz.significant,
        )
        rows.append(row)
    return pd.DataFrame(rows)


def predicted_vs_measured(
    runs: list[DelegatedRun],
    native: dict,
    fc_by_mech: dict[str, float] | None = None,
    profiles: list[Profile] | None = None,
    fc_by_run: dict[Path, tuple[float, str]] | None = None,
) -> pd.DataFrame:
    """Per run: measured t_d, predicted ``t_nd + 2 f_c sum b n`` and relative error.

    ``f_c`` is the run's entry of ``fc_by_run`` (:func:`loo_fc`: fitted on the
    *other* runs) when given, else its mechanism's entry of ``fc_by_mech``
    (fitted on all runs, this one included).  ``in_sample`` is True when the
    prediction's fit includes the run: ``fc_by_mech``, or a t_nd from the
    whole-run fit's intercept.  ``sum b n`` is the run's own count of forwarded calls.  When a
    profile of the same command is given, the row also has the prediction made
    *before* running: ``profile_forwarded_calls`` = the profile's ``sum b(s)
    n(s)`` for the run's forwarded set, and ``profile_predicted_t_d_s`` from it.
    """
    by_key = {profile_key(p): p for p in profiles or []}
    ids = provenance.set_ids(runs)
    rows = []
    for r in runs:
        t_nd, src = native.get(r.key, (np.nan, "none"))
        if fc_by_run is not None:
            f_c, f_from = fc_by_run.get(r.path, (np.nan, ""))
            in_sample = "intercept" in src  # t_nd fitted on runs that include this one
        else:
            f_c, f_from = (fc_by_mech or {}).get(r.mechanism, np.nan), f"all {r.mechanism} runs"
            in_sample = True
        pred = float(M.t_d(t_nd, np.zeros(1), [r.forwarded_calls], [1.0], 1.0, f_c))
        prof = by_key.get(r.key)
        if prof is not None:
            nrs = r.meta.get("forwarded_nrs") or []
            b = np.isin(prof.nrs, [int(x) for x in nrs]).astype(float)
            p_calls = float((b * prof.n).sum())
            p_pred = float(M.t_d(t_nd, np.zeros(1), [p_calls], [1.0], 1.0, f_c))
        else:
            p_calls, p_pred = np.nan, np.nan
        rows.append(
            {
                "run": r.path.name,
                "workload": r.workload,
                **provenance.columns(r, ids),
                "group": r.group,
                "forwarded_calls": r.forwarded_calls,
                "t_nd_s": t_nd,
                "t_nd_source": src,
                "f_c_s": f_c,
                "f_c_from": f_from,
                "in_sample": in_sample,
                "measured_t_d_s": r.wall,
                "predicted_t_d_s": pred,
                "rel_error": (pred - r.wall) / r.wall if r.wall > 0 else np.nan,
                "profile_forwarded_calls": p_calls,
                "profile_predicted_t_d_s": p_pred,
                "profile_rel_error": (p_pred - r.wall) / r.wall if r.wall > 0 else np.nan,
            }
        )
    return pd.DataFrame(rows)


def cross_validate(runs: list[DelegatedRun], native: dict) -> pd.DataFrame:
    """Fit f_c (per-call mean) on the runs of one policy, predict the other policies of
    the same host and mechanism."""
    rows = []
    for (host, mech), rs in by_host_mechanism(runs).items():
        groups: dict[str, list[DelegatedRun]] = {}
        for r in rs:
            groups.setdefault(r.group, []).append(r)
        for train, tr in groups.items():
            fc = fit.per_call(pooled_samples(tr)[0]).mean.value
            for test, te in groups.items():
                if test == train:
                    continue
                pvm = predicted_vs_measured(te, native, {mech: fc})
                err = pvm["rel_error"].abs()
                rows.append(
                    {
                        "host": host,
                        "mechanism": mech,
                        "train": train,
                        "test": test,
                        "f_c_train_s": fc,
                        "test_runs": len(te),
                        "mean_abs_rel_error": float(err.mean()),
                        "max_abs_rel_error": float(err.max()),
                    }
                )
    return pd.DataFrame(
        rows,
        columns=["host", "mechanism", "train", "test", "f_c_train_s", "test_runs", "mean_abs_rel_error",
                 "max_abs_rel_error"],
    )  # fmt: skip


def mechanism_table(
    mech_fits: pd.DataFrame,
    profiles: list[Profile],
    policy: str = "min-freq:20%",
    gammas=(2.0, 10.0),
) -> pd.DataFrame:
    """Same-node vs remote, side by side: one row per *measured* mechanism with its
    f_c (the per-call mean, which totals scale with), CI and the predicted S_r at
    each gamma for each profiled workload under ``policy``.  The paper's figure
    (``PAPER_MKTRACE_FC_S``) is never a row: it is the reference line of
    ``figures.fig_fc_mechanisms``."""
    rows = []
    src = [
        (getattr(m, "host", None), m.mechanism, m.f_c_mean_s, m.f_c_mean_lo_s, m.f_c_mean_hi_s,
         int(m.calls))
        for m in mech_fits.itertuples()
    ] if len(mech_fits) else []  # fmt: skip
    gam = np.asarray(gammas, dtype=float)
    for host, mech, fc, lo, hi, calls in src:
        row = {} if host is None else {"host": host}
        row.update(mechanism=mech, f_c_s=fc, f_c_lo_s=lo, f_c_hi_s=hi, calls=calls)
        for p in profiles:
            s = M.S_r(p.C, p.g, p.n, p.b(policy), gam, fc)
            for g, v in zip(gam, np.atleast_1d(s), strict=True):
                row[f"S_r {p.name} γ={g:g}"] = float(v)
        rows.append(row)
    return pd.DataFrame(rows)
