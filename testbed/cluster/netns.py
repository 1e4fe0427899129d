"""Network-namespace topologies for tests: real nodes with their own addresses.

    with Topology(["compute", "delegate"]) as topo:
        d = topo.popen("delegate", ["python3", "-m", "testbed", "delegate",
                                    "--listen", f"tcp://{topo.addr('delegate')}:5555"])
        topo.run("compute", ["python3", "client.py", topo.addr("delegate")], check=True)

Each topology creates its own namespaces named ``tb-<pid>-<seq>-<node>``,
with loopback up, joined by veth: two nodes get one veth pair (``eth0`` at
both ends); more nodes get a hub namespace ``tb-<pid>-<seq>-hub`` holding a
bridge, each node's ``eth0`` patched into it.  Addresses come from a private
/24 (default ``10.231.<seq % 250>.0/24``, node *k* gets ``.k+1``) that exists
only inside these namespaces: nothing is added to the root namespace.

Cleanup is guaranteed on exit of the ``with`` block (also on exceptions), by
:meth:`Topology.close`, and at interpreter exit: every process started
through :meth:`popen` / :meth:`run` and every process still inside one of the
namespaces is killed, then the namespaces are deleted.  The helper refuses to
delete or enter any namespace it did not create.

The module is the one namespace manager of the project: the local lab
(``testbed/cluster/lab.py``, namespaces that outlive the process, recorded in a state
file) creates, empties and deletes its namespaces with the same functions
(:func:`add_namespace`, :func:`add_veth`, :func:`namespace_inode`,
:func:`namespace_pids`, :func:`kill_namespace_pids`, :func:`ip`).
It drives iproute2 rather than netlink (pyroute2): the namespaces must be
the named ones ``ip netns exec``, sshd and Ansible use anyway, and creating a
topology is a few dozen ``ip`` calls.
"""

from __future__ import annotations

import atexit
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from testbed.core.errors import TestbedError

PREFIX = "tb"
_NODE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,19}$")
_seq = itertools.count()
_live: set[Topology] = set()  # strong refs: a dropped, unclosed topology is still cleaned at exit
_live_lock = threading.Lock()


class NetnsError(TestbedError):
    """Creating, entering or removing a namespace failed."""


def available() -> tuple[bool, str]:
    """Whether namespaces can be created here, and why not."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "iproute2 ('ip') is not installed"
    return True, ""


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


NETNS_DIR = "/run/netns"


def ip(*argv: str) -> None:
    """``ip ARGV...``; a NetnsError with ip's last error line when it fails."""
    try:
        proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30,
                              check=False)  # fmt: skip
    except FileNotFoundError:
        raise NetnsError("ip: command not found (install iproute2)") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"ip {' '.join(argv)}: timed out after 30 s") from None
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise NetnsError(f"ip {' '.join(argv)}: {err}")


def namespace_inode(name: str) -> int | None:
    """The identity (nsfs inode) of namespace ``name``, None when it does not exist."""
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except FileNotFoundError:
        return None


def add_namespace(name: str) -> int:
    """Create namespace ``name`` with loopback up; refuses an existing one; its inode."""
    if name in list_namespaces():
        raise NetnsError(f"namespace {name} already exists; refusing to reuse it")
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
    except NetnsError:
        ip("netns", "delete", name)
        raise
    inode = namespace_inode(name)
    if inode is None:
        raise NetnsError(f"namespace {name} vanished right after it was created")
    return inode


def add_veth(name: str, peer_ns: str, ns: str | None = None, bridge: str | None = None) -> None:
    """A veth pair: ``name`` in namespace ``ns`` (None: this one), its peer ``eth0`` in
    ``peer_ns``; ``name`` is enslaved to ``bridge`` (if given) and set up."""
    where = ["-n", ns] if ns else []
    ip(*where, "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", peer_ns)
    if bridge:
        ip(*where, "link", "set", name, "master", bridge)
    ip(*where, "link", "set", name, "up")


