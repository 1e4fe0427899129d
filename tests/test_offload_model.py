"""The offload model (analysis/offload_model.py) and its class in model_accuracy.

Unit tests build offload runs in memory (per-call records with known forwarding
and execution times); one integration test runs two small workloads in offload
mode through ``testbed experiment`` and analyses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import accuracy, figcheck, offload, offload_model
from analysis.compare import DelegatedRun, NativeRun
from testbed.core import errors, rundir
from testbed.core.predictors import OFFLOAD_PREDICTORS, PREDICTORS, check_predictor
from testbed.core.syscalls import lookup
from tests.conftest import run_testbed

READ, WRITE, OPENAT = lookup("read"), lookup("write"), lookup("openat")
#: The truth of the synthetic world: one-way forwarding alpha_s + BETA x, execution e_s.
ALPHA = {READ: 30e-6, WRITE: 35e-6, OPENAT: 80e-6}
BETA = 0.2e-9
EXEC = {READ: 5e-6, WRITE: 8e-6, OPENAT: 40e-6}


def _calls(spec: list[tuple[int, int, int]], scale: float = 1.0) -> np.ndarray:
    """Records of ``(nr, count, bytes per call)``: f_c and exec from the truth (times
    ``scale``), bytes split as a read's (out) or anything else's (in)."""
    nr = np.concatenate([np.full(n, s) for s, n, _ in spec] or [np.zeros(0, int)])
    size = np.concatenate([np.full(n, x) for _, n, x in spec] or [np.zeros(0, int)])
    fc = scale * (np.array([ALPHA[s] for s in nr]) + BETA * size)
    ex_ns = np.round(scale * np.array([EXEC[s] for s in nr]) * 1e9).astype(np.int64)
    held = np.round(2 * fc * 1e9).astype(np.int64) + ex_ns
    t = 1_000_000_000 + np.concatenate([[0], np.cumsum(held + 1000)[:-1]]).astype(np.int64)
    rec = np.zeros(len(nr), dtype=rundir.CALL_DTYPE)
    rec["nr"] = nr
    rec["bytes_out"] = np.where(nr == READ, size, 0)
    rec["bytes_in"] = np.where(nr == READ, 0, size)
    rec["t_trap"], rec["t_send"] = t, t + 1
    rec["t_reply"], rec["t_resume"] = t + held - 1, t + held
    rec["d_recv"], rec["d_exec_start"] = t + 2, t + 3
    rec["d_exec_end"], rec["d_send"] = t + 3 + ex_ns, t + 4 + ex_ns
    return rec


#: Workloads: call mixes, native time, native kernel time, calls continued locally.  Every
#: syscall is made by two workloads at least (one never seen in training would get the
#: pooled intercept, not its own).
WORKLOADS = {
    "cat": ([(OPENAT, 1, 20), (READ, 40, 131072)], 0.006, 0.005, 100),
    "tar": ([(OPENAT, 2, 20), (READ, 400, 10240)], 0.010, 0.009, 500),
    "tree": ([(OPENAT, 200, 12), (READ, 200, 3000), (WRITE, 50, 100)], 0.003, 0.002, 250),
    "sqlite": ([(OPENAT, 5, 30), (READ, 300, 4096), (WRITE, 600, 4096)], 0.030, 0.010, 80),
}


def _wall(spec, t_nd: float, kernel: float, scale: float = 1.0) -> float:
    """The model's own t_d for this call list (G_local = min(E, kernel)), no other term."""
    c = _calls(spec, scale)
    d = rundir.derived(c)
    e = float(d["exec"].sum()) / 1e9
    return t_nd - min(e, kernel) + e + 2 * float(d["f_c"].sum()) / 1e9


