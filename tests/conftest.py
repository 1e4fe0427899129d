"""Shared fixtures: real delegates, real programs, independent syscall counts.

With ``CI=true`` a skipped test fails instead (``pytest_runtest_makereport``
below): CI must prove that every test ran, so a missing tool, missing root or
a module that did not build is a CI failure, not a silent skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from testbed.jobs.localdelegate import LocalDelegate

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _fail_skip_in_ci(rep) -> None:
    if _ci() and rep.skipped and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"skipped under CI=true, which forbids skips: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


def tb_argv(*args: str) -> list[str]:
    """argv running the testbed CLI of this checkout with this interpreter."""
    return [PY, "-m", "testbed", *args]


def wait_gone(pid: int, timeout: float) -> bool:
    """True once ``pid`` no longer runs (gone, or a zombie nobody reaps) within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def wait_until(cond, timeout: float, step: float = 0.05) -> bool:
    """True once ``cond()`` holds, checked every ``step`` s for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def run_testbed(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    return subprocess.run(tb_argv(*args), timeout=timeout, **kw)


def strace_counts(argv: list[str], syscalls: str, cwd: Path | None = None) -> dict[str, int]:
    """Independent per-syscall counts of a native run (``strace -f -c``)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install strace)")
    res = subprocess.run(
        ["strace", "-f", "-c", "-U", "name,calls", "-e", f"trace={syscalls}", "-o", "/dev/stderr", *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd, timeout=120,
    )  # fmt: skip
    counts = {}
    for line in res.stderr.splitlines():
        m = re.match(r"^\s*(\w+)\s+(\d+)\s*$", line)
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.fixture
def delegate():
    """A real delegate process on a free loopback port."""
    with LocalDelegate() as d:
        yield d


@pytest.fixture
def ctx():
    """A ZeroMQ context for the test's own clients, destroyed without lingering."""
    import zmq

    c = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture(params=["zmtp", "libzmq"])
def relay_transport(request, monkeypatch):
    """The transport between relay and delegate: raw ZMTP on both ends (the default) or
    libzmq on both (TESTBED_ZMTP=0; also what the delegates started under it use)."""
    if request.param == "libzmq":
        monkeypatch.setenv("TESTBED_ZMTP", "0")
    else:
        monkeypatch.delenv("TESTBED_ZMTP", raising=False)
    return request.param


@pytest.fixture(scope="session")
def payload(tmp_path_factory) -> Path:
    """A few MB of compressible, deterministic input."""
    from testbed.jobs.workloads import generate_input

    p = tmp_path_factory.mktemp("data") / "payload.txt"
    generate_input(p, 3, seed=2026)
    return p


def needs_root():
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")


# ---------------------------------------------------------------- test tiers
#
# Every test has exactly one tier marker (registered in pyproject.toml):
#   unit         no processes, no sockets, no namespaces: pure functions and file formats
#   integration  real processes / sockets on this host
#   system       network namespaces, the QEMU VM, Ansible over SSH
# ``unit`` is only ever explicit (a ``pytestmark`` or a per-test mark), and enforced by
# ``_unit_tier_guard`` below. ``system`` and ``integration`` follow from the markers and
# fixtures a test uses (tables below); a test with no evidence is ``integration``.

TIERS = ("unit", "integration", "system")
SYSTEM_MARKERS = frozenset({"netns", "vm", "ansible"})
# "module:fixture" (the module that defines the fixture, without its package)
SYSTEM_FIXTURES = frozenset({
    "test_cpus:topo", "test_two_node:topo",  # netns.Topology
    "test_offload:lab", "test_lab:labdir", "test_provision:lab3", "test_provision_offload:lab2",
    "test_netns:need_netns",
    "test_kmod:guest", "test_kmod:vm_experiment", "test_vm:probe",  # QEMU guests
})  # fmt: skip
INTEGRATION_FIXTURES = frozenset({
    "conftest:delegate", "conftest:ctx",  # a delegate process; a ZeroMQ context for sockets
    "test_delegate:dproc", "test_harden:dproc", "test_router:raw_delegate",
    "test_router_limits:make_delegate", "test_libzmq_limits:dstart", "test_zmtp_relay:router",
    "test_zmtp_props:served", "test_analyze:real_runs",
    "test_fastpath:lib", "test_offload_edges:edge_prog", "test_kmod:built",  # run the compiler
})  # fmt: skip
TIER_RECORD = pytest.StashKey[dict]()  # nodeid -> the tier markers it ended up with


def resolve_tiers(explicit, markers, fixtures) -> list[str]:
    """The tiers of a test with tier marks ``explicit``, other marker names ``markers`` and
    fixtures ``fixtures`` ("module:name"): one tier, or several when the explicit mark
    claims less than the evidence (``unit`` on a test that starts a delegate)."""
    if SYSTEM_MARKERS & set(markers) or SYSTEM_FIXTURES & set(fixtures):
        floor = "system"
    elif INTEGRATION_FIXTURES & set(fixtures):
        floor = "integration"
    else:
        floor = None
    tiers = set(explicit)
    if not tiers:
        tiers = {floor or "integration"}
    elif floor and TIERS.index(floor) > max(map(TIERS.index, tiers)):
        tiers.add(floor)
    return sorted(tiers, key=TIERS.index)


def _fixture_ids(item) -> set[str]:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {f"{defs[-1].func.__module__.rpartition('.')[2]}:{name}"
            for name, defs in info.name2fixturedefs.items() if defs}  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before -m deselects by the tiers added here
def pytest_collection_modifyitems(config, items):
    record = config.stash.setdefault(TIER_RECORD, {})
    for item in items:
        names = {m.name for m in item.iter_markers()}
        tiers = resolve_tiers(names & set(TIERS), names - set(TIERS), _fixture_ids(item))
        for tier in tiers:
            if tier not in names:
                item.add_marker(tier)
        record[item.nodeid] = tuple(tiers)


class UnitTierViolation(RuntimeError):
    """A test marked ``unit`` started a process, forked or created a socket."""


_guard = {"depth": 0, "test": "", "violations": []}
_GUARDED = (  # (owner, attribute, what)
    [(subprocess.Popen, "__init__", "subprocess.Popen")]
    + [(os, n, f"os.{n}") for n in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system",
                                    "unshare", "setns") if hasattr(os, n)]  # fmt: skip
    + [(socket.socket, "__init__", "socket.socket"),
       (zmq.Context, "socket", "zmq.Context.socket"), (zmq.Socket, "__init__", "zmq.Socket")]
)  # fmt: skip
_REAL = {(owner, attr): owner.__dict__[attr] for owner, attr, _ in _GUARDED}


