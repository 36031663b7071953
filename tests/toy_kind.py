"""A measurement kind registered from outside ctxbench, as a plugin or a test would: the proof that
a kind is added by adding a file (tests/test_kinds.py runs it through the unchanged engine).

The toy kind measures, in the worker, how far an implementation's output on seeded random
inputs is from a float64 reference written here (not ctxbench's), and which process measured it.
Its one field is the number of query heads it uses; it declares its own command, `toy`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ctxbench.core.cell import Cell, Config
from ctxbench.core.flags import Flag
from ctxbench.core.kinds import Command, Field, Kind, register_command, register_kind
from ctxbench.reports.section import Section

NAME = "toy"
COMMAND = "toy"


def attention64(q: Any, k: Any, v: Any) -> Any:
    """Causal softmax attention in float64, from its definition."""
    import torch

    q, k, v = (t.double() for t in (q, k, v))
    n = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    hidden = torch.ones(n, n, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1) @ v


def measure_toy(impl: Any, cell: Cell, settings: Any) -> dict[str, Any]:
    """The toy kind's measurement: relative L2 error of one call against attention64, and the pid."""
    import torch

    from ctxbench.core.masks import Mask

    gen = torch.Generator().manual_seed(settings.seed * 7919 + cell.n)
    heads = cell.get("toy_heads")
    q, k, v = (torch.randn(1, heads, cell.n, 16, generator=gen) for _ in range(3))
    out = impl.call(q, k, v, Mask.named("causal"))
    ref = attention64(q, k, v)
    err = float((out.double() - ref).norm() / ref.norm())
    return {"status": "ok" if err < 1e-4 else "wrong", "message": "", "toy_err": err, "toy_pid": os.getpid()}


@dataclass(frozen=True)
class ToyPlan:
    impls: list[str]
    heads: int

    def cells(self, config: Config, n: int) -> list[Cell]:
        return [Cell.of(config, impl, n, NAME, toy_heads=self.heads) for impl in self.impls]


class ToySection(Section):
    title = "Toy measurements"

    def terminal(self, rows: list[dict[str, Any]], console: Any) -> None:
        console.print(f"toy: {len(rows)} cells")

    def markdown(self, rows: list[dict[str, Any]]) -> str:
        return f"toy: {len(rows)} cells, worst error {max(float(r['toy_err'] or 0) for r in rows):.1e}"

    def html(self, rows: list[dict[str, Any]]) -> str:
        return f"<p id='toy'>toy cells: {len(rows)}</p>"


SECTION = ToySection()

TOY_COMMAND = register_command(Command(name=COMMAND, help="Toy measurements (a test's kind).",
                                      max_len={"cpu": 256, "cuda": 256}, default_impls=("sdpa",)))


@register_kind
class ToyKind(Kind):
    name = NAME
    command = COMMAND
    flags = (Flag("toy_heads", "--toy-heads", 2, int, "query heads of the toy inputs"),)
    fields = (Field("toy_heads"),)
    columns = ("toy_err", "toy_pid")

    def plan(self, context: Any) -> ToyPlan:
        return ToyPlan(impls=list(context.impls), heads=context.options.toy_heads)

    def plan_from_json(self, data: dict[str, Any]) -> ToyPlan:
        return ToyPlan(**data)

    def measure(self, impl: Any, cell: Cell, settings: Any) -> dict[str, Any]:
        return measure_toy(impl, cell, settings)

    def section(self) -> Section:
        return SECTION

    def label(self, cell: Cell) -> str:
        return f"toy {cell.impl} N={cell.n}"
