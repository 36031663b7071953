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
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ctxbench.core import registry
from ctxbench.core.env import environment
from ctxbench.engine.executor import Executor, LocalExecutor
from ctxbench.core.flops import attention_bytes, attention_flops
from ctxbench.core.formatting import first_line, safe_name
from ctxbench.engine.plan import RULER_TASKS, Cell, Settings, SweepSpec
from ctxbench.engine.results import ResultsWriter, read_results, row_key

# Statuses after which longer lengths of the same implementation are not attempted.
STOP_STATUSES = ("oom", "timeout")
# Rough throughput for progress weights only (FLOP/s); the ETA adapts to measured speed.
_ROUGH_RATE = {"cpu": 5e10, "cuda": 2e14}
_ROUGH_BYTES_PER_S = {"cpu": 5e9, "cuda": 2e12}
_WORKER_START_S = 2.0


# Rough language-model throughput (tokens/s through the default model) for perplexity ETAs.
_ROUGH_LM_TOKENS_PER_S = {"cpu": 300.0, "cuda": 30000.0}


def _weight(cell: Cell, settings: Settings) -> float:
    """Expected seconds for a cell, for the progress bar's ETA (a cell at 32K costs far more than at 1K)."""
    if cell.task == "perplexity":
        scored = cell.n if cell.ppl_scheme == "truncated" else min(settings.ppl_stride, cell.n)
        windows = max(1, -(-settings.ppl_tokens // scored))
        return _WORKER_START_S + windows * cell.n / _ROUGH_LM_TOKENS_PER_S.get(cell.device, 300.0)
    if cell.task == "decode":  # a prefill and greedy steps, twice (the sdpa reference)
        return 2 * (cell.n / _ROUGH_LM_TOKENS_PER_S.get(cell.device, 300.0) + settings.decode_tokens * 0.1)
    if cell.task == "passkey":  # one forward pass of n tokens; the model stays loaded between trials
        return 0.1 + cell.n / _ROUGH_LM_TOKENS_PER_S.get(cell.device, 300.0)
    if cell.task in RULER_TASKS:
        # a prompt's prefill is shared by its (policy, budget) cells (about ten by default), then
        # a compression and, for retrieval, a few dozen decode steps
        prefill = cell.n / _ROUGH_LM_TOKENS_PER_S.get(cell.device, 300.0)
        steps = 20 if cell.task == "retrieval" else 2
        return 0.2 + prefill / 10 + steps * (0.1 if cell.device == "cpu" else 0.01)
    mask = cell.attention_mask
    flops = attention_flops(cell.batch, cell.heads, cell.q_len, cell.head_dim, mask, cell.mode, n_k=cell.n)
    moved = attention_bytes(cell.batch, cell.heads, cell.kv_heads, cell.q_len, cell.n, cell.head_dim, mask,
                            cell.dtype)
    # decode is bound by bytes, prefill by FLOPs; making the inputs costs about as much again
    seconds = max(flops / _ROUGH_RATE.get(cell.device, 5e10), moved / _ROUGH_BYTES_PER_S.get(cell.device, 5e9))
    return _WORKER_START_S + settings.rep_ms / 1e3 + 5 * seconds


def write_meta(run_dir: str, spec: SweepSpec, run_id: str, env: dict[str, str], argv: list[str],
               changes: dict[str, Any] | None = None) -> None:
    """meta.json: the command line, the spec and the environment of a run (kept across resumes).

    `changes`: what a resume added (lengths, implementations, timeout); the saved spec becomes
    `spec` and the invocation records them."""
    path = os.path.join(run_dir, "meta.json")
    meta: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            meta = json.load(f)
    meta.setdefault("run_id", run_id)
    meta.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    meta.setdefault("argv", argv)
    meta.setdefault("spec", spec.to_json())
    if changes:
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
    """The executor that measures cells: "local" (worker processes here) or "ray" (tasks on a
    Ray cluster; raises ray_executor.RayMissing when ray is not installed)."""
    if executor == "ray":
        from ctxbench.engine.ray_executor import RayExecutor

        limit = None if spec.memory_limit_auto else spec.memory_limit_bytes
        return RayExecutor(address, limit, spec.config.device)
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
    if spec.impls and spec.settings.bandwidth_gbps is None:
        spec = with_bandwidth(spec, console)
    impls = {name: registry.resolve(name) for name in spec.all_impls()}
    # Keyed by (impl, task): a model that runs out of memory says nothing about the kernel alone.
    stopped: dict[tuple[str, str], tuple[str, int]] = {}
    for r in rows:
        if r["status"] in STOP_STATUSES:
            n, key = int(r["n"]), (r["impl"], r.get("task") or "kernel")
            if key not in stopped or n < stopped[key][1]:
                stopped[key] = (r["status"], n)

    todo = [c for c in spec.cells() if c.key not in done]
    weights = {c: (_weight(c, spec.settings) if impls[c.impl].unsupported_reason(c) is None else 0.0)
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
            row = {"run_id": run_id, **asdict(cell), **result, "impl_exact": impls[cell.impl].exact,
                   "rep_ms": spec.settings.rep_ms, "seed": spec.settings.seed,
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **cell_env}
            writer.append(row)
            rows.append({k: ("" if v is None else str(v)) for k, v in row.items()})
            if row["status"] in STOP_STATUSES and (cell.impl, cell.task) not in stopped:
                stopped[(cell.impl, cell.task)] = (row["status"], cell.n)
            if row["status"] == "skipped":
                # A skipped cell takes no time: take its weight out instead of completing it.
                progress.update(task, total=max(progress.tasks[0].total - weights[cell], 1e-9))
            else:
                progress.advance(task, weights[cell])
            finished += 1
            progress.update(task, cells=f"{finished}/{len(todo)} cells")

        # Cells of one (implementation, task) chain run in length order, one at a time, so an
        # out-of-memory at N skips 2N; with the local executor (one cell in flight) this is
        # exactly the plan's length-major order.
        pending = list(todo)
        busy: set[tuple[str, str]] = set()
        while pending or ex.in_flight:
            i = 0
            while i < len(pending) and ex.in_flight < ex.capacity:
                cell = pending[i]
                if (cell.impl, cell.task) in busy:
                    i += 1
                    continue
                pending.pop(i)
                early = _unsupported_or_skipped(cell, impls[cell.impl], stopped)
                if early is not None:
                    record(cell, early)
                    continue
                progress.update(task, description=f"{cell.label:<24}")
                ex.submit(cell, spec.settings, timeout_s=spec.timeout_s, log_path=_log_path(run_dir, cell))
                busy.add((cell.impl, cell.task))
            if ex.in_flight:
                cell, result = ex.wait()
                busy.discard((cell.impl, cell.task))
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
    key = (cell.impl, cell.task)
    if key in stopped and stopped[key][1] < cell.n:
        status, n = stopped[key]
        what = "ran out of memory" if status == "oom" else "timed out"
        task = "" if cell.task == "kernel" else f" ({cell.task})"
        return {"status": "skipped", "message": f"not attempted: {cell.impl}{task} {what} at N={n}"}
    return None


def describe(spec: SweepSpec) -> list[str]:
    """The lines that say what a run measures, printed when it starts."""
    c, s = spec.config, spec.settings
    lines = []
    shape = (f"{c.device} {c.dtype} B={c.batch} Hq={c.heads} Hkv={c.kv_heads} D={c.head_dim} "
             f"{f'Lq={c.query_len} ' if c.query_len is not None else ''}"
             f"mask={c.mask}{f' W={c.window}' if c.mask == 'window' else ''}"
             f"{f' sinks={c.sinks}' if c.attn_sinks else ''} mode={c.mode}")
    if spec.impls:
        lines.append(f"[bold]ctxbench sweep[/] {shape}; impls: {', '.join(spec.impls)}; "
                     f"N: {', '.join(map(str, spec.lengths))}")
    p = spec.ppl
    if spec.passkey is None and spec.ruler is None:
        if p is None:
            lines.append("perplexity: none (--ppl-max-len 0, --mask none, or no length within --ppl-max-len)")
        else:
            ns = [n for n in spec.lengths if n <= p.max_len]
            scheme = c.ppl_scheme + (f" (last {s.ppl_stride} of each window)" if c.ppl_scheme == "strided" else "")
            lines.append(f"perplexity: {s.model or 'default model (SmolLM2-135M-Instruct)'}, corpus "
                         f"{s.text or 'pydoc_data.topics'}, N: {', '.join(map(str, ns))}; {s.ppl_tokens} tokens per "
                         f"cell, {scheme} windows, {p.dtype}; rope: {', '.join(p.ropes)}; impls: {', '.join(p.impls)}")
        d = spec.decode
        if d is not None:
            ns = [n for n in spec.lengths if n <= d.max_len]
            lines.append(f"decode: {s.model or 'default model (SmolLM2-135M-Instruct)'}, a prefill of N tokens of "
                         f"{s.text or 'pydoc_data.topics'} then {s.decode_tokens} greedy tokens with a KV cache, "
                         f"{d.dtype}; N: {', '.join(map(str, ns))}; impls: {', '.join(d.impls)}")
    elif spec.ruler is not None:
        r = spec.ruler
        cont = (f"; continuation: {s.continuation_tokens} tokens scored" if r.continuation
                else "; no continuation cells")
        lines.append(f"[bold]ctxbench ruler[/] {c.device} {r.dtype} model {s.model or 'default (SmolLM2-135M-Instruct)'}; "
                     f"impls: {', '.join(r.impls)}; N: {', '.join(map(str, spec.lengths))}; tasks: "
                     f"{', '.join(r.tasks)}; depths: {', '.join(f'{d:g}' for d in r.depths)}; {r.trials} prompt(s) "
                     f"each; haystack: {s.haystack}{cont}")
        lines.append(f"KV-cache policies: {', '.join(r.policies)}; budgets: {', '.join(r.budgets)} "
                     "(tokens, or a ratio of N; the full cache once)")
    else:
        k = spec.passkey
        lines.append(f"[bold]ctxbench passkey[/] {c.device} {k.dtype} mask={c.mask}"
                     f"{f' W={c.window}' if c.mask == 'window' else ''}{f' sinks={c.sinks}' if c.attn_sinks else ''}; "
                     f"model {s.model or 'default (SmolLM2-135M-Instruct)'}; impls: {', '.join(k.impls)}; "
                     f"rope: {', '.join(k.ropes)}; N: {', '.join(map(str, spec.lengths))}; "
                     f"depths: {', '.join(f'{d:g}' for d in k.depths)}; {k.trials} key(s) each")
    return lines
