"""testbed experiment: plan validation, a real local matrix, resuming.

Runs real workloads through ``testbed run`` against a delegate the
experiment starts on loopback; the playbook flavour over SSH to namespace
nodes is in test_provision.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from testbed import experiment, rundir, workloads

#: Inherited by everything the tested commands start, so that leftovers of
#: *these* tests can be told from processes of other test suites.
MARK = f"TESTBED_TEST_MARK=experiment-{os.getpid()}"


def tb(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TESTBED_TEST_MARK=MARK.split("=", 1)[1])
    return subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd, env=env,
    )  # fmt: skip


def _delegates() -> set[int]:
    """pids of running ``testbed delegate`` processes started by these tests."""
    pids = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"testbed" in cmd and b"delegate" in cmd and b"--listen" in cmd:
            try:
                env = (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if MARK.encode() in env:
                pids.add(int(d.name))
    return pids


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("workloads: [gzipp]\nforward: [read]\ndelegates: [local]\n", "unknown workload 'gzipp'"),
        ("workloads: [gzip]\nforward: ['read,wriet']\ndelegates: [local]\n", "wriet"),
        ("workloads: [gzip]\nforward: [{policy: 'least:5%'}]\ndelegates: [local]\n", "unknown policy"),
        ("workloads: [gzip]\nforward: [read]\n", "'delegates' is missing"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: ['tcp://nohost']\n", "expected tcp://HOST:PORT"),
        ("workloads: [{name: x, command: [no-such-program-xyz]}]\nforward: [read]\ndelegates: [local]\n",
         "program 'no-such-program-xyz'"),
        ("workloads: [gzip\n", "not valid YAML"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: [local]\nrepeats: 3\n", "unknown key(s) repeats"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: [{name: k, kthread: {delay_us: -1}}]\n",
         "kthread delay_us"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: [{name: k, kthread: {tlb: 1}}]\n",
         "a kthread delegate is"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: [{kthread: {faithful: 2}}]\n",
         "kthread faithful"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: [{kthread: {flush_caller_tlb: true}}]\n",
         "kthread flush_caller_tlb needs faithful: true"),
        ("mode: offload\noffload_path: /x\nworkloads: [gzip]\ndelegates: [kthread]\n",
         "kthread delegates measure cost only"),
        ("mode: offload\nworkloads: [gzip]\ndelegates: [local]\n", "needs offload_path"),
        ("mode: offload\noffload_path: /x\nworkloads: [gzip]\nforward: [read]\ndelegates: [local]\n",
         "drop 'forward'"),
        ("offload_path: /x\nworkloads: [gzip]\nforward: [read]\ndelegates: [local]\n",
         "only used with mode: offload"),
    ],
)  # fmt: skip
def test_bad_plan_is_one_clear_error_and_starts_nothing(tmp_path, body, message):
    plan = _write(tmp_path / "plan.yml", body)
    before = _delegates()
    proc = tb("experiment", str(plan), "-o", str(tmp_path / "results"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("testbed: error: plan "), proc.stderr
    assert message in lines[0]
    assert not (tmp_path / "results").exists()
    assert not _delegates() - before


def test_missing_plan_file(tmp_path):
    proc = tb("experiment", str(tmp_path / "nope.yml"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"testbed: error: plan {tmp_path / 'nope.yml'}: no such file"


def test_unreachable_delegate_fails_before_any_run(tmp_path):
    # a loopback port nobody listens on
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plan = _write(
        tmp_path / "plan.json",
        json.dumps(
            {
                "workloads": [{"name": "cat", "size_mb": 0.1}],
                "forward": ["read"],
                "delegates": ["local", {"name": "gone", "endpoint": f"tcp://127.0.0.1:{port}"}],
            }
        ),
    )
    before = _delegates()
    proc = tb("experiment", str(plan), "-o", str(tmp_path / "results"))
    assert proc.returncode == 2
    assert "testbed: error: delegate gone:" in proc.stderr
    assert not list((tmp_path / "results").glob("*/*.r1")), "no run may have started"
    assert not _delegates() - before, "the local delegate must have been stopped"


def test_check_counts_the_matrix(tmp_path):
    plan = _write(
        tmp_path / "p.yml",
        "repetitions: 3\nworkloads: [gzip, cat]\nforward: [read, 'read,write']\n"
        "delegates: [local, 'tcp://127.0.0.1:9']\n",
    )
    proc = tb("experiment", str(plan), "--check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "plan p: valid, 24 runs"
    cells = experiment.cells(experiment.load_plan(plan))
    assert len({c.run_id for c in cells}) == 24
    assert cells[0].run_id == "gzip.read.local.r1"


def test_kthread_delegates_are_node_local_and_kept(tmp_path):
    plan = _write(
        tmp_path / "p.yml",
        "workloads: [cat]\nforward: [read]\n"
        "delegates: [local, kthread, {name: kt20, kthread: {delay_us: 20, faithful: true}},\n"
        "  {name: ktf, kthread: {faithful: true, flush_caller_tlb: true}}]\n",
    )
    specs = experiment.load_plan(plan).delegates[:3]
    assert [(d.name, d.kthread, d.delay_us, d.faithful) for d in specs] == [
        ("local", False, 0.0, False),
        ("kthread", True, 0.0, False),
        ("kt20", True, 20.0, True),
    ]
    # --delegate (what experiment.yml passes) replaces the network delegates only
    over = experiment.load_plan(plan, ["node3=tcp://10.213.47.3:5555"]).delegates
    assert [d.name for d in over] == ["node3", "kthread", "kt20", "ktf"]
    assert experiment.mechanism_args(over[3], "kthread", experiment.load_plan(plan))[-2:] == [
        "--faithful", "--flush-caller-tlb"]  # fmt: skip
    d = over[2]
    assert experiment.mechanism_args(d, "kthread", experiment.load_plan(plan)) == [
        "--backend", "kmod", "--mode", "kthread", "--delay-us", "20", "--faithful",
    ]  # fmt: skip
    proc = tb("experiment", str(plan), "--check", "--delegate", "n=tcp://127.0.0.1:9")
    assert proc.returncode == 0 and proc.stdout.strip() == "plan p: valid, 4 runs", proc.stderr


@pytest.mark.root
@pytest.mark.slow
def test_kthread_cells_are_skipped_with_one_line_without_the_module(tmp_path):
    if os.path.exists("/dev/mktrace"):
        pytest.skip("the mktrace module is loaded here (the VM test covers kthread cells)")
    plan = _write(
        tmp_path / "plan.yml",
        "name: kt-skip\nworkloads:\n  - {name: cat, size_mb: 0.1}\nforward: [read]\n"
        "delegates: [local, kthread]\n",
    )
    results = tmp_path / "results"
    proc = tb("experiment", str(plan), "-o", str(results), "--host-label", "here")
    assert proc.returncode == 0, proc.stderr
    assert "ran=1 skipped=1 failed=0" in proc.stdout
    skip = [ln for ln in proc.stderr.splitlines() if "skipping" in ln]
    assert skip == [
        "experiment kt-skip: skipping delegate(s) kthread on here (1 runs): mktrace module "
        "not loaded (/dev/mktrace missing: seccomp-only node)"
    ]
    assert (results / "here" / "cat.read.local.r1" / "run.json").exists()
    assert not (results / "here" / "cat.read.kthread.r1").exists()


@pytest.mark.root
@pytest.mark.slow
def test_local_matrix_runs_resumes_and_matches_native(tmp_path):
    plan = _write(
        tmp_path / "plan.yml",
        "name: local-smoke\nrepetitions: 1\n"
        "workloads:\n  - {name: gzip, size_mb: 0.5}\n  - {name: sha256sum, size_mb: 0.5}\n"
        "forward:\n  - read,write\n  - {policy: 'max-freq:50%'}\n"
        "delegates: [local]\n",
    )
    results = tmp_path / "results"
    before = _delegates()
    proc = tb("experiment", str(plan), "-o", str(results), "--host-label", "here")
    assert proc.returncode == 0, proc.stderr
    assert "ran=4 skipped=0 failed=0" in proc.stdout
    assert "[4/4]" in proc.stderr  # progress lines
    assert not _delegates() - before, "the local delegate must be gone"

    runs = sorted(p for p in (results / "here").iterdir() if p.name.endswith(".r1"))
    assert [p.name for p in runs] == [
        "gzip.max-freq-50pct.local.r1",
        "gzip.read+write.local.r1",
        "sha256sum.max-freq-50pct.local.r1",
        "sha256sum.read+write.local.r1",
    ]
    for p in runs:
        run = rundir.load(p)
        cell = json.loads((p / "experiment.json").read_text())
        assert run.meta["exit_status"] == 0
        assert cell["output_matches_native"] is True
        calls = run.calls()
        assert len(calls) > 0 and (calls["d_recv"] > 0).all()
        if "read+write" in p.name:
            assert sorted(run.meta["forwarded"]) == ["read", "write"]
        else:
            assert len(cell["forward_syscalls"]) >= 2
    assert (results / "here" / "profile-gzip" / "run.json").exists()
    assert json.loads((results / "plan.json").read_text())["name"] == "local-smoke"
    native = json.loads((results / "here" / "native" / "gzip.json").read_text())
    assert native["exit_status"] == 0 and native["output_bytes"] > 0

    # resumable: nothing to do, then exactly the half-written run again
    again = tb("experiment", str(plan), "-o", str(results), "--host-label", "here")
    assert again.returncode == 0 and "ran=0 skipped=4" in again.stdout
    victim = results / "here" / "gzip.read+write.local.r1"
    (victim / "experiment.json").unlink()
    first_calls = (runs[0] / "calls.bin").stat().st_mtime_ns
    third = tb("experiment", str(plan), "-o", str(results), "--host-label", "here")
    assert third.returncode == 0 and "ran=1 skipped=3" in third.stdout, third.stderr
    assert (victim / "experiment.json").exists()
    assert (runs[0] / "calls.bin").stat().st_mtime_ns == first_calls
    assert not list((results / "here").glob("*.partial"))


def test_generated_input_is_reproducible(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    experiment.generate_input(a, 0.2, 7)
    experiment.generate_input(b, 0.2, 7)
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size == 200_000
    assert len(zlib.compress(a.read_bytes(), 6)) < 200_000 / 2, "input should be compressible text"
    assert a.stat().st_mtime == workloads.INPUT_MTIME  # gzip and tar record it


@pytest.mark.parametrize("name", sorted(workloads.CATALOGUE))
def test_catalogue_workload_is_reproducible_and_uses_its_input(tmp_path, name):
    """Each catalogue workload gives the same bytes twice, and different bytes for other input."""
    spec = workloads.CATALOGUE[name]
    if shutil.which(spec.program) is None:
        pytest.skip(f"{spec.program} is not installed (bash .ci/setup installs it)")
    outs = []
    for d, seed in ((tmp_path / "a", 1), (tmp_path / "a", 1), (tmp_path / "b", 2)):
        workloads.prepare(d, spec.size_mb / 4, seed, name)
        proc = subprocess.run(workloads.expand(spec.argv, d), capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outs.append(proc.stdout)
    assert outs[0] == outs[1] and len(outs[0]) > 0
    assert outs[2] != outs[0], "the output depends on the generated input"


def test_check_json_is_versioned_and_host_stamped(tmp_path):
    plan = _write(tmp_path / "p.yml", "name: j\nrepetitions: 2\nworkloads: [cat, {name: gzip, size_mb: 1}]\n"
                  "forward: [read, 'read,write']\ndelegates: [local]\n")  # fmt: skip
    proc = tb("experiment", str(plan), "--check", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["check_version"] == experiment.CHECK_JSON_VERSION == 1 and out["valid"] is True
    assert out["plan"] == "j" and out["runs"] == 2 * 2 * 2 * 1
    assert out["host"]["kernel"] == os.uname().release
    sizes = {w["name"]: w["size_mb"] for w in out["normalised"]["workloads"]}
    assert sizes == {"cat": workloads.CATALOGUE["cat"].size_mb, "gzip": 1.0}


def test_results_of_another_plan_are_never_resumed(tmp_path):
    first = _write(
        tmp_path / "a.yml",
        "workloads: [{name: gzip, size_mb: 1}]\nforward: [read]\ndelegates: [local]\n",
    )
    other = _write(
        tmp_path / "b.yml",
        "workloads: [{name: gzip, size_mb: 4}]\nforward: [read]\ndelegates: [local]\n",
    )
    results = tmp_path / "results"
    results.mkdir()
    (results / "plan.json").write_text(json.dumps(experiment.load_plan(first).to_json()))
    proc = tb("experiment", str(other), "-o", str(results))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"testbed: error: {results} holds results of a different plan ('a'); "
        "choose another results folder (-o) or remove it"
    )
    # the same plan with its delegate moved elsewhere is the same experiment
    moved = experiment.load_plan(first, ["local=tcp://127.0.0.1:9"])
    experiment.check_results_dir(moved, results)


def test_offload_plan_stages_input_at_the_delegate_and_matches_native(tmp_path):
    plan = _write(
        tmp_path / "plan.yml",
        "name: offload-smoke\nmode: offload\noffload_path: /tb-plan-offload\n"
        "workloads:\n  - {name: gzip, size_mb: 0.5}\n  - {name: tar, size_mb: 0.5}\n"
        "delegates: [local]\n",
    )
    results = tmp_path / "results"
    before = _delegates()
    proc = tb("experiment", str(plan), "-o", str(results), "--host-label", "here")
    assert proc.returncode == 0, proc.stderr
    assert "ran=2 skipped=0 failed=0" in proc.stdout
    assert not _delegates() - before
    for name in ("gzip", "tar"):
        p = results / "here" / f"{name}.offload.local.r1"
        run = rundir.load(p)
        cell = json.loads((p / "experiment.json").read_text())
        assert cell["output_matches_native"] is True and cell["mode"] == "offload"
        assert run.meta["mode"] == "offload" and run.meta["offload"]["eio"] == 0
        calls = run.calls()
        reads = calls[calls["nr"] == 0]
        assert int(reads["bytes_out"].sum()) >= 500_000  # the input was read at the delegate
    assert not Path("/tb-plan-offload").exists()  # nothing under the prefix locally
