"""The sweep: cells in order, one worker each, one CSV row each, a progress bar over all.

This is the loop between the CLI (which validates input and builds a SweepSpec) and the
worker (which measures one cell). It decides per cell whether to run it at all:
finished already (resume), not declared by the implementation (unsupported), or past a
length where the same implementation already ran out of memory or time (skipped).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctxbench import registry
from ctxbench.env import environment
from ctxbench.executor import WorkerPool
from ctxbench.flops import attention_flops
from ctxbench.measure import Settings
from ctxbench.plan import Cell, Config, build_cells
from ctxbench.results import ResultsWriter, read_results, row_key
from ctxbench.summary import pivot_table

# Statuses after which longer lengths of the same implementation are not attempted.
STOP_STATUSES = ("oom", "timeout")
# Rough throughput for progress weights only (FLOP/s); the ETA adapts to measured speed.
_ROUGH_RATE = {"cpu": 5e10, "cuda": 2e14}
_WORKER_START_S = 2.0


@dataclass
class SweepSpec:
    """Everything that defines a sweep; saved in meta.json so --resume can rebuild it."""

    config: Config
    impls: list[str]
    lengths: list[int]
    timeout_s: float
    memory_limit_bytes: int | None
    settings: Settings = field(default_factory=Settings)
    reuse_workers: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "impls": self.impls, "lengths": self.lengths,
                "timeout_s": self.timeout_s, "memory_limit_bytes": self.memory_limit_bytes,
                "settings": asdict(self.settings), "reuse_workers": self.reuse_workers}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SweepSpec":
        return cls(config=Config(**d["config"]), impls=list(d["impls"]), lengths=[int(n) for n in d["lengths"]],
                   timeout_s=float(d["timeout_s"]), memory_limit_bytes=d.get("memory_limit_bytes"),
                   settings=Settings(**d.get("settings", {})), reuse_workers=d.get("reuse_workers", True))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "impl"


def _weight(cell: Cell, settings: Settings) -> float:
    """Expected seconds for a cell, for the progress bar's ETA (a cell at 32K costs far more than at 1K)."""
    flops = attention_flops(cell.batch, cell.heads, cell.n, cell.head_dim, cell.causal, cell.attn_window, cell.mode)
    return _WORKER_START_S + settings.rep_ms / 1e3 + 5 * flops / _ROUGH_RATE.get(cell.device, 5e10)


def write_meta(run_dir: str, spec: SweepSpec, run_id: str, env: dict[str, str], argv: list[str]) -> None:
    """meta.json: the command line, the spec and the environment of a run (kept across resumes)."""
    path = os.path.join(run_dir, "meta.json")
    meta: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            meta = json.load(f)
    meta.setdefault("run_id", run_id)
    meta.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta.setdefault("argv", argv)
    meta.setdefault("spec", spec.to_json())
    meta["environment"] = env
    meta.setdefault("invocations", []).append({"argv": argv, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                               "python": sys.executable})
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(path + ".tmp", path)


def read_meta(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "meta.json")) as f:
        return json.load(f)


def run_sweep(spec: SweepSpec, run_dir: str, *, console: Console, argv: list[str]) -> list[dict[str, Any]]:
    """Run (or continue) the sweep in run_dir; returns every row of the run, old and new.

    Rows are appended to run_dir/results.csv as each cell finishes; worker logs go to
    run_dir/logs/<impl>.log.
    """
    run_id = os.path.basename(os.path.normpath(run_dir))
    csv_path = os.path.join(run_dir, "results.csv")
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    header, rows = (read_results(csv_path, repair_tail=True) if os.path.exists(csv_path) else (None, []))
    writer = ResultsWriter(csv_path, header)
    done = {row_key(r) for r in rows}

    env = environment(spec.config.device)
    write_meta(run_dir, spec, run_id, env, argv)
    impls = {name: registry.resolve(name) for name in spec.impls}
    stopped: dict[str, tuple[str, int]] = {}
    for r in rows:
        if r["status"] in STOP_STATUSES:
            n = int(r["n"])
            if r["impl"] not in stopped or n < stopped[r["impl"]][1]:
                stopped[r["impl"]] = (r["status"], n)

    todo = [c for c in build_cells(spec.config, spec.impls, spec.lengths) if c.key not in done]
    weights = {c: (_weight(c, spec.settings) if impls[c.impl].unsupported_reason(c) is None else 0.0)
               for c in todo}
    if len(todo) < len(done) + len(todo):
        console.print(f"[dim]resuming {run_id}: {len(done)} cells done, {len(todo)} to go[/]")

    # The bar advances by expected seconds, not by cells, so the ETA knows that a cell at
    # 32K costs far more than one at 1K; the cell count is shown beside it.
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[cells]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with WorkerPool(spec.memory_limit_bytes, reuse=spec.reuse_workers) as pool, \
            Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=sum(weights.values()) or 1.0, cells=f"0/{len(todo)} cells")
        for i, cell in enumerate(todo):
            progress.update(task, description=f"{cell.label:<24}")
            result = _run_or_skip(cell, impls[cell.impl], spec, stopped, run_dir, pool)
            row = {"run_id": run_id, **asdict(cell), **result, "impl_exact": impls[cell.impl].exact,
                   "rep_ms": spec.settings.rep_ms, "seed": spec.settings.seed,
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **env}
            writer.append(row)
            rows.append({k: ("" if v is None else str(v)) for k, v in row.items()})
            if row["status"] in STOP_STATUSES and cell.impl not in stopped:
                stopped[cell.impl] = (row["status"], cell.n)
            if row["status"] == "skipped":
                # A skipped cell takes no time: take its weight out instead of completing it.
                progress.update(task, total=max(progress.tasks[0].total - weights[cell], 1e-9))
            else:
                progress.advance(task, weights[cell])
            progress.update(task, cells=f"{i + 1}/{len(todo)} cells")
        progress.update(task, description="done")
    return rows


def _run_or_skip(cell: Cell, impl: registry.Impl, spec: SweepSpec, stopped: dict[str, tuple[str, int]],
                 run_dir: str, pool: WorkerPool) -> dict[str, Any]:
    reason = impl.unsupported_reason(cell)
    if reason is not None:
        return {"status": "unsupported", "message": reason}
    if cell.impl in stopped and stopped[cell.impl][1] < cell.n:
        status, n = stopped[cell.impl]
        what = "ran out of memory" if status == "oom" else "timed out"
        return {"status": "skipped", "message": f"not attempted: {cell.impl} {what} at N={n}"}
    log_path = os.path.join(run_dir, "logs", _safe(cell.impl) + ".log")
    result = pool.run_cell(cell, spec.settings, timeout_s=spec.timeout_s, log_path=log_path)
    if result.get("status") in ("error", "oom", "timeout"):
        result["log"] = os.path.relpath(log_path, run_dir)
    return result


def print_summary(rows: list[dict[str, Any]], run_dir: str, console: Console) -> None:
    """The pivot table and where the files are."""
    if rows:
        console.print(pivot_table(rows, title="latency (median) / peak memory, or status"))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    console.print(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no cells")
    console.print(f"results: {os.path.join(run_dir, 'results.csv')}")
