"""Fuzzing a real delegate (issue 11, "Also"): >= 10 000 mutated, truncated,
oversized, multipart and wrong-type frames built from testbed.core.wire's own
encoders, interleaved with a well-behaved client.  No crash, no hang, every
fuzz frame answered once, every good call answered correctly, RSS bounded."""

from __future__ import annotations

import os
import random
import signal
import threading

import msgpack
import pytest
import zmq

from testbed.core import wire
from testbed.delegate.daemon import HARD_MAX_FRAME
from tests import rawzmtp
from tests.test_delegate import Client, DelegateProc

N_FRAMES = 10_000
BATCH = 50  # fuzz frames in flight at once (well below the delegate's SEND_HWM)
SEED = 11


def _base_frames(rng: random.Random) -> list[bytes]:
    """Valid frames of every message type, from the wire module's encoders."""
    data = bytes(rng.getrandbits(8) for _ in range(300))
    calls = [
        wire.Call(
            rng.randrange(1 << 64),
            rng.randrange(1 << 31),
            nr,
            tuple(rng.randrange(1 << 64) for _ in range(6)),
            bufs,
            mode,
        )  # fmt: skip
        for nr, bufs, mode in (
            (1, ((1, data),), "cost"),
            (0, (), "cost"),
            (257, ((1, b"/tmp/some/path"),), "cost"),
            (20, ((1, data[:64]), (2, data[64:])), "offload"),
        )
    ]
    return [
        wire.encode_hello({"host": "fuzz", "pid": 1}),
        wire.encode_welcome({"host": "x"}),
        wire.encode_bye({}),
        wire.encode_result(wire.Result(3, -1, 2, 1, 2, 3, 4, ((1, b"out"),))),
        wire.encode_error(wire.E_MALFORMED, "text", 4),
        *(wire.encode_call(c) for c in calls),
    ]


_ODD_VALUES = [None, True, 1.5, -1, 1 << 63, -(1 << 63), "", "x" * 70, b"\x00" * 9, [], [1, [2]],
               {}, {"k": [None]}, 4096, 2**32, float("nan")]  # fmt: skip


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        i = rng.randrange(len(b)) if b else 0
        if op < 0.6 and b:
            b[i] = rng.getrandbits(8)
        elif op < 0.8:
            b[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4)))
        elif b:
            del b[i : i + rng.randint(1, 4)]
    return bytes(b)


def _wrong_type(rng: random.Random, frame: bytes) -> bytes:
    msg = msgpack.unpackb(frame)
    for _ in range(rng.randint(1, 2)):
        msg[rng.randrange(len(msg))] = rng.choice(_ODD_VALUES)
    if rng.random() < 0.2:
        msg = msg[: rng.randrange(len(msg))] if rng.random() < 0.5 else msg + [0]
    return msgpack.packb(msg, use_bin_type=rng.random() < 0.7)


def fuzz_messages(rng: random.Random, n: int) -> list[tuple[str, list[bytes]]]:
    """``n`` (category, parts) fuzz messages; every one deserves exactly one reply."""
    bases = _base_frames(rng)
    out: list[tuple[str, list[bytes]]] = []
    for i in range(n):
        base = rng.choice(bases)
        r = rng.random()
        if i % 1000 == 999:  # 10 in all: above MAX_FRAME, below libzmq's hard cap
            size = rng.randint(wire.MAX_FRAME + 1, HARD_MAX_FRAME)
            out.append(("oversized", [base + b"\x00" * (size - len(base))]))
        elif r < 0.35:
            out.append(("mutated", [_mutate(rng, base)]))
        elif r < 0.55:
            out.append(("truncated", [base[: rng.randrange(len(base))]]))
        elif r < 0.80:
            out.append(("wrong-type", [_wrong_type(rng, base)]))
        elif r < 0.95:
            parts = [rng.choice(bases) for _ in range(rng.randint(2, 5))]
            if rng.random() < 0.3:
                parts[0] = b""  # a REQ-style envelope, sometimes followed by junk
            out.append(("multipart", parts))
        else:
            out.append(("random", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))))
            out[-1] = (out[-1][0], [out[-1][1]])
    return out


