"""The relay's C path (testbed/compute/fastpath.py, testbed/compute/data/fastpath.c) against its Python path.

The frames it builds and accepts are checked byte for byte against
testbed.core.wire; whole runs of real programs are made with the C path on and
forced off (TESTBED_FASTPATH=0) and must agree: output identical to the
native run, the same counts, records of the same shape, and the same
behaviour on odd replies, errors and timeouts.  tests/test_relay.py runs its
whole suite both ways too.
"""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import zmq

from testbed.compute import fastpath
from testbed.core import rundir, wire, zmtp
from tests.conftest import run_testbed, strace_counts
from tests.fakerouter import FakeRouter

ON = {k: v for k, v in os.environ.items() if k != fastpath.ENV}  # whatever the caller set
OFF = {**ON, fastpath.ENV: "0"}


@pytest.fixture(scope="module")
def lib():
    loaded = fastpath.load()
    if isinstance(loaded, str):
        pytest.skip(f"the C path is unavailable here: {loaded}")
    lib = loaded[0]
    lib.tb_encode_call.restype = ctypes.c_size_t
    lib.tb_encode_call.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_uint32,
                                   ctypes.c_uint16, ctypes.POINTER(ctypes.c_uint64),
                                   ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]  # fmt: skip
    lib.tb_parse_result.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64,
                                    ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]  # fmt: skip
    return lib


def _c_call(lib, call_id, tid, nr, args, arg, data) -> bytes:
    out = ctypes.create_string_buffer(256 + len(data))
    n = lib.tb_encode_call(
        out, call_id, tid, nr, (ctypes.c_uint64 * 6)(*args), arg, data, len(data)
    )
    return out.raw[:n]


def test_call_frames_are_byte_identical_to_wire(lib):
    rng = random.Random(14)
    big = (1 << 64) - 1
    cases = [(1, 1, 1, (1, 0, 0, 0, 0, 0), -1, b""), (big, (1 << 32) - 1, 4095, (big,) * 6, 5, b""),
             (7, 123, 1, (1, 2**40, 64, 0, 0, 0), 1, bytes(range(64)))]  # fmt: skip
    for _ in range(300):
        args = tuple(rng.choice((0, 1, rng.getrandbits(64))) for _ in range(6))
        data = rng.randbytes(rng.choice((0, 1, 200, 5000)))
        cases.append((rng.getrandbits(64), rng.getrandbits(31), rng.randrange(512), args,
                      rng.choice((-1, rng.randrange(6))), data))  # fmt: skip
    for call_id, tid, nr, args, arg, data in cases:
        bufs = ((arg, data),) if arg >= 0 else ()
        want = wire.encode_call_fields(call_id, tid, nr, args, bufs, "cost")
        assert _c_call(lib, call_id, tid, nr, args, arg, data) == want
        if tid < 1 << 31:  # (a larger tid is refused by the delegate, whoever encoded it)
            kind, call = wire.decode(want)
            assert kind == wire.CALL and call.bufs == bufs and call.args == args


def _c_result(lib, frame: bytes, call_id: int):
    ret, stamps = ctypes.c_int64(), (ctypes.c_int64 * 4)()
    ok = lib.tb_parse_result(frame, len(frame), call_id, ctypes.byref(ret), stamps)
    return (ret.value, tuple(stamps)) if ok else None


def test_result_parser_accepts_exactly_the_fixed_result_of_its_call(lib):
    rng = random.Random(15)
    for _ in range(300):
        res = wire.Result(rng.getrandbits(64), rng.randrange(-(1 << 63), 1 << 63),
                          rng.randrange(4096), *(rng.getrandbits(63) for _ in range(4)), ())  # fmt: skip
        frame = wire.encode_result(res)
        assert _c_result(lib, frame, res.call_id) == (res.ret, (res[3], res[4], res[5], res[6]))
        assert _c_result(lib, frame, res.call_id ^ 1) is None  # another call's: Python decides
    good = wire.Result(9, -5, 0, 1, 2, 3, 4, ())
    frame = wire.encode_result(good)
    general = msgpack.packb([2, "result", 9, -5, 0, [1, 2, 3, 4], []])
    rejected = [general, frame[:-1], frame + b"\x00", b"\x97\x03" + frame[2:],
                frame[:28] + b"\x13\x88" + frame[30:],  # errno 5000
                frame[:32] + b"\x80" + frame[33:],  # a stamp above 2**63-1
                frame[:30] + b"\x93" + frame[31:]]  # fmt: skip
    for bad in rejected:
        assert _c_result(lib, bad, 9) is None, bad
        try:  # whatever the C path refuses, the Python path decides (and may accept)
            wire.decode(bad)
        except wire.WireError:
            pass


