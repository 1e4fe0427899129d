#!/usr/bin/env python3
"""Health check of a testbed delegate: HELLO -> WELCOME over ZeroMQ.

usage: testbed-ping.py ENDPOINT [TIMEOUT_S [CURVE_DIR]]

CURVE_DIR (optional, may be empty) holds server.key and client.key_secret for
a delegate started with --curve-keys.  Retries (bounded by TIMEOUT_S, default
15) until the delegate answers, then
prints the WELCOME map as JSON and exits 0; exits 1 with one line otherwise.
Runs with the node's testbed Python (needs testbed.core.wire and pyzmq).
"""

import json
import os
import socket
import sys
import time

import zmq

from testbed.core import wire
from testbed.core.errors import TestbedError


def ping_once(ctx, endpoint, timeout_ms, curve_dir):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve_dir:
        from testbed.core.keys import setup_client

        setup_client(sock, curve_dir)
    try:
        sock.connect(endpoint)
        sock.send(
            wire.encode_hello(
                {"host": socket.gethostname(), "pid": os.getpid(), "role": "health-check"}
            )
        )
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return None
        kind, payload = wire.decode(sock.recv())
        if kind != wire.WELCOME:
            raise SystemExit(f"{endpoint}: answered {kind!r} instead of welcome")
        return payload
    finally:
        sock.close(0)


def main():
    if len(sys.argv) not in (2, 3, 4):
        sys.exit(__doc__.split("\n\n")[1])
    endpoint = sys.argv[1]
    timeout = float(sys.argv[2]) if len(sys.argv) >= 3 else 15.0
    curve_dir = sys.argv[3] if len(sys.argv) == 4 else ""
    ctx = zmq.Context()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                sys.exit(f"delegate at {endpoint} did not answer HELLO within {timeout:g} s")
            try:
                welcome = ping_once(ctx, endpoint, int(min(1.0, left) * 1000), curve_dir)
            except TestbedError as exc:  # unreadable or unsafe keys: one line
                sys.exit(f"{endpoint}: {exc}")
            if welcome is not None:
                print(json.dumps(welcome, default=str))
                return 0
    finally:
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
