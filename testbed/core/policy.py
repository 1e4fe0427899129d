"""Forwarding policies: which system calls a run delegates.

A policy is written as text (``testbed run --policy``, ``testbed model
--policy``):

  ``read,write``          an explicit list of names or numbers
  ``min-freq:K%``         the K% of the syscall *types* a profile invokes that
                          are invoked least often (the paper's best case)
  ``max-freq:K%``         the K% invoked most often (the paper's worst case)
  ``random:K%[:SEED]``    K% of the types chosen at random (SEED defaults to 0)

K is a percentage of the number of distinct syscalls with ``n(s) > 0`` in the
profile (types, not invocations, as in the paper, section III-B), 0 <= K <= 100,
fractions allowed (``12.5%``); the ``%`` sign is optional.

Rounding: a policy of K% over T types chooses ``m = floor(K*T/100 + 1/2)``
types (round half up, computed exactly with fractions), so 20% of 7 types is
1 (1.4) and 50% of 5 types is 3 (2.5).  ``K = 0`` chooses nothing, ``K = 100``
everything.

Ties (deterministic): ``min-freq`` orders types by ``(n, nr)`` ascending,
``max-freq`` by ``n`` descending then ``nr`` ascending, so among equally
frequent calls the lower syscall number is taken first.  ``random`` shuffles
the types sorted by number with ``random.Random(SEED)`` and takes a prefix, so
for one seed a smaller K always chooses a subset of a larger K.

Everything here is pure except :func:`resolve_policy`, which reads a profile
run directory.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from testbed.core.errors import TestbedError
from testbed.core.rundir import load
from testbed.core.syscalls import lookup, name_of, parse_set

KINDS = ("list", "min-freq", "max-freq", "random")


class PolicyError(TestbedError):
    """A policy that cannot be parsed or applied."""


@dataclass(frozen=True)
class Policy:
    """A parsed policy: ``kind`` is one of :data:`KINDS`."""

    kind: str
    k: Fraction | None = None  # percent, for the frequency/random kinds
    seed: int = 0
    nrs: frozenset[int] = frozenset()  # for kind == "list"

    def __str__(self) -> str:
        if self.kind == "list":
            return ",".join(name_of(n) for n in sorted(self.nrs))
        k = _fmt_k(self.k)
        if self.kind == "random":
            return f"random:{k}%:{self.seed}"
        return f"{self.kind}:{k}%"


def _fmt_k(k: Fraction | None) -> str:
    if k is None:
        return "?"
    return str(k.numerator) if k.denominator == 1 else f"{float(k):g}"


def _parse_k(text: str, spec: str) -> Fraction:
    t = text.strip().removesuffix("%").strip()
    try:
        k = Fraction(t)
    except (ValueError, ZeroDivisionError):
        raise PolicyError(f"policy {spec!r}: {text!r} is not a percentage (e.g. 20%)") from None
    if not 0 <= k <= 100:
        raise PolicyError(f"policy {spec!r}: k = {float(k):g}% is outside 0-100%")
    return k


def parse_policy(text: str) -> Policy:
    """Parse a policy string (see the module docstring); one-line error otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise PolicyError("empty policy (use e.g. min-freq:20% or read,write)")
    spec = text.strip()
    head, sep, rest = spec.partition(":")
    head_l = head.strip().lower()
    if head_l in ("min-freq", "max-freq", "random"):
        if not sep or not rest.strip():
            raise PolicyError(f"policy {spec!r}: missing percentage (e.g. {head_l}:20%)")
        if head_l == "random":
            k_text, sep2, seed_text = rest.partition(":")
            seed = 0
            if sep2:
                try:
                    seed = int(seed_text)
                except ValueError:
                    raise PolicyError(
                        f"policy {spec!r}: seed {seed_text!r} is not an integer"
                    ) from None
            return Policy("random", _parse_k(k_text, spec), seed=seed)
        return Policy(head_l, _parse_k(rest, spec))
    if sep:
        raise PolicyError(
            f"unknown policy {head.strip()!r} (use min-freq:K%, max-freq:K%, random:K%[:SEED] "
            "or a list such as read,write)"
        )
    try:
        return Policy("list", nrs=parse_set(spec))
    except TestbedError as exc:
        raise PolicyError(f"policy {spec!r}: {exc}") from None


def count_of(k: Fraction | float, types: int) -> int:
    """How many of ``types`` syscall types K% chooses (round half up)."""
    return math.floor(Fraction(k) * types / 100 + Fraction(1, 2))


def _normalise(counts: Mapping[str | int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for key, n in counts.items():
        nr = lookup(key)
        if int(n) < 0:
            raise PolicyError(f"negative count {n} for syscall {key!r}")
        if int(n) > 0:
            out[nr] = out.get(nr, 0) + int(n)
    return out


def order(kind: str, counts: Mapping[str | int, int], seed: int = 0) -> list[int]:
    """The syscall numbers with ``n > 0`` in the order ``kind`` chooses them.

    ``choose(policy, counts)`` is the first ``count_of(k, len(order))`` of
    these; analysis uses the full order to sweep K without re-sorting.
    """
    c = _normalise(counts)
    if kind == "min-freq":
        return sorted(c, key=lambda nr: (c[nr], nr))
    if kind == "max-freq":
        return sorted(c, key=lambda nr: (-c[nr], nr))
    if kind == "random":
        nrs = sorted(c)
        random.Random(seed).shuffle(nrs)
        return nrs
    raise PolicyError(f"policy kind {kind!r} has no order (one of min-freq, max-freq, random)")


def choose(policy: Policy, counts: Mapping[str | int, int]) -> frozenset[int]:
    """The syscall numbers ``policy`` forwards for a profile's counts ``n(s)``.

    ``counts`` maps syscall names (or numbers) to invocation counts; types
    with zero count are not invoked and never chosen by the K% kinds.
    """
    if policy.kind == "list":
        return policy.nrs
    ranked = order(policy.kind, counts, policy.seed)
    return frozenset(ranked[: count_of(policy.k, len(ranked))])


def resolve_policy(text: str, profile_rundir) -> frozenset[int]:
    """Parse ``text`` and apply it to the profile in run directory ``profile_rundir``.

    The profile's ``syscalls.csv`` must have ``name`` and ``n`` columns (as
    written by ``testbed profile``; a delegated run's table works too).  An
    explicit list needs no profile (``profile_rundir`` may be None).
    """
    policy = parse_policy(text)
    if policy.kind == "list":
        return policy.nrs
    if profile_rundir is None:
        raise PolicyError(f"policy {text!r} needs a profile (--profile RUNDIR)")

    run = load(profile_rundir)
    counts: dict[int, int] = {}
    for row in run.syscalls:
        try:
            nr = int(row.get("nr", -1))
            if nr < 0:
                nr = lookup(row["name"])
            counts[nr] = counts.get(nr, 0) + int(float(row["n"]))
        except (KeyError, ValueError, TypeError):
            raise PolicyError(
                f"{run.path}: syscalls.csv has no usable name/nr/n columns (not a profile?)"
            ) from None
        except TestbedError:
            continue  # a syscall this table does not know cannot be forwarded
    if not counts:
        raise PolicyError(f"{run.path}: profile lists no system calls")
    return choose(policy, counts)
