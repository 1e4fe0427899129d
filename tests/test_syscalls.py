"""The x86-64 syscall table (testbed/core/syscalls.py): completeness, lookup, parse_set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed.core import errors, syscalls
from testbed.core.syscalls import ArgKind, UnknownSyscall, lookup, name_of, parse_set

pytestmark = pytest.mark.unit

UAPI = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


@pytest.mark.parametrize(
    "nr, name",
    [
        (0, "read"),
        (1, "write"),
        (2, "open"),
        (3, "close"),
        (9, "mmap"),
        (39, "getpid"),
        (56, "clone"),
        (57, "fork"),
        (59, "execve"),
        (60, "exit"),
        (217, "getdents64"),
        (231, "exit_group"),
        (257, "openat"),
        (262, "newfstatat"),
        (302, "prlimit64"),
        (318, "getrandom"),
        (332, "statx"),
        (424, "pidfd_send_signal"),
        (435, "clone3"),
        (437, "openat2"),
        (438, "pidfd_getfd"),
        (439, "faccessat2"),
    ],
)
def test_known_numbers(nr, name):
    assert syscalls.NAME_BY_NR[nr] == name
    assert syscalls.NR_BY_NAME[name] == nr
    assert lookup(name) == nr
    assert name_of(nr) == name


def test_table_is_complete_and_consistent():
    assert len(syscalls.NAME_BY_NR) >= 360
    # numbers 0..334 are contiguous on x86-64 (the legacy table), then 424.. (the new ones)
    assert set(range(0, 335)) <= set(syscalls.NAME_BY_NR)
    assert set(range(424, 436)) <= set(syscalls.NAME_BY_NR)
    # a bijection: no name twice, no number twice
    assert len(syscalls.NR_BY_NAME) == len(syscalls.NAME_BY_NR) == len(syscalls.SYSCALLS)
    assert max(syscalls.NAME_BY_NR) == syscalls.MAX_NR
    assert all(re.fullmatch(r"[a-z_][a-z0-9_]*", n) for n in syscalls.NR_BY_NAME)


@pytest.mark.skipif(not UAPI.exists(), reason=f"{UAPI} not installed (linux-libc-dev)")
def test_table_matches_the_installed_uapi_header():
    rows = re.findall(r"#define __NR_(\w+)\s+(\d+)", UAPI.read_text())
    header = {int(nr): name for name, nr in rows}
    # every number the installed header knows is in the table with the same name
    # (the checked-in table may be newer than the header, never older or different)
    mismatched = {nr: (name, syscalls.NAME_BY_NR.get(nr)) for nr, name in header.items()
                  if syscalls.NAME_BY_NR.get(nr) != name}  # fmt: skip
    assert mismatched == {}


@pytest.mark.parametrize(
    "token, nr",
    [
        ("write", 1),
        ("WRITE", 1),
        ("  write ", 1),
        ("sys_write", 1),
        ("__x64_sys_write", 1),
        ("1", 1),
        (1, 1),
        ("257", 257),
        ("sys_openat", 257),
    ],
)
def test_lookup_by_name_number_and_prefix(token, nr):
    assert lookup(token) == nr


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownSyscall) as info:
        lookup("wrtie")
    msg = str(info.value)
    assert "'wrtie'" in msg
    assert "did you mean" in msg
    assert "write" in msg.split("did you mean", 1)[1]
    assert "\n" not in msg  # one line for the CLI


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(UnknownSyscall) as info:
        lookup("qqqqqqqqqqqq")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("token", [336, -1, 100000, "336", "5000"])
def test_unknown_numbers(token):
    with pytest.raises(UnknownSyscall, match="unknown x86-64 syscall number"):
        lookup(token)


def test_unknown_syscall_is_a_user_error():
    assert issubclass(UnknownSyscall, errors.TestbedError)


def test_name_of_unassigned_number():
    assert name_of(400) == "syscall_400"


def test_parse_set_names_numbers_and_duplicates():
    assert parse_set("read,write") == frozenset({0, 1})
    assert parse_set("read, 1 ,sys_write,") == frozenset({0, 1})
    assert parse_set(["openat", 0, "3"]) == frozenset({257, 0, 3})
    assert isinstance(parse_set("read"), frozenset)


@pytest.mark.parametrize("spec", ["", " , ", []])
def test_parse_set_empty_is_an_error(spec):
    with pytest.raises(errors.TestbedError, match="empty syscall set"):
        parse_set(spec)


def test_parse_set_reports_the_bad_token():
    with pytest.raises(UnknownSyscall, match="wrtie"):
        parse_set("read,wrtie")


def test_arg_specs_of_buffer_calls():
    (w,) = syscalls.arg_specs(lookup("write"))
    assert (w.kind, w.arg, w.size_arg) == (ArgKind.IN_BUF, 1, 2)
    (r,) = syscalls.arg_specs(lookup("read"))
    assert (r.kind, r.arg, r.size_arg) == (ArgKind.OUT_BUF, 1, 2)
    (p,) = syscalls.arg_specs(lookup("openat"))
    assert (p.kind, p.arg) == (ArgKind.PATH, 1)
    assert syscalls.arg_specs(lookup("getpid")) == ()


def test_arg_specs_name_real_syscalls_and_valid_arguments():
    for name, specs in syscalls.ARG_SPECS.items():
        assert name in syscalls.NR_BY_NAME, name
        for spec in specs:
            assert 0 <= spec.arg <= 5, name
            assert spec.size_arg is None or 0 <= spec.size_arg <= 5, name
            if spec.kind in (ArgKind.IN_STRUCT, ArgKind.OUT_STRUCT):
                assert spec.size and spec.size > 0, name
            if spec.kind in (ArgKind.IN_BUF, ArgKind.OUT_BUF, ArgKind.IN_IOV, ArgKind.OUT_IOV):
                assert spec.size_arg is not None and spec.size_arg != spec.arg, name
