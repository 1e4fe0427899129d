"""analysis.accuracy on synthetic run directories with known answers.

Per-syscall truths recovered within their CIs, measured natives preferred to
every fitted baseline, workload identity by cell name or full command line
(never argv[0]), and bad input flagged instead of silently used.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import accuracy, compare
from analysis.report import write_report
from analysis.synthetic import delegated_run, native_run

TRUTH = {"read": 30e-6, "write": 80e-6, "lseek": 12e-6}
HOST = "node-a"


def _cell(workload: str, policy: str, rep: int, gamma: int | None = None, host: str = HOST):
    return {"workload": workload, "policy": policy, "repetition": rep, "gamma": gamma,
            "host": host}  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An experiment-like tree: natives and delegated runs of two workloads, three sets."""
    base = tmp_path_factory.mktemp("acc")
    sets = {"read,write": {"read": 3000, "write": 2000},
            "max-freq:20%": {"write": 2000, "lseek": 4000},
            "min-freq:20%": {"lseek": 500}}  # fmt: skip
    i = 0
    for w, t_nd in (("alpha", 1.0), ("beta", 2.0)):
        for rep in (1, 2):
            for pol, fwd in sets.items():
                i += 1
                native_run(base / f"n{i}", ["prog", w], t_nd * (1 + 0.002 * rep),
                           hostname=HOST, cell=_cell(w, pol, rep))  # fmt: skip
                delegated_run(base / f"d{i}", ["prog", w], fwd, TRUTH, t_nd, policy=pol,
                              native=False, seed=i, call_noise=0.3, hostname=HOST,
                              cell=_cell(w, pol, rep))  # fmt: skip
    return base


def test_per_syscall_fc_recovers_truths_within_ci(tree):
    _, runs, _ = compare.load_all(sorted(p for p in tree.iterdir() if p.name.startswith("d")))
    # three intervals at once: Bonferroni, each at 1 - 0.05/3, so all hold with >= 95 %
    tab = accuracy.per_syscall_fc(runs, level=1 - 0.05 / len(TRUTH)).set_index("syscall")
    # log-normal noise with median 1 and sigma 0.3: the mean is truth * exp(sigma^2 / 2)
    for name, truth in TRUTH.items():
        row = tab.loc[name]
        mean_truth = truth * np.exp(0.3**2 / 2)
        assert row.f_c_mean_lo_s <= mean_truth <= row.f_c_mean_hi_s, (name, row)
        assert (
            row.f_c_mean_hi_s - row.f_c_mean_lo_s < 0.1 * mean_truth
        )  # a tight CI, not a wide one
    # and the pooled mean lies outside every one of those CIs: per-syscall costs differ
    pooled = compare.pooled_samples(runs)[0].mean()
    assert not any(tab.loc[n].f_c_mean_lo_s <= pooled <= tab.loc[n].f_c_mean_hi_s for n in TRUTH)


def test_per_syscall_predictor_beats_pooled_when_costs_differ(tree):
    profiles, runs, natives = compare.load_all(sorted(tree.iterdir()))
    pred = accuracy.predictions(runs, natives, {})
    pol = pred[pred["scheme"] == "policy"]
    assert len(pol) == len(runs) and pol["pred_pooled"].notna().all()
    # wall = t_nd + sum of overheads: per-syscall is off only by sampling noise and
    # the 0.2 % spread of the natives; pooled mixes cheap lseek with costly write
    per, pooled = pol["err_per_syscall"].abs(), pol["err_pooled"].abs()
    assert per.max() < 0.02 and pooled.max() > 3 * per.max()
    name, mean, mx, n = accuracy.best(pred, "policy")
    assert name.startswith(("per_syscall", "whole_run")) and mean < 0.01 and n == len(runs)


def test_measured_natives_mean_no_fit_intercept(tree, tmp_path):
    report = write_report([tree], tmp_path / "rep")
    acc = pd.read_csv(tmp_path / "rep" / "tables" / "model_accuracy.csv")
    pvm = pd.read_csv(tmp_path / "rep" / "tables" / "predicted_vs_measured.csv")
    assert len(acc) == 12
    assert acc["t_nd_source"].str.startswith("measured native (6 runs)").all()
    assert pvm["t_nd_source"].str.startswith("measured native runs").all()
    assert not pvm["t_nd_source"].str.contains("intercept", regex=False).any()
    text = report.read_text()
    head = text.split("## Profiles")[0]
    assert "**Model accuracy: mean |error|" in head and "intercept" not in head
    assert {"workload", "policy", "gamma", "measured", "rel_error", "pred_pooled",
            "pred_per_syscall", "pred_size", "relay_cpu_share"} <= set(acc.columns)  # fmt: skip


