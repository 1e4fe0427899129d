"""testbed run on one host: real programs, real delegate, real seccomp traps."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from testbed.compute.relay import connect
from testbed.core import rundir
from testbed.core.procs import free_port
from tests.conftest import run_testbed, strace_counts, tb_argv

THREADS_PY = r"""
import os, sys, threading
def worker(k):
    fd = os.open(os.path.join(sys.argv[1], f"t{k}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for i in range(200):
        os.write(fd, f"thread {k} line {i}\n".encode())
    os.close(fd)
ts = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
"""


@pytest.fixture(params=["c-path", "python-path"])
def hot_path(request, monkeypatch):
    """The relay's C path (the default), and the Python path with it off."""
    if request.param == "python-path":
        monkeypatch.setenv("TESTBED_FASTPATH", "0")
    else:
        monkeypatch.delenv("TESTBED_FASTPATH", raising=False)
    return request.param


# Both hot paths x both transports to the delegate (raw ZMTP, libzmq), only for the tests
# whose data path differs: forwarding, byte-identical output, errors crossing the wire.
# Argument parsing, --help and refusals before connecting run once.
data_path_matrix = pytest.mark.usefixtures("hot_path", "relay_transport")


def _run(delegate, out, forward, *program, timeout=120, extra=()):
    return run_testbed("run", "--delegate", delegate.endpoint, "--forward", forward,
                       "-o", str(out), *extra, "--", *program, timeout=timeout)  # fmt: skip


@data_path_matrix
def test_gzip_byte_identical_and_counts_match_strace(
    delegate, payload, tmp_path, hot_path, relay_transport
):
    program = ["gzip", "-6", "-c", str(payload)]
    native = subprocess.run(program, capture_output=True, check=True).stdout
    res = _run(delegate, tmp_path / "run", "read,write", *program)
    assert res.returncode == 0, res.stderr
    assert res.stdout == native
    run = rundir.load(tmp_path / "run")
    counts = {r["name"]: int(r["n"]) for r in run.syscalls}
    assert counts == strace_counts(program, "read,write")
    calls = run.calls()
    assert calls.size == run.meta["calls"]["count"] == sum(counts.values())
    for col in ("t_trap", "t_send", "t_reply", "t_resume", "d_recv", "d_exec_start", "d_send"):
        assert (calls[col] > 0).all(), col
    assert (calls["t_trap"] <= calls["t_send"]).all()
    assert (calls["t_send"] < calls["t_reply"]).all()
    assert (calls["t_reply"] <= calls["t_resume"]).all()
    assert (calls["d_recv"] <= calls["d_send"]).all()
    writes = calls[calls["nr"] == 1]
    assert int(writes["bytes_in"].sum()) == len(native)  # write buffers were marshalled
    assert run.meta["exit_status"] == 0 and run.meta["calls"]["faults"] == 0
    assert run.meta["hot_path"]["c"] == (hot_path == "c-path")
    assert run.meta["transport"] == relay_transport
    assert "f_c" in res.stderr.decode() and str(tmp_path / "run") in res.stderr.decode()


@data_path_matrix
def test_multithreaded_program_calls_in_flight_together(tmp_path):
    from testbed.jobs.localdelegate import LocalDelegate

    script = tmp_path / "threads.py"
    script.write_text(THREADS_PY)
    native_dir, fwd_dir = tmp_path / "native", tmp_path / "fwd"
    native_dir.mkdir()
    fwd_dir.mkdir()
    subprocess.run([sys.executable, str(script), str(native_dir)], check=True)
    with LocalDelegate(["--delay-us", "300"]) as d:
        res = _run(d, tmp_path / "run", "write", sys.executable, str(script), str(fwd_dir))
    assert res.returncode == 0, res.stderr
    for k in range(4):
        assert (fwd_dir / f"t{k}.txt").read_bytes() == (native_dir / f"t{k}.txt").read_bytes()
    run = rundir.load(tmp_path / "run")
    calls = np.asarray(run.calls())
    expected = strace_counts([sys.executable, str(script), str(native_dir)], "write")["write"]
    assert calls.size == expected >= 800
    assert len(set(calls["tid"].tolist())) >= 4
    # more than one call was outstanding at the delegate at some moment
    order = np.argsort(calls["t_send"])
    sends, replies = calls["t_send"][order], calls["t_reply"][order]
    assert (sends[1:] < np.maximum.accumulate(replies)[:-1]).any()


@data_path_matrix
def test_forking_shell_pipeline(delegate, payload, tmp_path):
    out = tmp_path / "out.gz"
    script = f"gzip -c {payload} | cat > {out}"
    native = subprocess.run(["gzip", "-c", str(payload)], capture_output=True, check=True).stdout
    res = _run(delegate, tmp_path / "run", "read,write", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes() == native
    run = rundir.load(tmp_path / "run")
    counts = {r["name"]: int(r["n"]) for r in run.syscalls}
    out.unlink()
    assert counts == strace_counts(["sh", "-c", script], "read,write")
    assert len(set(np.asarray(run.calls())["tid"].tolist())) >= 2  # gzip and cat both served


@data_path_matrix
@pytest.mark.parametrize(
    "forward", ["read,write,close", "sendmsg,write", "exit_group", "execve,write", "openat,close"]
)
def test_handoff_never_deadlocks(delegate, tmp_path, forward):
    script = "echo hello | cat; ls / > /dev/null; exit 3"
    res = _run(delegate, tmp_path / "run", forward, "sh", "-c", script, timeout=60)
    assert res.returncode == 3, res.stderr
    assert res.stdout == b"hello\n"
    run = rundir.load(tmp_path / "run")
    assert run.meta["calls"]["count"] > 0
    assert run.meta["calls"]["faults"] == 0


def test_exit_status_and_signal_death(delegate, tmp_path):
    res = _run(delegate, tmp_path / "a", "write", "sh", "-c", "kill -TERM $$")
    assert res.returncode == 128 + signal.SIGTERM, res.stderr


@data_path_matrix
def test_sigterm_to_the_relay_reaches_a_program_busy_in_forwarded_calls(delegate, tmp_path):
    """The relay passes SIGTERM on even while its loop is serving (the C path
    returns to Python at least every 50 ms for that)."""
    mark = tmp_path / "writing"
    loop = ("import os, sys\nfor i in range(200):\n    os.write(1, b'x' * 64)\n"
            "open(sys.argv[1], 'w').close()\nwhile True:\n    os.write(1, b'x' * 64)\n")  # fmt: skip
    proc = subprocess.Popen(
        tb_argv("run", "--delegate", delegate.endpoint, "--forward", "write",
                "-o", str(tmp_path / "r"), "--", sys.executable, "-c", loop, str(mark)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mark.exists(), "the program never got going"
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=30)[1].decode()
    assert proc.returncode == 128 + signal.SIGTERM, err
    run = rundir.load(tmp_path / "r")
    assert run.complete and run.meta["calls"]["count"] > 100, run.meta["calls"]
    assert run.meta["calls"]["faults"] == 0


@pytest.mark.usefixtures("relay_transport")  # the failed connect is the transport's
def test_no_delegate_listening_fails_fast_and_starts_nothing(tmp_path):
    marker = "97.4321"
    t0 = time.monotonic()
    res = run_testbed("run", "--delegate", f"tcp://127.0.0.1:{free_port()}", "--forward",
                      "write", "-o", str(tmp_path / "r"), "--", "sleep", marker, timeout=30)  # fmt: skip
    assert time.monotonic() - t0 < 10
    assert res.returncode != 0
    err = res.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("testbed: error: no delegate answering"), err
    ps = subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True)
    assert ps.returncode == 1, "the program was left running"


@data_path_matrix
def test_delegate_killed_mid_run_releases_calls_and_reports_fault(payload, tmp_path):
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    d = subprocess.Popen(tb_argv("delegate", "--quiet", "--listen", endpoint))
    try:
        connect(endpoint, timeout_s=30)[1].close()  # started and answering
        slow = "import sys,time\nfor i in range(150):\n    print(i, flush=True); time.sleep(0.01)\n"
        run = subprocess.Popen(
            tb_argv("run", "--delegate", endpoint, "--forward", "write", "--timeout", "0.5",
                        "-o", str(tmp_path / "r"), "--", sys.executable, "-c", slow),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        first = run.stdout.readline()  # the relay is connected and the program runs
        time.sleep(0.5)
        d.send_signal(signal.SIGKILL)
        out, err = run.communicate(timeout=60)
        out = first + out
    finally:
        d.kill()
        d.wait()
    assert run.returncode == 0, err
    assert out.decode().split() == [str(i) for i in range(150)]  # nothing lost
    meta = rundir.load(tmp_path / "r").meta
    expected = strace_counts([sys.executable, "-c", slow], "write")["write"]
    assert meta["calls"]["count"] == expected >= 150
    assert meta["calls"]["faults"] >= 1 and meta["calls"]["timeouts"] >= 1
    assert "FAULTS" in err.decode()


def test_unknown_syscall_suggests_close_match(tmp_path):
    res = run_testbed("run", "--delegate", "tcp://127.0.0.1:1", "--forward", "wrtie",
                      "--", "true")  # fmt: skip
    assert res.returncode == 2
    assert b"did you mean write" in res.stderr


def test_program_not_found_is_one_line(delegate, tmp_path):
    res = _run(delegate, tmp_path / "r", "write", "no-such-program-xyz")
    assert res.returncode != 0
    lines = res.stderr.decode().strip().splitlines()
    assert lines == ["testbed: error: program not found: no-such-program-xyz"]


@pytest.mark.parametrize("verb", ["delegate", "run", "bench", "demo", "profile", "analyze"])
def test_help_is_clear(verb):
    """Every option of the verb is in its --help with a sentence saying what it does."""
    from testbed.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[verb]
    res = run_testbed(verb, "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.decode().split())
    assert parser.description and " ".join(parser.description.split())[:60] in text
    for action in parser._actions:
        if action.help == argparse.SUPPRESS:
            continue
        assert action.help and len(action.help.split()) >= 2, f"{verb} {action.dest}: no help text"
        for flag in action.option_strings:
            assert flag in text, f"{verb}: {flag} missing from --help"


def test_sync_wakeup_used_where_available(delegate, tmp_path):
    res = _run(delegate, tmp_path / "r", "write", "true")
    assert res.returncode == 0
    meta = rundir.load(tmp_path / "r").meta
    release = tuple(int(x) for x in os.uname().release.split(".")[:2])
    assert meta["sync_wakeup"] is (release >= (6, 6))


def test_policy_from_a_native_profile(delegate, payload, tmp_path):
    program = ["gzip", "-c", str(payload)]
    prof = run_testbed("profile", "-o", str(tmp_path / "prof"), "--", *program)
    assert prof.returncode == 0, prof.stderr
    res = _run_policy(delegate, tmp_path / "run", "max-freq:10%", tmp_path / "prof", *program)
    assert res.returncode == 0, res.stderr
    run = rundir.load(tmp_path / "run")
    assert run.meta["policy"] == "max-freq:10%"
    assert "read" in run.meta["forwarded"]  # gzip's most frequent call
    counts = {r["name"]: int(r["n"]) for r in run.syscalls}
    # independent count: the native profile (perf trace / strace from the exec on)
    profiled = {r["name"]: int(r["n"]) for r in rundir.load(tmp_path / "prof").syscalls}
    assert counts == {name: profiled[name] for name in run.meta["forwarded"]}


def _run_policy(delegate, out, policy, profile, *program):
    return run_testbed("run", "--delegate", delegate.endpoint, "--policy", policy,
                       "--profile", str(profile), "-o", str(out), "--", *program)  # fmt: skip


def test_policy_errors_are_one_line(delegate, tmp_path):
    res = _run_policy(delegate, tmp_path / "r", "max-freq:150%", tmp_path / "none", "true")
    assert res.returncode != 0
    assert len(res.stderr.decode().strip().splitlines()) == 1
    res = run_testbed(
        "run", "--delegate", delegate.endpoint, "--policy", "min-freq:10%", "--", "true"
    )
    assert res.returncode != 0 and b"needs --profile" in res.stderr


@data_path_matrix
def test_curve_authenticated_delegate(tmp_path):
    from testbed.core.keys import make_curve_keys
    from testbed.jobs.localdelegate import LocalDelegate

    keys = tmp_path / "keys"
    make_curve_keys(str(keys))
    with LocalDelegate(["--curve-keys", str(keys)], curve_keys=str(keys)) as d:
        res = _run(d, tmp_path / "ok", "write", "echo", "secret", extra=("--curve-keys", str(keys)))
        assert res.returncode == 0, res.stderr
        assert res.stdout == b"secret\n"
        assert rundir.load(tmp_path / "ok").meta["curve"] is True
        res = _run(d, tmp_path / "no", "write", "echo", "x", extra=("--connect-timeout", "1"))
        assert res.returncode != 0
        assert b"does it need --curve-keys?" in res.stderr
        assert not (tmp_path / "no").exists()  # nothing half-written


class _Memory:
    """A caller's memory for the Marshaller (a unit test of one function)."""

    def __init__(self, regions: dict[int, bytes]):
        self.regions = regions

    def read_memory(self, tid: int, addr: int, n: int) -> bytes:
        for base, data in self.regions.items():
            if base <= addr < base + len(data):
                return data[addr - base : addr - base + n]
        return b""


@pytest.mark.unit
def test_cost_mode_sizes_writev_past_zero_length_entries():
    """Issue 19: a zero-length iovec ended the marshalled data (writev([b"", b"hello"])
    was sent as 0 bytes); the kernel skips it and moves the next entries."""
    import struct

    from testbed.compute.interpose import Trap
    from testbed.compute.relay import Marshaller
    from testbed.core import syscalls

    iov = struct.pack("<QQQQQQ", 0x1000, 0, 0x2000, 5, 0x3000, 3)
    mem = _Memory({0x9000: iov, 0x2000: b"hello", 0x3000: b"abc"})
    nr = syscalls.NR_BY_NAME["writev"]
    trap = Trap(1, 1, nr, (1, 0x9000, 3, 0, 0, 0), 0)
    bufs, total = Marshaller(mem).buffers(trap)
    assert total == 8 and b"".join(b for _a, b in bufs) == b"helloabc"
