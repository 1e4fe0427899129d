"""The shared-memory transport (``shm://PATH``): a request ring and a reply ring in one mapping.

For a delegate on the same node as the relay (docs/wire.md, "Shared memory").
The delegate listens on a Unix socket at ``PATH``; for each relay that
connects it creates a sealed ``memfd`` holding a header and two rings, and
two eventfds (one doorbell per direction), and passes the three fds over the
socket (``SCM_RIGHTS``) with an 8-byte hello.  The socket then stays open,
silent, as the liveness channel: EOF or HUP on it is a dead peer.

The rings carry the same messages the ZMTP transports carry (one msgpack
``wire`` message each: HELLO/WELCOME, CALL/RESULT, ...), each as a record of a
little-endian ``u32`` length and the bytes, in a byte stream that wraps at the
ring's end.  Only the framing differs; the handlers are unchanged.

Layout of the mapping (little-endian)::

    0     magic "TBSHMRG1"          8     version u32, header size u32
    16    ring size u64 (bytes of each ring)
    64    ring 0 (requests, relay -> delegate): head u64 (producer), at 64
          tail u64 (consumer), at 192 (another cache line)
    320   ring 1 (replies, delegate -> relay): head at 320, tail at 448
    576   ring 0's consumer (the delegate) is waiting on its doorbell: u64 flag
    704   ring 1's consumer (the relay) is waiting on its doorbell: u64 flag
    4096  ring 0's bytes, then ring 1's bytes

``head`` and ``tail`` count bytes since the start (they never wrap in
practice: u64); a position in the ring is the count modulo the ring size.
Each side keeps its own index privately and only *stores* it in the mapping,
so a peer can only lie about its own index; every value read from the peer
is checked before use (``used`` = head - tail within 0 .. ring size, a
record's length within what was published and ``max_message``), and every
access is taken modulo the ring size, so a malformed header or index can
never make either side touch memory outside the mapping: it raises
:class:`ShmError` and the connection is dropped.  The mapping is sealed
(``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``) by its creator and the
receiver checks the seals, so a peer cannot truncate it under the other
(which would be SIGBUS).  Stores of an index are single aligned 8-byte
stores (a ``memoryview`` cast to ``Q``) after the bytes they publish; this
relies on x86-64's store ordering (TSO), as the C path would need release
and acquire on other CPUs.

A doorbell is an ``eventfd`` rung only when its consumer sleeps (the
classic futex/eventfd protocol): before it sleeps the consumer stores 1 in
its ``waiting`` flag, makes a full fence and looks at the ring again (a
record there: it clears the flag and takes it); after a put the producer
makes a full fence and rings the bell only if the flag is set.  Either the
producer sees the flag or the consumer sees the record, so no wake-up is
lost and a consumer that is busy (or spinning) costs its producer no system
call.  The consumer clears its flag when it wakes.  A peer can only lie
about its own flag: a flag set for nothing costs an empty wake-up.  Python
has no fence instruction; a lock's acquire and release (``lock``-prefixed
instructions on x86-64) serve as one (:func:`fence`).  A ring
that is full refuses the message (``put`` returns False): the relay then
treats it as a full DEALER (``zmq.Again``), the delegate drops the reply as
a full ROUTER does.  A message larger than ``max_message`` (the ring less
its record header; above ``wire``'s hard frame limit) is refused with
:class:`ShmError` before anything is written.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time

import zmq

from testbed.core.errors import TestbedError

MAGIC = b"TBSHMRG1"
#: 2: the consumers' ``waiting`` flags (1 rang the doorbell after every put)
VERSION = 2
HEADER = 4096
#: Bytes of each ring: a HARD_MAX_FRAME message (4 MiB + 64 KiB) fits, with room.
RING = (4 << 20) + (128 << 10)
#: Bounds a receiver accepts for the ring size in a header it is given.
MIN_RING, MAX_RING = 64 << 10, 64 << 20
_LEN = struct.Struct("<I")
_HEAD = struct.Struct("<8sIIQ")
#: u64 slots (index into the header cast to ``Q``) of each ring's head, tail and
#: consumer's waiting flag
_SLOTS = ((64 // 8, 192 // 8, 576 // 8), (320 // 8, 448 // 8, 704 // 8))
REQUESTS, REPLIES = 0, 1
#: What the delegate sends with the three fds (memfd, request bell, reply bell).
HELLO = b"TBSHM\x01\x00\x00"
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_M64 = (1 << 64) - 1
SCHEME = "shm://"


class ShmError(TestbedError):
    """A malformed mapping, header, index or record from the peer, or a message too large."""


def path_of(endpoint: str) -> str:
    """The rendezvous socket's path of ``shm://PATH``."""
    if not endpoint.startswith(SCHEME) or len(endpoint) == len(SCHEME):
        raise TestbedError(f"{endpoint!r} is not a shm://PATH endpoint")
    return endpoint[len(SCHEME) :]


