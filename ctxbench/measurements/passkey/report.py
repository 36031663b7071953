"""What a run's passkey trials show: keys retrieved out of trials per implementation, RoPE variant,
depth and length, and a depth x length heatmap per (implementation, RoPE variant)."""

from __future__ import annotations

import os
from typing import Any

from ctxbench.core.formatting import number, safe_name
from ctxbench.reports.markdown import markdown_table
from ctxbench.reports.report import table_html
from ctxbench.reports.section import Section


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


def passkey_summary(rows: list[dict[str, Any]]) -> str:
    """'k/n keys retrieved; m trials not ok' over passkey rows (results.csv rows)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    retrieved = sum(int(float(r["correct"])) for r in ok if str(r.get("correct", "")) != "")
    return f"passkey: {retrieved}/{len(ok)} keys retrieved; {len(rows) - len(ok)} trials not ok"


def heatmaps(rows: list[dict[str, Any]], run_dir: str) -> list[str]:
    """A depth x length heatmap of retrieval accuracy per (impl, rope) from a run's results.csv
    passkey rows (those with status ok), PNG and SVG, as run_dir/passkey-<impl>-<rope>.*; the paths."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    from ctxbench.core.masks import Mask

    df = pd.DataFrame([r for r in rows if r.get("status") == "ok"])
    written: list[str] = []
    if df.empty:
        return written
    for col in ("correct", "depth", "n", "trial"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for (impl, rope), part in df.groupby(["impl", "rope"], sort=False):
        table = part.pivot_table(index="depth", columns="n", values="correct", aggfunc="mean")
        table.index = [f"{d:g}" for d in table.index]
        table.columns = [str(int(n)) for n in table.columns]
        fig = Figure(figsize=(max(5.0, 1.8 + 0.9 * len(table.columns)), max(3.2, 1.6 + 0.5 * len(table.index))),
                     layout="constrained")
        ax = fig.add_subplot()
        sns.heatmap(table, vmin=0, vmax=1, cmap="RdYlGn", annot=True, fmt=".0%", cbar_kws={"label": "retrieved"},
                    linewidths=0.5, ax=ax)
        first = part.iloc[0]
        mask = Mask.named(str(first.get("mask", "causal")), _as_int(first.get("window")),
                          _as_int(first.get("sinks")) or 0)
        ax.set_title(f"passkey retrieval (exact match, {int(part['trial'].max()) + 1} key(s) per cell)\n"
                     f"{impl}, rope {rope}, {mask.describe()}", fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("key depth (fraction of the context)")
        stem = os.path.join(run_dir, f"passkey-{safe_name(str(impl))}-{safe_name(str(rope))}")
        for ext in ("png", "svg"):
            fig.savefig(f"{stem}.{ext}", dpi=120)
            written.append(f"{stem}.{ext}")
    return written


def _as_int(value: Any) -> int | None:
    f = number(value)
    return None if f is None else int(f)


class PasskeySection(Section):
    title = "Passkey retrieval"

    def terminal(self, rows: list[dict[str, Any]], console: Any) -> None:
        console.print(passkey_summary(rows))

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        return passkey_markdown(rows) + "\n\n" + passkey_summary(rows)

    def plots(self, rows: list[dict[str, Any]], run_dir: str) -> list[str]:
        return heatmaps(rows, run_dir)

    def html(self, rows: list[dict[str, Any]]) -> str:
        header, body = passkey_table(rows)
        return "<p>keys retrieved / trials (exact-match greedy decoding)</p>" + table_html(header, body)


SECTION = PasskeySection()
