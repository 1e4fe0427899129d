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
with contour lines.  Given ``measured`` (a :class:`MeasuredFc`: the f_c a
report measured, with its CI), they use and mark that f_c instead of the
paper's 10 µs: Figs. 4 and 8 are drawn at it (band: S_r at the CI's ends),
Figs. 5, 7 and 9 mark it on their f_c axis (line and CI band) and Figs. 5
and 7 span two decades either side of it, with a colour scale and contour
levels taken from the values in that range.  Contour labels that would
overlap other text are dropped.  :func:`save` writes PNG and SVG;
``analysis.figcheck`` checks a figure's readability.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from dataclasses import dataclass  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from analysis import model as M  # noqa: E402
from analysis.profiles import Profile  # noqa: E402

POLICIES = (("min-freq", "least frequent"), ("max-freq", "most frequent"), ("random", "random"))
FC_PAPER = 10e-6  # the paper's fixed f_c for Figs. 4 and 8
MARK = "tab:red"  # the measured f_c: line and band


@dataclass(frozen=True)
class MeasuredFc:
    """The f_c a report measured: per-call mean ``value`` with CI ``lo``..``hi`` (s)."""

    label: str
    value: float
    lo: float
    hi: float
    calls: int = 0

    def describe(self) -> str:
        def short(v: float) -> str:
            return human_time(float(f"{v:.3g}"))

        return (f"measured f_c {short(self.value)} ({self.label}; band: 95 % CI "
                f"{short(self.lo)}–{short(self.hi)})")  # fmt: skip


def _fc_range(measured: MeasuredFc | None, n: int = 101) -> np.ndarray:
    """The f_c axis: 1 ns – 10 s, or two decades either side of a measured f_c."""
    if measured is None or not measured.value > 0:
        return np.logspace(-9, 1, n)
    lo = max(min(measured.lo, measured.value), 1e-12) / 100
    hi = max(measured.hi, measured.value) * 100
    return np.geomspace(lo, hi, n)


