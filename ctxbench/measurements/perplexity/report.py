"""What a run's perplexity cells show: perplexity and bits per byte per implementation, RoPE
variant and length, ppl.png (perplexity against N) and loss_curve.png (loss by position in the
window at each series' longest length)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from ctxbench.core.formatting import number
from ctxbench.reports.fits import length_text
from ctxbench.reports.plots import lines, new_axes, palette, save, with_series
from ctxbench.reports.report import Pivot, markdown_pivot, pivots_html
from ctxbench.reports.section import Section
from ctxbench.reports.summary import is_left_out, noted_table, not_run, not_run_lines, status_text

PIVOTS: tuple[Pivot, ...] = (
    ("perplexity", "ppl", lambda x: f"{x:.4g}"),
    ("bits per byte", "bits_per_byte", lambda x: f"{x:.4g}"),
)


def perplexity_label(r: dict[str, Any]) -> str:
    """A perplexity table's line: the implementation, and the RoPE variant unless the default."""
    rope = r.get("rope") or "default"
    return str(r["impl"]) if rope == "default" else f"{r['impl']}, {rope}"


def perplexity_table(rows: list[dict[str, Any]]) -> Any:
    """Perplexity cells: one line per implementation and RoPE variant, one column per length;
    each cell shows perplexity and bits per byte, or the status. Lines that never ran are named
    under the table."""
    skipped = not_run(rows, perplexity_label)
    lengths = sorted({int(r["n"]) for r in rows})
    shown = list(dict.fromkeys((r["impl"], r.get("rope") or "default") for r in rows
                               if not is_left_out(r, skipped, perplexity_label)))
    by_key = {(r["impl"], r.get("rope") or "default", int(r["n"])): r for r in rows}
    first = rows[0] if rows else {}
    model = (first.get("model") or "").split(" (")[0] or "model"
    table = noted_table(f"perplexity / bits per byte ({model}, {first.get('ppl_scheme', '')} windows)",
                        not_run_lines(skipped))
    table.add_column("impl, rope \\ N", style="bold")
    for n in lengths:
        table.add_column(f"{n:,}", justify="right")

    def text(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        ppl, bpb = number(r.get("ppl")), number(r.get("bits_per_byte"))
        if ppl is None:
            return status_text(r)
        value = f"{ppl:.4g}\n{bpb:.4g} bpb" if bpb is not None else f"{ppl:.4g}"
        return value if r.get("status") == "ok" else f"{value}\n{status_text(r)}"

    for impl, rope in shown:
        table.add_row(perplexity_label({"impl": impl, "rope": rope}),
                      *(text(by_key.get((impl, rope, n))) for n in lengths))
    return table


def loss_curves(p: pd.DataFrame, model: str) -> Any:
    """loss_curve.png|svg: mean NLL (nats) per position bin of the window, at each series'
    longest measured length: where in a long window the loss goes up (past a trained
    context, outside a window). None when no row has a loss curve."""
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
    for (label, pts), color in zip(curves, palette(pd.DataFrame({"series": [c[0] for c in curves]})).values()):
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=label, color=color)
    ax.set_xlabel("position in the window (tokens)")
    ax.set_ylabel("mean loss per token (nats)")
    ax.set_title("loss by position, at each series' longest context" + (f"\n{model}" if model else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def figures(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """ppl and loss_curve, as (name, matplotlib Figure); none when no cell has a perplexity."""
    ppl = with_series(rows)
    if ppl.empty or "ppl" not in ppl.columns or not ppl["ppl"].notna().any():
        return []
    p = ppl[ppl["ppl"].notna() & ppl["status"].isin(["ok", "wrong"])]
    model = str(p["model"].iloc[0]) if "model" in p.columns and str(p["model"].iloc[0]) else ""
    fig, ax = new_axes(p, "perplexity vs context length" + (f" ({model})" if model else ""), "perplexity",
                       log_y=False)
    lines(ax, p, "ppl", palette(p))
    out = [("ppl", fig)]
    curves = loss_curves(p, model)
    if curves is not None:
        out.append(("loss_curve", curves))
    return out


class PerplexitySection(Section):
    title = "Perplexity"

    def terminal(self, rows: list[dict[str, Any]], console: Any) -> None:
        console.print(perplexity_table(rows))

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        return "perplexity\n\n" + markdown_pivot(with_series(rows), "ppl", lambda x: f"{x:.4g}")

    def plots(self, rows: list[dict[str, Any]], run_dir: str) -> list[str]:
        return [path for name, fig in figures(rows) for path in save(fig, run_dir, name)]

    def html(self, rows: list[dict[str, Any]]) -> str:
        return pivots_html(with_series(rows), PIVOTS)


SECTION = PerplexitySection()
