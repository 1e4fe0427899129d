"""`testbed analyze` and `testbed model` end to end: real runs, synthetic runs, bad input."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pandas as pd
import pytest

from analysis.synthetic import delegated_run
from testbed.jobs.catalogue import prepare

PY = sys.executable
FIGURES = ["fig2_naive", "fig3_table1", "fig4_policies_gamma", "fig5_gamma_fc", "fig6_cdf",
           "fig7_fc_proportion", "fig8_gamma_proportion", "fig9_policies_fc",
           "fig11_runtimes", "measured_vs_predicted", "fc_per_mechanism"]  # fmt: skip


def tb(*args, timeout=300, stdout: Path | None = None):
    """``testbed ARGS``; a workload's (binary) stdout goes to the file ``stdout``."""
    if stdout is None:
        return subprocess.run([PY, "-m", "testbed", *map(str, args)], capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip
    with open(stdout, "wb") as f:
        return subprocess.run([PY, "-m", "testbed", *map(str, args)], stdout=f,
                              stderr=subprocess.PIPE, text=True, timeout=timeout)  # fmt: skip


def check_image_files(figdir: Path, name: str) -> str:
    """The PNG and SVG of figure ``name`` are well-formed images; the SVG's text."""
    assert (figdir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    svg = (figdir / f"{name}.svg").read_text()
    assert ET.fromstring(svg.encode()).tag.endswith("svg"), name
    return svg


def scatter_points(svg: str) -> int:
    """Markers drawn by scatter plots in a matplotlib SVG (legend handles included)."""
    return sum(
        g.count("<use") for g in re.findall(r'<g id="PathCollection_\d+">(.*?)</g>', svg, re.S)
    )


def check_figure_data(report: Path) -> None:
    """The data figures show the report's numbers, not just some picture."""
    from analysis import figures

    tabs, figdir = report / "tables", report / "figures"
    acc = pd.read_csv(tabs / "model_accuracy.csv")  # the headline's predictions
    shown = acc.dropna(subset=["measured", "predicted"])
    assert len(shown) > 0
    svg = check_image_files(figdir, "measured_vs_predicted")
    # one marker per predicted run, plus one legend marker per mechanism
    assert scatter_points(svg) == len(shown) + shown["mechanism"].nunique()
    runs = pd.read_csv(tabs / "runs.csv")
    ax = figures.fig11_runtimes(runs).axes[0]
    bars = sorted(round(p.get_height(), 12) for p in ax.patches)
    means = runs.groupby(["workload", "group"])["wall_s"].mean()
    assert bars == sorted(round(v, 12) for v in means), "Fig. 11: one bar per group, its mean"
    svg = check_image_files(figdir, "fc_per_mechanism")
    fc = pd.read_csv(tabs / "fc_per_mechanism.csv")
    assert all(m in svg for m in fc["mechanism"])  # one box per mechanism, labelled


def one_error_line(r) -> str:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: error:"), r.stderr
    return lines[0]


def check_report(report: Path, inputs: list[Path]) -> str:
    md = (report / "report.md").read_text()
    for name in FIGURES:
        check_image_files(report / "figures", name)
        assert f"figures/{name}.png" in md
    check_figure_data(report)
    assert "```json" not in md  # run metadata lives in runs.json, not in report.md
    metas = json.loads((report / "runs.json").read_text())
    assert sorted(m["path"] for m in metas) == sorted(map(str, inputs))
    assert all(m["host"].get("kernel") for m in metas)
    return md


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """A native profile and three delegated runs of gzip through the real relay and delegate."""
    from testbed.jobs.localdelegate import LocalDelegate

    base = tmp_path_factory.mktemp("real")
    argv = prepare("gzip", base / "in", 0.5)
    r = tb("profile", "--quiet", "--native-runs", "2", "-o", base / "prof", "--", *argv,
           stdout=base / "native.out")  # fmt: skip
    assert r.returncode == 0, r.stderr
    paths = [base / "prof"]
    with LocalDelegate() as d:
        for i, sel in enumerate((["--forward", "read"], ["--forward", "read,write,close"],
                                 ["--policy", "min-freq:50%", "--profile", base / "prof"])):  # fmt: skip
            r = tb(
                "run",
                "--quiet",
                "--delegate",
                d.endpoint,
                *sel,
                "-o",
                base / f"run{i}",
                "--",
                *argv,
                stdout=base / f"run{i}.out",
            )
            assert r.returncode == 0, r.stderr
            # the traced profile run and its 2 untraced native runs wrote one copy each
            assert (base / f"run{i}.out").read_bytes() * 3 == (base / "native.out").read_bytes()
            paths.append(base / f"run{i}")
    return base, paths


def test_analyze_real_runs_end_to_end(real_runs):
    base, paths = real_runs
    r = tb("analyze", *paths, "-o", base / "report")
    assert r.returncode == 0, r.stderr
    md = check_report(base / "report", paths)
    assert "1 profile(s), 3 delegated run(s)" in md
    fc = pd.read_csv(base / "report" / "tables" / "fc_per_mechanism.csv")
    assert list(fc["mechanism"]) == ["seccomp/tcp/loopback"]
    row = fc.iloc[0]
    assert row["calls"] > 50
    assert 0 < row["f_c_median_lo_s"] <= row["f_c_median_s"] <= row["f_c_median_hi_s"] < 0.1
    pvm = pd.read_csv(base / "report" / "tables" / "predicted_vs_measured.csv")
    assert len(pvm) == 3 and set(pvm["t_nd_source"]) == {"profile native runs (untraced)"}
    native = json.loads((paths[0] / "run.json").read_text())["native"]
    assert (pvm["t_nd_s"] == native["wall_s"]).all() and len(native["walls_s"]) == 2
    # predicted = t_nd + 2 f_c sum b n, with the counts the relay recorded
    runs = pd.read_csv(base / "report" / "tables" / "runs.csv").set_index("run")
    for _, p in pvm.iterrows():
        assert p["forwarded_calls"] == runs.loc[p["run"], "forwarded_calls"] > 0
        assert p["predicted_t_d_s"] == pytest.approx(
            p["t_nd_s"] + 2 * p["f_c_s"] * p["forwarded_calls"]
        )
    # the native profile predicted the number of forwarded reads exactly
    read_only = pvm[pvm["group"] == "read"].iloc[0]
    assert read_only["profile_forwarded_calls"] == read_only["forwarded_calls"]
    cv = pd.read_csv(base / "report" / "tables" / "cross_validation.csv")
    assert len(cv) == 6  # three policies, every ordered pair


def test_analyze_synthetic_known_answer(tmp_path, real_runs):
    base, paths = real_runs
    prof = paths[0]
    cmd = json.loads((prof / "run.json").read_text())["command"]
    runs = []
    for i, fwd in enumerate(({"read": 500}, {"read": 2000, "write": 800}, {"close": 100})):
        runs.append(delegated_run(tmp_path / f"l{i}", cmd, fwd, 15e-6, 0.5, policy=f"p{i}", seed=i))
        runs.append(delegated_run(tmp_path / f"r{i}", cmd, fwd, 90e-6, 0.5, policy=f"p{i}",
                                  endpoint="tcp://10.200.0.2:5555", seed=10 + i))  # fmt: skip
    r = tb("analyze", prof, *runs, "-o", tmp_path / "rep", "--policy", "max-freq:20%")
    assert r.returncode == 0, r.stderr
    md = check_report(tmp_path / "rep", [prof, *runs])
    assert "`max-freq:20%`" in md
    fc = pd.read_csv(tmp_path / "rep" / "tables" / "fc_per_mechanism.csv").set_index("mechanism")
    for mech, truth in (
        ("seccomp/libzmq-tcp/loopback", 15e-6),
        ("seccomp/libzmq-tcp/remote", 90e-6),
    ):
        assert fc.loc[mech, "f_c_median_lo_s"] <= truth <= fc.loc[mech, "f_c_median_hi_s"]
    tab = pd.read_csv(tmp_path / "rep" / "tables" / "same_node_vs_remote.csv").set_index(
        "mechanism"
    )
    gamma10 = [c for c in tab.columns if c.endswith("γ=10")]
    assert len(gamma10) == 1
    # a cheaper mechanism never predicts less speedup
    assert (
        tab.loc["seccomp/libzmq-tcp/loopback", gamma10[0]]
        >= tab.loc["seccomp/libzmq-tcp/remote", gamma10[0]]
    )
    pvm = pd.read_csv(tmp_path / "rep" / "tables" / "predicted_vs_measured.csv")
    assert pvm["rel_error"].abs().max() < 0.01 and set(pvm["t_nd_source"]) == {"run.json native"}


def test_analyze_bad_input(tmp_path):
    assert "no such run directory" in one_error_line(
        tb("analyze", tmp_path / "missing", "-o", tmp_path / "o")
    )
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "run.json").write_text("{broken")
    assert "unreadable" in one_error_line(tb("analyze", tmp_path / "junk", "-o", tmp_path / "o"))
    d = delegated_run(tmp_path / "ok", ["x"], {"read": 10}, 1e-5, 1.0)
    assert "unknown policy" in one_error_line(
        tb("analyze", d, "-o", tmp_path / "o", "--policy", "best:3")
    )
    assert "outside 0-100%" in one_error_line(
        tb("analyze", d, "-o", tmp_path / "o", "--policy", "min-freq:101%")
    )
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_model_prints_table1_and_profiles(tmp_path):
    r = tb("model", "--table1", "--gamma", "2,10")
    assert r.returncode == 0, r.stderr
    gcc = next(line for line in r.stdout.splitlines() if line.strip().startswith("gcc_linux_k"))
    assert gcc.split()[-1] == "4.76"  # hand-computed S_n(12.23 %, gamma = 10)
    assert "Extended model" in r.stdout and "bzip2" in r.stdout
    bzip2 = Path(__file__).resolve().parent.parent / "analysis" / "data" / "profiles" / "bzip2"
    r = tb("model", "--gamma", "10", "--fc", "1ms", "--policy", "max-freq:20%",
           "--profile", bzip2, "--plot", tmp_path / "f")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Naive model" not in r.stdout  # a profile was given and --table1 was not
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("bzip2"))
    assert len(row.split()) == 1 + 4 + 2  # workload, p, types, forwarded, fwd_calls, S_n, S_r
    for name in ("fig2_naive", "fig3_table1", "fig4_policies_gamma", "fig5_gamma_fc", "fig6_cdf",
                 "fig7_fc_proportion", "fig8_gamma_proportion", "fig9_policies_fc"):  # fmt: skip
        check_image_files(tmp_path / "f", name)


