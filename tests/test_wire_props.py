"""Property-based tests of the wire decoder (testbed/core/wire.py), with Hypothesis.

Whatever a peer sends, ``wire.decode`` returns a documented payload or raises
``wire.WireError`` with one of the ``E_*`` codes and a short message: never
another exception (issue 19).  Arbitrary bytes, arbitrary msgpack structures,
valid frames with one field made odd, mutated fixed-width frames, oversize and
deeply nested frames.  Every message kind survives an encode/decode round
trip, and the fixed-width fast path decodes exactly as the general msgpack
path does.

Deterministic (``derandomize=True``, no example database) and bounded
(``max_examples``): the file runs in about 10 s.  Hand-written cases of the
same rules are in tests/test_wire.py.
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from testbed.core import wire

pytestmark = pytest.mark.unit

PROPS = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HEAVY = settings(PROPS, max_examples=100)  # examples of many nested values each
FEW = settings(PROPS, max_examples=40)

U64, I64_MIN, I64_MAX = wire.U64, wire.I64_MIN, wire.I64_MAX
RAISED = {wire.E_MALFORMED, wire.E_VERSION, wire.E_TOO_LARGE, wire.E_UNSUPPORTED}
MAP_KINDS = {
    wire.HELLO: wire.encode_hello,
    wire.WELCOME: wire.encode_welcome,
    wire.BYE: wire.encode_bye,
    wire.STATS: wire.encode_stats,
}
KINDS = [*MAP_KINDS, wire.CALL, wire.RESULT, wire.ERROR]


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _check_payload(kind: str, payload) -> None:
    """What ``decode`` returns is one of the documented payloads, in range."""
    if kind == wire.CALL:
        assert type(payload) is wire.Call
        assert 0 <= payload.call_id <= U64 and 0 <= payload.tid < 1 << 31
        assert 0 <= payload.nr <= 4095 and payload.mode in ("cost", "offload")
        assert len(payload.args) == 6 and all(
            type(a) is int and 0 <= a <= U64 for a in payload.args
        )
        _check_bufs(payload.bufs)
    elif kind == wire.RESULT:
        assert type(payload) is wire.Result
        assert 0 <= payload.call_id <= U64 and I64_MIN <= payload.ret <= I64_MAX
        assert 0 <= payload.errno <= 4095
        stamps = (payload.t_recv, payload.t_exec_start, payload.t_exec_end, payload.t_send)
        assert all(type(t) is int and 0 <= t <= I64_MAX for t in stamps)
        _check_bufs(payload.outbufs)
    elif kind in MAP_KINDS:
        assert type(payload) is dict
    elif kind == wire.ERROR:
        assert type(payload) is wire.WireError
        assert type(payload.code) is str and len(payload.code) <= 32
        assert len(str(payload)) <= wire.MAX_ERROR_TEXT
        assert payload.call_id is None or 0 <= payload.call_id <= U64
    else:
        raise AssertionError(f"decode returned an undocumented kind {kind!r}")


def _check_bufs(bufs) -> None:
    assert type(bufs) is tuple
    for arg, data in bufs:
        assert type(arg) is int and 0 <= arg <= 5 and type(data) is bytes


def decode_checked(frame: bytes):
    """``(kind, payload)``, or the raised ``WireError``; any other exception fails the test."""
    try:
        kind, payload = wire.decode(frame)
    except wire.WireError as exc:
        assert exc.code in RAISED, exc.code
        text = str(exc)
        assert 0 < len(text) <= wire.MAX_ERROR_TEXT, text  # short: it goes back in an ERROR
        assert exc.call_id is None or (type(exc.call_id) is int and 0 <= exc.call_id <= U64)
        return exc
    _check_payload(kind, payload)
    return kind, payload


def refused(frame: bytes, code: str = wire.E_MALFORMED) -> wire.WireError:
    got = decode_checked(frame)
    assert isinstance(got, wire.WireError), f"accepted: {got!r}"
    assert got.code == code, (got.code, str(got))
    return got


# ---------------------------------------------------------------- strategies

u64 = st.integers(0, U64)
i64 = st.integers(I64_MIN, I64_MAX)
stamp = st.integers(0, I64_MAX)
tid = st.integers(0, (1 << 31) - 1)
nr = st.integers(0, 4095)
mode = st.sampled_from(["cost", "offload"])
bufs = st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=64)), max_size=4).map(tuple)
one_buf = st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=64)), max_size=1).map(tuple)
args6 = st.tuples(u64, u64, u64, u64, u64, u64)

calls = st.builds(wire.Call, u64, tid, nr, args6, bufs, mode)
fixed_calls = st.builds(wire.Call, u64, tid, nr, args6, one_buf, mode)  # the fixed layout
results = st.builds(wire.Result, u64, i64, st.integers(0, 4095), stamp, stamp, stamp, stamp, bufs)

# every msgpack value, including what no field accepts (ext types, odd map keys)
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(I64_MIN, U64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
)
key = st.one_of(st.text(max_size=8), st.binary(max_size=8), st.integers(-3, 3), st.none())
values = st.recursive(
    leaf,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(key, inner, max_size=4),
    max_leaves=25,
)
# what msgpack decodes for the wire module (map keys str or bytes, valid ext data)
decodable = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(I64_MIN, U64),
        st.floats(),
        st.text(max_size=12),
        st.binary(max_size=12),
        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    ),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=4)
    ),
    max_leaves=25,
)
# what a map payload carries and gets back unchanged (no NaN: NaN != NaN)
plain_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(I64_MIN, U64),
    st.floats(allow_nan=False),
    st.text(max_size=16),
    st.binary(max_size=16),
)
plain_values = st.recursive(
    plain_leaf,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
info_maps = st.dictionaries(st.text(max_size=12), plain_values, max_size=6)


def not_int_in(lo: int, hi: int):
    """A msgpack value that is not an integer in lo..hi (bools and floats included)."""
    out = [st.none(), st.booleans(), st.floats(), st.text(max_size=4), st.binary(max_size=4),
           st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2),
           st.integers(0, 3), max_size=1)]  # fmt: skip
    if lo > I64_MIN:
        out.append(st.integers(I64_MIN, lo - 1))
    if hi < U64:
        out.append(st.integers(hi + 1, U64))
    return st.one_of(out)


# ---------------------------------------------------------------- any input


@PROPS
@given(st.binary(max_size=600))
def test_arbitrary_bytes_decode_or_raise_a_wire_error(frame):
    decode_checked(frame)


@PROPS
@given(
    st.sampled_from(
        [
            wire._CALL_PREFIX,
            wire._RESULT_PREFIX,
            b"\x92\x02",
            b"\x95\x02\xa5error",
            b"\x93\x02\xa5hello",
            b"\x98\x02\xa4call\xcf",
        ]
    ),
    st.binary(max_size=200),
)
def test_bytes_after_a_valid_prefix_decode_or_raise_a_wire_error(prefix, rest):
    decode_checked(prefix + rest)


@PROPS
@given(values)
def test_arbitrary_msgpack_values_decode_or_raise_a_wire_error(obj):
    decode_checked(_pack(obj))


@HEAVY
@given(
    st.one_of(st.sampled_from([wire.WIRE_VERSION] * 4 + [1, 3, -1]), values),
    st.one_of(st.sampled_from(KINDS), values),
    st.lists(values, max_size=9),
)
def test_arbitrary_items_in_a_version_and_type_frame_decode_or_raise_a_wire_error(v, kind, items):
    decode_checked(_pack([v, kind, *items]))


def _ext(code: int, data: bytes) -> bytes:
    """msgpack bytes of an extension value, any code (msgpack.ExtType only builds 0..127)."""
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    head = bytes([fixed[len(data)]]) if len(data) in fixed else bytes([0xC7, len(data)])
    return head + code.to_bytes(1, "big", signed=True) + data


@PROPS
@given(
    st.integers(-128, 127) | st.just(-1),
    st.binary(max_size=20),
    st.sampled_from(["hello", "mode", "top"]),
)
def test_extension_values_decode_or_raise_a_wire_error(code, data, where):
    """Timestamps (-1) of every length, reserved and application codes."""
    ext = _ext(code, data)
    frame = {
        "hello": b"\x93\x02\xa5hello\x81\xa1t" + ext,
        "mode": b"\x98\x02\xa4call\x01\x01\x01\x96" + b"\x00" * 6 + b"\x90" + ext,
        "top": ext,
    }[where]
    decode_checked(frame)


# ---------------------------------------------------------------- round trips


@PROPS
@given(calls)
def test_every_call_round_trips(call):
    assert wire.decode(wire.encode_call(call)) == (wire.CALL, call)
    general = _pack(
        [wire.WIRE_VERSION, wire.CALL, *call[:4], [list(b) for b in call.bufs], call.mode]
    )
    assert wire.decode(general) == (wire.CALL, call)


@PROPS
@given(results)
def test_every_result_round_trips(res):
    assert wire.decode(wire.encode_result(res)) == (wire.RESULT, res)


@HEAVY
@given(st.sampled_from(sorted(MAP_KINDS)), info_maps)
def test_every_map_message_round_trips(kind, info):
    assert wire.decode(MAP_KINDS[kind](info)) == (kind, info)


@PROPS
@given(st.text(max_size=40), st.text(max_size=260), st.none() | u64)
def test_every_error_round_trips_cut_to_its_bounds(code, message, call_id):
    kind, err = wire.decode(wire.encode_error(code, message, call_id))
    assert kind == wire.ERROR and type(err) is wire.WireError
    assert (err.code, str(err), err.call_id) == (code[:32], message[: wire.MAX_ERROR_TEXT], call_id)


# ---------------------------------------------------------------- the fast path


def _general(frame: bytes):
    """The same message re-packed by msgpack (smallest encodings: the general path)."""
    return decode_checked(_pack(msgpack.unpackb(frame, raw=False, strict_map_key=False)))


@PROPS
@given(st.one_of(fixed_calls.map(wire.encode_call), results.map(wire.encode_result)), st.data())
def test_mutated_fixed_width_frames_decode_as_the_general_path_does(frame, data):
    """Change 1-3 bytes of a fixed-width CALL or RESULT: decode agrees with msgpack."""
    buf = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 3))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf)))]
    frame = bytes(buf)
    got = decode_checked(frame)
    try:
        msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:
        assert isinstance(got, wire.WireError)  # not msgpack at all: refused
        return
    ref = _general(frame)
    if isinstance(got, wire.WireError):
        assert isinstance(ref, wire.WireError), f"fast path refused what msgpack decodes: {ref}"
    else:
        assert _comparable(got) == _comparable(ref)


def _comparable(decoded):
    kind, payload = decoded
    if kind == wire.ERROR:  # a WireError compares by identity
        return kind, payload.code, str(payload), payload.call_id
    return repr(decoded)  # NaN != NaN, its repr is equal


# ---------------------------------------------------------------- odd fields


def _call_items(call: wire.Call) -> list:
    return [wire.WIRE_VERSION, wire.CALL, *call[:4], [list(b) for b in call.bufs], call.mode]


def _result_items(res: wire.Result) -> list:
    return [wire.WIRE_VERSION, wire.RESULT, res.call_id, res.ret, res.errno, list(res[3:7]),
            [list(b) for b in res.outbufs]]  # fmt: skip


CALL_ODD = {
    2: not_int_in(0, U64),
    3: not_int_in(0, (1 << 31) - 1),
    4: not_int_in(0, 4095),
    5: st.one_of(
        st.lists(st.integers(0, 9), max_size=9).filter(lambda a: len(a) != 6),
        st.lists(not_int_in(0, U64), min_size=1, max_size=1).map(lambda odd: [0] * 5 + odd),
        not_int_in(0, 0).filter(lambda v: not isinstance(v, list)),
    ),
    6: st.one_of(
        st.lists(
            st.one_of(
                not_int_in(0, 5).map(lambda a: [a, b"x"]),
                st.integers(0, 5).map(lambda a: [a, "text"]),
                st.lists(st.integers(0, 5), max_size=3).filter(lambda e: len(e) != 2),
                st.integers(I64_MIN, U64),
            ),
            min_size=1,
            max_size=2,
        ),
        st.one_of(st.none(), st.text(max_size=3), st.binary(max_size=3), st.integers(I64_MIN, U64)),
    ),
    7: decodable.filter(lambda m: m not in ("cost", "offload")),
}


@PROPS
@given(calls, st.data())
def test_a_call_with_one_odd_field_is_refused_keeping_its_id(call, data):
    items = _call_items(call)
    field = data.draw(st.sampled_from(sorted(CALL_ODD)))
    items[field] = data.draw(CALL_ODD[field])
    err = refused(_pack(items))
    assert err.call_id == (None if field == 2 else call.call_id)


RESULT_ODD = {
    2: not_int_in(0, U64),
    3: not_int_in(I64_MIN, I64_MAX),
    4: not_int_in(0, 4095),
    5: st.one_of(
        st.lists(st.integers(0, 9), max_size=6).filter(lambda a: len(a) != 4),
        st.lists(not_int_in(0, I64_MAX), min_size=1, max_size=1).map(lambda odd: [0] * 3 + odd),
        not_int_in(0, 0).filter(lambda v: not isinstance(v, list)),
    ),
    6: st.one_of(
        st.lists(st.integers(6, 9).map(lambda a: [a, b"x"]), min_size=1, max_size=2),
        st.one_of(
            st.none(),
            st.text(max_size=3),
            st.integers(I64_MIN, U64),
            st.dictionaries(st.text(max_size=2), st.integers(0, 9), min_size=1, max_size=1),
        ),
    ),
}


@PROPS
@given(results, st.data())
def test_a_result_with_one_odd_field_is_refused_keeping_its_id(res, data):
    items = _result_items(res)
    field = data.draw(st.sampled_from(sorted(RESULT_ODD)))
    items[field] = data.draw(RESULT_ODD[field])
    err = refused(_pack(items))
    assert err.call_id == (None if field == 2 else res.call_id)


@HEAVY
@given(st.sampled_from(KINDS), st.integers(0, 9), st.data())
def test_wrong_arity_is_malformed(kind, n, data):
    arity = {wire.CALL: 8, wire.RESULT: 7, wire.ERROR: 5, **dict.fromkeys(MAP_KINDS, 3)}[kind]
    assume(n + 2 != arity)
    refused(_pack([wire.WIRE_VERSION, kind, *data.draw(st.lists(values, min_size=n, max_size=n))]))


@HEAVY
@given(st.sampled_from(sorted(MAP_KINDS)), values.filter(lambda v: not isinstance(v, dict)))
def test_a_map_message_without_a_map_is_malformed(kind, payload):
    refused(_pack([wire.WIRE_VERSION, kind, payload]))


@PROPS
@given(
    st.dictionaries(
        st.integers(I64_MIN, U64) | st.none() | st.booleans() | st.floats(allow_nan=False),
        plain_leaf,
        min_size=1,
        max_size=3,
    )
)
def test_map_keys_other_than_strings_are_malformed(info):
    refused(wire.encode_hello(info))


@PROPS
@given(
    st.one_of(
        st.text(min_size=33, max_size=60), not_int_in(0, 0).filter(lambda v: type(v) is not str)
    ),
    st.one_of(
        st.text(min_size=wire.MAX_ERROR_TEXT + 1, max_size=400),
        not_int_in(0, 0).filter(lambda v: type(v) is not str),
    ),  # fmt: skip
    st.integers(0, 1),
)
def test_an_error_frame_with_odd_code_or_text_is_malformed(code, message, which):
    items = [wire.WIRE_VERSION, wire.ERROR, 1, "code", "text"]
    items[3 + which] = (code, message)[which]
    refused(_pack(items))


@PROPS
@given(st.integers(I64_MIN, U64).filter(lambda v: v != wire.WIRE_VERSION), decodable)
def test_another_version_is_refused_before_anything_else(version, rest):
    refused(_pack([version, wire.CALL, rest]), wire.E_VERSION)


@PROPS
@given(values.filter(lambda v: type(v) is not int), st.sampled_from(KINDS))
def test_a_version_that_is_no_integer_is_malformed(version, kind):
    refused(_pack([version, kind, {}]))


@PROPS
@given(st.text(max_size=20).filter(lambda k: k not in KINDS))
def test_an_unknown_type_is_unsupported(kind):
    refused(_pack([wire.WIRE_VERSION, kind, {}]), wire.E_UNSUPPORTED)


@PROPS
@given(values.filter(lambda v: type(v) is not str))
def test_a_type_that_is_no_string_is_malformed(kind):
    refused(_pack([wire.WIRE_VERSION, kind, {}]))


@PROPS
@given(fixed_calls, st.integers(1 << 31, (1 << 32) - 1) | st.just(None), st.integers(4096, 65535))
def test_what_the_fixed_layout_could_carry_beyond_the_ranges_is_refused(call, big_tid, big_nr):
    """The fixed layout's fields are wider than the ranges (tid uint32, nr uint16)."""
    odd = call._replace(tid=big_tid) if big_tid is not None else call._replace(nr=big_nr)
    assert refused(wire.encode_call(odd)).call_id == call.call_id


