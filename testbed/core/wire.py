"""The relay <-> delegate wire protocol: msgpack frames over ZeroMQ.

Every message is one ZeroMQ frame holding one msgpack array whose first two
items are the protocol version and the message type.  Documented in
``docs/wire.md``; this module is the only Python code that builds or parses
frames (``data/fastpath.c`` mirrors the fixed-width CALL and RESULT in C).

Changelog of ``WIRE_VERSION``:
  1 - hello/welcome, call/result, error, bye (2026-11).
  2 - ranges agree with the run directory's signed 64-bit records: ``ret`` is
      -2**63 .. 2**63-1 and the four delegate timestamps 0 .. 2**63-1 (v1
      allowed up to 2**64-1, which a relay could not record); an ``error``
      message is at most ``MAX_ERROR_TEXT`` characters (2026-12).
  2 (addition) - optional ``stats`` request/reply (a map both ways; the reply
      carries its own ``stats_version``, see ``testbed.core.cpus``).  A delegate
      that predates it answers ``unsupported``, which the relay records (2026-12).
"""

from __future__ import annotations

import reprlib
import struct
from operator import itemgetter
from typing import Any, NamedTuple

import msgpack

WIRE_VERSION = 2

#: Largest frame either side accepts (input buffers are capped well below).
MAX_FRAME = 4 << 20

HELLO = "hello"
WELCOME = "welcome"
CALL = "call"
RESULT = "result"
ERROR = "error"
BYE = "bye"
STATS = "stats"

#: Error codes carried by ERROR frames.
E_MALFORMED = "malformed"
E_VERSION = "version"
E_TOO_LARGE = "too-large"
E_UNSUPPORTED = "unsupported"
E_INTERNAL = "internal"

U64 = (1 << 64) - 1
I64_MIN = -(1 << 63)
I64_MAX = (1 << 63) - 1

#: Longest text an ERROR frame carries (longer text is cut by ``encode_error``
#: and refused by ``decode``), so an error reply is small whatever provoked it.
MAX_ERROR_TEXT = 200


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3  # a peer's value nested 1000 deep must not recurse (RecursionError)
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 60


def short(value: Any, limit: int = 40) -> str:
    """A bounded printable form of a value taken from a peer (never echo it whole)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WireError(Exception):
    """A frame that cannot be accepted; ``code`` is one of the ``E_*`` codes."""

    def __init__(self, code: str, message: str, call_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.call_id = call_id


class Call(NamedTuple):
    """A forwarded system call as it travels to the delegate."""

    call_id: int
    tid: int
    nr: int
    args: tuple[int, int, int, int, int, int]
    bufs: tuple[tuple[int, bytes], ...]  # (argument index, input bytes)
    mode: str  # "cost" or "offload"


class Result(NamedTuple):
    """The delegate's answer, with its four timestamps (delegate clock, ns)."""

    call_id: int
    ret: int
    errno: int
    t_recv: int
    t_exec_start: int
    t_exec_end: int
    t_send: int
    outbufs: tuple[tuple[int, bytes], ...]


_packb = msgpack.Packer(use_bin_type=True).pack

# Fixed-width layouts of CALL and RESULT (the hot path).  They are plain msgpack
# (every integer as a full-width uint64/int64/uint32/uint16, buffers as bin32),
# so any msgpack reader decodes them; this module packs them with ``struct`` and
# parses a frame of exactly this layout back with ``struct`` (several µs less
# per frame than msgpack plus type checks).  Frames in any other well-formed
# msgpack encoding take the general path and decode to the same values.
_CALL_PREFIX = b"\x98\x02\xa4call"
_CALL_FIX = struct.Struct(">7sBQBIBHB" + "BQ" * 6 + "B")  # prefix .. args, bufs array header
_CALL_MARKS = (0xCF, 0xCE, 0xCD, 0x96, *(0xCF,) * 6)
_call_marks = itemgetter(1, 3, 5, 7, 8, 10, 12, 14, 16, 18)
_BUF_HEAD = struct.Struct(">BBBI")  # fixarray 2, arg (fixint), bin32, length
_MODE_BYTES = {"cost": b"\xa4cost", "offload": b"\xa7offload"}
_RESULT_PREFIX = b"\x97\x02\xa6result"
_RESULT_FIX = struct.Struct(">9sBQBqBHB" + "BQ" * 4 + "B")
_RESULT_MARKS = (0xCF, 0xD3, 0xCD, 0x94, *(0xCF,) * 4, 0x90)
_result_marks = itemgetter(1, 3, 5, 7, 8, 10, 12, 14, 16)


