"""The relay's raw ZMTP transport (testbed.core.zmtp.Dealer): no libzmq on the relay's side.

Real sockets throughout: a pyzmq ROUTER or the real delegate on the other end,
tcp:// and ipc://, another network namespace, a delegate restarted mid-run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

from testbed.cluster import netns
from testbed.compute.relay import DelegateUnreachable, connect
from testbed.core import rundir, wire, zmtp
from testbed.core.procs import free_port
from tests.conftest import run_testbed, strace_counts, tb_argv


@pytest.fixture
def router():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    yield sock
    sock.close(0)
    ctx.term()


def _recv(sock, dealer: zmtp.Dealer, timeout_s: float = 5.0) -> list[bytes]:
    """The ROUTER's next message; ``dealer`` is driven meanwhile (it has no I/O
    thread: its handshake and held messages progress when it is polled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dealer.poll(10)
        if sock.poll(10):
            return sock.recv_multipart()
    raise AssertionError("nothing arrived")


@pytest.mark.unit
def test_transport_selection(monkeypatch):
    monkeypatch.delenv(zmtp.ENV, raising=False)
    assert zmtp.transport("tcp://127.0.0.1:5555") == "zmtp"
    assert zmtp.transport("tcp://localhost:5555") == "zmtp"
    assert zmtp.transport("ipc:///tmp/d.sock") == "zmtp"
    assert zmtp.transport("tcp://127.0.0.1:5555", curve_keys="/k") == "libzmq"
    assert zmtp.transport("tcp://[::1]:5555") == "libzmq"
    assert zmtp.transport("inproc://x") == "libzmq"
    monkeypatch.setenv(zmtp.ENV, "0")
    assert zmtp.transport("tcp://127.0.0.1:5555") == "libzmq"


def test_dealer_round_trips_and_counts_buffered_parts_as_ready(router):
    endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    d = zmtp.Dealer(endpoint)
    try:
        d.send(b"x" * 300)  # a long frame
        d.send(b"short")
        assert d.poll(0) == 0  # nothing to receive yet
        ident, first = _recv(router, d)
        assert first == b"x" * 300 and _recv(router, d) == [ident, b"short"]
        router.send_multipart([ident, b"one"])
        router.send_multipart([ident, b"two"])
        router.send_multipart([ident, b"a", b"b"])  # a multipart reply: two parts
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 4 and time.monotonic() < deadline:
            if d.poll(100):
                got.append(d.recv(zmq.NOBLOCK))
                # what is already buffered is ready although the fd may not be readable
                if d.has_message():
                    assert d.poll(0) == zmq.POLLIN
        assert got == [b"one", b"two", b"a", b"b"]
        with pytest.raises(zmq.Again):
            d.recv(zmq.NOBLOCK)
        # the relay's loop: the poller reports the dealer while parts are buffered
        router.send_multipart([ident, b"p"])
        router.send_multipart([ident, b"q"])
        poller = zmtp.Poller()
        poller.register(d, zmq.POLLIN)
        seen = []
        for _ in range(50):
            for what, _ev in poller.poll(100):
                assert what is d
                seen.append(d.recv(zmq.NOBLOCK))  # one part per wake-up
            if len(seen) == 2:
                break
        assert seen == [b"p", b"q"]
    finally:
        d.close()


def test_ipc_endpoint(tmp_path):
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/d.sock"
    r.bind(endpoint)
    d = zmtp.Dealer(endpoint)
    try:
        d.send(b"over unix")
        ident, body = _recv(r, d)
        assert body == b"over unix"
        r.send_multipart([ident, b"back"])
        assert d.poll(5000) and d.recv() == b"back"
    finally:
        d.close()
        r.close(0)
        ctx.term()