@PROPS
@given(results, st.integers(4096, 65535) | st.just(None), st.integers(I64_MAX + 1, U64))
def test_what_a_fixed_result_could_carry_beyond_the_ranges_is_refused(res, big_errno, big_stamp):
    if big_errno is not None:
        odd = res._replace(errno=big_errno, outbufs=())
    else:
        odd = res._replace(t_send=big_stamp, outbufs=())
    assert refused(wire.encode_result(odd)).call_id == res.call_id


# ---------------------------------------------------------------- oversize, deep


@FEW
@given(
    st.integers(1, 64),
    st.sampled_from([b"", wire._CALL_PREFIX, wire._RESULT_PREFIX, b"\x98\x02"]),
    st.integers(0, 255),
)
def test_frames_beyond_the_maximum_are_too_large(extra, prefix, fill):
    frame = prefix + bytes([fill]) * (wire.MAX_FRAME + extra - len(prefix))
    refused(frame, wire.E_TOO_LARGE)


@FEW
@given(st.integers(0, 5), mode, st.integers(0, 40))
def test_a_valid_call_beyond_the_maximum_is_too_large(arg, mode, extra):
    empty = len(wire.encode_call(wire.Call(1, 1, 1, (0,) * 6, ((arg, b""),), mode)))
    data = b"d" * (wire.MAX_FRAME - empty + 1 + extra)
    frame = wire.encode_call(wire.Call(1, 1, 1, (0,) * 6, ((arg, data),), mode))
    assert len(frame) == wire.MAX_FRAME + 1 + extra
    refused(frame, wire.E_TOO_LARGE)


