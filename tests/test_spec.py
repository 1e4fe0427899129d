"""RunSpec: the options of ``testbed run``, checked once; argv round trip through the CLI."""

from __future__ import annotations

import dataclasses

import pytest

from testbed.compute.spec import MAX_TIMEOUT_S, KthreadSpec, OffloadSpec, RunSpec, SpecError
from testbed.core import syscalls
from testbed.core.errors import TestbedError as _TestbedError

pytestmark = pytest.mark.unit

EP = "tcp://127.0.0.1:5555"
KMOD = {"mode": "kthread", "backend": "kmod"}
OFF = {"mode": "offload", "delegate": EP, "offload": OffloadSpec(("/srv/x",))}
DELAY_ONLY = ("--delay-us, --faithful and --flush-caller-tlb apply to --mode kthread only "
              "(a delegate's delay is testbed delegate --delay-us)")  # fmt: skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"program": ()}, "no program given (put it after --, e.g. -- gzip -k FILE)"),
        ({"delegate": EP, "forward": "read,nosuchcall"}, "unknown syscall 'nosuchcall'"),
        ({"delegate": EP, "forward": "write", "mode": "nope"},
         "unknown mode 'nope' (choose cost, offload, kthread)"),
        # --mode kthread, in the order run.py/_check_mechanism/kthread refused them
        ({"mode": "kthread", "forward": "write"},
         "--mode kthread needs --backend kmod (the mktrace module's kernel thread), not seccomp"),
        ({**KMOD, "delegate": EP, "forward": "write"},
         "--mode kthread forwards to the kernel thread on this node: drop --delegate"),
        ({**KMOD, "curve_keys": "/k", "forward": "write"},
         "--curve-keys is for a delegate endpoint, not --mode kthread"),
        ({**KMOD, "offload": OffloadSpec(("/x",)), "forward": "write"},
         "--offload-path is only used with --mode offload"),
        ({**KMOD, "kthread": KthreadSpec(flush_caller_tlb=True), "forward": "write"},
         "--flush-caller-tlb needs --faithful"),
        ({**KMOD, "kthread": KthreadSpec(-1), "forward": "write"}, "--delay-us must be >= 0, not -1"),
        ({**KMOD, "kthread": KthreadSpec(1e7), "forward": "write"},
         "--delay-us must be at most 1000000 (1 s per leg)"),
        ({**KMOD, "forward": "write", "profile": "/p"}, "--profile is only used with --policy"),
        ({**KMOD}, "one of --forward or --policy is required (cost mode)"),
        ({**KMOD, "policy": "min-freq:20%"},
         "--policy needs --profile RUNDIR (a native profile to choose from)"),
        # relay modes
        ({"delegate": EP, "forward": "write", "kthread": KthreadSpec(5)}, DELAY_ONLY),
        ({"delegate": EP, "forward": "write", "kthread": KthreadSpec(faithful=True)}, DELAY_ONLY),
        ({**OFF, "kthread": KthreadSpec(flush_caller_tlb=True)}, DELAY_ONLY),
        ({"forward": "write"}, "--delegate ENDPOINT is required (or --backend kmod --mode kthread)"),
        ({"mode": "offload", "offload": OffloadSpec(("/x",))},
         "--delegate ENDPOINT is required (or --backend kmod --mode kthread)"),
        ({"delegate": EP, "forward": "write", "timeout_s": 0},
         f"--timeout must be > 0 and <= {MAX_TIMEOUT_S:g} seconds, not 0"),
        ({"delegate": EP, "forward": "write", "timeout_s": float("nan")},
         f"--timeout must be > 0 and <= {MAX_TIMEOUT_S:g} seconds, not nan"),
        ({"delegate": EP, "forward": "write", "connect_timeout_s": MAX_TIMEOUT_S + 1},
         f"--connect-timeout must be > 0 and <= {MAX_TIMEOUT_S:g} seconds, not 86401"),
        ({**OFF, "forward": "write"}, "--forward/--policy/--profile choose calls for cost mode; "
                                      "offload mode traps the file-I/O calls itself"),
        ({**OFF, "profile": "/p"}, "--forward/--policy/--profile choose calls for cost mode; "
                                   "offload mode traps the file-I/O calls itself"),
        ({"mode": "offload", "delegate": EP},
         "--mode offload needs at least one --offload-path PREFIX"),
        ({**OFF, "offload": OffloadSpec(())}, "--mode offload needs at least one --offload-path PREFIX"),
        ({**OFF, "backend": "kmod"}, "offload mode needs --backend seccomp (ADDFD placeholders)"),
        ({**OFF, "offload": OffloadSpec(("/a", "x"))}, "--offload-path 'x' must be an absolute path"),
        ({**OFF, "offload": OffloadSpec(("/",))},
         "--offload-path / would offload every file, the program's own included"),
        ({"delegate": EP, "forward": "write", "offload": OffloadSpec(("/x",))},
         "--offload-path is only used with --mode offload"),
        ({"delegate": EP, "forward": "write", "profile": "/p"},
         "--profile is only used with --policy"),
        ({"delegate": EP, "forward": "write", "offload": OffloadSpec((), write_behind=4096)},
         "--offload-write-behind is only used with --mode offload and --offload-path"),
        ({**OFF, "offload": OffloadSpec(("/x",), write_behind=-1)},
         "--offload-write-behind must be a byte count >= 0, not -1"),
        ({"delegate": EP}, "one of --forward or --policy is required (cost mode)"),
        ({"delegate": EP, "policy": "min-freq:20%"},
         "--policy needs --profile RUNDIR (a native profile to choose from)"),
        ({"delegate": EP, "forward": "write", "backend": "ebpf"},
         "unknown backend 'ebpf' (choose seccomp or kmod)"),
    ],
)  # fmt: skip
def test_every_refusal_is_one_line_at_construction(kwargs, message):
    kwargs = {"program": ("true",), **kwargs}
    with pytest.raises(_TestbedError) as info:
        RunSpec(**kwargs)
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_first_refusal_wins_in_the_order_testbed_run_checks():
    # kthread: the backend before the delegate before the delay
    with pytest.raises(SpecError, match="needs --backend kmod"):
        RunSpec(("true",), mode="kthread", delegate=EP, kthread=KthreadSpec(-1))
    # relay: kthread options before a missing delegate before the timeouts
    with pytest.raises(SpecError, match="apply to --mode kthread only"):
        RunSpec(("true",), kthread=KthreadSpec(5), timeout_s=0)
    with pytest.raises(SpecError, match="--delegate ENDPOINT is required"):
        RunSpec(("true",), timeout_s=0)
    with pytest.raises(SpecError, match="--timeout must"):
        RunSpec(("true",), delegate=EP, timeout_s=0, connect_timeout_s=0)


