"""One self-contained report from run directories (``testbed analyze``).

``write_report(paths, outdir)`` writes ``outdir/report.md`` (what a person
reads: the headline per target class with its CI and how it was obtained, the
limits of the data, accuracy, mechanisms side by side, figures),
``outdir/figures/*.png|svg`` referenced from it, ``outdir/tables/*.csv`` (every
table, full precision, with the provenance columns of
:mod:`analysis.provenance`) and ``outdir/runs.json`` (the metadata of every run
used; report.md only points to it).  Raw run directories are only read, never
modified.  Every number in report.md is out of sample unless it says
"in-sample (fit includes this run)".

Two steps: :func:`build_report` loads and fits and returns the report's
content (:class:`ReportContent`: its tables, sections, numbers and figure
specifications; nothing is written or drawn), then :func:`render_markdown`
assembles ``report.md`` from it and :func:`write_report` writes the files and
draws the figures.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import (
    accuracy,
    compare,
    contention,
    escapes,
    figures,
    mechanisms,
    offload,
    provenance,
    replays,
)
from analysis.compare import DelegatedRun, NativeRun, Profile
from analysis.paths import expand_rundirs
from analysis.profiles import profiles_frame, shipped_profiles, table1
from analysis.tables import in_us, markdown_table
from testbed.core.errors import TestbedError
from testbed.core.policy import parse_policy
from testbed.core.predictors import check_predictor

PER_CALL_COLS = ["f_c_median_s", "f_c_median_lo_s", "f_c_median_hi_s", "f_c_mean_s",
                 "f_c_mean_lo_s", "f_c_mean_hi_s", "f_c_p99_s"]  # fmt: skip
WHOLE_COLS = ["whole_fc_s", "whole_lo_s", "whole_hi_s", "whole_dof"]
SIZE_COLS = ["alpha_s", "beta_ns_per_byte", "beta_lo_ns_per_byte", "beta_hi_ns_per_byte",
             "beta_p", "size_significant"]  # fmt: skip


def _cols(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """The mechanism column (and runs/calls for the per-call table) plus ``cols``."""
    lead = (
        ["host", "mechanism", "runs", "calls"] if cols is PER_CALL_COLS else ["host", "mechanism"]
    )
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


# ---------------------------------------------------------------- content


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report: ``figures/NAME.png|svg``, drawn by ``draw()``.

    ``listed``: the figure has its own entry (``### TITLE``) in the Figures
    section; an unlisted one is referenced from the text of its section.
    ``in_sample``: the figure shows numbers whose fit includes the runs they
    are compared with; it then says so on its face (tested).
    """

    name: str
    title: str
    draw: Callable[[], Figure]
    listed: bool = True
    in_sample: bool = False
    caption: str = ""


@dataclass
class ReportContent:
    """What the report says, computed from the run directories; nothing rendered.

    ``tables`` holds every table of ``tables/*.csv`` by name (the sections'
    tables too), in the order they are written.
    """

    paths: list[Path]
    policy: str
    gammas: tuple[float, ...]
    profiles: list[Profile]
    runs: list[DelegatedRun]
    natives: list[NativeRun]
    model_profiles: list[Profile]
    profile_note: str
    tables: dict[str, pd.DataFrame]
    accuracy: accuracy.Section
    mechanisms: mechanisms.Section
    tlb: mechanisms.Section
    offload: offload.OffloadSection
    replay: mechanisms.Section
    emulated_hosts: list[str]
    run_metas: list[dict]
    measured_fc: figures.MeasuredFc | None = None
    figures: list[FigureSpec] = field(default_factory=list)

    @property
    def fc_per_mechanism(self) -> pd.DataFrame:
        return self.tables["fc_per_mechanism"]

    @property
    def predicted_vs_measured(self) -> pd.DataFrame:
        return self.tables["predicted_vs_measured"]

    def prediction_error(self) -> tuple[float, float, int] | None:
        """Mean and max |relative error| of the leave-one-run-out predictions, and the runs."""
        pvm = self.predicted_vs_measured
        pvm = pvm[~pvm["in_sample"].astype(bool)] if len(pvm) else pvm
        err = pvm["rel_error"].abs().dropna() if len(pvm) else pvm
        if not len(err):
            return None
        return float(err.mean()), float(err.max()), len(err)


