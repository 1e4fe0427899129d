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

from testbed.core import mechanisms, rundir
from testbed.core.mechanisms import mechanism
from testbed.jobs import experiment, workloads

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
        ("offload_read_ahead: 2\nworkloads: [gzip]\nforward: [read]\ndelegates: [local]\n",
         "offload_read_ahead is only used with mode: offload"),
        ("mode: offload\noffload_path: /x\noffload_read_ahead: 9\nworkloads: [gzip]\n"
         "delegates: [local]\n", "offload_read_ahead must be a number of reads in 0..8"),
        ("workloads: [gzip]\nforward: [{policy: 'max-freq:50%'}]\ndelegates: [local]\nresolve: twice\n",
         "resolve must be once or per-host"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: [local]\nresolve: once\n",
         "resolve is only used with policy forward entries"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: [local]\npredictor: best\n",
         "unknown predictor 'best'"),
        ("workloads: [gzip]\nforward: [read]\ndelegates: [{local: udp}]\n",
         "a same-node delegate is {name, local: tcp|ipc|shm}"),
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
    runner = experiment.Runner(experiment.load_plan(plan), tmp_path / "res", "h", tmp_path / "w")
    cells = [c for c in experiment.cells(runner.plan) if c.delegate.kthread]
    spec = {c.delegate.name: runner.cell_spec(c) for c in cells}
    assert spec["ktf"].to_argv()[4:8] == [
        "--delay-us", "0", "--faithful", "--flush-caller-tlb"]  # fmt: skip
    assert spec["kt20"].to_argv()[:7] == [
        "--mode", "kthread", "--backend", "kmod", "--delay-us", "20", "--faithful",
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
            assert "resolution" not in cell
        else:  # the policy, resolved once before the first cell, from this host's profile
            assert len(cell["forward_syscalls"]) >= 2
            res = cell["resolution"]
            assert res["how"] == "once" and res["on"] == "here"
            assert sorted(run.meta["forwarded"]) == res["set"] == sorted(cell["forward_syscalls"])
            assert cell["policy"] == "max-freq:50%"
    pol = json.loads((results / "policies.json").read_text())
    assert pol["resolved_on"] == "here" and pol["profiles"]["gzip"] == "here/profile-gzip"
    assert set(pol["sets"]) == {"gzip", "sha256sum"}
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


@pytest.mark.root
@pytest.mark.slow
def test_every_node_forwards_the_set_the_controller_resolved(tmp_path):
    """--resolve-policies on one machine (the controller), --policies on the nodes: each
    node forwards the controller's set, not one resolved from its own profile; a
    policies.json of another plan or missing a workload is one clear error."""
    plan = _write(tmp_path / "plan.yml", "name: once\nworkloads:\n  - {name: gzip, size_mb: 0.3}\n"
                  "forward:\n  - {policy: 'max-freq:50%'}\ndelegates: [local]\n")  # fmt: skip
    ctl = tmp_path / "controller"
    proc = tb("experiment", str(plan), "--resolve-policies", "-o", str(ctl), "--host-label", "ctl")
    assert proc.returncode == 0, proc.stderr
    pol = json.loads((ctl / "policies.json").read_text())
    assert pol["resolved_on"] == "ctl" and (ctl / "ctl" / "profile-gzip" / "run.json").exists()
    here = pol["sets"]["gzip"]["max-freq:50%"]
    # a set this host's profile would not give: the controller's profile differed
    pol["sets"]["gzip"]["max-freq:50%"] = (
        ["getppid", "read"] if here != ["getppid", "read"] else ["read"]
    )
    (ctl / "policies.json").write_text(json.dumps(pol))
    results = tmp_path / "node"
    proc = tb("experiment", str(plan), "-o", str(results), "--host-label", "node1",
              "--policies", str(ctl / "policies.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    d = results / "node1" / "gzip.max-freq-50pct.local.r1"
    cell = json.loads((d / "experiment.json").read_text())
    assert sorted(rundir.load(d).meta["forwarded"]) == pol["sets"]["gzip"]["max-freq:50%"]
    assert cell["resolution"] == {"how": "once", "on": "ctl", "profile": "ctl/profile-gzip",
                                  "set": pol["sets"]["gzip"]["max-freq:50%"]}  # fmt: skip
    assert cell["output_matches_native"] is True
    assert not (results / "node1" / "profile-gzip").exists(), "no profile of its own"
    assert json.loads((results / "policies.json").read_text())["sets"] == pol["sets"]
    for change, message in (
        ({"plan": "other"}, "resolved for plan 'other'"),
        ({"sets": {}}, "no syscall set for workload 'gzip'"),
        ({"version": 9}, "not a policies.json of version 1"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(pol | change))
        proc = tb("experiment", str(plan), "-o", str(tmp_path / "r2"), "--policies", str(bad))
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not list((tmp_path / "r2").rglob("run.json"))


@pytest.mark.root
@pytest.mark.slow
def test_same_node_delegates_over_each_transport_and_kept_by_delegate_option(tmp_path):
    """{local: SCHEME} starts one delegate per transport on this node; the runs carry the
    transport in their mechanism and match native; --delegate keeps them (same-node
    mechanisms, like kthread) while it replaces plain `local`."""
    plan = _write(tmp_path / "plan.yml", "name: tr\nworkloads:\n  - {name: cat, size_mb: 0.3}\n"
                  "forward: ['read,write']\ndelegates:\n  - local\n  - {name: shm, local: shm}\n"
                  "  - {name: ipc, local: ipc}\n")  # fmt: skip
    before = _delegates()
    results = tmp_path / "results"
    proc = tb("experiment", str(plan), "-o", str(results), "--host-label", "here")
    assert proc.returncode == 0 and "ran=3 skipped=0 failed=0" in proc.stdout, proc.stderr
    want = {"local": ("seccomp/tcp/loopback", "tcp://"), "shm": ("seccomp/shm/same-node", "shm://"),
            "ipc": ("seccomp/ipc/same-node", "ipc://")}  # fmt: skip
    for name, (mech, scheme) in want.items():
        d = results / "here" / f"cat.read+write.{name}.r1"
        run = rundir.load(d)
        cell = json.loads((d / "experiment.json").read_text())
        assert cell["output_matches_native"] is True and run.meta["exit_status"] == 0
        assert run.meta["endpoint"].startswith(scheme) and len(run.calls()) > 0
        assert mechanism(run.meta) == mech
    assert not _delegates() - before, "every local delegate is gone"
    chk = tb(
        "experiment", str(plan), "--check", "--json", "--delegate", "node3=tcp://10.0.0.3:5555"
    )
    names = [d["name"] for d in json.loads(chk.stdout)["normalised"]["delegates"]]
    assert names == ["node3", "shm", "ipc"], names


@pytest.mark.unit
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
    ahead = _write(
        tmp_path / "ahead.yml",
        "name: offload-ahead\nmode: offload\noffload_path: /tb-plan-offload\n"
        "offload_read_ahead: 4\nworkloads:\n  - {name: cat, size_mb: 2}\ndelegates: [local]\n",
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
        assert mechanisms.mechanism(run.meta) == "seccomp/tcp/loopback/offload"
    # a plan's offload_read_ahead: every cell runs with it, and is its own mechanism
    proc = tb("experiment", str(ahead), "-o", str(results / "ahead"), "--host-label", "here")
    assert proc.returncode == 0 and "ran=1 skipped=0 failed=0" in proc.stdout, proc.stderr
    p = results / "ahead" / "here" / "cat.offload.local.r1"
    run = rundir.load(p)
    assert json.loads((p / "experiment.json").read_text())["output_matches_native"] is True
    assert run.meta["offload"]["read_ahead"]["depth"] == 4
    assert run.meta["offload"]["read_ahead"]["served"] > 0
    assert mechanisms.mechanism(run.meta) == "seccomp/tcp/loopback/offload+ra4"
    assert not Path("/tb-plan-offload").exists()  # nothing under the prefix locally
