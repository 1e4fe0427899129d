"""Regression tests of issue 11 ("harden the core path"): each fails on the code
before the fix.  Real delegates, real relays, real programs; misbehaving peers
speak raw ZMTP over TCP (tests/rawzmtp.py) so nothing buffers on their side."""

from __future__ import annotations

import json
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import threading
import time
from collections import OrderedDict

import msgpack
import numpy as np
import pytest
import zmq

from testbed.core import rundir, wire
from testbed.core.errors import TestbedError as _TestbedError
from testbed.delegate.daemon import MAX_BACKLOG, Delegate
from testbed.delegate.handler import MAX_CLIENTS, Handler
from tests import rawzmtp
from tests.conftest import PY, REPO, run_testbed, tb_argv, wait_gone
from tests.fakerouter import FakeRouter
from tests.test_delegate import Client, DelegateProc

#: the delegate's transports (``--transport``), and its serving layouts with them
TRANSPORTS = ["zmtp", "libzmq"]
LAYOUTS = [("1", "zmtp"), ("1", "libzmq"), ("3", "auto")]


@pytest.fixture
def dproc():
    procs: list[DelegateProc] = []

    def start(*extra: str, **kw) -> DelegateProc:
        procs.append(DelegateProc(*extra, **kw))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()


def _descendants(pid: int, depth: int = 99) -> list[int]:
    """Processes below ``pid`` (``depth`` levels), without the orphan guard's
    sentinel (the relay's only child that leads its own session)."""
    out, todo = [], [(pid, 0)]
    while todo:
        p, d = todo.pop()
        if d >= depth:
            continue
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout
        for k in map(int, kids.split()):
            try:
                if os.getsid(k) == k:
                    continue  # the sentinel
            except ProcessLookupError:
                continue
            out.append(k)
            todo.append((k, d + 1))
    return out


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------ 1: unreadable caller memory


NON_DUMPABLE = (
    "import ctypes, os\n"
    "ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: /proc/PID/mem refused\n"
    "for i in range(3):\n"
    "    os.write(1, b'line %d\\n' % i)\n"
)


@pytest.mark.usefixtures("relay_transport")
def test_non_dumpable_program_is_answered_not_hung(delegate, tmp_path):
    """Defect 1: a relay without CAP_SYS_PTRACE cannot open /proc/TID/mem of a
    non-dumpable program; the call must still be answered (run locally)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    argv = ["setpriv", "--bounding-set", "-sys_ptrace", *tb_argv(
        "run", "--delegate", delegate.endpoint, "--forward", "write",
        "-o", str(tmp_path / "r"), "--", PY, "-c", NON_DUMPABLE)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("the program hung in a call the relay never answered")
    assert proc.returncode == 0, err
    assert out == b"line 0\nline 1\nline 2\n"
    run = rundir.load(tmp_path / "r")
    calls = np.asarray(run.calls())
    assert run.meta["calls"]["unreadable"] == calls.size == 3
    assert (calls["flags"] == rundir.F_UNREADABLE).all()
    assert run.meta["calls"]["faults"] == 3
    assert b"cannot read the memory of thread" in err
    assert b"Traceback" not in err


# ------------------------------------------------ 2: launcher outliving its relay

FAKE_RELAY = """
import os, subprocess, sys, time
r, w = os.pipe()
from testbed.compute.interpose.seccomp import LAUNCHER
p = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, str(w),
                      str(os.getpid()), "-", "1", "-", "sleep", "1000"], pass_fds=(w,))
