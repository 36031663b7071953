"""The report of a run: the plots (ctxbench.reports.plots) and one self-contained report.html.

    report(run_dir)  ->  run_dir/{latency,tflops,memory[,ppl]}.{png,svg} and run_dir/report.html

report.html embeds the PNGs (base64), the pivot tables (implementation x length), the scaling
fits (ctxbench.reports.fits) and the environment from meta.json, so it can be mailed or attached to a
CI job as one file. The same pivot is available as markdown (`pivot_markdown`) for READMEs
and pull requests.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from typing import Any, Callable

import pandas as pd

from ctxbench.reports.fits import FIT_HEADER, FIT_POINTS, fit_row
from ctxbench.reports.markdown import markdown_table
from ctxbench.engine.plan import RULER_TASKS
from ctxbench.reports.plots import config_text, plot_run, split_tasks, to_frame
from ctxbench.engine.results import read_results
from ctxbench.core.formatting import human_bytes, human_ms
from ctxbench.reports.summary import fits_shown, is_left_out, not_run, not_run_lines

REPORT_NAME = "report.html"
# Tasks with a report of their own (passkey heatmaps; ruler's Pareto plot, heatmaps and policy
# table), kept out of the kernel pivots, plots and fits.
OWN_REPORT_TASKS = ("passkey", *RULER_TASKS)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# Each pivot: title, the column it shows, how one value is written. A cell without the value
# shows its status instead, so an oom or a skip is visible where the number would be.
KERNEL_PIVOTS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
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
PPL_PIVOTS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("perplexity", "ppl", lambda x: f"{x:.4g}"),
    ("bits per byte", "bits_per_byte", lambda x: f"{x:.4g}"),
)
DECODE_PIVOTS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("decode: ms per generated token (median step)", "ms_per_token", human_ms),
    ("decode: prefill of the N-token prompt", "prefill_ms", human_ms),
    ("decode: KV cache held", "kv_cache_bytes", human_bytes),
    ("decode: leading greedy tokens equal to transformers' sdpa", "tokens_match", lambda x: f"{x:.0f}"),
)


def _series(row: dict[str, Any]) -> str:
    return str(row["series"])


def never_ran(df: pd.DataFrame) -> dict[str, list[str]]:
    """The implementations (or series) of df whose every cell is unsupported, with the reasons:
    left out of the pivots and named once under them (ctxbench.reports.summary.not_run)."""
    return not_run(df.to_dict("records"), _series) if not df.empty else {}


def pivot_frame(df: pd.DataFrame, column: str, fmt: Callable[[float], str]) -> pd.DataFrame:
    """Implementation (rows) x length in tokens (columns) of `column` written by fmt; status where
    the cell has no value, and the status appended where it has one but is not ok. A series that
    never ran (`never_ran`) has no line."""
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


def pivots(df: pd.DataFrame) -> list[tuple[list[tuple[str, pd.DataFrame]], list[str]]]:
    """Every pivot the run has data for, the kernel's, then perplexity's: for each part its
    (title, table) pivots and the `not run: ...` lines that go under them."""
    out = []
    for part, specs in zip(split_tasks(df), (KERNEL_PIVOTS, PPL_PIVOTS, DECODE_PIVOTS)):
        tables = [(title, pivot_frame(part, column, fmt)) for title, column, fmt in specs
                  if not part.empty and column in part.columns and part[column].notna().any()]
        if tables:
            out.append((tables, not_run_lines(never_ran(part))))
    return out


def passkey_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of passkey retrieval: one line per (implementation, RoPE variant, depth),
    one column per length (tokens), each cell "keys retrieved/trials" (or the status of trials
    that did not run)."""
    lengths = sorted({int(r["n"]) for r in rows})
    groups: dict[tuple[str, str, float], dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        key = (str(r["impl"]), str(r.get("rope") or "default"), float(r.get("depth") or 0.0))
        groups.setdefault(key, {}).setdefault(int(r["n"]), []).append(r)
    body = []
    for (impl, rope, depth), by_n in groups.items():
        cells = []
        for n in lengths:
            trials = by_n.get(n, [])
            ok = [t for t in trials if t.get("status") == "ok"]
            text = f"{sum(int(float(t.get('correct') or 0)) for t in ok)}/{len(ok)}" if ok else ""
            others = sorted({t["status"] for t in trials if t.get("status") != "ok"})
            cells.append(" ".join(x for x in [text, *others] if x))
        body.append([impl if rope == "default" else f"{impl}, {rope}", f"{depth:g}", *cells])
    return ["impl", "depth", *(f"{n:,}" for n in lengths)], body


def passkey_markdown(rows: list[dict[str, Any]]) -> str:
    """Passkey retrieval (keys retrieved / trials per implementation, depth and length) as markdown."""
    header, body = passkey_table(rows)
    return markdown_table(header, body, left=2)


def pivot_markdown(rows: list[dict[str, Any]]) -> str:
    """The terminal pivot (latency / peak memory, or status) as a markdown table, with a line
    under it for each implementation that never ran."""
    df = split_tasks(to_frame(rows))[0]
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


def _read_meta(run_dir: str) -> dict[str, Any]:
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


def render_html(rows: list[dict[str, Any]], meta: dict[str, Any], pngs: list[str], title: str) -> str:
    """The whole report as one HTML string (no external references)."""
    df = to_frame(rows)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(config_text(df))}; {len(df)} cells: "
             + html.escape(", ".join(f"{v} {k}" for k, v in df["status"].value_counts().sort_index().items()))
             + "</p>"]
    if meta.get("argv"):
        parts.append(f"<p>command: <code>{html.escape(' '.join(map(str, meta['argv'])))}</code></p>")
    parts.append("<h2>Plots</h2>")
    parts += [_img(p, os.path.basename(p)) for p in pngs]
    measured = df[~df["task"].isin(OWN_REPORT_TASKS)] if "task" in df.columns else df
    if not measured.empty:
        parts.append("<h2>Pivot tables</h2>")
        for tables, notes in pivots(measured):
            for name, table in tables:
                parts.append(f"<h3>{html.escape(name)}</h3>")
                parts.append(table.reset_index().to_html(escape=True, border=0, index=False))
            parts += [f'<p class="not-run">{html.escape(note)}</p>' for note in notes]
        parts.append(f"<h2>Scaling fits</h2><p>cost ~ N<sup>p</sup>: p is the least-squares slope of log cost "
                     f"against log N over each implementation's {FIT_POINTS} longest lengths with status ok "
                     "(about 2 for a quadratic cost, about 1 for a linear one).</p>")
        kept = [r for r in rows if r.get("task") not in OWN_REPORT_TASKS]
        fit_table = pd.DataFrame([fit_row(f) for f in fits_shown(kept)], columns=list(FIT_HEADER))
        parts.append(fit_table.to_html(escape=True, border=0, index=False))
    passkey_rows = [r for r in rows if r.get("task") == "passkey"]
    if passkey_rows:
        header, body = passkey_table(passkey_rows)
        parts.append("<h2>Passkey retrieval</h2><p>keys retrieved / trials (exact-match greedy decoding)</p>")
        parts.append(pd.DataFrame(body, columns=header).to_html(escape=True, border=0, index=False))
    ruler_rows = [r for r in rows if r.get("task") in RULER_TASKS]
    if ruler_rows:
        from ctxbench.measurements.ruler.report import policy_table

        header, body = policy_table(ruler_rows)
        parts.append("<h2>KV-cache policies</h2><p>per implementation, context length and (policy, budget): "
                     "tokens kept per layer and KV head, bytes of the compressed cache, prefill time (the "
                     "policy's selection included), ms per generated token, the mean RULER score (recall of "
                     "the expected strings) overall and per task, and the continuation's perplexity</p>")
        parts.append(pd.DataFrame(body, columns=header).to_html(escape=True, border=0, index=False))
    parts.append("<h2>Environment</h2>")
    env = meta.get("environment") or {k: rows[0].get(k, "") for k in ("device_name", "torch_version", "git_commit")}
    parts.append(_kv_table(env))
    if meta.get("spec"):
        parts.append("<h3>Sweep specification</h3>")
        parts.append(f"<pre>{html.escape(json.dumps(meta['spec'], indent=2))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(run_dir: str) -> list[str]:
    """Write the plots (PNG and SVG) and report.html into run_dir; returns every path written.

    Raises FileNotFoundError when run_dir has no results.csv and CorruptResults when it is not a
    ctxbench table.
    """
    csv_path = os.path.join(run_dir, "results.csv")
    if not os.path.exists(csv_path):
        raise FileNotFoundError(f"{run_dir} has no results.csv, so it is not a ctxbench run folder")
    _, rows = read_results(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} has no rows yet; run or resume the sweep first")
    # passkey trials (ctxbench.measurements.passkey.measure) get their depth x length heatmaps and ruler cells their
    # Pareto plot and heatmaps (ctxbench.measurements.ruler.report), not the kernel plots
    passkey_rows = [r for r in rows if r.get("task") == "passkey"]
    ruler_rows = [r for r in rows if r.get("task") in RULER_TASKS]
    others = [r for r in rows if r.get("task") not in OWN_REPORT_TASKS]
    written = plot_run(others, run_dir) if others else []
    if passkey_rows:
        from ctxbench.measurements.passkey.measure import heatmaps

        written += heatmaps(passkey_rows, run_dir)
    if ruler_rows:
        from ctxbench.measurements.ruler.report import plots

        written += plots(ruler_rows, run_dir)
    meta = _read_meta(run_dir)
    title = f"ctxbench run {meta.get('run_id') or os.path.basename(os.path.normpath(run_dir))}"
    page = render_html(rows, meta, [p for p in written if p.endswith(".png")], title)
    out = os.path.join(run_dir, REPORT_NAME)
    with open(out + ".tmp", "w") as f:
        f.write(page)
    os.replace(out + ".tmp", out)
    return written + [out]
