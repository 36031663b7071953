"""The terminal summary at the end of a run: the implementation x length pivot of latency,
memory and status, the scaling fits, perplexity, passkey, decode, the KV-cache policies (ctxbench
ruler), and where the files are.

An implementation whose every cell is `unsupported` (triton on a CPU without its interpreter,
an SDPA backend pinned on the wrong device) gets no line of its own: it is named once under
the table with the reason (`not_run`, `not_run_lines`), in the terminal, the markdown pivot,
report.html and the plots' legends alike.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from rich.table import Table
from rich.text import Text

from ctxbench.reports.fits import FIT_HEADER, FIT_POINTS, Fit, fit_all, fit_row
from ctxbench.core.formatting import first_line, human_bytes, human_ms, number
from ctxbench.engine.plan import RULER_TASKS

STATUS_STYLE = {"ok": "green", "wrong": "bold red", "oom": "magenta", "error": "red", "timeout": "yellow",
                "unsupported": "dim", "skipped": "dim"}


# ---------------------------------------------------------------- lines that never ran

def impl_of(row: dict[str, Any]) -> str:
    return str(row["impl"])


def not_run(rows: Iterable[dict[str, Any]], line: Callable[[dict[str, Any]], str] = impl_of) -> dict[str, list[str]]:
    """What never ran: each implementation whose every cell is `unsupported`, named by itself,
    then, with `line` (a label finer than the implementation, e.g. with the RoPE variant), each
    further line whose every cell is; each with its distinct reasons in order of appearance.
    The last row of a cell counts (a resumed run's), as in the pivot."""
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        cells[(impl_of(r), line(r), str(r.get("n", "")))] = r
    last = list(cells.values())
    whole = _never_ran(last, impl_of)
    return {**whole, **_never_ran([r for r in last if impl_of(r) not in whole], line)}


def _never_ran(rows: list[dict[str, Any]], line: Callable[[dict[str, Any]], str]) -> dict[str, list[str]]:
    by_line: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_line.setdefault(line(r), []).append(r)
    return {label: list(dict.fromkeys(_reason(r) for r in rs))
            for label, rs in by_line.items() if all(r.get("status") == "unsupported" for r in rs)}


def _reason(row: dict[str, Any]) -> str:
    message = row.get("message")
    return (first_line(message) if isinstance(message, str) else "") or "no reason recorded"


def is_left_out(row: dict[str, Any], skipped: dict[str, list[str]],
                line: Callable[[dict[str, Any]], str] = impl_of) -> bool:
    """Whether a row belongs to a line `not_run` named (so the table leaves it out)."""
    return impl_of(row) in skipped or line(row) in skipped


def not_run_lines(skipped: dict[str, list[str]]) -> list[str]:
    """'not run: triton (triton runs on the CPU only through its interpreter, ...)', one per line."""
    return [f"not run: {label} ({'; '.join(reasons)})" for label, reasons in skipped.items()]


def fits_shown(rows: list[dict[str, Any]]) -> list[Fit]:
    """The scaling fits of the kernel rows (ctxbench.reports.fits.fit_all), but none for an implementation
    that never ran: nothing to fit, and it is named under the pivot already."""
    skipped = not_run(r for r in rows if r.get("task", "kernel") != "perplexity")
    return [f for f in fit_all(rows) if f.impl not in skipped]


def perplexity_label(r: dict[str, Any]) -> str:
    """A perplexity table's line: the implementation, and the RoPE variant unless the default."""
    rope = r.get("rope") or "default"
    return str(r["impl"]) if rope == "default" else f"{r['impl']}, {rope}"


class NotedTable(Table):
    """A rich Table with `notes` printed under it at the console's full width (a caption would
    wrap at the table's)."""

    def __init__(self, *args: Any, notes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notes = list(notes or [])

    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield from super().__rich_console__(console, options)
        for note in self.notes:
            yield Text(note, style="dim")


def _table(title: str, notes: list[str]) -> NotedTable:
    return NotedTable(title=title or None, show_lines=True, title_justify="left", notes=notes)


# ---------------------------------------------------------------- tables

def cell_text(row: dict[str, Any]) -> str:
    """What one pivot cell shows: latency and memory when measured, else the status."""
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


def pivot_table(rows: list[dict[str, Any]], title: str = "",
                cell: Callable[[dict[str, Any]], str] = cell_text) -> Table:
    """A rich Table: one line per implementation, one column per context length (tokens), each
    cell what `cell` makes of its row (latency and memory by default); implementations
    unsupported at every length are named under it instead."""
    skipped = not_run(rows)
    lengths = sorted({int(r["n"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows if not is_left_out(r, skipped)))
    by_key = {(r["impl"], int(r["n"])): r for r in rows}  # a later row for a cell wins
    table = _table(title, not_run_lines(skipped))
    table.add_column("impl \\ N", style="bold")
    for n in lengths:
        table.add_column(f"{n:,}", justify="right")
    for impl in impls:
        table.add_row(impl, *(cell(by_key[(impl, n)]) if (impl, n) in by_key else "" for n in lengths))
    return table


def perplexity_table(rows: list[dict[str, Any]]) -> Table:
    """Perplexity cells: one line per implementation and RoPE variant, one column per length;
    each cell shows perplexity and bits per byte, or the status. Lines that never ran are named
    under the table."""
    skipped = not_run(rows, perplexity_label)
    lengths = sorted({int(r["n"]) for r in rows})
    lines = list(dict.fromkeys((r["impl"], r.get("rope") or "default") for r in rows
                               if not is_left_out(r, skipped, perplexity_label)))
    by_key = {(r["impl"], r.get("rope") or "default", int(r["n"])): r for r in rows}
    first = rows[0] if rows else {}
    model = (first.get("model") or "").split(" (")[0] or "model"
    table = _table(f"perplexity / bits per byte ({model}, {first.get('ppl_scheme', '')} windows)",
                   not_run_lines(skipped))
    table.add_column("impl, rope \\ N", style="bold")
    for n in lengths:
        table.add_column(f"{n:,}", justify="right")

    def text(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        ppl, bpb = number(r.get("ppl")), number(r.get("bits_per_byte"))
        status = r.get("status", "")
        if ppl is None:
            return f"[{STATUS_STYLE.get(status, '')}]{status}[/]"
        shown = f"{ppl:.4g}\n{bpb:.4g} bpb" if bpb is not None else f"{ppl:.4g}"
        return shown if status == "ok" else f"{shown}\n[{STATUS_STYLE.get(status, '')}]{status}[/]"

    for impl, rope in lines:
        table.add_row(perplexity_label({"impl": impl, "rope": rope}),
                      *(text(by_key.get((impl, rope, n))) for n in lengths))
    return table


def decode_cell(r: dict[str, Any]) -> str:
    """A decode cell (ctxbench.measurements.decode.measure): ms per generated token and how many greedy tokens
    matched transformers' own sdpa, or the status."""
    ms, match, total = number(r.get("ms_per_token")), number(r.get("tokens_match")), number(r.get("decode_tokens"))
    status = r.get("status", "")
    if ms is None:
        return f"[{STATUS_STYLE.get(status, '')}]{status}[/]"
    shown = human_ms(ms) + (f"\n{match:.0f}/{total:.0f} tokens" if match is not None and total else "")
    return shown if status == "ok" else f"{shown}\n[{STATUS_STYLE.get(status, '')}]{status}[/]"


def decode_table(rows: list[dict[str, Any]]) -> Table:
    """Decode cells: one line per implementation, one column per prompt length (decode_cell)."""
    model = ((rows[0].get("model") if rows else "") or "").split(" (")[0] or "model"
    return pivot_table(rows, f"decode: ms per generated token / greedy tokens equal to sdpa's ({model})",
                       cell=decode_cell)


def print_summary(rows: list[dict[str, Any]], run_dir: str, console: Any) -> None:
    """The pivot table, the scaling fits, perplexity and where the files are."""
    kernel_rows = [r for r in rows if r.get("task", "kernel") in ("kernel", "")]
    ppl_rows = [r for r in rows if r.get("task") == "perplexity"]
    passkey_rows = [r for r in rows if r.get("task") == "passkey"]
    if kernel_rows:
        console.print(pivot_table(kernel_rows, title="latency (median) / peak memory, or status"))
        console.print(fits_table(fits_shown(kernel_rows)))
    if ppl_rows:
        console.print(perplexity_table(ppl_rows))
    if passkey_rows:
        from ctxbench.measurements.passkey.measure import passkey_summary

        console.print(passkey_summary(passkey_rows))
    decode_rows = [r for r in rows if r.get("task") == "decode"]
    if decode_rows:
        console.print(decode_table(decode_rows))
    ruler_rows = [r for r in rows if r.get("task") in RULER_TASKS]
    if ruler_rows:
        from ctxbench.measurements.ruler.report import policy_rich

        console.print(policy_rich(ruler_rows))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no cells")
    console.print(f"results: {os.path.join(run_dir, 'results.csv')}")


def fits_table(fits: list[Fit]) -> Table:
    """Exponent p of latency ~ N^p and memory ~ N^p per implementation, and the longest length that ran."""
    table = Table(title=f"scaling: cost ~ N^p over the {FIT_POINTS} longest ok lengths (2 quadratic, 1 linear)",
                  title_justify="left")
    for col in FIT_HEADER:
        table.add_column(col, justify="left" if col == "impl" else "right")
    for f in fits:
        table.add_row(*fit_row(f))
    return table