def _refuse(what: str):
    def refuse(*args, **kwargs):
        msg = (f"{what}() in {_guard['test']}, a test marked unit: unit tests start no process "
               f"and open no socket; mark it integration (or system) instead")  # fmt: skip
        _guard["violations"].append(msg)
        raise UnitTierViolation(msg)

    return refuse


@contextlib.contextmanager
def unit_guard(test: str):
    """While active, the process, fork and socket entry points raise UnitTierViolation
    (and record it, so a caller that swallows the error still fails the test)."""
    if _guard["depth"] == 0:
        _guard.update(test=test, violations=[])
        for owner, attr, what in _GUARDED:
            setattr(owner, attr, _refuse(what))
    _guard["depth"] += 1
    try:
        yield _guard["violations"]
    finally:
        _guard["depth"] -= 1
        if _guard["depth"] == 0:
            for owner, attr, _ in _GUARDED:
                setattr(owner, attr, _REAL[owner, attr])


def _guarded(item) -> bool:
    """Marked unit; or every test under TESTBED_TEST_GUARD_ALL=1, to find unit candidates
    (README, Testing: the tests that still pass start no process and open no socket)."""
    return (
        item.get_closest_marker("unit") is not None
        or os.environ.get("TESTBED_TEST_GUARD_ALL") == "1"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session):
    """Run the host's one memoised probe (``systemd-detect-virt``, behind every run
    directory's host record) before any test, so unit tests writing run directories
    find it answered instead of starting it under the guard."""
    if not session.config.option.collectonly and any(map(_guarded, session.items)):
        from testbed.core import hostinfo

        hostinfo.virtualization()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    """The guard also covers module- and session-scoped fixtures a unit test sets up."""
    if not _guarded(item):
        return (yield)
    with unit_guard(item.nodeid):
        return (yield)


@pytest.fixture(autouse=True)
def _unit_tier_guard(request):
    """Tests marked ``unit`` fail loudly if they start a process, fork or open a socket."""
    if not _guarded(request.node):
        yield
        return
    with unit_guard(request.node.nodeid) as violations:
        yield
    if violations:
        pytest.fail("\n".join(dict.fromkeys(violations)), pytrace=False)
