"""Comparisons on synthetic run directories with known f_c per mechanism."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from analysis import compare
from analysis import model as M
from analysis.profiles import shipped_profiles
from analysis.synthetic import delegated_run
from testbed.core import errors

pytestmark = pytest.mark.unit

LOOP, REMOTE = 20e-6, 120e-6
REMOTE_EP = "tcp://10.200.0.2:5555"  # only a label in run.json: nothing is sent anywhere
HOST = socket.gethostname()  # synthetic runs are stamped with this host


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    paths = []
    for mech, fc, ep, backend in (("l", LOOP, "tcp://127.0.0.1:5555", "seccomp"),
                                  ("r", REMOTE, REMOTE_EP, "seccomp"),
                                  ("k", 3e-6, "", "kmod")):  # fmt: skip
        for i, (pol, fwd) in enumerate((("min-freq:20%", {"close": 300}),
                                        ("max-freq:20%", {"read": 4000}),
                                        ("read,write", {"read": 4000, "write": 1500}))):  # fmt: skip
            paths.append(delegated_run(base / f"{mech}{i}", ["gzip", "-k", "in"], fwd, fc, 0.9,
                                       backend=backend, endpoint=ep, policy=pol, seed=i,
                                       mode="kthread" if mech == "k" else "cost",
                                       call_noise=0.05))  # fmt: skip
    return compare.load_runs(paths)


def test_mechanism_labels(runs):
    _, rs = runs
    assert {r.mechanism for r in rs} == {
        "seccomp/libzmq-tcp/loopback",
        "seccomp/libzmq-tcp/remote",
        "kmod-kthread/same-node",
    }
    kthread = {"backend": "kmod", "mode": "kthread", "endpoint": None}
    assert compare.mechanism({**kthread, "delegate": {"delay_us": 20.0}}) == (
        "kmod-kthread/same-node+20us"
    )
    assert compare.mechanism({**kthread, "delegate": {"delay_us": 0, "faithful": True}}) == (
        "kmod-kthread-faithful/same-node"
    )
    both = {"delay_us": 5, "faithful": True, "flush_caller_tlb": True}
    assert compare.mechanism({**kthread, "delegate": both}) == (
        "kmod-kthread-faithful-flushcaller/same-node+5us"
    )
    assert (
        compare.mechanism({"backend": "seccomp", "endpoint": "ipc:///tmp/x"})
        == "seccomp/libzmq-ipc/same-node"
    )
    assert (
        compare.mechanism(
            {"backend": "kmod", "endpoint": "tcp://[::1]:5", "delegate": {"delay_us": 50}}
        )
        == "kmod/libzmq-tcp/loopback+50us"
    )


def test_fit_mechanisms_recovers_each_f_c(runs):
    profiles, rs = runs
    native = compare.native_times(profiles, rs)
    assert native[f"gzip -k in @ {HOST}"] == (0.9, "run.json native")
    fits = compare.fit_mechanisms(rs, native).set_index("mechanism")
    for mech, fc in (
        ("seccomp/libzmq-tcp/loopback", LOOP),
        ("seccomp/libzmq-tcp/remote", REMOTE),
        ("kmod-kthread/same-node", 3e-6),
    ):
        row = fits.loc[mech]
        assert row["f_c_median_lo_s"] <= fc <= row["f_c_median_hi_s"]
        assert row["whole_fc_s"] == pytest.approx(fc, rel=0.01)
        assert not row["size_significant"]


def test_predicted_vs_measured_and_cross_validation(runs):
    profiles, rs = runs
    native = compare.native_times(profiles, rs)
    fits = compare.fit_mechanisms(rs, native)
    pvm = compare.predicted_vs_measured(
        rs, native, dict(zip(fits.mechanism, fits.f_c_median_s, strict=True))
    )
    assert len(pvm) == 9
    assert pvm["rel_error"].abs().max() < 0.01
    assert pvm["profile_predicted_t_d_s"].isna().all()  # no profile given
    r = pvm.iloc[1]  # the formula, checked on one row
    assert r["predicted_t_d_s"] == pytest.approx(
        r["t_nd_s"] + 2 * r["f_c_s"] * r["forwarded_calls"]
    )
    cv = compare.cross_validate(rs, native)
    assert len(cv) == 3 * 3 * 2  # 3 mechanisms x ordered pairs of 3 policies
    assert set(cv["train"]) == {"min-freq:20%", "max-freq:20%", "read,write"}
    assert cv["mean_abs_rel_error"].max() < 0.01


def test_mechanism_table_uses_the_model(runs):
    profiles, rs = runs
    fits = compare.fit_mechanisms(rs, compare.native_times(profiles, rs))
    prof = shipped_profiles()[:2]
    tab = compare.mechanism_table(fits, prof, "min-freq:20%", (2.0, 10.0))
    assert len(tab) == 3  # measured mechanisms only: the paper's 40 µs is never a row
    assert compare.PAPER_MKTRACE_FC_S not in set(tab["f_c_s"])
    row = tab[tab.mechanism == "seccomp/libzmq-tcp/remote"].iloc[0]
    p = prof[0]
    want = M.S_r(p.C, p.g, p.n, p.b("min-freq:20%"), 10.0, row["f_c_s"])
    assert row[f"S_r {p.name} γ=10"] == pytest.approx(float(want))


def test_native_time_fallbacks(tmp_path):
    dirs = [delegated_run(tmp_path / f"r{k}", ["tar", "c"], {"read": k}, 1e-5, 2.0, native=False,
                          run_noise_s=1e-4, seed=k) for k in (100, 900, 2000)]  # fmt: skip
    profiles, rs = compare.load_runs(dirs)
    native = compare.native_times(profiles, rs)
    assert f"tar c @ {HOST}" not in native  # no native source at all
    inter = compare.whole_run_intercepts(rs, native)
    native = compare.native_times(profiles, rs, inter)
    t, src = native[f"tar c @ {HOST}"]
    assert src == "whole-run fit intercept" and t == pytest.approx(2.0, rel=1e-3)


def test_malformed_run_dirs(tmp_path):
    with pytest.raises(errors.TestbedError, match="no such run directory"):
        compare.load_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.TestbedError, match="not a run directory"):
        compare.load_runs([tmp_path / "empty"])
    d = delegated_run(tmp_path / "d", ["x"], {"read": 5}, 1e-5, 1.0)
    meta = json.loads((d / "run.json").read_text())
    meta["wall_s"] = None
    (d / "run.json").write_text(json.dumps(meta))
    with pytest.raises(errors.TestbedError, match="wall_s"):
        compare.load_runs([d])
    (d / "run.json").write_text("{not json")
    with pytest.raises(errors.TestbedError, match="unreadable"):
        compare.load_runs([d])
    (d / "run.json").write_text(json.dumps({**meta, "rundir_version": 99}))
    with pytest.raises(errors.TestbedError, match="version"):
        compare.load_runs([d])
    meta["wall_s"] = 1.0
    (d / "run.json").write_text(json.dumps(meta))
    with open(d / "calls.bin", "ab") as f:
        f.write(b"xyz")  # truncated record
    with pytest.raises(errors.TestbedError, match="truncated"):
        compare.load_runs([d])


def test_runs_frame(runs):
    _, rs = runs
    df = compare.runs_frame(rs)
    assert len(df) == 9 and set(df["forwarded_calls"]) == {300, 4000, 5500}
    assert np.all(df["wall_s"] > 0.9)
