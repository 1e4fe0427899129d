"""A report a researcher can cite (issue 22), checked from the data, not from golden text.

* the headline's predictor is chosen on training runs only: a planted predictor
  that is perfect on the test runs and poor on the training runs is the
  post-hoc best and is never chosen;
* the headline's numbers are the chosen out-of-sample predictions, with a
  seeded bootstrap CI and a "how many runs" guide;
* every per-run table carries host, mechanism, transport, policy, resolved set
  and cell; two lab nodes stay apart; each prediction says which runs fitted it,
  all of its own host;
* mechanisms whose runs forwarded different resolved sets are not pooled, and
  one line says so;
* no in-sample figure is unlabelled, the accuracy figure plots the headline's
  predictions, every figure of a report passes the readability check;
* report.md holds no metadata dump (runs.json does).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection, QuadMesh
from matplotlib.text import Text

from analysis import accuracy, compare, figcheck, figures
from analysis.profiles import shipped_profiles
from analysis.report import build_report, one_per_workload, render_markdown
from analysis.synthetic import delegated_run, native_run
from testbed.core import errors

pytestmark = pytest.mark.unit

TRUTH = {"read": 30e-6, "write": 80e-6, "lseek": 12e-6}
SETS = {"read,write": {"read": 3000, "write": 2000},
        "max-freq:20%": {"write": 2000, "lseek": 4000},
        "min-freq:20%": {"lseek": 500}}  # fmt: skip
#: node2 resolved max-freq:20% from its own profile to one more syscall type
NODE2_MAXFREQ = {"write": 2000, "lseek": 4000, "read": 300}
REMOTE, LOOPBACK = "tcp://10.213.47.3:5555", "tcp://127.0.0.1:5555"


def _cell(host: str, workload: str, policy: str, rep: int, gamma=None, delegate="node3"):
    run_id = f"{workload}.{policy.replace(':', '-').replace('%', 'pct')}.{delegate}.r{rep}"
    return {"plan": "p", "host": host, "run_id": run_id, "workload": workload, "gamma": gamma,
            "policy": policy, "delegate": delegate, "repetition": rep}  # fmt: skip


def _lab_tree(base, hosts=("node1", "node2"), loopback_on=("node2",), gain=True):
    """Runs as two lab nodes write them: same cells on both, the delegate node3 remote,
    node2 also against a delegate on loopback; natives interleaved."""
    i = 0
    for host in hosts:
        targets = [("node3", REMOTE)] + ([("local", LOOPBACK)] if host in loopback_on else [])
        for delegate, endpoint in targets:
            for w, t_nd in (("alpha", 1.0), ("beta", 2.0)):
                for rep in (1, 2):
                    for pol, fwd in SETS.items():
                        if host == "node2" and pol == "max-freq:20%":
                            fwd = NODE2_MAXFREQ
                        i += 1
                        cell = _cell(host, w, pol, rep, delegate=delegate)
                        d = base / host / delegate
                        native_run(d / "native" / cell["run_id"], ["prog", w],
                                   t_nd * (1 + 0.004 * rep), hostname=host, cell=cell)  # fmt: skip
                        delegated_run(d / cell["run_id"], ["prog", w], fwd, TRUTH, t_nd,
                                      policy=pol, native=False, seed=i, call_noise=0.3,
                                      hostname=host, cell=cell, endpoint=endpoint)  # fmt: skip
    if gain:  # the gain benchmark on node1: gamma 1 and 4, two sets
        C, G = 2.0, 0.1
        for g in (1, 4):
            for pol, fwd in (("read,write", {"write": 2000}), ("max-freq:20%", {"write": 1000})):
                for rep in (1, 2):
                    i += 1
                    cell = _cell("node1", f"gainbench-g{g}", pol, rep, gamma=g)
                    d = base / "node1" / "gain"
                    native_run(d / "native" / cell["run_id"], ["gb", str(g)], C / g + G,
                               user_s=C / g, sys_s=G, hostname="node1", cell=cell)  # fmt: skip
                    delegated_run(d / cell["run_id"], ["gb", str(g)], fwd, 50e-6, C / g + G,
                                  policy=pol, native=False, seed=i, hostname="node1",
                                  cell=cell, endpoint=REMOTE)  # fmt: skip
    return base


@pytest.fixture(autouse=True)
def _close_figures():
    """Each test's figures are closed after it (pyplot keeps them otherwise)."""
    yield
    plt.close("all")


