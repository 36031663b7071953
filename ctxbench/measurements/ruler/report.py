"""What `ctxbench ruler` found: quality against cost per KV-cache policy and budget.

`ctxbench ruler` (compression.py) answers RULER prompts (kind "retrieval", prompts.py) and scores
the corpus's continuation (kind "continuation") from a KV cache that
a policy (full, streaming, h2o, snapkv, knorm, random) compressed to a budget. From those
results.csv rows this module shows:

- `policy_summary` / `policy_table` / `policy_markdown` / `policy_rich`: one line per
  (implementation, context length, policy, budget): the tokens kept per layer and KV head, the
  bytes of the compressed cache, prefill and selection time, ms per generated token, the mean
  RULER score overall and per RULER task, the continuation's perplexity, and the cells not ok.
- `pareto_plot`: per context length, mean score (and perplexity) against the KV-cache bytes
  held, with the Pareto front of the (policy, budget) points.
- `heatmaps`: per RULER task, a needle depth x context length heatmap of mean score per budget.

Standard library at import; pandas, seaborn, matplotlib and rich are imported inside the
functions that draw or print.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import TYPE_CHECKING, Any

from ctxbench.core.formatting import human_bytes, human_ms, number, safe_name
from ctxbench.measurements.ruler.policies import POLICY_NAMES
from ctxbench.measurements.ruler.prompts import TASKS
from ctxbench.reports.markdown import markdown_table
from ctxbench.reports.report import table_html
from ctxbench.reports.section import Section

if TYPE_CHECKING:
    from rich.table import Table

POLICY_ORDER = POLICY_NAMES  # the order policies are listed in
TASK_ORDER = TASKS  # the RULER tasks of retrieval rows (column `ruler_task`), in their order
# A colour per policy in the plots (matplotlib's tab10 names); full is a black star.
POLICY_COLOURS = {"streaming": "tab:blue", "h2o": "tab:orange", "snapkv": "tab:green", "knorm": "tab:red",
                  "random": "tab:purple"}
HEATMAP_COLUMNS = 4  # subplots per row of a heatmap figure
RULER_KINDS = ("retrieval", "continuation")  # the kinds of ctxbench.measurements.ruler


# ---------------------------------------------------------------- rows and groups

def ruler_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of `ctxbench ruler` (kinds retrieval and continuation) among results.csv rows."""
    return [r for r in rows if r.get("kind") in RULER_KINDS]


def budget_label(row: dict[str, Any]) -> str:
    """"full" for the full cache (policy full, or no budget given), else "policy@budget" with the
    budget as given: "h2o@512" (tokens) or "snapkv@0.25" (a fraction of the context)."""
    policy, budget = str(row.get("policy") or ""), str(row.get("kv_budget") or "")
    if policy == "full" or budget == "":
        return "full"
    return f"{policy}@{budget}"


def _policy_rank(policy: str) -> tuple[int, str]:
    """Sort key of a policy: POLICY_ORDER first, unknown ones after it alphabetically."""
    return (POLICY_ORDER.index(policy), "") if policy in POLICY_ORDER else (len(POLICY_ORDER), policy)


def _task_rank(task: str) -> tuple[int, str]:
    return (TASK_ORDER.index(task), "") if task in TASK_ORDER else (len(TASK_ORDER), task)


def _numbers(rows: list[dict[str, Any]], column: str) -> list[float]:
    """The numeric values of `column` in `rows`; empty and non-numeric cells left out."""
    values = [number(r.get(column)) for r in rows]
    return [v for v in values if v is not None]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _summarise(key: tuple[str, int, str, str], group: list[dict[str, Any]]) -> dict[str, Any]:
    """The record of one (impl, n, policy, kv_budget) group of rows (see policy_summary)."""
    impl, n, policy, kv_budget = key
    ok = [r for r in group if r.get("status") == "ok"]
    retrieval = [r for r in ok if r.get("kind") == "retrieval"]
    continuation = [r for r in ok if r.get("kind") == "continuation"]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in retrieval:
        by_task.setdefault(str(r.get("ruler_task") or ""), []).append(r)
    tasks = {t: _mean(_numbers(by_task[t], "score")) for t in sorted(by_task, key=_task_rank)}
    kept = _median(_numbers(ok, "kv_kept"))
    return {
        "impl": impl, "n": n, "policy": policy, "kv_budget": kv_budget, "label": budget_label(group[0]),
        "kv_kept": None if kept is None else round(kept),
        "kv_cache_bytes": _mean(_numbers(ok, "kv_cache_bytes")),
        "prefill_ms": _mean(_numbers(ok, "prefill_ms")),
        "selection_ms": _mean(_numbers(ok, "selection_ms")),
        "ms_per_token": _median(_numbers(retrieval, "ms_per_token")),
        "score": _mean(_numbers(retrieval, "score")),
        "tasks": {t: s for t, s in tasks.items() if s is not None},
        "cells": len(retrieval),
        "ppl": _mean(_numbers(continuation, "ppl")),
        "not_ok": len(group) - len(ok),
    }


