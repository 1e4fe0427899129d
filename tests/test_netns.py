"""Network-namespace topologies (testbed/cluster/netns.py): real namespaces, veth, cleanup."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from testbed.cluster import netns

pytestmark = [pytest.mark.root, pytest.mark.netns]

PY = sys.executable

SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.listen()
    s.settimeout(30)
    print("ready", flush=True)
    for _ in range(int(sys.argv[3])):
        c, peer = s.accept()
        c.settimeout(10)
        data = c.recv(100)
        c.sendall(data.upper() + b" from " + peer[0].encode())
        c.close()
    """
)

CLIENT = textwrap.dedent(
    """
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
    c.sendall(b"hello")
    print(c.recv(100).decode())
    """
)


@pytest.fixture(autouse=True)
def need_netns():
    ok, why = netns.available()
    if not ok:
        pytest.skip(why)


def ours() -> set[str]:
    prefix = f"{netns.PREFIX}-{os.getpid()}-"
    return {n for n in netns.list_namespaces() if n.startswith(prefix)}


def start_server(topo: netns.Topology, node: str, port: int, accepts: int) -> subprocess.Popen:
    srv = topo.popen(
        node,
        [PY, "-c", SERVER, topo.addr(node), str(port), str(accepts)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert srv.stdout.readline().strip() == "ready"
    return srv


def test_pair_up_and_down_leaves_nothing_behind():
    before = ours()
    with netns.NetnsPair("server", "client") as topo:
        created = set(topo.namespaces)
        assert len(created) == 2
        assert created <= ours()
        assert all(n.startswith(f"tb-{os.getpid()}-") for n in created)
        assert topo.addr("server") != topo.addr("client")
        # loopback up, eth0 up with the node's address, nothing else
        out = topo.run(
            "client", ["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True
        ).stdout
        assert "lo " in out and "127.0.0.1/8" in out
        assert f"{topo.addr('client')}/24" in out
    assert ours() == before


def test_tcp_connection_across_the_veth():
    with netns.NetnsPair("server", "client") as topo:
        srv = start_server(topo, "server", 7100, accepts=1)
        out = topo.run(
            "client",
            [PY, "-c", CLIENT, topo.addr("server"), "7100"],
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"HELLO from {topo.addr('client')}"
        assert srv.wait(10) == 0


def test_nodes_have_their_own_loopback_and_no_route_out():
    with netns.NetnsPair("server", "client") as topo:
        start_server(topo, "server", 7101, accepts=1)
        # the client's loopback is its own: nothing listens on 127.0.0.1:7101 there
        probe = "import socket; socket.create_connection(('127.0.0.1', 7101), timeout=1)"
        lo = topo.run("client", [PY, "-c", probe], capture_output=True, text=True)
        assert lo.returncode != 0 and "ConnectionRefused" in lo.stderr
        # no default route: a node reaches only the topology's own /24
        routes = topo.run("client", ["ip", "-4", "route"], capture_output=True, text=True).stdout
        assert "default" not in routes
        assert f"{topo.subnet} dev eth0" in routes


def test_star_of_three_nodes_through_a_hub():
    with netns.Topology(["delegate", "c1", "c2"]) as topo:
        assert len(topo.namespaces) == 4  # three nodes and the hub
        srv = start_server(topo, "delegate", 7102, accepts=2)
        for node in ("c1", "c2"):
            out = topo.run(
                node,
                [PY, "-c", CLIENT, topo.addr("delegate"), "7102"],
                capture_output=True,
                text=True,
            )
            assert out.stdout.strip() == f"HELLO from {topo.addr(node)}", out.stderr
        assert srv.wait(10) == 0
        created = set(topo.namespaces)
    assert not created & ours()


def test_cleanup_on_exception_kills_processes_and_deletes_namespaces():
    before = ours()
    with pytest.raises(RuntimeError, match="test failure"), netns.NetnsPair() as topo:
        tracked = topo.popen("a", ["sleep", "300"])
        # a process started behind the helper's back inside a namespace is killed too
        sneaky = subprocess.Popen(["ip", "netns", "exec", topo.ns("b"), "sleep", "301"])
        names = topo.namespaces
        time.sleep(0.2)
        raise RuntimeError("test failure")
    assert not set(names) & set(netns.list_namespaces())
    assert ours() == before
    assert tracked.poll() is not None
    assert sneaky.wait(5) is not None


def test_close_is_idempotent_and_refuses_foreign_nodes():
    topo = netns.NetnsPair().up()
    try:
        with pytest.raises(netns.NetnsError, match="not a node"):
            topo.popen("stranger", ["true"])
        with pytest.raises(netns.NetnsError, match="not a node"):
            topo.ns(f"tb-{os.getpid()}-9999-a")
    finally:
        topo.close()
    topo.close()
    with pytest.raises(netns.NetnsError, match="not up"):
        topo.run("a", ["true"])


def test_refuses_a_namespace_that_already_exists():
    topo = netns.NetnsPair()
    squatter = topo.ns("a")  # someone else's namespace that happens to have the name
    subprocess.run(["ip", "netns", "add", squatter], check=True, timeout=30)
    try:
        with pytest.raises(netns.NetnsError, match="already exists"):
            topo.up()
        # the squatter survives: the helper never deletes what it did not create
        assert squatter in netns.list_namespaces()
        assert topo.ns("b") not in netns.list_namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", squatter], timeout=30)


def test_run_timeout_kills_and_reports():
    with netns.NetnsPair() as topo:
        t0 = time.monotonic()
        with pytest.raises(netns.NetnsError, match="did not finish within 0.5 s"):
            topo.run("a", ["sleep", "30"], timeout=0.5)
        assert time.monotonic() - t0 < 10


@pytest.mark.parametrize("nodes", [["a", "a"], ["Bad"], ["hub", "x"], [], 251])
def test_bad_node_names(nodes):
    with pytest.raises(netns.NetnsError):
        netns.Topology(nodes)


def test_subnet_must_be_a_private_slash_24():
    with pytest.raises(netns.NetnsError, match="private /24"):
        netns.Topology(2, subnet="8.8.8.0/24")
    with pytest.raises(netns.NetnsError, match="private /24"):
        netns.Topology(2, subnet="10.0.0.0/16")
    topo = netns.Topology(["x", "y"], subnet="10.213.200.0/24")
    assert (topo.addr("x"), topo.addr("y")) == ("10.213.200.1", "10.213.200.2")


def test_an_unclosed_topology_is_cleaned_up_at_interpreter_exit():
    script = (
        "from testbed.cluster.netns import Topology\n"
        "t = Topology(['x', 'y']).up()\n"
        "t.popen('x', ['sleep', '300'])\n"
        "print(' '.join(t.namespaces), flush=True)\n"
        "del t\n"
    )
    out = subprocess.run([PY, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    names = out.stdout.split()
    assert len(names) == 2
    assert not set(names) & set(netns.list_namespaces())
