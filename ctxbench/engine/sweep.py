"""The sweep: cells in order, one worker each, one CSV row each, a progress bar over all.

This is the loop between the CLI (which validates input and builds a SweepSpec) and the
worker (which measures one cell). It decides per cell whether to run it at all:
finished already (resume), not declared by the implementation (unsupported), or past a
length where the same implementation already ran out of memory or time (skipped).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctxbench.core import kinds, registry
from ctxbench.core.env import environment
from ctxbench.core.formatting import first_line, safe_name
from ctxbench.engine.executor import Executor, LocalExecutor
from ctxbench.core.cell import Cell
from ctxbench.engine.plan import SweepSpec
from ctxbench.engine.results import ResultsWriter, read_results, row_key

# Statuses after which longer lengths of the same implementation are not attempted.
STOP_STATUSES = ("oom", "timeout")


def write_meta(run_dir: str, spec: SweepSpec, run_id: str, env: dict[str, str], argv: list[str],
               changes: dict[str, Any] | None = None) -> None:
    """meta.json: the command line, the spec and the environment of a run (kept across resumes).

    The spec saved is the run's as it is now: `spec`, with what a resume added (`changes`:
    lengths, implementations, timeout, which the invocation records too) and a bandwidth probed
    once (so a later resume divides by the same figure)."""
    path = os.path.join(run_dir, "meta.json")
    meta: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            meta = json.load(f)
    meta.setdefault("run_id", run_id)
    meta.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta.setdefault("argv", argv)
    meta["spec"] = spec.to_json()
    meta["environment"] = env
    invocation: dict[str, Any] = {"argv": argv, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": sys.executable}
    if changes:
        invocation["changed"] = changes
    meta.setdefault("invocations", []).append(invocation)
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(path + ".tmp", path)


def read_meta(run_dir: str) -> dict[str, Any]:
    with open(os.path.join(run_dir, "meta.json")) as f:
        return json.load(f)


def make_executor(spec: SweepSpec, executor: str = "local", address: str | None = None) -> Executor:
    """The executor that measures cells: "local" (worker processes here; for a run holding X and
    X@<commit>, ctxbench.engine.interleave's, which interleaves their timed calls) or "ray" (tasks
    on a Ray cluster; raises ray_executor.RayMissing when ray is not installed)."""
    if executor == "ray":
        from ctxbench.engine.ray_executor import RayExecutor

        limit = None if spec.memory_limit_auto else spec.memory_limit_bytes
        return RayExecutor(address, limit, spec.config.device)
    from ctxbench.engine.interleave import InterleavedExecutor, partners

    names = spec.all_impls()
    if partners(names) and spec.reuse_workers:  # X beside X@<commit>: their timed calls interleaved
        return InterleavedExecutor(spec.memory_limit_bytes, names, reuse=spec.reuse_workers)
    return LocalExecutor(spec.memory_limit_bytes, reuse=spec.reuse_workers)


def run_sweep(spec: SweepSpec, run_dir: str, *, console: Console, argv: list[str],
              executor: Executor | None = None, changes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run (or continue) the sweep in run_dir; returns every row of the run, old and new.

    Rows are appended to run_dir/results.csv as each cell finishes; worker logs go to
    run_dir/logs/<impl>.log. executor: from make_executor (default: the local one, which
    measures one cell at a time here); it is closed at the end.
    """
    run_id = os.path.basename(os.path.normpath(run_dir))
    csv_path = os.path.join(run_dir, "results.csv")
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    header, rows = (read_results(csv_path, repair_tail=True) if os.path.exists(csv_path) else (None, []))
    done = {row_key(r) for r in rows}

    env = environment(spec.config.device)
    if spec.settings.bandwidth_gbps is None and any(kinds.get(k).uses_bandwidth for k in spec.plans):
        spec = with_bandwidth(spec, console)
    impls = {name: registry.resolve(name) for name in spec.all_impls()}
    # Keyed by (impl, kind): a model that runs out of memory says nothing about the kernel alone.
    stopped: dict[tuple[str, str], tuple[str, int]] = {}
    for r in rows:
        if r["status"] in STOP_STATUSES:
            n, key = int(r["n"]), (r["impl"], r["kind"])
            if key not in stopped or n < stopped[key][1]:
                stopped[key] = (r["status"], n)

    todo = [c for c in spec.cells() if c.key not in done]
    weights = {c: (kinds.get(c.kind).weight(c, spec.settings) if impls[c.impl].unsupported_reason(c) is None else 0.0)
               for c in todo}
    if len(todo) < len(done) + len(todo):
        console.print(f"[dim]resuming {run_id}: {len(done)} cells done, {len(todo)} to go[/]")

    # The bar advances by expected seconds, not by cells, so the ETA knows that a cell at
    # 32K costs far more than one at 1K; the cell count is shown beside it.
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[cells]}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    writer = ResultsWriter(csv_path, header)
    write_meta(run_dir, spec, run_id, env, argv, changes)
    with (executor or make_executor(spec)) as ex, Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("starting", total=sum(weights.values()) or 1.0, cells=f"0/{len(todo)} cells")
        finished = 0

        def record(cell: Cell, result: dict[str, Any]) -> None:
            nonlocal finished
            # a Ray task reports the environment of the node that measured the cell
            cell_env = result.pop("env", None) or env
            row = {"run_id": run_id, **cell.row(), **result, "impl_exact": impls[cell.impl].exact,
                   "rep_ms": spec.settings.rep_ms, "seed": spec.settings.seed,
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **cell_env}
            writer.append(row)
            rows.append({k: ("" if v is None else str(v)) for k, v in row.items()})
            if row["status"] in STOP_STATUSES and (cell.impl, cell.kind) not in stopped:
                stopped[(cell.impl, cell.kind)] = (row["status"], cell.n)
            if row["status"] == "skipped":
                # A skipped cell takes no time: take its weight out instead of completing it.
                progress.update(task, total=max(progress.tasks[0].total - weights[cell], 1e-9))
            else:
                progress.advance(task, weights[cell])
            finished += 1
            progress.update(task, cells=f"{finished}/{len(todo)} cells")

        # Cells of one (implementation, kind) chain run in length order, one at a time, so an
        # out-of-memory at N skips 2N; with the local executor (one cell in flight) this is
        # exactly the plan's length-major order.
        pending = list(todo)
        busy: set[tuple[str, str]] = set()
        while pending or ex.in_flight:
            i = 0
            while i < len(pending) and ex.in_flight < ex.capacity:
                cell = pending[i]
                if (cell.impl, cell.kind) in busy:
                    i += 1
                    continue
                pending.pop(i)
                early = _unsupported_or_skipped(cell, impls[cell.impl], stopped)
                if early is not None:
                    record(cell, early)
                    continue
                progress.update(task, description=f"{cell.label:<24}")
                ex.submit(cell, spec.settings, timeout_s=spec.timeout_s, log_path=_log_path(run_dir, cell))
                busy.add((cell.impl, cell.kind))
            if ex.in_flight:
                cell, result = ex.wait()
                busy.discard((cell.impl, cell.kind))
                if result.get("status") in ("error", "oom", "timeout"):
                    result["log"] = os.path.relpath(_log_path(run_dir, cell), run_dir)
                record(cell, result)
        progress.update(task, description="done")
    return rows