_RATE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(kbit|mbit|gbit)$")
_RATE_UNIT = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_rate(text: str) -> int:
    """A link rate as ``tc`` writes it (``500kbit``, ``100mbit``, ``1gbit``), in bit/s."""
    m = _RATE.match(str(text).strip().lower())
    rate = float(m.group(1)) * _RATE_UNIT[m.group(2)] if m else 0.0
    if not 64e3 <= rate <= 100e9:
        raise NetnsError(f"link rate {text!r}: give 64kbit to 100gbit, e.g. 100mbit or 1gbit")
    return int(rate)


def shape_link(ns: str, rate: str, dev: str = "eth0") -> int:
    """Cap what ``dev`` in namespace ``ns`` sends at ``rate`` with a token bucket (``tc
    tbf``; burst: 10 ms at the rate, at least 16 KiB); returns the rate in bit/s."""
    bps = parse_rate(rate)
    burst = max(16384, bps // 8 // 100)
    argv = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", str(bps), "burst", str(burst), "latency", "200ms"]  # fmt: skip
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise NetnsError("tc: command not found (install iproute2)") from None
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        raise NetnsError(f"tc tbf on {dev} in {ns}: {err}")
    return bps


class Topology:
    """N network namespaces joined by veth (a pair, or a star around a bridge)."""

    def __init__(self, nodes: int | Sequence[str] = 2, subnet: str | None = None):
        names = [f"n{i}" for i in range(nodes)] if isinstance(nodes, int) else list(nodes)
        if not 1 <= len(names) <= 250:
            raise NetnsError(f"a topology has 1 to 250 nodes, not {len(names)}")
        if len(set(names)) != len(names):
            raise NetnsError(f"duplicate node names in {names}")
        for name in names:
            if not _NODE_NAME.match(name) or name == "hub":
                raise NetnsError(f"bad node name {name!r} (lower-case letters, digits, _)")
        seq = next(_seq)
        self.tag = f"{PREFIX}-{os.getpid()}-{seq}"
        net = ipaddress.ip_network(subnet or f"10.231.{seq % 250}.0/24")
        if net.prefixlen != 24 or not net.is_private:
            raise NetnsError(f"subnet {net} must be a private /24")
        self.subnet = net
        self.nodes = names
        self._ns = {n: f"{self.tag}-{n}" for n in names}
        self._addr = {n: str(net.network_address + i + 1) for i, n in enumerate(names)}
        self._hub = f"{self.tag}-hub" if len(names) > 2 else None
        self._created: list[str] = []  # namespaces this object created, in order
        self._procs: list[subprocess.Popen] = []
        self._closed = False

    # ------------------------------------------------------------ names

    def ns(self, node: str) -> str:
        """The namespace name of ``node`` (a node name or its namespace name)."""
        if node in self._ns:
            return self._ns[node]
        if node in self._ns.values():
            return node
        raise NetnsError(f"{node!r} is not a node of topology {self.tag}")

    def addr(self, node: str) -> str:
        """The IPv4 address of ``node`` on the topology's /24."""
        ns = self.ns(node)
        if len(self.nodes) == 1:
            raise NetnsError("a single-node topology has only a loopback interface")
        return next(a for n, a in self._addr.items() if self._ns[n] == ns)

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this topology created (nodes and hub)."""
        return list(self._created)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Topology:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def up(self) -> Topology:
        """Create the namespaces and links; on any failure undo everything."""
        ok, why = available()
        if not ok:
            raise NetnsError(why)
        with _live_lock:
            _live.add(self)
        try:
            for name in [*self._ns.values(), *([self._hub] if self._hub else [])]:
                self._add_ns(name)
            if self._hub is None and len(self.nodes) == 2:
                a, b = (self._ns[n] for n in self.nodes)
                add_veth("eth0", b, ns=a)
            elif self._hub is not None:
                ip("-n", self._hub, "link", "add", "br0", "type", "bridge")
                ip("-n", self._hub, "link", "set", "br0", "up")
                for i, node in enumerate(self.nodes):
                    add_veth(f"p{i}", self._ns[node], ns=self._hub, bridge="br0")
            for node in self.nodes if len(self.nodes) > 1 else []:
                ns = self._ns[node]
                ip("-n", ns, "addr", "add", f"{self._addr[node]}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def _add_ns(self, name: str) -> None:
        add_namespace(name)
        self._created.append(name)

    def close(self) -> None:
        """Kill every process started here or left in the namespaces; delete them."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            _kill_tree(proc)
        for name in reversed(self._created):
            kill_namespace_pids(name)
        errors = []
        for name in reversed(self._created):
            try:
                ip("netns", "delete", name)
            except NetnsError as exc:
                errors.append(str(exc))
        self._created.clear()
        with _live_lock:
            _live.discard(self)
        if errors:
            raise NetnsError("; ".join(errors))

    # ------------------------------------------------------------ processes

    def shape(self, node: str, rate: str) -> int:
        """Cap what ``node`` sends on its link at ``rate`` (:func:`shape_link`)."""
        if len(self.nodes) == 1:
            raise NetnsError("a single-node topology has no link to shape")
        return shape_link(self.ns(node), rate)

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        """``ip netns exec NS argv...`` for a node of this topology."""
        ns = self.ns(node)
        if self._closed or ns not in self._created:
            raise NetnsError(f"namespace {ns} is not up (topology closed or not created)")
        return ["ip", "netns", "exec", ns, *argv]

    def popen(self, node: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``node``; it is killed on :meth:`close`."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.exec_argv(node, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def run(
        self,
        node: str,
        argv: Sequence[str],
        timeout: float = 60,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside ``node`` to completion (bounded by ``timeout``)."""
        if "capture_output" in kwargs:
            capture = kwargs.pop("capture_output")
            if capture:
                kwargs.setdefault("stdout", subprocess.PIPE)
                kwargs.setdefault("stderr", subprocess.PIPE)
        inp = kwargs.pop("input", None)
        if inp is not None:
            kwargs["stdin"] = subprocess.PIPE
        proc = self.popen(node, argv, **kwargs)
        try:
            out, err = proc.communicate(inp, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise NetnsError(
                f"{' '.join(argv)} in {node} did not finish within {timeout:g} s"
            ) from None
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result


class NetnsPair(Topology):
    """Two namespaces joined by one veth pair: ``pair.a`` and ``pair.b``."""

    def __init__(self, a: str = "a", b: str = "b", subnet: str | None = None):
        super().__init__([a, b], subnet=subnet)
        self.a, self.b = a, b


# ---------------------------------------------------------------- cleanup helpers


def _kill_tree(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM the process group of ``proc``, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    sig_target = pgid if pgid == proc.pid else None

    def send(sig: int) -> None:
        try:
            if sig_target is not None:
                os.killpg(sig_target, sig)
            else:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    send(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass


def namespace_pids(name: str) -> list[int]:
    """The processes living in namespace ``name`` (``ip netns pids``)."""
    proc = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, timeout=30, check=False
    )
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (also when it belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_namespace_pids(name: str, grace: float = 2.0, rounds: int = 3) -> int:
    """Kill every process living in namespace ``name`` (one we created): SIGTERM,
    SIGKILL after ``grace`` s, repeated (bounded) for processes forked meanwhile.
    Returns how many processes were signalled."""
    signalled: set[int] = set()
    for _ in range(rounds):
        pids = namespace_pids(name)
        if not pids:
            break
        signalled.update(pids)
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace  # gone, not just out of the namespace
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        _signal_all([p for p in pids if pid_alive(p)], signal.SIGKILL)
    deadline = time.monotonic() + grace  # SIGKILLed ones: until the kernel has reaped them
    while any(pid_alive(p) for p in signalled) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(signalled)


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@atexit.register
def _close_all() -> None:
    with _live_lock:
        live = list(_live)
    for topo in live:
        try:
            topo.close()
        except TestbedError:
            pass
