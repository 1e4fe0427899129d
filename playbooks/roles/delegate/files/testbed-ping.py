#!/usr/bin/env python3
"""Health check of a testbed delegate: HELLO -> WELCOME over ZeroMQ.

usage: testbed-ping.py ENDPOINT [TIMEOUT_S]

Retries (bounded by TIMEOUT_S, default 15) until the delegate answers, then
prints the WELCOME map as JSON and exits 0; exits 1 with one line otherwise.
Runs with the node's testbed Python (needs testbed.wire and pyzmq).
"""

import json
import os
import socket
import sys
import time

import zmq

from testbed import wire


def ping_once(ctx, endpoint, timeout_ms):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(wire.encode_hello({"host": socket.gethostname(), "pid": os.getpid(),
                                     "role": "health-check"}))
        if not sock.poll(timeout_ms, zmq.POLLIN):
            return None
        kind, payload = wire.decode(sock.recv())
        if kind != wire.WELCOME:
            raise SystemExit(f"{endpoint}: answered {kind!r} instead of welcome")
        return payload
    finally:
        sock.close(0)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.split("\n\n")[1])
    endpoint = sys.argv[1]
    timeout = float(sys.argv[2]) if len(sys.argv) == 3 else 15.0
    ctx = zmq.Context()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                sys.exit(f"delegate at {endpoint} did not answer HELLO within {timeout:g} s")
            welcome = ping_once(ctx, endpoint, int(min(1.0, left) * 1000))
            if welcome is not None:
                print(json.dumps(welcome, default=str))
                return 0
    finally:
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