def with_bandwidth(spec: SweepSpec, console: Console) -> SweepSpec:
    """The spec with the device's memory bandwidth in its settings (ctxbench.engine.bandwidth), probed
    once per run here, with the workers' environment: in this process on the CPU (same thread
    count), in a child process on CUDA (this process keeps no CUDA context). A failed probe
    leaves bw_fraction empty and says why."""
    from dataclasses import replace

    try:
        if spec.config.device == "cuda":
            import subprocess

            done = subprocess.run([sys.executable, "-m", "ctxbench.engine.bandwidth", "cuda"], capture_output=True,
                                  text=True, timeout=120, check=True)
            found = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            from ctxbench.engine.bandwidth import probe

            found = probe("cpu")
    except Exception as exc:  # noqa: BLE001 - a missing denominator must not stop a sweep
        console.print(f"[yellow]bandwidth probe failed ({first_line(str(exc)) or type(exc).__name__}); "
                      "bw_fraction stays empty[/]")
        return spec
    console.print(f"[dim]device bandwidth: {found['bandwidth_gbps']:.1f} GB/s ({found['bandwidth_source']})[/]")
    return replace(spec, settings=replace(spec.settings, **found))


def _log_path(run_dir: str, cell: Cell) -> str:
    return os.path.join(run_dir, "logs", safe_name(cell.impl) + ".log")


def _unsupported_or_skipped(cell: Cell, impl: registry.Impl,
                            stopped: dict[tuple[str, str], tuple[str, int]]) -> dict[str, Any] | None:
    """The row of a cell that is not measured (not declared, or past an oom/timeout), else None."""
    reason = impl.unsupported_reason(cell)
    if reason is not None:
        return {"status": "unsupported", "message": reason}
    key = (cell.impl, cell.kind)
    if key in stopped and stopped[key][1] < cell.n:
        status, n = stopped[key]
        what = "ran out of memory" if status == "oom" else "timed out"
        return {"status": "skipped", "message": f"not attempted: {cell.impl} ({cell.kind} cells) {what} at N={n}"}
    return None


def describe(spec: SweepSpec) -> list[str]:
    """The lines that say what a run measures, printed when it starts: each kind of its command
    says what it measures (or that it has nothing to, and why)."""
    return [line for kind in kinds.kinds_of(spec.command) for line in kind.describe(spec.plans.get(kind.name), spec)]