print(p.pid, flush=True)
time.sleep(120)
"""


def _seccomp_listener_open(pid: int) -> bool:
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{n}") == "anon_inode:seccomp notify"
            for n in os.listdir(f"/proc/{pid}/fd")
        )
    except OSError:
        return False


def test_launcher_dies_with_a_relay_killed_before_the_handoff():
    """Defect 2: the relay dies after starting the launcher and before taking
    its listener; the launcher (blocked in its trapped execve) must not stay."""
    relay = subprocess.Popen([PY, "-c", FAKE_RELAY], stdout=subprocess.PIPE, cwd=REPO, text=True)
    launcher = int(relay.stdout.readline())
    try:
        deadline = time.monotonic() + 30
        while not _seccomp_listener_open(launcher) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _seccomp_listener_open(launcher), "launcher never installed its filter"
        time.sleep(0.2)  # now blocked in its own trapped execve
        relay.kill()
        relay.wait()
        assert wait_gone(launcher, 10), "the launcher outlived its relay"
    finally:
        relay.kill()
        relay.wait()
        _kill_quietly(launcher)


# ------------------------------------------------ 3: unbounded multipart


@pytest.mark.parametrize(("workers", "transport"), LAYOUTS)
def test_unterminated_multipart_message_cannot_grow_the_delegate(dproc, ctx, workers, transport):
    """Defect 3: parts all marked "more" were buffered without limit (RSS
    33 -> 535 MiB for 500 MiB sent); now the connection is cut, whatever the
    worker layout (``--workers > 1`` once used libzmq's proxy, which hid the
    connection of each message from the guard)."""
    d = dproc("--workers", workers, "--transport", transport)
    good = Client(ctx, d.endpoint, ident=b"good")
    assert good.call(1)[0] == wire.RESULT
    before = rawzmtp.rss_mib(d.proc.pid)
    s = rawzmtp.connect(d.endpoint)
    part = rawzmtp.frame(b"m" * (1 << 20), more=True)
    sent, cut = 0, False
    try:
        for _ in range(400):  # 400 MiB if nobody stops it
            s.sendall(part)
            sent += 1
    except OSError:
        cut = True
    finally:
        s.close()
    peak = rawzmtp.rss_mib(d.proc.pid, "VmHWM")
    print(
        f"multipart flood, workers {workers}: cut after {sent} MiB, "
        f"RSS {before:.0f} -> peak {peak:.0f} MiB"
    )
    assert cut, f"the delegate accepted {sent} MiB of one unfinished message"
    assert sent * (1 << 20) <= MAX_BACKLOG + (64 << 20)
    assert peak - before < 2 * MAX_BACKLOG / (1 << 20)
    assert good.call(2)[0] == wire.RESULT  # others unaffected
    rc, err, _ = d.terminate()
    assert rc == 0 and "without completing a message" in err


@pytest.mark.parametrize(("workers", "transport"), LAYOUTS)
def test_a_heavy_legitimate_client_is_never_cut(dproc, ctx, workers, transport):
    """The backlog bound counts bytes since a connection's last whole message,
    not in total: 1.5 x MAX_BACKLOG of real calls goes through."""
    d = dproc("--workers", workers, "--transport", transport)
    c = Client(ctx, d.endpoint, ident=b"heavy")
    data = b"w" * (1 << 20)
    n = int(1.5 * MAX_BACKLOG) // len(data)
    for i in range(n):
        kind, res = c.call(i, data=data)
        assert (kind, res.call_id) == (wire.RESULT, i)
    rc, err, _ = d.terminate()
    assert rc == 0 and "dropped a connection" not in err
    assert f"calls {n}, errors 0" in err


# ------------------------------------------------ 4: reply amplification


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_error_replies_are_small_whatever_the_request(dproc, ctx, transport):
    """Defect 4: a 4 MiB request echoed as a 16 MiB repr() reply."""
    d = dproc("--transport", transport)
    c = Client(ctx, d.endpoint)
    for frame in (
        msgpack.packb([wire.WIRE_VERSION, "\u20ac" * ((4 << 20) // 3 - 16), {}]),
        msgpack.packb([wire.WIRE_VERSION, "call", 1, 1, 1, [0] * 6, [], "\x00" * ((4 << 20) - 64)]),
        msgpack.packb([wire.WIRE_VERSION, "call", 1, 1, 1, [0] * 6, [], "x" * (3 << 20)]),
    ):
        assert len(frame) <= wire.MAX_FRAME
        c.sock.send(frame)
        reply = c.sock.recv()
        assert len(reply) < 300, len(reply)
        assert wire.decode(reply)[0] == wire.ERROR


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_peer_that_never_reads_costs_bounded_memory(dproc, ctx, transport):
    """Defect 4: a client that never reads its replies grew the delegate to
    1 GB (100 000 queued replies); the send queue is now bounded."""
    d = dproc("--transport", transport)
    good = Client(ctx, d.endpoint)
    assert good.call(1)[0] == wire.RESULT
    before = rawzmtp.rss_mib(d.proc.pid)
    s = rawzmtp.connect(d.endpoint)
    bad = rawzmtp.frame(msgpack.packb([wire.WIRE_VERSION, "y" * 60_000, {}]))
    s.settimeout(30)
    for _ in range(4000):  # 240 MB of requests whose v1 replies were bigger still
        s.sendall(bad)
    assert good.call(2)[0] == wire.RESULT  # served after the bad requests were read
    grown = rawzmtp.rss_mib(d.proc.pid, "VmHWM") - before
    s.close()
    print(f"never-reading peer: delegate peak RSS grew {grown:.1f} MiB")
    assert grown < 64


# ------------------------------------------------ 5: legal wire value crashing the relay


class FakeDelegate(FakeRouter):
    """A ROUTER that answers HELLO and replies to every CALL with ``ret``."""

    def __init__(self, ctx: zmq.Context, ret: int):
        super().__init__(ctx)
        self.ret = ret
        self.start()

    def answer(self, ident: bytes, frame: bytes) -> None:
        msg = msgpack.unpackb(frame)
        if msg[1] == "hello":
            reply = wire.encode_welcome({"host": "fake"})
        else:  # a v1-legal reply the run directory cannot hold
            reply = msgpack.packb([wire.WIRE_VERSION, "result", msg[2], self.ret, 0,
                                   [1, 2, 3, 4], []])  # fmt: skip
        self.sock.send_multipart([ident, reply])


@pytest.mark.parametrize("ret", [1 << 63, (1 << 64) - 1])
@pytest.mark.usefixtures("relay_transport")
def test_out_of_range_reply_is_a_delegate_error_not_a_relay_crash(ctx, tmp_path, ret):
    """Defect 5: ret = 2**63 crashed the relay (struct.error), forwarded calls
    then failed with ENOSYS and neither calls.bin nor run.json was written."""
    fake = FakeDelegate(ctx, ret)
    try:
        res = run_testbed("run", "--delegate", fake.endpoint, "--forward", "write",
                          "-o", str(tmp_path / "r"), "--", "sh", "-c", "echo a; echo b",
                          timeout=60)  # fmt: skip
    finally:
        fake.close()
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"a\nb\n"
    assert b"Traceback" not in res.stderr
    run = rundir.load(tmp_path / "r")
    assert run.complete
    calls = np.asarray(run.calls())
    assert calls.size == run.meta["calls"]["peer_errors"] == 2
    assert (calls["flags"] == rundir.F_PEER_ERROR).all()
    assert (calls["t_reply"] > 0).all()  # released at the reply, not after a timeout


# ------------------------------------------------ 6: relay death


SLOW_WRITER = (
    "import os, time\nfor i in range(400):\n    os.write(1, b'%d\\n' % i); time.sleep(0.01)\n"
)


@pytest.mark.usefixtures("relay_transport")
def test_sigkilled_relay_leaves_a_loadable_run_and_no_program(delegate, tmp_path):
    """Defect 6: after SIGKILL of the relay the program ran on with every
    forwarded call failing, calls.bin was empty and run.json missing."""
    out = tmp_path / "r"
    relay = subprocess.Popen(
        tb_argv("run", "--delegate", delegate.endpoint, "--forward", "write", "-o", str(out),
                "--", PY, "-c", SLOW_WRITER),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    first = relay.stdout.readline()  # the program runs and its writes are forwarded
    assert first == b"0\n"
    program = _descendants(relay.pid, depth=1)
    assert len(program) == 1
    time.sleep(2.0)  # > FLUSH_NS: records must be on disk by now
    relay.send_signal(signal.SIGKILL)
    relay.wait()
    try:
        assert wait_gone(program[0], 10), "the program outlived its relay"
    finally:
        _kill_quietly(program[0])
    printed = len(relay.stdout.read().split()) + 1
    run = rundir.load(out)
    assert not run.complete and run.meta["exit_status"] is None
    n = run.calls().size
    assert 50 <= n <= printed, (n, printed)  # at most the last second lost
    assert (np.asarray(run.calls())["nr"] == 1).all()
    res = run_testbed("analyze", str(out), "-o", str(tmp_path / "rep"), timeout=120)
    assert res.returncode == 0, res.stderr
    assert re.search(rb"warning: .* is incomplete .* call records kept", res.stderr), res.stderr
    assert b"Traceback" not in res.stderr


# ------------------------------------------------ 7: setup failure


def test_too_many_workers_for_the_fd_limit_is_one_line(tmp_path):
    """Defect 7: --workers 1100 under ulimit -n 1024 printed "listening",
    never answered and ignored SIGTERM."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    proc = subprocess.run(
        [PY, "-m", "testbed", "delegate", "--listen", "tcp://127.0.0.1:*", "--workers", "1100"],
        capture_output=True, text=True, timeout=60, preexec_fn=limit,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("testbed: error: cannot start the delegate with 1100 workers")
    assert "ulimit -n is 1024" in lines[0]


