"""What a run's kernel cells show: the implementation x length pivot (latency and peak memory, or
the status), the scaling fits, and latency.png, tflops.png, bandwidth.png (runs with
--query-len) and memory.png."""

from __future__ import annotations

from typing import Any

import pandas as pd

from ctxbench.core.formatting import human_bytes, human_ms, number
from ctxbench.reports.fits import FIT_HEADER, FIT_POINTS, Fit, fit_all, fit_row, length_text
from ctxbench.reports.markdown import markdown_table
from ctxbench.reports.plots import lines, mark_wrong, new_axes, palette, save, with_series
from ctxbench.reports.report import Pivot, never_ran, pivot_frame, pivots_html, table_html
from ctxbench.reports.section import Section
from ctxbench.reports.summary import STATUS_STYLE, not_run, not_run_lines, pivot_table

# Each pivot: title, the column it shows, how one value is written. A cell without the value
# shows its status instead, so an oom or a skip is visible where the number would be.
PIVOTS: tuple[Pivot, ...] = (
    ("latency (median)", "latency_ms", human_ms),
    ("TFLOP/s at the median latency", "tflops", lambda x: f"{x:.3g}"),
    ("GB/s of the minimum traffic at the median latency", "gbps", lambda x: f"{x:.3g}"),
    ("share of the device bandwidth", "bw_fraction", lambda x: f"{100 * x:.1f}%"),
    ("peak memory above the inputs", "peak_mem_bytes", human_bytes),
    ("setup step, once per cell (not in the latency)", "setup_ms", human_ms),
    ("first call: compilation, autotuning (not in the latency)", "first_call_ms", human_ms),
    ("relative L2 error vs float64", "err_rel_l2", lambda x: f"{x:.1e}"),
    ("status", "status", str),
)


def cell_text(row: dict[str, Any]) -> str:
    """What one terminal pivot cell shows: latency and memory when measured (and GB/s with its
    share of the bandwidth for decode-shaped cells), else the status."""
    status = row.get("status", "")
    style = STATUS_STYLE.get(status, "")
    lat = number(row.get("latency_ms"))
    mem = number(row.get("peak_mem_bytes"))
    if lat is None:
        return f"[{style}]{status}[/]"
    text = human_ms(lat) + (f"\n{human_bytes(mem)}" if mem is not None else "")
    gbps = number(row.get("gbps"))
    if row.get("query_len") not in (None, "") and gbps is not None:  # decode-shaped: memory-bound
        frac = number(row.get("bw_fraction"))
        text += f"\n{gbps:.3g} GB/s" + (f" ({100 * frac:.0f}%)" if frac is not None else "")
    return text if status == "ok" else f"{text}\n[{style}]{status}[/]"


def fits_shown(rows: list[dict[str, Any]]) -> list[Fit]:
    """The scaling fits of the kernel rows (ctxbench.reports.fits.fit_all), but none for an
    implementation that never ran: nothing to fit, and it is named under the pivot already."""
    skipped = not_run(rows)
    return [f for f in fit_all(rows) if f.impl not in skipped]


def fits_table(fits: list[Fit]) -> Any:
    """Exponent p of latency ~ N^p and memory ~ N^p per implementation, and the longest length that ran."""
    from rich.table import Table

    table = Table(title=f"scaling: cost ~ N^p over the {FIT_POINTS} longest ok lengths (2 quadratic, 1 linear)",
                  title_justify="left")
    for col in FIT_HEADER:
        table.add_column(col, justify="left" if col == "impl" else "right")
    for f in fits:
        table.add_row(*fit_row(f))
    return table


def pivot_markdown(rows: list[dict[str, Any]]) -> str:
    """The terminal pivot (latency / peak memory, or status) as a markdown table, with a line
    under it for each implementation that never ran."""
    df = with_series(rows)
    lat = pivot_frame(df, "latency_ms", human_ms)
    mem = pivot_frame(df, "peak_mem_bytes", human_bytes)
    body = []
    for impl in lat.index:
        cells = []
        for n in lat.columns:
            a, b = lat.loc[impl, n], mem.loc[impl, n]
            cells.append(a if a == b else f"{a} / {b}")
        body.append([impl, *cells])
    notes = not_run_lines(never_ran(df))
    return markdown_table(["impl \\ N", *lat.columns], body) + "".join(f"\n\n{note}" for note in notes)


