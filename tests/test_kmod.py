"""The mktrace kernel module (kmod/) and its Python side (testbed/interpose/kmod.py).

Host tests: the uapi header and the Python mirror agree (a C program compiled
against the header prints sizes, offsets, constants and ioctl numbers); the
backend fails with one clear line where the module is not loaded.

VM tests: the module is built on the host with Kbuild against the guest
kernel's headers (a warning fails the build test), then ONE guest boot
(``testbed.vm.run``) runs every in-kernel check: this file is also the guest
script (``python3 tests/test_kmod.py guest SHARE``), which writes
``results.json`` to the results share; each test below asserts on one part of
it.  Numbers (kthread handoff cost against the delay D, relay round trips) are
printed and kept in ``SHARE/results.json``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KMOD = REPO / "kmod"
UAPI = KMOD / "include" / "uapi" / "mktrace.h"

if str(REPO) not in sys.path:  # the guest runs this file as a script
    sys.path.insert(0, str(REPO))

from testbed.interpose import BackendError  # noqa: E402
from testbed.interpose import kmod as K  # noqa: E402

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
	C(MKTRACE_ABI_VERSION); C(MKTRACE_MAX_SYSCALLS); C(MKTRACE_SET_WORDS);
	C(MKTRACE_MODE_KTHREAD); C(MKTRACE_MODE_RELAY); C(MKTRACE_F_DESCENDANTS);
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

# sysret N: N getppid() calls via syscall(2), each result printed as "RET ERRNO".
SYSRET_C = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 1;
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
		if (ioctl(fd, MKTRACE_IOC_REGISTER, 0))
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

NR_READ, NR_WRITE, NR_GETPPID = 0, 1, 110
# ~120 implemented syscalls, numbers up to 334: no 64-call limit, noreturn exit_group
WIDE_SET = """read write open close stat fstat lstat poll lseek mmap mprotect munmap brk
rt_sigaction rt_sigprocmask ioctl pread64 pwrite64 readv writev access pipe select
sched_yield mremap msync mincore madvise dup dup2 nanosleep getitimer alarm setitimer
getpid sendfile socket connect accept sendto recvfrom shutdown bind listen getsockname
getpeername socketpair setsockopt getsockopt wait4 kill uname fcntl flock fsync fdatasync
truncate ftruncate getdents getcwd chdir fchdir rename mkdir rmdir creat link unlink symlink
readlink chmod fchmod chown fchown lchown umask gettimeofday getrlimit getrusage sysinfo
times getuid getgid setuid setgid geteuid getegid getppid getpgrp setsid getgroups
sigaltstack statfs fstatfs prctl arch_prctl gettid futex set_tid_address clock_gettime
clock_nanosleep exit_group openat newfstatat readlinkat faccessat pselect6 ppoll
set_robust_list prlimit64 getrandom statx getdents64 fadvise64 rseq lgetxattr getxattr
listxattr llistxattr""".split()  # noqa: SIM905 - a readable block
NR_UNIMPLEMENTED = 335  # a hole of the x86-64 table: sys_ni_syscall


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
        [sys.executable, "-m", "testbed.interpose.kmod", "kthread", "--forward", "write",
         "--device", str(tmp_path / "none"), "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"testbed: error: {tmp_path / 'none'} missing (see docs/kmod.md)"
    ]


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


# ---------------------------------------------------------------- VM tests

vm_only = [pytest.mark.vm, pytest.mark.slow]


def _vm_skip_reason() -> str | None:
    from testbed import vm

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
    from testbed import vm

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
    _gcc(SYSRET_C, bins / "sysret")
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
    from testbed import vm

    if built["build_rc"] != 0:
        pytest.skip("the module did not build (see test_module_builds_without_warnings)")
    share = built["share"]
    t0 = time.monotonic()
    res = vm.run(
        [sys.executable, str(Path(__file__).resolve()), "guest", str(vm.RESULTS_DIR)],
        share=share, timeout=600, kernel=built["kernel"], cwd=str(REPO),
    )  # fmt: skip
    (share / "guest-output.txt").write_text(res.output)
    path = share / "results.json"
    assert path.is_file(), (
        f"guest wrote no results (status {res.exit_status}):\n{res.output[-4000:]}"
    )
    results = json.loads(path.read_text())
    results["_output"] = res.output
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
    for row in k.get("cost", []):
        print(f"kthread D={row['delay_ns'] / 1000:g} us (2D = {2 * row['delay_ns'] / 1000:g} us): "
              f"per call mean {row['mean_ns'] / 1000:.1f} us, min {row['min_ns'] / 1000:.1f} us; "
              f"growth over D=0: mean {row['growth_ns'] / 1000:.1f} us, "
              f"min {row['min_growth_ns'] / 1000:.1f} us; handoff (min - 2D) "
              f"{row['min_handoff_ns'] / 1000:.1f} us")  # fmt: skip
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
@pytest.mark.timeout(900)
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
    for row in part["cost"]:
        assert row["same_output"], row
        assert row["count"] == n, row  # == the writer's real number of write(2) calls
        assert row["released"] == 0
        # the delegate spins D twice per call: a hard lower bound, not a timing guess
        assert row["min_ns"] >= 2 * row["delay_ns"], row
    assert part["dd"]["same_output"]
    assert part["dd"]["count"] == part["dd"]["blocks"]
    assert part["threads"]["count"] == part["threads"]["expected"]
    assert part["threads"]["lines"] == part["threads"]["expected"]
    assert part["descendants"] == {"with": part["descendants_expected"], "without": 0}
    assert part["other_process_untouched"] == 0
    wide = part["wide"]
    assert wide["set_size"] > 64 and wide["same_output"]
    assert wide["exit_group"] == 1 and wide["above_64"] > 0


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
    # released by the close, well before the 30 s per-call timeout
    assert kill["exited"] and kill["seconds"] < 15, kill
    assert kill["output"][0].split()[1] == "0"  # continued locally: a real getppid
    assert part["timeout_eio"]["output"] == ["-1 5", "-1 5"]  # EIO
    assert part["timeout_eio"]["released"] == 2
    cont = part["timeout_continue"]["output"]
    assert len(cont) == 1 and int(cont[0].split()[0]) > 0
    victim = part["sigkill"]
    assert victim["exited"] and victim["signal"] == signal.SIGKILL
    assert victim["queued_after"] == 0 and victim["inflight_after"] == 0
    race = part["close_race"]
    assert race["served"] == 40 and race["pending_at_close"] > 0
    assert race["unloaded"] and race["writer_status"] == 0 and race["reloaded"]
    assert part["unload"]["rmmod_rc"] == 0


@pytest.mark.vm
@pytest.mark.slow
def test_dmesg_has_no_warnings(guest):
    part = _part(guest, "dmesg")
    assert part["bad"] == [], "\n".join(part["bad"])
    assert part["loaded_lines"] >= 3  # three loads
    assert part["unloaded_lines"] >= 3


# ================================================================ guest side
#
# Everything below runs inside the VM (python3 tests/test_kmod.py guest DIR).


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("timeout", 120)
    return subprocess.run(cmd, **kw)


def _wait_exit(pid: int, timeout: float) -> int | None:
    """waitpid with a deadline (the test process is a subreaper): status or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got:
            return status
        time.sleep(0.02)
    return None