def _offload_run(w: str, rep: int, host: str = "node1", scale: float = 1.0, wall=None):
    spec, t_nd, kernel, n_local = WORKLOADS[w]
    meta = {
        "kind": "delegated", "mode": "offload", "backend": "seccomp",
        "endpoint": "tcp://127.0.0.1:5555", "command": [w], "forwarded": [],
        "wall_s": wall if wall is not None else _wall(spec, t_nd, kernel),
        "offload": {"local_calls": n_local, "paths": ["/gpfs"]},
    }  # fmt: skip
    cell = {"workload": w, "host": host, "repetition": rep, "plan": "offload", "mode": "offload",
            "run_id": f"{w}.offload.local.r{rep}"}  # fmt: skip
    return DelegatedRun(Path(f"/r/{host}/{w}.offload.r{rep}"), meta, _calls(spec, scale), cell)


def _cost_run(w: str, rep: int, fwd: tuple[str, ...], host: str = "node1"):
    spec, t_nd, _, _ = WORKLOADS[w]
    calls = _calls(spec)
    calls["d_exec_start"] = calls["d_exec_end"] = 0  # cost mode: nothing executed remotely
    held = (calls["t_resume"] - calls["t_trap"]).sum() / 1e9
    meta = {"kind": "delegated", "mode": "cost", "backend": "seccomp",
            "endpoint": "tcp://127.0.0.1:5555", "command": [w], "forwarded": list(fwd),
            "wall_s": t_nd + held}  # fmt: skip
    cell = {"workload": w, "host": host, "repetition": rep, "plan": "cost",
            "run_id": f"{w}.{'+'.join(fwd)}.local.r{rep}"}  # fmt: skip
    return DelegatedRun(Path(f"/r/{host}/{w}.{'+'.join(fwd)}.r{rep}"), meta, calls, cell)


def _natives(host: str = "node1") -> list[NativeRun]:
    out = []
    for w, (_, t_nd, kernel, _) in WORKLOADS.items():
        for i, f in enumerate((0.98, 1.0, 1.02)):  # median t_nd, kernel share as given
            meta = {"kind": "native", "wall_s": t_nd * f, "user_s": (t_nd - kernel) * f,
                    "sys_s": kernel * f, "exit_status": 0, "command": [w]}  # fmt: skip
            out.append(NativeRun(Path(f"/r/{host}/native/{w}.{i}"), meta,
                                 {"workload": w, "host": host}))  # fmt: skip
    return out


def _world(plant: dict | None = None) -> list[DelegatedRun]:
    plant = plant or {}
    runs = [_offload_run(w, rep) for w in WORKLOADS for rep in (1, 2, 3)]
    for i, r in enumerate(runs):
        if (r.workload, r.repetition) in plant:
            runs[i] = plant[(r.workload, r.repetition)]
    return runs


# ---------------------------------------------------------------- the maths


@pytest.mark.unit
def test_call_line_recovers_intercepts_per_syscall_and_one_slope_per_byte():
    rng = np.random.default_rng(1)
    nr = np.array([READ] * 200 + [WRITE] * 150 + [OPENAT] * 5)
    x = rng.integers(0, 65536, len(nr)).astype(float)
    a = {READ: 30e-6, WRITE: 50e-6, OPENAT: 90e-6}
    y = np.array([a[int(n)] for n in nr]) + 0.3e-9 * x
    line = offload_model.fit_line(nr, x, y, min_calls=20)
    assert set(line.per_nr) == {READ, WRITE}  # openat (5 calls): the pooled intercept
    assert line.per_nr[READ] == pytest.approx(30e-6, rel=1e-9)
    assert line.per_nr[WRITE] == pytest.approx(50e-6, rel=1e-9)
    assert line.rest == pytest.approx(90e-6, rel=1e-9)
    assert line.slope == pytest.approx(0.3e-9, rel=1e-9)
    assert line.predict(np.array([OPENAT]), np.array([1000.0]))[0] == pytest.approx(90e-6 + 0.3e-6)
    # a negative slope is no cost per byte: 0, and the intercepts are the means
    down = offload_model.fit_line(nr[:200], x[:200], 60e-6 - 0.1e-9 * x[:200])
    assert down.slope == 0 and down.per_nr[READ] == pytest.approx((60e-6 - 0.1e-9 * x[:200]).mean())
    assert (down.predict(np.array([READ]), np.array([1e9])) >= 0).all()


