"""Table rendering for the reports: Markdown tables and µs columns.

The one place that turns a :class:`pandas.DataFrame` into report text, used by
``report`` and by the modules that write report sections (``accuracy``,
``mechanisms``, ``offload``, ``contention``).  No analysis imports: every
analysis module may import this one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


def format_cell(v) -> str:
    """One table cell: yes/no, integers as is, floats to 4 significant digits, – for NaN
    and None."""
    if v is None:
        return "–"
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
        lines.append("| " + " | ".join(format_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def in_us(df: pd.DataFrame, cols) -> pd.DataFrame:
    """Copy with the given second-valued columns converted to µs (``x_s`` -> ``x (µs)``)."""
    d = df.copy()
    for c in cols:
        if c in d:
            d[c] = d[c] * 1e6
            d = d.rename(columns={c: c.removesuffix("_s") + " (µs)"})
    return d