def one_per_workload(profiles: list[Profile]) -> tuple[list[Profile], list[str]]:
    """One profile per workload for the model figures (the first host's, by name), and
    a note per workload profiled on several hosts saying which host's is drawn."""
    by: dict[str, list[Profile]] = {}
    for p in profiles:
        by.setdefault(p.name.split(" @ ")[0].split("#")[0], []).append(p)
    out, notes = [], []
    for name, ps in by.items():
        ps = sorted(ps, key=lambda p: p.name)
        out.append(ps[0])
        if len(ps) > 1:
            notes.append(f"`{name}`: {len(ps)} profiles, the model figures draw `{ps[0].name}`")
    return out, notes


def measured_fc(mech: pd.DataFrame) -> figures.MeasuredFc | None:
    """The f_c the model figures mark: the per-call mean (with its CI) of the (host,
    mechanism) with the most calls."""
    if not len(mech) or mech["calls"].max() <= 0:
        return None
    m = mech.loc[mech["calls"].idxmax()]
    where = f"{m['mechanism']} @ {m['host']}" if m.get("host") else str(m["mechanism"])
    return figures.MeasuredFc(where, float(m["f_c_mean_s"]), float(m["f_c_mean_lo_s"]),
                              float(m["f_c_mean_hi_s"]), int(m["calls"]))  # fmt: skip


def declared_predictor(runs, given: str | None) -> tuple[str | None, str]:
    """(predictor, where it was declared): ``given`` (the command line) wins, else the
    one predictor the runs' plans declared; runs of plans declaring different ones are
    refused (one headline needs one rule)."""
    if given is not None:
        return given, "on the command line (--predictor)"
    plans: dict[str, set[str]] = {}
    for r in runs:
        name = r.cell.get("predictor")
        if name:
            plans.setdefault(str(name), set()).add(str(r.cell.get("plan") or "?"))
    if len(plans) > 1:
        said = "; ".join(f"{p} (plan {', '.join(sorted(v))})" for p, v in sorted(plans.items()))
        raise TestbedError(f"the runs' plans declare different predictors ({said}): "
                           "analyse them apart or declare one with --predictor")  # fmt: skip
    if plans:
        ((name, where),) = plans.items()
        check_predictor(name, "experiment.json predictor")
        return name, f"in the plan ({', '.join(sorted(where))})"
    return None, ""