@pytest.mark.unit
def test_t_d_offload_is_t_nd_minus_local_plus_exec_plus_forwarding():
    assert offload_model.t_d_offload(1.0, 0.2, 0.3, 0.4) == pytest.approx(1.5)
    assert offload_model.t_d_offload(1.0, 0.2, 0.3, 0.4, 0.05, -0.01) == pytest.approx(1.54)


@pytest.mark.unit
def test_known_world_is_predicted_exactly_from_other_workloads():
    """Runs made by the model's own equations: every workload-scheme prediction of the
    base predictor is exact, and the terms are what the truth gives."""
    runs = _world()
    nat = {id(r): offload_model.Native(WORKLOADS[r.workload][1], WORKLOADS[r.workload][2])
           for r in runs}  # fmt: skip
    rows = offload_model.predict_all(runs, nat, ("workload",), declared="offload")
    assert len(rows) == len(runs)
    for o in rows:
        r = o["stats"].run
        # exact up to the records' 1 ns resolution
        assert o["pred_offload"] == pytest.approx(r.wall, rel=1e-4)
        assert o["fit"].beta == pytest.approx(BETA, rel=1e-3)
        assert {x.split(".")[0].split("/")[-1] for x in o["fit"].train} == set(WORKLOADS) - {
            r.workload
        }
        spec, _, kernel, _ = WORKLOADS[r.workload]
        e = sum(n * EXEC[nr] for nr, n, _ in spec)
        f = sum(2 * n * (ALPHA[nr] + BETA * x) for nr, n, x in spec)
        assert o["offload_E_s"] == pytest.approx(e, rel=1e-4)
        assert o["offload_G_local_s"] == pytest.approx(min(e, kernel), rel=1e-4)
        assert o["offload_F_s"] == pytest.approx(f, rel=1e-4)
    # the kernel time bounds G_local: with none known, G_local = E and they cancel
    s = offload_model.offload_stats(runs[0])
    fit = rows[0]["fit"]
    unbounded = offload_model.terms(s, fit)
    assert unbounded["G_local"] == pytest.approx(unbounded["E"])


@pytest.mark.unit
def test_local_calls_term_is_fitted_on_training_residuals():
    """Walls with a per-run cost k and c per call continued locally: offload+local finds
    both (on training runs) and predicts the held-out workload exactly."""
    k, c = 0.004, 20e-6
    runs = []
    for w in WORKLOADS:
        spec, t_nd, kernel, n_local = WORKLOADS[w]
        for rep in (1, 2):
            runs.append(_offload_run(w, rep, wall=_wall(spec, t_nd, kernel) + k + c * n_local))
    nat = {id(r): offload_model.Native(WORKLOADS[r.workload][1], WORKLOADS[r.workload][2])
           for r in runs}  # fmt: skip
    rows = offload_model.predict_all(runs, nat, ("workload",))
    for o in rows:
        assert o["fit"].c_local == pytest.approx(c, rel=1e-3)
        assert o["fit"].k_local == pytest.approx(k, rel=1e-3)
        assert o["err_offload+local"] == pytest.approx(0, abs=1e-4)
        assert abs(o["err_offload"]) > 1e-3  # without the terms it is off
        # nested CV on the training runs finds the exact one too
        assert o["choice"].predictor == "offload+local"
        assert o["choice"].how == "inner cross-validation"


@pytest.mark.unit
def test_a_remote_delegates_local_cost_comes_from_loopback_runs_of_the_training_set():
    remote = [_offload_run(w, 1) for w in WORKLOADS]
    for r in remote:
        r.meta["endpoint"] = "tcp://10.0.0.2:5555"
    assert {r.mechanism for r in remote} != {_offload_run("tar", 1).mechanism}
    nat = {}
    alone = offload_model.predict_all(remote, nat, ("workload",), declared="offload")
    assert all("assumed" in o["offload_e_local_from"] for o in alone)
    loop = [_offload_run(w, 1, scale=0.5) for w in WORKLOADS]
    both = offload_model.predict_all([*remote, *loop], nat, ("workload",), declared="offload")
    for o in both:
        # a remote run: e_loc from the other workloads' loopback runs (3 of 4)
        if id(o["stats"].run) in {id(r) for r in remote}:
            assert o["offload_e_local_from"] == "e of 3 loopback offload run(s)"
            assert o["fit"].exec_loc.per_nr[READ] == pytest.approx(0.5 * EXEC[READ], rel=1e-3)
            assert o["fit"].exec_del.per_nr[READ] == pytest.approx(EXEC[READ], rel=1e-3)
        else:
            assert o["fit"].exec_loc is o["fit"].exec_del


