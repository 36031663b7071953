"""The terminal summary at the end of a run, and the table helpers every kind's section uses.

`print_summary` goes through the report sections of the kinds the run has (each kind's
terminal tables: the kernel pivot and scaling fits, perplexity, decode, passkey, the KV-cache
policies), then counts the statuses and says where the files are.

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

from ctxbench.core.formatting import first_line

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


def noted_table(title: str, notes: list[str]) -> NotedTable:
    """A table with lines between rows, its title on the left and `notes` under it."""
    return NotedTable(title=title or None, show_lines=True, title_justify="left", notes=notes)


# ---------------------------------------------------------------- tables

def status_text(row: dict[str, Any]) -> str:
    """A row's status in its colour (rich markup)."""
    status = row.get("status", "")
    return f"[{STATUS_STYLE.get(status, '')}]{status}[/]"


def pivot_table(rows: list[dict[str, Any]], title: str, cell: Callable[[dict[str, Any]], str]) -> Table:
    """A rich Table: one line per implementation, one column per context length (tokens), each
    cell what `cell` makes of its row; implementations unsupported at every length are named
    under it instead."""
    skipped = not_run(rows)
    lengths = sorted({int(r["n"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows if not is_left_out(r, skipped)))
    by_key = {(r["impl"], int(r["n"])): r for r in rows}  # a later row for a cell wins
    table = noted_table(title, not_run_lines(skipped))
    table.add_column("impl \\ N", style="bold")
    for n in lengths:
        table.add_column(f"{n:,}", justify="right")
    for impl in impls:
        table.add_row(impl, *(cell(by_key[(impl, n)]) if (impl, n) in by_key else "" for n in lengths))
    return table


def print_summary(rows: list[dict[str, Any]], run_dir: str, console: Any) -> None:
    """Each report section's terminal tables (in the order of the run's kinds), the status
    counts and where the results are."""
    for section, covered in sections_of(rows):
        section.terminal([r for r in rows if r.get("kind") in covered], console)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no cells")
    console.print(f"results: {os.path.join(run_dir, 'results.csv')}")


def sections_of(rows: list[dict[str, Any]]) -> list[tuple[Any, list[str]]]:
    """The report sections (ctxbench.reports.section.Section) of the kinds `rows` have, each with
    the kinds it covers, in the kinds' registration order. Rows of a kind not registered in this
    process have no section."""
    from ctxbench.core import kinds

    return kinds.sections(list(dict.fromkeys(str(r.get("kind", "")) for r in rows)))
