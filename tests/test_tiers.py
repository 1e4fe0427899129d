"""Every test has exactly one tier (unit, integration, system): tests/conftest.py.

The tiers of every test this session collected are recorded by
``pytest_collection_modifyitems`` before ``-m`` deselects any, so
``python3 -m pytest -m unit tests`` checks the tiers of the whole suite too.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import zmq

from tests import conftest

pytestmark = pytest.mark.unit


def test_every_collected_test_has_exactly_one_tier(request):
    record = request.config.stash[conftest.TIER_RECORD]
    assert {item.nodeid for item in request.session.items} <= set(record)
    bad = {nodeid: tiers for nodeid, tiers in record.items() if len(tiers) != 1}
    assert not bad, "tests without exactly one tier (a unit mark on a test that starts a " \
        f"delegate, or two tier marks): {bad}"  # fmt: skip
    for item in request.session.items:  # the markers -m selects by agree with the record
        marks = {m.name for m in item.iter_markers()} & set(conftest.TIERS)
        assert marks == set(record[item.nodeid]), item.nodeid


@pytest.mark.parametrize(
    "explicit, markers, fixtures, tiers",
    [
        ((), (), (), ["integration"]),  # no evidence: the safe side
        (("unit",), (), ("conftest:payload",), ["unit"]),
        ((), ("root", "slow"), ("conftest:payload",), ["integration"]),
        ((), (), ("conftest:delegate",), ["integration"]),
        ((), ("netns",), (), ["system"]),
        ((), ("vm", "slow"), ("conftest:delegate",), ["system"]),
        ((), (), ("test_offload:lab",), ["system"]),
        (("system",), (), ("conftest:delegate",), ["system"]),
        (("integration",), (), (), ["integration"]),
        # a tier mark claiming less than the evidence is two tiers: test_every_... fails
        (("unit",), (), ("conftest:delegate",), ["unit", "integration"]),
        (("unit",), ("ansible",), (), ["unit", "system"]),
        (("integration",), ("netns",), (), ["integration", "system"]),
        (("unit", "system"), (), (), ["unit", "system"]),
    ],
)  # fmt: skip
def test_tiers_follow_from_marks_markers_and_fixtures(explicit, markers, fixtures, tiers):
    assert conftest.resolve_tiers(explicit, markers, fixtures) == tiers


def test_evidence_names_fixtures_that_exist():
    """The fixture tables name real fixtures (a renamed fixture must not drop its tier);
    read from the source, as importing a test module may probe the host."""
    import ast
    from pathlib import Path

    here = Path(__file__).parent
    for entry in conftest.SYSTEM_FIXTURES | conftest.INTEGRATION_FIXTURES:
        module, name = entry.split(":")
        tree = ast.parse((here / f"{module}.py").read_text())
        fixtures = {
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef)
            and any("fixture" in ast.unparse(d) for d in node.decorator_list)
        }
        assert name in fixtures, entry


def test_the_guard_refuses_processes_forks_and_sockets(tmp_path):
    attempts = {
        "subprocess.Popen": lambda: subprocess.run(["true"]),
        "os.fork": os.fork,
        "os.posix_spawn": lambda: os.posix_spawn("/bin/true", ["true"], {}),
        "socket.socket": lambda: socket.create_connection(("127.0.0.1", 9)),
        "zmq.Context.socket": lambda: ctx.socket(zmq.DEALER),
    }
    ctx = zmq.Context()
    try:
        for what, attempt in attempts.items():
            with pytest.raises(conftest.UnitTierViolation, match=f"{what}.* a test marked unit"):
                attempt()
    finally:
        ctx.term()
    violations = conftest._guard["violations"]
    assert len(violations) == len(attempts)  # recorded: swallowing the error fails the test
    violations.clear()  # these were on purpose
