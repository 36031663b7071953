"""GitHub markdown tables, for `ctxbench report` and `ctxbench compare`.

Standard library only: `ctxbench compare` and anything else that prints markdown stay light
(no pandas, matplotlib or torch behind this import).
"""

from __future__ import annotations

from typing import Any


def markdown_table(header: list[str], rows: list[list[str]], left: int = 1, left_last: bool = False) -> str:
    """A GitHub markdown table: the first `left` columns (and the last with left_last) left-aligned,
    the rest right-aligned (numbers)."""
    def clean(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    align = ["---" if i < left or (left_last and i == len(header) - 1) else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(clean(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(clean(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