def build_report(
    paths, policy: str = "min-freq:20%", gammas=(2.0, 10.0), predictor: str | None = None
) -> ReportContent:
    """Load run directories ``paths`` (a path without ``run.json`` stands for all
    run directories beneath it), fit and compare: the report's content.

    ``predictor`` is declared (used for every run) instead of chosen by nested
    cross-validation; without it, the predictor the runs' plan declared (``predictor:``,
    recorded in each cell's ``experiment.json``) is."""
    paths = expand_rundirs(paths)
    if not paths:
        raise TestbedError("no run directories given")
    profiles, runs, natives = compare.load_all(paths)
    # replay runs are predictions: kept out of every fit, scored in their own section
    replayed = [r for r in runs if replays.is_replay(r)]
    runs = [r for r in runs if not replays.is_replay(r)]
    if not runs and not profiles and not natives and replayed:
        raise TestbedError("only replay runs given: a replay is scored against real runs of its "
                           "target (give those too)")  # fmt: skip
    predictor, declared_in = declared_predictor(runs, predictor)
    parse_policy(policy)  # fail early on a bad policy
    model_profiles, profile_note = profiles, "the profile run directories given"
    if not model_profiles:
        model_profiles = shipped_profiles()
        profile_note = "the profiles shipped in analysis/data/profiles (no profile was given)"

    native = compare.native_times(profiles, runs, natives=natives)
    native = compare.native_times(
        profiles, runs, compare.whole_run_intercepts(runs, native), natives=natives
    )
    acc = accuracy.analyse(profiles, runs, natives, native, predictor, declared_in)
    mech = compare.fit_mechanisms(runs, native, by_host=True) if runs else pd.DataFrame()
    pvm = (
        compare.predicted_vs_measured(runs, native, profiles=profiles,
                                      fc_by_run=compare.loo_fc(runs))
        if runs
        else pd.DataFrame()
    )  # fmt: skip
    cv = compare.cross_validate(runs, native) if runs else pd.DataFrame()
    mtab = compare.mechanism_table(mech, model_profiles, policy, gammas)
    off = offload.section(runs, native)
    side = mechanisms.mechanism_section(runs, natives, native, mech)
    tlb = mechanisms.tlb_section(runs, natives, native)
    rep = replays.section(replayed, runs, acc.tables.get("model_accuracy"))
    tables = {
        **rep.tables,
        **side.tables,
        **tlb.tables,
        **off.tables,
        "profiles": profiles_frame(model_profiles),
        "runs": compare.runs_frame(runs),
        "policies_resolved": provenance.resolved_sets(runs),
        "fc_per_mechanism": mech,
        "predicted_vs_measured": pvm,
        "cross_validation": cv,
        "same_node_vs_remote": mtab,
        "table1": table1(),
        **acc.tables,
    }
    if len(esc := escapes.table(runs)):  # only runs that recorded run.json escapes
        tables["escapes"] = esc
    metas = [_run_meta(p.path, p.meta) for p in profiles] + [
        _run_meta(r.path, r.meta) for r in [*runs, *natives, *replayed]
    ]
    content = ReportContent(
        paths=paths,
        policy=policy,
        gammas=tuple(gammas),
        profiles=profiles,
        runs=runs,
        natives=natives,
        model_profiles=model_profiles,
        profile_note=profile_note,
        tables=tables,
        accuracy=acc,
        mechanisms=side,
        tlb=tlb,
        offload=off,
        replay=rep,
        emulated_hosts=mechanisms.emulated_hosts(runs, natives),
        run_metas=metas,
        measured_fc=measured_fc(mech),
    )
    content.figures = figure_specs(content, native)
    return content


