"""The names of the model's predictors of ``t_d`` (a format: plans, the command line
and ``analysis.accuracy`` share them).  What each one computes is in
:mod:`analysis.accuracy`; a plan or ``testbed analyze --predictor`` may declare one
before any data is seen, and the name is checked here, without the analysis stack.
"""

from __future__ import annotations

from testbed.core.errors import TestbedError

BASE = ("pooled", "per_syscall", "size", "whole_run")
PREDICTORS = (*BASE, *(f"{p}+fixed" for p in BASE), *(f"{p}@paired" for p in BASE))

#: Used when the training runs cannot choose a predictor (no inner fold: e.g. one
#: policy left after the test run's own is held out).  Declared here, before any data.
DEFAULT_PREDICTOR = "pooled"

#: Offload runs' own predictors (:mod:`analysis.offload_model`): the delegate's execution
#: time replaces the local one, plus forwarding (size-aware), plus a per-run term
#: (``+fixed``) or a per-run term and a cost per trapped call continued locally (``+local``).
#: Offload runs are never predicted by the cost-mode ones, nor cost runs by these.
OFFLOAD_PREDICTORS = ("offload", "offload+fixed", "offload+local")
DEFAULT_OFFLOAD_PREDICTOR = "offload"
#: Every name a plan or ``testbed analyze --predictor`` may declare.
ALL_PREDICTORS = (*PREDICTORS, *OFFLOAD_PREDICTORS)


def check_predictor(name: str, where: str = "predictor") -> str:
    """``name`` if it is a predictor's name, else a :class:`TestbedError` listing them."""
    if name not in ALL_PREDICTORS:
        raise TestbedError(
            f"{where}: unknown predictor {name!r} (one of {', '.join(ALL_PREDICTORS)})"
        )
    return name
