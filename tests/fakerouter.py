"""A scripted ROUTER on loopback for tests that need a delegate misbehaving on purpose.

Subclasses implement :meth:`answer`; the socket, the serving thread and
``close`` are shared (tests/test_harden.py, tests/test_fastpath.py).
"""

from __future__ import annotations

import threading

import zmq


class FakeRouter:
    """Bind a ROUTER on 127.0.0.1 and serve each request with :meth:`answer` in a thread."""

    def __init__(self, ctx: zmq.Context):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, frame = self.sock.recv_multipart()
            self.answer(ident, frame)

    def answer(self, ident: bytes, frame: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)
