"""The delegate's raw ZMTP transport (testbed.delegate.router): libzmq peers of every kind
it accepts, the ones it refuses, and the limits it keeps without libzmq.

Real sockets throughout: pyzmq DEALER/REQ/ROUTER clients, raw TCP peers that
misbehave below libzmq, a delegate in another process.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import zmq

from testbed.core import wire, zmtp
from testbed.core.errors import TestbedError as _TestbedError
from testbed.delegate import router
from testbed.delegate.daemon import MAX_BACKLOG, Delegate
from tests import rawzmtp


@pytest.fixture
def raw_delegate():
    d = Delegate("tcp://127.0.0.1:*", transport="zmtp").start()
    assert d.transport == "zmtp"
    yield d
    d.stop()


def _call(i: int) -> bytes:
    return wire.encode_call(wire.Call(i, 1, 1, (0,) * 6, (), "cost"))


def _sock(ctx, kind: int, endpoint: str, **opts) -> zmq.Socket:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k), v)
    s.connect(endpoint)
    return s


@pytest.mark.unit
def test_which_endpoints_it_serves():
    assert router.serves("tcp://127.0.0.1:5555")
    assert router.serves("tcp://*:*")
    assert router.serves("tcp://0.0.0.0:*")
    assert router.serves("ipc:///tmp/x.sock")
    assert not router.serves("ipc://*")  # libzmq's temporary path
    assert not router.serves("tcp://eth0:5555")  # an interface name: libzmq's
    assert not router.serves("tcp://[::1]:5555")
    assert not router.serves("tcp://300.1.1.1:5555")
    assert not router.serves("inproc://x")


def test_transport_choice_and_clear_refusals(tmp_path, monkeypatch):
    monkeypatch.delenv(zmtp.ENV, raising=False)
    for kwargs, want in (({}, "zmtp"), ({"workers": 2}, "libzmq")):
        d = Delegate("tcp://127.0.0.1:*", **kwargs)
        d.bind()
        assert d.transport == want
        d.close()
    monkeypatch.setenv(zmtp.ENV, "0")
    d = Delegate("tcp://127.0.0.1:*")
    d.bind()
    assert d.transport == "libzmq"  # the environment switch turns both ends to libzmq
    d.close()
    with pytest.raises(_TestbedError, match="--workers > 1"):
        Delegate("tcp://127.0.0.1:*", workers=2, transport="zmtp").bind()
    with pytest.raises(_TestbedError, match="IPv4 or"):
        Delegate("tcp://[::1]:*", transport="zmtp").bind()
    with pytest.raises(_TestbedError, match="transport must be one of"):
        Delegate("tcp://127.0.0.1:*", transport="udp")


@pytest.mark.parametrize("kind", ["DEALER", "REQ", "ROUTER"])
def test_libzmq_peers_of_each_kind_are_answered(ctx, raw_delegate, kind):
    ep = raw_delegate.bound_endpoint
    if kind == "ROUTER":  # a ROUTER client names the delegate's connection itself
        s = _sock(ctx, zmq.ROUTER, ep, ROUTER_MANDATORY=1, CONNECT_ROUTING_ID=b"deleg")
        deadline = time.monotonic() + 5
        while True:  # until the handshake made the peer addressable
            try:
                s.send_multipart([b"deleg", _call(7)])
                break
            except zmq.ZMQError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        kind_, res = wire.decode(s.recv_multipart()[-1])
    else:
        s = _sock(ctx, getattr(zmq, kind), ep)
        s.send(_call(7))
        kind_, res = wire.decode(s.recv())
    assert (kind_, res.call_id) == (wire.RESULT, 7)
    s.close()


def test_identity_property_is_kept_unless_taken(ctx, raw_delegate):
    ep = raw_delegate.bound_endpoint
    a = _sock(ctx, zmq.DEALER, ep, ROUTING_ID=b"node1")
    b = _sock(ctx, zmq.DEALER, ep, ROUTING_ID=b"node1")  # taken: gets a generated one
    for s, i in ((a, 1), (b, 2)):
        s.send(_call(i))
        assert wire.decode(s.recv())[1].call_id == i
    stats = raw_delegate.stats()
    assert b"node1".hex() in stats and len(stats) == 2
    assert all(v["calls"] == 1 for v in stats.values())


def test_pipelined_and_split_frames_are_all_answered_in_order(raw_delegate):
    s = rawzmtp.connect(raw_delegate.bound_endpoint)
    data = b"".join(rawzmtp.frame(_call(i)) for i in range(200))
    for k in range(0, len(data), 7):  # 7-byte pieces: every frame split somewhere
        s.sendall(data[k : k + 7])
    got = [wire.decode(zmtp.read_message(s)[-1])[1].call_id for _ in range(200)]
    assert got == list(range(200))
    s.close()


def test_ping_gets_pong_with_its_context(raw_delegate):
    s = rawzmtp.connect(raw_delegate.bound_endpoint)
    body = b"\x04PING" + struct.pack(">H", 10) + b"ctx-42"
    s.sendall(bytes([0x04, len(body)]) + body)
    flags, got = zmtp.read_frame(s)
    assert flags & 0x04 and got == b"\x04PONG" + b"ctx-42"
    s.sendall(rawzmtp.frame(_call(3)))  # and messages still flow
    assert wire.decode(zmtp.read_message(s)[-1])[1].call_id == 3
    s.close()


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(5)
    try:
        while s.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize(
    ("greeting", "why"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 40, "does not speak ZMTP"),
        (zmtp.GREETING[:10] + b"\x02\x00" + zmtp.GREETING[12:], "does not speak ZMTP 3"),
        (
            zmtp.GREETING[:12] + b"CURVE".ljust(20, b"\0") + zmtp.GREETING[32:],
            "asks for a security mechanism",
        ),
        (zmtp.GREETING + zmtp.ready_command(b"PUB"), "is a PUB socket"),
        (zmtp.GREETING + rawzmtp.frame(b"no READY first"), "before its READY"),
    ],
)
def test_peers_it_cannot_serve_are_closed_with_one_line(greeting, why):
    lines: list[str] = []
    r = router.Router("tcp://127.0.0.1:*", max_connections=8, max_frame=1 << 20,
                      max_backlog=1 << 22, max_parts=3, log=lines.append)  # fmt: skip
    ep = r.bind()
    stop = threading.Event()
    t = threading.Thread(target=r.serve,
                         args=(lambda i, p, t: b"", lambda *a: (b"", ()), stop.is_set, 0, 0))  # fmt: skip
    t.start()
    try:
        host, port = ep[6:].rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(greeting)
        assert _closed_by_peer(s)
        s.close()
        assert any(why in line for line in lines), lines
        assert r.connections == 0
    finally:
        stop.set()
        r.wake()
        t.join(5)
        r.close()


def test_frame_over_the_limit_ends_only_that_connection(ctx, raw_delegate):
    good = _sock(ctx, zmq.DEALER, raw_delegate.bound_endpoint)
    good.send(_call(1))
    assert wire.decode(good.recv())[1].call_id == 1
    s = rawzmtp.connect(raw_delegate.bound_endpoint)
    s.sendall(bytes([0x02]) + struct.pack(">Q", 1 << 40))  # announces a 1 TiB frame
    assert _closed_by_peer(s)
    good.send(_call(2))
    assert wire.decode(good.recv())[1].call_id == 2


def test_ipc_endpoint_replaces_a_stale_socket_and_refuses_a_live_one(ctx, tmp_path):
    path = tmp_path / "d.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # a file left by a delegate that died: nobody listens
    stale.close()
    d = Delegate(f"ipc://{path}", transport="zmtp").start()
    try:
        s = _sock(ctx, zmq.DEALER, f"ipc://{path}")
        s.send(_call(5))
        assert wire.decode(s.recv())[1].call_id == 5
        with pytest.raises(_TestbedError, match="in use"):
            Delegate(f"ipc://{path}", transport="zmtp").bind()
    finally:
        d.stop()
    assert not path.exists()  # removed on close


def test_multipart_flood_is_cut_in_bounded_memory(raw_delegate):
    """In process: the connection is cut at MAX_BACKLOG and only MAX_PARTS parts were kept."""
    s = rawzmtp.connect(raw_delegate.bound_endpoint)
    part = rawzmtp.frame(b"m" * (1 << 20), more=True)
    sent = 0
    with pytest.raises(OSError):
        for _ in range(200):
            s.sendall(part)
            sent += 1
    s.close()
    assert (MAX_BACKLOG >> 20) - 1 <= sent <= (MAX_BACKLOG >> 20) + 64
    assert raw_delegate._raw.cut == 1


def test_connection_end_frees_identity_and_state(ctx, raw_delegate):
    for _ in range(3):  # the same identity may come back once its connection ended
        s = _sock(ctx, zmq.DEALER, raw_delegate.bound_endpoint, ROUTING_ID=b"again")
        s.send(_call(1))
        assert wire.decode(s.recv())[1].call_id == 1
        s.close()
        deadline = time.monotonic() + 5
        while raw_delegate._raw.connections:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert list(raw_delegate.stats()) == [b"again".hex()]
    assert raw_delegate.stats()[b"again".hex()]["calls"] == 3
