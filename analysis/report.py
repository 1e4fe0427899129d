"""One self-contained report from run directories (``testbed analyze``).

``write_report(paths, outdir)`` writes ``outdir/report.md`` with every table
inline, ``outdir/figures/*.png|svg`` referenced from it, ``outdir/tables/*.csv``
(the same tables, full precision) and ``outdir/runs.json`` (the metadata of
every run used).  Raw run directories are only read, never modified.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import accuracy, compare, figures, mechanisms, offload
from analysis.paths import expand_rundirs
from analysis.profiles import profiles_frame, shipped_profiles, table1
from testbed.errors import TestbedError


def _fmt(v) -> str:
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return "–"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    if df is None or not len(df):
        return "_(none)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def _us(df: pd.DataFrame, cols) -> pd.DataFrame:
    """Copy with the given second-valued columns converted to µs (renamed)."""
    d = df.copy()
    for c in cols:
        if c in d:
            d[c] = d[c] * 1e6
            d = d.rename(columns={c: c.removesuffix("_s") + " (µs)"})
    return d


PER_CALL_COLS = ["f_c_median_s", "f_c_median_lo_s", "f_c_median_hi_s", "f_c_mean_s",
                 "f_c_mean_lo_s", "f_c_mean_hi_s", "f_c_p99_s"]  # fmt: skip
WHOLE_COLS = ["whole_fc_s", "whole_lo_s", "whole_hi_s", "whole_dof"]
SIZE_COLS = ["alpha_s", "beta_ns_per_byte", "beta_lo_ns_per_byte", "beta_hi_ns_per_byte",
             "beta_p", "size_significant"]  # fmt: skip


def _cols(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """The mechanism column (and runs/calls for the per-call table) plus ``cols``."""
    lead = ["mechanism", "runs", "calls"] if cols is PER_CALL_COLS else ["mechanism"]
    return df[[c for c in lead + cols if c in df]] if len(df) else df


def _run_meta(path: Path, meta: dict) -> dict:
    keep = ("kind", "command", "exit_status", "wall_s", "user_s", "sys_s", "backend", "mode",
            "forwarded", "endpoint", "policy", "method", "C_s", "p_sys", "p_g", "synthetic")  # fmt: skip
    d = {"path": str(path)}
    d.update({k: meta[k] for k in keep if k in meta})
    host = meta.get("host") or {}
    d["host"] = {k: host.get(k) for k in ("hostname", "kernel", "cpu_model", "cores", "clocksource",
                                          "python", "pyzmq", "libzmq", "testbed") if k in host}  # fmt: skip
    if isinstance(meta.get("delegate"), dict):
        d["delegate"] = meta["delegate"]
    return d


def write_report(
    paths, outdir: str | Path, policy: str = "min-freq:20%", gammas=(2.0, 10.0)
) -> Path:
    """Analyse run directories ``paths`` and write the report into ``outdir``.

    A path without ``run.json`` stands for all run directories beneath it.
    Contention sweeps (``testbed contention -o DIR``) get ``contention.md``.
    """
    from analysis import contention

    paths, sweeps = contention.split(paths)
    if sweeps:
        done = contention.write_report(sweeps, outdir)
        if not paths:
            return done
    paths = expand_rundirs(paths)
    if not paths:
        raise TestbedError("no run directories given")
    profiles, runs, natives = compare.load_all(paths)
    from testbed.policy import parse_policy

    parse_policy(policy)  # fail early on a bad policy
    out = Path(outdir)
    figdir, tabdir = out / "figures", out / "tables"
    for d in (out, figdir, tabdir):
        d.mkdir(parents=True, exist_ok=True)

    model_profiles, profile_note = profiles, "the profile run directories given"
    if not model_profiles:
        model_profiles = shipped_profiles()
        profile_note = "the profiles shipped in analysis/data/profiles (no profile was given)"

    native = compare.native_times(profiles, runs, natives=natives)
    native = compare.native_times(
        profiles, runs, compare.whole_run_intercepts(runs, native), natives=natives
    )
    acc = accuracy.analyse(profiles, runs, natives, native, markdown_table)
    mech = compare.fit_mechanisms(runs, native) if runs else pd.DataFrame()
    fc_by_mech = dict(zip(mech.get("mechanism", []), mech.get("f_c_mean_s", []), strict=True))
    pvm = (
        compare.predicted_vs_measured(runs, native, fc_by_mech, profiles)
        if runs
        else pd.DataFrame()
    )
    cv = compare.cross_validate(runs, native) if runs else pd.DataFrame()
    mtab = compare.mechanism_table(mech, model_profiles, policy, gammas)
    off = offload.section(runs, native, markdown_table)  # tables, figure and text
    side = mechanisms.mechanism_section(runs, natives, native, mech, markdown_table)
    tlb = mechanisms.tlb_section(runs, natives, native, markdown_table)
    for name, df in {**side.tables, **tlb.tables}.items():
        df.to_csv(tabdir / f"{name}.csv", index=False)
    for name, df in off.tables.items():
        df.to_csv(tabdir / f"{name}.csv", index=False)
    if off.figure is not None:
        figures.save(off.figure, figdir, "offload")
    tables = {
        "profiles": profiles_frame(model_profiles),
        "runs": compare.runs_frame(runs),
        "fc_per_mechanism": mech,
        "predicted_vs_measured": pvm,
        "cross_validation": cv,
        "same_node_vs_remote": mtab,
        "table1": table1(),
        **acc.tables,
    }
    for name, df in tables.items():
        df.to_csv(tabdir / f"{name}.csv", index=False)

    figs: list[tuple[str, str]] = []

    def fig(name: str, title: str, f) -> None:
        figures.save(f, figdir, name)
        figs.append((name, title))

    fig("fig2_naive", "Fig. 2: naive model S_n over p and γ", figures.fig2_naive())
    fig("fig3_table1", "Fig. 3: naive model for Table I", figures.fig3_table1(table1()))
    if model_profiles:
        fig("fig4_policies_gamma", "Fig. 4: S_r vs γ under three policies",
            figures.fig4_policies_gamma(model_profiles))  # fmt: skip
        fig("fig5_gamma_fc", "Fig. 5: S_r over γ and f_c", figures.fig5_gamma_fc(model_profiles))
        fig("fig6_cdf", "Fig. 6: syscall CDF per workload", figures.fig6_cdf(model_profiles))
        fig("fig7_fc_proportion", "Fig. 7: S_r over f_c and forwarded proportion",
            figures.fig7_fc_proportion(model_profiles))  # fmt: skip
        fig("fig8_gamma_proportion", "Fig. 8: S_r over γ and forwarded proportion",
            figures.fig8_gamma_proportion(model_profiles))  # fmt: skip
        fig("fig9_policies_fc", "Fig. 9: S_r vs f_c under three policies",
            figures.fig9_policies_fc(model_profiles))  # fmt: skip
    if runs:
        names = {r.key: r.workload for r in runs}
        nat = {names[k]: v[0] for k, v in native.items() if k in names}
        fig("fig11_runtimes", "Fig. 11: measured run time per policy",
            figures.fig11_runtimes(tables["runs"], nat))  # fmt: skip
        fig("measured_vs_predicted", "Measured vs predicted t_d",
            figures.fig_measured_vs_predicted(pvm))  # fmt: skip
        samples = {m: compare.pooled_samples(rs)[0] for m, rs in compare.by_mechanism(runs).items()}
        fig("fc_per_mechanism", "Per-call f_c per mechanism", figures.fig_fc_mechanisms(samples))
    if len(acc.fig12) or len(acc.fig13):
        fig("fig12_gain_profile", "Fig. 12: syscall profile of the gain benchmark",
            figures.fig12_gain_profile(acc.fig12))  # fmt: skip
        fig("fig13_gain_speedup", "Fig. 13: gain benchmark speedup vs γ",
            figures.fig13_gain_speedup(acc.fig13))  # fmt: skip

    metas = [_run_meta(p.path, p.meta) for p in profiles] + [
        _run_meta(r.path, r.meta) for r in [*runs, *natives]
    ]
    (out / "runs.json").write_text(json.dumps(metas, indent=2, default=str) + "\n")

    md = [
        "# Delegation testbed — analysis report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(paths)} run "
        f"director{'y' if len(paths) == 1 else 'ies'}: {len(profiles)} profile(s), "
        f"{len(runs)} delegated run(s), {len(natives)} measured native run(s). Model figures use {profile_note}. Times in "
        "seconds unless a column says µs; f_c is the one-way forwarding cost "
        "(per-call f_c = overhead/2). Full-precision tables: `tables/*.csv`; run "
        "metadata: `runs.json` and the last section.",
        "",
        *mechanisms.emulation_note(mechanisms.emulated_hosts(runs, natives)),
        *acc.headline,
        "## Profiles",
        "",
        "p = Σg / t_nd (the naive model's p), p_sys = sys/(user+sys) (the paper's Table I "
        "definition).",
        "",
        markdown_table(tables["profiles"]),
        "## Forwarding cost per mechanism",
        "",
        "Per call: median with a distribution-free 95% CI (binomial order statistics) and "
        "mean with a t CI. Whole run: least squares `t_d = t_nd(workload) + f_c·2Σb(s)n(s)` "
        "at γ = 1 (needs runs of a workload with different forwarded sets or a native "
        "time; – otherwise). Size-aware: `f_c(s) = α + β·bytes`, HC1 standard errors; "
        "β significant when p < 0.05.",
        "",
        "Per call:",
        "",
        markdown_table(_us(_cols(mech, PER_CALL_COLS), PER_CALL_COLS)),
        "Whole run (least squares over runs):",
        "",
        markdown_table(_us(_cols(mech, WHOLE_COLS), WHOLE_COLS[:3])),
        "Size-aware `f_c(s) = α + β·bytes`:",
        "",
        markdown_table(_us(_cols(mech, SIZE_COLS), ["alpha_s"])),
        "## Predicted vs measured t_d",
        "",
        "Prediction at γ = 1, g' = g: `t_d = t_nd + 2·f_c·Σ b(s)n(s)`, f_c = the "
        "mechanism's per-call mean (totals are n × mean; the median describes a typical "
        "call); rel_error = (predicted − measured)/measured. "
        "`Σ b(s)n(s)` is the run's own count of forwarded calls; the profile_* columns "
        "predict from the native profile's n(s) instead (a prediction made before the run).",
        "",
        markdown_table(_us(pvm, ["f_c_s"])),
    ]
    if len(pvm):
        err = pvm["rel_error"].abs()
        md += [
            f"Mean |relative error| {err.mean():.2%}, max {err.max():.2%} over {len(pvm)} runs.",
            "",
        ]
    md += acc.body + [""]
    md += [
        "## Cross-validation across policies",
        "",
        "f_c fitted (per-call mean) on the runs of one policy, used to predict the runs "
        "of every other policy of the same mechanism.",
        "",
        markdown_table(_us(cv, ["f_c_train_s"])),
        "## Same-node vs remote",
        "",
        f"One row per mechanism: its fitted f_c (per-call mean, 95% CI) and the S_r the "
        f"extended model predicts with it for each profiled workload, forwarding "
        f"`{policy}`, at γ = {', '.join(f'{g:g}' for g in gammas)}. The paper's reported "
        "mktrace figure (40 µs) is not a row: it is the reference line of the f_c figure.",
        "",
        markdown_table(_us(mtab, ["f_c_s", "f_c_lo_s", "f_c_hi_s"])),
        *side.markdown,
        *tlb.markdown,
        *off.markdown,
        "## Figures",
        "",
    ]
    for name, title in figs:
        md += [f"### {title}", "", f"![{title}](figures/{name}.png)", "",
               f"[SVG](figures/{name}.svg)", ""]  # fmt: skip
    md += ["## Runs used", ""]
    for m in metas:
        md += [f"### `{m['path']}`", "", "```json", json.dumps(m, indent=2, default=str), "```", ""]
    md += ["## Paper's Table I", "", markdown_table(tables["table1"])]
    report = out / "report.md"
    report.write_text("\n".join(md))
    return report