@pytest.fixture(scope="session")
def labrep(tmp_path_factory):
    """The report content of a two-node lab tree, each figure drawn once: its readability
    problems and its texts."""
    base = _lab_tree(tmp_path_factory.mktemp("lab") / "results")
    c = build_report([base])
    drawn = {}
    for f in c.figures:
        fig = f.draw()
        texts = [t.get_text() for t in fig.findobj(Text) if t.get_visible()]
        points = [np.asarray(pc.get_offsets(), float) for ax in fig.axes
                  for pc in ax.collections if isinstance(pc, PathCollection)]  # fmt: skip
        drawn[f.name] = SimpleNamespace(problems=figcheck.problems(fig), texts=texts,
                                        points=points, spec=f)  # fmt: skip
        figures.plt.close(fig)
    return SimpleNamespace(base=base, c=c, md=render_markdown(c, "now"), drawn=drawn)


# ---------------------------------------------------------------- the headline


def _policy_rows(pred):
    return pred[pred["scheme"] == "policy"]


def test_headline_predictor_is_chosen_on_training_runs_only(tmp_path, monkeypatch):
    """A predictor perfect on every test run (fits on two policies) and 100 % off on every
    training run (fits on one policy): the post-hoc best, never the chosen one."""
    base = _lab_tree(tmp_path, hosts=("node1",), loopback_on=(), gain=False)
    _, runs, natives = compare.load_all(sorted(p.parent for p in base.rglob("run.json")))
    real = accuracy._predict

    def planted(p, s, ref, f, paired=np.nan):
        if p != "planted":
            return real(p, s, ref, f, paired)
        return s.run.wall if len(f.groups) >= 2 else 2.0 * s.run.wall

    monkeypatch.setattr(accuracy, "_predict", planted)
    pred = accuracy.predictions(runs, natives, {}, predictors=(*accuracy.PREDICTORS, "planted"))
    pol = _policy_rows(pred)
    assert len(pol) == len(runs) == 12 and (pol["err_planted"] == 0).all()
    assert accuracy.best(pred, "policy")[0] == "planted"  # best on the test rows ...
    assert not (pol["predictor"] == "planted").any()  # ... and never chosen
    assert (pol["chosen_by"] == "inner cross-validation").all()
    assert (pol["inner_runs"] == 8).all()  # the 8 training runs, each predicted from 4
    # what was chosen is what the report states: its own errors, none of them zero
    assert (pol["rel_error"] == [r[f"err_{r.predictor}"] for _, r in pol.iterrows()]).all()
    assert pol["rel_error"].abs().min() > 0
    # without the plant the choice is the same: the planted one never won an inner fold
    monkeypatch.setattr(accuracy, "_predict", real)
    honest = _policy_rows(accuracy.predictions(runs, natives, {}))
    assert list(honest["predictor"]) == list(pol["predictor"])


def test_the_plans_predictor_is_used_and_two_plans_disagreeing_are_refused(tmp_path):
    base = _lab_tree(tmp_path, hosts=("node1",), loopback_on=(), gain=False)
    cells = sorted(base.rglob("experiment.json"))
    for f in cells:  # as testbed experiment writes them for a plan with "predictor: size"
        f.write_text(json.dumps(json.loads(f.read_text()) | {"plan": "p1", "predictor": "size"}))
    c = build_report([base])
    acc = c.tables["model_accuracy"]
    assert (acc["predictor"] == "size").all() and (acc["chosen_by"] == "declared").all()
    head = render_markdown(c, "now").split("## Limits")[0]
    assert "`size`, declared before the analysis in the plan (p1)" in head
    # the command line wins over the plan, and says so
    md = render_markdown(build_report([base], predictor="pooled"), "now").split("## Limits")[0]
    assert "`pooled`, declared before the analysis on the command line (--predictor)" in md
    forwarded = next(f for f in cells if (f.parent / "calls.bin").exists())
    forwarded.write_text(
        json.dumps(json.loads(forwarded.read_text()) | {"plan": "p2", "predictor": "whole_run"})
    )
    with pytest.raises(
        errors.TestbedError,
        match=r"declare different predictors \(size \(plan p1\); whole_run \(plan p2\)\)",
    ):
        build_report([base])