def test_two_sh_c_workloads_are_never_grouped(tmp_path):
    a, b = ["sh", "-c", "gzip -c x > y"], ["sh", "-c", "sqlite3 db < s.sql"]
    paths = [
        delegated_run(tmp_path / "a1", a, {"write": 100}, 50e-6, 0.5, seed=1, policy="read,write"),
        delegated_run(tmp_path / "b1", b, {"write": 100}, 50e-6, 3.0, seed=2, policy="read,write"),
        delegated_run(tmp_path / "a2", a, {"read": 200}, 50e-6, 0.5, seed=3, policy="max-freq:20%"),
        delegated_run(tmp_path / "b2", b, {"read": 200}, 50e-6, 3.0, seed=4, policy="max-freq:20%"),
    ]
    _, runs = compare.load_runs(paths)
    assert len({r.workload for r in runs}) == 2 and len({r.key for r in runs}) == 2
    native = compare.native_times([], runs)
    assert sorted(v[0] for v in native.values()) == [0.5, 3.0]  # each its own t_nd
    frame = compare.runs_frame(runs)
    assert set(frame["workload"]) == {" ".join(a), " ".join(b)}


def test_other_host_natives_are_flagged_not_used(tmp_path):
    cell = _cell("alpha", "read,write", 1)
    native_run(tmp_path / "n1", ["prog"], 1.0, hostname="elsewhere",
               cell={**cell, "host": "elsewhere"})  # fmt: skip
    for i, pol in enumerate(("read,write", "max-freq:20%")):
        delegated_run(tmp_path / f"d{i}", ["prog"], {"write": 1000}, 50e-6, 1.0, policy=pol,
                      native=False, seed=i, cell=_cell("alpha", pol, 1))  # fmt: skip
    _, runs, natives = compare.load_all(sorted(tmp_path.iterdir()))
    pred = accuracy.predictions(runs, natives, {})
    pol = pred[pred["scheme"] == "policy"]
    assert (
        pol["flag"].str.contains("natives only from host(s) elsewhere: not used", regex=False).all()
    )
    assert pol["pred_pooled"].isna().all()  # no native time here: nothing predicted, said so


def test_missing_natives_are_flagged(tmp_path):
    for i, pol in enumerate(("read,write", "max-freq:20%")):
        delegated_run(tmp_path / f"d{i}", ["prog"], {"write": 1000}, 50e-6, 1.0, policy=pol,
                      native=True, seed=i, cell=_cell("alpha", pol, 1))  # fmt: skip
    write_report([tmp_path], tmp_path / "rep")
    acc = pd.read_csv(tmp_path / "rep" / "tables" / "model_accuracy.csv")
    assert (
        acc["flag"]
        .str.contains("no measured native runs; t_nd from run.json native", regex=False)
        .all()
    )


def test_gain_runs_are_predicted_from_gamma_one_only(tmp_path):
    """Gain runs: C/γ + (t_nd − C) + forwarding, with t_nd and C from the γ = 1 natives."""
    C, G = 2.0, 0.1
    i = 0
    for g in (1, 4):
        for pol, fwd in (("read,write", {"write": 2000}), ("max-freq:20%", {"write": 1000})):
            for rep in (1, 2):
                i += 1
                cell = _cell(f"gain-g{g}", pol, rep, gamma=g)
                native_run(tmp_path / f"n{i}", ["gb", str(g)], C / g + G, user_s=C / g, sys_s=G,
                           hostname=HOST, cell=cell)  # fmt: skip
                delegated_run(tmp_path / f"d{i}", ["gb", str(g)], fwd, 50e-6, C / g + G,
                              policy=pol, native=False, seed=i, hostname=HOST, cell=cell)  # fmt: skip
    _, runs, natives = compare.load_all(sorted(tmp_path.iterdir()))
    pred = accuracy.predictions(runs, natives, {})
    pol = pred[pred["scheme"] == "policy"]
    assert set(pol["gamma"]) == {1, 4}
    assert (pol["t_nd"] == C + G).all() and (pol["C"] == C).all()  # γ = 1 natives only
    assert pol["err_per_syscall"].abs().max() < 0.01
    sp = accuracy.gain_speedups(runs, natives, [])
    nat = sp[sp["set"] == "native"].set_index("gamma")["measured"]
    assert nat[1] == pytest.approx(1.0) and nat[4] == pytest.approx((C + G) / (C / 4 + G))
    rw = sp[sp["set"] == "read,write"].set_index("gamma")
    assert rw.loc[4, "S_r"] == pytest.approx(rw.loc[4, "measured"], rel=0.02)
    assert rw.loc[4, "S_n"] == pytest.approx(1 / (G / (C + G) + (C / (C + G)) / 4))
