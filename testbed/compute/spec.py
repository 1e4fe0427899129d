"""The options of one ``testbed run``, typed and checked once: :class:`RunSpec`.

A :class:`RunSpec` is what :func:`testbed.compute.run.run` runs.  Building one
validates it: every option that does not go with the chosen mode (or needs
another) is refused here, with the one-line message ``testbed run`` prints,
in the order the options are checked; nothing downstream checks them again.
What a spec cannot know is found out when it runs: whether the program
exists, the profile a policy reads, the delegate, the kernel module.

The CLI builds a spec from its arguments (:mod:`testbed.cli.run`);
``testbed experiment`` builds one per cell and starts ``python -m testbed run``
with :meth:`RunSpec.to_argv`, which the CLI's parser reads back into an equal
spec: one description of the options, no argv assembled by hand.

Values are normalised on the way in (a ``--forward`` text becomes syscall
numbers, paths become ``str``, lists become tuples and frozensets), so two
specs asking for the same run compare equal.  A :class:`KthreadSpec` that
sets nothing outside ``--mode kthread`` is dropped, as is an
:class:`OffloadSpec` without paths; ``--mode kthread`` without one gets the
defaults.

This module lives in ``testbed.compute`` (not ``testbed.core``): it is the
input of the compute layer's ``run``, built by the layers above it (jobs,
CLI); nothing in ``core`` or ``analysis`` reads it (they read ``run.json``).
It imports only ``testbed.core`` so that building a spec stays cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from testbed.core import syscalls
from testbed.core.cpus import format_cpus
from testbed.core.errors import TestbedError

MODES = ("cost", "offload", "kthread")
BACKENDS = ("seccomp", "kmod")
#: Longest per-call or handshake timeout accepted (s): beyond it a call that
#: never gets an answer blocks its program for longer than any run we measure.
MAX_TIMEOUT_S = 24 * 3600.0
#: ``RunSpec`` defaults of the options ``testbed run`` also defaults.
DEFAULT_TIMEOUT_S = 2.0
DEFAULT_CONNECT_TIMEOUT_S = 3.0


class SpecError(TestbedError):
    """Options of a run that do not go together (one line, as ``testbed run`` prints it)."""


def check_timeout(name: str, seconds: float) -> float:
    """A timeout in (0, MAX_TIMEOUT_S] seconds, or one clear TestbedError."""
    if not (0 < seconds <= MAX_TIMEOUT_S):  # also refuses NaN
        raise SpecError(f"{name} must be > 0 and <= {MAX_TIMEOUT_S:g} seconds, not {seconds:g}")
    return seconds


def norm_prefix(prefix: str) -> str:
    """An ``--offload-path`` as an absolute, normalised path."""
    if not prefix.startswith("/"):
        raise SpecError(f"--offload-path {prefix!r} must be an absolute path")
    p = os.path.normpath(prefix)
    if p in ("/", "//"):
        raise SpecError("--offload-path / would offload every file, the program's own included")
    return p


@dataclass(frozen=True)
class KthreadSpec:
    """``--mode kthread``: the mktrace module's kernel thread on this node.

    ``delay_us``: the thread spins D µs on each leg; ``faithful``: borrow the
    caller's mm and flush its CPU's TLB like the original mktrace;
    ``flush_caller_tlb`` (with ``faithful``): the caller flushes its own CPU too.
    Checked by the :class:`RunSpec` holding it.
    """

    delay_us: float = 0.0
    faithful: bool = False
    flush_caller_tlb: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "delay_us", float(self.delay_us))

    def check(self) -> None:
        from testbed.compute.interpose.kmod_abi import MAX_DELAY_NS  # lazy: ctypes, kthread only

        if self.flush_caller_tlb and not self.faithful:
            raise SpecError("--flush-caller-tlb needs --faithful")
        if self.delay_us < 0:
            raise SpecError(f"--delay-us must be >= 0, not {self.delay_us:g}")
        if self.delay_us * 1000 > MAX_DELAY_NS:
            raise SpecError(f"--delay-us must be at most {MAX_DELAY_NS // 1000} (1 s per leg)")


#: --offload-read-ahead: reads in flight at most (fastpath.c RA_MAX)
READ_AHEAD_MAX = 8


@dataclass(frozen=True)
class OffloadSpec:
    """``--mode offload``: file I/O on or under ``paths`` executes at the delegate.

    The prefixes are normalised (absolute, no trailing slash) by the
    :class:`RunSpec` holding it; the trapped calls are the offload table's
    (:func:`testbed.core.offload_calls.trapped`), not chosen per run.
    """

    paths: tuple[str, ...] = ()
    #: write-behind window in bytes (0: every write waits for its reply), docs/offload.md
    write_behind: int = 0
    #: reads in flight ahead of a sequential reader (0: none), docs/offload.md
    read_ahead: int = 0

    def __post_init__(self) -> None:
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in paths))


def _path(value: str | os.PathLike | None) -> str | None:
    return os.fspath(value) if value else None


def _num(x: float) -> str:
    """``x`` as text that reads back as exactly ``x`` (short where ``%g`` is exact)."""
    text = f"{x:g}"
    return text if float(text) == x else repr(x)


@dataclass(frozen=True)
class RunSpec:
    """Everything ``testbed run`` is asked to do, checked when it is built.

    ``program``: argv of the program (not empty).  ``mode``: ``cost``
    (acknowledge, run the call locally), ``offload`` (the delegate executes
    file I/O, see ``offload``) or ``kthread`` (see ``kthread``).  ``backend``:
    ``seccomp`` or ``kmod``.  ``delegate``: endpoint (cost and offload).
    The forwarded set (cost, kthread) is ``forward`` (syscall numbers, or a
    text such as ``"read,write"``) or ``policy`` applied to the native
    ``profile``.  ``output``: run directory (default ``runs/run-TIME``).
    ``timeout_s``: per call before it is released locally;
    ``connect_timeout_s``: the delegate's handshake; ``busy_poll``: spin while
    a reply is due; ``curve_keys``: CURVE key folder; ``pin_program``: CPUs
    of the program.  ``stage_trace``: file where the relay saves its per-call
    stage stamps (``testbed bench --breakdown``; ``--stage-trace``, not in
    ``--help``).
    """

    program: tuple[str, ...]
    mode: str = "cost"
    backend: str = "seccomp"
    delegate: str | None = None
    forward: frozenset[int] | None = None
    policy: str | None = None
    profile: str | None = None
    output: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    busy_poll: bool = False
    curve_keys: str | None = None
    pin_program: frozenset[int] | None = None
    kthread: KthreadSpec | None = None
    offload: OffloadSpec | None = None
    stage_trace: str | None = None

    def __post_init__(self) -> None:
        self._normalise()
        self._validate()

    # ------------------------------------------------------------ building

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _normalise(self) -> None:
        self._set("program", (self.program,) if isinstance(self.program, str)
                  else tuple(self.program))  # fmt: skip
        if not self.program:
            raise SpecError("no program given (put it after --, e.g. -- gzip -k FILE)")
        if isinstance(self.forward, str):
            self._set("forward", syscalls.parse_set(self.forward))
        elif self.forward is not None:
            self._set("forward", frozenset(self.forward))
        self._set("pin_program", frozenset(self.pin_program) if self.pin_program else None)
        for name in ("profile", "output", "stage_trace"):
            self._set(name, _path(getattr(self, name)))
        if self.offload is not None and not self.offload.paths:
            for opt, val in (
                ("--offload-write-behind", self.offload.write_behind),
                ("--offload-read-ahead", self.offload.read_ahead),
            ):
                if val:
                    raise SpecError(f"{opt} is only used with --mode offload and --offload-path")
            self._set("offload", None)
        if self.mode == "kthread" and self.kthread is None:
            self._set("kthread", KthreadSpec())
        elif self.mode != "kthread" and self.kthread == KthreadSpec():
            self._set("kthread", None)

    def _validate(self) -> None:
        """The refusals of ``testbed run``, in the order it has always made them."""
        if self.mode not in MODES:
            raise SpecError(f"unknown mode {self.mode!r} (choose {', '.join(MODES)})")
        if self.mode == "kthread":
            if self.backend != "kmod":
                raise SpecError(
                    f"--mode kthread needs --backend kmod (the mktrace module's kernel thread), "
                    f"not {self.backend}"
                )
            if self.delegate:
                raise SpecError(
                    "--mode kthread forwards to the kernel thread on this node: drop --delegate"
                )
            if self.curve_keys:
                raise SpecError("--curve-keys is for a delegate endpoint, not --mode kthread")
            if self.offload:
                raise SpecError("--offload-path is only used with --mode offload")
            self.kthread.check()
            self._check_selection()
            return
        if self.kthread is not None:
            raise SpecError(
                "--delay-us, --faithful and --flush-caller-tlb apply to --mode kthread only "
                "(a delegate's delay is testbed delegate --delay-us)"
            )
        if not self.delegate:
            raise SpecError("--delegate ENDPOINT is required (or --backend kmod --mode kthread)")
        check_timeout("--timeout", self.timeout_s)
        check_timeout("--connect-timeout", self.connect_timeout_s)
        if self.mode == "offload":
            if self.forward is not None or self.policy is not None or self.profile:
                raise SpecError("--forward/--policy/--profile choose calls for cost mode; "
                                "offload mode traps the file-I/O calls itself")  # fmt: skip
            if self.offload is None:
                raise SpecError("--mode offload needs at least one --offload-path PREFIX")
            if self.backend != "seccomp":
                raise SpecError("offload mode needs --backend seccomp (ADDFD placeholders)")
            wb = self.offload.write_behind
            if not isinstance(wb, int) or wb < 0:
                raise SpecError(f"--offload-write-behind must be a byte count >= 0, not {wb!r}")
            ra = self.offload.read_ahead
            if not isinstance(ra, int) or not 0 <= ra <= READ_AHEAD_MAX:
                raise SpecError(f"--offload-read-ahead must be a number of reads in 0..{READ_AHEAD_MAX}, "
                                f"not {ra!r}")  # fmt: skip
            if ra and wb:
                raise SpecError("--offload-read-ahead and --offload-write-behind cannot be combined "
                                "(read-ahead runs on the relay's C path, write-behind on its "
                                "Python path)")  # fmt: skip
            self._set("offload", OffloadSpec(tuple(norm_prefix(p) for p in self.offload.paths),
                                             wb, ra))  # fmt: skip
            return
        if self.offload:
            raise SpecError("--offload-path is only used with --mode offload")
        self._check_selection()
        if self.backend not in BACKENDS:
            raise SpecError(f"unknown backend {self.backend!r} (choose seccomp or kmod)")

    def _check_selection(self) -> None:
        """The forwarded set of a cost-mode or kthread run: ``forward``, or ``policy`` on ``profile``."""
        if self.forward is not None:
            if self.profile:
                raise SpecError("--profile is only used with --policy")
            return
        if not self.profile:
            if self.policy is None:
                raise SpecError("one of --forward or --policy is required (cost mode)")
            raise SpecError("--policy needs --profile RUNDIR (a native profile to choose from)")

    # ------------------------------------------------------------ rendering

    def to_argv(self) -> list[str]:
        """The ``testbed run`` arguments (options, ``--``, program) that parse back to this spec."""
        argv = ["--mode", self.mode, "--backend", self.backend]
        if self.delegate:
            argv += ["--delegate", self.delegate]
        if self.kthread is not None:
            argv += ["--delay-us", _num(self.kthread.delay_us)]
            argv += ["--faithful"] if self.kthread.faithful else []
            argv += ["--flush-caller-tlb"] if self.kthread.flush_caller_tlb else []
        for path in self.offload.paths if self.offload else ():
            argv += ["--offload-path", path]
        if self.offload and self.offload.write_behind:
            argv += ["--offload-write-behind", str(self.offload.write_behind)]
        if self.offload and self.offload.read_ahead:
            argv += ["--offload-read-ahead", str(self.offload.read_ahead)]
        if self.forward is not None:
            if not self.forward:
                raise SpecError("an empty forwarded set has no --forward option")
            names = (syscalls.NAME_BY_NR.get(nr, str(nr)) for nr in sorted(self.forward))
            argv += ["--forward", ",".join(names)]
        if self.policy is not None:
            argv += ["--policy", self.policy]
        if self.profile:
            argv += ["--profile", self.profile]
        if self.timeout_s != DEFAULT_TIMEOUT_S:
            argv += ["--timeout", _num(self.timeout_s)]
        if self.connect_timeout_s != DEFAULT_CONNECT_TIMEOUT_S:
            argv += ["--connect-timeout", _num(self.connect_timeout_s)]
        if self.busy_poll:
            argv += ["--busy-poll"]
        if self.curve_keys:
            argv += ["--curve-keys", self.curve_keys]
        if self.pin_program:
            argv += ["--pin-program", format_cpus(self.pin_program)]
        if self.output:
            argv += ["-o", self.output]
        if self.stage_trace:
            argv += ["--stage-trace", self.stage_trace]
        return [*argv, "--", *self.program]