def test_a_declared_predictor_is_used_for_every_run(tmp_path):
    base = _lab_tree(tmp_path, hosts=("node1",), loopback_on=(), gain=False)
    c = build_report([base], predictor="size")
    acc = c.tables["model_accuracy"]
    assert (acc["predictor"] == "size").all() and (acc["chosen_by"] == "declared").all()
    assert (acc["rel_error"] == acc["err_size"]).all()
    md = render_markdown(c, "now")
    assert "the predictor is `size`, declared before the analysis" in md.split("## Limits")[0]
    with pytest.raises(errors.TestbedError, match="unknown predictor"):
        accuracy.predictions(c.runs, c.natives, {}, declared="oracle")


def test_the_headline_is_the_chosen_predictions_with_a_seeded_ci(labrep):
    acc, head = labrep.c.tables["model_accuracy"], labrep.c.tables["accuracy_headline"]
    assert set(head["class"]) == {"workloads", "gain γ≤8"}
    for h in head.itertuples():
        rows = acc[np.asarray(accuracy.klass(acc)) == h[1]]
        e = rows["rel_error"].abs()
        assert h.runs == len(rows) and h.mean_abs_error == pytest.approx(e.mean())
        assert h.max_abs_error == pytest.approx(e.max())
        lo, hi = accuracy.bootstrap_mean_ci(e.to_numpy(), seed=0)
        assert (h.ci_lo, h.ci_hi) == (lo, hi) and lo <= h.mean_abs_error <= hi < e.max()
        assert accuracy.bootstrap_mean_ci(e.to_numpy(), seed=0) == (lo, hi)  # seeded
        assert accuracy.bootstrap_mean_ci(e.to_numpy(), seed=1) != (lo, hi)
        # the guide: a +-2 pt CI needs runs in proportion to the square of the half-width
        want = int(np.ceil(len(e) * ((hi - lo) / 2 / accuracy.TARGET_HALF_WIDTH) ** 2))
        assert h.runs_for_2pt == max(want, len(e))
        line = f"**Model accuracy: mean |error| {h.mean_abs_error:.1%} [95 % CI "
        assert line + f"{lo:.1%}, {hi:.1%}] for {h[1]}**" in labrep.md.split("## Limits")[0]
    assert "nested cross-validation" in labrep.md.split("## Limits")[0]
    assert "How many runs" in labrep.md
    # the noise floor: each native against the median of the others, for every class
    assert (acc["native_floor"].notna()).all()
    assert "a native run differs from the median of the others by" in labrep.md
    terms = labrep.c.tables["error_terms"].set_index("class")
    floor = "noise floor: |native / median of the other natives - 1|"
    for cls in head["class"]:
        rows = acc[np.asarray(accuracy.klass(acc)) == cls]
        assert terms.loc[cls, floor] == pytest.approx(rows["native_floor"].mean())
    # the post-hoc per-predictor table is labelled as diagnosis, not presented as a result
    assert "*for diagnosis only*" in labrep.md


# ---------------------------------------------------------------- provenance


