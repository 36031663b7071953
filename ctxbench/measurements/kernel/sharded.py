"""Measurement of one cell of a distributed implementation (ring attention), on one rank.

This is the worker side of a torchrun sweep (ctxbench.engine.torchrun is the driver side, which
this module never imports): every rank's worker process calls measure_sharded_cell() for
the same cell. The workers form a process group of their own (ensure_group: gloo on CPU,
NCCL on CUDA) from the environment the driver sets (ENV_RANK, ENV_WORLD, ENV_ADDR,
ENV_PORT). Each rank holds only its shard of q, k, v (shard_bounds), the output is checked
against the float64 reference on sampled rows (each rank checks the rows it owns; errors
are summed across ranks), peak memory is read per rank, and a timed call is the slowest
rank's time between two barriers. Without those variables (a sweep without torchrun) the
worker is the only rank and holds the whole sequence.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import json
import math
import os
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from ctxbench.measurements.kernel.measure import make_inputs, peak_memory, quantiles, repeats, throughput, verdict
from ctxbench.core.cell import Cell, Settings
from ctxbench.core.reference import TOLERANCE, reference_attention, sample_rows
from ctxbench.core.registry import Impl
from ctxbench.core.shards import ENV_ADDR, ENV_PORT, ENV_RANK, ENV_WORLD, destroy_group, shard_bounds

def ensure_group(device: str) -> tuple[int, int]:
    """Join this cell's process group (once per worker); returns (rank, world size)."""
    world = int(os.environ.get(ENV_WORLD, "1"))
    if world <= 1:
        return 0, 1
    rank = int(os.environ[ENV_RANK])
    if not dist.is_initialized():
        # torchrun tells its own children to use its agent's store; this group has its own
        os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                init_method=f"tcp://{os.environ[ENV_ADDR]}:{os.environ[ENV_PORT]}",
                                rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
        atexit.register(destroy_group)
    return rank, world


def measure_sharded_cell(impl: Impl, cell: Cell, s: Settings) -> dict[str, Any]:
    """Measure one cell of a distributed implementation on this rank (all ranks call this).

    Returns the row fields on every rank (rank 0's are recorded): the slowest rank's latency
    per call (ms), peak_mem_bytes = the largest rank's peak (bytes), peak_mem_rank_bytes
    (JSON list per rank), world_size, comm_fraction (mean over ranks and timed calls of the
    time spent waiting for communication / the call's time), the error on sampled rows.
    """
    rank, world = ensure_group(cell.device)
    grouped = world > 1
    dev = torch.device(cell.device)

    def all_reduce(values: list[float], op: Any) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=dev if cell.device == "cuda" else "cpu")
        if grouped:
            dist.all_reduce(t, op=op)
        return t.tolist()

    def barrier() -> None:
        if grouped:
            dist.barrier()
        if cell.device == "cuda":
            torch.cuda.synchronize()

    lo, hi = shard_bounds(cell.n, world)[rank]
    # The same full inputs as every other implementation gets at this seed (made on the CPU,
    # then only this rank's shard moves to the device); the full K/V stay for the check only.
    q, k, v, _ = make_inputs(replace(cell, device="cpu"), s.seed, False)
    ql, kl, vl = (t[:, :, lo:hi].contiguous().to(dev) for t in (q, k, v))

    mask = cell.attention_mask  # of the global sequence; the implementation applies it to its shard

    run = impl.prepare(ql, kl, vl, mask)

    def once() -> torch.Tensor:
        with torch.no_grad():
            return run(ql, kl, vl)

    out = once()
    expected = (cell.batch, cell.heads, hi - lo, cell.head_dim)
    if tuple(out.shape) != expected:
        raise ValueError(f"{impl.name} returned {tuple(out.shape)} on rank {rank}, expected {expected}")
    # Check: the globally sampled rows this rank owns, against float64 with the full K/V.
    rows = sample_rows(cell.n, s.check_rows, torch.Generator().manual_seed(s.seed + cell.n))
    mine = rows[(rows >= lo) & (rows < hi)]
    sq_err = sq_ref = max_abs = 0.0
    if len(mine):
        ref = reference_attention(q, k, v, mask, rows=mine)
        got = out.detach()[:, :, (mine - lo).to(dev)].double().cpu()
        sq_err = float(((got - ref) ** 2).sum())
        sq_ref = float((ref ** 2).sum())
        max_abs = float((got - ref).abs().max())
    dtype_ok = out.dtype == ql.dtype
    del q, k, v, out
    gc.collect()
    sq_err, sq_ref = all_reduce([sq_err, sq_ref], dist.ReduceOp.SUM if grouped else None)
    (max_abs,) = all_reduce([max_abs], dist.ReduceOp.MAX if grouped else None)
    rel = math.sqrt(sq_err / sq_ref) if sq_ref > 0 else (0.0 if sq_err == 0 else math.inf)

    # Peak memory of one call on this rank, then every rank's.
    barrier()
    mem, mem_method, out = peak_memory(once, cell.device)
    del out
    per_rank = [int(x) for x in _gather_floats([float(mem)], world, dev, cell.device, grouped)]

    # Timing: a call is the slowest rank's time from a common start (a barrier) to its end.
    def timed() -> float:
        barrier()
        t0 = time.perf_counter()
        once()
        if cell.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) * 1e3

    warm = max(all_reduce([timed()], dist.ReduceOp.MAX if grouped else None))  # also a warm-up
    n_rep = repeats(warm, s)
    samples, comm = [], []
    for _ in range(n_rep):
        samples.append(timed())
        stats = impl.info() if impl.info is not None else {}
        comm.append(float(stats.get("comm_fraction", 0.0)))
    samples = all_reduce(samples, dist.ReduceOp.MAX if grouped else None)
    (comm_sum,) = all_reduce([sum(comm) / len(comm)], dist.ReduceOp.SUM if grouped else None)

    row: dict[str, Any] = {"peak_mem_bytes": max(per_rank), "mem_method": mem_method + " (largest rank)",
                           "peak_mem_rank_bytes": json.dumps(per_rank), "world_size": world,
                           "comm_fraction": comm_sum / world,
                           "err_rel_l2": rel, "err_max_abs": max_abs, "err_rows": len(rows),
                           "err_tolerance": TOLERANCE[cell.dtype]}
    row.update(quantiles(samples))
    row.update(throughput(cell, row["latency_ms"], s, devices=world))
    row["status"], row["message"] = verdict(rel, TOLERANCE[cell.dtype], cell.dtype, dtype_ok)
    return row


def _gather_floats(values: list[float], world: int, dev: Any, device: str, grouped: bool) -> list[float]:
    """values from every rank, rank order (one value per rank here)."""
    t = torch.tensor(values, dtype=torch.float64, device=dev if device == "cuda" else "cpu")
    if not grouped:
        return t.tolist()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts).tolist()