def policy_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (impl, n, policy, kv_budget) among the ruler rows of `rows` (results.csv rows).

    Keys: impl; n (context length, tokens); policy; kv_budget (as given, "" for full); label
    (budget_label); and over the group's ok rows: kv_kept (tokens kept per layer and KV head,
    median, int); kv_cache_bytes (bytes of the compressed cache, mean); prefill_ms (ms, mean,
    the selection included); selection_ms (ms of the policy's scoring and selection, mean);
    ms_per_token (ms per generated token, median over retrieval rows); score (RULER recall 0..1,
    mean over retrieval rows); tasks (ruler_task -> mean score); cells (ok retrieval rows); ppl
    (the continuation's perplexity, the mean if it ran more than once); and not_ok (the group's
    rows with a status other than ok). A value no ok row gives is None.

    Ordered by impl, n, then policy (POLICY_ORDER, unknown policies after it alphabetically),
    then tokens kept.
    """
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = {}
    for r in ruler_rows(rows):
        key = (str(r.get("impl", "")), int(float(r["n"])), str(r.get("policy") or ""), str(r.get("kv_budget") or ""))
        groups.setdefault(key, []).append(r)
    records = [_summarise(key, group) for key, group in groups.items()]

    def order(rec: dict[str, Any]) -> tuple:
        kept = rec["kv_kept"] if rec["kv_kept"] is not None else math.inf
        return (rec["impl"], rec["n"], _policy_rank(rec["policy"]), kept, rec["kv_budget"])

    return sorted(records, key=order)


# ---------------------------------------------------------------- tables

def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _or_blank(value: float | None, fmt: Any) -> str:
    return "" if value is None else fmt(value)


def policy_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, body) of policy_summary as text: impl, N (tokens), policy (the budget label),
    kept (tokens per layer and KV head), KV bytes, prefill (the selection included), selection,
    ms/token, score (mean, percent), one column per RULER task present (percent), ppl and
    not ok (rows with another status; blank when none)."""
    records = policy_summary(rows)
    tasks = sorted({t for rec in records for t in rec["tasks"]}, key=_task_rank)
    header = ["impl", "N", "policy", "kept", "KV bytes", "prefill", "selection", "ms/token", "score", *tasks,
              "ppl", "not ok"]
    body = []
    for rec in records:
        body.append([
            rec["impl"], str(rec["n"]), rec["label"],
            _or_blank(rec["kv_kept"], str),
            _or_blank(rec["kv_cache_bytes"], human_bytes),
            _or_blank(rec["prefill_ms"], human_ms),
            _or_blank(rec["selection_ms"], human_ms),
            _or_blank(rec["ms_per_token"], lambda ms: f"{ms:.3g}"),
            _percent(rec["score"]),
            *(_percent(rec["tasks"].get(t)) for t in tasks),
            _or_blank(rec["ppl"], lambda p: f"{p:.2f}"),
            str(rec["not_ok"]) if rec["not_ok"] else "",
        ])
    return header, body


def policy_markdown(rows: list[dict[str, Any]]) -> str:
    """policy_table as a GitHub markdown table (impl, N and policy left-aligned)."""
    header, body = policy_table(rows)
    return markdown_table(header, body, left=3)


def policy_rich(rows: list[dict[str, Any]]) -> Table:
    """policy_table as a rich.table.Table for the terminal (impl, N and policy left-justified)."""
    from rich.table import Table

    header, body = policy_table(rows)
    table = Table(title="ruler: quality and cost per KV-cache policy and budget", title_justify="left")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 3 else "right")
    for line in body:
        table.add_row(*line)
    return table


