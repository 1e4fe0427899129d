"""Lists of gains γ given on a command line: the one parser of ``"1,2,4"``.

Used by ``testbed model`` (any gains, as floats) and by the gain benchmark's
sweep, ``testbed gainbench`` (integer gains, checked by
:func:`testbed.jobs.gainbench.check_gamma`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from testbed.core.errors import TestbedError

EXAMPLE = "e.g. 1,2,4,8,16"


def parse_gammas(
    text: str, *, integer: bool = False, check: Callable[[int | float], object] | None = None
) -> list:
    """``"1,2,4"`` -> ``[1.0, 2.0, 4.0]`` (``[1, 2, 4]`` with ``integer``).

    Blank items are skipped; every gain is finite and > 0 and listed once;
    ``check`` (raising :class:`TestbedError`) can restrict each value further.
    Anything else is one :class:`TestbedError` naming the list.
    """
    convert, kind = (int, "an integer") if integer else (float, "a number")
    out: list = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = convert(part)
        except ValueError:
            raise TestbedError(f"gamma list {text!r}: {part!r} is not {kind} ({EXAMPLE})") from None
        if check is not None:
            check(value)
        if not (math.isfinite(value) and value > 0):
            raise TestbedError(f"gamma list {text!r}: gains must be finite and > 0, not {part!r}")
        if value in out:
            raise TestbedError(f"gamma list {text!r}: {value:g} appears twice")
        out.append(value)
    if not out:
        raise TestbedError(f"gamma list {text!r}: no gain given ({EXAMPLE})")
    return out