# ------------------------------------------------ 8: per-client state


class _CountingTable(OrderedDict):
    scans = 0

    def __iter__(self):
        type(self).scans += 1
        return super().__iter__()


@pytest.mark.unit
def test_client_table_evicts_in_constant_time_least_recent_first():
    """Defect 8: past MAX_CLIENTS every new identity scanned the whole table
    (~8 ms each).  Eviction must not iterate the table and must drop the
    least recently seen client."""
    h = Handler(Delegate("tcp://127.0.0.1:*"))
    h.clients = _CountingTable()
    hello = wire.encode_hello({})
    for i in range(MAX_CLIENTS):
        h.handle(b"c%d" % i, hello, i)
    h.handle(b"c0", hello, MAX_CLIENTS)  # c0 is now the most recent
    _CountingTable.scans = 0
    t0 = time.perf_counter()
    for i in range(MAX_CLIENTS, MAX_CLIENTS + 5000):
        h.handle(b"c%d" % i, hello, i)
    per_new_us = (time.perf_counter() - t0) / 5000 * 1e6
    print(f"{per_new_us:.1f} us per new client beyond the cap")
    assert _CountingTable.scans == 0
    assert len(h.clients) == MAX_CLIENTS
    assert b"c0" in h.clients and b"c1" not in h.clients and b"c5001" in h.clients


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connection_cap_refuses_new_connections_and_keeps_serving(ctx, transport):
    """Defect 8: connections were accepted until the process ran out of fds."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    proc = subprocess.Popen(
        [PY, "-m", "testbed", "delegate", "--listen", "tcp://127.0.0.1:*",
         "--transport", transport],
        stderr=subprocess.PIPE, text=True, preexec_fn=limit,
    )  # fmt: skip
    socks = []
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        assert ready
        endpoint = re.search(r"listening on (\S+) ", proc.stderr.readline()).group(1)
        good = Client(ctx, endpoint)
        assert good.call(1)[0] == wire.RESULT
        cap = 160 - 64 - 3  # testbed.delegate.daemon.connection_cap(1)
        for _ in range(cap + 20):
            socks.append(rawzmtp.connect(endpoint, handshake=False))
        time.sleep(1.0)
        closed = 0
        for s in socks:
            s.settimeout(0.01)
            try:
                data = s.recv(4096)
                while data:  # greeting bytes, then EOF if we were refused
                    data = s.recv(4096)
                closed += 1
            except TimeoutError:
                pass
            except OSError:
                closed += 1
        print(f"{closed} of {len(socks)} extra connections refused (cap {cap})")
        assert 20 <= closed <= 22  # those beyond the cap (good client: 1 of it)
        assert good.call(2)[0] == wire.RESULT
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "refusing new ones" in err and "Traceback" not in err


# ------------------------------------------------ 11: CLI values


BAD_CLI = [
    ("run", "--timeout", "inf"),
    ("run", "--timeout", "nan"),
    ("run", "--timeout", "0"),
    ("run", "--timeout", "-1"),
    ("run", "--connect-timeout", "inf"),
    ("run", "--connect-timeout", "0"),
    ("run", "--delegate", "tcp://127.0.0.1:99999"),
    ("run", "--delegate", "tcp://127.0.0.1:0"),
    ("run", "--delegate", "tcp://127.0.0.1:*"),
    ("run", "-o", "FILE"),
    ("profile", "-o", "FILE"),
    ("profile", "--native-runs", "-2"),
    ("analyze", "-o", "FILE"),
    ("demo", "-o", "FILE"),
    ("delegate", "--delay-us", "inf"),
    ("delegate", "--delay-us", "nan"),
    ("delegate", "--delay-us", "1e300"),
    ("delegate", "--listen", "tcp://127.0.0.1:65536"),
    ("delegate", "--workers", "0"),
]


@pytest.mark.parametrize("verb, option, value", BAD_CLI, ids=lambda v: str(v))
def test_bad_option_values_are_one_clear_error(tmp_path, verb, option, value):
    """Defect 11: tracebacks for -o FILE, inf timeouts and delays; a port above
    65535 silently wrapped; --timeout 0 made every call a fault."""
    existing = tmp_path / "existing-file"
    existing.write_text("keep me")
    value = str(existing) if value == "FILE" else value
    opts = {"run": {"--delegate": "tcp://127.0.0.1:9", "--forward": "write"},
            "delegate": {"--listen": "tcp://127.0.0.1:*"}}.get(verb, {})  # fmt: skip
    opts[option] = value
    tail = {"run": ["--", "true"], "profile": ["--", "true"],
            "analyze": [str(REPO / "analysis/data/profiles/gzip")]}.get(verb, [])  # fmt: skip
    res = run_testbed(verb, *(x for kv in opts.items() for x in kv), *tail, timeout=30)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert "Traceback" not in err
    assert re.match(rf"testbed {verb}: error: argument {re.escape(option)}|testbed {verb}: "
                    r"error: argument -o/--output", err.strip().splitlines()[-1]), err  # fmt: skip
    assert existing.read_text() == "keep me"


@pytest.mark.unit
@pytest.mark.parametrize("delay", [float("inf"), float("nan"), -1.0])
def test_library_delegate_refuses_non_finite_delay(delay):
    with pytest.raises(_TestbedError, match="finite number >= 0"):
        Delegate("tcp://127.0.0.1:*", delay_us=delay)


# ------------------------------------------------ CI never skips


def test_ci_turns_skips_into_failures(tmp_path):
    (tmp_path / "test_s.py").write_text(
        "import pytest\n"
        "def test_skips():\n    pytest.skip('no such tool here')\n"
        "def test_runs():\n    assert True\n"
    )
    (tmp_path / "test_mod.py").write_text(
        "import pytest\npytest.importorskip('no_such_module_xyz')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("CI", None)

    def pytest(name: str, ci: bool) -> subprocess.CompletedProcess:
        argv = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                "--rootdir", str(tmp_path), str(tmp_path / name)]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                              env={**env, "CI": "true"} if ci else env)  # fmt: skip

    res = pytest("test_s.py", ci=True)
    assert res.returncode == 1 and "1 failed, 1 passed" in res.stdout, res.stdout
    assert "skipped under CI=true" in res.stdout and "no such tool here" in res.stdout
    res = pytest("test_mod.py", ci=True)  # a module skipped at collection
    assert res.returncode != 0 and "skipped under CI=true" in res.stdout, res.stdout
    for name, summary in (("test_s.py", "1 passed, 1 skipped"), ("test_mod.py", "1 skipped")):
        res = pytest(name, ci=False)
        assert res.returncode in (0, 5) and summary in res.stdout, res.stdout  # 5: none ran


@pytest.mark.usefixtures("relay_transport")
def test_rundir_v2_marks_completion_in_run_json(delegate, tmp_path):
    res = run_testbed("run", "--delegate", delegate.endpoint, "--forward", "write",
                      "-o", str(tmp_path / "r"), "--", "echo", "x")  # fmt: skip
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "r" / rundir.RUN_JSON).read_text())
    assert meta["rundir_version"] == rundir.RUNDIR_VERSION == 2
    assert meta["complete"] is True and meta["exit_status"] == 0


@pytest.mark.usefixtures("relay_transport")
def test_delegate_of_another_wire_version_is_one_clear_line(ctx, tmp_path):
    """Wire v2 changed ranges: a v1 delegate answers a v2 hello with a v1
    error frame; the relay says so at once instead of "no delegate answering"."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    old = wire.WIRE_VERSION - 1

    def answer() -> None:
        if sock.poll(30_000):
            ident, _frame = sock.recv_multipart()
            text = f"wire version {wire.WIRE_VERSION} not supported (this is {old})"
            sock.send_multipart([ident, msgpack.packb([old, "error", None, "version", text])])

    t = threading.Thread(target=answer)
    t.start()
    res = run_testbed("run", "--delegate", endpoint, "--forward", "write", "--connect-timeout",
                      "20", "-o", str(tmp_path / "r"), "--", "true", timeout=60)  # fmt: skip
    t.join(30)
    sock.close(0)
    lines = res.stderr.decode().strip().splitlines()
    assert res.returncode != 0
    assert len(lines) == 1 and "answered in another wire protocol version" in lines[0], lines