def _unpack(frame: bytes) -> list:
    if len(frame) > MAX_FRAME:
        raise WireError(E_TOO_LARGE, f"frame of {len(frame)} bytes exceeds {MAX_FRAME}")
    try:
        msg = msgpack.unpackb(frame, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(E_MALFORMED, f"not a msgpack frame: {exc.__class__.__name__}") from None
    if not isinstance(msg, list) or len(msg) < 2:
        raise WireError(E_MALFORMED, "frame is not an array [version, type, ...]")
    version, kind = msg[0], msg[1]
    if not isinstance(version, int) or isinstance(version, bool):
        raise WireError(E_MALFORMED, "version is not an integer")
    if version != WIRE_VERSION:
        raise WireError(E_VERSION, f"wire version {version} not supported (this is {WIRE_VERSION})")
    if not isinstance(kind, str):
        raise WireError(E_MALFORMED, "message type is not a string")
    return msg


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi  # msgpack yields exact ints; bool is rejected


def _check_bufs(bufs: Any, call_id: int | None) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(bufs, list):
        raise WireError(E_MALFORMED, "buffers are not a list", call_id)
    out = []
    for item in bufs:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not _is_int(item[0], 0, 5)
            or not isinstance(item[1], bytes)
        ):
            raise WireError(E_MALFORMED, "buffer entry is not [arg 0-5, bytes]", call_id)
        out.append((item[0], item[1]))
    return tuple(out)


# ---------------------------------------------------------------- encoders


def encode_hello(info: dict) -> bytes:
    return _packb([WIRE_VERSION, HELLO, info])


def encode_welcome(info: dict) -> bytes:
    return _packb([WIRE_VERSION, WELCOME, info])


def encode_bye(info: dict) -> bytes:
    return _packb([WIRE_VERSION, BYE, info])


def encode_stats(info: dict) -> bytes:
    return _packb([WIRE_VERSION, STATS, info])


def encode_call(call: Call) -> bytes:
    """A CALL frame (fixed-width layout when the values fit it, else general msgpack)."""
    return encode_call_fields(*call)


def encode_call_fields(
    call_id: int,
    tid: int,
    nr: int,
    args: tuple[int, ...],
    bufs: tuple[tuple[int, bytes], ...],
    mode: str,
) -> bytes:
    """:func:`encode_call` without building a :class:`Call` first (the relay's hot path)."""
    nb = len(bufs)
    if nb <= 1 and len(args) == 6:
        if nb:
            arg, data = bufs[0]
            if type(data) is bytes and type(arg) is int and 0 <= arg <= 5:
                mark = 0x91
                tail = (
                    _BUF_HEAD.pack(0x92, arg, 0xC6, len(data)) + data + _MODE_BYTES.get(mode, b"")
                )
            else:
                mark = 0
        else:
            mark, tail = 0x90, _MODE_BYTES.get(mode, b"")
        a0, a1, a2, a3, a4, a5 = args
        try:
            if mark and mode in _MODE_BYTES:
                return (_CALL_FIX.pack(_CALL_PREFIX, 0xCF, call_id, 0xCE, tid, 0xCD, nr, 0x96,
                                       0xCF, a0, 0xCF, a1, 0xCF, a2, 0xCF, a3, 0xCF, a4, 0xCF, a5,
                                       mark) + tail)  # fmt: skip
        except struct.error:
            pass  # out of the fixed layout's ranges: the general encoding says the same
    return _packb([WIRE_VERSION, CALL, call_id, tid, nr, args, bufs, mode])


