"""The report of a run: every kind's plots and one self-contained report.html.

    report(run_dir)  ->  the plots of each report section (PNG and SVG) and run_dir/report.html

report.html holds, per report section of the kinds the run has (ctxbench.reports.section), its
plots (PNGs embedded as base64) and its tables, then the environment and the run's spec from
meta.json, so it can be mailed or attached to a CI job as one file. The pivot helpers here
(implementation x length tables of one column) serve the sections that tabulate by length.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any, Callable

import pandas as pd

from ctxbench.engine.results import read_results
from ctxbench.reports.markdown import markdown_table
from ctxbench.reports.plots import config_text, to_frame
from ctxbench.reports.summary import is_left_out, not_run, not_run_lines, sections_of

REPORT_NAME = "report.html"

# A pivot: title, the column it shows, how one value is written.
Pivot = tuple[str, str, Callable[[float], str]]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _series(row: dict[str, Any]) -> str:
    return str(row["series"])


def never_ran(df: pd.DataFrame) -> dict[str, list[str]]:
    """The implementations (or series) of df whose every cell is unsupported, with the reasons:
    left out of the pivots and named once under them (ctxbench.reports.summary.not_run)."""
    return not_run(df.to_dict("records"), _series) if not df.empty else {}


def pivot_frame(df: pd.DataFrame, column: str, fmt: Callable[[float], str]) -> pd.DataFrame:
    """Series (rows; df has a `series` column, ctxbench.reports.plots.with_series) x length in
    tokens (columns) of `column` written by fmt; status where the cell has no value, and the
    status appended where it has one but is not ok. A series that never ran (`never_ran`) has no
    line."""
    skipped = never_ran(df)
    if skipped:
        df = df[[not is_left_out(r, skipped, _series) for r in df.to_dict("records")]]
    lengths = sorted(int(n) for n in df["n"].dropna().unique())
    table = pd.DataFrame(index=list(dict.fromkeys(df["series"])), columns=[f"{n:,}" for n in lengths], data="")
    for _, r in df.iterrows():
        value = r.get(column)
        if column == "status":
            table.loc[r["series"], f"{int(r['n']):,}"] = r["status"]
            continue
        text = fmt(float(value)) if _finite(value) else r["status"]
        if _finite(value) and r["status"] != "ok":
            text += f" ({r['status']})"
        table.loc[r["series"], f"{int(r['n']):,}"] = text
    table.index.name = "impl \\ N"
    return table


def markdown_pivot(df: pd.DataFrame, column: str, fmt: Callable[[float], str]) -> str:
    """pivot_frame(df, column, fmt) as a markdown table."""
    table = pivot_frame(df, column, fmt)
    return markdown_table([table.index.name, *table.columns], [[i, *table.loc[i]] for i in table.index])


def pivots(df: pd.DataFrame, specs: tuple[Pivot, ...]) -> list[tuple[str, pd.DataFrame]]:
    """(title, table) of every pivot of `specs` that df has values for."""
    return [(title, pivot_frame(df, column, fmt)) for title, column, fmt in specs
            if not df.empty and column in df.columns and df[column].notna().any()]


def pivots_html(df: pd.DataFrame, specs: tuple[Pivot, ...]) -> str:
    """The pivots of `specs` as HTML tables with a heading each, and the `not run: ...` lines."""
    parts = []
    for title, table in pivots(df, specs):
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append(table.reset_index().to_html(escape=True, border=0, index=False))
    parts += [f'<p class="not-run">{html.escape(note)}</p>' for note in not_run_lines(never_ran(df))]
    return "\n".join(parts)


def table_html(header: list[str], body: list[list[str]]) -> str:
    """A plain HTML table (escaped)."""
    return pd.DataFrame(body, columns=header).to_html(escape=True, border=0, index=False)


def read_meta(run_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(run_dir, "meta.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _kv_table(items: dict[str, Any]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f'<table class="kv">{cells}</table>'


def _img(path: str, alt: str) -> str:
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, table.kv td, table.kv th { text-align: left; }
figure { display: inline-block; margin: 0 1em 1em 0; } img { max-width: 100%; }
code { background: #f4f4f4; padding: 1px 4px; }
"""


def render_html(rows: list[dict[str, Any]], meta: dict[str, Any], parts_by_section: list[tuple[str, list[str], str]],
                title: str) -> str:
    """The whole report as one HTML string (no external references). parts_by_section: each
    section's (title, PNG paths, tables as HTML)."""
    df = to_frame(rows)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(config_text(df))}; {len(df)} cells: "
             + html.escape(", ".join(f"{v} {k}" for k, v in df["status"].value_counts().sort_index().items()))
             + "</p>"]
    if meta.get("argv"):
        parts.append(f"<p>command: <code>{html.escape(' '.join(map(str, meta['argv'])))}</code></p>")
    for heading, pngs, tables in parts_by_section:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts += [_img(p, os.path.basename(p)) for p in pngs]
        if tables:
            parts.append(tables)
    parts.append("<h2>Environment</h2>")
    env = meta.get("environment") or {k: rows[0].get(k, "") for k in ("device_name", "torch_version", "git_commit")}
    parts.append(_kv_table(env))
    if meta.get("spec"):
        parts.append("<h3>Run specification</h3>")
        parts.append(f"<pre>{html.escape(json.dumps(meta['spec'], indent=2))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(run_dir: str) -> list[str]:
    """Write every section's plots (PNG and SVG) and report.html into run_dir; returns every
    path written.

    Raises FileNotFoundError when run_dir has no results.csv and CorruptResults when it is not a
    ctxbench table.
    """
    csv_path = os.path.join(run_dir, "results.csv")
    if not os.path.exists(csv_path):
        raise FileNotFoundError(f"{run_dir} has no results.csv, so it is not a ctxbench run folder")
    _, rows = read_results(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows yet; run or resume the sweep first")
    written: list[str] = []
    parts: list[tuple[str, list[str], str]] = []
    for section, covered in sections_of(rows):
        own = [r for r in rows if r.get("kind") in covered]
        paths = section.plots(own, run_dir)
        written += paths
        parts.append((section.title, [p for p in paths if p.endswith(".png")], section.html(own)))
    meta = read_meta(run_dir)
    title = f"ctxbench run {meta.get('run_id') or os.path.basename(os.path.normpath(run_dir))}"
    page = render_html(rows, meta, parts, title)
    out = os.path.join(run_dir, REPORT_NAME)
    with open(out + ".tmp", "w") as f:
        f.write(page)
    os.replace(out + ".tmp", out)
    return written + [out]


def markdown(rows: list[dict[str, Any]]) -> str:
    """Every section's markdown (`ctxbench report`), separated by blank lines."""
    texts = [section.markdown([r for r in rows if r.get("kind") in covered]) for section, covered in sections_of(rows)]
    return "\n\n".join(t for t in texts if t)