def test_every_table_says_host_and_fit_and_two_lab_nodes_stay_apart(labrep):
    c = labrep.c
    for name in ("model_accuracy", "runs", "predicted_vs_measured", "fc_per_mechanism",
                 "cross_validation", "mechanisms_predictions", "mechanisms_per_workload"):  # fmt: skip
        assert "host" in c.tables[name], name
        assert set(c.tables[name]["host"]) == {"node1", "node2"}, name
    acc = c.tables["model_accuracy"]
    for col in ("mechanism", "transport", "policy", "set", "cell", "params_from", "train_run_ids"):
        assert acc[col].astype(str).str.len().gt(0).all(), col
    # the same cells on both nodes: apart by host, never merged
    assert (
        acc["cell"].duplicated().any() and not acc.duplicated(["host", "mechanism", "cell"]).any()
    )
    # each prediction's parameters come from other runs of its own host and mechanism only
    for r in acc.itertuples():
        ids = r.train_run_ids.split(";")
        assert len(ids) == r.train_runs > 0 and all(i.startswith(f"{r.host}/") for i in ids)
        assert f"{r.host}/{r.run}" not in ids
        assert r.params_from.startswith(f"{r.train_runs} runs of {r.host} {r.mechanism}")
    pvm = c.tables["predicted_vs_measured"]
    for r in pvm.itertuples():
        assert not r.in_sample and f"{r.host}/{r.run}" not in r.f_c_from.split(";")
        assert all(x.startswith(f"{r.host}/") for x in r.f_c_from.split(";"))
    # the policies as resolved: max-freq:20% is two sets, one per node
    res = c.tables["policies_resolved"].set_index(["host", "workload", "policy"])
    assert not res.index.duplicated().any()  # one set per host, workload and policy here
    assert res.loc[("node1", "alpha", "max-freq:20%"), "types"] == 2
    assert res.loc[("node2", "alpha", "max-freq:20%"), "types"] == 3
    assert res.loc[("node1", "gainbench-g1", "max-freq:20%"), "types"] == 1
    rw = res.xs("read,write", level="policy")["set"]
    assert rw.loc[("node1", "alpha")] == rw.loc[("node2", "alpha")]


def test_the_native_floor_is_each_native_against_the_median_of_the_others():
    assert accuracy.native_floor(np.array([2.0, 2.0, 2.0])) == 0
    # 1 vs median(2, 3) = 2.5: 0.6; 2 vs 2: 0; 3 vs 1.5: 1
    assert accuracy.native_floor(np.array([1.0, 2.0, 3.0])) == pytest.approx((0.6 + 0 + 1) / 3)
    assert np.isnan(accuracy.native_floor(np.array([1.0, 2.0])))  # needs 3 runs


def test_flags_are_separated(tmp_path):
    """Two flags on one row read as two: no run together text ("…(untraced)nothing …")."""
    for i in range(2):  # one policy, natives only in run.json: nothing to train on either
        delegated_run(tmp_path / f"d{i}", ["prog"], {"write": 100}, 50e-6, 1.0, seed=i)
    acc = build_report([tmp_path]).tables["model_accuracy"]
    assert len(acc) == 2
    for f in acc["flag"]:
        assert f == ("no measured native runs; t_nd from run.json native; "
                     "nothing to train on (policy)")  # fmt: skip
    assert accuracy.flags("a; ", "", "b") == "a; b"


def test_profiles_of_two_hosts_are_named_by_host():
    profs = [SimpleNamespace(name="sort", meta={"experiment": {"host": h}})
             for h in ("node1", "node2")] + [SimpleNamespace(name="gzip", meta={})]  # fmt: skip
    compare._unique_names(profs)
    assert [p.name for p in profs] == ["sort @ node1", "sort @ node2", "gzip"]


def test_mechanisms_with_different_resolved_sets_are_not_pooled(labrep):
    per = labrep.c.tables["mechanisms_per_workload"]
    refused = per[~per["compared"]]
    assert set(refused["policy"]) == {"max-freq:20%"}  # node1's 2 types vs node2's 3
    assert set(per[per["compared"]]["policy"]) == {"read,write", "min-freq:20%"}
    lines = [x for x in labrep.md.splitlines() if x.startswith("- Not pooled:")]
    groups = refused[["workload", "policy"]].drop_duplicates()
    assert len(lines) == len(set(lines)) == len(groups) == 2  # one line per refused group
    for w, pol in groups.itertuples(index=False):
        (line,) = [x for x in lines if x.startswith(f"- Not pooled: {w} / {pol} ")]
        for h, m, st in refused[refused["workload"] == w][["host", "mechanism", "set"]].values:
            assert f"{h} {m}: {st}" in line  # which set each host and mechanism forwarded
    limits = labrep.md.split("## Limits of this data")[1].split("\n## ")[0]
    assert "2 workload/policy group(s) not compared" in limits
    section = labrep.md.split("## Mechanisms side by side")[1].split("\n## ")[0]
    assert "Not pooled: alpha / max-freq:20%" in section
    assert "| alpha | max-freq:20% |" not in section  # the refused rows are not in the table
    assert "| alpha | read,write |" in section