def _mark_fc(ax, measured: MeasuredFc | None, axis: str = "x") -> None:
    """A line at the measured f_c and a band over its CI, on the f_c axis."""
    if measured is None:
        return
    span, line = (ax.axvspan, ax.axvline) if axis == "x" else (ax.axhspan, ax.axhline)
    span(measured.lo, measured.hi, color=MARK, alpha=0.25, lw=0)
    line(measured.value, color=MARK, ls="--", lw=1.2)


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
    """Log time axis labelled in ns/µs/ms/s: decades, minor labels at 2x and 5x."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0,)))
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
    ax.set_ylabel("speedup S_n (×)")
    ax.set_title("Naive model: S_n = 1 / (p + (1 − p)/γ)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="gain", loc="upper right")
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
    ax.set_xlabel("gain γ (×)")
    ax.set_ylabel("speedup S_n (×)")
    ax.set_title("Naive model for the paper's Table I (SPEC CPU 2017)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return fig


# ---------------------------------------------------------------- extended model


def _profiles_legend(ax) -> None:
    ax.legend(fontsize=7, loc="best")


def _fc_used(f_c: float, measured: MeasuredFc | None) -> tuple[float, str]:
    if measured is not None:
        return measured.value, measured.describe()
    return f_c, f"f_c = {human_time(f_c)} (the paper's; no f_c measured)"


def fig4_policies_gamma(
    profiles: list[Profile],
    f_c: float = FC_PAPER,
    percent: float = 20,
    gammas=None,
    measured: MeasuredFc | None = None,
) -> Figure:
    gam = np.logspace(0, 2, 100) if gammas is None else np.asarray(gammas, dtype=float)
    fc, what = _fc_used(f_c, measured)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, (kind, label) in zip(axes, POLICIES, strict=True):
        for i, p in enumerate(profiles):
            B = p.b_sweep(kind, [percent])
            s = M.grid(p.C, p.g, p.n, B, gam, [fc])[:, 0, 0]
            ax.plot(gam, s, color=f"C{i}", label=f"{p.name} (p = {p.p:.1%})")
            if measured is not None:
                band = M.grid(p.C, p.g, p.n, B, gam, [measured.lo, measured.hi])[:, :, 0]
                ax.fill_between(gam, band.min(axis=1), band.max(axis=1), color=f"C{i}",
                                alpha=0.2, lw=0)  # fmt: skip
        ax.plot(gam, gam, "k:", lw=1, label="linear")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gain γ (×)")
        ax.set_title(f"{label} {percent:g}% forwarded")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup S_r (×)")
    _profiles_legend(axes[0])
    fig.suptitle(f"Extended model, measured profiles; {what}", fontsize=10)
    fig.tight_layout()
    return fig


def _nice(v: float) -> float:
    """``v`` rounded to 2 significant digits (contour levels people can read)."""
    if v <= 0 or not np.isfinite(v):
        return v
    e = np.floor(np.log10(v))
    return float(np.round(v / 10**e, 1) * 10**e)


def levels_for(z: np.ndarray, k: int = 5) -> list[float]:
    """Up to ``k`` contour levels spread (geometrically) inside the values of ``z``."""
    zmin, zmax = float(np.nanmin(z)), float(np.nanmax(z))
    if not (zmin > 0 and zmax > zmin * 1.01):
        return []
    inner = np.geomspace(zmin, zmax, k + 2)[1:-1]
    return sorted({_nice(v) for v in inner if zmin < _nice(v) < zmax})


def _heat(ax, x, y, z, xlabel, ylabel, title, xlog=False, ylog=False, xtime=False, ytime=False):
    """Heat map with a log colour scale over exactly the values shown, and contours."""
    zmin, zmax = float(np.nanmin(z)), float(np.nanmax(z))
    norm = LogNorm(vmin=max(zmin, 1e-6), vmax=max(zmax, zmin * 1.01, 1e-6))
    mesh = ax.pcolormesh(x, y, z, shading="auto", cmap="viridis", norm=norm, rasterized=True)
    levels = levels_for(z)
    if levels:
        cs = ax.contour(x, y, z, levels=levels, colors="white", linewidths=0.7)
        ax.clabel(cs, fontsize=6, fmt=lambda v: f"{v:g}", inline_spacing=2)
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
    cb = fig.colorbar(mesh, ax=ax, label="S_r (×, log colour scale)")
    plain = FuncFormatter(lambda v, _pos: f"{v:.3g}")
    lo, hi = mesh.norm.vmin, mesh.norm.vmax
    subs = (1.0, 2.0, 5.0) if hi / lo < 1e3 else (1.0,)
    cb.ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    cb.ax.yaxis.set_major_formatter(plain)
    cb.ax.yaxis.set_minor_formatter(NullFormatter())
    cb.ax.tick_params(which="both", labelsize=6)


def fig5_gamma_fc(
    profiles: list[Profile],
    percent: float = 20,
    kind: str = "min-freq",
    measured: MeasuredFc | None = None,
) -> Figure:
    """One panel per profile (per workload: the report passes one profile of each)."""
    gam = np.geomspace(1, 100, 100)
    fcs = _fc_range(measured)
    fig, axes = _subplots(len(profiles), w=4.6, h=3.6)
    for ax, p in zip(axes, profiles, strict=True):
        s = M.grid(p.C, p.g, p.n, p.b_sweep(kind, [percent]), gam, fcs)[:, :, 0]
        mesh = _heat(ax, gam, fcs, s.T, "gain γ (×, log)", "f_c (s, log)", p.name, xlog=True,
                     ylog=True, ytime=True)  # fmt: skip
        _mark_fc(ax, measured, axis="y")
        _cbar(fig, mesh, ax)
    what = measured.describe() if measured else "no f_c measured: 1 ns – 10 s"
    fig.suptitle(f"S_r over gain and forwarding cost ({kind} {percent:g}% forwarded)\n{what}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    _declutter(fig)
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
    ax.legend(fontsize=8, loc="lower right")
    return fig


def fig7_fc_proportion(
    profiles: list[Profile],
    gamma: float = 10,
    kind: str = "min-freq",
    measured: MeasuredFc | None = None,
) -> Figure:
    fcs = _fc_range(measured)
    pct = np.linspace(0, 100, 101)
    fig, axes = _subplots(len(profiles), w=4.6, h=3.6)
    for ax, p in zip(axes, profiles, strict=True):
        s = M.grid(p.C, p.g, p.n, p.b_sweep(kind, pct), [gamma], fcs)[0]  # (F, K)
        mesh = _heat(ax, fcs, pct, s.T, "f_c (s, log)", "forwarded syscall types (%)", p.name,
                     xlog=True, xtime=True)  # fmt: skip
        _mark_fc(ax, measured, axis="x")
        ax.tick_params(axis="x", labelsize=7)
        _cbar(fig, mesh, ax)
    what = measured.describe() if measured else "no f_c measured: 1 ns – 10 s"
    fig.suptitle(f"S_r over forwarding cost and forwarded proportion ({kind}, γ = {gamma:g})"
                 f"\n{what}", fontsize=9)  # fmt: skip
    fig.tight_layout()
    _declutter(fig)
    return fig


def fig8_gamma_proportion(
    profiles: list[Profile],
    f_c: float = FC_PAPER,
    kind: str = "min-freq",
    measured: MeasuredFc | None = None,
) -> Figure:
    fc, what = _fc_used(f_c, measured)
    gam = np.geomspace(1, 100, 100)
    pct = np.linspace(0, 100, 101)
    fig, axes = _subplots(len(profiles), w=4.6, h=3.6)
    for ax, p in zip(axes, profiles, strict=True):
        s = M.grid(p.C, p.g, p.n, p.b_sweep(kind, pct), gam, [fc])[:, 0, :]  # (G, K)
        mesh = _heat(ax, gam, pct, s.T, "gain γ (×, log)", "forwarded syscall types (%)",
                     p.name, xlog=True)  # fmt: skip
        _cbar(fig, mesh, ax)
    fig.suptitle(f"S_r over gain and forwarded proportion ({kind})\n{what}", fontsize=9)
    fig.tight_layout()
    _declutter(fig)
    return fig


def fig9_policies_fc(
    profiles: list[Profile],
    gamma: float = 10,
    percent: float = 20,
    measured: MeasuredFc | None = None,
) -> Figure:
    fcs = _fc_range(measured, 200)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), sharey=True)
    for ax, (kind, label) in zip(axes, POLICIES, strict=True):
        for p in profiles:
            s = M.grid(p.C, p.g, p.n, p.b_sweep(kind, [percent]), [gamma], fcs)[0, :, 0]
            ax.plot(fcs, s, label=p.name)
        _mark_fc(ax, measured, axis="x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(TIME_FMT)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel("forwarding cost f_c (s, log)")
        ax.set_title(f"{label} {percent:g}% forwarded")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup S_r (×)")
    _profiles_legend(axes[0])
    what = measured.describe() if measured else "no f_c measured"
    fig.suptitle(f"S_r vs forwarding cost, γ = {gamma:g}; {what}", fontsize=10)
    fig.tight_layout()
    return fig


def _declutter(fig: Figure) -> None:
    """Drop contour labels that overlap another text (or an earlier contour label)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        fixed = [t.get_window_extent(renderer) for t in fig.findobj(Text)
                 if t.get_visible() and t.get_text() and t not in ax.texts]  # fmt: skip
        kept = []
        for t in list(ax.texts):
            if not t.get_visible():
                continue
            bb = t.get_window_extent(renderer).expanded(1.15, 1.3)
            inside = ax.get_window_extent(renderer).contains(bb.x0, bb.y0) and \
                ax.get_window_extent(renderer).contains(bb.x1, bb.y1)  # fmt: skip
            if not inside or any(bb.overlaps(o) for o in fixed + kept):
                t.remove()
            else:
                kept.append(bb)