def figure_specs(c: ReportContent, native: dict) -> list[FigureSpec]:
    """The report's figures (model figures, measurement figures, Figs. 12-13, offload)."""
    specs: list[FigureSpec] = []

    def fig(name: str, title: str, draw: Callable[[], Figure], listed: bool = True,
            in_sample: bool = False, caption: str = "") -> None:  # fmt: skip
        specs.append(FigureSpec(name, title, draw, listed, in_sample, caption))

    profs, notes = one_per_workload(c.model_profiles)
    t, fc = c.tables, c.measured_fc
    mark = (f"The marked f_c is this report's: the per-call mean of `{fc.label}` "
            f"({figures.human_time(fc.value)}, band: 95 % CI)." if fc else
            "No f_c was measured here: the paper's 10 µs is used.")  # fmt: skip
    if notes:
        mark += " One panel per workload: " + "; ".join(notes) + "."
    if c.offload.tables:
        fig("offload", "Offload: slowdown and throughput",
            lambda: offload.figure(t["offload_side_by_side"], t["offload_many_clients"]),
            listed=False)  # fmt: skip
    off_pred = offload.prediction_frame(t.get("model_accuracy", pd.DataFrame()))
    if len(off_pred):
        fig("offload_model", "Offload: predicted vs measured slowdown per workload",
            lambda: offload.prediction_figure(off_pred),
            caption="Each offload run's slowdown t_d / t_nd, measured and predicted by the "
                    "offload model with parameters fitted on other runs only (the offload "
                    "class of `tables/model_accuracy.csv`).")  # fmt: skip
    fig("fig2_naive", "Fig. 2: naive model S_n over p and γ", lambda: figures.fig2_naive())
    fig("fig3_table1", "Fig. 3: naive model for Table I", lambda: figures.fig3_table1(table1()))
    if profs:
        fig("fig4_policies_gamma", "Fig. 4: S_r vs γ under three policies",
            lambda: figures.fig4_policies_gamma(profs, measured=fc), caption=mark)  # fmt: skip
        fig("fig5_gamma_fc", "Fig. 5: S_r over γ and f_c",
            lambda: figures.fig5_gamma_fc(profs, measured=fc), caption=mark)  # fmt: skip
        fig("fig6_cdf", "Fig. 6: syscall CDF per workload", lambda: figures.fig6_cdf(profs))
        fig("fig7_fc_proportion", "Fig. 7: S_r over f_c and forwarded proportion",
            lambda: figures.fig7_fc_proportion(profs, measured=fc), caption=mark)  # fmt: skip
        fig("fig8_gamma_proportion", "Fig. 8: S_r over γ and forwarded proportion",
            lambda: figures.fig8_gamma_proportion(profs, measured=fc), caption=mark)  # fmt: skip
        fig("fig9_policies_fc", "Fig. 9: S_r vs f_c under three policies",
            lambda: figures.fig9_policies_fc(profs, measured=fc), caption=mark)  # fmt: skip
    if c.runs:
        names = {r.key: r.workload for r in c.runs}
        nat = {names[k]: v[0] for k, v in native.items() if k in names}
        by_mech = compare.by_host_mechanism(c.runs)
        hosts = {h for h, _ in by_mech}
        fig("fig11_runtimes", "Fig. 11: measured run time per policy",
            lambda: figures.fig11_runtimes(t["runs"], nat))  # fmt: skip
        acc = t["model_accuracy"]
        fig("measured_vs_predicted", "Measured vs predicted t_d (the headline's predictions)",
            lambda: figures.fig_measured_vs_predicted(acc),
            in_sample=bool(len(acc) and acc["in_sample"].any()),
            caption="Each point is one run predicted by the predictor chosen for it, with "
                    "parameters fitted on other runs only (`tables/model_accuracy.csv`).")  # fmt: skip
        fig("fc_per_mechanism", "Per-call f_c per mechanism",
            lambda: figures.fig_fc_mechanisms(
                {(m if len(hosts) == 1 else f"{m} @ {h}"): compare.pooled_samples(rs)[0]
                 for (h, m), rs in by_mech.items()}))  # fmt: skip
    acc13 = c.accuracy
    if len(acc13.fig12) or len(acc13.fig13):
        fig("fig12_gain_profile", "Fig. 12: syscall profile of the gain benchmark",
            lambda: figures.fig12_gain_profile(acc13.fig12))  # fmt: skip
        fig("fig13_gain_speedup", "Fig. 13: gain benchmark speedup vs γ",
            lambda: figures.fig13_gain_speedup(acc13.fig13), in_sample=True,
            caption="The refined S_r at γ = 1 is in-sample (its f_c is fitted on the γ = 1 "
                    "runs); every γ > 1 point is predicted from γ = 1 only.")  # fmt: skip
    return specs


# ---------------------------------------------------------------- Markdown


def _inputs_line(c: ReportContent) -> str:
    hosts = sorted({r.host or "–" for r in [*c.runs, *c.natives]}
                   | {compare.host_of(p.meta, p.meta.get("experiment") or {}) or "–"
                      for p in c.profiles})  # fmt: skip
    n = len(c.paths)
    return (f"Generated {{generated}} from {n} run director{'y' if n == 1 else 'ies'}: "
            f"{len(c.profiles)} profile(s), {len(c.runs)} delegated run(s), "
            f"{len(c.natives)} measured native run(s), on host(s) "
            f"{', '.join(f'`{h}`' for h in hosts) or '–'}. Model figures use {c.profile_note}. "
            "Times in seconds unless a column says µs; f_c is the one-way forwarding cost "
            "(per-call f_c = overhead/2). Full-precision tables: `tables/*.csv`; the metadata "
            "of every run (command, host, kernel, versions): `runs.json`.")  # fmt: skip


def _header(c: ReportContent, generated: str) -> list[str]:
    return [
        "# Delegation testbed — analysis report",
        "",
        _inputs_line(c).replace("{generated}", generated),
        "",
        *mechanisms.emulation_note(c.emulated_hosts),
        *c.accuracy.headline,
    ]


