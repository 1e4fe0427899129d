"""The delegate role in offload mode, over real Ansible and SSH on a 2-node lab.

site.yml with ``delegate_offload_root`` creates the root owned by the
delegate's service user, the delegate serves offload over CURVE, and a program
on the compute node writes through it; with CURVE off and without
``delegate_offload_insecure`` the role refuses before touching the service.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.cluster import lab
from tests.test_provision import WHY, needs_lab, provision

SUBNET = "10.213.49.0/24"
NODE2 = "10.213.49.2"
pytestmark = [pytest.mark.root, pytest.mark.ansible, pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab2(tmp_path_factory):
    if WHY:
        pytest.skip(WHY)
    d = Path(f"/run/tbtest-provoff-{os.getpid()}")
    root = Path(f"/run/tbtest-offroot-{os.getpid()}")
    state = lab.lab_up(d, 2, SUBNET, 1)
    try:
        yield {"dir": d, "inventory": d / "inventory", "state": state, "root": root,
               "tmp": tmp_path_factory.mktemp("provoff")}  # fmt: skip
    finally:
        if lab.load_state(d) is not None:
            lab.lab_down(d)
        shutil.rmtree(root, ignore_errors=True)


@needs_lab
def test_delegate_role_offload_root_owner_and_use(lab2):
    root = lab2["root"]
    proc, summary = provision(
        lab2["inventory"], "site.yml", lab2["tmp"], "-e", f"delegate_offload_root={root}"
    )
    assert proc.returncode == 0, proc.stderr
    user = pwd.getpwnam(
        lab.service_user(lab2["state"])
    )  # the lab's delegate_user, made by the role
    st = root.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (user.pw_uid, user.pw_gid, 0o750)
    assert "cost+offload" in proc.stdout  # the health check's WELCOME

    node1 = next(n for n in lab2["state"]["nodes"] if n["name"] == "node1")
    keys = lab2["dir"] / "state" / "node1" / "curve"  # node1's relay keys (CURVE is on)
    run = [sys.executable, "-m", "testbed", "run", "--delegate", f"tcp://{NODE2}:5555",
           "--curve-keys", str(keys), "--mode", "offload", "--offload-path", "/lab-io",
           "--quiet", "-o", str(lab2["tmp"] / "run"), "--", "sh", "-c",
           "mkdir -p /lab-io/d && echo written-through-node2 > /lab-io/d/f && cat /lab-io/d/f"]  # fmt: skip
    res = subprocess.run(["ip", "netns", "exec", node1["netns"], *run],
                         capture_output=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    assert res.stdout == b"written-through-node2\n"
    made = root / "d" / "f"
    assert made.read_bytes() == b"written-through-node2\n"
    assert made.stat().st_uid == user.pw_uid  # created by the delegate's service user

    # offload with CURVE off and without the insecure switch: refused by the role
    refused, _ = provision(
        lab2["inventory"], "site.yml", lab2["tmp"], "-l", "node2",
        "-e", f"delegate_offload_root={root}", "-e", "delegate_curve=false",
    )  # fmt: skip
    assert refused.returncode != 0
    assert "without CURVE" in refused.stdout + refused.stderr