def test_values_are_normalised_so_equal_runs_compare_equal(tmp_path):
    a = RunSpec(["gzip", "-c"], delegate=EP, forward="write,read", output=tmp_path / "r",
                pin_program=[1, 0], kthread=KthreadSpec())  # fmt: skip
    b = RunSpec(("gzip", "-c"), delegate=EP, forward=frozenset((0, 1)), output=str(tmp_path / "r"),
                pin_program=frozenset((0, 1)))  # fmt: skip
    assert a == b and hash(a) == hash(b)
    assert a.forward == syscalls.parse_set("read,write") and a.program == ("gzip", "-c")
    assert a.kthread is None and a.offload is None  # nothing set outside their modes: dropped
    assert RunSpec(("true",), **KMOD, forward="write").kthread == KthreadSpec()
    off = RunSpec(("true",), mode="offload", delegate=EP, offload=OffloadSpec(["/srv//x/"]))
    assert off.offload == OffloadSpec(("/srv/x",)) and off.forward is None
    assert RunSpec(("true",), delegate=EP, forward="write", offload=OffloadSpec(())).offload is None
    assert RunSpec(("true",), delegate=EP, forward=[], pin_program=[]).pin_program is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.mode = "offload"  # type: ignore[misc]
    # replace() builds (and checks) a new spec
    assert dataclasses.replace(a, forward="write").forward == frozenset({1})
    with pytest.raises(SpecError, match="--delegate ENDPOINT is required"):
        dataclasses.replace(a, delegate=None)


ROUND_TRIP = [
    RunSpec(("gzip", "-c", "big file.tar"), delegate=EP, forward="read,write"),
    RunSpec(
        ("true",),
        delegate="ipc:///tmp/d.sock",
        forward="write",
        busy_poll=True,
        timeout_s=0.25,
        connect_timeout_s=7.5,
        curve_keys="/keys",
        pin_program=[0],
        output="/tmp/run-x",
        stage_trace="/tmp/st.bin",
    ),
    RunSpec(
        ("cat", "--", "-x"), delegate=EP, policy="min-freq:20%", profile="/runs/p", backend="kmod"
    ),
    RunSpec(
        ("sh", "-c", "cp a b"),
        mode="offload",
        delegate=EP,
        offload=OffloadSpec(("/srv/a/", "/srv/b")),
    ),
    RunSpec(
        ("dd",), mode="offload", delegate=EP, offload=OffloadSpec(("/srv/a",), write_behind=4 << 20)
    ),  # fmt: skip
    RunSpec(
        ("dd",),
        **KMOD,
        kthread=KthreadSpec(20, faithful=True, flush_caller_tlb=True),
        forward="write",
    ),
    RunSpec(("dd",), **KMOD, kthread=KthreadSpec(0.1 + 0.2), forward=[1, 0, 60]),
    RunSpec(("dd",), **KMOD, policy="read,write", profile="/p", pin_program=[0, 1]),
]


@pytest.mark.parametrize("spec", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_argv_round_trips_through_the_cli_parser(spec, monkeypatch):
    """spec -> to_argv -> ``testbed run``'s parser -> spec: the runner and the CLI cannot drift."""
    from testbed.cli import build_parser
    from testbed.cli.run import spec_from_args

    monkeypatch.setattr("os.cpu_count", lambda: 64)  # --pin-program checks this machine's CPUs
    args = build_parser().parse_args(["run", *spec.to_argv()])
    assert spec_from_args(args) == spec


def test_defaults_agree_with_the_cli():
    from testbed.cli import build_parser
    from testbed.cli.run import spec_from_args

    args = build_parser().parse_args(["run", "--delegate", EP, "--forward", "write", "--", "x"])
    assert spec_from_args(args) == RunSpec(("x",), delegate=EP, forward="write")
    assert RunSpec(("x",), delegate=EP, forward="write").to_argv() == [
        "--mode", "cost", "--backend", "seccomp", "--delegate", EP, "--forward", "write", "--", "x",
    ]  # fmt: skip


def test_an_empty_forwarded_set_has_no_command_line():
    with pytest.raises(SpecError, match="empty forwarded set"):
        RunSpec(("true",), delegate=EP, forward=[]).to_argv()