# ---------------------------------------------------------------- measurements


def fig_measured_vs_predicted(pvm: pd.DataFrame) -> Figure:
    """Scatter of predicted vs measured t_d (log-log), y = x and ±10% bands.

    ``pvm`` is ``model_accuracy`` (``measured``, ``predicted``: the headline's
    predictions) or ``predicted_vs_measured`` (``measured_t_d_s``,
    ``predicted_t_d_s``).  Rows marked ``in_sample`` make the title say so.
    """
    d = pvm.rename(columns={"measured_t_d_s": "measured", "predicted_t_d_s": "predicted"})
    d = d.dropna(subset=["measured", "predicted"]) if len(d) else d
    in_sample = bool(d["in_sample"].any()) if "in_sample" in d and len(d) else False
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    if len(d):
        who = d["mechanism"] + (" @ " + d["host"] if "host" in d and d["host"].nunique() > 1
                                else "")  # fmt: skip
        for mech, g in d.groupby(who):
            ax.scatter(g["measured"], g["predicted"], label=mech, s=22, alpha=0.8)
        lo = float(min(d["measured"].min(), d["predicted"].min())) / 1.3
        hi = float(max(d["measured"].max(), d["predicted"].max())) * 1.3
        hi = hi * (hi / lo) ** 0.35  # headroom above the points for the legend
        xs = np.array([lo, hi])
        ax.plot(xs, xs, "k-", lw=1, label="predicted = measured")
        ax.fill_between(xs, xs * 0.9, xs * 1.1, color="grey", alpha=0.2, label="±10%")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no delegated run could be predicted\nfrom other runs "
                "(needs native runs and\nruns of two policies of one mechanism)",
                ha="center", va="center", transform=ax.transAxes, fontsize=9)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        _time_axis(axis)
    ax.set_xlabel("measured t_d (s, wall time, log)")
    ax.set_ylabel("predicted t_d (s, log)")
    how = ("in-sample (fit includes this run)" if in_sample
           else "each run predicted from other runs only")  # fmt: skip
    ax.set_title(f"Extended model vs measured runs\n{how}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def fig_fc_mechanisms(samples: dict[str, np.ndarray], reference: float | None = 40e-6) -> Figure:
    """Per-call f_c distribution per mechanism (box: quartiles, line: median, whiskers
    p5-p95), the call count under each name, the paper's figure as a labelled line."""
    names = list(samples)
    fig, ax = plt.subplots(figsize=(max(5.5, 1.9 * len(names) + 2), 4.6))
    data = [np.asarray(samples[k], dtype=float) for k in names]
    data = [d[d > 0] if len(d) else np.array([np.nan]) for d in data]
    if names:
        ax.boxplot(data, whis=(5, 95), showfliers=False,
                   medianprops={"color": "C3", "lw": 1.6})  # fmt: skip
        counts = [int(np.isfinite(d).sum()) for d in data]
        ax.set_xticks(range(1, len(names) + 1),
                      [f"{n}\n{c:,} calls".replace(",", " ") for n, c in zip(names, counts,
                                                                            strict=True)],
                      fontsize=8)  # fmt: skip
    ax.set_yscale("log")
    if reference:
        ax.axhline(reference, color="grey", ls="--", lw=1)
        ax.annotate(f"paper's mktrace same-node max {human_time(reference)} "
                    "(reference, not measured here)", xy=(1.0, reference),
                    xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=7,
                    color="dimgrey")  # fmt: skip
    _time_axis(ax.yaxis)
    ax.set_ylabel("per-call f_c = overhead / 2 (s, log)")
    ax.set_xlabel("mechanism (calls measured)")
    ax.set_title("Per-call forwarding cost per mechanism\n"
                 "box p25–p75, red line median, whiskers p5–p95", fontsize=10)  # fmt: skip
    ax.grid(True, which="both", axis="y", alpha=0.3)
    fig.tight_layout()
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
        figsize=(max(6.0, 1.2 * len(workloads) * max(len(cols), 1) / 2 + 2), 4.4)
    )
    width = 0.8 / max(len(cols), 1)
    top = 0.0
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
            top = max(top, float(np.nanmax(v)) if np.isfinite(v).any() else 0.0)
        x = np.arange(len(workloads)) + (j - (len(cols) - 1) / 2) * width
        ax.bar(x, ys, width, yerr=[lo, hi], capsize=2, label=col,
               color="grey" if col == "native" else None)  # fmt: skip
    ax.set_xticks(np.arange(len(workloads)), workloads)
    ax.yaxis.set_major_formatter(TIME_FMT)
    ncol = min(len(cols), 4) or 1
    rows = -(-len(cols) // ncol)
    if top > 0:
        ax.set_ylim(0, top * (1.2 + 0.14 * rows))  # headroom: the legend sits above the bars
    ax.set_xlabel("workload")
    ax.set_ylabel("wall time (s)")
    ax.set_title("Measured run time: native vs forwarding policies (γ = 1)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, title="forwarded", title_fontsize=7, loc="upper center", ncol=ncol)
    return fig


def fig12_gain_profile(prof: pd.DataFrame) -> Figure:
    """Invocations per syscall type of the gain benchmark (log), share in % on each bar."""
    names = list(dict.fromkeys(prof["workload"])) if len(prof) else []
    fig, axes = _subplots(max(len(names), 1), w=6.0, h=3.8)
    if not names:
        axes[0].text(0.5, 0.5, "no gamma = 1 profile of the gain benchmark",
                     ha="center", va="center", transform=axes[0].transAxes)  # fmt: skip
        axes[0].set_axis_off()
    for ax, name in zip(axes, names, strict=False):
        d = prof[prof["workload"] == name]
        x = np.arange(len(d))
        ax.bar(x, d["n"], color="tab:blue")
        ax.set_yscale("log")
        ax.set_ylim(0.5, float(d["n"].max()) * 8)
        ax.set_xticks(x, d["syscall"], rotation=45, ha="right", fontsize=8)
        for xi, (k, sh) in enumerate(zip(d["n"], d["share"], strict=True)):
            ax.text(xi, k, f"{sh:.1%}", ha="center", va="bottom", fontsize=6)
        ax.set_xlabel("syscall type")
        ax.set_ylabel("invocations n(s) (calls, log)")
        ax.set_title(f"Syscall profile of {name} (Fig. 12)")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def fig13_gain_speedup(sp: pd.DataFrame) -> Figure:
    """Speedup vs gamma per forwarded set: measured (median, CI bars), naive S_n, refined
    S_r; the gamma = 1 refined points are in-sample and drawn hollow, and say so."""
    keys = list(dict.fromkeys(zip(sp["family"], sp["host"], sp["mechanism"], strict=True))) \
        if len(sp) else []  # fmt: skip
    fig, axes = _subplots(max(len(keys), 1), w=6.6, h=4.8)
    if not keys:
        axes[0].text(0.5, 0.5, "no gain-benchmark runs with gamma = 1 natives",
                     ha="center", va="center", transform=axes[0].transAxes)  # fmt: skip
        axes[0].set_axis_off()
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
                one = g[g["gamma"] == 1]
                ax.plot(one["gamma"], one["S_r"], "o", mfc="white", mec=color, ms=7)
        ymax = float(np.nanmax(d[["measured_hi", "S_n", "S_r"]].to_numpy()))
        ymin = float(np.nanmin(d[["measured_lo", "S_r"]].to_numpy()))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_ylim(min(ymin, 1.0) / 1.3, ymax * 6)  # headroom above the curves: the legend
        ax.set_xticks(gam, [f"{g:g}" for g in gam])
        ax.set_xlabel("gain γ (×)")
        ax.set_ylabel("speedup t_nd(γ=1) / t(γ) (×)")
        ax.set_title(f"{fam} on {host}, {mech} (Fig. 13)\nhollow: refined S_r at γ = 1, "
                     "in-sample (fit includes these runs)", fontsize=8)  # fmt: skip
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", ncol=2)
    fig.tight_layout()
    return fig