# ---------------------------------------------------------------- Pareto front

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (x: a cost, lower is better; y: a quality, higher is better) that no
    other point dominates (x <= and y >= with one of them strict), sorted by x (then index).

    Equal points do not dominate each other, so all of them stay. One sort and one sweep: a point
    is on the front iff it has the highest y among the points of its x and that y beats every
    point of a lower x.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best_before = -math.inf  # the highest y of the points with a lower x than the current one
    start = 0
    while start < len(order):
        x = points[order[start]][0]
        end = start
        while end < len(order) and points[order[end]][0] == x:
            end += 1
        top = points[order[start]][1]  # the highest y at this x (sorted first)
        if top > best_before:
            front += sorted(i for i in order[start:end] if points[i][1] == top)
        best_before = max(best_before, top)
        start = end
    return front


# ---------------------------------------------------------------- plots

def _model(rows: list[dict[str, Any]]) -> str:
    """The model's name: the first row's `model` cell up to " (" (its package version)."""
    for r in rows:
        if r.get("model"):
            return str(r["model"]).split(" (")[0]
    return "model unknown"


def _save(fig: Any, stem: str) -> list[str]:
    written = []
    for ext in ("png", "svg"):
        fig.savefig(f"{stem}.{ext}", dpi=120)
        written.append(f"{stem}.{ext}")
    return written


