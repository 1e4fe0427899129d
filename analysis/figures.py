"""Figures: each a function ``data -> matplotlib Figure`` (Agg backend, no display).

Paper figures regenerated from our data:
  fig2_naive            S_n over p for several gamma                    (paper Fig. 2)
  fig3_table1           S_n vs gamma for the paper's Table I            (Fig. 3)
  fig4_policies_gamma   S_r vs gamma, min/max/random 20%, f_c = 10 us   (Fig. 4 a-c)
  fig5_gamma_fc         S_r over gamma x f_c, min-freq 20%              (Fig. 5)
  fig6_cdf              cumulative share of invocations by syscall type (Fig. 6)
  fig7_fc_proportion    S_r over f_c x forwarded proportion, gamma = 10 (Fig. 7)
  fig8_gamma_proportion S_r over gamma x forwarded proportion, 10 us    (Fig. 8)
  fig9_policies_fc      S_r vs f_c, gamma = 10, 20%, three policies     (Fig. 9 a-c)
  fig11_runtimes         measured run time, native vs each forwarded set (Fig. 11)
  fig12_gain_profile     the gain benchmark's syscall profile            (Fig. 12)
  fig13_gain_speedup     speedup vs gamma: measured (CI), naive, refined (Fig. 13)
New ones:
  fig_measured_vs_predicted   predicted vs measured t_d per run
  fig_fc_mechanisms           per-call f_c distribution per mechanism

Figs. 4, 5, 7, 8 and 9 use our measured profiles (``analysis.profiles``);
the paper drew Figs. 5, 7, 8 as surfaces, we draw the same grids as heat maps
with contour lines.  :func:`save` writes PNG and SVG.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from analysis import model as M  # noqa: E402
from analysis.profiles import Profile  # noqa: E402

POLICIES = (("min-freq", "least frequent"), ("max-freq", "most frequent"), ("random", "random"))
FC_PAPER = 10e-6  # the paper's fixed f_c for Figs. 4 and 8


def human_time(v: float, _pos=None) -> str:
    """Seconds as a short label with ns/µs/ms/s units."""
    if v <= 0 or not np.isfinite(v):
        return "0"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if v >= scale * 0.999:
            return f"{v / scale:g} {unit}"
    return f"{v / 1e-9:.2g} ns"


TIME_FMT = FuncFormatter(human_time)


def _time_axis(axis) -> None:
    """Log time axis labelled in ns/µs/ms/s, with minor labels at 2x and 5x."""
    axis.set_major_formatter(TIME_FMT)
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
    axis.set_minor_formatter(TIME_FMT)
    axis.set_tick_params(which="minor", labelsize=6)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


def _subplots(n: int, w: float = 4.2, h: float = 3.4, **kw):
    rows, cols = _grid(max(n, 1))
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def save(fig: Figure, outdir: str | Path, name: str) -> list[Path]:
    """Write ``name.png`` (150 dpi) and ``name.svg`` into ``outdir``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


# ---------------------------------------------------------------- naive model