def fits_markdown(rows: list[dict[str, Any]]) -> str:
    """The scaling fits as a markdown table."""
    return markdown_table(list(FIT_HEADER), [fit_row(f) for f in fits_shown(rows)])


def figures(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """latency, tflops, bandwidth (decode-shaped runs) and memory, as (name, matplotlib Figure)."""
    kernel = with_series(rows)
    ok = kernel[kernel["status"] == "ok"]
    colours = palette(kernel)
    out: list[tuple[str, Any]] = []

    fig, ax = new_axes(kernel, "latency (median) vs context length", "latency (ms)", log_y=True)
    lines(ax, ok, "latency_ms", colours)
    mark_wrong(ax, kernel, "latency_ms")
    out.append(("latency", fig))

    fig, ax = new_axes(kernel, "throughput vs context length", "TFLOP/s (at the median latency)", log_y=False)
    lines(ax, ok, "tflops", colours)
    mark_wrong(ax, kernel, "tflops")
    out.append(("tflops", fig))

    if "query_len" in kernel.columns and kernel["query_len"].notna().any() and ok["gbps"].notna().any():
        out.append(("bandwidth", bandwidth_figure(kernel, ok, colours)))

    fig, ax = new_axes(kernel, "peak memory vs context length (star: largest N that fit)", "peak memory (MiB)",
                       log_y=True)
    mem = ok.assign(mem_mib=ok["peak_mem_bytes"] / 2**20)
    mem = mem[mem["mem_mib"] > 0]  # a log axis has no 0; CPU readings below a page are 0
    lines(ax, mem, "mem_mib", colours)
    mark_largest_fit(ax, kernel, mem, colours)
    out.append(("memory", fig))
    return out


def bandwidth_figure(kernel: pd.DataFrame, ok: pd.DataFrame, colours: dict[str, Any]) -> Any:
    """bandwidth.png|svg (decode and chunked prefill runs): GB/s of the minimum traffic against
    N, with the device's bandwidth (the denominator of bw_fraction) as a line, and the probe's
    measurement as a dashed one where it differs (a CUDA copy beside the datasheet peak)."""
    q = int(kernel["query_len"].dropna().iloc[0])
    fig, ax = new_axes(kernel, f"memory bandwidth of {q} quer{'y' if q == 1 else 'ies'} against N keys "
                       "(minimum traffic / median latency)", "GB/s", log_y=False)
    lines(ax, ok, "gbps", colours)
    mark_wrong(ax, kernel, "gbps")
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


def mark_largest_fit(ax: Any, kernel: pd.DataFrame, mem: pd.DataFrame, colours: dict[str, Any]) -> None:
    """A star on each series' longest length that ran, and what stopped it (oom at 16K)."""
    for series, g in kernel.groupby("series", sort=False):
        fit = fit_all(g.to_dict("records"))[0]
        point = mem[(mem["series"] == series) & (mem["n"] == fit.largest_fit)]
        if fit.largest_fit is None or point.empty:
            continue
        y = float(point["mem_mib"].iloc[-1])
        ax.scatter([fit.largest_fit], [y], marker="*", s=220, color=colours[series], edgecolor="black", zorder=6)
        if fit.stopped_at is not None:
            ax.annotate(f"{fit.stop_status} at {length_text(fit.stopped_at)}", (fit.largest_fit, y),
                        textcoords="offset points", xytext=(6, -12), fontsize=8, color=colours[series])


class KernelSection(Section):
    title = "Attention calls"

    def terminal(self, rows: list[dict[str, Any]], console: Any) -> None:
        console.print(pivot_table(rows, "latency (median) / peak memory, or status", cell_text))
        console.print(fits_table(fits_shown(rows)))

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        return pivot_markdown(rows) + "\n\n" + fits_markdown(rows)

    def plots(self, rows: list[dict[str, Any]], run_dir: str) -> list[str]:
        return [path for name, fig in figures(rows) for path in save(fig, run_dir, name)]

    def html(self, rows: list[dict[str, Any]]) -> str:
        fits = (f"<h3>Scaling fits</h3><p>cost ~ N<sup>p</sup>: p is the least-squares slope of log cost against "
                f"log N over each implementation's {FIT_POINTS} longest lengths with status ok (about 2 for a "
                "quadratic cost, about 1 for a linear one).</p>")
        return "\n".join([pivots_html(with_series(rows), PIVOTS), fits,
                          table_html(list(FIT_HEADER), [fit_row(f) for f in fits_shown(rows)])])


SECTION = KernelSection()
