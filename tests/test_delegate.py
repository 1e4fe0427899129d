"""The delegate daemon (testbed/delegate/daemon.py) against real processes and sockets."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time

import msgpack
import pytest
import zmq
import zmq.auth

from testbed.core import wire
from testbed.core.errors import TestbedError as _TestbedError
from testbed.delegate.daemon import HARD_MAX_FRAME, Delegate

PY = sys.executable

#: every test here runs against both delegate transports (TESTBED_ZMTP=0: libzmq)
pytestmark = pytest.mark.usefixtures("relay_transport")


# ---------------------------------------------------------------- helpers


class DelegateProc:
    """``python -m testbed delegate`` on a free loopback port; learns the port
    from its status line."""

    def __init__(self, *extra: str, listen: str = "tcp://127.0.0.1:*"):
        argv = [PY, "-m", "testbed", "delegate", "--listen", listen, *extra]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        self.status = self._read_line(timeout=30)
        m = re.search(r"listening on (\S+) ", self.status)
        assert m, f"no status line: {self.status!r}"
        self.endpoint = m.group(1)

    def _read_line(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stderr], [], [], timeout)
        if not ready:
            self.kill()
            pytest.fail(f"delegate printed no status line within {timeout} s")
        return self.proc.stderr.readline()

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 10) -> tuple[int, str, float]:
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, err, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def dproc():
    procs: list[DelegateProc] = []

    def start(*extra: str, **kw) -> DelegateProc:
        procs.append(DelegateProc(*extra, **kw))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()


class Client:
    """A DEALER client speaking the wire protocol (as the relay does)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, ident: bytes | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        if ident is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, ident)
        self.sock.connect(endpoint)

    def ask(self, frame: bytes | list[bytes]):
        if isinstance(frame, list):
            self.sock.send_multipart(frame)
        else:
            self.sock.send(frame)
        return wire.decode(self.sock.recv())

    def call(self, call_id: int, mode: str = "cost", data: bytes = b"x" * 64):
        c = wire.Call(call_id, os.getpid(), 1, (1, 0x1000, len(data), 0, 0, 0), ((1, data),), mode)
        return self.ask(wire.encode_call(c))

    def timed_calls(self, n: int, start_id: int = 0) -> list[tuple[int, int, wire.Result]]:
        """``n`` calls; (client t_send, client t_reply, Result) each."""
        out = []
        for i in range(n):
            frame = wire.encode_call(wire.Call(start_id + i, 1, 1, (0,) * 6, (), "cost"))
            t0 = time.monotonic_ns()
            self.sock.send(frame)
            reply = self.sock.recv()
            t1 = time.monotonic_ns()
            kind, res = wire.decode(reply)
            assert kind == wire.RESULT, res
            out.append((t0, t1, res))
        return out

    def close(self) -> None:
        self.sock.close(0)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# ---------------------------------------------------------------- protocol


def test_hello_gets_welcome_with_configuration(dproc, ctx, relay_transport):
    d = dproc("--workers", "1", "--delay-us", "25")
    assert "workers 1" in d.status and "delay 25 us" in d.status and "mode cost" in d.status
    assert f"transport {relay_transport}" in d.status
    c = Client(ctx, d.endpoint)
    kind, info = c.ask(wire.encode_hello({"host": "test", "pid": os.getpid()}))
    assert kind == wire.WELCOME
    assert info["pid"] == d.proc.pid
    assert info["host"] == socket.gethostname()
    assert (info["workers"], info["delay_us"], info["mode"]) == (1, 25.0, "cost")
    assert info["wire_version"] == wire.WIRE_VERSION
    assert isinstance(info["version"], str) and info["version"]
    assert info["transport"] == relay_transport


def test_calls_answered_in_order_with_monotonic_timestamps(dproc, ctx):
    d = dproc()
    c = Client(ctx, d.endpoint)
    rows = c.timed_calls(300, start_id=1000)
    assert [r.call_id for _, _, r in rows] == list(range(1000, 1300))
    prev_send = 0
    for t0, t1, r in rows:
        assert (r.ret, r.errno, r.outbufs) == (0, 0, ())
        assert r.t_recv <= r.t_exec_start == r.t_exec_end <= r.t_send  # no execution in cost mode
        # same host, same CLOCK_MONOTONIC: the delegate's stamps lie inside the client's round trip
        assert t0 <= r.t_recv and r.t_send <= t1
        assert r.t_recv > prev_send  # one thread, calls served one after another
        prev_send = r.t_send