def fig2_naive(gammas=(1.5, 2, 5, 10, 100), p=None) -> Figure:
    p = np.linspace(0.0, 1.0, 401) if p is None else np.asarray(p)
    gam = np.asarray(gammas, dtype=float)
    s = M.S_n(p[None, :], gam[:, None])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for g, row in zip(gam, s, strict=True):
        ax.plot(p * 100, row, label=f"γ = {g:g}")
    ax.set_yscale("log")
    ax.set_xlabel("p: share of time in system calls (%)")
    ax.set_ylabel("speedup S_n")
    ax.set_title("Naive model: S_n = 1 / (p + (1 − p)/γ)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="gain")
    return fig


def fig3_table1(table: pd.DataFrame, gammas=None) -> Figure:
    gam = np.logspace(0, 2, 200) if gammas is None else np.asarray(gammas, dtype=float)
    s = M.S_n(table["p"].to_numpy()[:, None], gam[None, :])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for (_, row), y in zip(table.iterrows(), s, strict=True):
        ax.plot(gam, y, label=f"{row['benchmark']} (p = {row['p']:.2%})")
    ax.plot(gam, gam, "k:", lw=1, label="linear (p = 0)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gain γ")
    ax.set_ylabel("speedup S_n")
    ax.set_title("Naive model for the paper's Table I (SPEC CPU 2017)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return fig


# ---------------------------------------------------------------- extended model


def _profiles_legend(ax) -> None:
    ax.legend(fontsize=7, loc="best")


def fig4_policies_gamma(
    profiles: list[Profile], f_c: float = FC_PAPER, percent: float = 20, gammas=None
) -> Figure:
    gam = np.logspace(0, 2, 100) if gammas is None else np.asarray(gammas, dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (kind, label) in zip(axes, POLICIES, strict=True):
        for p in profiles:
            B = p.b_sweep(kind, [percent])
            s = M.grid(p.C, p.g, p.n, B, gam, [f_c])[:, 0, 0]
            ax.plot(gam, s, label=f"{p.name} (p = {p.p:.1%})")
        ax.plot(gam, gam, "k:", lw=1, label="linear")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gain γ")
        ax.set_title(f"{label} {percent:g}% forwarded")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup S_r")
    _profiles_legend(axes[0])
    fig.suptitle(f"Extended model, measured profiles, f_c = {human_time(f_c)}")
    fig.tight_layout()
    return fig


def _heat(ax, x, y, z, xlabel, ylabel, title, xlog=False, ylog=False, xtime=False, ytime=False):
    norm = LogNorm(vmin=max(float(z.min()), 1e-3), vmax=max(float(z.max()), 1.0))
    mesh = ax.pcolormesh(x, y, z, shading="auto", cmap="viridis", norm=norm, rasterized=True)
    levels = [lv for lv in (0.01, 0.1, 0.5, 1, 2, 5, 10, 20, 50) if z.min() < lv < z.max()]
    if levels:
        cs = ax.contour(x, y, z, levels=levels, colors="white", linewidths=0.7)
        ax.clabel(cs, fontsize=6, fmt="%g")
    if xlog:
        ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    if xtime:
        ax.xaxis.set_major_formatter(TIME_FMT)
    if ytime:
        ax.yaxis.set_major_formatter(TIME_FMT)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return mesh


def _cbar(fig, mesh, ax) -> None:
    cb = fig.colorbar(mesh, ax=ax, label="S_r (log colour scale)")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    cb.ax.yaxis.set_major_formatter(plain)
    cb.ax.yaxis.set_minor_formatter(NullFormatter())
    cb.ax.tick_params(which="both", labelsize=6)


def fig5_gamma_fc(profiles: list[Profile], percent: float = 20, kind: str = "min-freq") -> Figure:
    gam = np.linspace(1, 100, 100)
    fcs = np.logspace(-9, 1, 101)
    fig, axes = _subplots(len(profiles))
    for ax, p in zip(axes, profiles, strict=True):
        s = M.grid(p.C, p.g, p.n, p.b_sweep(kind, [percent]), gam, fcs)[:, :, 0]
        mesh = _heat(ax, gam, fcs, s.T, "gain γ", "f_c (log)", p.name, ylog=True, ytime=True)
        _cbar(fig, mesh, ax)
    fig.suptitle(f"S_r over gain and forwarding cost ({kind} {percent:g}% forwarded)")
    fig.tight_layout()
    return fig


def fig6_cdf(profiles: list[Profile]) -> Figure:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for p in profiles:
        n = np.sort(p.n[p.n > 0])[::-1]
        if not len(n):
            continue
        cdf = np.cumsum(n) / n.sum()
        ax.step(np.arange(1, len(n) + 1), cdf * 100, where="post", marker=".", label=p.name)
    ax.set_xlabel("syscall types, most frequently invoked first (rank)")
    ax.set_ylabel("cumulative share of invocations (%)")
    ax.set_ylim(0, 102)
    ax.set_title("System-call profiles: CDF of invocations over syscall types")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def fig7_fc_proportion(
    profiles: list[Profile], gamma: float = 10, kind: str = "min-freq"
) -> Figure:
    fcs = np.logspace(-9, 1, 101)
    pct = np.linspace(0, 100, 101)
    fig, axes = _subplots(len(profiles))
    for ax, p in zip(axes, profiles, strict=True):
        s = M.grid(p.C, p.g, p.n, p.b_sweep(kind, pct), [gamma], fcs)[0]  # (F, K)
        mesh = _heat(ax, fcs, pct, s.T, "f_c (log)", "forwarded syscall types (%)", p.name,
                     xlog=True, xtime=True)  # fmt: skip
        _cbar(fig, mesh, ax)
    fig.suptitle(f"S_r over forwarding cost and forwarded proportion ({kind}, γ = {gamma:g})")
    fig.tight_layout()
    return fig


def fig8_gamma_proportion(
    profiles: list[Profile], f_c: float = FC_PAPER, kind: str = "min-freq"
) -> Figure:
    gam = np.linspace(1, 100, 100)
    pct = np.linspace(0, 100, 101)
    fig, axes = _subplots(len(profiles))
    for ax, p in zip(axes, profiles, strict=True):
        s = M.grid(p.C, p.g, p.n, p.b_sweep(kind, pct), gam, [f_c])[:, 0, :]  # (G, K)
        mesh = _heat(ax, gam, pct, s.T, "gain γ", "forwarded syscall types (%)", p.name)
        _cbar(fig, mesh, ax)
    fig.suptitle(f"S_r over gain and forwarded proportion ({kind}, f_c = {human_time(f_c)})")
    fig.tight_layout()
    return fig


def fig9_policies_fc(profiles: list[Profile], gamma: float = 10, percent: float = 20) -> Figure:
    fcs = np.logspace(-9, 1, 200)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, (kind, label) in zip(axes, POLICIES, strict=True):
        for p in profiles:
            s = M.grid(p.C, p.g, p.n, p.b_sweep(kind, [percent]), [gamma], fcs)[0, :, 0]
            ax.plot(fcs, s, label=p.name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(TIME_FMT)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("forwarding cost f_c (log)")
        ax.set_title(f"{label} {percent:g}% forwarded")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup S_r")
    _profiles_legend(axes[0])
    fig.suptitle(f"S_r vs forwarding cost, γ = {gamma:g}")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- measurements


def fig_measured_vs_predicted(pvm: pd.DataFrame) -> Figure:
    """Scatter of predicted vs measured t_d (log-log), y = x and ±10% bands."""
    fig, ax = plt.subplots(figsize=(5.6, 5))
    d = pvm.dropna(subset=["measured_t_d_s", "predicted_t_d_s"])
    for mech, g in d.groupby("mechanism"):
        ax.scatter(g["measured_t_d_s"], g["predicted_t_d_s"], label=mech, s=22, alpha=0.8)
    if len(d):
        lo = float(min(d["measured_t_d_s"].min(), d["predicted_t_d_s"].min())) / 1.3
        hi = float(max(d["measured_t_d_s"].max(), d["predicted_t_d_s"].max())) * 1.3
        xs = np.array([lo, hi])
        ax.plot(xs, xs, "k-", lw=1, label="predicted = measured")
        ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.2, label="±10%")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no delegated run has a native baseline (t_nd):\n"
                "add a profile of the same command\n(testbed profile --native-runs N)",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        _time_axis(axis)
    ax.set_xlabel("measured t_d (wall time, log)")
    ax.set_ylabel("predicted t_d = t_nd + 2·f_c·Σ b(s)n(s) (log)")
    ax.set_title("Extended model vs measured runs (γ = 1)")
    ax.grid(True, which="both", alpha=0.3)
    return fig


def fig_fc_mechanisms(samples: dict[str, np.ndarray], reference: float | None = 40e-6) -> Figure:
    """Per-call f_c distribution per mechanism (box: quartiles, whiskers p5-p95)."""
    names = list(samples)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 4.4))
    data = [np.asarray(samples[k], dtype=float) for k in names]
    data = [d[d > 0] if len(d) else np.array([np.nan]) for d in data]
    if names:
        ax.boxplot(data, whis=(5, 95), showfliers=False)
        for i, d in enumerate(data, start=1):
            if np.isfinite(d).any():
                ax.plot(i, np.nanmedian(d), "o", color="C3", ms=4)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=15, fontsize=8)
    if reference:
        ax.axhline(reference, color="grey", ls="--", lw=1,
                   label=f"reference, not measured here: paper's mktrace same-node max "
                         f"{human_time(reference)}")  # fmt: skip
        ax.legend(fontsize=7)
    ax.set_yscale("log")
    _time_axis(ax.yaxis)
    ax.set_ylabel("per-call f_c = overhead / 2 (log)")
    ax.set_title("Per-call forwarding cost per mechanism", fontsize=10)
    ax.text(0.99, 0.01, "box p25–p75, whiskers p5–p95, dot median", transform=ax.transAxes,
            ha="right", va="bottom", fontsize=6, color="grey")  # fmt: skip
    ax.grid(True, which="both", axis="y", alpha=0.3)
    return fig


