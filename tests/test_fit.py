"""Known-answer fitting: synthetic runs with a known f_c (alpha, beta) are recovered."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import fit
from analysis.synthetic import delegated_run
from testbed.core import errors, rundir

pytestmark = pytest.mark.unit

SIGMA = 0.1  # log-normal per-call noise: median factor 1, mean factor exp(SIGMA^2 / 2)


def test_per_call_median_recovers_f_c(tmp_path):
    d = delegated_run(tmp_path / "r", ["prog"], {"read": 3000, "write": 2000}, 25e-6, 1.0,
                      call_noise=SIGMA, seed=1)  # fmt: skip
    calls = rundir.load(d).calls()
    est = fit.per_call_fc(calls)
    assert est.n == 5000
    assert est.median.contains(25e-6), est.median
    assert est.median.hi - est.median.lo < 0.02 * 25e-6  # tight with 5000 calls
    assert est.mean.contains(25e-6 * np.exp(SIGMA**2 / 2)), est.mean


def test_faulty_calls_are_not_used(tmp_path):
    d = rundir.create(tmp_path / "f")
    rec = rundir.CallRecorder(d / rundir.CALLS_BIN)
    for i in range(10):
        flags = rundir.F_TIMEOUT if i % 2 else 0
        rec.add(
            1, 0, flags, 0, 0, 0, 1000 * i, 1000 * i + 1, 1000 * i + 2, 1000 * i + 400, 5, 6, 6, 6
        )  # a cost-mode record: the delegate stamps exec start == end
    rec.close()
    fc, size = fit.fc_samples(np.fromfile(d / rundir.CALLS_BIN, dtype=rundir.CALL_DTYPE))
    assert len(fc) == 5 and fc == pytest.approx(np.full(5, 200e-9))


def test_median_ci_coverage():
    rng = np.random.default_rng(7)
    hits = sum(fit.median_ci(rng.exponential(1.0, 201)).contains(np.log(2)) for _ in range(400))
    assert 0.92 <= hits / 400 <= 0.99  # nominal 95 %


def test_whole_run_least_squares_recovers_f_c(tmp_path):
    f_c = 30e-6
    rows = []
    sets = [{"read": 2000}, {"read": 2000, "write": 3000}, {"write": 6000}, {"close": 500},
            {"read": 8000, "write": 8000}]  # fmt: skip
    for w, t_nd in (("gzip x", 0.8), ("tar y", 1.5)):
        for i, fwd in enumerate(sets):
            d = delegated_run(tmp_path / f"{w[0]}{i}", w.split(), fwd, f_c, t_nd,
                              call_noise=SIGMA, run_noise_s=0.003, seed=10 + i)  # fmt: skip
            run = rundir.load(d)
            rows.append({"workload": w, "t_d": run.meta["wall_s"], "x": 2.0 * len(run.calls())})
        rows.append({"workload": w, "t_d": t_nd, "x": 0.0})  # native run
    res = fit.whole_run(pd.DataFrame(rows))
    truth = f_c * np.exp(SIGMA**2 / 2)  # the runs' total time carries the mean, not the median
    assert res.f_c.contains(truth), res.f_c
    assert res.dof == len(rows) - 3
    assert res.intercepts["gzip x"] == pytest.approx(0.8, abs=0.01)
    assert res.intercepts["tar y"] == pytest.approx(1.5, abs=0.01)


def test_whole_run_needs_forwarded_calls():
    with pytest.raises(errors.TestbedError):
        fit.whole_run(pd.DataFrame({"workload": ["a"], "t_d": [1.0], "x": [0.0]}))


def test_size_aware_recovers_alpha_beta_and_significance(tmp_path):
    alpha, beta = 20e-6, 2e-9  # 2 ns per byte: 8 KiB adds ~16 µs
    d = delegated_run(tmp_path / "s", ["prog"], {"write": 6000}, alpha, 1.0, beta=beta,
                      max_bytes=8192, call_noise=SIGMA, seed=3)  # fmt: skip
    fc, size = fit.fc_samples(rundir.load(d).calls())
    res = fit.size_aware(fc, size)
    k = np.exp(SIGMA**2 / 2)
    assert res.alpha.contains(alpha * k), res.alpha
    assert res.beta.contains(beta * k), res.beta
    assert res.significant and res.p_value < 1e-6


def test_size_term_not_significant_without_size_effect(tmp_path):
    d = delegated_run(tmp_path / "n", ["prog"], {"write": 4000}, 20e-6, 1.0, beta=0.0,
                      call_noise=SIGMA, seed=4)  # fmt: skip
    res = fit.size_aware(*fit.fc_samples(rundir.load(d).calls()))
    assert res.beta.contains(0.0)
    assert not res.significant and res.p_value > 0.05


def test_size_aware_with_constant_size():
    res = fit.size_aware(np.array([1.0, 2.0, 3.0]), np.array([8.0, 8.0, 8.0]))
    assert not res.significant and np.isnan(res.beta.value)
    assert res.alpha.value == pytest.approx(2.0)


def test_offload_mode_subtracts_delegate_execution():
    # f_c = (overhead - exec) / 2 has one definition (testbed.core.rundir.derived);
    # the real cost-mode delegate stamps exec start == end, so there it is overhead / 2.
    calls = np.zeros(4, dtype=rundir.CALL_DTYPE)
    calls["t_trap"], calls["t_send"], calls["t_reply"], calls["t_resume"] = 1000, 1100, 9100, 9200
    calls["d_recv"], calls["d_exec_start"], calls["d_send"] = 50, 60, 6100
    calls["d_exec_end"] = [6060, 6060, 6060, 60]  # three offloaded calls, one cost-mode call
    assert rundir.derived(calls)["f_c"] == pytest.approx([1100, 1100, 1100, 4100])
    for mode in ("cost", "offload"):
        fc, _ = fit.fc_samples(calls, mode)
        assert fc == pytest.approx(np.array([1100, 1100, 1100, 4100]) / 1e9)


def test_size_aware_fit_uses_bytes_returned_by_offloaded_reads():
    # offloaded reads send a few bytes and get the data back (bytes_out); writes
    # send the data (bytes_in).  f_c = alpha + beta * (bytes_in + bytes_out) is
    # recovered only if both directions count.
    rng = np.random.default_rng(3)
    n = 2000
    calls = np.zeros(n, dtype=rundir.CALL_DTYPE)
    size = rng.integers(0, 1 << 20, n)
    is_read = rng.random(n) < 0.5
    calls["bytes_in"] = np.where(is_read, 16, size)
    calls["bytes_out"] = np.where(is_read, size, 0)
    alpha, beta = 50e-6, 1.4e-9  # s, s per byte
    exec_ns = rng.integers(1_000, 100_000, n)
    fc_ns = np.round((alpha + beta * (calls["bytes_in"] + calls["bytes_out"])) * 1e9)
    t = np.arange(n, dtype=np.int64) * 10_000_000
    calls["t_trap"], calls["t_send"] = t, t + 10
    calls["t_resume"] = t + 2 * fc_ns.astype(np.int64) + exec_ns
    calls["t_reply"] = calls["t_resume"] - 10
    calls["d_recv"], calls["d_exec_start"] = t + 20, t + 30
    calls["d_exec_end"] = t + 30 + exec_ns
    calls["d_send"] = calls["d_exec_end"] + 5
    fc, moved = fit.fc_samples(calls, "offload")
    sz = fit.size_aware(fc, moved)
    assert sz.beta.value == pytest.approx(beta, rel=1e-3) and sz.significant
    assert sz.alpha.value == pytest.approx(alpha, rel=1e-2)
