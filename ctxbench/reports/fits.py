"""Scaling fits: how latency and peak memory grow with the context length N.

For each implementation, the exponent p of cost ~ N^p is the least-squares slope of
log(cost) against log(N) over its longest lengths with status ok: short lengths are
dominated by fixed overheads (a call's launch, a worker's first allocations) and would
pull every exponent towards 0. About 2 means quadratic (a full N x N score matrix),
about 1 linear (a sliding window's memory, a chunked kernel's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from ctxbench.core.formatting import number

# Points per fit: the longest this many ok lengths (all of them when fewer were measured).
FIT_POINTS = 4
# Statuses of a cell that ran to the end, so its length fit in memory and time ("wrong" was still timed).
FIT_STATUSES = ("ok", "wrong")
# What stopped an implementation from going longer.
STOP_STATUSES = ("oom", "timeout", "skipped")


@dataclass(frozen=True)
class Fit:
    """One implementation's scaling: exponents (None when fewer than 2 usable points) and reach."""

    impl: str
    latency_exponent: float | None
    latency_points: tuple[int, ...]   # the lengths (tokens) the latency fit used
    memory_exponent: float | None
    memory_points: tuple[int, ...]    # the lengths (tokens) the memory fit used (positive memory only)
    largest_fit: int | None           # longest length (tokens) that ran to the end
    stopped_at: int | None            # shortest length that ran out of memory or time, if any
    stop_status: str = ""             # what happened there (oom, timeout)

    def reach_text(self) -> str:
        """'8K (oom at 16K)', or '16K (all ran)'; '-' when nothing ran."""
        if self.largest_fit is None:
            return f"- ({self.stop_status} at {length_text(self.stopped_at)})" if self.stopped_at else "-"
        if self.stopped_at is not None:
            return f"{length_text(self.largest_fit)} ({self.stop_status} at {length_text(self.stopped_at)})"
        return f"{length_text(self.largest_fit)} (all ran)"


def length_text(n: int) -> str:
    """Tokens as people say them: 8192 -> '8K', 1000 -> '1,000'."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else f"{n:,}"


def slope(xs: Iterable[float], ys: Iterable[float]) -> float:
    """Least-squares slope of log(y) against log(x); needs at least 2 distinct positive x."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if len(lx) < 2 or sxx == 0:
        raise ValueError("a slope needs at least two distinct lengths")
    return sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx


def _exponent(points: dict[int, float], n_points: int) -> tuple[float | None, tuple[int, ...]]:
    used = sorted(n for n, v in points.items() if v > 0)[-n_points:]
    if len(used) < 2:
        return None, tuple(used)
    return slope(used, [points[n] for n in used]), tuple(used)


def fit_impl(rows: list[dict[str, Any]], impl: str, n_points: int = FIT_POINTS) -> Fit:
    """The Fit of one implementation from its kernel rows (a later row for a length wins)."""
    lat: dict[int, float] = {}
    mem: dict[int, float] = {}
    ran: list[int] = []
    stops: dict[int, str] = {}
    for r in rows:
        if r.get("impl") != impl:
            continue
        n, status = int(r["n"]), r.get("status", "")
        if status in FIT_STATUSES:
            ran.append(n)
        elif status in ("oom", "timeout"):
            stops[n] = status
        if status != "ok":
            continue
        if (v := number(r.get("latency_ms"))) is not None:
            lat[n] = v
        if (v := number(r.get("peak_mem_bytes"))) is not None:
            mem[n] = v
    lat_exp, lat_used = _exponent(lat, n_points)
    mem_exp, mem_used = _exponent(mem, n_points)
    stopped_at = min(stops) if stops else None
    return Fit(impl=impl, latency_exponent=lat_exp, latency_points=lat_used, memory_exponent=mem_exp,
               memory_points=mem_used, largest_fit=max(ran) if ran else None, stopped_at=stopped_at,
               stop_status=stops.get(stopped_at, "") if stopped_at is not None else "")


def fit_all(rows: list[dict[str, Any]], n_points: int = FIT_POINTS) -> list[Fit]:
    """One Fit per implementation of `rows` (kernel rows: the fits are of one attention call's
    cost), in the order they first appear."""
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    return [fit_impl(rows, impl, n_points) for impl in impls]


def points_text(points: tuple[int, ...]) -> str:
    """'2K-16K (4 pts)', or '1 pt' when there is nothing to fit."""
    if len(points) < 2:
        return f"{len(points)} pt{'s' if len(points) != 1 else ''}"
    return f"{length_text(points[0])}-{length_text(points[-1])} ({len(points)} pts)"


FIT_HEADER = ("impl", "latency ~N^p", "memory ~N^p", "fit over N", "largest N that fit")


def fit_row(f: Fit) -> list[str]:
    """One line of the fits table (columns FIT_HEADER): the exponents, the lengths the latency fit
    used (the memory fit's too when they differ: a zero memory reading is left out), the reach."""
    lat = "n/a" if f.latency_exponent is None else f"{f.latency_exponent:.2f}"
    mem = "n/a" if f.memory_exponent is None else f"{f.memory_exponent:.2f}"
    if f.memory_points != f.latency_points:
        mem += f" ({points_text(f.memory_points)})"
    return [f.impl, lat, mem, points_text(f.latency_points), f.reach_text()]
