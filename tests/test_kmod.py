"""The mktrace kernel module (kmod/) and its Python side (testbed/compute/interpose/kmod.py).

Host tests: the uapi header and the Python mirror agree (a C program compiled
against the header prints sizes, offsets, constants and ioctl numbers); the
backend fails with one clear line where the module is not loaded.

VM tests: the module is built on the host with Kbuild against the guest
kernel's headers (a warning fails the build test), then ONE guest boot
(``testbed.cluster.vm.run``) runs every in-kernel check: ``tests/kmod_guest.py``
(``python3 tests/kmod_guest.py SHARE`` in the guest) writes ``results.json``
to the results share; each test below asserts on one part of it.  Numbers
(kthread per-call cost against the delay D, default vs mktrace-faithful f_c,
relay round trips) are printed and kept in ``SHARE/results.json``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
KMOD = REPO / "kmod"
UAPI = KMOD / "include" / "uapi" / "mktrace.h"

if str(REPO) not in sys.path:  # the guest runs this file as a script
    sys.path.insert(0, str(REPO))

from testbed.compute.interpose import BackendError  # noqa: E402
from testbed.compute.interpose import kmod as K  # noqa: E402
from tests.conftest import wait_gone  # noqa: E402
from tests.kmod_guest import NR_WRITE  # noqa: E402

GUEST = Path(__file__).resolve().parent / "kmod_guest.py"

# ---------------------------------------------------------------- C helpers

LAYOUT_C = r"""
#include <stddef.h>
#include <stdio.h>
#include "mktrace.h"
#define S(t) printf("size %s %zu\n", #t, sizeof(struct t))
#define F(t, f) printf("offset %s.%s %zu\n", #t, #f, offsetof(struct t, f))
#define C(c) printf("const %s %llu\n", #c, (unsigned long long)(c))
int main(void)
{
	S(mktrace_config); F(mktrace_config, mode); F(mktrace_config, flags);
	F(mktrace_config, delay_ns); F(mktrace_config, timeout_ns);
	F(mktrace_config, release_action); F(mktrace_config, reserved);
	S(mktrace_syscall_set); F(mktrace_syscall_set, bits);
	S(mktrace_request); F(mktrace_request, seq); F(mktrace_request, pid);
	F(mktrace_request, tid); F(mktrace_request, nr); F(mktrace_request, flags);
	F(mktrace_request, args); F(mktrace_request, ts_ns);
	S(mktrace_krecord); F(mktrace_krecord, tid); F(mktrace_krecord, nr);
	F(mktrace_krecord, flags); F(mktrace_krecord, cpu); F(mktrace_krecord, ts_trap);
	F(mktrace_krecord, ts_queued); F(mktrace_krecord, ts_taken); F(mktrace_krecord, ts_arrive);
	F(mktrace_krecord, ts_done); F(mktrace_krecord, ts_resume);
	S(mktrace_reply); F(mktrace_reply, seq); F(mktrace_reply, action);
	F(mktrace_reply, reserved); F(mktrace_reply, value);
	S(mktrace_stat); F(mktrace_stat, count); F(mktrace_stat, total_ns);
	F(mktrace_stat, min_ns); F(mktrace_stat, max_ns); F(mktrace_stat, released);
	S(mktrace_stats_query); F(mktrace_stats_query, buf); F(mktrace_stats_query, count);
	F(mktrace_stats_query, reserved);
	S(mktrace_status); F(mktrace_status, abi_version); F(mktrace_status, nr_syscalls);
	F(mktrace_status, target_pid); F(mktrace_status, target_alive);
	F(mktrace_status, queued); F(mktrace_status, inflight); F(mktrace_status, calls);
	F(mktrace_status, released); F(mktrace_status, delegate_cpu); F(mktrace_status, reserved);
	F(mktrace_status, dropped);
	C(MKTRACE_ABI_VERSION); C(MKTRACE_MAX_SYSCALLS); C(MKTRACE_SET_WORDS);
	C(MKTRACE_MODE_KTHREAD); C(MKTRACE_MODE_RELAY); C(MKTRACE_F_DESCENDANTS);
	C(MKTRACE_F_FAITHFUL); C(MKTRACE_F_FLUSH_CALLER); C(MKTRACE_F_ALL);
	C(MKTRACE_KREC_RELEASED); C(MKTRACE_KREC_FAITHFUL); C(MKTRACE_KREC_RING);
	C(MKTRACE_ACT_CONTINUE); C(MKTRACE_ACT_EIO); C(MKTRACE_REPLY_CONTINUE);
	C(MKTRACE_REPLY_RETURN); C(MKTRACE_MAX_DELAY_NS); C(MKTRACE_MIN_TIMEOUT_NS);
	C(MKTRACE_MAX_TIMEOUT_NS);
	C(MKTRACE_IOC_GET_STATUS); C(MKTRACE_IOC_SET_CONFIG); C(MKTRACE_IOC_GET_CONFIG);
	C(MKTRACE_IOC_SET_SYSCALLS); C(MKTRACE_IOC_REGISTER); C(MKTRACE_IOC_GET_STATS);
	C(MKTRACE_IOC_RESET_STATS); C(MKTRACE_IOC_IS_PENDING);
	printf("string MKTRACE_DEVICE %s\n", MKTRACE_DEVICE);
	return 0;
}
"""

# writer N [THREADS]: exactly N write(2) calls per thread to stdout, nothing else writes.
WRITER_C = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int n;
static void *loop(void *arg)
{
	char line[64];
	long t = (long)arg;
	for (int i = 0; i < n; i++) {
		int len = snprintf(line, sizeof(line), "thread %ld line %d\n", t, i);
		if (write(1, line, len) != len)
			_exit(3);
	}
	return NULL;
}
int main(int argc, char **argv)
{
	int threads = argc > 2 ? atoi(argv[2]) : 1;
	pthread_t tid[64];
	n = atoi(argv[1]);
	if (threads <= 1)
		return loop(0), 0;
	for (long t = 0; t < threads && t < 64; t++)
		pthread_create(&tid[t], NULL, loop, (void *)t);
	for (int t = 0; t < threads && t < 64; t++)
		pthread_join(tid[t], NULL);
	return 0;
}
"""

