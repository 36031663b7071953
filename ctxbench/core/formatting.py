"""Small text helpers shared by every layer: one line for an exception, a name safe for a
file, a number read from a CSV cell, bytes and milliseconds for people. Each exists once,
here (no torch, no heavy imports).
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
