"""A/B runs: an implementation X and the same X at another revision (X@<commit>, ctxbench.core.
revisions) measured in one run, their timed calls interleaved so that whatever the machine does
meanwhile (another job, a noisy neighbour of the VM, a frequency change) falls on both alike.

When the sweep submits a cell of X whose partner X@<commit> is in the run (or the other way
round), and the cell's kind can time a cell again (Kind.measurement_more), both cells are
measured here in ROUNDS rounds, each side timing its share of the budget per round:

    round 1: A B    round 2: B A    round 3: A B    ...

Round 1 is each side's whole measurement (setup, first call, memory, error check, warm-up and
timed calls) with the prepared call kept in its worker (Settings.keep_for_more); the later rounds
only time that call again (Kind.measure_more, one warm-up call each), so a round costs its timed
calls and a few ms of hand-over. Who goes first alternates, so neither side always follows the
other's cache footprint. Each side keeps its own worker process, so the revisions never share one.

On the 2-core CI machine the speed of a call drifts by tens of percent from one tenth of a
second to the next (chunked at N=512: round medians 4.7 to 10.3 ms in one process); rounds of a
few tens of ms, each paired with the other side's adjacent round, are what cancels it
(`ctxbench compare` tests the per-round ratios: ctxbench.reports.compare). The kind joins a
side's rounds into one row (Kind.merge_rounds, which records each round's median); the partner's
row is kept until the sweep submits its cell, and returned at once then. Other cells are
measured as the local executor always does.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import replace
from typing import Any

from ctxbench.core import kinds, registry, revisions
from ctxbench.core.cell import Cell, Settings
from ctxbench.core.formatting import safe_name
from ctxbench.engine.executor import LocalExecutor
from ctxbench.engine.sweep import STOP_STATUSES  # what the sweep skips longer lengths after

# Rounds per A/B cell: 20 pairs of adjacent rounds for the paired test; at the default 1 s budget
# a round times 50 ms of calls (at least one call).
ROUNDS = 20
MEASURED = ("ok", "wrong")


def partners(names: list[str]) -> dict[str, str]:
    """Each implementation's partner among names: X <-> X@<commit> (the first such revision of X)."""
    out: dict[str, str] = {}
    for name in names:
        base, rev = revisions.split(name)
        if rev is not None and base in names and base not in out:
            out[base], out[name] = name, base
    return out


def round_settings(s: Settings, rounds: int, first: bool, cpu: int | None = None, last: bool = False) -> Settings:
    """The timing budget of one round: the cell's repeats and time split over `rounds` (at least
    one timed call per round). The first round warms up as any cell does and keeps the prepared
    call; a later one warms up with one call (the other side ran in between); the last lets the
    worker drop the call (keep_for_more False). cpu: the CPU both sides of the round run on (pin_cpu)."""
    return replace(s, rep_ms=s.rep_ms / rounds, min_repeats=max(1, math.ceil(s.min_repeats / rounds)),
                   max_repeats=max(1, math.ceil(s.max_repeats / rounds)), keep_for_more=not last,
                   warmup_ms=s.warmup_ms if first else 0.0, pin_cpu=cpu)


def round_cpus() -> list[int | None]:
    """The CPUs the rounds of a single-threaded run rotate over (both sides of a round on the same
    one): a process the OS keeps on the slower of two CPUs measured 9-14% slower than its identical
    partner through every round. [None] (no pinning) when torch runs several threads, which one
    CPU would starve."""
    import torch

    if torch.get_num_threads() != 1 or not hasattr(os, "sched_getaffinity"):
        return [None]
    return sorted(os.sched_getaffinity(0))


class InterleavedExecutor(LocalExecutor):
    """The local executor (an Executor) for a run holding X and X@<commit>: their cells are timed
    in interleaved rounds (module docstring); every other cell as LocalExecutor measures it."""

    def __init__(self, memory_limit_bytes: int | None, impls: list[str], reuse: bool = True,
                 rounds: int = ROUNDS) -> None:
        super().__init__(memory_limit_bytes, reuse=reuse)
        self.partner = partners(impls)
        self.rounds = rounds
        self._kept: dict[tuple, dict[str, Any]] = {}
        # (impl, kind) -> the length where it ran out of memory or time, as the sweep skips past it:
        # its partner's longer cells are then measured alone
        self._stopped: dict[tuple[str, str], int] = {}

    def run_cell(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str) -> dict[str, Any]:
        kept = self._kept.pop(cell.key, None)
        if kept is not None:
            return kept
        other_impl = self.partner.get(cell.impl)
        kind = kinds.get(cell.kind)
        stopped = self._stopped.get((other_impl or "", cell.kind))
        if other_impl is None or not kind.interleaves or self.rounds < 2 or registry.resolve(cell.impl).distributed \
                or (stopped is not None and stopped < cell.n):
            return super().run_cell(cell, settings, timeout_s=timeout_s, log_path=log_path)
        other = replace(cell, impl=other_impl)
        logs = {cell: log_path, other: os.path.join(os.path.dirname(log_path), safe_name(other_impl) + ".log")}
        rows: dict[Cell, list[dict[str, Any]]] = {cell: [], other: []}
        wall = {cell: 0.0, other: 0.0}
        cpus = round_cpus()
        for r in range(self.rounds):
            # the first round measures memory and checks: wherever the OS puts it
            per_round = round_settings(settings, self.rounds, first=r == 0, cpu=None if r == 0 else cpus[r % len(cpus)],
                                       last=r == self.rounds - 1)
            for side in ((cell, other) if r % 2 == 0 else (other, cell)):
                if rows[side] and rows[side][-1].get("status") not in MEASURED:
                    continue  # this side failed: its failure is its row
                result = super().run_cell(side, per_round, timeout_s=timeout_s, log_path=logs[side], more=r > 0)
                wall[side] += result.pop("wall_s", 0.0)
                rows[side].append(result)
        merged = {}
        pair = uuid.uuid4().hex[:12]  # ctxbench compare pairs the rounds of rows that share it
        for side in (cell, other):
            merged[side] = kind.merge_rounds(side, rows[side], settings)
            merged[side]["wall_s"] = wall[side]
            if merged[side].get("round_latency_ms"):
                merged[side]["ab_pair"] = pair
            if merged[side].get("status") in STOP_STATUSES:
                self._stopped.setdefault((side.impl, side.kind), side.n)
        self._kept[other.key] = merged[other]
        return merged[cell]