def _become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to us


def _strace_count(argv: list[str], names: str) -> int:
    """Independent count of the calls ``names`` of a native run (strace -f -c)."""
    log = Path("/tmp/kmod-guest/strace.txt")  # no /dev/stderr under a bare devtmpfs
    res = _sh(["strace", "-f", "-c", "-U", "name,calls", "-e", f"trace={names}",
               "-o", str(log), *argv], stdout=subprocess.DEVNULL)  # fmt: skip
    if res.returncode:
        raise RuntimeError(f"strace failed: {res.stderr.decode()[-500:]}")
    total = 0
    for line in log.read_text().splitlines():
        m = re.match(r"^\s*(\w+)\s+(\d+)\s*$", line)
        if m and m.group(1) != "total":
            total += int(m.group(2))
    return total


def _ioctl_errno(fd: int, req: int, arg=0) -> int:
    try:
        fcntl.ioctl(fd, req, arg)
    except OSError as exc:
        return exc.errno
    return 0


def _write_errno(fd: int, data: bytes) -> int:
    try:
        os.write(fd, data)
    except OSError as exc:
        return exc.errno
    return 0


def g_load(ko: str) -> dict:
    cycles = []
    for _ in range(2):
        ins = _sh(["insmod", ko])
        present = os.path.exists(K.DEVICE)
        rm = _sh(["rmmod", "mktrace"])
        cycles.append(ins.returncode == 0 and present and rm.returncode == 0)
    ins = _sh(["insmod", ko])
    if ins.returncode:
        raise RuntimeError(f"insmod failed: {ins.stderr.decode()}")
    dev = K.Device()
    st = dev.status()
    dev.close()
    return {"cycles": cycles, "abi": st.abi_version, "nr_syscalls": st.nr_syscalls}