def test_send_buffer_is_bounded_when_the_peer_stops_reading():
    """A peer that completes the handshake and then never reads: send refuses
    (zmq.Again) once MAX_OUT bytes wait, as a DEALER at its high-water mark."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    d = zmtp.Dealer(f"tcp://127.0.0.1:{port}")
    conn, _ = lsock.accept()
    try:
        conn.sendall(zmtp.GREETING + zmtp.ready_command(b"ROUTER"))
        assert d.poll(200) == 0  # reads the handshake, no message
        d.MAX_OUT = 1 << 20
        msg = b"m" * 60_000
        refused = False
        for _ in range(2000):  # bounded: the kernel buffers plus MAX_OUT
            try:
                d.send(msg, zmq.NOBLOCK)
            except zmq.Again:
                refused = True
                break
        assert refused
        assert len(d._out) <= d.MAX_OUT
    finally:
        d.close()
        conn.close()
        lsock.close()


def _listener() -> tuple[socket.socket, str]:
    """A plain TCP listener on loopback and its endpoint (a peer we script by hand)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    return lsock, f"tcp://127.0.0.1:{lsock.getsockname()[1]}"


def test_garbage_and_oversized_frames_drop_the_connection():
    lsock, endpoint = _listener()
    d = zmtp.Dealer(endpoint)
    conn, _addr = lsock.accept()
    try:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n" + b"x" * 64)  # not ZMTP
        assert d.poll(1000) == 0 and not d.connected
        assert "does not speak ZMTP 3" in d.last_error
        conn.close()
        d.send(b"again")  # dials again
        conn, _addr = lsock.accept()
        huge = bytes([0x02]) + (zmtp.Dealer.MAX_FRAME + 1).to_bytes(8, "big")
        conn.sendall(zmtp.GREETING + zmtp.ready_command(b"ROUTER") + huge)
        assert d.poll(1000) == 0 and not d.connected and "a frame of" in d.last_error
        assert d.drops == 2
    finally:
        d.close()
        conn.close()
        lsock.close()


def test_a_peer_that_is_not_zmtp_is_one_clear_error(tmp_path):
    lsock, endpoint = _listener()
    stop = time.monotonic() + 30

    def serve():
        lsock.settimeout(0.2)
        while time.monotonic() < stop:
            try:
                c, _ = lsock.accept()
            except OSError:
                continue
            c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + b"\0" * 64)
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = run_testbed("run", "--delegate", endpoint, "--connect-timeout", "1", "--forward",
                          "write", "-o", str(tmp_path / "r"), "--", "true", timeout=60)  # fmt: skip
    finally:
        stop = 0
        t.join(5)
        lsock.close()
    err = res.stderr.decode().strip().splitlines()
    assert res.returncode != 0
    assert len(err) == 1 and err[0].startswith("testbed: error: no delegate answering"), err


def test_dealer_redials_after_the_peer_restarts():
    ctx = zmq.Context()
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"

    def bind():
        r = ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.bind(endpoint)
        return r

    r = bind()
    d = zmtp.Dealer(endpoint)
    try:
        d.send(b"before")
        assert _recv(r, d)[1] == b"before"
        r.close(0)
        assert d.poll(2000) == 0  # reads the close: the connection is dropped
        assert not d.connected and d.drops == 1
        d.send(b"held")  # no peer listening: held while dials are refused
        assert d.poll(3 * 1000 * d.RECONNECT_S) == 0 and d.dials >= 3  # retried meanwhile
        r = bind()
        d.send(b"after")
        assert _recv(r, d)[1] == b"held"  # dialled again, greeting redone
        assert _recv(r, d)[1] == b"after"
    finally:
        d.close()
        r.close(0)
        ctx.term()


def test_no_delegate_is_delegate_unreachable():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(DelegateUnreachable, match="no delegate answering"):
        connect(endpoint, timeout_s=0.5)
    with pytest.raises(DelegateUnreachable, match="cannot connect"):
        connect("tcp://no-such-host.invalid:1", timeout_s=0.5)


@pytest.mark.parametrize("hot_path", ["c", "python"])
def test_run_over_ipc_is_identical_to_native(payload, tmp_path, hot_path):
    from testbed.jobs.localdelegate import wait_ready

    endpoint = f"ipc://{tmp_path}/delegate.sock"
    d = subprocess.Popen(tb_argv("delegate", "--quiet", "--listen", endpoint))
    try:
        wait_ready(d, endpoint)
        program = ["gzip", "-6", "-c", str(payload)]
        native = subprocess.run(program, capture_output=True, check=True).stdout
        env = {**os.environ, "TESTBED_FASTPATH": "1" if hot_path == "c" else "0"}
        env.pop(zmtp.ENV, None)
        res = run_testbed("run", "--delegate", endpoint, "--forward", "read,write",
                          "-o", str(tmp_path / "r"), "--", *program, env=env)  # fmt: skip
    finally:
        d.terminate()
        d.wait(10)
    assert res.returncode == 0, res.stderr
    assert res.stdout == native
    run = rundir.load(tmp_path / "r")
    assert run.meta["transport"] == "zmtp"
    assert run.meta["hot_path"]["c"] == (hot_path == "c")
    assert run.meta["calls"]["faults"] == 0
    counts = {r["name"]: int(r["n"]) for r in run.syscalls}
    assert counts == strace_counts(program, "read,write")


