"""Figures: each function returns a Figure with the right axes; save writes PNG and SVG."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import figures as F
from analysis.profiles import shipped_profiles, table1

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def profiles():
    ps = shipped_profiles()
    assert len(ps) >= 3, "analysis/data/profiles should ship measured profiles"
    return ps[:3]


def test_human_time_units():
    assert [F.human_time(v) for v in (1e-9, 1e-5, 2.5e-3, 10.0)] == [
        "1 ns",
        "10 µs",
        "2.5 ms",
        "10 s",
    ]


def test_naive_figures():
    f2 = F.fig2_naive()
    ax = f2.axes[0]
    assert ax.get_yscale() == "log" and "p" in ax.get_xlabel() and len(ax.get_lines()) == 5
    f3 = F.fig3_table1(table1())
    ax = f3.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "gain γ (×)"
    assert len(ax.get_lines()) == 8 + 1  # Table I + linear reference
    # the gcc curve at gamma = 10 is the hand-computed 4.76
    gcc = next(line for line in ax.get_lines() if line.get_label().startswith("gcc_linux_k"))
    x, y = gcc.get_data()
    assert np.interp(np.log(10), np.log(x), y) == pytest.approx(4.7603, rel=1e-3)


def test_policy_figures(profiles):
    f4 = F.fig4_policies_gamma(profiles)
    assert len(f4.axes) == 3
    assert [a.get_title() for a in f4.axes] == [
        "least frequent 20% forwarded", "most frequent 20% forwarded", "random 20% forwarded"]  # fmt: skip
    assert all(a.get_xscale() == "log" for a in f4.axes)
    f9 = F.fig9_policies_fc(profiles)
    assert all(a.get_xscale() == "log" and "f_c" in a.get_xlabel() for a in f9.axes)
    # most-frequent forwarding never beats least-frequent at the same f_c
    lo = f9.axes[0].get_lines()[0].get_ydata()
    hi = f9.axes[1].get_lines()[0].get_ydata()
    assert np.all(hi <= lo * (1 + 1e-12))


def test_heatmaps_have_log_fc_axes(profiles):
    f5 = F.fig5_gamma_fc(profiles)
    panels = [a for a in f5.axes if a.get_ylabel() == "f_c (s, log)"]
    assert len(panels) == 3 and all(a.get_yscale() == "log" for a in panels)
    f7 = F.fig7_fc_proportion(profiles)
    assert sum(a.get_xscale() == "log" for a in f7.axes) == 3
    f8 = F.fig8_gamma_proportion(profiles)
    assert sum(a.get_ylabel() == "forwarded syscall types (%)" for a in f8.axes) == 3


def test_cdf_ends_at_100(profiles):
    f6 = F.fig6_cdf(profiles)
    for line in f6.axes[0].get_lines():
        assert line.get_ydata()[-1] == pytest.approx(100.0)


def test_measurement_figures_and_save(tmp_path):
    pvm = pd.DataFrame({"mechanism": ["a", "a", "b"], "measured_t_d_s": [1.0, 2.0, 3.0],
                        "predicted_t_d_s": [1.05, 1.9, 3.3]})  # fmt: skip
    f = F.fig_measured_vs_predicted(pvm)
    assert f.axes[0].get_xscale() == "log" and "measured" in f.axes[0].get_xlabel()
    paths = F.save(f, tmp_path, "mvp")
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert (
        paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and b"<svg" in paths[1].read_bytes()[:400]
    )
    g = F.fig_fc_mechanisms({"x": np.full(50, 2e-5), "y": np.linspace(1e-4, 2e-4, 50)})
    assert g.axes[0].get_yscale() == "log"
    assert [t.get_text() for t in g.axes[0].get_xticklabels()] == ["x\n50 calls", "y\n50 calls"]
    F.save(g, tmp_path, "fc")
    assert (tmp_path / "fc.png").stat().st_size > 5000


def test_fig11_runtimes_bars():
    runs = pd.DataFrame({"workload": ["gzip", "gzip", "gzip", "tar"],
                         "group": ["read", "read", "max-freq:20%", "read"],
                         "wall_s": [1.0, 1.2, 2.0, 0.5]})  # fmt: skip
    f = F.fig11_runtimes(runs, {"gzip": 0.9, "tar": 0.4})
    ax = f.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches if np.isfinite(p.get_height()))
    assert heights == [0.4, 0.5, 0.9, 1.1, 2.0]  # native x2, read (mean of 1.0, 1.2), max-freq
    assert [t.get_text() for t in ax.get_xticklabels()] == ["gzip", "tar"]