# sysret N [THREADS]: N getppid() calls via syscall(2), each result printed as
# "RET ERRNO"; with THREADS > 1, up to N calls in each thread, nothing printed, and a
# thread stops at its first result that is not the parent's pid: the exit status is
# the number of threads that saw one.
SYSRET_C = r"""
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
static int n;
static long ppid;
static void *quiet(void *arg)
{
	(void)arg;
	for (int i = 0; i < n; i++)
		if (syscall(SYS_getppid) != ppid)
			return (void *)1;
	return NULL;
}
int main(int argc, char **argv)
{
	int threads = argc > 2 ? atoi(argv[2]) : 1;
	pthread_t tid[64];
	void *bad;
	int fails = 0;
	n = argc > 1 ? atoi(argv[1]) : 1;
	if (threads > 1) {
		ppid = getppid();
		for (long t = 0; t < threads && t < 64; t++)
			pthread_create(&tid[t], NULL, quiet, NULL);
		for (int t = 0; t < threads && t < 64; t++)
			fails += pthread_join(tid[t], &bad) == 0 && bad;
		return fails;
	}
	for (int i = 0; i < n; i++) {
		long r;
		errno = 0;
		r = syscall(SYS_getppid);
		printf("%ld %d\n", r, r < 0 ? errno : 0);
		fflush(stdout);
	}
	return 0;
}
"""

# crelay DEVICE N: a minimal relay in C (fork + REGISTER + exec sysret N, answer every
# request with "continue"), printing the module's trap-to-release ns (count min mean).
CRELAY_C = r"""
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>
#include "mktrace.h"
int main(int argc, char **argv)
{
	struct mktrace_config cfg = { .mode = MKTRACE_MODE_RELAY, .timeout_ns = 10000000000ULL };
	struct mktrace_syscall_set set = { { 0 } };
	static struct mktrace_stat st[MKTRACE_MAX_SYSCALLS];
	struct mktrace_stats_query q = { .buf = (unsigned long)st, .count = MKTRACE_MAX_SYSCALLS };
	int fd = open(argv[1], O_RDWR), n = atoi(argv[2]), status;
	pid_t pid;

	set.bits[110 / 64] = 1ULL << (110 % 64);	/* getppid */
	if (fd < 0 || ioctl(fd, MKTRACE_IOC_SET_CONFIG, &cfg) || ioctl(fd, MKTRACE_IOC_SET_SYSCALLS, &set))
		return perror("mktrace"), 2;
	pid = fork();
	if (pid == 0) {
		char num[16];
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) || ioctl(fd, MKTRACE_IOC_REGISTER, 0))
			_exit(126);
		close(fd);
		snprintf(num, sizeof(num), "%d", n);
		execl(argv[3], argv[3], num, (char *)NULL);
		_exit(127);
	}
	for (int done = 0; done < n;) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		struct mktrace_request req;
		struct mktrace_reply rep = { 0 };
		if (poll(&p, 1, 10000) != 1 || read(fd, &req, sizeof(req)) != sizeof(req))
			return fprintf(stderr, "no request\n"), 3;
		rep.seq = req.seq;
		rep.action = MKTRACE_REPLY_CONTINUE;
		if (write(fd, &rep, sizeof(rep)) != sizeof(rep))
			return perror("reply"), 4;
		done++;
	}
	waitpid(pid, &status, 0);
	if (ioctl(fd, MKTRACE_IOC_GET_STATS, &q))
		return perror("stats"), 5;
	printf("%llu %llu %llu\n", (unsigned long long)st[110].count,
		(unsigned long long)st[110].min_ns,
		(unsigned long long)(st[110].total_ns / (st[110].count ? st[110].count : 1)));
	return WIFEXITED(status) ? WEXITSTATUS(status) : 6;
}
"""