def _limits(c: ReportContent) -> list[str]:
    """What this data cannot say: emulated hosts, noisy natives, refused comparisons."""
    md = ["## Limits of this data", ""]
    if c.emulated_hosts:
        md.append(f"- Emulated CPU on {', '.join(f'`{h}`' for h in c.emulated_hosts)}: "
                  "absolute times are the emulator's; only ratios within one guest mean "
                  "anything.")  # fmt: skip
    acc = c.tables.get("model_accuracy", pd.DataFrame())
    if len(acc) and acc["native_spread"].notna().any():
        sp = acc.groupby("workload")["native_spread"].median().dropna()
        worst = sp.idxmax()
        md.append(f"- Native spread ((max − min)/median of one workload's native runs): median "
                  f"{sp.median():.0%} over {len(sp)} workload(s), largest {sp.max():.0%} "
                  f"(`{worst}`): an error below that spread cannot be told from noise.")  # fmt: skip
    if len(acc) and acc["native_wall_per_cpu"].notna().any():
        md.append(f"- Native wall/CPU time: median {acc['native_wall_per_cpu'].median():.2f} "
                  "(1 on an idle machine; more when other processes took the CPUs).")  # fmt: skip
    hosts = sorted({r.host for r in c.runs})
    if len(hosts) > 1:
        md.append(f"- {len(hosts)} hosts: every fit and prediction uses one host's runs only; "
                  "a policy may resolve to different syscall sets on different hosts "
                  "(*Policies as resolved*).")  # fmt: skip
    if c.mechanisms.refused:
        md.append(f"- {len(c.mechanisms.refused)} workload/policy group(s) not compared across "
                  "hosts and mechanisms: their runs forwarded different resolved syscall sets "
                  "(*Mechanisms side by side* says which).")  # fmt: skip
    md += ["- In-sample numbers are marked \"in-sample (fit includes this run)\"; every other "
           "prediction is made without the run it predicts.", ""]  # fmt: skip
    return md


def _fc_and_policies(c: ReportContent) -> list[str]:
    mech = c.fc_per_mechanism
    return [
        "## Forwarding cost per host and mechanism",
        "",
        "Per call: median with a distribution-free 95% CI (binomial order statistics) and "
        "mean with a t CI. Whole run: least squares `t_d = t_nd(workload) + f_c·2Σb(s)n(s)` "
        "at γ = 1 (needs runs of a workload with different forwarded sets or a native "
        "time; – otherwise). Size-aware: `f_c(s) = α + β·bytes`, HC1 standard errors; "
        "β significant when p < 0.05. Each row is fitted on every run of its host and "
        "mechanism (a description of the measurement, not a prediction).",
        "",
        markdown_table(in_us(_cols(mech, PER_CALL_COLS), PER_CALL_COLS)),
        "Whole run (least squares over runs):",
        "",
        markdown_table(in_us(_cols(mech, WHOLE_COLS), WHOLE_COLS[:3])),
        "Size-aware `f_c(s) = α + β·bytes`:",
        "",
        markdown_table(in_us(_cols(mech, SIZE_COLS), ["alpha_s"])),
        "## Policies as resolved",
        "",
        "The syscall set each policy forwarded on each host (run.json `forwarded`); the `set` "
        "column of every table refers to these ids. `resolved`: `once on HOST` = resolved "
        "once for the whole experiment from HOST's profile (every node forwards that set; "
        "under Ansible HOST is the controller), `per host` = each node from its own profile.",
        "",
        markdown_table(c.tables["policies_resolved"]),
    ]


def _before_the_run(c: ReportContent) -> list[str]:
    pvm = c.predicted_vs_measured
    cols = ["workload", *provenance.COLUMNS, "forwarded_calls", "t_nd_s", "t_nd_source",
            "f_c_s", "measured_t_d_s", "predicted_t_d_s", "rel_error", "in_sample",
            "profile_forwarded_calls", "profile_rel_error"]  # fmt: skip
    md = [
        "## Leave one run out, and the prediction before the run",
        "",
        "Prediction at γ = 1, g' = g: `t_d = t_nd + 2·f_c·N`, f_c = the per-call mean of every "
        "*other* run of the same host and mechanism (`f_c_from` in "
        "`tables/predicted_vs_measured.csv`); N = the run's own forwarded calls. The "
        "profile_* columns use the native profile's n(s) for N instead: the prediction one "
        "can make before running.",
        "",
        markdown_table(in_us(pvm[[x for x in cols if x in pvm]], ["f_c_s"]) if len(pvm) else pvm),
    ]
    err = c.prediction_error()
    if err is not None:
        mean, mx, n = err
        n_in = int(pvm["in_sample"].sum())
        left = (f" ({n_in} row(s) {accuracy.IN_SAMPLE}, their t_nd being the whole-run "
                "fit's intercept, left out)" if n_in else "")  # fmt: skip
        md += [f"Leave one run out, pooled f_c: mean |relative error| {mean:.2%}, max "
               f"{mx:.2%} over {n} runs{left}.", ""]  # fmt: skip
    return md


