"""Is a figure readable?  Checks a drawn matplotlib Figure, returns what is wrong.

:func:`problems` lists, one sentence each:

* **overlapping text**: two visible text boxes (titles, axis and tick labels,
  legend entries, annotations, contour labels) whose rendered extents overlap;
* **legends**: a legend that reaches outside its axes, or covers data (a
  marker or line vertex, a bar's top, a scatter point inside its box);
* **units**: an axis with tick labels but no label, or a numeric axis whose
  label names no unit: a parenthesised unit (``(s)``, ``(%)``, ``(×)``, ``(s,
  log)``); categorical axes (named ticks) need a label only.

Used by the tests on every figure of a rendered report; independent of what
the figure shows.
"""

from __future__ import annotations

import re

import numpy as np
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.text import Text
from matplotlib.ticker import FixedFormatter, FixedLocator

_UNIT = re.compile(r"\([^()]*\S[^()]*\)\s*$|\([^()]*\)")
#: Overlaps smaller than this (pixels, either side) are anti-aliasing, not clutter.
SLACK_PX = 1.0


def _drawn_ticklabels(axis) -> list[Text]:
    """The tick labels an axis draws: those of the ticks inside its view (matplotlib keeps
    tick objects beyond the view with stale text; they are not drawn)."""
    try:
        ticks = axis._update_ticks()  # the ticks draw() draws
    except AttributeError:  # pragma: no cover - other matplotlib versions
        ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
    return [t for tick in ticks for t in (tick.label1, tick.label2)]


def _texts(fig: Figure, renderer) -> list[tuple[Text, object]]:
    tick_texts, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in [*axis.majorTicks, *axis.minorTicks]:
                tick_texts.update((id(tick.label1), id(tick.label2)))
            if ax.get_visible() and ax.axison:
                drawn += _drawn_ticklabels(axis)
    cands = [t for t in fig.findobj(Text) if id(t) not in tick_texts] + drawn
    out = []
    for t in cands:
        if not t.get_visible() or not t.get_text().strip():
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        try:
            bb = t.get_window_extent(renderer)
        except (RuntimeError, ValueError):
            continue
        if bb.width > 0 and bb.height > 0:
            out.append((t, bb))
    return out


def _overlap(a, b) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > SLACK_PX
            and min(a.y1, b.y1) - max(a.y0, b.y0) > SLACK_PX)  # fmt: skip


def overlapping_text(fig: Figure, renderer) -> list[str]:
    texts = _texts(fig, renderer)
    out = []
    for i, (a, ba) in enumerate(texts):
        for b, bb in texts[i + 1 :]:
            if _overlap(ba, bb):
                out.append(f"text {a.get_text()!r} overlaps {b.get_text()!r}")
    return out


def _along(xy: np.ndarray, joined: bool, step: float = 4.0) -> np.ndarray:
    """A line's vertices and, when drawn joined, points every ``step`` px between them."""
    if not joined or len(xy) < 2:
        return xy
    out = [xy[:1]]
    for a, b in zip(xy[:-1], xy[1:], strict=True):
        n = max(int(np.hypot(*(b - a)) // step), 1)
        out.append(a + (b - a) * np.linspace(0, 1, n + 1)[1:, None])
    return np.vstack(out)


def _data_points(ax, renderer) -> np.ndarray:
    """Display coordinates of the data an axes shows: line vertices, scatter points,
    the middle of each bar's top edge."""
    pts = []
    for ln in ax.get_lines():
        if not ln.get_visible():
            continue
        xy = np.column_stack([np.asarray(ln.get_xdata(), float),
                              np.asarray(ln.get_ydata(), float)])  # fmt: skip
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy):
            pts.append(_along(ln.get_transform().transform(xy), ln.get_linestyle() != "None"))
    for c in ax.collections:
        if isinstance(c, PathCollection) and c.get_visible() and len(c.get_offsets()):
            pts.append(c.get_offset_transform().transform(np.asarray(c.get_offsets(), float)))
    for p in ax.patches:
        if isinstance(p, Rectangle) and p.get_visible() and p.get_height() > 0:
            x, y, w, h = p.get_x(), p.get_y(), p.get_width(), p.get_height()
            if np.isfinite([x, y, w, h]).all():
                pts.append(ax.transData.transform([[x + w / 2, y + h]]))
    return np.vstack(pts) if pts else np.zeros((0, 2))


def legend_problems(fig: Figure, renderer) -> list[str]:
    out = []
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None or not leg.get_visible() or not ax.get_visible():
            continue
        lb, ab = leg.get_window_extent(renderer), ax.get_window_extent(renderer)
        if lb.x0 < ab.x0 - SLACK_PX or lb.x1 > ab.x1 + SLACK_PX or \
                lb.y0 < ab.y0 - SLACK_PX or lb.y1 > ab.y1 + SLACK_PX:  # fmt: skip
            out.append(f"legend of {ax.get_title()!r} reaches outside its axes")
        pts = _data_points(ax, renderer)
        inside = ((pts[:, 0] > lb.x0) & (pts[:, 0] < lb.x1) & (pts[:, 1] > lb.y0)
                  & (pts[:, 1] < lb.y1)) if len(pts) else np.zeros(0, bool)  # fmt: skip
        if inside.any():
            out.append(f"legend of {ax.get_title()!r} covers {int(inside.sum())} data point(s)")
    return out


def _number(text: str) -> bool:
    t = re.sub(r"\\mathdefault|[${}]", "", text).replace("−", "-").replace("^", "e")
    try:
        float(t.replace("10e", "1e") if t.startswith("10e") else t)
    except ValueError:
        return False
    return True


def _categorical(axis) -> bool:
    """Named ticks (workloads, mechanisms): fixed positions whose labels are not numbers."""
    if isinstance(axis.get_major_formatter(), FixedFormatter):
        return True
    if not isinstance(axis.get_major_locator(), FixedLocator):
        return False
    return any(not _number(t.get_text()) for t in _drawn_ticklabels(axis) if t.get_text())


def unit_problems(fig: Figure) -> list[str]:
    out = []
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison:
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            labels = [t for t in _drawn_ticklabels(axis) if t.get_visible() and t.get_text()]
            if not labels:
                continue
            text = axis.get_label_text().strip()
            if not text:
                out.append(f"{name} axis of {ax.get_title()!r} has tick labels but no label")
            elif not _categorical(axis) and not _UNIT.search(text):
                out.append(f"{name} axis label {text!r} names no unit")
    return out


def problems(fig: Figure) -> list[str]:
    """Everything :mod:`figcheck` finds wrong with ``fig`` (empty: readable)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [*overlapping_text(fig, renderer), *legend_problems(fig, renderer),
            *unit_problems(fig)]  # fmt: skip


__all__ = ["problems", "overlapping_text", "legend_problems", "unit_problems"]