# euid: print the effective uid (installed set-uid in the guest)
EUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void)
{
	printf("%d\n", (int)geteuid());
	return 0;
}
"""


def _gcc(src: str, out: Path, *flags: str) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (apt-get install build-essential)")
    c = out.with_suffix(".c")
    c.write_text(src)
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", *flags, "-o", str(out), str(c)], check=True)
    return out


# ---------------------------------------------------------------- host tests


def test_uapi_layout_matches_python_mirror(tmp_path):
    exe = _gcc(LAYOUT_C, tmp_path / "layout", f"-I{UAPI.parent}")
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    seen = {"size": 0, "offset": 0, "const": 0}
    for line in out.splitlines():
        kind, name, value = line.split()
        if kind == "size":
            assert ctypes.sizeof(K.STRUCTS[name]) == int(value), name
        elif kind == "offset":
            struct, field = name.split(".")
            assert getattr(K.STRUCTS[struct], field).offset == int(value), name
        elif kind == "const":
            assert K.CONSTANTS[name] == int(value), name
        else:
            assert (kind, name, value) == ("string", "MKTRACE_DEVICE", K.DEVICE)
            continue
        seen[kind] += 1
    assert seen["size"] == len(K.STRUCTS)
    assert seen["const"] == len(K.CONSTANTS)
    n_fields = sum(len(s._fields_) for s in K.STRUCTS.values())
    assert seen["offset"] == n_fields


def test_missing_device_is_one_clear_error(tmp_path):
    with pytest.raises(BackendError, match="not loaded|missing") as info:
        K.KmodBackend(frozenset({NR_WRITE}), device=str(tmp_path / "mktrace"))
    assert "\n" not in str(info.value)
    with pytest.raises(BackendError, match="does not answer the mktrace ABI"):
        K.Device("/dev/null")  # some other device: ENOTTY, not a traceback
    if not os.path.exists(K.DEVICE):
        with pytest.raises(BackendError) as info:
            K.KmodBackend(frozenset({NR_WRITE}))
        assert str(info.value) == K.NOT_LOADED
    res = subprocess.run(
        [sys.executable, "-m", "testbed", "kmod", "status", "--device",
         str(tmp_path / "none")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"testbed: error: {tmp_path / 'none'} missing (see docs/kmod.md)"
    ]


KTHREAD = ["run", "--backend", "kmod", "--mode", "kthread", "--forward", "write"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--mode", "kthread", "--forward", "write"],
         "--mode kthread needs --backend kmod (the mktrace module's kernel thread), not seccomp"),
        (["run", "--backend", "seccomp", "--mode", "kthread", "--forward", "write"],
         "--mode kthread needs --backend kmod (the mktrace module's kernel thread), not seccomp"),
        ([*KTHREAD, "--delegate", "tcp://127.0.0.1:5555"],
         "--mode kthread forwards to the kernel thread on this node: drop --delegate"),
        ([*KTHREAD, "--flush-caller-tlb"], "--flush-caller-tlb needs --faithful"),
        ([*KTHREAD, "--delay-us", "1e7"], "--delay-us must be at most 1000000 (1 s per leg)"),
        (["run", "--delegate", "tcp://127.0.0.1:5555", "--forward", "write", "--delay-us", "5"],
         "--delay-us, --faithful and --flush-caller-tlb apply to --mode kthread only "
         "(a delegate's delay is testbed delegate --delay-us)"),
        (["run", "--forward", "write"],
         "--delegate ENDPOINT is required (or --backend kmod --mode kthread)"),
    ],
)  # fmt: skip
def test_kthread_run_bad_input_is_one_line(tmp_path, args, message):
    res = subprocess.run(
        [sys.executable, "-m", "testbed", *args, "-o", str(tmp_path / "run"), "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"testbed: error: {message}"]
    assert not (tmp_path / "run").exists()


def test_kthread_run_without_the_module_is_one_line(tmp_path):
    if os.path.exists(K.DEVICE):
        pytest.skip("the mktrace module is loaded on this machine")
    res = subprocess.run(
        [sys.executable, "-m", "testbed", *KTHREAD, "-o", str(tmp_path / "run"), "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"testbed: error: {K.NOT_LOADED}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_kthread_records_map_onto_the_documented_fields():
    from testbed.compute import kthread
    from testbed.core import rundir

    rec = np.zeros(2, dtype=kthread.KRECORD_DTYPE)
    rec["tid"], rec["nr"] = 42, 1
    for i, f in enumerate(
        ("ts_trap", "ts_queued", "ts_taken", "ts_arrive", "ts_done", "ts_resume")
    ):
        rec[f] = 1000 + 10 * i
    rec["flags"][1] = K.KREC_RELEASED
    calls = kthread.to_calls(rec)
    assert calls.dtype == rundir.CALL_DTYPE
    assert calls["t_trap"][0] == 1000 and calls["t_send"][0] == 1010
    assert calls["d_recv"][0] == calls["d_send"][0] == 1030
    assert calls["t_reply"][0] == 1040 and calls["t_resume"][0] == 1050
    d = rundir.derived(calls)
    assert d["overhead"][0] == 50 and d["residence"][0] == 0 and d["rtt"][0] == 30
    assert calls["flags"].tolist() == [0, rundir.F_CALLER_GONE]
    assert kthread.KRECORD_DTYPE.itemsize == ctypes.sizeof(K.KRecord)


@pytest.mark.unit
def test_helper_status_line_parsing():
    assert K.parse_status(b"exec 123 0.5 0.25\n") == ((123, 0.5, 0.25), None)
    assert K.parse_status(b"exec 5 0.0 0.0\ncannot execute x: No such file\n") == (
        (5, 0.0, 0.0),
        "cannot execute x: No such file",
    )
    assert K.parse_status(b"mktrace register failed: Operation not permitted\n") == (
        None,
        "mktrace register failed: Operation not permitted",
    )


def test_testbed_run_without_the_module_is_one_line(delegate, tmp_path):
    if os.path.exists(K.DEVICE):
        pytest.skip("the mktrace module is loaded on this machine")
    res = subprocess.run(
        [sys.executable, "-m", "testbed", "run", "--backend", "kmod", "--delegate",
         delegate.endpoint, "--forward", "write", "-o", str(tmp_path / "run"), "--", "true"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [f"testbed: error: {K.NOT_LOADED}"]


def test_helper_reports_a_failed_registration():
    r, w = os.pipe()  # not /dev/mktrace: the REGISTER ioctl fails with ENOTTY
    res = subprocess.run(K.helper_argv(r, ["true"]), pass_fds=(r,), capture_output=True, text=True)
    os.close(r)
    os.close(w)
    assert res.returncode == 126
    assert "mktrace register failed" in res.stderr


# Without the module: the launch path as the relay and kthread run it
# (K.launch_registered), on a stand-in session file (/dev/null) whose
# "registration" is FIOCLEX, an ioctl that succeeds on any fd.
FIOCLEX = 0x5451

_KMOD_RELAY = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from testbed.compute.interpose import kmod as K
K.IOC_REGISTER = 0x5451  # FIOCLEX (see the test)
class Session:
    fd = os.open(os.devnull, os.O_RDWR)
r, w = os.pipe()
child = K.launch_registered(Session(), ["sleep", "1000"], status_fd=w)
os.close(w)
print(child.pid, os.read(r, 200).decode().split()[0], flush=True)
time.sleep(120)
"""


