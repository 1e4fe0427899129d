"""The VM harness (testbed/cluster/vm/): boots Debian's kernel under QEMU/TCG.

Every test boots a real guest (about 10-20 s each under TCG); checks that
share one boot use the module-scoped ``probe`` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.cluster import vm
from testbed.core import errors

pytestmark = [pytest.mark.vm, pytest.mark.timeout(400)]

_missing = vm.missing_packages()
if _missing:
    pytest.skip(
        f"VM harness needs {' '.join(_missing)} (bash .ci/setup installs them)",
        allow_module_level=True,
    )
if not os.access(vm.find_kernel().image, os.R_OK):
    pytest.skip("the guest kernel image is not readable (run as root)", allow_module_level=True)


def _pid_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _fields(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isupper():
            out[key] = value
    return out


PROBE_SCRIPT = r"""
echo "KERNEL=$(uname -r)"
echo "PID1=$(cat /proc/1/comm)"
# the 9p view of the host root is read-only
if touch {hostroot}{hostdir}/from-guest 2>/dev/null; then echo HOSTROOT_WRITE=ok; else echo HOSTROOT_WRITE=refused; fi
# writes to host paths land in the guest's overlay, never on the host
echo guest > {hostdir}/overlay-file && echo "OVERLAY_WRITE=$(cat {hostdir}/overlay-file)"
echo "HOSTFILE=$(cat {hostdir}/from-host)"
echo scratch > /tmp/scratch-$$ && echo "TMP_WRITE=$(cat /tmp/scratch-$$)"
# the results share round-trips files both ways
echo "SHARE_IN=$(cat {results}/to-guest)"
echo "back from guest" > {results}/from-guest
# modules come from the guest kernel's /lib/modules
modprobe dummy && echo "MODPROBE=ok"
echo "DUMMY_SYSFS=$(cat /sys/module/dummy/initstate 2>&1)"
echo "LSMOD_DUMMY=$(lsmod | awk '$1 == "dummy" {{print $1}}')"
echo "MODDIR=$(ls -d /lib/modules/$(uname -r)/kernel)"
insmod {hello_ko} && echo "INSMOD_HELLO=$(cat /sys/module/tbhello/initstate)" && rmmod tbhello
dmesg | grep -q "tbhello: loaded" && echo DMESG_HELLO=ok
echo "PYTHON=$(python3 -c 'import sys, testbed; print(sys.version_info[0], testbed.__name__)')"
echo "CWD=$(pwd)"
echo to-stderr >&2
"""


HELLO_C = r"""
// SPDX-License-Identifier: GPL-2.0
#include <linux/module.h>
static int __init tbhello_init(void) { pr_info("tbhello: loaded\n"); return 0; }
static void __exit tbhello_exit(void) { }
module_init(tbhello_init);
module_exit(tbhello_exit);
MODULE_LICENSE("GPL");
"""


@pytest.fixture(scope="module")
def hello_ko(tmp_path_factory) -> Path:
    """A trivial module built by vm.build_module for the guest kernel."""
    src = tmp_path_factory.mktemp("hello-src")
    (src / "tbhello.c").write_text(HELLO_C)
    (src / "Kbuild").write_text("obj-m := tbhello.o\n")
    (src / "Makefile").write_text(
        "KDIR ?= /lib/modules/$(shell uname -r)/build\n"
        "modules:\n\t$(MAKE) -C $(KDIR) M=$(CURDIR) modules\n"
    )
    (ko,) = vm.build_module(src, build_dir=tmp_path_factory.mktemp("hello-build"))
    return ko


@pytest.fixture(scope="module")
def probe(tmp_path_factory, hello_ko):
    hostdir = tmp_path_factory.mktemp("vm-host")
    (hostdir / "from-host").write_text("host data\n")
    results = tmp_path_factory.mktemp("vm-results")
    (results / "to-guest").write_text("hello guest\n")
    script = PROBE_SCRIPT.format(
        hostroot=vm.HOSTROOT_DIR, hostdir=hostdir, results=vm.RESULTS_DIR, hello_ko=hello_ko
    )
    t0 = time.monotonic()
    result = vm.run(script, share=results, cwd=str(hostdir), timeout=300)
    wall = time.monotonic() - t0
    boot = f"{result.boot_seconds:.1f}" if result.boot_seconds is not None else "?"
    print(f"\nVM probe: boot-to-command {boot} s, total {wall:.1f} s ({result.rootmode} root)")
    return result, hostdir, results


def test_command_output_and_kernel(probe):
    result, hostdir, _ = probe
    f = _fields(result.output)
    assert result.exit_status == 0, result.output
    assert f["KERNEL"] == vm.find_kernel().version
    assert f["PYTHON"] == "3 testbed"
    assert f["CWD"] == str(hostdir)
    assert "to-stderr" in result.output
    assert result.rootmode == "overlay"


def test_host_root_read_only_tmp_writable(probe):
    result, hostdir, _ = probe
    f = _fields(result.output)
    assert f["HOSTROOT_WRITE"] == "refused"
    assert f["OVERLAY_WRITE"] == "guest"
    assert f["HOSTFILE"] == "host data"
    assert f["TMP_WRITE"] == "scratch"
    assert not (hostdir / "overlay-file").exists()
    assert not (hostdir / "from-guest").exists()


def test_results_share_round_trip(probe):
    result, _, results = probe
    assert _fields(result.output)["SHARE_IN"] == "hello guest"
    assert (results / "from-guest").read_text() == "back from guest\n"


def test_guest_kernel_modules_load(probe):
    result, _, _ = probe
    f = _fields(result.output)
    version = vm.find_kernel().version
    assert f.get("MODPROBE") == "ok", result.output
    assert f["DUMMY_SYSFS"] == "live"
    assert f["LSMOD_DUMMY"] == "dummy"
    assert f["MODDIR"] == f"/lib/modules/{version}/kernel"


def test_built_module_loads_in_guest(probe, hello_ko):
    result, _, _ = probe
    f = _fields(result.output)
    assert hello_ko.name == "tbhello.ko"
    assert f.get("INSMOD_HELLO") == "live", result.output
    assert f.get("DMESG_HELLO") == "ok"


def test_timeout_kills_qemu():
    t0 = time.monotonic()
    with pytest.raises(vm.VMTimeout) as info:
        vm.run("echo started; sleep 600", timeout=12)
    waited = time.monotonic() - t0
    partial = info.value.result
    assert isinstance(info.value, errors.TestbedError)
    assert partial.timed_out and partial.exit_status is None
    assert partial.qemu_pid is not None and not _pid_running(partial.qemu_pid)
    assert waited < 12 + 30  # killed at the deadline, not after the guest's sleep


def test_cli_run_output_and_exit_status():
    proc = subprocess.run(
        [sys.executable, "-m", "testbed", "vm", "run", "--timeout", "300", "--", "sh", "-c",
         "echo out; echo err >&2; exit 3"],
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "out\nerr\n"


def test_guest_over_ssh(tmp_path):
    key = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
        check=True, capture_output=True,
    )  # fmt: skip
    with vm.Guest(identity=key, memory="1G") as guest:
        pid = guest.qemu_pid
        print(f"\nGuest: ssh reachable {guest.boot_seconds:.1f} s after QEMU start")
        assert guest.ssh_port > 0
        result = guest.run("python3 -c 'print(1)'")
        assert (result.exit_status, result.output) == (0, "1\n")
        proc = subprocess.run(
            [*guest.ssh_command(), "uname -r; exit 5"], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 5
        assert proc.stdout.strip() == vm.find_kernel().version
        # the forwarded port listens on loopback only
        listen = subprocess.run(["ss", "-Hltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{guest.ssh_port} " in listen
        assert f"0.0.0.0:{guest.ssh_port} " not in listen
    assert not guest.alive
    assert not _pid_running(pid)


def test_bad_memory_is_a_user_error():
    with pytest.raises(errors.TestbedError, match="memory"):
        vm.run("true", memory="lots")
