"""The wire protocol (testbed/core/wire.py): round trips and every rejection path."""

from __future__ import annotations

import msgpack
import pytest

from testbed.core import wire

pytestmark = pytest.mark.unit

U64 = (1 << 64) - 1


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def call_frame(**over) -> list:
    """A valid CALL frame as a list, with items overridden by name."""
    items = {
        "version": wire.WIRE_VERSION,
        "type": wire.CALL,
        "id": 7,
        "tid": 4242,
        "nr": 1,
        "args": [1, 0x7FFF0000, 3, 0, 0, 0],
        "bufs": [[1, b"abc"]],
        "mode": "cost",
    }
    items.update(over)
    return list(items.values())


def result_frame(**over) -> list:
    items = {
        "version": wire.WIRE_VERSION,
        "type": wire.RESULT,
        "id": 7,
        "ret": 3,
        "errno": 0,
        "stamps": [10, 20, 30, 40],
        "outbufs": [],
    }
    items.update(over)
    return list(items.values())


def rejects(frame: bytes, code: str) -> wire.WireError:
    with pytest.raises(wire.WireError) as info:
        wire.decode(frame)
    assert info.value.code == code, str(info.value)
    return info.value


# ---------------------------------------------------------------- round trips


def test_call_round_trip_keeps_every_field():
    call = wire.Call(
        call_id=U64,
        tid=(1 << 31) - 1,
        nr=435,
        args=(0, 1, U64, 1 << 63, 42, 7),
        bufs=((1, b"\x00\xffdata"), (4, b"")),
        mode="offload",
    )
    kind, back = wire.decode(wire.encode_call(call))
    assert kind == wire.CALL
    assert back == call
    assert isinstance(back, wire.Call)


def test_call_carries_input_bytes_so_message_size_is_realistic():
    small = wire.encode_call(wire.Call(1, 1, 1, (1, 0, 4, 0, 0, 0), ((1, b"x" * 4),), "cost"))
    big = wire.encode_call(wire.Call(1, 1, 1, (1, 0, 65536, 0, 0, 0), ((1, b"x" * 65536),), "cost"))
    assert len(big) - len(small) >= 65536 - 4


def test_result_round_trip_keeps_timestamps_and_negative_ret():
    res = wire.Result(9, -1, 2, 100, 200, 300, 400, ((1, b"out"),))
    kind, back = wire.decode(wire.encode_result(res))
    assert kind == wire.RESULT
    assert back == res
    assert (back.t_recv, back.t_exec_start, back.t_exec_end, back.t_send) == (100, 200, 300, 400)


@pytest.mark.parametrize(
    "encode, kind",
    [
        (wire.encode_hello, wire.HELLO),
        (wire.encode_welcome, wire.WELCOME),
        (wire.encode_bye, wire.BYE),
    ],
)
def test_map_messages_round_trip(encode, kind):
    info = {"host": "node1", "pid": 123, "delay_us": 2.5, "nested": {"a": [1, 2]}}
    got_kind, back = wire.decode(encode(info))
    assert got_kind == kind
    assert back == info


@pytest.mark.parametrize("call_id", [5, None])
def test_error_round_trip(call_id):
    kind, err = wire.decode(wire.encode_error(wire.E_UNSUPPORTED, "no offload", call_id))
    assert kind == wire.ERROR
    assert isinstance(err, wire.WireError)
    assert (err.code, str(err), err.call_id) == (wire.E_UNSUPPORTED, "no offload", call_id)


def test_every_frame_starts_with_version_and_type():
    frames = [
        wire.encode_hello({}),
        wire.encode_welcome({}),
        wire.encode_bye({}),
        wire.encode_call(wire.Call(1, 1, 0, (0,) * 6, (), "cost")),
        wire.encode_result(wire.Result(1, 0, 0, 1, 2, 3, 4, ())),
        wire.encode_error(wire.E_INTERNAL, "x"),
    ]
    kinds = [msgpack.unpackb(f)[:2] for f in frames]
    assert [k[0] for k in kinds] == [wire.WIRE_VERSION] * 6
    assert [k[1] for k in kinds] == ["hello", "welcome", "bye", "call", "result", "error"]


# ---------------------------------------------------------------- rejections


@pytest.mark.parametrize("version", [0, 1, 3, 99, -1])
def test_unknown_version_is_rejected_with_version_code(version):
    err = rejects(pack(call_frame(version=version)), wire.E_VERSION)
    assert str(version) in str(err)


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_non_integer_version_is_malformed(version):
    rejects(pack([version, "hello", {}]), wire.E_MALFORMED)


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\xc1\xc1\xc1", b"GET / HTTP/1.1\r\n\r\n"],
    ids=["empty", "reserved-byte", "garbage", "http"],
)
def test_non_msgpack_is_malformed(frame):
    rejects(frame, wire.E_MALFORMED)