pytestmark = pytest.mark.usefixtures("relay_transport")  # raw ZMTP and libzmq


def _run(endpoint, out, forward, program, env=None, extra=()):
    if env is not None:  # the transport relay_transport chose
        env = {k: v for k, v in env.items() if k != zmtp.ENV}
        if zmtp.ENV in os.environ:
            env[zmtp.ENV] = os.environ[zmtp.ENV]
    return run_testbed("run", "--delegate", endpoint, "--forward", forward, "-o", str(out),
                       *extra, "--", *program, env=env, timeout=120)  # fmt: skip


def _shape(run: rundir.Run) -> dict:
    calls = np.asarray(run.calls())
    assert (calls["seq"] == np.arange(calls.size)).all()
    ok = calls[calls["flags"] == 0]
    for col in ("t_trap", "t_send", "t_reply", "t_resume", "d_recv", "d_exec_start", "d_send"):
        assert (ok[col] > 0).all(), col
    assert (ok["t_trap"] <= ok["t_send"]).all() and (ok["t_send"] < ok["t_reply"]).all()
    assert (ok["t_reply"] <= ok["t_resume"]).all() and (ok["d_recv"] <= ok["d_send"]).all()
    return {"nr": calls["nr"].tolist(), "flags": calls["flags"].tolist(),
            "ret": calls["ret"].tolist(), "bytes_in": calls["bytes_in"].tolist(),
            "bytes_out": calls["bytes_out"].tolist(), "tids": len(set(calls["tid"].tolist()))}  # fmt: skip


def test_gzip_both_paths_identical_to_native_and_to_each_other(delegate, payload, tmp_path):
    program = ["gzip", "-6", "-c", str(payload)]
    native = subprocess.run(program, capture_output=True, check=True).stdout
    counts = strace_counts(program, "read,write")
    shapes = {}
    for name, env in (("c", ON), ("python", OFF), ("c-busy", ON)):
        extra = ("--busy-poll",) if name.endswith("busy") else ()
        res = _run(delegate.endpoint, tmp_path / name, "read,write", program, env, extra)
        assert res.returncode == 0, res.stderr
        assert res.stdout == native, name
        run = rundir.load(tmp_path / name)
        assert {r["name"]: int(r["n"]) for r in run.syscalls} == counts
        hot = run.meta["hot_path"]
        n = run.meta["calls"]["count"]
        assert hot["c_calls"] + hot["python_calls"] == n == sum(counts.values())
        if name == "python":
            assert hot == {**hot, "c": False, "c_calls": 0, "why_python": "TESTBED_FASTPATH=0"}
        else:
            assert hot["c"] and hot["why_python"] is None and hot["c_calls"] >= 0.9 * n, hot
        assert run.meta["calls"]["faults"] == 0
        shapes[name] = _shape(run)
    assert shapes["c"] == shapes["python"] == shapes["c-busy"]


def test_other_argument_kinds_go_to_python_and_interleave_in_order(delegate, tmp_path):
    """openat carries a path (not served in C), write one buffer: the records
    of both paths come out in call order with one sequence."""
    script = ("import os\nfor i in range(40):\n"
              "    fd = os.open('/dev/null', os.O_WRONLY)\n"
              "    os.write(fd, b'x' * i)\n    os.close(fd)\n")  # fmt: skip
    program = [sys.executable, "-c", script]
    counts = strace_counts(program, "openat,write")
    shapes = {}
    for name, env in (("c", ON), ("python", OFF)):
        res = _run(delegate.endpoint, tmp_path / name, "openat,write", program, env)
        assert res.returncode == 0, res.stderr
        run = rundir.load(tmp_path / name)
        assert {r["name"]: int(r["n"]) for r in run.syscalls} == counts
        hot = run.meta["hot_path"]
        if name == "c":
            assert hot["python_calls"] >= counts["openat"] and hot["c_calls"] >= 1, hot
        shapes[name] = _shape(run)
    assert shapes["c"] == shapes["python"]
    writes = [
        b for nr, b in zip(shapes["c"]["nr"], shapes["c"]["bytes_in"], strict=True) if nr == 1
    ]
    assert writes[-40:] == list(range(40))  # the marshalled buffers, in order


