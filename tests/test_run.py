"""The typed API under ``testbed run``: testbed.compute.run.run, the backend protocol, endpoints."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from testbed.compute import interpose
from testbed.compute.run import RunResult, run, summary_lines
from testbed.compute.spec import OffloadSpec, RunSpec
from testbed.core import keys, rundir
from testbed.core.errors import TestbedError as _TestbedError
from tests.conftest import strace_counts


def test_run_in_process_matches_native_and_counts(delegate, payload, tmp_path):
    program = ["gzip", "-6", "-c", str(payload)]
    native = subprocess.run(program, capture_output=True, check=True).stdout
    with open(tmp_path / "out.gz", "wb") as f:
        res = run(RunSpec(program, delegate=delegate.endpoint, forward="read,write",
                          output=tmp_path / "run"), stdout=f)  # fmt: skip
    assert isinstance(res, RunResult) and res.exit_status == 0
    assert (tmp_path / "out.gz").read_bytes() == native
    assert res.path == tmp_path / "run"
    assert res.meta == rundir.load(res.path).meta  # what it returns is what it wrote
    counts = {r["name"]: int(r["n"]) for r in rundir.load(res.path).syscalls}
    assert counts == strace_counts(program, "read,write")
    assert res.calls["count"] == sum(counts.values()) and res.calls["faults"] == 0
    assert res.meta["backend"] == "seccomp" and res.meta["forwarded"] == ["read", "write"]
    assert res.meta["sync_wakeup"] in (True, False) and res.meta["orphan_guard"]
    lines = summary_lines(res)
    assert lines[0].startswith("testbed: gzip exited 0") and str(res.path) in lines[-1]


def test_run_exit_status_and_errors(delegate, tmp_path):
    res = run(
        RunSpec(["sh", "-c", "exit 7"], delegate=delegate.endpoint, forward=[1],
                output=tmp_path / "a")
    )  # fmt: skip
    assert res.exit_status == 7 and rundir.load(tmp_path / "a").meta["exit_status"] == 7
    with pytest.raises(_TestbedError, match="required"):
        run(RunSpec(["true"], forward="read"))
    with pytest.raises(_TestbedError, match="--mode kthread needs --backend kmod"):
        run(RunSpec(["true"], mode="kthread", forward="read"))
    with pytest.raises(_TestbedError, match="only used with --mode offload"):
        run(RunSpec(["true"], delegate=delegate.endpoint, forward="read",
                    offload=OffloadSpec(["/tmp"])))  # fmt: skip
    with pytest.raises(_TestbedError, match="program not found"):
        run(RunSpec(["no-such-program-xyz"], delegate=delegate.endpoint, forward="read",
                    output=tmp_path / "b"))  # fmt: skip


@pytest.mark.unit
def test_backends_implement_the_whole_protocol():
    """Everything the relay and run() use is declared by Backend and present on both."""
    from testbed.compute.interpose.kmod import KmodBackend
    from testbed.compute.interpose.seccomp import SeccompBackend

    declared = {n for n in vars(interpose.Backend) if not n.startswith("_")}
    declared |= set(interpose.Backend.__annotations__)
    assert {"begin_serving", "end_serving", "launch_error", "kill_descendants",
            "launched_at_ns", "start_rusage", "sync_wakeup", "orphan_guard"} <= declared  # fmt: skip
    for cls in (SeccompBackend, KmodBackend):
        missing = {n for n in declared if not hasattr(cls, n)} - {"name"}
        assert not missing, (cls.__name__, missing)
        assert isinstance(cls.name, str)
    assert interpose.BackendBase().begin_serving() is False  # default: the relay polls


@pytest.mark.unit
def test_relay_uses_no_undeclared_backend_attribute():
    import ast
    import inspect

    from testbed.compute import relay
    from testbed.compute import run as run_mod

    declared = {n for n in vars(interpose.Backend) if not n.startswith("_")}
    declared |= set(interpose.Backend.__annotations__)
    for mod in (relay, run_mod):
        tree = ast.parse(inspect.getsource(mod))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "getattr":
                target = ast.unparse(node.args[0])
                assert "backend" not in target, f"{mod.__name__}: getattr({target}, ...)"
            if isinstance(node, ast.Attribute) and ast.unparse(node.value) in (
                "backend",
                "self.backend",
            ):
                assert node.attr in declared, f"{mod.__name__}: backend.{node.attr}"


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, connect, want",
    [
        ("127.0.0.1:5555", False, "tcp://127.0.0.1:5555"),
        ("tcp://*:5555", False, "tcp://*:5555"),
        ("tcp://h:0", False, "tcp://h:0"),
        ("ipc:///tmp/x.sock", True, "ipc:///tmp/x.sock"),
    ],
)
def test_parse_endpoint_accepts(text, connect, want):
    assert keys.parse_endpoint(text, connect=connect) == want


@pytest.mark.unit
@pytest.mark.parametrize(
    "text, connect, message",
    [
        ("udp://h:1", False, "is not a tcp://HOST:PORT"),
        ("tcp://h", False, "expected tcp://HOST:PORT"),
        ("tcp://h:70000", False, "port must be 0-65535"),
        ("tcp://h:0", True, "connect needs a port 1-65535"),
        ("tcp://h:*", True, "connect needs a port 1-65535"),
    ],
)
def test_parse_endpoint_refuses(text, connect, message):
    with pytest.raises(keys.EndpointError, match=message):
        keys.parse_endpoint(text, connect=connect)


@pytest.mark.unit
def test_fc_has_one_definition():
    """derived / usable / fc_estimates: the numbers summary, demo, bench and analysis use."""
    calls = np.zeros(5, dtype=rundir.CALL_DTYPE)
    calls["t_trap"] = 1_000
    calls["t_send"] = 1_100
    calls["t_reply"] = 3_000
    calls["d_recv"], calls["d_send"] = 10_000, 10_500
    calls["d_exec_start"] = 10_100
    calls["d_exec_end"] = [10_100, 10_100, 10_100, 10_400, 10_100]  # call 3: offload exec 300
    calls["t_resume"] = [3_200, 5_200, 3_200, 3_200, 3_200]
    calls["flags"] = [0, 0, 0, 0, rundir.F_TIMEOUT]  # call 4 faulted
    d = rundir.derived(calls)
    assert d["held"].tolist() == [2200, 4200, 2200, 2200, 2200]
    assert d["overhead"].tolist() == [2200, 4200, 2200, 1900, 2200]  # held - exec
    assert d["f_c"].tolist() == [1100, 2100, 1100, 950, 1100]
    assert rundir.usable(calls).tolist() == [True, True, True, True, False]
    est = rundir.fc_estimates(calls)
    assert est["n"] == 4
    assert est["median"] == pytest.approx(1.1) and est["mean"] == pytest.approx(5.25 / 4)
    assert rundir.overall(calls)["f_c_us"] == pytest.approx(1.1, rel=0.013)