def test_delegate_restarted_mid_run_is_dialled_again(tmp_path, monkeypatch):
    """Raw ZMTP: the delegate dies mid-run and a new one starts on the same
    endpoint; calls meanwhile are released locally (faults), then the relay
    re-dials, its HELLO probe is answered and calls are forwarded again."""
    monkeypatch.delenv(zmtp.ENV, raising=False)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    argv = tb_argv("delegate", "--quiet", "--listen", endpoint)
    d = subprocess.Popen(argv)
    d2 = None
    try:
        connect(endpoint, timeout_s=30)[1].close()
        slow = "import sys,time\nfor i in range(400):\n    print(i, flush=True); time.sleep(0.01)\n"
        run = subprocess.Popen(
            tb_argv("run", "--delegate", endpoint, "--forward", "write", "--timeout", "0.3",
                    "-o", str(tmp_path / "r"), "--", sys.executable, "-c", slow),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        first = run.stdout.readline()
        time.sleep(0.3)
        d.kill()
        d.wait()
        time.sleep(0.6)
        d2 = subprocess.Popen(argv)
        out, err = run.communicate(timeout=120)
        out = first + out
    finally:
        for p in (d, d2):
            if p is not None:
                p.kill()
                p.wait()
    assert run.returncode == 0, err
    assert out.decode().split() == [str(i) for i in range(400)]
    r = rundir.load(tmp_path / "r")
    assert r.meta["transport"] == "zmtp"
    calls = np.asarray(r.calls())
    assert calls.size == r.meta["calls"]["count"]
    faulty = np.flatnonzero(calls["flags"] != 0)
    assert faulty.size >= 1 and r.meta["calls"]["faults"] >= 1
    after = calls[faulty[-1] + 1 :]
    # forwarded again, answered by the new delegate (its stamps are set)
    assert after.size > 20 and (after["flags"] == 0).all() and (after["d_recv"] > 0).all()
    assert "FAULTS" in err.decode()


@pytest.mark.root
@pytest.mark.netns
def test_delegate_in_another_namespace_over_raw_zmtp(payload, tmp_path):
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"needs network namespaces: {why}")
    program = ["bzip2", "-9", "-c", str(payload)]
    native = subprocess.run(program, capture_output=True, check=True).stdout
    env = {k: v for k, v in os.environ.items() if k != zmtp.ENV}
    with netns.Topology(["compute", "delegate"]) as topo:
        endpoint = f"tcp://{topo.addr('delegate')}:5555"
        topo.popen("delegate", tb_argv("delegate", "--listen", endpoint, "--quiet"))
        probe = f"from testbed.compute.relay import connect; connect({endpoint!r}, timeout_s=1.0)"
        for _ in range(40):
            if topo.run("compute", [sys.executable, "-c", probe], env=env).returncode == 0:
                break
            time.sleep(0.25)
        out_file = tmp_path / "out.bz2"
        with open(out_file, "wb") as f:
            res = topo.run("compute", tb_argv("run", "--delegate", endpoint, "--forward",
                                              "read,write", "-o", str(tmp_path / "r"), "--",
                                              *program),
                           stdout=f, stderr=subprocess.PIPE, timeout=300, env=env)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert out_file.read_bytes() == native
    run = rundir.load(tmp_path / "r")
    assert run.meta["transport"] == "zmtp" and run.meta["hot_path"]["c"]
    assert run.meta["calls"]["faults"] == 0
    counts = {r["name"]: int(r["n"]) for r in run.syscalls}
    assert counts == strace_counts(program, "read,write")
    assert run.meta["delegate"]["wire_version"] == wire.WIRE_VERSION
