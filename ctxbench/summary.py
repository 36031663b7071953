"""The terminal summary: implementation x length pivot of latency, memory and status."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from ctxbench.formatting import number

STATUS_STYLE = {"ok": "green", "wrong": "bold red", "oom": "magenta", "error": "red", "timeout": "yellow",
                "unsupported": "dim", "skipped": "dim"}


def human_bytes(n: float) -> str:
    """Bytes as B/KiB/MiB/GiB with 3 significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def human_ms(ms: float) -> str:
    """Milliseconds with a unit that keeps 3 significant digits readable."""
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms * 1000:.3g} us"


def cell_text(row: dict[str, Any]) -> str:
    """What one pivot cell shows: latency and memory when measured, else the status."""
    status = row.get("status", "")
    style = STATUS_STYLE.get(status, "")
    lat = number(row.get("latency_ms"))
    mem = number(row.get("peak_mem_bytes"))
    if lat is None:
        return f"[{style}]{status}[/]"
    text = human_ms(lat) + (f"\n{human_bytes(mem)}" if mem is not None else "")
    return text if status == "ok" else f"{text}\n[{style}]{status}[/]"


def pivot_table(rows: list[dict[str, Any]], title: str = "") -> Table:
    """A rich Table: one line per implementation, one column per context length (tokens)."""
    lengths = sorted({int(r["n"]) for r in rows})
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by_key = {(r["impl"], int(r["n"])): r for r in rows}  # a later row for a cell wins
    table = Table(title=title or None, show_lines=True, title_justify="left")
    table.add_column("impl \\ N", style="bold")
    for n in lengths:
        table.add_column(f"{n:,}", justify="right")
    for impl in impls:
        table.add_row(impl, *(cell_text(by_key[(impl, n)]) if (impl, n) in by_key else "" for n in lengths))
    return table


def perplexity_table(rows: list[dict[str, Any]]) -> Table:
    """Perplexity cells: one line per implementation and RoPE variant, one column per length;
    each cell shows perplexity and bits per byte, or the status."""
    lengths = sorted({int(r["n"]) for r in rows})
    lines = list(dict.fromkeys((r["impl"], r.get("rope", "default")) for r in rows))
    by_key = {(r["impl"], r.get("rope", "default"), int(r["n"])): r for r in rows}
    first = rows[0] if rows else {}
    model = (first.get("model") or "").split(" (")[0] or "model"
    table = Table(title=f"perplexity / bits per byte ({model}, {first.get('ppl_scheme', '')} windows)",
                  show_lines=True, title_justify="left")
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
        label = impl if rope == "default" else f"{impl}, {rope}"
        table.add_row(label, *(text(by_key.get((impl, rope, n))) for n in lengths))
    return table
