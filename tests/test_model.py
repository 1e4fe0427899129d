"""The paper's models against hand-computed values and limits."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import model as M
from analysis.profiles import table1

pytestmark = pytest.mark.unit


def test_table1_gcc_at_gamma_10_by_hand():
    t1 = table1()
    assert len(t1) == 8
    p = float(t1.loc[t1["benchmark"] == "gcc_linux_k", "p"].iloc[0])
    assert p == pytest.approx(0.1223)
    # 1 / (0.1223 + 0.8777 / 10) = 1 / 0.21007
    assert M.S_n(p, 10) == pytest.approx(4.760318, rel=1e-6)
    # and bzip2, p = 0.48 % at gamma = 2: 1 / (0.0048 + 0.4976) = 1 / 0.5024
    assert M.S_n(0.0048, 2) == pytest.approx(1.990446, rel=1e-6)


def test_naive_limits():
    p = np.array([0.01, 0.1, 0.5, 0.9])
    assert M.S_n(p, 1e12) == pytest.approx(1 / p, rel=1e-9)  # gamma -> inf gives 1/p
    assert M.S_n(1.0, np.array([2.0, 10.0, 1e6])) == pytest.approx([1, 1, 1])  # p -> 1
    assert M.S_n(0.0, np.array([2.0, 10.0])) == pytest.approx([2, 10])  # p = 0: linear
    assert M.S_n(p, 1.0) == pytest.approx(np.ones(4))  # no gain, no speedup


def test_naive_broadcasts_over_grids():
    s = M.S_n(np.linspace(0, 1, 5)[:, None], np.array([1.0, 2.0, 10.0])[None, :])
    assert s.shape == (5, 3)
    assert s[2, 1] == pytest.approx(1 / (0.5 + 0.25))


def test_extended_by_hand():
    C, g, n = 1.0, np.array([0.5, 0.25]), np.array([10.0, 1000.0])
    b = np.array([1.0, 0.0])
    assert M.t_nd(C, g) == pytest.approx(1.75)
    assert M.t_remote(b, g, n, 1e-3) == pytest.approx(0.5 + 2e-3 * 10)
    assert M.t_local(b, g) == pytest.approx(0.25)
    # t_d = 1/2 + (0.5 + 0.02) + 0.25 = 1.27
    assert M.t_d(C, g, n, b, 2.0, 1e-3) == pytest.approx(1.27)
    assert M.S_r(C, g, n, b, 2.0, 1e-3) == pytest.approx(1.75 / 1.27)
    # g' used for the local calls only
    assert M.t_d(C, g, n, b, 2.0, 1e-3, g_prime=np.array([9.0, 0.05])) == pytest.approx(
        0.5 + 0.52 + 0.05
    )


def test_extended_reduces_to_naive_with_zero_cost_all_forwarded():
    rng = np.random.default_rng(3)
    C, g, n = 2.0, rng.uniform(0, 0.1, 12), rng.integers(1, 10_000, 12).astype(float)
    gam = np.array([1.0, 2.0, 10.0, 100.0])
    s_r = M.S_r(C, g, n, np.ones(12), gam, 0.0)
    assert s_r == pytest.approx(M.S_n(M.p_of(C, g), gam), rel=1e-12)
    grid = M.grid(C, g, n, np.ones((1, 12)), gam, [0.0])
    assert grid[:, 0, 0] == pytest.approx(M.S_n(g.sum() / (C + g.sum()), gam), rel=1e-12)


def test_extended_limits():
    C, g, n, b = 1.0, np.array([0.1, 0.2]), np.array([5.0, 7.0]), np.array([1.0, 1.0])
    # nothing forwarded and gamma = 1: no change at all, whatever f_c
    assert M.S_r(C, g, n, np.zeros(2), 1.0, 1.0) == pytest.approx(1.0)
    # infinite gain with free forwarding: bounded by 1/p
    assert M.S_r(C, g, n, b, 1e15, 0.0) == pytest.approx((C + 0.3) / 0.3)
    # forwarding cost grows without bound: speedup goes to 0
    assert M.S_r(C, g, n, b, 10.0, 1e6) < 1e-5


def test_grid_matches_pointwise_and_shape():
    rng = np.random.default_rng(0)
    S = 9
    g, n = rng.uniform(0, 0.01, S), rng.integers(1, 500, S).astype(float)
    B = (rng.uniform(size=(4, S)) < 0.5).astype(float)
    gam, fcs = np.array([1.0, 3.0, 50.0]), np.array([0.0, 1e-6, 1e-3])
    out = M.grid(0.7, g, n, B, gam, fcs)
    assert out.shape == (3, 3, 4)
    for i, ga in enumerate(gam):
        for j, fc in enumerate(fcs):
            for k in range(4):
                assert out[i, j, k] == pytest.approx(float(M.S_r(0.7, g, n, B[k], ga, fc)))
    # S_r with b of shape (K, S) broadcasts f_c per row too
    per_row = M.S_r(0.7, g, n, B, 2.0, np.array([0.0, 1e-6, 1e-5, 1e-4]))
    assert per_row.shape == (4,)
