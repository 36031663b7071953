"""The plan of a run: its command, configuration, lengths, and each kind's plan -> cells.

A SweepSpec is a whole run: which command planned it, the shared configuration, the context
lengths, one plan per measurement kind (ctxbench.core.kinds: its implementations and its cells
per length), the Settings that say how to measure, and the executor's limits. It is saved in
meta.json, so --resume rebuilds the same cells. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ctxbench.core import kinds
from ctxbench.core.cell import CONFIG_FIELDS, Cell, Config, Settings
from ctxbench.core.kinds import Plan


@dataclass(frozen=True)
class PlanContext:
    """What a kind plans from (Kind.plan): the command's options (ctxbench.engine.options.Options),
    the configuration, the lengths (tokens), the implementations the command resolved and whether
    the user named them, and the torchrun world size."""

    options: Any
    config: Config
    lengths: list[int]
    impls: list[str]
    named: bool
    world: int = 1


def powers_of_two(min_len: int, max_len: int) -> list[int]:
    """Powers of two from min_len up to max_len, both included when they are powers of two.

    A min_len that is not a power of two is kept as the first length.
    """
    lengths = [min_len]
    p = 1
    while p <= min_len:
        p *= 2
    while p <= max_len:
        lengths.append(p)
        p *= 2
    return lengths


@dataclass
class SweepSpec:
    """Everything that defines a run; saved in meta.json so --resume can rebuild it."""

    command: str
    config: Config
    lengths: list[int]
    timeout_s: float
    memory_limit_bytes: int | None
    settings: Settings = field(default_factory=Settings)
    reuse_workers: bool = True
    plans: dict[str, Plan] = field(default_factory=dict)  # kind name -> its plan, in the command's kind order
    # memory_limit_bytes is this machine's default (85% of available), not the user's
    # --memory-limit: a Ray node computes its own instead
    memory_limit_auto: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "config": asdict(self.config), "lengths": self.lengths,
                "timeout_s": self.timeout_s, "memory_limit_bytes": self.memory_limit_bytes,
                "settings": asdict(self.settings), "reuse_workers": self.reuse_workers,
                "memory_limit_auto": self.memory_limit_auto,
                "plans": {name: asdict(plan) for name, plan in self.plans.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SweepSpec":
        """The spec saved in meta.json, also one written before kinds existed (its ppl, passkey,
        decode and ruler entries, and kernel fields in its configuration)."""
        if "plans" in d:
            command = d["command"]
            plans = {name: kinds.get(name).plan_from_json(plan) for name, plan in d["plans"].items()}
        else:
            plans = {}
            for kind in kinds.all_kinds().values():
                plan = kind.plan_from_legacy(d)
                if plan is not None:
                    plans[kind.name] = plan
            command = next((kinds.get(name).command for name in plans), "sweep")
        config = Config(**{k: v for k, v in d["config"].items() if k in CONFIG_FIELDS})
        return cls(command=command, config=config, lengths=[int(n) for n in d["lengths"]],
                   timeout_s=float(d["timeout_s"]), memory_limit_bytes=d.get("memory_limit_bytes"),
                   settings=Settings(**d.get("settings", {})), reuse_workers=d.get("reuse_workers", True),
                   plans=plans, memory_limit_auto=d.get("memory_limit_auto", False))

    def cells(self) -> list[Cell]:
        """Cells in run order: length-major, so every implementation's short lengths come first;
        at each length each kind's cells, in the command's kind order.

        Length-major ordering means an interrupted run still has a comparable picture of all
        implementations, and an implementation's out-of-memory at N is known before its 2N.
        """
        return [cell for n in self.lengths for plan in self.plans.values() for cell in plan.cells(self.config, n)]

    def all_impls(self) -> list[str]:
        """Every implementation with cells in the run, once each."""
        return list(dict.fromkeys(name for plan in self.plans.values() for name in plan.impls))