def is_shm(endpoint: str) -> bool:
    return endpoint.startswith(SCHEME) and len(endpoint) > len(SCHEME)


_FENCE = threading.Lock()


def fence() -> None:
    """A full memory fence (store-load order, which x86-64 does not keep by itself):
    an uncontended lock's acquire and release are ``lock``-prefixed instructions."""
    _FENCE.acquire()
    _FENCE.release()


class Ring:
    """One direction of a :class:`Mapping`: the producer's or the consumer's end."""

    __slots__ = ("_buf", "_q", "_base", "size", "max_message", "_head_slot", "_tail_slot",
                 "_wait_slot", "_mine", "producer")  # fmt: skip

    def __init__(self, buf: memoryview, q: memoryview, base: int, size: int,
                 slots: tuple[int, int, int], producer: bool) -> None:  # fmt: skip
        self._buf, self._q, self._base, self.size = buf, q, base, size
        self.max_message = size - _LEN.size
        self._head_slot, self._tail_slot, self._wait_slot = slots
        self.producer = producer
        # our own index, kept privately (the peer can only lie about its own); the
        # waiting flags are not looked at: the delegate may sleep before the relay maps
        if q[self._head_slot] or q[self._tail_slot]:
            raise ShmError("malformed ring header: a fresh ring's indices must be 0")
        self._mine = 0

    def pending(self) -> bool:
        """The consumer's cheap look (no bounds check; :meth:`get` checks): anything
        published since the last get?"""
        return self._q[self._head_slot] != self._mine

    def set_waiting(self, flag: int) -> None:
        """The consumer's ``waiting`` flag (1: about to sleep on the doorbell)."""
        self._q[self._wait_slot] = flag

    def peer_waiting(self) -> bool:
        """The producer's look at the consumer's flag (after :func:`fence`)."""
        return self._q[self._wait_slot] != 0

    def used(self) -> int:
        """Bytes published and not yet taken (checked: 0 .. size)."""
        if self.producer:
            used = (self._mine - self._q[self._tail_slot]) & _M64
        else:
            used = (self._q[self._head_slot] - self._mine) & _M64
        if used > self.size:
            raise ShmError(f"ring index out of range ({used} bytes used of {self.size})")
        return used

    def _copy_in(self, pos: int, data) -> None:
        n, size, base, buf = len(data), self.size, self._base, self._buf
        first = min(n, size - pos)
        buf[base + pos : base + pos + first] = data[:first]
        if first < n:
            buf[base : base + n - first] = data[first:]

    def _copy_out(self, pos: int, n: int) -> bytes:
        size, base, buf = self.size, self._base, self._buf
        first = min(n, size - pos)
        if first == n:
            return bytes(buf[base + pos : base + pos + n])
        return bytes(buf[base + pos : base + size]) + bytes(buf[base : base + n - first])

    def put(self, data: bytes) -> bool:
        """Publish one message; False when the ring has no room for it now."""
        n = len(data)
        if n > self.max_message:
            raise ShmError(f"a message of {n} bytes does not fit the shared-memory ring "
                           f"(at most {self.max_message})")  # fmt: skip
        need = _LEN.size + n
        if self.size - self.used() < need:
            return False
        pos = self._mine % self.size
        self._copy_in(pos, _LEN.pack(n))
        if n:
            self._copy_in((pos + _LEN.size) % self.size, memoryview(data).cast("B"))
        self._mine = (self._mine + need) & _M64
        self._q[self._head_slot] = self._mine  # (after the bytes: TSO keeps the order)
        return True

    def get(self) -> bytes | None:
        """The next message, or None when none is published."""
        used = self.used()
        if not used:
            return None
        if used < _LEN.size:
            raise ShmError(f"ring holds {used} bytes, less than a record header")
        pos = self._mine % self.size
        (n,) = _LEN.unpack(self._copy_out(pos, _LEN.size))
        if n > self.max_message or _LEN.size + n > used:
            raise ShmError(f"ring record of {n} bytes with {used - _LEN.size} published")
        data = self._copy_out((pos + _LEN.size) % self.size, n)
        self._mine = (self._mine + _LEN.size + n) & _M64
        self._q[self._tail_slot] = self._mine
        return data