def g_garbage() -> dict:
    E = errno
    fd = os.open(K.DEVICE, os.O_RDWR | os.O_NONBLOCK)
    bad = K.Config(mode=K.MODE_RELAY, timeout_ns=10**9)
    out: dict = {}
    out["write_7_bytes"] = _write_errno(fd, os.urandom(7))
    out["write_empty"] = _write_errno(fd, b"")
    out["reply_bad_action"] = _write_errno(fd, bytes(K.Reply(seq=1, action=9)))
    out["reply_reserved"] = _write_errno(fd, bytes(K.Reply(seq=1, action=0, reserved=1)))
    out["reply_restart_code"] = _write_errno(fd, bytes(K.Reply(seq=1, action=1, value=-512)))
    out["reply_unknown_seq"] = _write_errno(fd, bytes(K.Reply(seq=12345, action=0)))
    try:
        os.read(fd, 10)
        out["read_short_buffer"] = 0
    except OSError as exc:
        out["read_short_buffer"] = exc.errno
    try:
        os.read(fd, 80)
        out["read_nothing_queued"] = 0
    except OSError as exc:
        out["read_nothing_queued"] = exc.errno
    for name, field, value in [("mode_0", "mode", 0), ("mode_3", "mode", 3),
                               ("flags", "flags", 0x80), ("reserved", "reserved", 1),
                               ("delay", "delay_ns", K.MAX_DELAY_NS + 1),
                               ("timeout_0", "timeout_ns", 0),
                               ("timeout_huge", "timeout_ns", K.MAX_TIMEOUT_NS + 1),
                               ("action", "release_action", 7)]:  # fmt: skip
        cfg = K.Config.from_buffer_copy(bytes(bad))
        setattr(cfg, field, value)
        out[f"config_{name}"] = _ioctl_errno(fd, K.IOC_SET_CONFIG, cfg)
    out["config_valid"] = _ioctl_errno(fd, K.IOC_SET_CONFIG, bad)
    out["set_past_table"] = _ioctl_errno(fd, K.IOC_SET_SYSCALLS, K._bitmap([1000]))
    out["set_unimplemented"] = _ioctl_errno(fd, K.IOC_SET_SYSCALLS, K._bitmap([NR_UNIMPLEMENTED]))
    out["set_bad_pointer"] = _ioctl_errno(fd, K.IOC_SET_SYSCALLS, 1)
    out["stats_too_many"] = _ioctl_errno(fd, K.IOC_GET_STATS, K.StatsQuery(buf=0, count=5000))
    out["stats_bad_buffer"] = _ioctl_errno(fd, K.IOC_GET_STATS, K.StatsQuery(buf=8, count=4))
    out["register_with_arg"] = _ioctl_errno(fd, K.IOC_REGISTER, 1)
    out["unknown_ioctl"] = _ioctl_errno(fd, K._ioc(0, 0x7F, 0))
    out["is_pending_unknown"] = _ioctl_errno(fd, K.IOC_IS_PENDING, ctypes.c_uint64(99))
    # a second session may not register a process another session traces
    fd2 = os.open(K.DEVICE, os.O_RDWR)
    out["register_first"] = _ioctl_errno(fd2, K.IOC_REGISTER)
    out["register_again"] = _ioctl_errno(fd2, K.IOC_REGISTER)
    out["register_other_session"] = _ioctl_errno(fd, K.IOC_REGISTER)
    os.close(fd2)
    # random bytes and random commands of our ioctl type: never an oops
    rng = __import__("random").Random(4)
    ok = True
    for _ in range(300):
        e = _write_errno(fd, rng.randbytes(rng.choice([1, 23, 24, 25, 48, 100, 4096])))
        ok &= e in (E.EINVAL, E.ENOENT)
        cmd = K._ioc(
            rng.randrange(4), rng.choice([0, 1, 2, 3, 5, 6, 7, 8, 0x40]), rng.randrange(0, 300)
        )
        if cmd != K.IOC_REGISTER:
            e = _ioctl_errno(fd, cmd, rng.choice([0, 1, 8, 4096]))
            ok &= e in (0, E.EINVAL, E.EFAULT, E.ENOTTY, E.ENOENT)
    os.close(fd)
    out["fuzz_ok"] = ok
    out["_expected"] = {
        "write_7_bytes": E.EINVAL, "write_empty": E.EINVAL, "reply_bad_action": E.EINVAL,
        "reply_reserved": E.EINVAL, "reply_restart_code": E.EINVAL,
        "reply_unknown_seq": E.ENOENT, "read_short_buffer": E.EINVAL,
        "read_nothing_queued": E.EAGAIN,
        **{f"config_{n}": E.EINVAL for n in ("mode_0", "mode_3", "flags", "reserved", "delay",
                                              "timeout_0", "timeout_huge", "action")},
        "config_valid": 0, "set_past_table": E.EINVAL, "set_unimplemented": E.EINVAL,
        "set_bad_pointer": E.EFAULT, "stats_too_many": E.EINVAL, "stats_bad_buffer": E.EFAULT,
        "register_with_arg": E.EINVAL, "unknown_ioctl": E.ENOTTY, "is_pending_unknown": E.ENOENT,
        "register_first": 0, "register_again": E.EBUSY, "register_other_session": E.EBUSY,
        "fuzz_ok": True,
    }  # fmt: skip
    return out