# ---------------------------------------------------------------- honesty


def _offload_pred(runs, declared=None) -> pd.DataFrame:
    pred = accuracy.predictions(runs, _natives(), {}, declared=declared)
    return pred[accuracy.klass(pred) == "offload"]


@pytest.mark.unit
def test_a_run_is_never_predicted_from_its_own_records_nor_its_workloads():
    """Plant a tar run (repetition 2) whose own per-call costs are 3x the others' and
    whose wall those costs explain exactly: its own records would make its prediction
    perfect.  They are not used: its predictions are those made when its records (and,
    for the workload scheme, every tar run's) are replaced by anything else."""
    spec, t_nd, kernel, _ = WORKLOADS["tar"]
    planted = _offload_run("tar", 2, scale=3.0, wall=_wall(spec, t_nd, kernel, scale=3.0))
    other = _offload_run("tar", 2, scale=0.2, wall=planted.wall)  # same wall, other records
    a = _offload_pred(_world({("tar", 2): planted}))
    b = _offload_pred(_world({("tar", 2): other}))
    for scheme in ("workload", "repetition"):
        ra = a[(a["scheme"] == scheme) & (a["run"] == planted.path.name)].iloc[0]
        rb = b[(b["scheme"] == scheme) & (b["run"] == planted.path.name)].iloc[0]
        assert np.isfinite(ra["predicted"])
        assert ra["predicted"] == rb["predicted"] and ra["predictor"] == rb["predictor"]
        assert abs(ra["rel_error"]) > 0.3  # its own data would have made it 0
        assert planted.path.name not in ra["train_run_ids"]
    wl = a[(a["scheme"] == "workload") & (a["workload"] == "tar")]
    assert not any("tar." in ids for ids in wl["train_run_ids"])  # no tar run trains a tar run
    rep = a[(a["scheme"] == "repetition") & (a["run"] == planted.path.name)].iloc[0]
    assert all(x.endswith(".r1") for x in rep["train_run_ids"].split(";"))
    # the other tar runs (workload scheme) do not see the planted one either
    for name in ("tar.offload.r1", "tar.offload.r3"):
        pa = a[(a["scheme"] == "workload") & (a["run"] == name)]["predicted"].iloc[0]
        pb = b[(b["scheme"] == "workload") & (b["run"] == name)]["predicted"].iloc[0]
        assert pa == pb


@pytest.mark.unit
def test_offload_and_cost_runs_are_never_pooled():
    off = _world()
    cost = [_cost_run(w, rep, fwd) for w in ("cat", "tar") for rep in (1, 2)
            for fwd in (("read",), ("openat", "read"))]  # fmt: skip
    pred = accuracy.predictions([*cost, *off], _natives(), {})
    cls = pd.Series(accuracy.klass(pred), index=pred.index)
    is_off = pred["mechanism"].str.endswith("/offload")
    assert (cls[is_off] == "offload").all() and not (cls[~is_off] == "offload").any()
    names_off = {r.path.name for r in off}
    names_cost = {r.path.name for r in cost}
    for _, row in pred.iterrows():
        train = {x.split("/")[-1] for x in row["train_run_ids"].split(";") if x}
        assert train <= (names_off if row["mechanism"].endswith("/offload") else names_cost)
    # each class has only its own predictors
    assert pred.loc[is_off, [f"pred_{p}" for p in PREDICTORS]].isna().all().all()
    assert pred.loc[~is_off, [f"pred_{p}" for p in OFFLOAD_PREDICTORS]].isna().all().all()
    assert set(pred.loc[is_off & pred["predicted"].notna(), "predictor"]) <= set(OFFLOAD_PREDICTORS)
    # the headline has a class of its own, from the declared offload scheme
    acc = accuracy.model_accuracy(pred, "policy")
    assert set(acc.loc[acc["mechanism"].str.endswith("/offload"), "scheme"]) == {
        offload_model.OFFLOAD_SCHEME
    }
    head = accuracy.headline_table(acc)
    assert "offload" in set(head["class"]) and "workloads" in set(head["class"])
    assert int(head.set_index("class").loc["offload", "runs"]) == len(off)