def _runs(pid: int, name: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0]) == name
    except OSError:
        return False


def test_kmod_program_dies_with_a_relay_killed_after_launch():
    """Issue 19: the kmod helper sets the parent-death signal the seccomp
    launcher sets, so a relay SIGKILLed after launching takes its program
    with it (before, the program went on, its calls released to run locally)."""
    relay = subprocess.Popen([sys.executable, "-c", _KMOD_RELAY, str(REPO)],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    program = None
    try:
        line = relay.stdout.readline().split()
        assert line[1:] == ["exec"], f"the helper did not reach its registration: {line}"
        program = int(line[0])
        deadline = time.monotonic() + 30
        while not _runs(program, b"sleep") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _runs(program, b"sleep"), "the helper never executed the program"
        relay.kill()
        relay.wait()
        assert wait_gone(program, 10), "the program outlived its relay"
    finally:
        relay.kill()
        relay.wait()
        if program is not None and not wait_gone(program, 0):
            os.kill(program, signal.SIGKILL)


def test_kmod_helper_does_not_start_the_program_for_a_relay_already_gone(tmp_path, monkeypatch):
    """The helper checks its parent after asking for the signal: started for a
    relay that is no longer its parent, it exits 125 and runs nothing."""
    monkeypatch.setattr(K, "IOC_REGISTER", FIOCLEX)
    gone = subprocess.Popen(["true"])
    gone.wait()
    marker = tmp_path / "ran"
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        argv = K.helper_argv(fd, ["touch", str(marker)], relay_pid=gone.pid)
        res = subprocess.run(argv, pass_fds=(fd,), capture_output=True, text=True, timeout=60)
        ok = subprocess.run(K.helper_argv(fd, ["sh", "-c", "exit 7"]), pass_fds=(fd,),
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        os.close(fd)
    assert res.returncode == 125 and not marker.exists(), res.stderr
    assert ok.returncode == 7, ok.stderr  # its own relay: registered, then the program ran


@pytest.mark.unit
def test_bitmap_and_config_validation():
    bits = K._bitmap([0, 1, 63, 64, 1023])
    assert bits.bits[0] == (1 << 0) | (1 << 1) | (1 << 63)
    assert bits.bits[1] == 1 and bits.bits[15] == 1 << 63
    with pytest.raises(BackendError):
        K._bitmap([1024])
    dev = K.Device.__new__(K.Device)  # validation happens before any ioctl
    dev.fd = -1
    for kwargs in ({"mode": "fast"}, {"delay_ns": -1}, {"timeout_ns": 0},
                   {"release_action": "retry"}):  # fmt: skip
        with pytest.raises(BackendError):
            dev.set_config(**{"mode": "relay", **kwargs})


def test_guestfwd_carries_one_connection_to_loopback_both_ways():
    """testbed/cluster/vm/guestfwd.py as QEMU runs it: stdin/stdout a socket, bytes both ways."""
    import socket

    fwd = REPO / "testbed" / "cluster" / "vm" / "guestfwd.py"
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    guest, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(fwd), str(port)], stdin=theirs,
                            stdout=theirs, stderr=theirs)  # fmt: skip
    theirs.close()
    conn, _ = srv.accept()
    conn.settimeout(30)
    guest.settimeout(30)
    payload = os.urandom(300_000)
    guest.sendall(payload)
    guest.shutdown(socket.SHUT_WR)  # half-close: the host side sees EOF after the bytes
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    assert got == payload
    conn.sendall(b"reply")
    conn.close()
    back = b""
    while chunk := guest.recv(65536):
        back += chunk
    assert back == b"reply"
    assert proc.wait(timeout=30) == 0
    srv.close()
    # nothing listening: the forwarder exits, the guest's connection closes
    guest2, theirs2 = socket.socketpair()
    dead = subprocess.run([sys.executable, "-I", "-S", str(fwd), str(port)], stdin=theirs2,
                          stdout=theirs2, stderr=theirs2, timeout=30)  # fmt: skip
    assert dead.returncode == 1
    theirs2.close()
    guest2.settimeout(10)
    assert guest2.recv(10) == b""


@pytest.mark.unit
def test_guestfwd_rules_reach_only_the_host_loopback():
    from testbed.cluster.vm import boot
    from testbed.core.errors import TestbedError

    (rule,) = boot._guestfwd_rules([(5555, 40001)])
    assert rule.startswith("tcp:10.0.2.100:5555-cmd:") and rule.endswith("guestfwd.py 40001")
    for bad in [(0, 1), (5555, 70000), ("x", 1), (1, 2, 3), "5555"]:
        with pytest.raises(TestbedError):
            boot._guestfwd_rules([bad])