def _nest(depth: int, inner=0) -> bytes:
    """msgpack bytes of ``inner`` inside ``depth`` one-element arrays."""
    return b"\x91" * depth + _pack(inner)


def _frame_with(position: str, nested: bytes) -> bytes:
    """A frame carrying ``nested`` (msgpack bytes) at one position, valid elsewhere."""
    call = b"\x98\x02\xa4call"  # [2, "call", id, tid, nr, args, bufs, mode]
    ids, args, cost = b"\x01\x01\x01", b"\x96" + b"\x00" * 6, b"\xa4cost"
    return {
        "top": nested,
        "version": b"\x93" + nested + b"\xa5hello\x80",
        "type": b"\x93\x02" + nested + b"\x80",
        "hello": b"\x93\x02\xa5hello\x81\xa1k" + nested,
        "call_id": call + nested + b"\x01\x01" + args + b"\x90" + cost,
        "call_args": call + ids + b"\x96" + nested + b"\x00" * 5 + b"\x90" + cost,
        "call_bufs": call + ids + args + b"\x91\x92\x01" + nested + cost,
        "result_stamps": b"\x97\x02\xa6result\x01\x00\x00\x94" + nested + b"\x00" * 3 + b"\x90",
        "error_code": b"\x95\x02\xa5error\x01" + nested + b"\xa1m",
    }[position]


