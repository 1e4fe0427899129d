"""Analysis of delegation runs: the paper's speedup models, profiles, fitting, figures.

Importable from a notebook; the ``testbed model`` / ``testbed analyze``
commands are thin layers over this API (see ``docs/analysis.md``)::

    import analysis as A

    A.S_n(0.1223, 10)                              # naive model: 4.76
    prof = A.load_profile("runs/profile-gzip")     # testbed profile -o ...
    b = prof.b("min-freq:20%")                     # b(s) of a policy
    A.S_r(prof.C, prof.g, prof.n, b, gamma=10, f_c=10e-6)
    A.grid(prof.C, prof.g, prof.n, prof.b_sweep("min-freq", range(0, 101, 10)),
           gamma=[1, 2, 10], f_c=[1e-6, 1e-5])      # shape (3, 2, 11)
    profiles, runs = A.load_runs(["runs/prof", "runs/run-1", "runs/run-2"])
    A.per_call_fc(runs[0].calls).median            # f_c with its 95 % CI
    A.write_report(["runs/prof", "runs/run-1"], "report")

Modules: ``model`` (maths), ``profiles`` (profiles, Table I), ``fit``
(f_c estimators), ``compare`` (predicted vs measured, cross-validation,
mechanisms), ``accuracy`` (predictors, nested cross-validation, the
headline), ``provenance`` (host, mechanism, transport, resolved set of every
row), ``figures`` (one function per figure), ``figcheck`` (is a figure
readable), ``report``,
``workloads`` (small real programs to profile), ``synthetic`` (run
directories with a known f_c).  Policies live in :mod:`testbed.core.policy`.
"""

import importlib

#: Public name -> module that defines it.  Imported lazily (PEP 562) so that
#: ``import analysis.model`` does not pull in matplotlib, scipy and pandas.
_EXPORTS = {
    "analysis.model": ("S_n", "S_r", "t_nd", "t_d", "t_local", "t_remote", "grid", "p_of"),
    "analysis.profiles": ("Profile", "load_profile", "shipped_profiles", "table1"),
    "testbed.core.policy": ("parse_policy", "choose", "resolve_policy"),
    "analysis.fit": ("per_call", "per_call_fc", "whole_run", "size_aware"),
    "analysis.compare": (
        "load_runs",
        "native_times",
        "fit_mechanisms",
        "predicted_vs_measured",
        "cross_validate",
        "mechanism_table",
    ),  # fmt: skip
    "analysis.report": ("write_report", "build_report"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))