def test_req_style_envelope_is_answered(dproc, ctx):
    d = dproc()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    req.connect(d.endpoint)
    req.send(wire.encode_hello({}))
    assert wire.decode(req.recv())[0] == wire.WELCOME
    req.close(0)


def test_delay_known_answer_residence_rises_by_d(dproc, ctx):
    delay_us = 400
    plain = Client(ctx, dproc().endpoint)
    slow = Client(ctx, dproc("--delay-us", str(delay_us)).endpoint)
    rows: dict[str, list] = {"plain": [], "slow": []}
    for i in range(300):  # interleaved, so both delegates see the same machine load
        rows["plain"] += plain.timed_calls(1, start_id=i)
        rows["slow"] += slow.timed_calls(1, start_id=i)
    # the spin happens after t_recv and before t_exec_start, every call
    assert all(r.t_exec_start - r.t_recv >= delay_us * 1000 for _, _, r in rows["slow"])
    res = {
        k: statistics.median(r.t_send - r.t_recv for _, _, r in v) / 1e3 for k, v in rows.items()
    }
    rtt = {k: statistics.median(t1 - t0 for t0, t1, _ in v) / 1e3 for k, v in rows.items()}
    rise = res["slow"] - res["plain"]
    print(f"residence p50 {res}, rtt p50 {rtt} (us)")
    assert abs(rise - delay_us) <= 0.10 * delay_us, (res, rtt)


def test_bad_frames_get_errors_while_a_good_client_keeps_being_served(dproc, ctx):
    d = dproc()
    good = Client(ctx, d.endpoint, ident=b"good-client")
    results: list = []
    stop = threading.Event()

    def serve_good() -> None:
        i = 0
        while not stop.is_set() and i < 100_000:
            kind, res = good.call(i)
            results.append((kind, res.call_id if kind == wire.RESULT else None, i))
            i += 1

    t = threading.Thread(target=serve_good)
    t.start()
    bad = Client(ctx, d.endpoint, ident=b"bad-client")
    valid_call = wire.encode_call(wire.Call(77, 1, 1, (0,) * 6, ((1, b"abc"),), "cost"))
    cases = [
        (b"", wire.E_MALFORMED, None),
        (b"\xc1\xc1garbage", wire.E_MALFORMED, None),
        (b"GET / HTTP/1.0\r\n\r\n", wire.E_MALFORMED, None),
        (valid_call[:-3], wire.E_MALFORMED, None),  # truncated
        (valid_call[:1], wire.E_MALFORMED, None),
        (pack([wire.WIRE_VERSION + 1, "call", 5, 1, 1, [0] * 6, [], "cost"]), wire.E_VERSION, None),
        (
            pack([wire.WIRE_VERSION, "call", 5, 1, 1, [0] * 5, [], "cost"]),
            wire.E_MALFORMED,
            5,
        ),  # arity of args
        (
            pack([wire.WIRE_VERSION, "call", 6, 1, 9999, [0] * 6, [], "cost"]),
            wire.E_MALFORMED,
            6,
        ),  # nr range
        (
            pack([wire.WIRE_VERSION, "call", 8, 1, 1, [0] * 6, [[9, b"x"]], "cost"]),
            wire.E_MALFORMED,
            8,
        ),
        (pack([wire.WIRE_VERSION, "teleport", {}]), wire.E_UNSUPPORTED, None),
        (wire.encode_result(wire.Result(1, 0, 0, 1, 2, 3, 4, ())), wire.E_UNSUPPORTED, None),
        (wire.encode_call(wire.Call(9, 1, 1, (0,) * 6, (), "offload")), wire.E_UNSUPPORTED, 9),
        (b"x" * (wire.MAX_FRAME + 1), wire.E_TOO_LARGE, None),
        ([valid_call, valid_call], wire.E_MALFORMED, None),  # two frames in one message
    ]
    try:
        for frame, code, call_id in cases:
            kind, err = bad.ask(frame)
            assert kind == wire.ERROR, (frame[:20], err)
            assert (err.code, err.call_id) == (code, call_id), (frame[:20], str(err))
        # a frame beyond ZMQ_MAXMSGSIZE: libzmq drops that connection, nobody else's
        huge = Client(ctx, d.endpoint)
        huge.sock.setsockopt(zmq.RCVTIMEO, 300)
        huge.sock.send(b"y" * (HARD_MAX_FRAME + 1))
        with pytest.raises(zmq.Again):
            huge.sock.recv()
        # and the bad client is still served when it behaves
        kind, res = bad.call(123)
        assert kind == wire.RESULT and res.call_id == 123
    finally:
        stop.set()
        t.join(30)
    assert len(results) > 0
    assert all(kind == wire.RESULT and got == want for kind, got, want in results)
    rc, err, _ = d.terminate()
    assert rc == 0
    (good_line,) = [ln for ln in err.splitlines() if b"good-client".hex() in ln]
    (bad_line,) = [ln for ln in err.splitlines() if b"bad-client".hex() in ln]
    assert f"calls {len(results)}, errors 0," in good_line
    # every case above counted as an error of the bad client, none of the good one
    assert f"errors {len(cases)}," in bad_line
    assert "Traceback" not in err