def encode_result(res: Result) -> bytes:
    """A RESULT frame (fixed-width layout when it fits, else general msgpack)."""
    if not res.outbufs:
        try:
            return _RESULT_FIX.pack(_RESULT_PREFIX, 0xCF, res.call_id, 0xD3, res.ret, 0xCD,
                                    res.errno, 0x94, 0xCF, res.t_recv, 0xCF, res.t_exec_start,
                                    0xCF, res.t_exec_end, 0xCF, res.t_send, 0x90)  # fmt: skip
        except struct.error:
            pass
    return _packb(
        [
            WIRE_VERSION,
            RESULT,
            res.call_id,
            res.ret,
            res.errno,
            [res.t_recv, res.t_exec_start, res.t_exec_end, res.t_send],
            [list(b) for b in res.outbufs],
        ]
    )


def encode_error(code: str, message: str, call_id: int | None = None) -> bytes:
    """An ERROR frame; ``message`` is cut to ``MAX_ERROR_TEXT`` characters."""
    return _packb([WIRE_VERSION, ERROR, call_id, code[:32], message[:MAX_ERROR_TEXT]])


# ---------------------------------------------------------------- decoders


def decode(frame: bytes) -> tuple[str, Any]:
    """Decode any frame into ``(type, payload)``.

    Payloads: ``Call`` for CALL, ``Result`` for RESULT, a dict for
    HELLO/WELCOME/BYE/STATS, ``WireError`` (not raised) for ERROR.
    Raises :class:`WireError` for anything malformed.
    """
    n = len(frame)
    if n == _RESULT_FIX.size and frame[:9] == _RESULT_PREFIX:
        res = _decode_result_fixed(frame)
        if res is not None:
            return RESULT, res
    elif _CALL_FIX.size + 5 <= n <= MAX_FRAME and frame[:7] == _CALL_PREFIX:
        call = _decode_call_fixed(frame, n)
        if call is not None:
            return CALL, call
    msg = _unpack(frame)
    kind = msg[1]
    if kind == CALL:
        return CALL, _decode_call(msg)
    if kind == RESULT:
        return RESULT, _decode_result(msg)
    if kind in (HELLO, WELCOME, BYE, STATS):
        if len(msg) != 3 or not isinstance(msg[2], dict):
            raise WireError(E_MALFORMED, f"{kind} frame must be [version, {kind!r}, map]")
        return kind, msg[2]
    if kind == ERROR:
        if (
            len(msg) != 5
            or not isinstance(msg[3], str)
            or not isinstance(msg[4], str)
            or len(msg[3]) > 32
            or len(msg[4]) > MAX_ERROR_TEXT
        ):
            raise WireError(E_MALFORMED, "error frame must be [version, 'error', id, code, msg]")
        call_id = msg[2] if _is_int(msg[2], 0, U64) else None
        return ERROR, WireError(msg[3], msg[4], call_id)
    raise WireError(E_UNSUPPORTED, f"unknown message type {short(kind)}")


def _decode_result_fixed(frame: bytes) -> Result | None:
    """A RESULT in the fixed-width layout, or None (then the general path decides)."""
    v = _RESULT_FIX.unpack(frame)
    if _result_marks(v) != _RESULT_MARKS or v[6] > 4095:
        return None
    stamps = (v[9], v[11], v[13], v[15])
    if max(stamps) > I64_MAX:
        return None
    return Result(v[2], v[4], v[6], *stamps, ())