def test_every_truncation_of_a_call_is_rejected():
    frame = wire.encode_call(wire.Call(3, 10, 1, (1, 2, 3, 4, 5, 6), ((1, b"payload"),), "cost"))
    for cut in range(len(frame)):
        with pytest.raises(wire.WireError) as info:
            wire.decode(frame[:cut])
        assert info.value.code == wire.E_MALFORMED


def test_trailing_bytes_are_rejected():
    rejects(wire.encode_hello({}) + b"\x00", wire.E_MALFORMED)


@pytest.mark.parametrize("obj", [{"v": 1}, 1, "call", [], [1]], ids=str)
def test_not_an_array_of_version_and_type(obj):
    rejects(pack(obj), wire.E_MALFORMED)


def test_type_not_a_string_is_malformed():
    rejects(pack([wire.WIRE_VERSION, 3, {}]), wire.E_MALFORMED)


def test_unknown_type_is_unsupported():
    rejects(pack([wire.WIRE_VERSION, "teleport", {}]), wire.E_UNSUPPORTED)


def test_oversized_frame_is_too_large():
    frame = wire.encode_hello({"pad": b"x" * wire.MAX_FRAME})
    assert len(frame) > wire.MAX_FRAME
    rejects(frame, wire.E_TOO_LARGE)


def test_frame_of_exactly_max_size_is_accepted():
    probe = 70_000  # above 64 KiB the bin header size no longer depends on the length
    overhead = len(wire.encode_hello({"pad": b"x" * probe})) - probe
    frame = wire.encode_hello({"pad": b"x" * (wire.MAX_FRAME - overhead)})
    assert len(frame) == wire.MAX_FRAME
    assert wire.decode(frame)[0] == wire.HELLO


@pytest.mark.parametrize("n", [2, 3, 7, 9])
def test_call_wrong_arity(n):
    frame = call_frame()
    frame = frame[:n] if n < 8 else frame + [0] * (n - 8)
    err = rejects(pack(frame), wire.E_MALFORMED)
    # the call id is recovered whenever it is present, so the client can match the error
    assert err.call_id == (7 if n > 2 else None)


@pytest.mark.parametrize("kind", ["hello", "welcome", "bye"])
def test_map_message_wrong_arity_or_payload(kind):
    rejects(pack([wire.WIRE_VERSION, kind]), wire.E_MALFORMED)
    rejects(pack([wire.WIRE_VERSION, kind, {}, {}]), wire.E_MALFORMED)
    rejects(pack([wire.WIRE_VERSION, kind, [1, 2]]), wire.E_MALFORMED)


def test_error_frame_wrong_arity_or_types():
    rejects(pack([wire.WIRE_VERSION, "error", 1, "malformed"]), wire.E_MALFORMED)
    rejects(pack([wire.WIRE_VERSION, "error", 1, 5, "text"]), wire.E_MALFORMED)


def test_result_wrong_arity():
    rejects(pack(result_frame()[:6]), wire.E_MALFORMED)
    rejects(pack(result_frame() + [0]), wire.E_MALFORMED)


@pytest.mark.parametrize(
    "over",
    [
        {"id": -1},
        {"id": "7"},
        {"id": True},
        {"tid": -1},
        {"tid": 1 << 31},
        {"nr": -1},
        {"nr": 4096},
        {"nr": 1.0},
        {"args": [0, 0, 0, 0, 0, -1]},
        {"args": [0, 0, 0, 0, 0, 1.5]},
        {"args": [0, 0, 0, 0, 0]},
        {"args": [0] * 7},
        {"args": [0, 0, 0, 0, 0, "0"]},
        {"args": [0, 0, 0, 0, 0, False]},
        {"mode": "turbo"},
        {"mode": None},
    ],
    ids=lambda o: "-".join(f"{k}={v!r}"[:30] for k, v in o.items()),
)
def test_call_out_of_range_or_wrong_type(over):
    # (integers beyond 64 bits cannot be encoded in msgpack at all)
    err = rejects(pack(call_frame(**over)), wire.E_MALFORMED)
    if "id" not in over:
        assert err.call_id == 7  # recoverable: the delegate can answer with it


@pytest.mark.parametrize(
    "bufs",
    [
        "not-a-list",
        [[1]],
        [[1, b"x", 2]],
        [[6, b"x"]],
        [[-1, b"x"]],
        [[1, "text-not-bytes"]],
        [[True, b"x"]],
        [(1, b"x"), 5],
    ],
    ids=str,
)
def test_call_bad_buffer_entries(bufs):
    err = rejects(pack(call_frame(bufs=bufs)), wire.E_MALFORMED)
    assert err.call_id == 7


@pytest.mark.parametrize(
    "over",
    [
        {"ret": 1.5},
        {"ret": None},
        {"errno": -1},
        {"errno": 4096},
        {"stamps": [1, 2, 3]},
        {"stamps": [1, 2, 3, -4]},
        {"stamps": [1, 2, 3, 4.0]},
        {"stamps": "1234"},
        {"outbufs": [[9, b"x"]]},
    ],
    ids=lambda o: "-".join(f"{k}={v!r}"[:30] for k, v in o.items()),
)
def test_result_out_of_range(over):
    rejects(pack(result_frame(**over)), wire.E_MALFORMED)