@pytest.mark.unit
def test_model_figures_plot_the_model():
    """What Figs. 2 and 6 draw: S_n = 1/(p + (1-p)/gamma), and CDFs of n(s) ending at 100 %."""
    from analysis import figures
    from analysis.profiles import shipped_profiles

    lines = figures.fig2_naive(gammas=(2, 10)).axes[0].get_lines()
    assert len(lines) == 2
    for gamma, line in zip((2, 10), lines, strict=True):
        p = line.get_xdata() / 100
        assert line.get_ydata() == pytest.approx(1 / (p + (1 - p) / gamma))
    profs = shipped_profiles()
    steps = figures.fig6_cdf(profs).axes[0].get_lines()
    assert len(steps) == len(profs)
    for prof, line in zip(profs, steps, strict=True):
        y = line.get_ydata()
        assert len(y) == int((prof.n > 0).sum()) and y[-1] == pytest.approx(100)
        assert (y[1:] >= y[:-1]).all() and y[0] == pytest.approx(100 * prof.n.max() / prof.n.sum())


@pytest.mark.parametrize(
    "args,msg",
    [(["--policy", "min-freq:120%"], "outside 0-100%"), (["--policy", "often:2"], "unknown policy"),
     (["--fc", "fast"], "not a time"), (["--gamma", "0"], "gains must be"),
     (["--profile", "/nonexistent/run"], "no such run directory")],
)  # fmt: skip
def test_model_bad_input(args, msg):
    assert msg in one_error_line(tb("model", *args))


def test_analyze_a_results_tree(tmp_path):
    """A directory without run.json stands for every run directory beneath it."""
    tree = tmp_path / "results" / "plan"
    for i, host in enumerate(("node1", "node2")):
        delegated_run(tree / host / f"r{i}", ["x"], {"read": 200 * (i + 1)}, 2e-5, 0.3, seed=i)
    shipped = Path(__file__).resolve().parent.parent / "analysis" / "data" / "profiles" / "bzip2"
    shutil.copytree(shipped, tree / "profiles" / "bzip2")
    r = tb("analyze", tmp_path / "results", "-o", tmp_path / "rep")
    assert r.returncode == 0, r.stderr
    runs = pd.read_csv(tmp_path / "rep" / "tables" / "runs.csv")
    assert sorted(runs["forwarded_calls"]) == [200, 400]
    assert list(pd.read_csv(tmp_path / "rep" / "tables" / "profiles.csv")["workload"]) == ["bzip2"]
    (tmp_path / "nothing").mkdir()
    assert "not a run directory" in one_error_line(
        tb("analyze", tmp_path / "nothing", "-o", tmp_path / "x")
    )
