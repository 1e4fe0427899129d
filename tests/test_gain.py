"""The gain benchmark (gainbench): exact syscall profile, fallback equivalence, the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from testbed.core import errors, rundir
from testbed.jobs import gainbench
from tests.conftest import run_testbed, strace_counts

DESIGN_CALLS = ",".join(sorted({*gainbench.MIX, *gainbench.ONCE}))


def test_strace_counts_equal_the_design_exactly():
    argv = gainbench.command(3, phases=4, samples=200_000)
    assert Path(argv[0]).name.startswith("gainbench-")  # the C build, not the fallback
    assert strace_counts(argv, "all") == gainbench.expected_counts(4)


def test_testbed_profile_equals_the_design(tmp_path):
    argv = gainbench.command(1, phases=3, samples=100_000)
    r = run_testbed("profile", "--quiet", "--method", "strace", "-o", str(tmp_path / "p"), "--",
                    *argv)  # fmt: skip
    assert r.returncode == 0, r.stderr
    prof = rundir.load(tmp_path / "p")
    counts = {row["name"]: int(row["n"]) for row in prof.syscalls if int(row["n"]) > 0}
    assert counts == gainbench.expected_counts(3, exit_group=True)  # strace -T shows exit_group


def test_output_depends_on_gamma_only_and_fallback_agrees():
    c1 = subprocess.run(gainbench.command(2, 3, 40_000), capture_output=True, check=True).stdout
    c2 = subprocess.run(gainbench.command(2, 3, 40_000), capture_output=True, check=True).stdout
    assert c1 == c2 and c1.startswith(b"gainbench gamma 2 samples 60000 pi_x1e6 3")
    # the Python fallback computes the same points (its argv divides SAMPLES by 100)
    py = gainbench.command(2, 3, 40_000 * gainbench.PY_SAMPLE_DIVISOR, fallback=True)
    assert py[0] == sys.executable
    assert subprocess.run(py, capture_output=True, check=True).stdout == c1
    # and makes at least the designed calls (its interpreter start-up adds more;
    # glibc's fstat is newfstatat(fd, "", AT_EMPTY_PATH))
    counts = strace_counts(py, "all")
    for name, n in gainbench.expected_counts(3).items():
        name = "newfstatat" if name == "fstat" else name
        assert counts.get(name, 0) >= n, name
    assert counts["getppid"] == gainbench.expected_counts(3)["getppid"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gammas", "1,x"], "gamma list '1,x': 'x' is not an integer"),
        (["--gammas", "1,0"], "gamma 0 is not an integer in 1..4096"),
        (["--gammas", "2,2"], "2 appears twice"),
        (["--forward", "min-freq:120%"], "k = 120% is outside 0-100%"),
    ],
)
def test_bad_gamma_input_is_one_error_line(tmp_path, args, message):
    r = run_testbed("gainbench", *args, "-o", str(tmp_path / "res"), text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("testbed: error: ")
    assert message in lines[0], lines
    assert not (tmp_path / "res").exists()


def test_bad_gain_plan_is_one_error_line(tmp_path):
    plan = tmp_path / "p.yml"
    plan.write_text("workloads: [{name: gain, gamma: [1, two]}]\nforward: [write]\n"
                    "delegates: [local]\n")  # fmt: skip
    r = run_testbed("experiment", str(plan), "--check", text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1
    assert "workload 'gain': gamma 'two' is not an integer" in lines[0]


def test_gainbench_names_and_the_old_names_still_work(tmp_path):
    """Plan workload ``gainbench`` runs as ``gainbench-g<G>``; the old ``gain`` keeps
    ``gain-g<G>``; ``testbed gamma`` is ``testbed gainbench``, not listed in --help."""
    from testbed.jobs.experiment import parse_plan

    for name in ("gainbench", "gain"):
        data = {"workloads": [{"name": name, "gamma": [1, 4]}], "forward": ["write"],
                "delegates": ["local"]}  # fmt: skip
        plan = parse_plan(data, "p", "test")
        assert [(w.name, w.gamma) for w in plan.workloads] == [(f"{name}-g1", 1), (f"{name}-g4", 4)]
    r = run_testbed("gamma", "--gammas", "1,2", "--phases", "2", "--check",
                    "-o", str(tmp_path / "res"), text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "gainbench-g2" in r.stdout and "valid, " in r.stdout
    assert not (tmp_path / "res").exists()
    verbs = run_testbed("--help", text=True).stdout
    assert "\n    gainbench" in verbs and "\n    gamma" not in verbs


@pytest.mark.slow
def test_short_sweep_gives_figs_12_13_and_model_accuracy(tmp_path):
    """γ ∈ {1, 4}, two sets, two repetitions, natives interleaved: the whole loop."""
    res, rep = tmp_path / "res", tmp_path / "rep"
    r = run_testbed("gainbench", "--gammas", "1,4", "--repetitions", "2", "--phases", "3",
                    "--samples", "2000000", "--forward", "write", "--forward", "max-freq:20%",
                    "-o", str(res), "--report", str(rep), "--host-label", "here", "--pin",
                    text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Model accuracy: mean |error|" in r.stdout
    host = res / "here"
    natives = sorted((host / "native").glob("gainbench-g*.r*"))
    forwarded = sorted(p for p in host.glob("gainbench-g*.r*") if p.is_dir())
    assert len(natives) == len(forwarded) == 8  # one native before every forwarded run
    for d in forwarded:
        cell = json.loads((d / "experiment.json").read_text())
        assert cell["output_matches_native"] and cell["gamma"] in (1, 4)
        cpu = cell["cpu"]
        assert cpu["relay_cpu_s"] > 0 and cpu["delegate_cpu_s"] is not None
        if len(os.sched_getaffinity(0)) >= 2:  # pinned apart: program alone on its CPU
            assert cpu["program_cpus"] and cpu["relay_cpus"] and cpu["delegate_cpus"]
            assert cpu["relay_shares_program_cpus"] is False
            assert cpu["delegate_shares_program_cpus"] is False
        nat = json.loads((host / cell["native_run"] / "run.json").read_text())
        assert nat["kind"] == "native" and nat["wall_s"] > 0
    # Fig. 12's data: the γ = 1 profile, exactly the design
    prof = pd.read_csv(rep / "tables" / "gain_profile.csv")
    assert dict(zip(prof["syscall"], prof["n"], strict=True)) == gainbench.expected_counts(3, True)
    # Fig. 13's data: measured, naive and refined speedups for each set and the natives
    sp = pd.read_csv(rep / "tables" / "gain_speedup.csv")
    assert set(sp["set"]) == {"native", "write", "max-freq:20%"}
    assert set(sp["gamma"]) == {1, 4} and sp[["measured", "S_n", "S_r"]].notna().all().all()
    assert (sp[sp["gamma"] == 1]["S_n"] == 1.0).all()
    fwd = sp[sp["set"] != "native"]
    assert (fwd["S_r"] < fwd["S_n"]).all()  # forwarding costs something at every γ
    # model accuracy: every run, every predictor, natives measured (never the intercept)
    acc = pd.read_csv(rep / "tables" / "model_accuracy.csv")
    assert len(acc) == 8 and set(acc["gamma"]) == {1, 4}
    assert acc[[c for c in acc if c.startswith("pred_")]].notna().all().all()
    assert acc["t_nd_source"].str.startswith("gamma=1 native (4 runs)").all()
    assert acc["relay_cpu_share"].gt(0).all()
    for name in ("fig12_gain_profile", "fig13_gain_speedup"):
        assert (rep / "figures" / f"{name}.png").exists()
    text = (rep / "report.md").read_text()
    assert text.index("**Model accuracy") < text.index("## Profiles")


@pytest.mark.unit
def test_placement_pins_apart_only_with_two_cpus():
    from testbed.core.cpus import parse_cpus, placement

    with pytest.raises(
        errors.TestbedError, match="pin: true needs at least 2 CPUs.*has 1 available"
    ):
        placement(True, {0})
    two = placement(True, {2, 5})
    assert (two.program, two.relay, two.delegate) == ({2}, {5}, {5})
    four = placement(True, {0, 1, 2, 3})
    assert (four.program, four.relay, four.delegate) == ({0}, {1}, {2})
    assert placement(False, {0, 1}).program is None
    assert parse_cpus("0,2-3") == {0, 2, 3}
    with pytest.raises(ValueError):
        parse_cpus("0,a")


def test_run_rejects_a_cpu_the_machine_lacks():
    r = run_testbed("run", "--delegate", "tcp://127.0.0.1:1", "--forward", "write",
                    "--pin-program", "4096", "--", "true", text=True)  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "--pin-program: CPUs '4096': this machine has" in lines[-1]
