"""Forwarding policies on crafted profiles: ties, rounding, errors, profile run dirs."""

from __future__ import annotations

from fractions import Fraction

import pytest

from testbed.core import errors, rundir
from testbed.core.policy import choose, count_of, order, parse_policy, resolve_policy
from testbed.core.syscalls import NR_BY_NAME as NR

pytestmark = pytest.mark.unit

# read 0, write 1, close 3, mmap 9, brk 12, openat 257; getpid 39 never invoked
COUNTS = {"read": 100, "write": 100, "close": 5, "mmap": 5, "openat": 5, "brk": 50, "getpid": 0}


def nrs(*names):
    return frozenset(NR[n] for n in names)


def test_parse_forms():
    assert parse_policy("read,write").kind == "list"
    assert parse_policy("read,write").nrs == nrs("read", "write")
    p = parse_policy("min-freq:20%")
    assert (p.kind, p.k) == ("min-freq", 20)
    assert parse_policy("MAX-FREQ:12.5").k == Fraction(25, 2)
    r = parse_policy("random:50%:7")
    assert (r.kind, r.k, r.seed) == ("random", 50, 7)
    assert parse_policy("random:50%").seed == 0
    assert str(parse_policy("min-freq:20%")) == "min-freq:20%"


@pytest.mark.parametrize(
    "text",
    ["min-freq:120%", "max-freq:-1%", "random:100.5%", "foo:3", "random:x%", "min-freq:",
     "", "read,nosuchcall", "random:10%:abc"],
)  # fmt: skip
def test_bad_policies_are_one_line_errors(text):
    with pytest.raises(errors.TestbedError) as e:
        parse_policy(text)
    assert "\n" not in str(e.value) and str(e.value)


def test_k_outside_range_message_names_the_range():
    with pytest.raises(errors.TestbedError, match="outside 0-100%"):
        parse_policy("max-freq:101%")


@pytest.mark.parametrize(
    "k,types,m",
    [(20, 7, 1), (50, 5, 3), (30, 5, 2), (10, 4, 0), (12.5, 4, 1), (0, 9, 0), (100, 9, 9),
     (20, 6, 1), (34, 6, 2), (17, 6, 1), (25, 6, 2)],
)  # fmt: skip
def test_rounding_is_half_up(k, types, m):
    assert count_of(k, types) == m


def test_min_freq_ties_by_number():
    # 6 invoked types; ties at n=5 among close(3), mmap(9), openat(257)
    assert order("min-freq", COUNTS) == [3, 9, 257, 12, 0, 1]
    assert choose(parse_policy("min-freq:50%"), COUNTS) == nrs("close", "mmap", "openat")
    assert choose(parse_policy("min-freq:34%"), COUNTS) == nrs("close", "mmap")  # 2.04 -> 2
    assert choose(parse_policy("min-freq:17%"), COUNTS) == nrs("close")  # 1.02 -> 1
    assert choose(parse_policy("min-freq:0%"), COUNTS) == frozenset()


def test_max_freq_ties_by_number():
    assert order("max-freq", COUNTS) == [0, 1, 12, 3, 9, 257]
    assert choose(parse_policy("max-freq:17%"), COUNTS) == nrs("read")  # read beats write (0 < 1)
    assert choose(parse_policy("max-freq:34%"), COUNTS) == nrs("read", "write")
    assert choose(parse_policy("max-freq:100%"), COUNTS) == nrs(
        *[k for k in COUNTS if k != "getpid"]
    )


def test_uninvoked_types_never_chosen_and_not_counted():
    assert NR["getpid"] not in choose(parse_policy("min-freq:100%"), COUNTS)
    # 6 types, not 7: 25% -> 1.5 -> 2
    assert len(choose(parse_policy("min-freq:25%"), COUNTS)) == 2


def test_random_is_seeded_nested_and_sized():
    a = choose(parse_policy("random:50%:3"), COUNTS)
    assert a == choose(parse_policy("random:50%:3"), COUNTS)
    assert len(a) == 3 and a <= nrs(*[k for k in COUNTS if k != "getpid"])
    small = choose(parse_policy("random:34%:3"), COUNTS)
    assert small <= a  # nested for one seed
    sets = {choose(parse_policy(f"random:50%:{s}"), COUNTS) for s in range(10)}
    assert len(sets) > 1  # the seed matters


def test_list_policy_ignores_counts():
    assert choose(parse_policy("write,59"), COUNTS) == nrs("write", "execve")


def test_unknown_syscall_in_counts():
    with pytest.raises(errors.TestbedError):
        choose(parse_policy("min-freq:10%"), {"not_a_call": 3})


def _profile_dir(path, rows, kind="profile"):
    out = rundir.create(path)
    rundir.write_meta(out, {"kind": kind, "command": ["x"], "wall_s": 1.0, "C_s": 0.5})
    rundir.write_syscalls(out, rows)
    return out


def test_resolve_policy_reads_a_profile(tmp_path):
    rows = [{"name": k, "nr": NR[k], "n": v, "g_ns": 1000, "errors": 0} for k, v in COUNTS.items()]
    rows.append({"name": "perf_only_call", "nr": -1, "n": 3, "g_ns": 1, "errors": 0})
    d = _profile_dir(tmp_path / "prof", rows)
    assert resolve_policy("min-freq:50%", d) == nrs("close", "mmap", "openat")
    assert resolve_policy("max-freq:34%", str(d)) == nrs("read", "write")
    assert resolve_policy("read", None) == nrs("read")


def test_resolve_policy_errors(tmp_path):
    with pytest.raises(errors.TestbedError, match="needs a profile"):
        resolve_policy("min-freq:20%", None)
    with pytest.raises(errors.TestbedError, match="no such run directory"):
        resolve_policy("min-freq:20%", tmp_path / "missing")
    bad = _profile_dir(tmp_path / "bad", [{"name": "read", "calls": 3}])
    with pytest.raises(errors.TestbedError, match="no usable"):
        resolve_policy("min-freq:20%", bad)
    empty = _profile_dir(tmp_path / "empty", [])
    with pytest.raises(errors.TestbedError, match="no system calls"):
        resolve_policy("min-freq:20%", empty)