def _address_of(mm: mmap.mmap) -> int:
    import ctypes  # lazy: only the address of a mapping, for the relay's C path

    view = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(view)
    finally:
        del view  # (the export ends: the mapping can be closed)


class Mapping:
    """A mapped ring file: header and two :class:`Ring` ends (``tx``, ``rx``)."""

    def __init__(self, fd: int, delegate: bool) -> None:
        """Map the memfd ``fd`` (not closed here) as the delegate's or the relay's side,
        checking its size, seals and header (:class:`ShmError` if anything is off)."""
        try:
            st = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as exc:
            raise ShmError(f"the ring file is not a sealed memfd ({exc.strerror})") from None
        if seals & _SEALS != _SEALS:
            raise ShmError("the ring file is not sealed against shrinking and growing")
        if st.st_size < HEADER:
            raise ShmError(f"the ring file holds {st.st_size} bytes, less than a header")
        mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            magic, version, header, size = _HEAD.unpack_from(mm, 0)
            if magic != MAGIC:
                raise ShmError(f"malformed ring header: magic {magic[:8]!r}")
            if version != VERSION or header != HEADER:
                raise ShmError(f"malformed ring header: version {version}, header size "
                               f"{header} (this side speaks {VERSION}, {HEADER})")  # fmt: skip
            if not MIN_RING <= size <= MAX_RING or size % 8:
                raise ShmError(f"malformed ring header: ring size {size}")
            if st.st_size != HEADER + 2 * size:
                raise ShmError(f"malformed ring header: file of {st.st_size} bytes for two "
                               f"rings of {size}")  # fmt: skip
        except BaseException:
            mm.close()
            raise
        self._mm = mm
        #: where it is mapped in this process (the relay's C path reads and writes it
        #: there while Python calls it; stable until :meth:`close`)
        self.address = _address_of(mm)
        self._buf = memoryview(mm)
        self._q = self._buf[:HEADER].cast("Q")
        self.size = size
        req = (HEADER, size, _SLOTS[REQUESTS])
        rep = (HEADER + size, size, _SLOTS[REPLIES])
        try:
            if delegate:
                self.rx = Ring(self._buf, self._q, *req, producer=False)
                self.tx = Ring(self._buf, self._q, *rep, producer=True)
            else:
                self.tx = Ring(self._buf, self._q, *req, producer=True)
                self.rx = Ring(self._buf, self._q, *rep, producer=False)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def create(ring: int = RING) -> int:
        """A fresh sealed memfd with the header written (the delegate's); its fd."""
        fd = os.memfd_create("testbed-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, HEADER + 2 * ring)
            os.pwrite(fd, _HEAD.pack(MAGIC, VERSION, HEADER, ring), 0)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        if self._mm is None:
            return
        for ring in (getattr(self, "tx", None), getattr(self, "rx", None)):
            if ring is not None:
                ring._buf = ring._q = None
        self._q.release()
        self._buf.release()
        self._mm.close()
        self._mm = None


def ring_bell(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # the counter is full: a wake-up is pending anyway


def drain_bell(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class Channel:
    """One side of a connection: a :class:`Mapping` and its two doorbells.

    ``send`` puts a message in ``tx`` and rings the peer's bell if it sleeps;
    ``recv`` takes one from ``rx``; ``rx_bell`` is the fd to wait on, after
    :meth:`arm` said so (readable once the peer put something while this side
    was armed); :meth:`disarm` once awake.
    """

    def __init__(self, memfd: int, req_bell: int, rep_bell: int, delegate: bool) -> None:
        self.map = Mapping(memfd, delegate)
        self.tx, self.rx = self.map.tx, self.map.rx
        self.req_bell, self.rep_bell = req_bell, rep_bell
        self.rx_bell, self.tx_bell = (req_bell, rep_bell) if delegate else (rep_bell, req_bell)

    def send(self, data: bytes) -> bool:
        if not self.tx.put(data):
            return False
        fence()
        if self.tx.peer_waiting():
            ring_bell(self.tx_bell)
        return True

    def arm(self) -> bool:
        """About to sleep on ``rx_bell``: set the waiting flag; False (flag cleared) if a
        message arrived meanwhile, so the caller takes it instead of sleeping."""
        rx = self.rx
        rx.set_waiting(1)
        fence()
        if rx.pending():
            rx.set_waiting(0)
            return False
        return True

    def disarm(self) -> None:
        self.rx.set_waiting(0)

    def recv(self) -> bytes | None:
        return self.rx.get()

    def drain(self) -> None:
        drain_bell(self.rx_bell)

    def close(self) -> None:
        self.map.close()
        for fd in (self.req_bell, self.rep_bell):
            if fd >= 0:
                os.close(fd)
        self.req_bell = self.rep_bell = self.rx_bell = self.tx_bell = -1


def offer(sock: socket.socket, ring: int = RING) -> Channel:
    """The delegate's side of a new connection: create the mapping and the doorbells,
    pass them over ``sock`` (a freshly accepted Unix socket), return the channel."""
    memfd = Mapping.create(ring)
    bells: list[int] = []
    ch = None
    try:
        bells = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
        ch = Channel(memfd, bells[0], bells[1], delegate=True)  # (before the peer can write)
        if socket.send_fds(sock, [HELLO], [memfd, *bells]) != len(HELLO):
            raise OSError(errno.EAGAIN, "short send of the shm hello")
    except BaseException:
        if ch is not None:
            ch.close()
        else:
            for fd in bells:
                os.close(fd)
        raise
    finally:
        os.close(memfd)  # (the mapping, and the peer's copy, keep it)
    return ch


def accept_offer(sock: socket.socket) -> Channel | None:
    """The relay's side: take the delegate's hello and fds from ``sock`` (non-blocking);
    None while they have not arrived; :class:`ShmError` if they are malformed,
    ``ConnectionError`` if the peer closed."""
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, 64, 4, socket.MSG_CMSG_CLOEXEC)
    except (BlockingIOError, InterruptedError):
        return None
    try:
        if not data and not fds:
            raise ConnectionError("the delegate closed the connection")
        if data != HELLO or len(fds) != 3:
            raise ShmError(f"malformed shm hello from the delegate ({len(data)} bytes, "
                           f"{len(fds)} fds)")  # fmt: skip
        ch = Channel(fds[0], fds[1], fds[2], delegate=False)
        os.close(fds[0])
        return ch
    except BaseException:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        raise


# ---------------------------------------------------------------- the relay's connection


class Dealer:
    """The relay's connection over ``shm://PATH``: the pyzmq subset the relay uses
    (``send``, ``recv``, ``poll``, ``close``), as :class:`testbed.core.zmtp.Dealer`.

    Messages sent while there is no channel wait (``MAX_OUT`` bytes at most)
    and go into the ring once the delegate's fds arrived.  EOF or HUP on the
    Unix socket, or a malformed ring, drops the channel (``last_error``); the
    next ``send`` dials again every ``RECONNECT_S``, as a DEALER reconnects,
    so the relay's per-call timeout and its probes behave as on TCP.  With
    ``--busy-poll`` the relay polls with a zero timeout, which here reads the
    ring without sleeping on the doorbell.
    """

    transport = "shm"
    MAX_OUT = 8 << 20
    RECONNECT_S = 0.1
    FULL_WAIT_S = 5.0

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._path = path_of(endpoint)
        self._sock: socket.socket | None = None
        self._ch: Channel | None = None
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._parts: list[bytes] = []
        self._dropped_at = -1e9
        self.dials = 0
        self.drops = 0
        self.last_error = ""
        self.closed = False
        self._idle_r, self._idle_w = os.pipe()
        self._pset: select.poll | None = None
        self._pkey: tuple = ()
        self._dial()

    # ---------------------------------------------------------- connection
    @property
    def connected(self) -> bool:
        return self._ch is not None

    def _dial(self) -> None:
        self.dials += 1
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC)  # fmt: skip
        try:
            s.connect(self._path)
        except OSError as exc:
            s.close()
            self._dropped_at = time.monotonic()
            self.last_error = f"cannot connect to {self.endpoint}: {exc.strerror}"
            return
        self._sock = s
        self._offer()

    def _offer(self) -> None:
        try:
            ch = accept_offer(self._sock)
        except ShmError as exc:
            print(f"testbed: error: {self.endpoint}: {exc}", file=sys.stderr, flush=True)
            self._drop(str(exc))
            return
        except OSError as exc:
            self._drop(str(exc) if isinstance(exc, ConnectionError) else exc.strerror or str(exc))
            return
        if ch is None:
            return
        self._ch = ch
        held, self._held, self._held_bytes = self._held, [], 0
        for data in held:
            if not self._put(data):
                break

    def _drop(self, why: str) -> None:
        if self._ch is not None:
            self._ch.close()
            self._ch = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self.drops += 1
        self._dropped_at = time.monotonic()
        self.last_error = why

    def lost(self, why: str) -> None:
        self._drop(why)

    def _put(self, data: bytes) -> bool:
        try:
            return self._ch.send(data)
        except ShmError as exc:
            if len(data) > self._ch.tx.max_message:
                raise
            self._malformed(exc)
            return True  # (gone with the channel, as a write on a dropped connection)

    def _malformed(self, exc: ShmError) -> None:
        print(f"testbed: error: the delegate's shared-memory ring is malformed: {exc}; "
              "dropping the connection", file=sys.stderr, flush=True)  # fmt: skip
        self._drop(str(exc))

    def redial_in(self) -> float | None:
        if self._sock is not None or not self._held or self.closed:
            return None
        return max(0.0, self._dropped_at + self.RECONNECT_S - time.monotonic())

    def redial_if_due(self) -> None:
        if self.redial_in() == 0:
            self._dial()

    def has_message(self) -> bool:
        if self._parts:
            return True
        if self._ch is None:
            return False
        try:
            data = self._ch.recv()
        except ShmError as exc:
            self._malformed(exc)
            return False
        if data is None:
            return False
        self._parts.append(data)
        return True

    def fds(self) -> list[tuple[int, int]]:
        """(fd, poll events) to wait on now."""
        if self._sock is None:
            return [(self._idle_r, select.POLLIN)]
        if self._ch is None:
            return [(self._sock.fileno(), select.POLLIN)]
        return [(self._ch.rx_bell, select.POLLIN), (self._sock.fileno(), select.POLLIN)]

    def _events(self, fd: int, ev: int) -> None:
        if self._sock is None:
            return
        if fd == self._sock.fileno():
            if self._ch is None:
                self._offer()
                return
            try:
                data = self._sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._drop(f"the delegate's connection failed: {exc.strerror}")
                return
            self._drop("the delegate closed the connection" if not data
                       else "the delegate wrote on the shm control socket")  # fmt: skip
        elif self._ch is not None and fd == self._ch.rx_bell:
            self._ch.drain()

    # ---------------------------------------------------------- the pyzmq subset
    def fileno(self) -> int:
        return self._ch.rx_bell if self._ch is not None else self._idle_r

    def send(self, data: bytes, flags: int = 0) -> None:
        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "the shm connection is closed")
        if self._ch is None:
            if self._held and self._held_bytes + len(data) > self.MAX_OUT:
                raise zmq.Again()
            self._held.append(bytes(data))
            self._held_bytes += len(data)
            self.redial_if_due()
            return
        if self._put(data):
            return
        if flags & zmq.NOBLOCK:
            raise zmq.Again()
        deadline = time.monotonic() + self.FULL_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.0002)
            if self._ch is None or self._put(data):
                return
        raise zmq.Again()

    def recv(self, flags: int = 0) -> bytes:
        if not self.has_message():
            if flags & zmq.NOBLOCK:
                raise zmq.Again()
            while not self.poll(1000):
                pass
        return self._parts.pop(0)

    def poll(self, timeout: int | None = None, flags: int = 1) -> int:
        """``zmq.POLLIN`` when a message can be received within ``timeout`` ms (None:
        wait), ``zmq.POLLOUT`` with that flag (a ring put does not block); else 0.
        It sleeps on the doorbell only armed (:meth:`Channel.arm`)."""
        if flags & 2:
            return 2
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        while True:
            if self.has_message():
                return 1
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            redial = self.redial_in()
            if redial is not None:
                left = redial if left is None else min(left, redial)
            ms = None if left is None else int(left * 1000 + 0.999)
            ch = self._ch
            armed = False
            if ch is not None and ms != 0:
                armed = ch.arm()
                if not armed:
                    continue  # a message arrived meanwhile
            ready = self._pollset().poll(ms)
            if armed:
                ch.disarm()
            for fd, ev in ready:
                self._events(fd, ev)
            self.redial_if_due()
            if deadline is not None and time.monotonic() >= deadline:
                return 1 if self.has_message() else 0

    def _pollset(self) -> select.poll:
        """A poll set of :meth:`fds`, rebuilt only when they change."""
        key = tuple(self.fds())
        if key != self._pkey:
            p = select.poll()
            for fd, ev in key:
                p.register(fd, ev)
            self._pset, self._pkey = p, key
        return self._pset

    def control_fd(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def c_channel(self) -> Channel | None:
        """The channel, for the relay's C path to use while Python calls it: None unless
        connected with nothing held or taken off the ring on Python's side."""
        if self._ch is None or self._held or self._parts:
            return None
        return self._ch

    def poller(self) -> Poller:
        return Poller()

    def close(self, linger: int | None = None) -> None:
        if self.closed:
            return
        if self._ch is not None:
            self._ch.close()
            self._ch = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        os.close(self._idle_r)
        os.close(self._idle_w)
        self.closed = True


class Poller:
    """``zmq.Poller`` for a shm :class:`Dealer` and plain fds (the relay's loop)."""

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}
        self._dealer: Dealer | None = None
        self._p: select.poll | None = None
        self._key: tuple = ()

    def register(self, obj, events: int = 1) -> None:
        if isinstance(obj, Dealer):
            self._dealer = obj
        else:
            self._fds[obj] = events

    def unregister(self, obj) -> None:
        if obj is self._dealer:
            self._dealer = None
        else:
            del self._fds[obj]

    def poll(self, timeout: int | None = None) -> list[tuple[object, int]]:
        d = self._dealer
        mine: tuple[tuple[int, int], ...] = ()
        ch = None
        if d is not None:
            if d.has_message():
                timeout = 0
            redial = d.redial_in()
            if redial is not None:
                ms = int(redial * 1000) + 1
                timeout = ms if timeout is None or timeout < 0 else min(timeout, ms)
            mine = tuple(d.fds())
            ch = d._ch
        key = (tuple(self._fds.items()), mine)
        if key != self._key:
            p = select.poll()
            for fd, ev in (*key[0], *mine):
                p.register(fd, ev)
            self._p, self._key = p, key
        armed = False
        if ch is not None and timeout != 0:
            armed = ch.arm()
            if not armed:
                timeout = 0  # a message arrived meanwhile: look, do not sleep
        ready = self._p.poll(timeout)
        if armed:
            ch.disarm()
        out: list[tuple[object, int]] = []
        mine_fds = {fd for fd, _ev in mine}
        for fd, ev in ready:
            if fd in mine_fds:
                d._events(fd, ev)
            else:
                out.append((fd, ev))
        if d is not None:
            d.redial_if_due()
            if d.has_message():
                out.insert(0, (d, 1))
        return out
