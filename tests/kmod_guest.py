"""In-guest checks of the mktrace module: run inside the QEMU VM by tests/test_kmod.py.

``python3 tests/kmod_guest.py SHARE`` (in the guest, as root) loads
``SHARE/build/mktrace.ko``, runs every check below against the real module and
writes ``SHARE/results.json``; each test of ``tests/test_kmod.py`` asserts on
one part of it.  The C workloads are built on the host into ``SHARE/bin``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KMOD = REPO / "kmod"
if str(REPO) not in sys.path:  # run as a script in the guest
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from testbed.compute.interpose import kmod as K  # noqa: E402

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
PR_SET_NO_NEW_PRIVS = 38
TIMEOUT_PARAM = "/sys/module/mktrace/parameters/default_timeout_ms"
FAITHFUL_PARAM = "/sys/module/mktrace/parameters/kthread_faithful"
_libc = ctypes.CDLL(None, use_errno=True)


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


def _set_nnp() -> None:
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _in_child(fn) -> dict:
    """Run ``fn`` in a forked child with no_new_privs set (this process keeps none); its dict."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _set_nnp()
            data = json.dumps(fn()).encode()
        except BaseException:
            data = json.dumps({"error": traceback.format_exc()}).encode()
        os.write(w, data)
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


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
    cfg = K.Config.from_buffer_copy(bytes(bad))
    cfg.flags = K.F_FLUSH_CALLER  # flushing the caller's TLB alone: only with F_FAITHFUL
    out["config_flush_caller_alone"] = _ioctl_errno(fd, K.IOC_SET_CONFIG, cfg)
    # REGISTER needs no_new_privs (this process has not set it)
    fd2 = os.open(K.DEVICE, os.O_RDWR)
    out["register_without_nnp"] = _ioctl_errno(fd2, K.IOC_REGISTER)
    # a second session may not register a process another session traces
    out.update(_in_child(lambda: {
        "register_first": _ioctl_errno(fd2, K.IOC_REGISTER),
        "register_again": _ioctl_errno(fd2, K.IOC_REGISTER),
        "register_other_session": _ioctl_errno(fd, K.IOC_REGISTER),
    }))  # fmt: skip
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
        "config_flush_caller_alone": E.EINVAL, "register_without_nnp": E.EPERM,
        "register_with_arg": E.EINVAL, "unknown_ioctl": E.ENOTTY, "is_pending_unknown": E.ENOENT,
        "register_first": 0, "register_again": E.EBUSY, "register_other_session": E.EBUSY,
        "fuzz_ok": True,
    }  # fmt: skip
    return out


def _krun(forward: str, delay_us: float, argv: list[str], stdout, tmp: Path, name: str,
          extra: tuple[str, ...] = ()) -> tuple[dict, np.ndarray]:  # fmt: skip
    """``testbed run --backend kmod --mode kthread``: (run.json, calls) of its run directory."""
    from testbed.core import rundir

    rdir = tmp / "runs" / name
    shutil.rmtree(rdir, ignore_errors=True)
    cmd = [sys.executable, "-m", "testbed", "run", "--backend", "kmod", "--mode", "kthread",
           "--delay-us", f"{delay_us:g}", "--forward", forward, "--quiet", "-o", str(rdir),
           *extra, "--", *argv]  # fmt: skip
    res = _sh(cmd, stdout=stdout, stderr=subprocess.PIPE, timeout=300)
    if res.returncode:
        raise RuntimeError(f"kthread run failed ({res.returncode}): {res.stderr.decode()}")
    run = rundir.load(rdir)
    return run.meta, np.array(run.calls())