def _pareto_panel(ax: Any, records: list[dict[str, Any]], metric: str) -> None:
    """One subplot: `metric` (score or ppl) against KV-cache bytes per (policy, budget) record,
    with the Pareto front (fewer bytes; higher score, or lower ppl) as a dashed grey step line."""
    points = [r for r in records if r[metric] is not None and (r["kv_cache_bytes"] or 0) > 0
              and (metric != "ppl" or r[metric] > 0)]
    sign = -1.0 if metric == "ppl" else 1.0
    front = pareto_front([(r["kv_cache_bytes"], sign * r[metric]) for r in points])
    if front:
        ax.step([points[i]["kv_cache_bytes"] for i in front], [points[i][metric] for i in front], where="post",
                linestyle="--", color="grey", linewidth=1, zorder=1, label="Pareto front")
    for policy in sorted({r["policy"] for r in points}, key=_policy_rank):
        mine = [r for r in points if r["policy"] == policy]
        xs, ys = [r["kv_cache_bytes"] for r in mine], [r[metric] for r in mine]
        if policy == "full":
            ax.scatter(xs, ys, marker="*", s=160, color="black", zorder=3, label="full")
        else:
            ax.scatter(xs, ys, marker="o", s=36, color=POLICY_COLOURS.get(policy, "tab:gray"), zorder=2,
                       label=policy)
            for r in mine:
                ax.annotate(r["kv_budget"], (r["kv_cache_bytes"], r[metric]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("KV cache held (bytes)")
    if metric == "ppl":
        ax.set_yscale("log")
        ax.set_ylabel("continuation perplexity (lower is better)")
    else:
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel("mean RULER score (0..1)")
    ax.grid(True, which="both", alpha=0.3)


def pareto_plot(rows: list[dict[str, Any]], run_dir: str) -> list[str]:
    """Quality against KV-cache bytes held, as run_dir/ruler-pareto.png and .svg; the paths
    ([] without ok ruler rows).

    One column per (impl, context length n): the top row is the mean RULER score (0..1) of each
    (policy, budget) against its mean compressed-cache bytes (log x), a colour per policy (full a
    black star) and each point labelled with its budget; with continuation rows, a second row
    has the perplexity (log y, lower is better). Each subplot has its Pareto front as a dashed
    grey step line.
    """
    from matplotlib.figure import Figure

    rows = [r for r in ruler_rows(rows) if r.get("status") == "ok"]
    records = [r for r in policy_summary(rows) if r["kv_cache_bytes"] is not None]
    metrics = [m for m in ("score", "ppl") if any(r[m] is not None for r in records)]
    if not metrics:
        return []
    columns = list(dict.fromkeys((r["impl"], r["n"]) for r in records))
    fig = Figure(figsize=(4.2 * len(columns), 3.6 * len(metrics) + 0.6), layout="constrained")
    axes = fig.subplots(len(metrics), len(columns), squeeze=False)
    for j, (impl, n) in enumerate(columns):
        mine = [r for r in records if (r["impl"], r["n"]) == (impl, n)]
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            _pareto_panel(ax, mine, metric)
            ax.set_title(f"{impl}, N={n:,} tokens", fontsize=9)
            if j == len(columns) - 1:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"ruler: quality vs KV cache held per policy and budget ({_model(rows)})", fontsize=10)
    return _save(fig, os.path.join(run_dir, "ruler-pareto"))


def heatmaps(rows: list[dict[str, Any]], run_dir: str) -> list[str]:
    """Per RULER task, a needle depth x context length heatmap of mean score (0..1) for each budget
    label (and impl, when there are several), from the ok retrieval rows: one figure per task,
    HEATMAP_COLUMNS subplots a row, as run_dir/ruler-<task>.png and .svg; the paths."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    ok = [r for r in ruler_rows(rows) if r.get("kind") == "retrieval" and r.get("status") == "ok"]
    df = pd.DataFrame(ok)
    written: list[str] = []
    if df.empty:
        return written
    for col in ("score", "depth", "n", "trial"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df = df.dropna(subset=["score", "depth", "n"])
    df["label"] = [budget_label(r) for r in df.to_dict("records")]
    several_impls = df["impl"].nunique() > 1
    # panels in the order of the policy table (policy, then tokens kept)
    panels = list(dict.fromkeys((rec["impl"], rec["label"]) for rec in policy_summary(ok)))
    for task in sorted(df["ruler_task"].unique(), key=_task_rank):
        part = df[df["ruler_task"] == task]
        mine = [p for p in panels if ((part["impl"] == p[0]) & (part["label"] == p[1])).any()]
        cols = min(HEATMAP_COLUMNS, len(mine))
        lines = math.ceil(len(mine) / cols)
        ns, depths = part["n"].nunique(), part["depth"].nunique()
        fig = Figure(figsize=(cols * max(3.2, 1.4 + 0.8 * ns) + 1.0, lines * max(2.6, 1.3 + 0.45 * depths) + 0.7),
                     layout="constrained")
        axes = []
        for k, (impl, label) in enumerate(mine):
            cell = part[(part["impl"] == impl) & (part["label"] == label)]
            table = cell.pivot_table(index="depth", columns="n", values="score", aggfunc="mean")
            table.index = [f"{d:g}" for d in table.index]
            table.columns = [str(int(n)) for n in table.columns]
            ax = fig.add_subplot(lines, cols, k + 1)
            sns.heatmap(table, vmin=0, vmax=1, cmap="RdYlGn", annot=True, fmt=".0%", cbar=False, linewidths=0.5,
                        ax=ax, annot_kws={"fontsize": 7})
            ax.set_title(f"{impl}, {label}" if several_impls else label, fontsize=9)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth (fraction)")
            axes.append(ax)
        fig.colorbar(axes[-1].collections[0], ax=axes, label="mean score (recall)")
        trials = int(part["trial"].max()) + 1 if part["trial"].notna().any() else 1
        fig.suptitle(f"ruler {task}: mean score by needle depth and context length ({trials} trial(s) per cell)\n"
                     f"{_model(ok)}", fontsize=10)
        written += _save(fig, os.path.join(run_dir, f"ruler-{safe_name(str(task), 'task')}"))
    return written


def plots(rows: list[dict[str, Any]], run_dir: str) -> list[str]:
    """pareto_plot and heatmaps of the ruler rows of `rows` into run_dir; every path written."""
    return pareto_plot(rows, run_dir) + heatmaps(rows, run_dir)


class RulerSection(Section):
    title = "KV-cache policies"

    def terminal(self, rows: list[dict[str, Any]], console: Any) -> None:
        console.print(policy_rich(rows))

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        return policy_markdown(rows)

    def plots(self, rows: list[dict[str, Any]], run_dir: str) -> list[str]:
        return plots(rows, run_dir)

    def html(self, rows: list[dict[str, Any]]) -> str:
        header, body = policy_table(rows)
        return ("<p>per implementation, context length and (policy, budget): tokens kept per layer and KV head, bytes "
                "of the compressed cache, prefill time (the policy's selection included), ms per generated token, the "
                "mean RULER score (recall of the expected strings) overall and per task, and the continuation's "
                "perplexity</p>" + table_html(header, body))


SECTION = RulerSection()
