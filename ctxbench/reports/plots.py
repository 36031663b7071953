"""Plots of a run, one line per implementation, each saved as PNG and SVG in the run folder.

    latency.png   median latency (ms) vs context length N (tokens), log-log
    tflops.png    TFLOP/s vs N
    bandwidth.png GB/s vs N with the device's bandwidth as a line (runs with --query-len)
    decode.png    ms per generated token vs N (model decode cells, --decode-max-len)
    memory.png    peak memory (MiB) vs N, log-log; each implementation's largest N that fit marked
    ppl.png       perplexity vs N, only when the run has a `ppl` column with values
    loss_curve.png mean loss per position bin at each series' longest N (perplexity runs)

Figures are built with matplotlib's object API (no pyplot), so plotting never needs a display
and never touches global state of a program that imports ctxbench.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from ctxbench.reports.fits import fit_all, length_text
from ctxbench.engine.plan import KEY_FIELDS

NUMERIC_COLUMNS = ("n", "latency_ms", "latency_p20_ms", "latency_p80_ms", "latency_min_ms", "repeats", "flops",
                   "tflops", "peak_fraction", "peak_mem_bytes", "err_rel_l2", "err_max_abs", "err_tolerance",
                   "grad_err_rel_l2", "ppl", "bits_per_byte", "window", "query_len", "bytes_moved", "gbps",
                   "bw_fraction", "device_bw_gbps", "device_bw_probe_gbps", "setup_ms", "first_call_ms",
                   "prefill_ms", "ms_per_token", "kv_cache_bytes", "decode_tokens", "tokens_match")
FORMATS = ("png", "svg")


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """CSV rows (strings) as a DataFrame with the measured columns numeric (NaN when empty)."""
    df = pd.DataFrame(rows)
    for col in NUMERIC_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def split_tasks(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(kernel rows, perplexity rows, model decode rows), each with a `series` column (the line
    it is drawn on).

    A perplexity or decode cell runs a whole model, so its latency and memory are not the
    kernel's and it gets its own plot and pivot rather than a point on the kernel's lines.
    """
    task = df["task"] if "task" in df.columns else pd.Series("kernel", index=df.index)
    is_ppl = task == "perplexity"
    if "ppl" in df.columns:
        is_ppl |= df["ppl"].notna()
    is_decode = (task == "decode") & ~is_ppl
    kernel, ppl, decode = df[~is_ppl & ~is_decode].copy(), df[is_ppl].copy(), df[is_decode].copy()
    for part in (kernel, ppl, decode):
        part["series"] = series_labels(part) if not part.empty else pd.Series(dtype=str)
    return kernel, ppl, decode