# ---------------------------------------------------------------- lifecycle


@pytest.mark.parametrize("workers", ["1", "3"])
def test_sigterm_exits_zero_promptly_with_per_client_accounting(dproc, ctx, workers):
    d = dproc("--workers", workers)
    a = Client(ctx, d.endpoint, ident=b"client-A")
    b = Client(ctx, d.endpoint, ident=b"client-B")
    a.ask(wire.encode_hello({"host": "nodeA", "pid": 11}))
    for i in range(10):
        assert a.call(i)[0] == wire.RESULT
    for i in range(3):
        assert b.call(i, data=b"z" * 1000)[0] == wire.RESULT
    assert b.ask(b"junk")[0] == wire.ERROR
    kind, acct_b = b.ask(wire.encode_bye({}))
    assert kind == wire.BYE
    assert (acct_b["calls"], acct_b["errors"]) == (3, 1)
    assert acct_b["bytes_in"] > 3000
    assert acct_b["first_seen"] <= acct_b["last_seen"] <= time.time() + 1
    rc, err, elapsed = d.terminate(signal.SIGTERM)
    assert rc == 0, err
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    lines = err.splitlines()
    (line_a,) = [ln for ln in lines if b"client-A".hex() in ln]
    (line_b,) = [ln for ln in lines if b"client-B".hex() in ln]
    assert "host=nodeA pid=11" in line_a
    assert "calls 10, errors 0," in line_a
    assert "calls 3, errors 1," in line_b
    assert "stopped after 13 calls from 2 clients" in lines[-1]


def test_sigterm_finishes_the_call_in_flight(dproc, ctx):
    d = dproc("--delay-us", "300000")  # each call spins 0.3 s
    c = Client(ctx, d.endpoint)
    c.sock.send(wire.encode_call(wire.Call(42, 1, 1, (0,) * 6, (), "cost")))
    time.sleep(0.1)  # the call is being served now
    d.proc.send_signal(signal.SIGTERM)
    kind, res = wire.decode(c.sock.recv())  # the reply still arrives
    assert (kind, res.call_id) == (wire.RESULT, 42)
    assert res.t_exec_start - res.t_recv >= 300_000_000
    rc, err, _ = d.terminate()
    assert rc == 0 and "stopped after 1 calls" in err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_repeated_signals_during_shutdown_never_kill_or_trace(dproc, ctx, sig):
    # A service manager (or an impatient ^C) may signal again while the delegate
    # is already closing and printing its summary.  Hammer it with signals from
    # the first one until it has exited: every window of the shutdown is hit.
    d = dproc()
    c = Client(ctx, d.endpoint)
    assert c.call(1)[0] == wire.RESULT
    deadline = time.monotonic() + 20
    sent = 0
    while d.proc.poll() is None and time.monotonic() < deadline:
        try:
            d.proc.send_signal(sig)
            sent += 1
        except ProcessLookupError:
            break
        time.sleep(0.0005)
    _, err = d.proc.communicate(timeout=10)
    assert sent >= 2, "the delegate exited before a second signal could be sent"
    assert d.proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "stopped after 1 calls from 1 clients" in err


