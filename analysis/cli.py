"""``testbed model`` and ``testbed analyze``: thin layers over the analysis API."""

from __future__ import annotations

import argparse
import math
import re
import sys

from testbed.errors import TestbedError
from testbed.policy import parse_policy

# matplotlib, scipy and pandas are imported only once the input is known to be
# good, so a bad argument fails in a fraction of a second.

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0}


def parse_time(text: str) -> float:
    """``10us``, ``1.5ms``, ``100ns``, ``2s`` or a plain number of seconds -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(ns|us|µs|ms|s|)\s*", str(text))
    if not m:
        raise TestbedError(f"{text!r} is not a time (e.g. 10us, 1ms, 2e-6)")
    return float(m[1]) * _UNITS[m[2]]


def parse_gammas(text: str) -> list[float]:
    try:
        vals = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise TestbedError(f"gamma {text!r} is not a list of numbers (e.g. 1,2,10)") from None
    if not vals or any(not (v > 0 and math.isfinite(v)) for v in vals):
        raise TestbedError(f"gamma {text!r}: gains must be finite and > 0")
    return vals


def model_tables(profiles, gammas, f_c: float, policy: str):
    """(Table I with S_n per gamma, profiles with p, S_n and S_r per gamma) as DataFrames."""
    import numpy as np
    import pandas as pd

    from analysis import model as M
    from analysis.profiles import table1

    gam = np.asarray(gammas, dtype=float)
    t1 = table1()
    sn = M.S_n(t1["p"].to_numpy()[:, None], gam[None, :])
    naive = t1[["benchmark", "p"]].copy()
    for j, g in enumerate(gam):
        naive[f"S_n γ={g:g}"] = sn[:, j]
    rows = []
    for p in profiles:
        b = p.b(policy)
        row = {"workload": p.name, "p": p.p, "types": int((p.n > 0).sum()),
               "forwarded": int(b.sum()), "fwd_calls": int((b * p.n).sum())}  # fmt: skip
        s_n = M.S_n(p.p, gam)
        s_r = M.S_r(p.C, p.g, p.n, b, gam, f_c)
        for j, g in enumerate(gam):
            row[f"S_n γ={g:g}"] = float(s_n[j])
            row[f"S_r γ={g:g}"] = float(s_r[j])
        rows.append(row)
    return naive, pd.DataFrame(rows)


def main_model(args: argparse.Namespace) -> int:
    policy = args.policy
    parse_policy(policy)
    gammas = args.gamma if isinstance(args.gamma, list) else parse_gammas(args.gamma)
    f_c = args.fc if isinstance(args.fc, float) else parse_time(args.fc)
    import pandas as pd

    from analysis import figures
    from analysis.profiles import load_profile, shipped_profiles, table1

    profiles = [load_profile(p) for p in (args.profile or [])]
    shipped = not profiles
    if shipped:
        profiles = shipped_profiles()
    naive, ext = model_tables(profiles, gammas, f_c, policy)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 50)
    if args.table1 or shipped:
        print("Naive model S_n = 1/(p + (1-p)/γ) for the paper's Table I (SPEC CPU 2017):")
        print(naive.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print()
    if len(ext):
        src = "shipped profiles (analysis/data/profiles)" if shipped else "given profiles"
        print(f"Extended model, {src}: f_c = {figures.human_time(f_c)}, policy {policy}:")
        print(ext.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.plot:
        figures.save(figures.fig2_naive(), args.plot, "fig2_naive")
        figures.save(figures.fig3_table1(table1(), None), args.plot, "fig3_table1")
        if profiles:
            figures.save(
                figures.fig4_policies_gamma(profiles, f_c), args.plot, "fig4_policies_gamma"
            )
            figures.save(figures.fig5_gamma_fc(profiles), args.plot, "fig5_gamma_fc")
            figures.save(figures.fig6_cdf(profiles), args.plot, "fig6_cdf")
            figures.save(figures.fig7_fc_proportion(profiles), args.plot, "fig7_fc_proportion")
            figures.save(figures.fig8_gamma_proportion(profiles, f_c), args.plot,
                         "fig8_gamma_proportion")  # fmt: skip
            figures.save(figures.fig9_policies_fc(profiles), args.plot, "fig9_policies_fc")
        print(f"figures written to {args.plot}", file=sys.stderr)
    return 0


def main_analyze(args: argparse.Namespace) -> int:
    policy = getattr(args, "policy", None) or "min-freq:20%"
    parse_policy(policy)
    from analysis.paths import expand_rundirs
    from testbed import rundir
    from testbed.contention import split_sweeps

    for p in expand_rundirs(split_sweeps(args.rundirs)[0]):  # sweeps: analysis.contention
        run = rundir.load(p)  # a missing or malformed run directory fails before any import
        if not run.complete:
            print(f"testbed: warning: {p} is incomplete (its relay did not finish; "
                  f"{run.calls().size} call records kept): left out of the fit and the "
                  "report", file=sys.stderr)  # fmt: skip
    from analysis.report import write_report

    report = write_report(args.rundirs, args.output, policy=policy)
    print(f"testbed analyze: report written to {report}", file=sys.stderr)
    return 0
