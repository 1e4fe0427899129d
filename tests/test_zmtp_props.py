"""Property-based tests (Hypothesis) of ZMTP framing and of the raw router.

* :func:`testbed.core.zmtp.frame_head` and :func:`testbed.core.zmtp.frame`: any frame
  round-trips, whatever the split points; any byte string is parsed without
  an exception.
* :class:`testbed.delegate.router.Router` behind a real raw-ZMTP ``Delegate`` on a real
  loopback socket: arbitrary byte streams, split at arbitrary points and
  interleaved with valid messages, never raise in the serving thread; a good
  client on another connection is always answered; the memory held stays
  within the bound the limits give and returns to nothing once the attacker
  is gone; a valid stream is answered completely and in order.

Deterministic (``derandomize=True``, no example database) and bounded so the
file runs in well under 30 s.
"""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.core import wire, zmtp
from testbed.delegate import router
from testbed.delegate.daemon import Delegate
from tests import rawzmtp

SETTINGS = {
    "derandomize": True,
    "database": None,
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}

# ------------------------------------------------ the frame parser


@pytest.mark.unit
@settings(max_examples=300, **SETTINGS)
@given(
    bodies=st.lists(st.tuples(st.binary(max_size=600), st.booleans()), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=10),
)
def test_frames_round_trip_through_frame_head_whatever_the_split(bodies, cuts):
    stream = b"".join(zmtp.frame(body, more) for body, more in bodies)
    for body, more in bodies:
        flags, size, head = zmtp.frame_head(zmtp.frame(body, more), 0, len(zmtp.frame(body, more)))
        assert (size, bool(flags & 0x01), head) == (len(body), more, 2 if len(body) <= 255 else 9)
    # parse incrementally as the router does: carry what is incomplete to the next piece
    got, carry = [], bytearray()
    edges = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for a, b in zip(edges, edges[1:], strict=False):
        carry += stream[a:b]
        pos = 0
        while (fh := zmtp.frame_head(carry, pos, len(carry))) is not None:
            flags, size, head = fh
            if len(carry) - pos < head + size:
                break
            got.append((bytes(carry[pos + head : pos + head + size]), bool(flags & 0x01)))
            pos += head + size
        del carry[:pos]
    assert got == bodies and not carry


@pytest.mark.unit
@settings(max_examples=300, **SETTINGS)
@given(buf=st.binary(max_size=40), pos=st.integers(min_value=0, max_value=40))
def test_frame_head_never_fails_on_any_bytes(buf, pos):
    pos = min(pos, len(buf))
    fh = zmtp.frame_head(buf, pos, len(buf))
    if fh is None:
        assert len(buf) - pos < 2 or (buf[pos] & 0x02 and len(buf) - pos < 9)
    else:
        flags, size, head = fh
        assert flags == buf[pos] and head in (2, 9) and size >= 0
        assert head == (9 if flags & 0x02 else 2)


# ------------------------------------------------ the router


MAX_FRAME = 4096
OUT_MAX = 64 << 10
#: What one connection can make the router hold with these limits: one read
#: carried, a frame being read, three kept parts, the out buffer (and a reply).
BOUND = router.READ + 4 * (MAX_FRAME + 9 + router.PART_OVERHEAD) + OUT_MAX + 4096


@pytest.fixture(scope="module")
def served():
    d = Delegate("tcp://127.0.0.1:*", transport="zmtp")
    d.bind()
    r = d._raw
    r.max_frame, r.max_backlog, r.out_max = MAX_FRAME, 16 << 10, OUT_MAX
    r.peer_memory_max, r.global_memory_max = 48 << 10, 1 << 20
    r._log = lambda line, kind="": None  # (thousands of refusals: keep the output clean)
    d.start()
    good = rawzmtp.connect(d.bound_endpoint)
    good.settimeout(10)
    yield d, good
    good.close()
    d.stop()


def _call(i: int) -> bytes:
    return wire.encode_call(wire.Call(i, 1, 1, (0,) * 6, (), "cost"))


def _answered(good: socket.socket, i: int) -> bool:
    good.sendall(zmtp.frame(_call(i)))
    kind, res = wire.decode(zmtp.read_message(good)[-1])
    return kind == wire.RESULT and res.call_id == i


HELLO = zmtp.GREETING + zmtp.ready_command(b"DEALER")

pieces = st.one_of(
    st.binary(max_size=300),  # anything
    st.integers(0, 1000).map(lambda i: zmtp.frame(_call(i))),  # a valid call
    st.binary(max_size=300).map(zmtp.frame),  # a message of any content
    st.binary(max_size=300).map(lambda b: zmtp.frame(b, more=True)),  # a part
    st.binary(max_size=20).map(rawzmtp.ping),
    st.just(zmtp.ready_command(b"DEALER")),  # a second READY
    st.binary(min_size=1, max_size=40).map(lambda b: bytes([0x04, len(b)]) + b),  # a command
    st.integers(0, (1 << 64) - 1).map(lambda n: b"\x02" + struct.pack(">Q", n)),  # a long header
    st.integers(0, 255).map(lambda k: bytes([0x01, 0]) * k),  # empty parts
)
starts = st.one_of(
    st.just(HELLO),
    st.binary(max_size=80),
    st.tuples(st.integers(0, len(HELLO) - 1), st.integers(0, 255)).map(
        lambda p: HELLO[: p[0]] + bytes([p[1]]) + HELLO[p[0] + 1 :]
    ),  # the greeting or READY with one byte changed
)


def _send_split(s: socket.socket, stream: bytes, cuts: list[int]) -> None:
    edges = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    try:
        for a, b in zip(edges, edges[1:], strict=False):
            s.sendall(stream[a:b])
    except OSError:
        pass  # cut by the router: allowed


def _settled(d: Delegate) -> bool:
    deadline = time.monotonic() + 10
    while d._raw.connections > 1 or d._raw.held:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


@settings(max_examples=150, **SETTINGS)
@given(
    start=starts,
    body=st.lists(pieces, max_size=12),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=8),
)
def test_any_byte_stream_leaves_the_router_serving_in_bounded_memory(served, start, body, cuts):
    d, good = served
    r = d._raw
    r.peak_held = 0
    s = rawzmtp.silent(d.bound_endpoint)
    s.settimeout(10)
    _send_split(s, start + b"".join(body), cuts)
    assert _answered(good, len(body))  # the good client is served meanwhile
    s.close()
    assert _settled(d), (r.connections, r.held)  # everything of the attacker is freed
    assert d._thread.is_alive() and d._error is None
    assert r.peak_held <= BOUND, r.peak_held


@settings(max_examples=60, **SETTINGS)
@given(
    ids=st.lists(st.integers(0, 1 << 32), min_size=1, max_size=60),
    cuts=st.lists(st.integers(0, 1 << 16), max_size=20),
    pings=st.lists(st.integers(0, 59), max_size=5),
)
def test_a_valid_stream_is_answered_in_order_whatever_the_split(served, ids, cuts, pings):
    d, good = served
    frames = [zmtp.frame(_call(i)) for i in ids]
    for k in sorted(pings, reverse=True):  # PINGs between messages change nothing
        frames.insert(min(k, len(frames)), rawzmtp.ping(b"x"))
    s = rawzmtp.connect(d.bound_endpoint)
    s.settimeout(10)
    _send_split(s, b"".join(frames), cuts)
    got = [wire.decode(zmtp.read_message(s)[-1])[1].call_id for _ in ids]
    s.close()
    assert got == ids
    assert _answered(good, 1)
    assert _settled(d)
    assert d._thread.is_alive() and d._error is None