@pytest.mark.parametrize(
    "endpoint, where",
    [("tcp://127.0.0.1:5555", "the guest's own loopback"),
     ("tcp://10.0.2.2:5555", "outside the guest"),
     ("tcp://192.0.2.7:5555", "outside the guest")],
)  # fmt: skip
def test_vm_experiment_refuses_delegates_the_guest_cannot_reach(tmp_path, endpoint, where):
    plan = tmp_path / "p.yml"
    plan.write_text(f"backend: kmod\nworkloads: [cat]\nforward: [read]\n"
                    f"delegates: [kthread, {{name: far, endpoint: '{endpoint}'}}]\n")  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "testbed", "vm", "experiment", str(plan), "-o",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"testbed: error: plan p: delegate far ({endpoint}) is {where}; in the guest a plan "
        "may use kthread, local, or tcp://10.0.2.100:PORT (a delegate on this host)"
    ]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- VM tests

vm_only = [pytest.mark.vm, pytest.mark.slow]


def _vm_skip_reason() -> str | None:
    from testbed.cluster import vm

    missing = vm.missing_packages()
    if missing:
        return f"the VM harness needs {' '.join(missing)} (bash .ci/setup installs them)"
    kernel = vm.find_kernel()
    if not os.access(kernel.image, os.R_OK):
        return "the guest kernel image is not readable (run as root)"
    if not kernel.has_headers():
        return f"no kernel headers for the guest kernel {kernel.version}"
    if shutil.which("gcc") is None or shutil.which("make") is None:
        return "gcc/make missing (apt-get install build-essential)"
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The module built on the host for the guest kernel, plus the C workloads."""
    reason = _vm_skip_reason()
    if reason:
        pytest.skip(reason)
    from testbed.cluster import vm

    share = tmp_path_factory.mktemp("kmod-vm")
    kernel = vm.find_kernel()
    build = share / "build"
    shutil.copytree(KMOD, build, ignore=shutil.ignore_patterns("vm", "*.o", "*.ko", ".*", "*.mod*"))
    proc = subprocess.run(
        ["make", "-C", str(build), f"KDIR={kernel.build_dir}", "W=1", "modules"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    (share / "build.log").write_text(log)
    bins = share / "bin"
    bins.mkdir()
    _gcc(WRITER_C, bins / "writer", "-pthread")
    _gcc(SYSRET_C, bins / "sysret", "-pthread")
    _gcc(EUID_C, bins / "euid")
    _gcc(CRELAY_C, bins / "crelay", f"-I{UAPI.parent}")
    return {"share": share, "kernel": kernel, "build_rc": proc.returncode, "log": log}


@pytest.mark.vm
def test_module_builds_without_warnings(built):
    assert built["build_rc"] == 0, built["log"][-3000:]
    warnings = [ln for ln in built["log"].splitlines() if re.search(r"warning|WARNING", ln)]
    assert warnings == []
    assert (built["share"] / "build" / "mktrace.ko").is_file()


@pytest.mark.vm
def test_kernel_doc_comments_match_the_code(built):
    script = built["kernel"].build_dir / "scripts" / "kernel-doc"
    if not script.is_file():
        pytest.skip(f"{script} is not in the headers package")
    files = sorted(str(p) for p in [*KMOD.glob("*.[ch]"), UAPI])
    res = subprocess.run(["perl", str(script), "-none", *files], capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr


@pytest.fixture(scope="module")
def guest(built):
    """Run every in-guest check in one boot; the parsed results.json."""
    from testbed.cluster import vm

    if built["build_rc"] != 0:
        pytest.fail("the module did not build (see test_module_builds_without_warnings)")
    share = built["share"]
    t0 = time.monotonic()
    # KMOD_GUEST_STEPS / KMOD_GUEST_REPEAT (see kmod_guest.py) pick and repeat steps
    env = {k: v for k, v in os.environ.items() if k.startswith("KMOD_GUEST_")}
    try:
        res = vm.run(
            [sys.executable, str(GUEST), str(vm.RESULTS_DIR)],
            share=share, timeout=1500, kernel=built["kernel"], cwd=str(REPO), env=env,
        )  # fmt: skip
    except (vm.VMTimeout, vm.VMFailed) as e:  # the steps that finished still count
        # (a soft lockup ends the guest at once: BASE_KERNEL_ARGS has softlockup_panic)
        res = e.result
    (share / "guest-output.txt").write_text(res.output)
    (share / "guest-console.txt").write_text(res.console)
    path = share / "results.json"
    assert path.is_file(), (
        f"guest wrote no results (status {res.exit_status}):\n{res.output[-4000:]}"
    )
    results = json.loads(path.read_text())
    results["_output"] = res.output
    if res.timed_out or res.exit_status is None:  # why the missing steps are missing
        console = [ln for ln in res.console.splitlines() if "testbed-vm" not in ln]
        how = "timed out" if res.timed_out else "stopped without a status"
        results["_output"] += (f"\n[guest {how} after {res.seconds:.0f} s; console "
                               f"tail:]\n" + "\n".join(console[-40:]))  # fmt: skip
    print(f"\nkmod guest checks took {time.monotonic() - t0:.0f} s; results in {path}")
    _print_numbers(results)
    return results


def _part(results: dict, name: str) -> dict:
    part = results.get(name)
    assert part is not None, f"guest check {name} did not run:\n{results['_output'][-3000:]}"
    assert "error" not in part, f"guest check {name} failed:\n{part['error']}"
    return part


def _print_numbers(results: dict) -> None:
    k = results.get("kthread", {})
    base = None
    for row in k.get("cost", []):
        base = row["min_ns"] if base is None else base
        print(f"kthread run D={row['delay_ns'] / 1000:g} us (2D = {2 * row['delay_ns'] / 1000:g} us): "
              f"per call min {row['min_ns'] / 1000:.1f} us, median {row['median_ns'] / 1000:.1f} us, "
              f"mean {row['mean_ns'] / 1000:.1f} us; min growth over D=0 "
              f"{(row['min_ns'] - base) / 1000:.1f} us; handoff (min - 2D) "
              f"{(row['min_ns'] - 2 * row['delay_ns']) / 1000:.1f} us")  # fmt: skip
    fth = results.get("faithful", {})
    for mech, f in fth.get("f_c", {}).items():
        print(f"f_c {mech}: median {f['median_us']:.1f} us [{f['median_lo_us']:.1f}, "
              f"{f['median_hi_us']:.1f}], mean {f['mean_us']:.1f} us [{f['mean_lo_us']:.1f}, "
              f"{f['mean_hi_us']:.1f}], min {f['min_us']:.1f} us over {f['calls']} calls "
              f"in {f['runs']} runs")  # fmt: skip
    r = results.get("relay", {})
    if "rtt" in r:
        print(f"relay mode (mini relay): trap->resume median {r['rtt']['median_ns'] / 1000:.0f} us, "
              f"mean {r['rtt']['mean_ns'] / 1000:.0f} us over {r['rtt']['n']} calls")  # fmt: skip
    c = r.get("c_relay", {})
    if c:
        print(f"relay channel alone (C relay, {c['count']} getppid calls): trap->release "
              f"min {c['min_ns'] / 1000:.1f} us, mean {c['mean_ns'] / 1000:.1f} us")  # fmt: skip
    run = results.get("run", {})
    if "overhead_median_ns" in run:
        print(f"testbed run --backend kmod: overhead median {run['overhead_median_ns'] / 1000:.0f} us,"
              f" rtt median {run['rtt_median_ns'] / 1000:.0f} us over {run['records']} calls")  # fmt: skip


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_load_unload_twice(guest):
    part = _part(guest, "load")
    assert part["cycles"] == [True, True]
    assert part["abi"] == K.ABI_VERSION
    assert part["nr_syscalls"] > 400


@pytest.mark.vm
@pytest.mark.slow
def test_garbage_is_rejected(guest):
    part = _part(guest, "garbage")
    expected = part.pop("_expected")
    assert part == expected
    assert part["fuzz_ok"] is True


@pytest.mark.vm
@pytest.mark.slow
def test_kthread_mode_output_counts_and_cost(guest):
    part = _part(guest, "kthread")
    n = part["n"]
    rows = part["cost"]
    for row in rows:
        assert row["same_output"] and row["exit_status"] == 0, row
        # records == the module's count == the writer's real number of write(2) calls
        assert row["count"] == row["module_count"] == row["syscalls_csv_n"] == n, row
        assert row["dropped"] == 0 and row["released"] == 0
        assert row["mode"] == "kthread" and row["stamped"] and not row["faithful"]
        label = "kmod-kthread/same-node"
        assert row["run_mechanism"] == label
        assert row["mechanism"] == (
            label + (f"+{row['delay_ns'] / 1000:g}us" if row["delay_ns"] else "")
        )
        assert row["wall_s"] and row["wall_s"] > 0
        # trap <= queued < arrive < done <= resume, and each leg spins D: hard bounds
        assert row["order_ok"]
        assert row["min_leg_to_ns"] >= row["delay_ns"] and row["min_leg_back_ns"] >= row["delay_ns"]
        assert row["min_ns"] >= 2 * row["delay_ns"], row
    # the minimum per-call cost grows with D (by about 2·D: printed, not asserted)
    assert [r["delay_ns"] for r in rows] == [0, 100_000, 500_000]
    assert rows[0]["min_ns"] < rows[1]["min_ns"] < rows[2]["min_ns"]
    assert part["dd"]["same_output"]
    assert part["dd"]["count"] == part["dd"]["blocks"]
    assert part["threads"]["count"] == part["threads"]["expected"] == part["threads"]["lines"]
    assert part["threads"]["tids"] == 4
    assert part["descendants"] == {"with": part["descendants_expected"], "without": 0}
    assert part["other_process_untouched"] == 0
    wide = part["wide"]
    assert wide["set_size"] > 64 and wide["same_output"]
    assert wide["exit_group"] == 1 and wide["above_64"] > 0


@pytest.mark.vm
@pytest.mark.slow
def test_faithful_variant_runs_and_is_recorded(guest):
    part = _part(guest, "faithful")
    n, delay = part["n"], part["delay_ns"]
    for name, runs in part["runs"].items():
        assert len(runs) == 3
        for row in runs:
            assert row["same_output"] and row["count"] == row["module_count"] == n, (name, row)
            assert row["faithful"] == (name != "default")
            assert row["flush_caller_tlb"] == (name == "faithful+flush-caller")
            assert row["order_ok"] and row["min_ns"] >= 2 * delay
    param = part["param"]
    assert param["set_rc"] == 0 and param["reset_rc"] == 0
    assert param["faithful"] is True and param["param"] == "Y" and param["count"] == 10
    # analysis.compare fits each mechanism and predicts with it (t_nd from the profile)
    fc = part["f_c"]
    assert set(fc) == {"kmod-kthread/same-node+50us", "kmod-kthread-faithful/same-node+50us",
                       "kmod-kthread-faithful-flushcaller/same-node+50us"}  # fmt: skip
    for f in fc.values():
        assert f["calls"] == 3 * n and f["min_us"] >= delay / 1000  # f_c >= D: overhead >= 2D
    assert len(part["predicted"]) == 9
    for row in part["predicted"]:
        assert row["t_nd_source"] == "profile native runs (untraced)"
        assert row["predicted_t_d_s"] > 0 and row["measured_t_d_s"] > 0


@pytest.mark.vm
@pytest.mark.slow
def test_hardening_of_the_module(guest):
    part = _part(guest, "hardening")
    suid = part["setuid"]
    assert suid["native_euid"] == "65534"  # the set-uid bit works in the guest ...
    assert suid["traced_euid"] == "0"  # ... but gives nothing to a forwarded process
    assert suid["forwarded_writes"] == 1
    tp = part["timeout_param"]
    assert set(tp["bad_writes"].values()) == {errno.EINVAL}
    assert tp["after_bad"] == tp["before"] == "5000"
    assert tp["ok_rc"] == 0 and tp["new_session_timeout_ns"] == 2_000_000_000
    assert tp["restore_rc"] == 0 and tp["rmmod"] == 0
    assert tp["bad_load_rc"] != 0 and tp["reload_rc"] == 0
    rq = part["requeue_wakes"]
    assert (rq["first"], rq["consumed"], rq["read_errno"]) == (1, 0, errno.EFAULT)
    assert rq["woken"] == 1 and rq["queued_after_fault"] == 1
    assert rq["answered"] and rq["status"] == 0 and len(rq["output"]) == 2
    many = part["many_inflight"]
    t = many["threads"]
    assert many["read"] == many["inflight"] == many["pending"] == many["replied"] == t
    assert many["replied_twice"] == 0 and many["pending_after"] == 0
    assert many["status"] == 0 and many["lines"] == t
    assert part["other_session_descendant"] == {"descendants": str(errno.EBUSY), "own": "0"}


@pytest.mark.vm
@pytest.mark.slow
def test_experiment_plan_runs_kthread_delegates(guest):
    part = _part(guest, "experiment")
    assert part["rc"] == 0, part["stderr"]
    assert "ran=2 skipped=0 failed=0" in part["stdout"]
    assert part["cells"] == {
        "cat.read.kthread.r1": {"mode": "kthread", "faithful": False, "delay_us": 0.0,
                                "calls": part["cells"]["cat.read.kthread.r1"]["calls"],
                                "matches_native": True},
        "cat.read.kt50.r1": {"mode": "kthread", "faithful": True, "delay_us": 50.0,
                             "calls": part["cells"]["cat.read.kthread.r1"]["calls"],
                             "matches_native": True},
    }  # fmt: skip
    assert part["cells"]["cat.read.kthread.r1"]["calls"] > 0


@pytest.mark.vm
@pytest.mark.slow
def test_relay_mode_results_and_records(guest):
    part = _part(guest, "relay")
    assert part["returned"] == ["4242 0"] * 3
    assert part["errno"] == ["-1 1"] * 2
    assert part["gzip_same"]
    # every forwarded call of the program became one request, and the kernel agrees
    assert part["records"] == part["kernel_count"] == part["strace_count"]
    assert part["records_valid"]
    assert part["threads_lines"] == part["threads_expected"]
    assert part["threads_records"] == part["threads_expected"]
    assert part["c_relay"]["status"] == 0 and part["c_relay"]["count"] == 300


@pytest.mark.vm
@pytest.mark.slow
def test_testbed_run_backend_kmod(guest):
    part = _part(guest, "run")
    assert part["exit_status"] == 0, part.get("stderr")
    assert part["same_output"]
    assert part["backend"] == "kmod"
    assert part["records"] == part["strace_count"]
    assert part["faults"] == 0


@pytest.mark.vm
@pytest.mark.slow
def test_faults_release_every_caller(guest):
    part = _part(guest, "faults")
    kill = part["relay_killed"]
    assert kill["pending_before_kill"] == 1
    assert kill["rmmod_refused"] is True and kill["still_loaded"] is True
    # the program dies with its relay (parent-death signal, as with seccomp)
    assert kill["exited"] and kill["signal"] == signal.SIGKILL, kill
    assert kill["seconds"] < 15, kill
    # a session closed with a call in flight releases it, well before the 30 s
    # per-call timeout: the call continues locally (a real getppid, errno 0)
    closed = part["session_closed"]
    assert closed["closed"] and closed["exit_status"] == 0, closed
    assert closed["seconds"] < 15, closed
    assert len(closed["output"]) == 1 and closed["output"][0].split()[1] == "0", closed
    assert part["timeout_eio"]["output"] == ["-1 5", "-1 5"]  # EIO
    assert part["timeout_eio"]["released"] == 2
    cont = part["timeout_continue"]["output"]
    assert len(cont) == 1 and int(cont[0].split()[0]) > 0
    victim = part["sigkill"]
    assert victim["exited"] and victim["signal"] == signal.SIGKILL
    assert victim["queued_after"] == 0 and victim["inflight_after"] == 0
    race = part["close_race"]
    assert race["served"] == 40 and race["pending_at_close"] == 4
    # each of the 4 threads got its released call's -EIO (and stopped there)
    assert race["unloaded"] and race["program_status"] == 4 and race["reloaded"]
    assert part["unload"]["rmmod_rc"] == 0


@pytest.mark.vm
@pytest.mark.slow
def test_dmesg_has_no_warnings(guest):
    part = _part(guest, "dmesg")
    assert part["bad"] == [], "\n".join(part["bad"])
    assert part["loaded_lines"] >= 3  # three loads
    assert part["unloaded_lines"] >= 3


# ---------------------------------------------------------------- three mechanisms, TLB (VM)

MECH_PLAN = """name: mech
backend: kmod
workloads:
  - {name: cat, size_mb: 0.3}
  - {name: gzip, size_mb: 0.3}
