"""Dropping root for good: the delegate serves as an unprivileged user.

``testbed delegate --user NAME`` binds its socket and reads its keys as root
(where a service manager starts it), then calls :func:`drop_privileges`
before it answers anyone: every thread (libzmq's included: glibc changes the
credentials of all threads of the process) runs as NAME with NAME's group,
no supplementary groups, no capabilities and ``no_new_privs`` set.
"""

from __future__ import annotations

import ctypes
import os
import pwd

from testbed.errors import TestbedError

PR_SET_NO_NEW_PRIVS = 38


def drop_privileges(user: str) -> tuple[int, int]:
    """Become ``user`` (name or uid) irrevocably; returns (uid, gid)."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise TestbedError(f"--user {user}: no such user") from None
    uid, gid = pw.pw_uid, pw.pw_gid
    if uid == 0:
        raise TestbedError(f"--user {user}: must be an unprivileged user, not root")
    if os.geteuid() != 0:
        if os.getresuid() == (uid, uid, uid):
            return uid, gid  # already that user (started by a service manager as NAME)
        raise TestbedError(f"--user {user}: only root can switch to another user")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise TestbedError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
    try:
        os.setuid(0)
    except PermissionError:
        return uid, gid
    raise TestbedError(f"--user {user}: could regain root after dropping it; refusing to serve")