def test_threads_with_calls_in_flight_together(delegate, tmp_path):
    script = ("import os, threading\n"
              "def w(k):\n    for i in range(300):\n        os.write(1, b'%d %d\\n' % (k, i))\n"
              "ts = [threading.Thread(target=w, args=(k,)) for k in range(4)]\n"
              "[t.start() for t in ts]\n[t.join() for t in ts]\n")  # fmt: skip
    res = _run(delegate.endpoint, tmp_path / "r", "write", [sys.executable, "-c", script], ON)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().split("\n")[:-1]
    assert sorted(lines) == sorted(f"{k} {i}" for k in range(4) for i in range(300))
    run = rundir.load(tmp_path / "r")
    hot = run.meta["hot_path"]
    assert hot["c_calls"] + hot["python_calls"] == run.meta["calls"]["count"] >= 1200
    assert run.meta["calls"]["faults"] == 0
    _shape(run)


def test_no_compiler_means_the_python_path(delegate, tmp_path):
    env = {**ON, "PATH": str(tmp_path / "empty"), "XDG_CACHE_HOME": str(tmp_path / "c")}
    program = ["/bin/sh", "-c", "echo one; echo two"]
    res = _run(delegate.endpoint, tmp_path / "r", "write", program, env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == b"one\ntwo\n"
    hot = rundir.load(tmp_path / "r").meta["hot_path"]
    assert not hot["c"] and hot["python_calls"] == 2 and "compiler" in hot["why_python"], hot


class OddDelegate(FakeRouter):
    """A ROUTER answering the k-th CALL in one of several odd ways (see REPLIES)."""

    REPLIES = ("fixed", "general", "error", "late-then-fixed", "envelope", "errno-5000",
               "garbage")  # fmt: skip

    def __init__(self, ctx: zmq.Context):
        super().__init__(ctx)
        self.k = 0
        self.start()

    def answer(self, ident: bytes, frame: bytes) -> None:
        kind, msg = wire.decode(frame)
        if kind != wire.CALL:
            self.sock.send_multipart([ident, wire.encode_welcome({"host": "odd"})])
            return
        how = self.REPLIES[self.k % len(self.REPLIES)]
        self.k += 1
        res = wire.Result(msg.call_id, self.k, 0, 1, 2, 3, 4, ())
        fixed = wire.encode_result(res)
        parts = {
            "fixed": [fixed],
            "general": [msgpack.packb([2, "result", msg.call_id, self.k, 0, [1, 2, 3, 4], []])],
            "error": [wire.encode_error(wire.E_INTERNAL, "odd", msg.call_id)],
            "late-then-fixed": [wire.encode_result(res._replace(call_id=msg.call_id + 10**6))],
            "envelope": [b"", fixed],
            "errno-5000": [msgpack.packb([2, "result", msg.call_id, 0, 5000, [1, 2, 3, 4], []])],
            "garbage": [b"\xc1garbage"],
        }[how]
        if how == "envelope":
            self.sock.send_multipart([ident, *parts])
        else:
            for p in parts:
                self.sock.send_multipart([ident, p])
        if how == "late-then-fixed":
            self.sock.send_multipart([ident, fixed])


def test_odd_replies_errors_and_timeouts_behave_as_the_python_path(tmp_path):
    """Each of 7 calls gets a different reply; the last one none (a timeout)."""
    ctx = zmq.Context()
    echoes = "; ".join(f"echo {i}" for i in range(7))
    program = ["/bin/sh", "-c", echoes]
    seen = {}
    try:
        for name, env in (("c", ON), ("python", OFF), ("c-busy", ON)):
            odd = OddDelegate(ctx)
            extra = ("--timeout", "0.3", *(("--busy-poll",) if name == "c-busy" else ()))
            try:
                res = _run(odd.endpoint, tmp_path / name, "write", program, env, extra)
            finally:
                odd.close()
            assert res.returncode == 0, res.stderr
            assert res.stdout.decode().split() == [str(i) for i in range(7)]
            assert b"Traceback" not in res.stderr
            run = rundir.load(tmp_path / name)
            calls = np.asarray(run.calls())
            seen[name] = (run.meta["calls"], calls["flags"].tolist(), calls["ret"].tolist())
    finally:
        ctx.destroy(0)
    meta, flags, rets = seen["python"]
    assert flags == [0, 0, rundir.F_PEER_ERROR, 0, 0, rundir.F_PEER_ERROR, rundir.F_TIMEOUT]
    assert rets == [1, 2, 0, 4, 5, 0, 0]
    assert meta["late_replies"] == 1 and meta["timeouts"] == 1 and meta["peer_errors"] == 2
    assert seen["c"] == seen["python"] == seen["c-busy"]
