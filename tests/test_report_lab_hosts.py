"""Lab nodes are distinct hosts in every run they stamp (issue 22): each node's sshd, and
so everything started over SSH on it, runs in a UTS namespace named after the node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.cluster import lab
from tests.test_lab import skip

pytestmark = [pytest.mark.root, pytest.mark.netns]

SUBNET = "10.213.52.0/24"


@skip
def test_lab_nodes_have_their_own_host_names(tmp_path):
    d = Path(f"/run/tbtest-hosts-{os.getpid()}")
    up = subprocess.run([sys.executable, "-m", "testbed", "lab", "up", "--nodes", "2",
                         "--subnet", SUBNET, "--dir", str(d)],
                        capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        stamp = (
            "from testbed.core.hostinfo import host_metadata; print(host_metadata()['hostname'])"
        )
        for node in ("node1", "node2"):
            out = subprocess.run(["ssh", "-F", str(d / "ssh_config"), node,
                                  f"{sys.executable} -c \"{stamp}\""],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == node  # what run.json's host.hostname will say
        assert os.uname().nodename not in ("node1", "node2")  # the machine's name untouched
    finally:
        if lab.load_state(d) is not None:
            lab.lab_down(d)