def series_labels(df: pd.DataFrame) -> pd.Series:
    """One label per line: the implementation, plus any configuration that varies within the run."""
    varying = [c for c in KEY_FIELDS if c not in ("impl", "n") and c in df.columns
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


def _new_axes(df: pd.DataFrame, title: str, ylabel: str, log_y: bool) -> tuple[Any, Any]:
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


def _lines(ax: Any, data: pd.DataFrame, y: str, palette: dict[str, Any]) -> None:
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


def _save(fig: Any, run_dir: str, name: str) -> list[str]:
    paths = []
    for ext in FORMATS:
        path = os.path.join(run_dir, f"{name}.{ext}")
        fig.savefig(path, dpi=110 if ext == "png" else None)
        paths.append(path)
    return paths


def _mark_wrong(ax: Any, df: pd.DataFrame, y: str) -> None:
    """Cells over the error tolerance were still timed: show them, crossed out, off the lines."""
    wrong = df[(df["status"] == "wrong") & df[y].notna()]
    if not wrong.empty:
        ax.scatter(wrong["n"], wrong[y], marker="x", color="red", s=60, zorder=5, label="wrong (over tolerance)")
        ax.legend(fontsize=8)


def plot_run(rows: list[dict[str, Any]], run_dir: str) -> list[str]:
    """Write every plot the rows allow into run_dir (PNG and SVG each); returns the paths written."""
    written: list[str] = []
    for name, fig in figures(rows):
        written += _save(fig, run_dir, name)
    return written


def figures(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Every plot the rows allow, as (file name without extension, matplotlib Figure)."""
    kernel, ppl, decode = split_tasks(to_frame(rows))
    out: list[tuple[str, Any]] = []
    if not decode.empty and "ms_per_token" in decode.columns and decode["ms_per_token"].notna().any():
        d = decode[decode["ms_per_token"].notna() & decode["status"].isin(["ok", "wrong"])]
        fig, ax = _new_axes(d, "decode: milliseconds per generated token after a prefill of N tokens",
                            "ms per token (median step)", log_y=False)
        _lines(ax, d, "ms_per_token", _palette(d))
        _mark_wrong(ax, decode, "ms_per_token")
        out.append(("decode", fig))
    if not ppl.empty and ppl["ppl"].notna().any():
        p = ppl[ppl["ppl"].notna() & ppl["status"].isin(["ok", "wrong"])]
        model = str(p["model"].iloc[0]) if "model" in p.columns and str(p["model"].iloc[0]) else ""
        fig, ax = _new_axes(p, "perplexity vs context length" + (f" ({model})" if model else ""), "perplexity",
                            log_y=False)
        _lines(ax, p, "ppl", _palette(p))
        out.append(("ppl", fig))
        curves = _loss_curves(p, model)
        if curves is not None:
            out.append(("loss_curve", curves))
    if kernel.empty:
        return out
    ok = kernel[kernel["status"] == "ok"]
    palette = _palette(kernel)

    fig, ax = _new_axes(kernel, "latency (median) vs context length", "latency (ms)", log_y=True)
    _lines(ax, ok, "latency_ms", palette)
    _mark_wrong(ax, kernel, "latency_ms")
    out.append(("latency", fig))

    fig, ax = _new_axes(kernel, "throughput vs context length", "TFLOP/s (at the median latency)", log_y=False)
    _lines(ax, ok, "tflops", palette)
    _mark_wrong(ax, kernel, "tflops")
    out.append(("tflops", fig))

    if "query_len" in kernel.columns and kernel["query_len"].notna().any() and ok["gbps"].notna().any():
        out.append(("bandwidth", _bandwidth_figure(kernel, ok, palette)))

    fig, ax = _new_axes(kernel, "peak memory vs context length (star: largest N that fit)", "peak memory (MiB)",
                        log_y=True)
    mem = ok.assign(mem_mib=ok["peak_mem_bytes"] / 2**20)
    mem = mem[mem["mem_mib"] > 0]  # a log axis has no 0; CPU readings below a page are 0
    _lines(ax, mem, "mem_mib", palette)
    _mark_largest_fit(ax, kernel, mem, palette)
    out.append(("memory", fig))
    return out


def _bandwidth_figure(kernel: pd.DataFrame, ok: pd.DataFrame, palette: dict[str, Any]) -> Any:
    """bandwidth.png|svg (decode and chunked prefill runs): GB/s of the minimum traffic against
    N, with the device's bandwidth (the denominator of bw_fraction) as a line, and the probe's
    measurement as a dashed one where it differs (a CUDA copy beside the datasheet peak)."""
    q = int(kernel["query_len"].dropna().iloc[0])
    fig, ax = _new_axes(kernel, f"memory bandwidth of {q} quer{'y' if q == 1 else 'ies'} against N keys "
                        "(minimum traffic / median latency)", "GB/s", log_y=False)
    _lines(ax, ok, "gbps", palette)
    _mark_wrong(ax, kernel, "gbps")
    bw = kernel["device_bw_gbps"].dropna() if "device_bw_gbps" in kernel.columns else pd.Series(dtype=float)
    if not bw.empty:
        source = str(kernel["device_bw_source"].dropna().iloc[0]) if "device_bw_source" in kernel.columns else ""
        ax.axhline(float(bw.iloc[0]), color="black", linestyle="-", linewidth=1.2,
                   label=f"device bandwidth {float(bw.iloc[0]):.4g} GB/s" + (f" ({source})" if source else ""))
        probe = kernel["device_bw_probe_gbps"].dropna()
        if not probe.empty and abs(float(probe.iloc[0]) - float(bw.iloc[0])) > 1e-6 * float(bw.iloc[0]):
            ax.axhline(float(probe.iloc[0]), color="gray", linestyle="--", linewidth=1.0,
                       label=f"measured device copy {float(probe.iloc[0]):.4g} GB/s")
        ax.set_ylim(0, float(bw.iloc[0]) * 1.1)
        ax.legend(fontsize=8)
    return fig


def legend_labels(fig: Any) -> list[str]:
    """The entries of a figure's legend (its first axes'); [] when it has none."""
    legend = fig.axes[0].get_legend() if fig.axes else None
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def _loss_curves(p: pd.DataFrame, model: str) -> Any:
    """loss_curve.png|svg: mean NLL (nats) per position bin of the window, at each series'
    longest measured length: where in a long window the loss goes up (past a trained
    context, outside a window)."""
    import json

    from matplotlib.figure import Figure

    if "loss_curve" not in p.columns:
        return None
    curves = []
    for series, g in p.groupby("series", sort=False):
        g = g[g["loss_curve"].astype(str).str.startswith("[")]
        if g.empty:
            continue
        row = g.loc[g["n"].idxmax()]
        bins = json.loads(row["loss_curve"])
        width = int(row["n"]) / len(bins)
        pts = [((i + 0.5) * width, y) for i, y in enumerate(bins) if y is not None]
        if pts:
            curves.append((f"{series}, N={length_text(int(row['n']))}", pts))
    if not curves:
        return None
    fig = Figure(figsize=(7.0, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for (label, pts), color in zip(curves, _palette(pd.DataFrame({"series": [c[0] for c in curves]})).values()):
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=label, color=color)
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel("mean loss per token (nats)")
    ax.set_title("loss by position, at each series' longest context" + (f"\n{model}" if model else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _palette(df: pd.DataFrame) -> dict[str, Any]:
    import seaborn as sns

    series = list(dict.fromkeys(df["series"]))
    return dict(zip(series, sns.color_palette("tab10", n_colors=max(len(series), 1))))


def _mark_largest_fit(ax: Any, kernel: pd.DataFrame, mem: pd.DataFrame, palette: dict[str, Any]) -> None:
    for series, g in kernel.groupby("series", sort=False):
        fit = fit_all(g.to_dict("records"))[0]
        point = mem[(mem["series"] == series) & (mem["n"] == fit.largest_fit)]
        if fit.largest_fit is None or point.empty:
            continue
        y = float(point["mem_mib"].iloc[-1])
        ax.scatter([fit.largest_fit], [y], marker="*", s=220, color=palette[series], edgecolor="black", zorder=6)
        if fit.stopped_at is not None:
            ax.annotate(f"{fit.stop_status} at {length_text(fit.stopped_at)}", (fit.largest_fit, y),
                        textcoords="offset points", xytext=(6, -12), fontsize=8, color=palette[series])