def fig11_runtimes(runs: pd.DataFrame, native: dict[str, float] | None = None) -> Figure:
    """Measured wall time per workload: native and one bar per forwarding policy.

    ``runs`` has columns ``workload``, ``group`` (policy or forwarded set) and
    ``wall_s`` (several runs of one group are averaged, with min-max error
    bars); ``native`` maps workload -> native time.
    """
    native = native or {}
    workloads = sorted(set(runs["workload"]) | set(native))
    groups = sorted(set(runs["group"])) if len(runs) else []
    cols = (["native"] if native else []) + groups  # "native" = the t_nd used for predictions
    fig, ax = plt.subplots(
        figsize=(max(5.5, 1.2 * len(workloads) * max(len(cols), 1) / 2 + 2), 4.2)
    )
    width = 0.8 / max(len(cols), 1)
    for j, col in enumerate(cols):
        ys, lo, hi = [], [], []
        for w in workloads:
            if col == "native":
                v = np.array([native[w]]) if w in native else np.array([np.nan])
            else:
                v = runs.loc[(runs["workload"] == w) & (runs["group"] == col), "wall_s"].to_numpy()
                v = v if len(v) else np.array([np.nan])
            m = float(np.mean(v))
            ys.append(m)
            lo.append(m - float(np.min(v)))
            hi.append(float(np.max(v)) - m)
        x = np.arange(len(workloads)) + (j - (len(cols) - 1) / 2) * width
        ax.bar(x, ys, width, yerr=[lo, hi], capsize=2, label=col,
               color="grey" if col == "native" else None)  # fmt: skip
    ax.set_xticks(np.arange(len(workloads)), workloads)
    ax.yaxis.set_major_formatter(TIME_FMT)
    ax.set_ylabel("wall time")
    ax.set_title("Measured run time: native vs forwarding policies (γ = 1)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, title="forwarded", title_fontsize=7)
    return fig


def fig12_gain_profile(prof: pd.DataFrame) -> Figure:
    """Invocations per syscall type of the gain benchmark (log), share in % on each bar."""
    names = list(dict.fromkeys(prof["workload"])) if len(prof) else []
    fig, axes = _subplots(max(len(names), 1), w=6.0, h=3.6)
    if not names:
        axes[0].text(0.5, 0.5, "no gamma = 1 profile of the gain benchmark",
                          ha="center", va="center", transform=axes[0].transAxes)  # fmt: skip
    for ax, name in zip(axes, names, strict=False):
        d = prof[prof["workload"] == name]
        x = np.arange(len(d))
        ax.bar(x, d["n"], color="tab:blue")
        ax.set_yscale("log")
        ax.set_xticks(x, d["syscall"], rotation=45, ha="right", fontsize=8)
        for xi, (k, sh) in enumerate(zip(d["n"], d["share"], strict=True)):
            ax.text(xi, k, f"{sh:.1%}", ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("invocations n(s) (log)")
        ax.set_title(f"Syscall profile of {name} (Fig. 12)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    return fig


def fig13_gain_speedup(sp: pd.DataFrame) -> Figure:
    """Speedup vs gamma per forwarded set: measured (median, CI bars), naive S_n, refined S_r."""
    keys = list(dict.fromkeys(zip(sp["family"], sp["host"], sp["mechanism"], strict=True))) \
        if len(sp) else []  # fmt: skip
    fig, axes = _subplots(max(len(keys), 1), w=6.2, h=4.4)
    if not keys:
        axes[0].text(0.5, 0.5, "no gain-benchmark runs with gamma = 1 natives",
                          ha="center", va="center", transform=axes[0].transAxes)  # fmt: skip
    for ax, (fam, host, mech) in zip(axes, keys, strict=False):
        d = sp[(sp["family"] == fam) & (sp["host"] == host) & (sp["mechanism"] == mech)]
        gam = np.array(sorted(d["gamma"].unique()), dtype=float)
        ax.plot(gam, [float(d[d["gamma"] == g]["S_n"].iloc[0]) for g in gam], "k--", lw=1.2,
                label="naive S_n", zorder=5)  # fmt: skip
        for i, (label, g) in enumerate(d.groupby("set", sort=False)):
            g = g.sort_values("gamma")
            color = f"C{i}"
            err = [g["measured"] - g["measured_lo"], g["measured_hi"] - g["measured"]]
            ax.errorbar(g["gamma"], g["measured"], yerr=err, fmt="o", color=color, ms=4,
                        capsize=3, label=f"{label}: measured")  # fmt: skip
            if label != "native":
                ax.plot(g["gamma"], g["S_r"], "-", color=color, lw=1.2,
                        label=f"{label}: refined S_r")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(gam, [f"{g:g}" for g in gam])
        ax.set_xlabel("gain γ")
        ax.set_ylabel("speedup t_nd(γ=1) / t(γ)")
        ax.set_title(f"{fam} on {host}, {mech} (Fig. 13)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    return fig
