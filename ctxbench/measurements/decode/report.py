"""What a run's decode cells show: ms per generated token, the prefill, the KV cache held and the
greedy tokens equal to transformers' own attention, per implementation and length, and
decode.png (ms per token against N)."""

from __future__ import annotations

from typing import Any

from ctxbench.core.formatting import human_bytes, human_ms, number
from ctxbench.reports.plots import lines, mark_wrong, new_axes, palette, save, with_series
from ctxbench.reports.report import Pivot, markdown_pivot, pivots_html
from ctxbench.reports.section import Section
from ctxbench.reports.summary import pivot_table, status_text

PIVOTS: tuple[Pivot, ...] = (
    ("decode: ms per generated token (median step)", "ms_per_token", human_ms),
    ("decode: prefill of the N-token prompt", "prefill_ms", human_ms),
    ("decode: KV cache held", "kv_cache_bytes", human_bytes),
    ("decode: leading greedy tokens equal to transformers' sdpa", "tokens_match", lambda x: f"{x:.0f}"),
)


def decode_cell(r: dict[str, Any]) -> str:
    """A decode cell: ms per generated token and how many greedy tokens matched transformers' own
    sdpa, or the status."""
    ms, match, total = number(r.get("ms_per_token")), number(r.get("tokens_match")), number(r.get("decode_tokens"))
    if ms is None:
        return status_text(r)
    shown = human_ms(ms) + (f"\n{match:.0f}/{total:.0f} tokens" if match is not None and total else "")
    return shown if r.get("status") == "ok" else f"{shown}\n{status_text(r)}"


def decode_table(rows: list[dict[str, Any]]) -> Any:
    """Decode cells: one line per implementation, one column per prompt length (decode_cell)."""
    model = ((rows[0].get("model") if rows else "") or "").split(" (")[0] or "model"
    return pivot_table(rows, f"decode: ms per generated token / greedy tokens equal to sdpa's ({model})",
                       cell=decode_cell)


def figures(rows: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """decode (ms per token against N), as (name, matplotlib Figure); none without a timing."""
    decode = with_series(rows)
    if decode.empty or "ms_per_token" not in decode.columns or not decode["ms_per_token"].notna().any():
        return []
    d = decode[decode["ms_per_token"].notna() & decode["status"].isin(["ok", "wrong"])]
    fig, ax = new_axes(d, "decode: milliseconds per generated token after a prefill of N tokens",
                       "ms per token (median step)", log_y=False)
    lines(ax, d, "ms_per_token", palette(d))
    mark_wrong(ax, decode, "ms_per_token")
    return [("decode", fig)]


class DecodeSection(Section):
    title = "Decoding through the model"

    def terminal(self, rows: list[dict[str, Any]], console: Any) -> None:
        console.print(decode_table(rows))

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        return "decode: ms per generated token\n\n" + markdown_pivot(with_series(rows), "ms_per_token", human_ms)

    def plots(self, rows: list[dict[str, Any]], run_dir: str) -> list[str]:
        return [path for name, fig in figures(rows) for path in save(fig, run_dir, name)]

    def html(self, rows: list[dict[str, Any]]) -> str:
        return pivots_html(with_series(rows), PIVOTS)


SECTION = DecodeSection()