POSITIONS = ["top", "version", "type", "hello", "call_id", "call_args", "call_bufs",
             "result_stamps", "error_code"]  # fmt: skip


@PROPS
@given(st.sampled_from(POSITIONS), st.integers(0, 1100) | st.sampled_from([1022, 1023, 1024, 1025]))
def test_deep_nesting_anywhere_decodes_or_raises_a_wire_error(position, depth):
    decode_checked(_frame_with(position, _nest(depth)))


#: A CALL whose mode is a value nested about 1000 arrays deep: ``wire.short``
#: once repr'd it whole for the message and Python's repr recursion limit
#: raised RecursionError, not WireError (msgpack accepts nesting up to 1024).
def _call_with_deep_mode(depth: int) -> bytes:
    return (b"\x98\x02\xa4call\x01\x01\x01\x96" + b"\x00" * 6 + b"\x90") + _nest(depth, "x")


@pytest.mark.parametrize(
    "depth",
    [
        1,
        100,
        500,
        1000,
        1020,
        1030,  # beyond msgpack's own limit: "not a msgpack frame: StackError"
        5000,
    ],
)
def test_a_deeply_nested_call_mode_is_a_wire_error(depth):
    """Plain pytest, not Hypothesis: Hypothesis raises the recursion limit while it runs a test."""
    assert len(str(refused(_call_with_deep_mode(depth)))) <= 80
