"""What every kind's plots share: results.csv rows as a DataFrame, one line per series, the
axes of a plot against context length, the palette, saving as PNG and SVG.

Each kind draws its own plots in its report section (ctxbench.measurements.<kind>.report:
latency.png, tflops.png, bandwidth.png and memory.png for kernel cells; ppl.png and
loss_curve.png for perplexity; decode.png; passkey's and ruler's heatmaps and Pareto plot).
Figures are built with matplotlib's object API (no pyplot), so plotting never needs a display
and never touches global state of a program that imports ctxbench.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from ctxbench.reports.fits import length_text
from ctxbench.core import kinds
from ctxbench.core.cell import NUMERIC_CONFIG, key_columns

FORMATS = ("png", "svg")


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """CSV rows (strings) as a DataFrame with the numeric columns numeric (NaN where empty or not a
    number): the length, the shared configuration's numbers, and every kind's numeric fields and
    measured columns (ctxbench.core.kinds.numeric_columns); the rest stay text."""
    df = pd.DataFrame(rows)
    for col in ("n", *NUMERIC_CONFIG, *kinds.numeric_columns()):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def with_series(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """to_frame(rows) with a `series` column: the line each row is drawn on (series_labels)."""
    df = to_frame(rows)
    df["series"] = series_labels(df) if not df.empty else pd.Series(dtype=str)
    return df


def series_labels(df: pd.DataFrame) -> pd.Series:
    """One label per line: the implementation, plus any configuration that varies within the run."""
    varying = [c for c in key_columns() if c not in ("impl", "n") and c in df.columns
               and df[c].astype(str).nunique() > 1]
    if not varying:
        return df["impl"].astype(str)
    extra = df[varying].astype(str).apply(lambda r: ", ".join(f"{c}={v}" for c, v in r.items()), axis=1)
    return df["impl"].astype(str) + " (" + extra + ")"


def config_text(df: pd.DataFrame) -> str:
    """'cpu float32 B=1 Hq=8 Hkv=8 D=64 causal fwd' from the first row (the run's configuration)."""
    r = df.iloc[0]
    mask = f"window W={int(float(r['window']))}" if r.get("mask") == "window" else r.get("mask", "")
    return (f"{r.get('device', '')} {r.get('dtype', '')} B={r.get('batch', '')} Hq={r.get('heads', '')} "
            f"Hkv={r.get('kv_heads', '')} D={r.get('head_dim', '')} {mask} {r.get('mode', '')}").strip()


def new_axes(df: pd.DataFrame, title: str, ylabel: str, log_y: bool) -> tuple[Any, Any]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    lengths = sorted(df["n"].dropna().unique())
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xticks(lengths, [length_text(int(n)) for n in lengths])
    ax.xaxis.set_minor_locator(NullLocator())  # only the measured lengths are labelled
    ax.set_xlabel("context length N (tokens)")
    ax.set_ylabel(ylabel)
    where = [str(df[c].iloc[0]) for c in ("device_name",) if c in df.columns and str(df[c].iloc[0])]
    if "torch_threads" in df.columns and str(df["torch_threads"].iloc[0]) not in ("", "nan"):
        threads = str(df["torch_threads"].iloc[0])
        where.append(f"{threads} thread{'s' if threads != '1' else ''}")
    ax.set_title(f"{title}\n{', '.join([config_text(df)] + where)}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    return fig, ax


def lines(ax: Any, data: pd.DataFrame, y: str, palette: dict[str, Any]) -> None:
    import seaborn as sns

    data = data[data[y].notna()]
    if data.empty:  # e.g. every cell ran out of memory: say so rather than draw empty axes
        ax.text(0.5, 0.5, f"no cell with status ok has a {y}", transform=ax.transAxes, ha="center", color="gray")
        return
    # Only the series with something to draw: one unsupported at every length (triton on a CPU)
    # gets no legend entry (the pivot names it under the table); colours stay the run's.
    drawn = set(data["series"])
    shown = {s: c for s, c in palette.items() if s in drawn}
    sns.lineplot(data=data, x="n", y=y, hue="series", hue_order=list(shown), palette=shown, marker="o",
                 errorbar=None, estimator="median", ax=ax)
    if ax.get_legend() is not None:
        ax.get_legend().set_title("implementation")


def save(fig: Any, run_dir: str, name: str) -> list[str]:
    paths = []
    for ext in FORMATS:
        path = os.path.join(run_dir, f"{name}.{ext}")
        fig.savefig(path, dpi=110 if ext == "png" else None)
        paths.append(path)
    return paths


def mark_wrong(ax: Any, df: pd.DataFrame, y: str) -> None:
    """Cells over the error tolerance were still timed: show them, crossed out, off the lines."""
    wrong = df[(df["status"] == "wrong") & df[y].notna()]
    if not wrong.empty:
        ax.scatter(wrong["n"], wrong[y], marker="x", color="red", s=60, zorder=5, label="wrong (over tolerance)")
        ax.legend(fontsize=8)


def legend_labels(fig: Any) -> list[str]:
    """The entries of a figure's legend (its first axes'); [] when it has none."""
    legend = fig.axes[0].get_legend() if fig.axes else None
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def palette(df: pd.DataFrame) -> dict[str, Any]:
    import seaborn as sns

    series = list(dict.fromkeys(df["series"]))
    return dict(zip(series, sns.color_palette("tab10", n_colors=max(len(series), 1))))