forward: ["read,write"]
delegates:
  - kthread
  - local
  - {name: host, endpoint: "tcp://10.0.2.100:5555"}
"""
TLB_PLAN = """name: tlb
backend: kmod
workloads:
  - {name: gain, gamma: [1, 2, 8], phases: 2, samples: 2000000}
forward: [write]
delegates:
  - {name: kt, kthread: {}}
  - {name: ktfc, kthread: {faithful: true, flush_caller_tlb: true}}
"""
THREE = {"kmod-kthread/same-node", "kmod/tcp/loopback", "kmod/tcp/remote"}


@pytest.fixture(scope="module")
def vm_experiment(built):
    """``testbed vm experiment`` of two small plans in one boot, then ``testbed analyze``."""
    if built["build_rc"] != 0:
        pytest.fail("the module did not build (see test_module_builds_without_warnings)")
    share = built["share"]
    plans = []
    for name, text in (("mech", MECH_PLAN), ("tlb", TLB_PLAN)):
        (share / f"{name}.yml").write_text(text)
        plans.append(str(share / f"{name}.yml"))
    out = share / "vmexp"
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "testbed", "vm", "experiment", *plans, "-o", str(out),
         "--module", str(share / "build" / "mktrace.ko"), "--timeout", "1500"],
        capture_output=True, text=True, timeout=1700, cwd=REPO,
    )  # fmt: skip
    took = time.monotonic() - t0
    reports = {}
    for name in ("mech", "tlb"):
        rep = share / f"report-{name}"
        a = subprocess.run([sys.executable, "-m", "testbed", "analyze", str(out / name), "-o",
                            str(rep)], capture_output=True, text=True, timeout=600)  # fmt: skip
        reports[name] = {"rc": a.returncode, "stderr": a.stderr, "dir": rep}
    print(f"\nvm experiment took {took:.0f} s (guest + host delegate); results in {out}")
    return {"res": res, "out": out, "reports": reports}


def _report(vm_experiment, name: str):
    import pandas as pd

    res = vm_experiment["res"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    rep = vm_experiment["reports"][name]
    assert rep["rc"] == 0, rep["stderr"]
    return rep["dir"], (rep["dir"] / "report.md").read_text(), pd


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_three_mechanisms_plan_in_the_guest(vm_experiment):
    from testbed.core import rundir

    rep, text, pd = _report(vm_experiment, "mech")
    assert "experiment mech: ran=6 skipped=0 failed=0" in vm_experiment["res"].stdout
    side = pd.read_csv(rep / "tables" / "mechanisms_fc.csv")
    assert set(side["mechanism"]) == THREE  # three *measured* mechanisms, no paper row
    assert (side["calls"] > 0).all() and (side["runs"] == 2).all()
    for _, m in side.iterrows():
        print(f"f_c {m['mechanism']}: median {m['median (µs)']:.1f} us [{m['median lo']:.1f}, "
              f"{m['median hi']:.1f}], mean {m['mean (µs)']:.1f} us [{m['mean lo']:.1f}, "
              f"{m['mean hi']:.1f}]; median ratio to the cheapest {m['median ratio']:.2f} "
              f"[{m['ratio lo']:.2f}, {m['ratio hi']:.2f}], mean ratio {m['mean ratio']:.2f}")  # fmt: skip
    per = pd.read_csv(rep / "tables" / "mechanisms_per_workload.csv")
    assert len(per) == 6 and per["predicted_S_r"].notna().all()
    assert "only ratios between mechanisms measured in one guest" in text.lower()
    hosts = {}
    for d in sorted((vm_experiment["out"] / "mech" / "guest").glob("*.r1")):
        run = rundir.load(d)
        cell = json.loads((d / "experiment.json").read_text())
        assert cell["output_matches_native"] and run.meta["exit_status"] == 0, d
        assert run.meta["host"]["virtualization"]["emulated"] is True  # stamped: QEMU TCG
        hosts[cell["delegate"]] = (run.meta.get("delegate") or {}).get("host")
    # the "host" delegate really ran on this machine; "local" and kthread in the guest
    import socket

    assert hosts == {"kthread": "testbed-vm", "local": "testbed-vm", "host": socket.gethostname()}


@pytest.mark.vm
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tlb_experiment_in_the_guest(vm_experiment):
    rep, text, pd = _report(vm_experiment, "tlb")
    assert "experiment tlb: ran=6 skipped=0 failed=0" in vm_experiment["res"].stdout
    t = pd.read_csv(rep / "tables" / "tlb_experiment.csv")
    faithful, default = "kmod-kthread-faithful-flushcaller/same-node", "kmod-kthread/same-node"
    assert set(t["mechanism"]) == {faithful, default}
    assert sorted(t["gamma"]) == [1, 1, 2, 2, 8, 8]
    above = t[t["gamma"] > 1]  # predicted from the γ = 1 run of the same variant
    assert (above["predicted_runs"] == 1).all() and above["mean_abs_error"].notna().all()
    for r in t.itertuples():
        print(f"TLB {r.mechanism} γ={r.gamma}: f_c(γ=1) {r.f_c_gamma1_us:.1f} us, measured "
              f"{r.measured_t_d_s:.3f} s, predicted {r.predicted_t_d_s:.3f} s, error "
              f"{r.mean_error:+.1%}")  # fmt: skip
    assert "## TLB experiment" in text and "What TCG cannot show" in text
    verdict = [ln for ln in text.splitlines() if ln.startswith(f"- `{faithful}` vs `{default}`")]
    assert len(verdict) == 1 and "explain" in verdict[0], verdict
    print(verdict[0])