def _ksummary(meta: dict, calls: np.ndarray) -> dict:
    """What a test asserts on one kthread run directory (ns)."""
    from analysis.compare import mechanism
    from testbed.core.rundir import derived

    ovh = derived(calls)["overhead"]
    order = ((calls["t_trap"] <= calls["t_send"]) & (calls["t_send"] <= calls["d_recv"])
             & (calls["d_recv"] <= calls["t_reply"]) & (calls["t_reply"] <= calls["t_resume"]))  # fmt: skip
    return {
        "count": len(calls),
        "module_count": meta["kmod"]["stats"]["count"],
        "dropped": meta["kmod"]["records_dropped"],
        "released": meta["calls"]["caller_gone"],
        "delay_ns": round(meta["delegate"]["delay_us"] * 1000),
        "faithful": meta["delegate"]["faithful"],
        "flush_caller_tlb": meta["delegate"]["flush_caller_tlb"],
        "mechanism": mechanism(meta),
        "run_mechanism": meta.get("mechanism"),
        "stamped": bool(
            meta["host"].get("kernel")
            and meta["kmod"].get("version")
            and "default_timeout_ms" in meta["kmod"]["parameters"]
        ),  # fmt: skip
        "mode": meta["mode"],
        "wall_s": meta["wall_s"],
        "order_ok": bool(order.all()),
        "min_ns": float(ovh.min()) if len(ovh) else 0.0,
        "median_ns": float(np.median(ovh)) if len(ovh) else 0.0,
        "mean_ns": float(ovh.mean()) if len(ovh) else 0.0,
        "min_leg_to_ns": int((calls["d_recv"] - calls["t_send"]).min()) if len(calls) else 0,
        "min_leg_back_ns": int((calls["t_reply"] - calls["d_send"]).min()) if len(calls) else 0,
    }


