"""Dropping root for good: the delegate serves as an unprivileged user.

``testbed delegate --user NAME`` binds its socket and reads its keys as root
(where a service manager starts it), then serves as NAME.  Two steps, because
the kernel keeps some of this per *thread*:

:func:`restrict` (before the ZeroMQ context, the connection guard, the CURVE
authenticator, the offload reaper)
    sets ``no_new_privs`` and empties the capability bounding set.  Both are
    per-thread attributes that new threads inherit, so every thread created
    afterwards (libzmq's I/O thread, which runs the CURVE handshake with
    unauthenticated peers, included) has them.  A thread that already runs
    cannot be given them: importing numpy (``testbed`` does) starts an
    OpenBLAS thread.  So if another thread exists, :func:`restrict` sets
    ``no_new_privs`` and executes the same command line again
    (``/proc/self/cmdline``, same pid, same descriptors): every thread of the
    new image inherits ``no_new_privs``, and with ``OPENBLAS_NUM_THREADS=1``
    (unless set) none is started before the bounding set is emptied.
:func:`drop_privileges` (after binding and reading the keys, before the first message)
    switches to NAME with NAME's group and no supplementary groups; glibc
    applies ``setgroups``/``setresgid``/``setresuid`` to all threads, and the
    switch from root clears every thread's permitted and effective
    capabilities.  It then reads ``/proc/self/task/*/status`` and refuses to
    serve unless every thread shows exactly that.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import sys
import threading

from testbed.core.errors import TestbedError

PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24

#: Set in the environment of the image :func:`restrict` executes again.
REEXEC_ENV = "TESTBED_NO_NEW_PRIVS_REEXEC"


def _lookup(user: str) -> tuple[int, int]:
    """(uid, gid) of ``user`` (name or uid), which must not be root."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise TestbedError(f"--user {user}: no such user") from None
    if pw.pw_uid == 0:
        raise TestbedError(f"--user {user}: must be an unprivileged user, not root")
    return pw.pw_uid, pw.pw_gid


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def restrict(user: str, reexec: bool = True) -> tuple[int, int]:
    """The part of dropping to ``user`` that is per thread, before the caller
    starts threads of its own.  Checks ``user`` (errors before anything is
    bound), sets ``no_new_privs``; if another thread already runs, executes the
    command line again (``reexec``; never returns) or refuses; then, as root,
    empties the capability bounding set (best effort: it needs CAP_SETPCAP).
    Returns (uid, gid)."""
    uid, gid = _lookup(user)
    if os.geteuid() != 0 and os.getresuid() != (uid, uid, uid):
        raise TestbedError(f"--user {user}: only root can switch to another user")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise TestbedError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    again = os.environ.pop(REEXEC_ENV, None) is not None
    me = str(threading.get_native_id())
    others = [t for t in os.listdir("/proc/self/task") if t != me]
    if others and not again and reexec:
        _execute_again()
    lacking = [t for t in others if _no_new_privs(t) is False]
    if lacking:
        raise TestbedError(
            f"--user {user}: thread {lacking[0]} started before no_new_privs could be set; "
            "refusing to serve"
        )
    if os.geteuid() == 0:
        for cap in range(_cap_last() + 1):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    return uid, gid


def _no_new_privs(tid: str) -> bool | None:
    try:
        return thread_status(tid).get("NoNewPrivs", "0").strip() == "1"
    except FileNotFoundError:
        return None  # ended meanwhile


def _execute_again() -> None:
    """Execute this process's command line again (same pid, descriptors, cwd)."""
    with open("/proc/self/cmdline", "rb") as f:
        argv = f.read().split(b"\0")[:-1]
    env = dict(os.environb)
    env[REEXEC_ENV.encode()] = b"1"
    env.setdefault(b"OPENBLAS_NUM_THREADS", b"1")  # numpy's, started at import
    exe = sys.executable or "/proc/self/exe"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(exe, argv, env)


def drop_privileges(user: str) -> tuple[int, int]:
    """Become ``user`` (name or uid) irrevocably, every thread; returns (uid, gid).

    :func:`restrict` must have run before the process had a second thread;
    this checks that it did (every thread's ``NoNewPrivs``).
    """
    uid, gid = _lookup(user)
    if os.geteuid() != 0:
        if os.getresuid() != (uid, uid, uid):
            raise TestbedError(f"--user {user}: only root can switch to another user")
    else:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # this thread, at least
        raise TestbedError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise TestbedError(f"--user {user}: could regain root after dropping it; refusing to serve")
    bad = threads_not_dropped(uid, gid)
    if bad:
        raise TestbedError(f"--user {user}: {bad[0]}; refusing to serve")
    return uid, gid


def thread_status(tid: int | str, pid: int | str = "self") -> dict[str, str]:
    """The fields of ``/proc/PID/task/TID/status`` (name -> value text)."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def threads_not_dropped(uid: int, gid: int, pid: int | str = "self") -> list[str]:
    """Why threads of process ``pid`` are not fully dropped to (uid, gid): every uid and
    gid those, no supplementary groups, no permitted or effective capability,
    ``no_new_privs`` set.  Empty if all are."""
    bad = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        try:
            st = thread_status(tid, pid)
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        what = []
        if set(map(int, st["Uid"].split())) != {uid}:
            what.append(f"uids {st['Uid']}")
        if set(map(int, st["Gid"].split())) != {gid}:
            what.append(f"gids {st['Gid']}")
        if st.get("Groups", "").strip():
            what.append(f"groups {st['Groups'].strip()}")
        for cap in ("CapPrm", "CapEff"):
            if int(st[cap], 16):
                what.append(f"{cap} {st[cap]}")
        if st.get("NoNewPrivs", "0").strip() != "1":
            what.append("no_new_privs unset")
        if what:
            bad.append(f"thread {tid} ({st.get('Name', '?')}): {', '.join(what)}")
    return bad