def _decode_call_fixed(frame: bytes, n: int) -> Call | None:
    """A CALL in the fixed-width layout, or None (then the general path decides)."""
    v = _CALL_FIX.unpack_from(frame)
    nbufs = v[20] - 0x90
    if _call_marks(v) != _CALL_MARKS or not 0 <= nbufs <= 15 or v[4] >= (1 << 31) or v[6] > 4095:
        return None
    off = _CALL_FIX.size
    bufs = []
    for _ in range(nbufs):
        if off + _BUF_HEAD.size > n:
            return None
        a2, arg, b32, length = _BUF_HEAD.unpack_from(frame, off)
        off += _BUF_HEAD.size
        if a2 != 0x92 or arg > 5 or b32 != 0xC6 or off + length > n:
            return None
        bufs.append((arg, bytes(frame[off : off + length])))
        off += length
    tail = frame[off:]
    if tail == b"\xa4cost":
        mode = "cost"
    elif tail == b"\xa7offload":
        mode = "offload"
    else:
        return None
    return Call(v[2], v[4], v[6], (v[9], v[11], v[13], v[15], v[17], v[19]), tuple(bufs), mode)


def _decode_call(msg: list) -> Call:
    # fast path for well-formed frames (the hot path); anything else falls
    # through to the checks below, which say exactly what is wrong
    if len(msg) == 8:
        _, _, call_id, tid, nr, args, bufs, mode = msg
        if (
            type(call_id) is int
            and call_id >= 0
            and type(tid) is int
            and 0 <= tid < (1 << 31)
            and type(nr) is int
            and 0 <= nr <= 4095
            and type(args) is list
            and len(args) == 6
            and all(type(a) is int for a in args)
            and min(args) >= 0
            and (mode == "cost" or mode == "offload")
        ):
            return Call(call_id, tid, nr, tuple(args), _check_bufs(bufs, call_id), mode)
    return _decode_call_checked(msg)


def _decode_call_checked(msg: list) -> Call:
    call_id = msg[2] if len(msg) > 2 and _is_int(msg[2], 0, U64) else None
    if len(msg) != 8 or call_id is None:
        raise WireError(E_MALFORMED, "call frame must have 8 items and an integer id", call_id)
    _, _, _, tid, nr, args, bufs, mode = msg
    if not _is_int(tid, 0, (1 << 31) - 1) or not _is_int(nr, 0, 4095):
        raise WireError(E_MALFORMED, "call tid/nr out of range", call_id)
    if not isinstance(args, list) or len(args) != 6 or not all(_is_int(a, 0, U64) for a in args):
        raise WireError(E_MALFORMED, "call args must be six unsigned 64-bit integers", call_id)
    if mode not in ("cost", "offload"):
        raise WireError(E_MALFORMED, f"call mode {short(mode)} is not cost or offload", call_id)
    return Call(call_id, tid, nr, tuple(args), _check_bufs(bufs, call_id), mode)


def _decode_result(msg: list) -> Result:
    if len(msg) == 7:  # fast path, as in _decode_call
        _, _, call_id, ret, errno, stamps, outbufs = msg
        if (
            type(call_id) is int
            and call_id >= 0
            and type(ret) is int
            and I64_MIN <= ret <= I64_MAX
            and type(errno) is int
            and 0 <= errno <= 4095
            and type(stamps) is list
            and len(stamps) == 4
            and all(type(t) is int for t in stamps)
            and min(stamps) >= 0
            and max(stamps) <= I64_MAX
        ):
            outs = _check_bufs(outbufs, call_id) if outbufs != [] else ()
            return Result(call_id, ret, errno, stamps[0], stamps[1], stamps[2], stamps[3], outs)
    return _decode_result_checked(msg)


def _decode_result_checked(msg: list) -> Result:
    if len(msg) != 7 or not _is_int(msg[2], 0, U64):
        raise WireError(E_MALFORMED, "result frame must have 7 items and an integer id")
    _, _, call_id, ret, errno, stamps, outbufs = msg
    if not _is_int(ret, I64_MIN, I64_MAX) or not _is_int(errno, 0, 4095):
        raise WireError(E_MALFORMED, "result ret/errno out of range", call_id)
    if (
        not isinstance(stamps, list)
        or len(stamps) != 4
        or not all(_is_int(t, 0, I64_MAX) for t in stamps)
    ):
        raise WireError(E_MALFORMED, "result timestamps must be four integers 0..2**63-1", call_id)
    return Result(call_id, ret, errno, *stamps, _check_bufs(outbufs, call_id))
