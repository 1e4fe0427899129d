"""``testbed model`` and ``testbed analyze``: thin layers over the analysis API."""

from __future__ import annotations

import argparse
import re
import sys

from testbed.cli.options import Subparsers, new_dir
from testbed.core.errors import TestbedError
from testbed.core.numbers import parse_gammas
from testbed.core.policy import parse_policy
from testbed.core.predictors import check_predictor

# matplotlib, scipy and pandas are imported only once the input is known to be
# good, so a bad argument fails in a fraction of a second.

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0}


def parse_time(text: str) -> float:
    """``10us``, ``1.5ms``, ``100ns``, ``2s`` or a plain number of seconds -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*(ns|us|µs|ms|s|)\s*", str(text))
    if not m:
        raise TestbedError(f"{text!r} is not a time (e.g. 10us, 1ms, 2e-6)")
    return float(m[1]) * _UNITS[m[2]]


def model_tables(profiles, gammas, f_c: float, policy: str):
    """(Table I with S_n per gamma, profiles with p, S_n and S_r per gamma) as DataFrames."""
    import numpy as np  # lazy: numpy
    import pandas as pd  # lazy: pandas

    from analysis import model as M  # lazy: analysis stack
    from analysis.profiles import table1  # lazy: analysis stack

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
    import pandas as pd  # lazy: pandas

    from analysis import figures  # lazy: analysis stack
    from analysis.profiles import load_profile, shipped_profiles, table1  # lazy: analysis stack

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
    predictor = getattr(args, "predictor", None)
    if predictor is not None:
        check_predictor(predictor)
    from analysis.paths import expand_rundirs  # lazy: analysis stack
    from testbed.core import rundir  # lazy: numpy (run directories)
    from testbed.core.sweep_record import split_sweeps  # lazy: numpy (run directories)

    for p in expand_rundirs(split_sweeps(args.rundirs)[0]):  # sweeps: analysis.contention
        run = rundir.load(p)  # a missing or malformed run directory fails before any import
        if not run.complete:
            print(f"testbed: warning: {p} is incomplete (its relay did not finish; "
                  f"{run.calls().size} call records kept): left out of the fit and the "
                  "report", file=sys.stderr)  # fmt: skip
    from analysis.report import write_report  # lazy: analysis stack

    report = write_report(args.rundirs, args.output, policy=policy,
                          predictor=getattr(args, "predictor", None))  # fmt: skip
    print(f"testbed analyze: report written to {report}", file=sys.stderr)
    return 0


def add_parser(sub: Subparsers) -> None:
    """``testbed model`` and ``testbed analyze``."""
    p = sub.add_parser(
        "model",
        help="speedup projections from the naive and extended models",
        description="Project S_n / S_r from profiles (testbed profile -o RUNDIR; default: the "
        "profiles shipped in analysis/data/profiles) or the paper's Table I; print a table "
        "and optionally draw the paper's figures 2-9.",
    )
    p.add_argument(
        "--profile",
        action="append",
        metavar="RUNDIR",
        help="profile run directory (repeatable; default: the shipped profiles)",
    )
    p.add_argument(
        "--table1", action="store_true", help="also print the naive model for the paper's Table I"
    )
    p.add_argument(
        "--gamma",
        default="1,2,5,10,100",
        metavar="LIST",
        help="gains γ to tabulate (default 1,2,5,10,100)",
    )
    p.add_argument(
        "--fc",
        default="10us",
        metavar="TIME",
        help="forwarding cost f_c, e.g. 10us, 1.5ms, 40us (default 10us)",
    )
    p.add_argument(
        "--policy",
        default="min-freq:20%",
        metavar="POLICY",
        help="forwarded set: min-freq:K%%, max-freq:K%%, random:K%%[:SEED] or a list "
        "(default min-freq:20%%)",
    )
    p.add_argument("--plot", metavar="DIR", help="also write figures 2-9 (PNG+SVG) into DIR")
    p.set_defaults(func=main_model)
    p = sub.add_parser(
        "analyze",
        help="fit f_c, predicted vs measured, figures, one report",
        description="Analyse run directories: fit f_c, compare predicted and measured t_d, "
        "draw the figures and write one report.",
    )
    p.add_argument(
        "rundirs",
        nargs="+",
        metavar="RUNDIR",
        help="profile and delegated run directories, or directories holding them",
    )
    p.add_argument(
        "-o",
        "--output",
        type=new_dir,
        metavar="REPORTDIR",
        default="report",
        help="report directory (default ./report)",
    )
    p.add_argument(
        "--policy",
        default="min-freq:20%",
        metavar="POLICY",
        help="policy for the same-node vs remote S_r table (default min-freq:20%%)",
    )
    p.add_argument(
        "--predictor",
        metavar="NAME",
        help="declare the headline's predictor (pooled, per_syscall, size, whole_run, each "
        "+fixed or @paired) instead of choosing it per run by nested cross-validation",
    )
    p.set_defaults(func=main_analyze)
