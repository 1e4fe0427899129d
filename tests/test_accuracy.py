"""analysis.accuracy on synthetic run directories with known answers.

Per-syscall truths recovered within their CIs, measured natives preferred to
every fitted baseline, workload identity by cell name or full command line
(never argv[0]), and bad input flagged instead of silently used.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis import accuracy, compare
from analysis.report import build_report, render_markdown, write_report
from analysis.synthetic import delegated_run, native_run

pytestmark = pytest.mark.unit

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


@pytest.fixture(scope="module")
def tree_report(tree, tmp_path_factory):
    """``report.md`` of ``tree``: the one report the unit tests render (figures are most of
    a report's time); other report tests check ``build_report``'s content, and
    ``test_the_rendered_report_is_its_content`` that rendering writes exactly that."""
    return write_report([tree], tmp_path_factory.mktemp("rep"))


def test_measured_natives_mean_no_fit_intercept(tree_report):
    report = tree_report
    acc = pd.read_csv(report.parent / "tables" / "model_accuracy.csv")
    pvm = pd.read_csv(report.parent / "tables" / "predicted_vs_measured.csv")
    assert len(acc) == 12
    assert acc["t_nd_source"].str.startswith("measured native (6 runs)").all()
    assert pvm["t_nd_source"].str.startswith("measured native runs").all()
    assert not pvm["t_nd_source"].str.contains("intercept", regex=False).any()
    text = report.read_text()
    head = text.split("## Profiles")[0]
    assert "**Model accuracy: mean |error|" in head and "intercept" not in head
    assert {"workload", "policy", "gamma", "measured", "rel_error", "pred_pooled",
            "pred_per_syscall", "pred_size", "relay_cpu_share"} <= set(acc.columns)  # fmt: skip


def test_report_content_is_computed_without_rendering(tree, tmp_path):
    """build_report: the tables, numbers and figure list, with nothing written or drawn."""
    before = sorted(p.name for p in tree.iterdir())
    c = build_report([tree])
    assert sorted(p.name for p in tree.iterdir()) == before
    assert len(c.runs) == 12 and len(c.natives) == 12 and not c.profiles
    assert len(c.tables["model_accuracy"]) == 12 and len(c.predicted_vs_measured) == 12
    mean, mx, n = c.prediction_error()
    assert n == 12 and 0 <= mean <= mx
    names = [f.name for f in c.figures]
    assert "fig2_naive" in names and "measured_vs_predicted" in names and "offload" not in names
    md = render_markdown(c, "then")
    assert md.startswith("# Delegation testbed") and "Generated then from 24 run directories" in md
    assert f"over {n} runs." in md


def test_the_rendered_report_is_its_content(tree, tree_report):
    """write_report writes build_report's content: report.md, every table as CSV, every
    figure as PNG and SVG (the other report tests check the content only)."""
    import json
    import re
    import xml.etree.ElementTree as ET

    c = build_report([tree])
    out = tree_report.parent
    text = tree_report.read_text()
    generated = re.search(r"Generated (.+?) from \d+ run directories", text).group(1)
    assert text == render_markdown(c, generated)
    assert sorted(p.stem for p in (out / "tables").glob("*.csv")) == sorted(c.tables)
    for name, df in c.tables.items():
        assert (out / "tables" / f"{name}.csv").read_text() == df.to_csv(index=False), name
    names = [f.name for f in c.figures]
    assert "fc_per_mechanism" in names and "measured_vs_predicted" in names
    assert sorted(p.name for p in (out / "figures").iterdir()) == sorted(
        f"{n}.{ext}" for n in names for ext in ("png", "svg")
    )
    for n in names:
        assert (out / "figures" / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", n
        assert ET.fromstring((out / "figures" / f"{n}.svg").read_bytes()).tag.endswith("svg"), n
    assert len(json.loads((out / "runs.json").read_text())) == len(c.run_metas)


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
    acc = build_report([tmp_path]).tables["model_accuracy"]  # rendered: tree_report
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
    assert {accuracy.family(r) for r in runs} == {"gain"}  # runs named before gainbench
    assert accuracy.family(SimpleNamespace(workload="gainbench-g16", gamma=16)) == "gainbench"
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