# ---------------------------------------------------------------- figures


def test_no_in_sample_figure_is_unlabelled(labrep):
    for name, d in labrep.drawn.items():
        if d.spec.in_sample:
            assert any("in-sample" in t for t in d.texts), name
    assert labrep.drawn["fig13_gain_speedup"].spec.in_sample
    gain = labrep.c.tables["gain_speedup"]
    assert set(gain[gain["in_sample"]]["gamma"]) == {1}
    assert not gain[(gain["gamma"] > 1)]["in_sample"].any()
    # the accuracy figure plots exactly the headline's out-of-sample predictions
    acc = labrep.c.tables["model_accuracy"]
    mvp = labrep.drawn["measured_vs_predicted"]
    shown = np.vstack([p for p in mvp.points if len(p) > 1])
    want = acc[["measured", "predicted"]].to_numpy()
    assert sorted(map(tuple, shown.round(12))) == sorted(map(tuple, want.round(12)))
    assert any("predicted from other runs only" in t for t in mvp.texts)
    assert any("in-sample" in t for t in figures.fig_measured_vs_predicted(
        acc.assign(in_sample=True)).findobj(Text) for t in [t.get_text()])  # fmt: skip


def test_every_figure_of_a_report_is_readable(labrep):
    assert {"fig5_gamma_fc", "fc_per_mechanism", "fig13_gain_speedup"} <= set(labrep.drawn)
    bad = {name: d.problems for name, d in labrep.drawn.items() if d.problems}
    assert not bad


def test_the_readability_check_finds_what_it_checks():
    fig, ax = figures.plt.subplots()
    ax.plot([1, 2, 3], [1, 2, 3], label="data")
    ax.text(1.5, 1.5, "one label")
    ax.text(1.5, 1.5, "another label")
    ax.set_xlabel("time")  # numeric, no unit
    ax.set_ylabel("wall time (s)")
    ax.legend(loc="center", bbox_to_anchor=(0.5, 0.5))  # over the line
    found = figcheck.problems(fig)
    assert any("overlaps" in p for p in found)
    assert any("covers" in p for p in found)
    assert any("'time' names no unit" in p for p in found)
    assert not any("wall time" in p for p in found)


def test_model_figures_mark_the_measured_fc():
    profs = shipped_profiles()[:2]
    m = figures.MeasuredFc("seccomp/tcp/remote @ node1", 50e-6, 45e-6, 55e-6, 1000)
    f5 = figures.fig5_gamma_fc(profs, measured=m)
    panels = [a for a in f5.axes if a.get_ylabel() == "f_c (s, log)"]
    assert len(panels) == 2
    for ax in panels:
        assert any(list(ln.get_ydata()) == [m.value, m.value] for ln in ax.get_lines())
        lo, hi = ax.get_ylim()
        assert lo == pytest.approx(m.lo / 100, rel=0.05) and hi == pytest.approx(m.hi * 100,
                                                                                rel=0.05)  # fmt: skip
        mesh = next(c for c in ax.collections if isinstance(c, QuadMesh))
        z = np.asarray(mesh.get_array())
        assert mesh.norm.vmin == pytest.approx(z.min()) and mesh.norm.vmax == pytest.approx(z.max())
        levels = next(c for c in ax.collections if hasattr(c, "levels")).levels
        assert len(levels) >= 2 and all(z.min() < v < z.max() for v in levels)
    for f, axis in ((figures.fig7_fc_proportion(profs, measured=m), "x"),
                    (figures.fig9_policies_fc(profs, measured=m), "x")):  # fmt: skip
        marked = [ax for ax in f.axes
                  if any(list(ln.get_xdata()) == [m.value, m.value] for ln in ax.get_lines())]  # fmt: skip
        assert len(marked) >= 2, axis
    f4 = figures.fig4_policies_gamma(profs, measured=m)
    assert "measured f_c 50 µs" in f4.texts[0].get_text()
    f4_paper = figures.fig4_policies_gamma(profs)
    assert "the paper's; no f_c measured" in f4_paper.texts[0].get_text()