def _cross_validation_and_mechanisms(c: ReportContent) -> list[str]:
    return [
        "## Cross-validation across policies",
        "",
        "f_c fitted (per-call mean) on the runs of one policy, used to predict the runs "
        "of every other policy of the same host and mechanism.",
        "",
        markdown_table(in_us(c.tables["cross_validation"], ["f_c_train_s"])),
        "## Same-node vs remote (projections)",
        "",
        f"One row per host and mechanism: its f_c (per-call mean over all its runs, 95% CI) and "
        f"the S_r the extended model projects with it for each profiled workload, forwarding "
        f"`{c.policy}`, at γ = {', '.join(f'{g:g}' for g in c.gammas)}: projections, not "
        "compared with any measurement. The paper's reported mktrace figure (40 µs) is not a "
        "row: it is the reference line of the f_c figure.",
        "",
        markdown_table(in_us(c.tables["same_node_vs_remote"], ["f_c_s", "f_c_lo_s", "f_c_hi_s"])),
        *c.tlb.markdown,
        *c.offload.markdown,
    ]


def _figures(c: ReportContent) -> list[str]:
    md = ["## Figures", ""]
    for f in c.figures:
        if f.listed:
            md += [f"### {f.title}", "", f"![{f.title}](figures/{f.name}.png)", ""]
            if f.caption:
                md += [f.caption, ""]
            md += [f"[SVG](figures/{f.name}.svg)", ""]
    return md


def _reference(c: ReportContent) -> list[str]:
    return [
        "## Profiles",
        "",
        "p = Σg / t_nd (the naive model's p), p_sys = sys/(user+sys) (the paper's Table I "
        "definition).",
        "",
        markdown_table(c.tables["profiles"]),
        "## Paper's Table I",
        "",
        markdown_table(c.tables["table1"]),
        "## Inputs",
        "",
        f"{len(c.paths)} run directories; each one's path, command, host and versions are in "
        "`runs.json`, and `tables/runs.csv` has one row per delegated run with its provenance.",
        "",
    ]


def render_markdown(c: ReportContent, generated: str) -> str:
    """``report.md`` of ``c``; ``generated`` is the time stamp its first line states."""
    md = [
        *_header(c, generated),
        *_limits(c),
        *escapes.markdown(c.tables.get("escapes", pd.DataFrame())),
        *c.accuracy.body,
        *c.mechanisms.markdown,
        *_fc_and_policies(c),
        *_before_the_run(c),
        *_cross_validation_and_mechanisms(c),
        *c.replay.markdown,
        *_figures(c),
        *_reference(c),
    ]
    return "\n".join(md)


# ---------------------------------------------------------------- files


def write_report(
    paths,
    outdir: str | Path,
    policy: str = "min-freq:20%",
    gammas=(2.0, 10.0),
    predictor: str | None = None,
) -> Path:
    """Analyse run directories ``paths`` and write the report into ``outdir``.

    A path without ``run.json`` stands for all run directories beneath it.
    Contention sweeps (``testbed contention -o DIR``) get ``contention.md``.
    """
    paths, sweeps = contention.split(paths)
    if sweeps:
        done = contention.write_report(sweeps, outdir)
        if not paths:
            return done
    content = build_report(paths, policy, gammas, predictor)
    out = Path(outdir)
    figdir, tabdir = out / "figures", out / "tables"
    for d in (out, figdir, tabdir):
        d.mkdir(parents=True, exist_ok=True)
    for name, df in content.tables.items():
        df.to_csv(tabdir / f"{name}.csv", index=False)
    for f in content.figures:
        figures.save(f.draw(), figdir, f.name)
    (out / "runs.json").write_text(json.dumps(content.run_metas, indent=2, default=str) + "\n")
    report = out / "report.md"
    report.write_text(render_markdown(content, time.strftime("%Y-%m-%d %H:%M:%S %Z")))
    return report