def test_sigint_also_stops_cleanly(dproc):
    d = dproc()
    rc, err, _ = d.terminate(signal.SIGINT)
    assert rc == 0
    assert "stopped after 0 calls" in err
    assert "Traceback" not in err


def test_max_calls_exits_after_n_calls(dproc, ctx):
    d = dproc("--max-calls", "5")
    c = Client(ctx, d.endpoint)
    for i in range(5):
        assert c.call(i)[0] == wire.RESULT
    assert d.proc.wait(10) == 0
    assert "stopped after 5 calls" in d.proc.stderr.read()


def test_quiet_prints_nothing(ctx):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [PY, "-m", "testbed", "delegate", "--quiet", "--max-calls", "1", "--listen", ep],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        c = Client(ctx, ep)  # ZeroMQ reconnects until the delegate is up
        assert c.call(1)[0] == wire.RESULT
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0
    assert err == ""


def test_port_in_use_is_one_line_error_and_nonzero():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [PY, "-m", "testbed", "delegate", "--listen", f"tcp://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("testbed: error: cannot listen on")
    assert "Address already in use" in lines[0]


def test_offload_root_must_be_a_directory(tmp_path):
    proc = subprocess.run(
        [PY, "-m", "testbed", "delegate", "--listen", "tcp://127.0.0.1:*",
         "--offload-root", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"testbed: error: offload root {str(tmp_path / 'missing')!r} is not a directory"
    ]


@pytest.mark.parametrize(
    "endpoint, reason",
    [
        ("tcp://127.0.0.1:99999", "port must be 0-65535"),
        ("tcp://198.51.100.7:5555", "Cannot assign requested address"),  # not ours (bind only)
        ("tcp://no-such-host.invalid:5555", "cannot listen on"),
        ("ipc:///nonexistent-dir/x/y.sock", "No such file or directory"),
    ],
)
def test_bad_address_is_a_testbed_error(endpoint, reason):
    with pytest.raises(_TestbedError, match=f"cannot listen on {re.escape(endpoint)}: ") as info:
        Delegate(endpoint).bind()
    assert reason in str(info.value)


# ---------------------------------------------------------------- in-process


def test_in_process_two_clients_accounted_separately(ctx):
    with Delegate("tcp://127.0.0.1:*") as d:
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", d.bound_endpoint)
        a = Client(ctx, d.bound_endpoint, ident=b"AAAA")
        b = Client(ctx, d.bound_endpoint, ident=b"BBBB")
        for i in range(7):
            a.call(i)
        for i in range(2):
            b.call(i, data=b"q" * 500)
        b.ask(b"\x00")
        stats = d.stats()
        assert d.answered == 9
    assert set(stats) == {b"AAAA".hex(), b"BBBB".hex()}
    sa, sb = stats[b"AAAA".hex()], stats[b"BBBB".hex()]
    assert (sa["calls"], sa["errors"], sb["calls"], sb["errors"]) == (7, 0, 2, 1)

    def sent(i: int, data: bytes) -> int:  # the frame Client.call sends
        args = (1, 0x1000, len(data), 0, 0, 0)
        return len(wire.encode_call(wire.Call(i, os.getpid(), 1, args, ((1, data),), "cost")))

    assert sa["bytes_in"] == sum(sent(i, b"x" * 64) for i in range(7))
    assert sb["bytes_in"] == sum(sent(i, b"q" * 500) for i in range(2)) + 1  # + the b"\x00"


def test_worker_pool_serves_concurrent_clients_and_merges_accounting(ctx):
    delay_us = 2000
    with Delegate("tcp://127.0.0.1:*", workers=2, delay_us=delay_us) as d:
        assert d.welcome_info()["workers"] == 2
        clients = [Client(ctx, d.bound_endpoint, ident=f"c{i}".encode()) for i in range(2)]
        rows: dict[int, list] = {}

        def drive(i: int) -> None:
            rows[i] = clients[i].timed_calls(40, start_id=i * 1000)

        threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        kind, bye = clients[0].ask(wire.encode_bye({}))
    assert kind == wire.BYE and bye["calls"] == 40
    for i in (0, 1):
        assert [r.call_id for _, _, r in rows[i]] == list(range(i * 1000, i * 1000 + 40))
        assert all(r.t_exec_start - r.t_recv >= delay_us * 1000 for _, _, r in rows[i])
    # the two workers spun at the same time: some residences of the clients overlap
    spans = sorted((r.t_recv, r.t_send, i) for i in (0, 1) for _, _, r in rows[i])
    overlaps = sum(
        1 for x, y in zip(spans, spans[1:], strict=False) if y[0] < x[1] and x[2] != y[2]
    )
    assert overlaps > 0


class RecordingExecutor:
    """An offload executor for the extension point: answers ``nr`` and fails on nr 13."""

    def __init__(self):
        self.forgotten: list[bytes] = []

    def execute(self, client, call):
        if call.nr == 13:
            raise OSError("executor broke")
        return call.nr * 10, 0, ((1, b"out:" + client),)

    def forget(self, client):
        self.forgotten.append(client)


def test_offload_extension_point_and_internal_errors(ctx):
    ex = RecordingExecutor()
    with Delegate("tcp://127.0.0.1:*", offload=ex) as d:
        assert d.welcome_info()["mode"] == "cost+offload"
        c = Client(ctx, d.bound_endpoint, ident=b"off")
        kind, res = c.ask(wire.encode_call(wire.Call(1, 1, 7, (0,) * 6, (), "offload")))
        assert kind == wire.RESULT
        # the executor's key is the connection's: the identity itself under raw ZMTP,
        # identity + NUL + socket inode under libzmq
        key = res.outbufs[0][1].removeprefix(b"out:")
        assert (res.ret, res.errno) == (70, 0)
        if d.transport == "zmtp":
            assert key == b"off"
        else:
            assert key[:4] == b"off\0" and len(key) == 12
        assert res.t_recv <= res.t_exec_start <= res.t_exec_end <= res.t_send
        # cost-mode calls are still only acknowledged
        kind, res = c.ask(wire.encode_call(wire.Call(2, 1, 7, (0,) * 6, (), "cost")))
        assert (kind, res.ret) == (wire.RESULT, 0)
        # an executor failure is an internal error for that call, not a crash
        kind, err = c.ask(wire.encode_call(wire.Call(3, 1, 13, (0,) * 6, (), "offload")))
        assert (kind, err.code, err.call_id) == (wire.ERROR, wire.E_INTERNAL, 3)
        assert "executor broke" in str(err)
        kind, res = c.ask(wire.encode_call(wire.Call(4, 1, 2, (0,) * 6, (), "offload")))
        assert (kind, res.ret) == (wire.RESULT, 20)
        kind, bye = c.ask(wire.encode_bye({}))
        assert (kind, bye["calls"], bye["errors"]) == (wire.BYE, 4, 1)
        assert ex.forgotten == [key]  # at BYE
        # both transports also forget a client whose connection ended
        c2 = Client(ctx, d.bound_endpoint, ident=b"gone")
        kind, res = c2.ask(wire.encode_call(wire.Call(5, 1, 7, (0,) * 6, (), "offload")))
        assert kind == wire.RESULT
        gone = res.outbufs[0][1].removeprefix(b"out:")
        c2.close()
        deadline = time.monotonic() + 5
        while gone not in ex.forgotten:
            assert time.monotonic() < deadline, ex.forgotten
            time.sleep(0.01)


def test_curve_admits_only_authorized_relays(ctx, tmp_path):
    from testbed.core.keys import generate, make_curve_keys
    from testbed.core.keys import setup_client as curve_client

    keys = tmp_path / "keys"
    make_curve_keys(str(keys))
    other = tmp_path / "other"  # a relay with keys the delegate does not know
    generate(other)
    (other / "server.key").unlink()
    (other / "server.key").write_bytes((keys / "server.key").read_bytes())
    with Delegate("tcp://127.0.0.1:*", curve_keys=str(keys)) as d:
        assert "CURVE" in d.status_line()
        good = ctx.socket(zmq.DEALER)
        good.setsockopt(zmq.LINGER, 0)
        good.setsockopt(zmq.RCVTIMEO, 10_000)
        curve_client(good, str(keys))
        good.connect(d.bound_endpoint)
        good.send(wire.encode_hello({}))
        kind, info = wire.decode(good.recv())
        assert kind == wire.WELCOME and info["curve"] is True
        for setup in (None, str(other)):  # a plain client, an unauthorized CURVE client
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 500)
            if setup:
                curve_client(s, setup)
            s.connect(d.bound_endpoint)
            s.send(wire.encode_hello({}))
            with pytest.raises(zmq.Again):
                s.recv()
            s.close(0)
        good.close(0)
        assert len(d.stats()) == 1  # the refused clients never reached the delegate


def test_curve_without_keys_is_a_user_error(tmp_path):
    with pytest.raises(_TestbedError, match="server.key_secret: no such file"):
        Delegate("tcp://127.0.0.1:*", curve_keys=str(tmp_path)).bind()


def test_curve_bind_failure_is_an_error_not_a_hang(tmp_path):
    from testbed.core.keys import make_curve_keys

    make_curve_keys(str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ep = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        with pytest.raises(_TestbedError, match="Address already in use"):
            Delegate(ep, curve_keys=str(tmp_path)).bind()  # also stops the ZAP thread


def test_stop_is_bounded_and_idempotent():
    d = Delegate("tcp://127.0.0.1:*").start()
    t0 = time.monotonic()
    d.stop()
    d.stop()
    assert time.monotonic() - t0 < 5
    assert not d._thread.is_alive()


# ---------------------------------------------------------------- two nodes


CLIENT = textwrap.dedent(
    """
    import json, sys, time, zmq
    from testbed.core import wire
    ctx = zmq.Context(); s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0); s.setsockopt(zmq.RCVTIMEO, 10000); s.connect(sys.argv[1])
    s.send(wire.encode_hello({"host": "compute"})); kind, welcome = wire.decode(s.recv())
    stamps = []
    for i in range(50):
        s.send(wire.encode_call(wire.Call(i, 1, 1, (0,) * 6, ((1, b"w" * 100),), "cost")))
        kind, r = wire.decode(s.recv())
        stamps.append([kind, r.call_id, r.t_recv, r.t_send])
    s.send(wire.encode_bye({})); kind, bye = wire.decode(s.recv())
    print(json.dumps({"welcome": welcome, "stamps": stamps, "bye": bye}))
    """
)


@pytest.mark.root
@pytest.mark.netns
def test_delegate_in_one_namespace_client_in_another():
    from testbed.cluster import netns

    ok, why = netns.available()
    if not ok:
        pytest.skip(why)
    with netns.NetnsPair("delegate", "compute") as topo:
        ep = f"tcp://{topo.addr('delegate')}:5555"
        d = topo.popen(
            "delegate",
            [PY, "-m", "testbed", "delegate", "--listen", ep],
            stderr=subprocess.PIPE,
            text=True,
        )
        out = topo.run(
            "compute", [PY, "-c", CLIENT, ep], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        got = json.loads(out.stdout)
        d.send_signal(signal.SIGTERM)
        _, err = d.communicate(timeout=10)
        assert d.returncode == 0, err
    assert f"listening on {ep}" in err
    assert "stopped after 50 calls from 1 clients" in err
    assert got["welcome"]["pid"] > 0 and got["bye"]["calls"] == 50
    assert [s[:2] for s in got["stamps"]] == [["result", i] for i in range(50)]
    assert all(s[2] <= s[3] for s in got["stamps"])


def test_start_twice_serves_once():
    """``with Delegate(...).start()`` starts one serving thread, not two on one socket."""
    import threading

    from testbed.delegate.daemon import Delegate

    d = Delegate("tcp://127.0.0.1:*")
    with d.start():
        assert d.start() is d
        assert [t.name for t in threading.enumerate()].count("tb-delegate") == 1
    assert d.wait(5)