def test_fc_per_mechanism_shows_call_counts_and_one_median():
    samples = {"a": np.full(40, 2e-5), "b": np.linspace(1e-4, 2e-4, 7)}
    f = figures.fig_fc_mechanisms(samples)
    ax = f.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a\n40 calls", "b\n7 calls"]
    assert ax.get_legend() is None  # the reference line is labelled where it is drawn
    assert any("not measured here" in t.get_text() for t in ax.texts)
    markers = [ln for ln in ax.get_lines() if ln.get_marker() not in (None, "None", "")]
    assert not markers  # the median is the box's line, not also a dot
    assert not figcheck.problems(f)


# ---------------------------------------------------------------- report.md


def test_report_md_is_for_reading_and_runs_json_holds_the_metadata(labrep, tmp_path):
    md = labrep.md
    assert "```json" not in md and '"kernel"' not in md
    head = md.split("## ")[0]
    assert "**Model accuracy: mean |error|" in head and "for workloads**" in head
    sections = [x.split("\n")[0] for x in md.split("\n## ")[1:]]
    for s in ("Limits of this data", "Model accuracy (cross-validated)",
              "Mechanisms side by side", "Policies as resolved", "Figures"):  # fmt: skip
        assert s in sections, s
    assert sections.index("Limits of this data") < sections.index("Figures")
    assert str(labrep.base) not in md  # no run directory listed: runs.json has them
    assert len(labrep.c.run_metas) == len(labrep.c.runs) + len(labrep.c.natives)
    assert all(json.dumps(m, default=str) for m in labrep.c.run_metas)


def test_a_t_nd_fitted_on_the_run_itself_is_labelled_in_sample_and_left_out(tmp_path):
    """No natives measured: t_nd is the whole-run fit's intercept, fitted on every run of the
    workload, the predicted one included. Such rows say so and stay out of the headline."""
    for i, (pol, fwd) in enumerate((("a", {"read": 500}), ("b", {"read": 3000}),
                                    ("c", {"read": 6000})) * 2):  # fmt: skip
        delegated_run(tmp_path / f"d{i}", ["prog"], fwd, 60e-6, 1.0, policy=pol, seed=i,
                      native=False, run_noise_s=0.002, cell=_cell("vm", "w", pol, i // 3))  # fmt: skip
    c = build_report([tmp_path])
    acc, pvm = c.tables["model_accuracy"], c.tables["predicted_vs_measured"]
    assert (acc["t_nd_source"] == "whole-run fit intercept").all()
    assert (
        acc["in_sample"].all() and acc["flag"].str.contains(accuracy.IN_SAMPLE, regex=False).all()
    )
    assert pvm["in_sample"].all()
    assert not len(c.tables["accuracy_headline"])  # nothing out of sample to headline
    md = render_markdown(c, "now")
    assert f"6 prediction(s) are {accuracy.IN_SAMPLE}" in md
    assert c.prediction_error() is None
    spec = next(f for f in c.figures if f.name == "measured_vs_predicted")
    assert spec.in_sample
    fig = spec.draw()
    assert any(accuracy.IN_SAMPLE in t.get_text() for t in fig.findobj(Text))


def test_the_offload_figure_is_readable(tmp_path):
    for i in range(2):
        delegated_run(tmp_path / f"c{i}", ["cp", "a", "b"], {"read": 300, "write": 300}, 40e-6,
                      0.5, seed=i, policy="read,write")  # fmt: skip
        delegated_run(tmp_path / f"o{i}", ["cp", "a", "b"], {"read": 300, "write": 300}, 60e-6,
                      0.5, seed=10 + i, mode="offload")  # fmt: skip
    spec = next(f for f in build_report([tmp_path]).figures if f.name == "offload")
    assert figcheck.problems(spec.draw()) == []


def test_model_figures_draw_one_panel_per_workload():
    profs = [SimpleNamespace(name=n) for n in ("sort @ node1", "sort @ node2", "gzip")]
    drawn, notes = one_per_workload(profs)
    assert [p.name for p in drawn] == ["sort @ node1", "gzip"]
    assert notes == ["`sort`: 2 profiles, the model figures draw `sort @ node1`"]
