"""analysis.queueing: exact MVA against closed forms and brute-force Markov chains."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import model, queueing
from analysis.queueing import Station

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("Z,D,S", [(8.0, 0.3, 4.0), (1.0, 0.0, 2.0), (100.0, 5.0, 1.0)])
def test_mva_matches_machine_repairman_closed_form(Z, D, S):
    st = Station(Z=Z, D=D, S=S, W=1)
    res = queueing.mva(st, 40)
    for n in (1, 2, 5, 17, 40):
        X, R = queueing.repairman(st, n)
        assert res.X[n - 1] == pytest.approx(X, rel=1e-10)
        assert res.R[n - 1] == pytest.approx(R, rel=1e-10)


@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("N", [1, 2, 5, 9])
def test_mva_matches_brute_force_markov_chain(N, W):
    st = Station(Z=7.0, D=0.5, S=3.0, W=W)
    res = queueing.mva(st, N)
    X, R, pc = queueing.ctmc(st, N)
    assert res.X[-1] == pytest.approx(X, rel=1e-9)
    assert res.R[-1] == pytest.approx(R, rel=1e-9)
    np.testing.assert_allclose(res.p[-1][: N + 1], pc, atol=1e-10)


def test_single_caller_never_waits_and_many_saturate():
    st = Station(Z=8.0, D=0.3, S=4.0, W=2)
    res = queueing.mva(st, 200)
    assert res.R[0] == pytest.approx(st.D + st.S)
    assert res.wait[0] == pytest.approx(0.0, abs=1e-12)
    assert res.X[-1] == pytest.approx(st.W / st.S, rel=1e-6)  # bottleneck W/S
    assert np.all(np.diff(res.X) >= -1e-12) and np.all(np.diff(res.R) >= -1e-12)


def test_bounds_enclose_mva_and_saturation_point():
    for W in (1, 2, 4):
        st = Station(Z=8.0, D=0.3, S=4.0, W=W)
        res = queueing.mva(st, 80)
        b = queueing.bounds(st, res.N)
        assert np.all(b["X_hi"] * (1 + 1e-12) >= res.X)
        assert np.all(b["X_lo"] * (1 - 1e-12) <= res.X)
        assert np.all(b["R_lo"] * (1 - 1e-12) <= res.R)
        assert np.all(b["R_hi"] * (1 + 1e-12) >= res.R)
        n_star = queueing.saturation(st)
        # the two throughput asymptotes meet at N*
        assert n_star / (st.Z + st.D + st.S) == pytest.approx(W / st.S)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="W must"):
        Station(Z=1, D=0, S=1, W=0)
    with pytest.raises(ValueError, match="Z must"):
        Station(Z=-1, D=0, S=1, W=1)
    with pytest.raises(ValueError, match="S must"):
        Station(Z=1, D=0, S=0, W=1)
    with pytest.raises(ValueError, match="N must"):
        queueing.mva(Station(Z=1, D=0, S=1, W=1), 0)


def test_contended_speedup_uses_the_model_and_falls_with_N():
    C, g, n = 1.0, np.array([0.1, 0.2]), np.array([1000.0, 3000.0])
    b = np.array([1.0, 1.0])
    D, S = 50e-6, 100e-6
    sr = queueing.S_r_contended(C, g, n, b, 4.0, D=D, S=S, W=1, N=64)
    # one caller: the single-caller f_c = (D + S)/2 in the paper's model
    assert sr[0] == pytest.approx(float(model.S_r(C, g, n, b, 4.0, (D + S) / 2)))
    assert np.all(np.diff(sr) <= 1e-12) and sr[-1] < sr[0]
    # more servers never hurt
    sr4 = queueing.S_r_contended(C, g, n, b, 4.0, D=D, S=S, W=4, N=64)
    assert np.all(sr4 >= sr - 1e-12) and sr4[-1] > sr[-1]


@pytest.mark.parametrize("W", [16, 64])
def test_marginals_stay_normalised_for_many_servers_and_callers(W):
    """The textbook p(0|n) = 1 - sum p(j|n) cancels here (sums reached 1.016)."""
    st = Station(Z=8.0, D=0.5, S=4.0, W=W)
    res = queueing.mva(st, 2000)
    np.testing.assert_allclose(res.p.sum(axis=1), 1.0, atol=1e-12)
    b = queueing.bounds(st, res.N)
    assert np.all(b["R_hi"] * (1 + 1e-12) >= res.R)
    assert res.X[-1] == pytest.approx(W / st.S, rel=1e-9)
    X, R, _ = queueing.ctmc(st, 6) if W == 16 else (res.X[5], res.R[5], None)
    assert res.X[5] == pytest.approx(X, rel=1e-9) and res.R[5] == pytest.approx(R, rel=1e-9)