@pytest.mark.unit
def test_a_declared_offload_predictor_is_used_for_offload_runs_only():
    assert check_predictor("offload+local") == "offload+local"
    with pytest.raises(errors.TestbedError, match="unknown predictor"):
        check_predictor("offload+nothing")
    cost = [_cost_run("cat", rep, fwd) for rep in (1, 2) for fwd in (("read",), ("openat",))]
    pred = accuracy.predictions([*cost, *_world()], _natives(), {}, declared="offload+fixed")
    is_off = pred["mechanism"].str.endswith("/offload")
    assert set(pred.loc[is_off, "predictor"]) == {"offload+fixed"}
    assert set(pred.loc[is_off, "chosen_by"]) == {"declared"}
    assert not (pred.loc[~is_off, "chosen_by"] == "declared").any()


@pytest.mark.unit
def test_prediction_figure_is_readable_and_shows_every_run():
    pred = accuracy.predictions(_world(), _natives(), {})
    acc = accuracy.model_accuracy(pred, "policy")
    frame = offload.prediction_frame(acc)
    assert len(frame) == len(_world()) and np.isfinite(frame["predicted_slowdown"]).all()
    assert (frame["measured_slowdown"] > 1).all()
    fig = offload.prediction_figure(frame)
    assert figcheck.problems(fig) == []
    pts = sum(len(c.get_offsets()) for c in fig.axes[0].collections)
    assert pts == 2 * len(frame)  # measured and predicted, one point each per run
    assert offload.prediction_frame(pd.DataFrame()).empty


# ---------------------------------------------------------------- for real


@pytest.mark.integration
def test_two_offload_workloads_through_experiment_and_analyze(tmp_path):
    plan = tmp_path / "plan.yml"
    plan.write_text(
        "name: offload-model\nmode: offload\noffload_path: /tb-offload-model\nrepetitions: 2\n"
        "workloads:\n  - {name: gzip, size_mb: 0.3}\n  - {name: cat, size_mb: 0.5}\n"
        "delegates: [local]\n"
    )
    results = tmp_path / "results"
    proc = run_testbed("experiment", str(plan), "-o", str(results), "--host-label", "here",
                       text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ran=4 skipped=0 failed=0" in proc.stdout
    report = tmp_path / "report"
    proc = run_testbed("analyze", str(results), "-o", str(report), text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    acc = pd.read_csv(report / "tables" / "model_accuracy.csv")
    off = acc[acc["mechanism"].str.endswith("/offload")]
    assert len(off) == 4 and set(off["scheme"]) == {"workload"}
    assert np.isfinite(off["predicted"]).all() and (off["predicted"] > 0).all()
    assert set(off["predictor"]) <= set(OFFLOAD_PREDICTORS)
    for _, row in off.iterrows():  # trained on the other workload's runs only
        assert row["workload"] not in row["train_run_ids"]
    head = pd.read_csv(report / "tables" / "accuracy_headline.csv")
    assert "offload" in set(head["class"])
    assert (report / "figures" / "offload_model.png").stat().st_size > 0
    assert "figures/offload_model.png" in (report / "report.md").read_text()
    cells = [json.loads(p.read_text()) for p in (results / "here").glob("*.r*/experiment.json")]
    assert cells and all(c["output_matches_native"] for c in cells)