def g_kthread(bins: Path, tmp: Path) -> dict:
    writer = str(bins / "writer")
    n = 400
    native = _sh([writer, str(n)]).stdout
    cost = []
    for delay_us in (0, 100, 500):
        out = tmp / f"k{delay_us}.txt"
        with open(out, "wb") as f:
            meta, calls = _krun("write", delay_us, [writer, str(n)], f, tmp, f"w{delay_us}")
        row = _ksummary(meta, calls)
        row["same_output"] = out.read_bytes() == native
        row["exit_status"] = meta["exit_status"]
        row["syscalls_csv_n"] = sum(int(r["n"]) for r in _csv(tmp / "runs" / f"w{delay_us}"))
        cost.append(row)
    # dd: a real program, independent count = number of blocks (status=none: no stderr)
    data = tmp / "data.bin"
    data.write_bytes(os.urandom(300_000))
    dd_out = tmp / "dd.out"
    _meta, calls = _krun("write", 20, ["dd", f"if={data}", f"of={dd_out}", "bs=4096", "status=none"],
                         subprocess.DEVNULL, tmp, "dd")  # fmt: skip
    dd = {"count": len(calls), "blocks": -(-300_000 // 4096),
          "same_output": dd_out.read_bytes() == data.read_bytes()}  # fmt: skip
    # threads of the target are traced too
    mt = tmp / "mt.txt"
    with open(mt, "wb") as f:
        _meta, calls = _krun("write", 10, [writer, "50", "4"], f, tmp, "threads")
    threads = {"count": len(calls), "expected": 200, "tids": len(set(calls["tid"].tolist())),
               "lines": len(mt.read_bytes().splitlines())}  # fmt: skip
    # descendants: the shell itself writes nothing, its children 150 times
    script = f"{writer} 100 >/dev/null; {writer} 50 >/dev/null; exit 0"  # no exec of the last
    _meta, calls = _krun("write", 0, ["sh", "-c", script], subprocess.DEVNULL, tmp, "desc")
    desc = {"with": len(calls), "without": _count_without_descendants(["sh", "-c", script])}
    # a wide set (well past 64 numbers, exit_group included): same output, calls counted
    ls = ["ls", "-l", "--time-style=+", str(KMOD)]
    native_ls = _sh(ls).stdout
    ls_out = tmp / "ls.txt"
    with open(ls_out, "wb") as f:
        _meta, calls = _krun(",".join(WIDE_SET), 0, ls, f, tmp, "wide")
    wide = {"set_size": len(WIDE_SET), "same_output": ls_out.read_bytes() == native_ls,
            "exit_group": int((calls["nr"] == 231).sum()),
            "above_64": int((calls["nr"] >= 64).sum())}  # fmt: skip
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


def _csv(rdir: Path) -> list[dict]:
    import csv

    with open(rdir / "syscalls.csv", newline="") as f:
        return list(csv.DictReader(f))


def _count_without_descendants(argv: list[str]) -> int:
    """Forwarded writes of ``argv`` in a kthread session without MKTRACE_F_DESCENDANTS."""
    dev = K.Device()
    try:
        dev.set_config("kthread", descendants=False)
        dev.set_syscalls([NR_WRITE])
        K.launch_registered(dev, argv, stdout=subprocess.DEVNULL).wait(timeout=120)
        return sum(s.count for s in dev.stats().values())
    finally:
        dev.close()


def _write_param(path: str, value: str) -> int:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        return exc.errno
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
    return 0


def g_faithful(bins: Path, tmp: Path) -> dict:
    """Default vs mktrace-faithful kthread, interleaved; module default; fit by analysis.compare."""
    from analysis import compare, fit

    writer = str(bins / "writer")
    n, delay_us, reps = 400, 50, 3
    native = _sh([writer, str(n)]).stdout
    variants = {"default": (), "faithful": ("--faithful",),
                "faithful+flush-caller": ("--faithful", "--flush-caller-tlb")}  # fmt: skip
    runs: dict[str, list] = {v: [] for v in variants}
    dirs = []
    for rep in range(reps):  # A B C A B C ...: the machine drifts, the order does not matter
        for name, extra in variants.items():
            out = tmp / "faithful.out"
            label = f"f-{name}-{rep}"
            with open(out, "wb") as f:
                meta, calls = _krun("write", delay_us, [writer, str(n)], f, tmp, label, extra)
            row = _ksummary(meta, calls)
            row["same_output"] = out.read_bytes() == native
            runs[name].append(row)
            dirs.append(tmp / "runs" / label)
    # the module parameter is the default of new sessions
    set_rc = _write_param(FAITHFUL_PARAM, "1")
    meta, calls = _krun("write", 0, [writer, "10"], subprocess.DEVNULL, tmp, "f-param")
    param = {"set_rc": set_rc, "faithful": meta["delegate"]["faithful"],
             "param": meta["kmod"]["parameters"].get("kthread_faithful"), "count": len(calls),
             "reset_rc": _write_param(FAITHFUL_PARAM, "0")}  # fmt: skip
    # analysis: a native profile of the same command, then fit and predict per mechanism
    prof = tmp / "runs" / "profile-writer"
    shutil.rmtree(prof, ignore_errors=True)
    res = _sh([sys.executable, "-m", "testbed", "profile", "--native-runs", "3", "--quiet",
               "-o", str(prof), "--", writer, str(n)], stdout=subprocess.DEVNULL, timeout=300)  # fmt: skip
    if res.returncode:
        raise RuntimeError(f"testbed profile failed: {res.stderr.decode()}")
    profiles, druns = compare.load_runs([prof, *dirs])
    native_t = compare.native_times(profiles, druns)
    fits = compare.fit_mechanisms(druns, native_t)
    fc = dict(zip(fits.mechanism, fits.f_c_mean_s, strict=True))
    pvm = compare.predicted_vs_measured(druns, native_t, fc, profiles)
    f_c = {}
    for m in fits.itertuples():
        samples = compare.pooled_samples([r for r in druns if r.mechanism == m.mechanism])[0]
        pc = fit.per_call(samples)
        f_c[m.mechanism] = {"runs": int(m.runs), "calls": int(m.calls),
                            "median_us": pc.median.value * 1e6, "median_lo_us": pc.median.lo * 1e6,
                            "median_hi_us": pc.median.hi * 1e6, "mean_us": pc.mean.value * 1e6,
                            "mean_lo_us": pc.mean.lo * 1e6, "mean_hi_us": pc.mean.hi * 1e6,
                            "min_us": float(samples.min()) * 1e6}  # fmt: skip
    return {
        "n": n, "delay_ns": delay_us * 1000, "runs": runs, "param": param, "f_c": f_c,
        "predicted": [{"mechanism": r.mechanism, "t_nd_source": r.t_nd_source,
                       "predicted_t_d_s": r.predicted_t_d_s, "measured_t_d_s": r.measured_t_d_s,
                       "rel_error": r.rel_error} for r in pvm.itertuples()],
    }  # fmt: skip


def g_hardening(bins: Path, tmp: Path, ko: str) -> dict:
    """Issue 11 defect 12: privilege change, timeout bound, re-queue wake-up, O(1) replies,
    descendants of other sessions."""
    out: dict = {}
    # 1. set-uid execve: no privilege is gained while forwarded (no_new_privs)
    suid = tmp / "euid-suid"
    shutil.copy(bins / "euid", suid)
    os.chown(suid, 65534, 65534)
    os.chmod(suid, 0o4755)
    mounts = Path("/proc/self/mountinfo").read_text()
    native = _sh([str(suid)]).stdout.decode().strip()
    out_file = tmp / "suid.out"
    with open(out_file, "wb") as f:
        meta, calls = _krun("write", 0, [str(suid)], f, tmp, "suid")
    out["setuid"] = {"native_euid": native, "traced_euid": out_file.read_text().strip(),
                     "forwarded_writes": len(calls), "nosuid_tmp": " nosuid" in mounts}  # fmt: skip
    # 2. default_timeout_ms is bounded when written at run time, and at load time
    before = Path(TIMEOUT_PARAM).read_text().strip()
    writes = {v: _write_param(TIMEOUT_PARAM, v) for v in ("0", "3600001", "abc", "-5")}
    after_bad = Path(TIMEOUT_PARAM).read_text().strip()
    ok_rc = _write_param(TIMEOUT_PARAM, "2000")
    dev = K.Device()
    timeout_ns = dev.get_config().timeout_ns
    dev.close()
    restore = _write_param(TIMEOUT_PARAM, before)
    rm = _sh(["rmmod", "mktrace"]).returncode
    bad_load = _sh(["insmod", ko, "default_timeout_ms=0"]).returncode
    good_load = _sh(["insmod", ko]).returncode
    out["timeout_param"] = {"before": before, "bad_writes": writes, "after_bad": after_bad,
                            "ok_rc": ok_rc, "new_session_timeout_ns": timeout_ns,
                            "restore_rc": restore, "rmmod": rm, "bad_load_rc": bad_load,
                            "reload_rc": good_load}  # fmt: skip
    out["requeue_wakes"] = _requeue_wakes(str(bins / "sysret"))
    out["many_inflight"] = _many_inflight(str(bins / "writer"), tmp)
    out["other_session_descendant"] = {
        flag: _register_in_child_of_target(flag) for flag in ("descendants", "own")
    }
    return out


def _requeue_wakes(sysret: str) -> dict:
    """A read whose copy_to_user fails re-queues the request and wakes pollers (epoll ET)."""
    dev = K.Device()
    try:
        dev.set_config("relay", timeout_ns=60 * 10**9)
        dev.set_syscalls([NR_GETPPID])
        child = K.launch_registered(dev, [sysret, "1"], stdout=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while dev.status().queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        ep = select.epoll()
        ep.register(dev.fd, select.EPOLLIN | select.EPOLLET)
        first = len(ep.poll(10))
        consumed = len(ep.poll(0.2))  # edge-triggered: no second report without a wake-up
        got = _libc.read(dev.fd, ctypes.c_void_p(8), ctypes.sizeof(K.Request))
        fault = ctypes.get_errno() if got < 0 else 0
        woken = len(ep.poll(5))
        queued = dev.status().queued
        req = dev.read_request()
        answered = req is not None and dev.reply(req.seq, K.REPLY_CONTINUE)
        status = child.wait(timeout=60)
        ep.close()
        return {"first": first, "consumed": consumed, "read_errno": fault, "woken": woken,
                "queued_after_fault": queued, "answered": answered, "status": status,
                "output": child.stdout.read().decode().split()}  # fmt: skip
    finally:
        dev.close()


def _many_inflight(writer: str, tmp: Path, threads: int = 64) -> dict:
    """64 requests in flight at once, answered in random order (hashed lookup)."""
    dev = K.Device()
    out_path = tmp / "inflight.out"
    try:
        dev.set_config("relay", timeout_ns=120 * 10**9)
        dev.set_syscalls([NR_WRITE])
        with open(out_path, "wb") as f:
            child = K.launch_registered(dev, [writer, "1", str(threads)], stdout=f)
        reqs, deadline = [], time.monotonic() + 120
        while len(reqs) < threads and time.monotonic() < deadline:
            if select.select([dev.fd], [], [], 0.5)[0]:
                req = dev.read_request()
                if req is not None:
                    reqs.append(req)
        inflight = dev.status().inflight
        pending = sum(dev.is_pending(r.seq) for r in reqs)
        random.Random(7).shuffle(reqs)
        replied = sum(dev.reply(r.seq, K.REPLY_CONTINUE) for r in reqs)
        again = sum(dev.reply(r.seq, K.REPLY_CONTINUE) for r in reqs[:8])
        still = sum(dev.is_pending(r.seq) for r in reqs)
        status = child.wait(timeout=120)
        return {"threads": threads, "read": len(reqs), "inflight": inflight, "pending": pending,
                "replied": replied, "replied_twice": again, "pending_after": still,
                "status": status, "lines": len(out_path.read_bytes().splitlines())}  # fmt: skip
    finally:
        dev.close()


_REGISTER_IN_CHILD = r"""
import fcntl, os, sys
pid = os.fork()
if pid == 0:
    fd = os.open("/dev/mktrace", os.O_RDWR)
    try:
        fcntl.ioctl(fd, int(sys.argv[1]))
        print(0)
    except OSError as exc:
        print(exc.errno)
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
"""


def _register_in_child_of_target(flag: str) -> str:
    """A child of a traced target registers on its own session: refused if it is traced."""
    dev = K.Device()
    try:
        dev.set_config("kthread", descendants=flag == "descendants")
        dev.set_syscalls([NR_GETPPID])
        child = K.launch_registered(
            dev, [sys.executable, "-c", _REGISTER_IN_CHILD, str(K.IOC_REGISTER)],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        out, _ = child.communicate(timeout=120)
        return out.decode().strip()
    finally:
        dev.close()


def g_experiment(tmp: Path) -> dict:
    """A plan with kthread delegates: run directories, outputs equal to native."""
    from testbed.core import rundir

    plan = tmp / "kthread-plan.yml"
    plan.write_text(
        "name: kthread-guest\nworkloads:\n  - {name: cat, size_mb: 0.2}\nforward: [read]\n"
        "delegates: [kthread, {name: kt50, kthread: {delay_us: 50, faithful: true}}]\n"
    )
    results = tmp / "experiment"
    shutil.rmtree(results, ignore_errors=True)
    res = _sh([sys.executable, "-m", "testbed", "experiment", str(plan), "-o", str(results),
               "--host-label", "guest"], timeout=600)  # fmt: skip
    cells = {}
    for d in sorted((results / "guest").glob("*.r1")):
        run = rundir.load(d)
        cell = json.loads((d / "experiment.json").read_text())
        cells[d.name] = {"mode": run.meta.get("mode"), "faithful": run.meta["delegate"]["faithful"],
                         "delay_us": run.meta["delegate"]["delay_us"], "calls": len(run.calls()),
                         "matches_native": cell["output_matches_native"]}  # fmt: skip
    return {"rc": res.returncode, "stdout": res.stdout.decode()[-500:],
            "stderr": res.stderr.decode()[-1500:], "cells": cells}  # fmt: skip


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
    from testbed.compute.relay import connect
    from testbed.core import rundir

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
from testbed.compute.interpose import kmod as K
dev = K.Device()
dev.set_config("relay", timeout_ns=30 * 10**9)
dev.set_syscalls([110])
out = open(sys.argv[3], "wb")
child = K.launch_registered(dev, [sys.argv[2], "1"], stdout=out)
deadline = time.monotonic() + 120
while dev.status().queued == 0:
    assert time.monotonic() < deadline, "the forwarded getppid never queued"
    time.sleep(0.01)
assert dev.read_request().nr == 110   # now in flight, never answered
print(child.pid, flush=True)
if sys.argv[4] == "close":            # the session ends with the relay alive
    sys.stdin.readline()
    dev.close()
    print("closed", child.wait(timeout=40), flush=True)
time.sleep(600)
"""


def _relay_with_call_in_flight(sysret: str, out_path: Path, how: str) -> tuple:
    relay = subprocess.Popen([sys.executable, "-c", _KILLED_RELAY, str(REPO), sysret,
                              str(out_path), how],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    return relay, int(relay.stdout.readline().decode().strip())


def g_faults(bins: Path, tmp: Path, ko: str) -> dict:
    sysret = str(bins / "sysret")
    out: dict = {}
    # 1. the relay dies (SIGKILL) with a call in flight; rmmod meanwhile is refused
    #    (the program has the parent-death signal: it dies with its relay)
    out_path = tmp / "killed.out"
    relay, victim = _relay_with_call_in_flight(sysret, out_path, "kill")
    rm = _sh(["rmmod", "mktrace"])
    kill = {"pending_before_kill": 1, "rmmod_refused": rm.returncode != 0,
            "still_loaded": os.path.exists("/sys/module/mktrace")}  # fmt: skip
    t0 = time.monotonic()
    relay.kill()
    relay.wait()
    status = _wait_exit(victim, 40)  # orphaned: we are its subreaper
    kill["exited"] = status is not None
    kill["signal"] = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
    kill["seconds"] = time.monotonic() - t0
    out["relay_killed"] = kill
    # 1b. the session is closed with a call in flight and the relay alive: the
    #     module releases the caller, which continues locally (a real getppid)
    out_path = tmp / "closed.out"
    relay, _victim = _relay_with_call_in_flight(sysret, out_path, "close")
    t0 = time.monotonic()
    relay.stdin.write(b"go\n")
    relay.stdin.flush()
    said = relay.stdout.readline().decode().split()  # "closed STATUS": the relay's child
    closed = {
        "closed": said[:1] == ["closed"],
        "exit_status": int(said[1]) if len(said) > 1 else None,
    }
    closed["seconds"] = time.monotonic() - t0
    closed["output"] = out_path.read_text().splitlines()
    relay.kill()
    relay.wait()
    out["session_closed"] = closed

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

    # 4. the relay closes with a call in flight in each of 4 threads, and rmmod races
    #    the released callers still returning through module code.  Every thread is
    #    blocked in its forwarded call when the close unhooks getppid, and each one
    #    stops at its released -EIO: no thread runs through the syscall's entry while
    #    ftrace patches it, which under QEMU's TCG can leave a CPU looping on the
    #    patch's int3 (reproduced without this module: docs/vm.md)
    dev = K.Device()
    dev.set_config("relay", timeout_ns=30 * 10**9, release_action="eio")
    dev.set_syscalls([NR_GETPPID])
    child = K.launch_registered(dev, [sysret, "2000", "4"], stdout=subprocess.DEVNULL)
    served, deadline = 0, time.monotonic() + 60
    while served < 40 and time.monotonic() < deadline:
        if select.select([dev.fd], [], [], 0.1)[0]:
            req = dev.read_request()
            if req is not None and dev.reply(req.seq, K.REPLY_CONTINUE):
                served += 1
    while dev.status().queued + dev.status().inflight < 4 and time.monotonic() < deadline:
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
                         "rmmod_attempts": attempts, "program_status": rc,
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


STEP_LIMIT_S = 300  # one step takes 5-60 s under TCG; past this it is stuck


def _diagnose() -> str:
    """What every task is doing: Python's own stacks, then the kernel's for each process."""
    import faulthandler
    import io
    import tempfile

    parts = []
    with tempfile.TemporaryFile() as f:
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.seek(0)
        parts.append("python stacks of the guest payload:\n" + f.read().decode(errors="replace"))
    buf = io.StringIO()
    for d in sorted(Path("/proc").glob("[0-9]*"), key=lambda d: int(d.name)):
        try:
            stat = (d / "stat").read_text()
            state = stat[stat.rindex(")") + 2]
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            if comm.startswith(
                ("kworker", "ksoftirq", "migration", "cpuhp", "rcu_", "idle_inject")
            ):
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
            buf.write(
                f"--- pid {d.name} state {state} comm {comm} wchan "
                f"{(d / 'wchan').read_text()} cmd {cmd}\n"
            )
            if state in "DR" or comm in ("rmmod", "insmod", "sysret", "writer", "python3"):
                for t in sorted((d / "task").iterdir(), key=lambda t: int(t.name)):
                    buf.write(f"  task {t.name}:\n" + (t / "stack").read_text())
        except (OSError, ValueError):
            continue
    parts.append(buf.getvalue())
    try:
        Path("/proc/sysrq-trigger").write_text("w")
        time.sleep(1)
    except OSError:
        pass
    dmesg = subprocess.run(["dmesg"], capture_output=True, timeout=30).stdout.decode(
        errors="replace"
    )
    parts.append("dmesg (tail):\n" + "\n".join(dmesg.splitlines()[-150:]))
    return "\n".join(parts)


def _arm_watchdog(name: str, results: dict, path: Path) -> threading.Timer:
    """After STEP_LIMIT_S, record where step ``name`` is stuck and end the guest.

    A stuck step would otherwise hold the guest to the host's limit and leave no
    trace; this way the steps before it keep their results and the stuck one
    fails with the stacks that say where it waits.
    """

    def fire():
        diag = _diagnose()
        print(f"guest: step {name} did not finish within {STEP_LIMIT_S} s\n{diag}", flush=True)
        results[name] = {
            "error": f"step {name} did not finish within {STEP_LIMIT_S} s "
            f"(stacks in the guest output)\n{diag[-6000:]}"
        }
        path.write_text(json.dumps(results, indent=1))
        os._exit(3)

    timer = threading.Timer(STEP_LIMIT_S, fire)
    timer.daemon = True
    timer.start()
    return timer


def guest_main(share: str) -> int:
    share_p = Path(share)
    tmp = Path("/tmp/kmod-guest")
    tmp.mkdir(exist_ok=True)
    bins = share_p / "bin"
    ko = str(share_p / "build" / "mktrace.ko")
    out = share_p / "results.json"
    _become_subreaper()
    results: dict = {}
    steps = {
        "load": lambda: g_load(ko),
        "garbage": g_garbage,
        "kthread": lambda: g_kthread(bins, tmp),
        "faithful": lambda: g_faithful(bins, tmp),
        "hardening": lambda: g_hardening(bins, tmp, ko),
        "experiment": lambda: g_experiment(tmp),
        "relay": lambda: g_relay(bins, tmp),
        "run": lambda: g_run(tmp),
        "faults": lambda: g_faults(bins, tmp, ko),
    }
    # KMOD_GUEST_STEPS=load,hardening,faults KMOD_GUEST_REPEAT=20: load, then the
    # other steps in turn 20 times (to reproduce an intermittent fault)
    chosen = os.environ.get("KMOD_GUEST_STEPS", ",".join(steps)).split(",")
    repeat = int(os.environ.get("KMOD_GUEST_REPEAT", "1"))
    order = chosen[:1] + chosen[1:] * repeat
    for name in order:
        t0 = time.monotonic()
        timer = _arm_watchdog(name, results, out)
        try:
            results[name] = step = steps[name]()
        except Exception:
            results[name] = step = {"error": traceback.format_exc()}
        timer.cancel()
        print(f"guest: {name} done in {time.monotonic() - t0:.1f} s", flush=True)
        if "error" in step:
            print(f"guest: {name} failed:\n{step['error']}", flush=True)
        out.write_text(json.dumps(results, indent=1))
        if name == "load" and "error" in step:
            break
    timer = _arm_watchdog("unload", results, out)
    rm = _sh(["rmmod", "mktrace"])
    timer.cancel()
    results.setdefault("faults", {})["unload"] = {"rmmod_rc": rm.returncode,
                                                  "stderr": rm.stderr.decode()}  # fmt: skip
    results["dmesg"] = g_dmesg()
    out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2:
        sys.exit(guest_main(sys.argv[1]))
    sys.exit("usage: python3 tests/kmod_guest.py RESULTS_DIR (inside the VM, as root)")