@pytest.mark.parametrize("workers", ["1", "3"])
def test_fuzzing_never_crashes_hangs_or_starves_a_good_client(workers):
    d = DelegateProc("--workers", workers)
    ctx = zmq.Context()
    stop = threading.Event()
    good_results: list[tuple[int, int]] = []
    good_failures: list[str] = []

    def good_client() -> None:
        c = Client(ctx, d.endpoint, ident=b"good-client")
        i = 0
        try:
            while not stop.is_set() and i < 1_000_000:
                kind, res = c.call(i)
                if kind != wire.RESULT or res.call_id != i:
                    good_failures.append(f"{kind} {res}")
                good_results.append((i, res.call_id))
                i += 1
        except zmq.Again:
            good_failures.append(f"no reply to good call {i} within 10 s")
        finally:
            c.close()

    rng = random.Random(SEED)
    messages = fuzz_messages(rng, N_FRAMES)
    fuzz = ctx.socket(zmq.DEALER)
    fuzz.setsockopt(zmq.LINGER, 0)
    fuzz.setsockopt(zmq.RCVTIMEO, 10_000)
    fuzz.setsockopt(zmq.ROUTING_ID, b"fuzzer")
    fuzz.connect(d.endpoint)
    t = threading.Thread(target=good_client)
    replies, hangs, kinds = 0, 0, {}
    try:
        fuzz.send(wire.encode_hello({}))
        assert wire.decode(fuzz.recv())[0] == wire.WELCOME
        rss_before = rawzmtp.rss_mib(d.proc.pid)
        t.start()
        for start in range(0, len(messages), BATCH):
            batch = messages[start : start + BATCH]
            for _cat, parts in batch:
                fuzz.send_multipart(parts)
            for _ in batch:
                try:
                    reply = fuzz.recv_multipart()[-1]  # [payload] or ["", payload] (REQ style)
                except zmq.Again:
                    hangs += 1
                    break
                replies += 1
                kind = wire.decode(reply)[0]  # every reply is a well-formed frame
                kinds[kind] = kinds.get(kind, 0) + 1
            if hangs:
                break
        # beyond libzmq's hard cap: the connection is dropped, nobody else's
        huge = ctx.socket(zmq.DEALER)
        huge.setsockopt(zmq.LINGER, 0)
        huge.connect(d.endpoint)
        huge.send(b"h" * (HARD_MAX_FRAME + 1))
        huge.close(0)
        fuzz.send(wire.encode_hello({}))
        assert wire.decode(fuzz.recv())[0] == wire.WELCOME  # the fuzzer is still served
        rss_after = rawzmtp.rss_mib(d.proc.pid)
        peak = rawzmtp.rss_mib(d.proc.pid, "VmHWM")
    finally:
        stop.set()
        if t.is_alive():
            t.join(30)
        fuzz.close(0)
    alive = d.proc.poll() is None
    d.proc.send_signal(signal.SIGTERM)
    _, err = d.proc.communicate(timeout=15)
    ctx.destroy(linger=0)
    cats = {}
    for cat, _parts in messages:
        cats[cat] = cats.get(cat, 0) + 1
    print(f"fuzz: {len(messages)} messages {cats}; replies {replies} {kinds}; hangs {hangs}; "
          f"crashes {0 if alive else 1}; good calls answered {len(good_results)}; delegate RSS "
          f"{rss_before:.1f} -> {rss_after:.1f} MiB (peak {peak:.1f}), pid {os.getpid()}")  # fmt: skip
    assert alive and d.proc.returncode == 0, err
    assert "Traceback" not in err
    assert hangs == 0 and replies == len(messages) >= 10_000
    assert not good_failures, good_failures[:3]
    assert len(good_results) > 0
    (good_line,) = [ln for ln in err.splitlines() if b"good-client".hex() in ln]
    assert f"calls {len(good_results)}, errors 0," in good_line
    assert rss_after - rss_before < 32, (rss_before, rss_after)


@pytest.mark.unit
@pytest.mark.parametrize("seed", [1, 2])
def test_fuzz_corpus_covers_every_category(seed):
    cats = {cat for cat, _ in fuzz_messages(random.Random(seed), 2000)}
    assert cats == {"oversized", "mutated", "truncated", "wrong-type", "multipart", "random"}