BACKGROUND_WRITER = "(while :; do echo x >> {f}; sleep 0.01; done) & echo started; wait"


def _run_cgroups(relay_pid: int) -> set[str]:
    """The cgroup directories of relay ``relay_pid``'s runs under the cgroup v2 mount."""
    from testbed.compute.interpose.orphans import _cgroup2_mount

    mount = _cgroup2_mount()
    if mount is None:
        return set()
    found = set()
    for dirpath, dirnames, _files in os.walk(mount):
        found.update(
            os.path.join(dirpath, d) for d in dirnames if d.startswith(f"testbed-run-{relay_pid}-")
        )
    return found


def _needs_cgroup_guard() -> None:
    from testbed.compute.interpose.orphans import OrphanGuard

    g = OrphanGuard()
    g.close(clean=True)
    if g.mode != "cgroup":
        pytest.skip(f"cgroup v2 not writable here: {g.reason}")


def test_sigkilled_relay_takes_the_programs_children_with_it(delegate, tmp_path):
    """Defect 6, descendants: the parent-death signal is not inherited by fork,
    so a background child of the program kept running with every forwarded
    call failing (ENOSYS) after its relay was SIGKILLed."""
    _needs_cgroup_guard()
    out, log = tmp_path / "r", tmp_path / "log"
    relay = subprocess.Popen(
        tb_argv("run", "--delegate", delegate.endpoint, "--forward", "write", "-o", str(out),
                "--", "sh", "-c", BACKGROUND_WRITER.format(f=log)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert relay.stdout.readline() == b"started\n"
    assert len(_run_cgroups(relay.pid)) == 1  # the run has its cgroup
    deadline = time.monotonic() + 10
    while (not log.exists() or log.stat().st_size < 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.stat().st_size >= 20  # the child's forwarded writes go through
    procs = _descendants(relay.pid)
    assert len(procs) >= 2, procs  # sh and its background subshell (at least)
    assert json.loads((out / "run.json").read_text())["orphan_guard"] == "cgroup"
    time.sleep(1.5)  # > FLUSH_NS
    relay.send_signal(signal.SIGKILL)
    relay.wait()
    try:
        left = [p for p in procs if not wait_gone(p, 10)]
        assert not left, f"processes of the run outlived their relay: {left}"
        deadline = time.monotonic() + 10
        while _run_cgroups(relay.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _run_cgroups(relay.pid), "the run's cgroup was left behind"
    finally:
        for p in procs:
            _kill_quietly(p)
    run = rundir.load(out)
    assert not run.complete and run.meta["exit_status"] is None
    assert run.calls().size > 0
    res = run_testbed("analyze", str(out), "-o", str(tmp_path / "rep"), timeout=120)
    assert res.returncode == 0, res.stderr
    assert re.search(rb"warning: .* is incomplete", res.stderr), res.stderr


def test_clean_run_leaves_a_descendant_outliving_the_program_alone(delegate, tmp_path):
    """The other side of the orphan guard: after a clean relay exit a
    descendant that outlives the program keeps running (docs/seccomp.md), and
    the run's cgroup goes once it has ended."""
    _needs_cgroup_guard()
    out, log = tmp_path / "r", tmp_path / "log"
    # waits on a FIFO (reads are not forwarded) until the test releases it, well after
    # the relay's 10 s linger; ": >" creates the file without a (forwarded) write
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    prog = f"(read x < {fifo}; : > {log}) >/dev/null 2>&1 & echo $!"
    relay = subprocess.Popen(
        tb_argv("run", "--delegate", delegate.endpoint, "--forward", "write", "-o", str(out),
                "--", "sh", "-c", prog),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    res = subprocess.CompletedProcess(relay.args, 0, *relay.communicate(timeout=120))
    res.returncode = relay.returncode
    assert res.returncode == 0, res.stderr
    assert b"descendants of the program still run" in res.stderr, res.stderr
    child = int(res.stdout.split()[0])
    try:
        assert not wait_gone(child, 0.5), "the descendant was killed after a clean exit"
        with open(fifo, "w") as f:
            f.write("go\n")
        assert wait_gone(child, 30)
        assert log.exists()  # it ran to its end
        run = rundir.load(out)
        assert run.complete and run.meta["orphan_guard"] == "cgroup"  # the guard was on
        deadline = time.monotonic() + 10
        while _run_cgroups(relay.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _run_cgroups(relay.pid), "the run's cgroup was left behind"
    finally:
        _kill_quietly(child)
