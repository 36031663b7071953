"""Small text helpers shared by every layer: one line for an exception, a name safe for a
file, a number read from a CSV cell. Each exists once, here (no torch, no heavy imports).
"""

from __future__ import annotations

import math
import re
from typing import Any

# Longest message a CSV row or a one-line error carries (characters).
MESSAGE_CHARS = 500


def first_line(text: str) -> str:
    """The first non-blank line of `text`, stripped ("" when there is none)."""
    return next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` for an exception (its type alone when it says nothing)."""
    first = first_line(str(exc))
    return f"{type(exc).__name__}: {first}"[:MESSAGE_CHARS] if first else type(exc).__name__


def safe_name(name: str, fallback: str = "impl") -> str:
    """`name` with everything but letters, digits, `_`, `.` and `-` folded to `_` (file names)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or fallback


def number(value: Any) -> float | None:
    """A CSV cell (or any value) as a finite float; None when empty, not a number, NaN or inf."""
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