def _kthread(forward: str, delay_us: float, argv: list[str], stdout, tmp: Path,
             descendants: bool = False) -> dict:  # fmt: skip
    report = tmp / "kthread.json"
    cmd = [sys.executable, "-m", "testbed.interpose.kmod", "kthread", "--forward", forward,
           "--delay-us", str(delay_us), "--json", str(report)]  # fmt: skip
    if descendants:
        cmd.append("--descendants")
    res = _sh([*cmd, "--", *argv], stdout=stdout, stderr=subprocess.PIPE, timeout=300)
    if res.returncode:
        raise RuntimeError(f"kthread run failed: {res.stderr.decode()}")
    return json.loads(report.read_text())


def g_kthread(bins: Path, tmp: Path) -> dict:
    writer = str(bins / "writer")
    n = 400
    native = tmp / "native.txt"
    with open(native, "wb") as f:
        _sh([writer, str(n)], stdout=f)
    cost = []
    base = None
    for delay_us in (0, 100, 500):
        out = tmp / f"k{delay_us}.txt"
        with open(out, "wb") as f:
            rep = _kthread("write", delay_us, [writer, str(n)], f, tmp)
        row = rep["syscalls"][0]
        mean = row["total_ns"] / max(row["count"], 1)
        base = (mean, row["min_ns"]) if base is None else base
        cost.append({"delay_ns": rep["delay_ns"], "count": row["count"], "mean_ns": mean,
                     "min_ns": row["min_ns"], "growth_ns": mean - base[0],
                     "min_growth_ns": row["min_ns"] - base[1], "handoff_ns": row["handoff_ns"],
                     "min_handoff_ns": row["min_handoff_ns"], "released": row["released"],
                     "same_output": out.read_bytes() == native.read_bytes()})  # fmt: skip
    # dd: a real program, independent count = number of blocks (status=none: no stderr)
    data = tmp / "data.bin"
    data.write_bytes(os.urandom(300_000))
    dd_out = tmp / "dd.out"
    rep = _kthread("write", 20, ["dd", f"if={data}", f"of={dd_out}", "bs=4096", "status=none"],
                   subprocess.DEVNULL, tmp)  # fmt: skip
    dd = {"count": rep["syscalls"][0]["count"], "blocks": -(-300_000 // 4096),
          "same_output": dd_out.read_bytes() == data.read_bytes()}  # fmt: skip
    # threads of the target are traced too
    mt = tmp / "mt.txt"
    with open(mt, "wb") as f:
        rep = _kthread("write", 10, [writer, "50", "4"], f, tmp)
    threads = {"count": rep["syscalls"][0]["count"], "expected": 200,
               "lines": len(mt.read_bytes().splitlines())}  # fmt: skip
    # descendants: the shell itself writes nothing, its children 150 times
    script = f"{writer} 100 >/dev/null; {writer} 50 >/dev/null; exit 0"  # no exec of the last
    desc = {}
    for flag in (True, False):
        rep = _kthread("write", 0, ["sh", "-c", script], subprocess.DEVNULL, tmp, descendants=flag)
        desc["with" if flag else "without"] = rep["syscalls"][0]["count"]
    # a wide set (well past 64 numbers, exit_group included): same output, calls counted
    ls = ["ls", "-l", "--time-style=+", str(KMOD)]
    native_ls = _sh(ls).stdout
    ls_out = tmp / "ls.txt"
    with open(ls_out, "wb") as f:
        rep = _kthread(",".join(WIDE_SET), 0, ls, f, tmp)
    counts = {r["syscall"]: r["count"] for r in rep["syscalls"]}
    wide = {"set_size": len(WIDE_SET), "same_output": ls_out.read_bytes() == native_ls,
            "exit_group": counts.get("exit_group"),
            "above_64": sum(c for r, c in ((r["nr"], r["count"]) for r in rep["syscalls"])
                            if r >= 64)}  # fmt: skip
    # a process that is not the target is never forwarded, even while hooks are live
    dev = K.Device()
    dev.set_config("kthread")
    dev.set_syscalls([NR_WRITE])
    _sh([writer, "20"], stdout=subprocess.DEVNULL)
    other = sum(s.count for s in dev.stats().values())
    dev.close()
    return {"n": n, "cost": cost, "dd": dd, "threads": threads, "descendants": desc,
            "descendants_expected": 150, "other_process_untouched": other,
            "wide": wide}  # fmt: skip


def _mini_relay(backend: K.KmodBackend, argv: list[str], stdout, returns=None,
                limit_s: float = 120.0) -> tuple[int, list, list]:  # fmt: skip
    """Serve every trapped call: continue, or return returns[nr] = (value, errno)."""
    child = backend.launch(argv, stdout=stdout)
    traps, rtts = [], []
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        ready = select.select([backend.fileno()], [], [], 0.1)[0]
        if ready:
            trap = backend.receive()
            if trap is None:
                continue
            traps.append(trap)
            if returns and trap.nr in returns:
                ok = backend.resume_return(trap, *returns[trap.nr])
            else:
                ok = backend.resume_continue(trap)
            rtts.append(time.monotonic_ns() - trap.t_trap)
            assert ok
        elif child.poll() is not None and backend.finished():
            break
    return child.wait(timeout=30), traps, rtts


def _payload(tmp: Path) -> Path:
    """About 1 MB of compressible, deterministic text (gzip reads it in 64 KiB chunks)."""
    path = tmp / "payload.txt"
    if not path.exists():
        words = [f"w{i * 7919 % 1000:03d}" for i in range(4001)]
        lines = (" ".join(words[(12 * j + k) % 4001] for k in range(12)) for j in range(17000))
        path.write_text("\n".join(lines) + "\n")
    return path


def g_relay(bins: Path, tmp: Path) -> dict:
    sysret, writer = str(bins / "sysret"), str(bins / "writer")
    out: dict = {}

    def run(fwd, argv, returns=None):
        b = K.KmodBackend(frozenset(fwd), timeout_s=30)
        try:
            res_path = tmp / "relay.out"
            with open(res_path, "wb") as f:
                status, traps, rtts = _mini_relay(b, argv, f, returns)
            stats = b.stats()
        finally:
            b.close()
        return status, traps, rtts, stats, res_path.read_bytes()

    _s, _t, _r, _st, data = run({NR_GETPPID}, [sysret, "3"], {NR_GETPPID: (4242, 0)})
    out["returned"] = data.decode().splitlines()
    _s, _t, _r, _st, data = run({NR_GETPPID}, [sysret, "2"], {NR_GETPPID: (0, errno.EPERM)})
    out["errno"] = data.decode().splitlines()
    argv = ["gzip", "-c", "-6", str(_payload(tmp))]
    native = _sh(argv).stdout
    status, traps, rtts, stats, data = run({NR_READ, NR_WRITE}, argv)
    out["gzip_same"] = status == 0 and data == native
    fwd = [t for t in traps if t.nr in (NR_READ, NR_WRITE)]
    out["records"] = len(fwd)
    out["kernel_count"] = stats[NR_READ].count + stats[NR_WRITE].count
    out["strace_count"] = _strace_count(argv, "read,write")
    seqs = [t.id for t in traps]
    out["records_valid"] = (
        seqs == sorted(set(seqs))
        and all(t.tid > 0 and t.t_trap > 0 for t in fwd)
        and all(t.nr == NR_WRITE and t.args[0] == 1 for t in fwd if t.nr == NR_WRITE)
    )
    rtts_sorted = sorted(rtts)
    out["rtt"] = {"n": len(rtts), "mean_ns": sum(rtts) / max(len(rtts), 1),
                  "median_ns": rtts_sorted[len(rtts) // 2] if rtts else 0}  # fmt: skip
    # the channel alone: a C relay answering 300 getppid calls of a C program
    res = _sh([str(bins / "crelay"), K.DEVICE, "300", sysret], stdout=subprocess.PIPE)
    count, min_ns, mean_ns = (int(x) for x in res.stdout.split()[-3:])
    out["c_relay"] = {"status": res.returncode, "count": count, "min_ns": min_ns,
                      "mean_ns": mean_ns}  # fmt: skip
    status, traps, _r, _st, data = run({NR_WRITE}, [writer, "25", "4"])
    out["threads_expected"] = 100
    out["threads_lines"] = len(data.splitlines())
    out["threads_records"] = sum(1 for t in traps if t.nr == NR_WRITE)
    return out


def g_run(tmp: Path) -> dict:
    from testbed import rundir
    from testbed.relay import connect

    argv = ["gzip", "-c", "-6", str(_payload(tmp))]
    native = _sh(argv).stdout
    rdir = tmp / "run"
    out_file = tmp / "run.out"
    endpoint = "tcp://127.0.0.1:47391"  # the guest's own loopback
    delegate = subprocess.Popen([sys.executable, "-m", "testbed", "delegate", "--quiet",
                                 "--listen", endpoint])  # fmt: skip
    try:
        connect(endpoint, timeout_s=120)[1].close()  # Python starts slowly under TCG
        with open(out_file, "wb") as f:
            res = _sh([sys.executable, "-m", "testbed", "run", "--backend", "kmod", "--delegate",
                       endpoint, "--forward", "read,write", "-o", str(rdir), "--", *argv],
                      stdout=f, stderr=subprocess.PIPE, timeout=300)  # fmt: skip
    finally:
        delegate.terminate()
        delegate.wait(timeout=30)
    run = rundir.load(rdir)
    calls = run.calls()
    d = rundir.derived(calls)
    overhead = sorted(d["overhead"].tolist())
    rtt = sorted(x for x in d["rtt"].tolist() if x == x)
    return {
        "exit_status": res.returncode,
        "stderr": res.stderr.decode()[-2000:],
        "same_output": out_file.read_bytes() == native,
        "backend": run.meta.get("backend"),
        "records": len(calls),
        "faults": run.meta["calls"]["faults"],
        "strace_count": _strace_count(argv, "read,write"),
        "overhead_median_ns": overhead[len(overhead) // 2] if overhead else 0,
        "rtt_median_ns": rtt[len(rtt) // 2] if rtt else 0,
    }


_KILLED_RELAY = r"""
import os, select, sys, time
sys.path.insert(0, sys.argv[1])
from testbed.interpose import kmod as K
dev = K.Device()
dev.set_config("relay", timeout_ns=30 * 10**9)
dev.set_syscalls([110])
out = open(sys.argv[3], "wb")
child = K.launch_registered(dev, [sys.argv[2], "1"], stdout=out)
while dev.status().queued == 0:
    time.sleep(0.01)
assert dev.read_request().nr == 110   # now in flight, never answered
print(child.pid, flush=True)
time.sleep(600)
"""


def g_faults(bins: Path, tmp: Path, ko: str) -> dict:
    sysret = str(bins / "sysret")
    out: dict = {}
    # 1. the relay dies (SIGKILL) with a call in flight; rmmod meanwhile is refused
    out_path = tmp / "killed.out"
    relay = subprocess.Popen([sys.executable, "-c", _KILLED_RELAY, str(REPO), sysret, str(out_path)],
                             stdout=subprocess.PIPE)  # fmt: skip
    line = relay.stdout.readline().decode().strip()
    victim = int(line)
    rm = _sh(["rmmod", "mktrace"])
    kill = {"pending_before_kill": 1 if line else 0, "rmmod_refused": rm.returncode != 0,
            "still_loaded": os.path.exists("/sys/module/mktrace")}  # fmt: skip
    t0 = time.monotonic()
    relay.kill()
    relay.wait()
    status = _wait_exit(victim, 40)  # orphaned: we are its subreaper
    kill["exited"] = status is not None
    kill["seconds"] = time.monotonic() - t0
    kill["output"] = out_path.read_text().splitlines()
    out["relay_killed"] = kill

    # 2. nobody answers: the per-call timeout releases with -EIO, or continues
    for action, n in (("eio", 2), ("continue", 1)):
        dev = K.Device()
        dev.set_config("relay", timeout_ns=300_000_000, release_action=action)
        dev.set_syscalls([NR_GETPPID])
        res_path = tmp / f"timeout-{action}.out"
        with open(res_path, "wb") as f:
            child = K.launch_registered(dev, [sysret, str(n)], stdout=f)
            child.wait(timeout=60)
        released = sum(s.released for s in dev.stats().values())
        dev.close()
        out[f"timeout_{action}"] = {"output": res_path.read_text().splitlines(),
                                    "released": released}  # fmt: skip

    # 3. the traced program is SIGKILLed while blocked in a forwarded call
    dev = K.Device()
    dev.set_config("relay", timeout_ns=60 * 10**9)
    dev.set_syscalls([NR_GETPPID])
    child = K.launch_registered(dev, [sysret, "1"], stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while dev.status().queued == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    child.kill()
    try:
        rc = child.wait(timeout=20)
    except subprocess.TimeoutExpired:
        rc = None
    st = dev.status()
    out["sigkill"] = {"exited": rc is not None, "signal": -rc if rc is not None else None,
                      "seconds": time.monotonic() - t0, "queued_after": st.queued,
                      "inflight_after": st.inflight,
                      "released": sum(s.released for s in dev.stats().values())}  # fmt: skip
    dev.close()

    # 4. the relay closes with calls in flight from 4 threads, and rmmod races the
    #    released callers still returning through module code
    dev = K.Device()
    dev.set_config("relay", timeout_ns=30 * 10**9)
    dev.set_syscalls([NR_WRITE])
    child = K.launch_registered(dev, [str(bins / "writer"), "2000", "4"], stdout=subprocess.DEVNULL)
    served, deadline = 0, time.monotonic() + 60
    while served < 40 and time.monotonic() < deadline:
        if select.select([dev.fd], [], [], 0.1)[0]:
            req = dev.read_request()
            if req is not None and dev.reply(req.seq, K.REPLY_CONTINUE):
                served += 1
    while dev.status().queued + dev.status().inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    pending = dev.status().queued + dev.status().inflight
    dev.close()
    attempts, unloaded = 0, False
    while not unloaded and time.monotonic() < deadline:
        attempts += 1
        unloaded = _sh(["rmmod", "mktrace"]).returncode == 0
    try:
        rc = child.wait(timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        rc = None
    out["close_race"] = {"served": served, "pending_at_close": pending, "unloaded": unloaded,
                         "rmmod_attempts": attempts, "writer_status": rc,
                         "reloaded": _sh(["insmod", ko]).returncode == 0}  # fmt: skip
    return out


def g_dmesg() -> dict:
    text = _sh(["dmesg"]).stdout.decode(errors="replace")
    bad_re = re.compile(r"WARNING:|BUG:|Call Trace|lockdep|circular locking|Oops|"
                        r"general protection|blocked for more than|RCU stall|soft lockup")  # fmt: skip
    return {
        "bad": [ln for ln in text.splitlines() if bad_re.search(ln)],
        "loaded_lines": len(re.findall(r"mktrace: loaded", text)),
        "unloaded_lines": len(re.findall(r"mktrace: unloaded", text)),
    }


def guest_main(share: str) -> int:
    share_p = Path(share)
    tmp = Path("/tmp/kmod-guest")
    tmp.mkdir(exist_ok=True)
    bins = share_p / "bin"
    ko = str(share_p / "build" / "mktrace.ko")
    _become_subreaper()
    results: dict = {}
    steps = [
        ("load", lambda: g_load(ko)),
        ("garbage", g_garbage),
        ("kthread", lambda: g_kthread(bins, tmp)),
        ("relay", lambda: g_relay(bins, tmp)),
        ("run", lambda: g_run(tmp)),
        ("faults", lambda: g_faults(bins, tmp, ko)),
    ]
    for name, step in steps:
        t0 = time.monotonic()
        try:
            results[name] = step()
        except Exception:
            results[name] = {"error": traceback.format_exc()}
        print(f"guest: {name} done in {time.monotonic() - t0:.1f} s", flush=True)
        (share_p / "results.json").write_text(json.dumps(results, indent=1))
        if name == "load" and "error" in results[name]:
            break
    rm = _sh(["rmmod", "mktrace"])
    results.setdefault("faults", {})["unload"] = {"rmmod_rc": rm.returncode,
                                                  "stderr": rm.stderr.decode()}  # fmt: skip
    results["dmesg"] = g_dmesg()
    (share_p / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "guest":
        sys.exit(guest_main(sys.argv[2]))
    sys.exit("usage: python3 tests/test_kmod.py guest RESULTS_DIR (inside the VM)")