def test_result_extreme_values_accepted():
    top = (1 << 63) - 1  # the run directory's signed 64-bit fields hold every accepted value
    kind, res = wire.decode(pack(result_frame(ret=-(1 << 63), errno=4095, stamps=[0, 0, top, top])))
    assert kind == wire.RESULT
    assert (res.ret, res.errno, res.t_send) == (-(1 << 63), 4095, top)
    kind, res = wire.decode(pack(result_frame(ret=top)))
    assert res.ret == top


@pytest.mark.parametrize(
    "over",
    [{"ret": 1 << 63}, {"ret": U64}, {"stamps": [0, 0, 0, 1 << 63]}, {"stamps": [U64, 1, 2, 3]}],
    ids=["ret=2**63", "ret=2**64-1", "t_send=2**63", "t_recv=2**64-1"],
)
def test_result_beyond_signed_64_bit_is_refused_with_its_call_id(over):
    # v1 accepted these and the relay crashed recording them (issue 11, defect 5)
    err = rejects(pack(result_frame(**over)), wire.E_MALFORMED)
    assert err.call_id == 7


def test_error_text_is_bounded_both_ways():
    frame = wire.encode_error(wire.E_MALFORMED, "x" * 100_000, 3)
    assert len(frame) < wire.MAX_ERROR_TEXT + 64
    kind, err = wire.decode(frame)
    assert (kind, err.call_id, len(str(err))) == (wire.ERROR, 3, wire.MAX_ERROR_TEXT)
    rejects(pack([wire.WIRE_VERSION, "error", 1, "malformed", "y" * 1000]), wire.E_MALFORMED)


@pytest.mark.parametrize("field", ["type", "mode"])
def test_rejections_never_echo_a_big_peer_string(field):
    big = "\u20ac" * 1_000_000  # 3 MB of UTF-8, 6 MB as repr escapes
    frame = pack(call_frame(mode=big) if field == "mode" else [wire.WIRE_VERSION, big, {}])
    err = rejects(frame, wire.E_MALFORMED if field == "mode" else wire.E_UNSUPPORTED)
    assert len(str(err)) < 100


def test_map_keys_must_be_strings_or_bytes():
    # strict_map_key: integer keys (a cheap way to bloat a parser) are refused
    rejects(pack([wire.WIRE_VERSION, "hello", {1: "x"}]), wire.E_MALFORMED)


def test_wire_error_keeps_code_and_call_id():
    err = wire.WireError(wire.E_TOO_LARGE, "big", 12)
    assert (err.code, err.call_id, str(err)) == (wire.E_TOO_LARGE, 12, "big")


def test_fixed_width_frames_are_plain_msgpack_and_decode_like_the_general_path():
    import msgpack

    calls = [
        wire.Call(1, 123, 1, (3, 1 << 40, 64, 0, 0, 0), ((1, b"x" * 64),), "cost"),
        wire.Call(wire.U64, (1 << 31) - 1, 4095, (wire.U64,) * 6, ((5, b""),), "offload"),
        wire.Call(0, 0, 0, (0,) * 6, (), "cost"),
    ]
    for call in calls:
        frame = wire.encode_call(call)
        assert frame.startswith(b"\x98\x02\xa4call\xcf")  # the fixed-width layout
        general = msgpack.packb([2, "call", call.call_id, call.tid, call.nr, list(call.args),
                                 [list(b) for b in call.bufs], call.mode], use_bin_type=True)  # fmt: skip
        assert msgpack.unpackb(frame) == msgpack.unpackb(general)
        assert wire.decode(frame) == wire.decode(general) == (wire.CALL, call)
    res = wire.Result(7, -5, 4095, 1, 2, 3, wire.I64_MAX, ())
    frame = wire.encode_result(res)
    assert len(frame) == 68 and wire.decode(frame) == (wire.RESULT, res)
    assert msgpack.unpackb(frame) == [2, "result", 7, -5, 4095, [1, 2, 3, wire.I64_MAX], []]
    # a fixed-width frame with a value out of range is refused like any other
    over = frame[:-9] + b"\xff" * 8 + frame[-1:]
    assert msgpack.unpackb(over)[5][3] > wire.I64_MAX
    with pytest.raises(wire.WireError, match="timestamps"):
        wire.decode(over)
    # out of the fixed layout's ranges: the general encoding, same refusal as before
    neg = wire.encode_call(wire.Call(1, -1, 1, (0,) * 6, (), "cost"))
    assert not neg.startswith(b"\x98\x02\xa4call\xcf")
    with pytest.raises(wire.WireError, match="tid/nr"):
        wire.decode(neg)
