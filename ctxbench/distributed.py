"""Sweeps of distributed implementations (ring attention) across the ranks of torchrun.

    torchrun --nproc-per-node 2 -m ctxbench sweep --impls ring --max-len 65536

Every rank runs `ctxbench sweep`. Rank 0 leads: it plans the cells, writes results.csv and
shows progress; the other ranks follow (follow() below). For each cell the leader sends the
cell to every follower; every rank measures it in a fresh worker process of its own (the
local executor's isolation), and those workers form a process group of their own (gloo on
CPU, NCCL on CUDA) on a port the leader picks per cell, so a worker that crashed or hung
leaves no broken group behind. The leader's worker gathers what every rank measured, and the
leader's driver records one row; a failure on any rank is the cell's status.

measure_distributed_cell() is the worker side: each rank holds only its shard of q, k, v
(shard_bounds), the output is checked against the float64 reference on sampled rows (each
rank checks the rows it owns; errors are summed across ranks), peak memory is read per rank,
and a timed call is the slowest rank's time between two barriers.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import time
from dataclasses import asdict, replace
from typing import Any

from ctxbench.plan import Settings
from ctxbench.plan import Cell

# Environment of a worker that is one rank of a distributed cell (set by the driver).
ENV_RANK, ENV_WORLD, ENV_ADDR, ENV_PORT = ("CTXBENCH_DIST_RANK", "CTXBENCH_DIST_WORLD", "CTXBENCH_DIST_ADDR",
                                          "CTXBENCH_DIST_PORT")
# Workers' process groups use ports above torchrun's MASTER_PORT, a new one per cell.
PORT_SPAN = 1000


def torchrun_world() -> tuple[int, int, int]:
    """(rank, world size, local world size) of this process under torchrun; (0, 1, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 1
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))


def init_driver_group() -> None:
    """The drivers' own gloo group on torchrun's store (cells, statuses and stop signals)."""
    import atexit

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
        atexit.register(_destroy)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _worker_env(cell_index: int) -> None:
    """Tell the next worker which rank it is and where its group meets."""
    rank, world, _ = torchrun_world()
    os.environ[ENV_RANK] = str(rank)
    os.environ[ENV_WORLD] = str(world)
    os.environ[ENV_ADDR] = os.environ.get("MASTER_ADDR", "127.0.0.1")
    os.environ[ENV_PORT] = str(int(os.environ.get("MASTER_PORT", "29500")) + 1 + cell_index % PORT_SPAN)


_FAILURE_ORDER = ("oom", "timeout", "error", "wrong", "unsupported")


def merge_statuses(leader: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """The leader's result, unless another rank failed: then that failure (oom first)."""
    worst = leader
    for rank, res in enumerate(others, start=1):
        status = res.get("status")
        if status in _FAILURE_ORDER and (worst.get("status") not in _FAILURE_ORDER
                                         or _FAILURE_ORDER.index(status) < _FAILURE_ORDER.index(worst["status"])):
            worst = {**leader, "status": status, "message": f"rank {rank}: {res.get('message', '')}"}
    return worst


class DistributedExecutor:
    """The leader's executor under torchrun: each cell on every rank, one fresh worker each."""

    name = "torchrun"
    capacity = 1

    def __init__(self, memory_limit_bytes: int | None) -> None:
        from ctxbench.executor import WorkerPool

        init_driver_group()
        self.pool = WorkerPool(memory_limit_bytes, reuse=False)
        self._done: list[tuple[Cell, dict[str, Any]]] = []
        self._count = 0

    @property
    def in_flight(self) -> int:
        return len(self._done)

    def submit(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str) -> None:
        import torch.distributed as dist

        index = self._count
        self._count += 1
        dist.broadcast_object_list([("cell", asdict(cell), asdict(settings), timeout_s, index)], src=0)
        _worker_env(index)
        result = self.pool.run_cell(cell, settings, timeout_s=timeout_s, log_path=log_path)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.gather_object(result, gathered, dst=0)
        self._done.append((cell, merge_statuses(result, gathered[1:])))

    def wait(self) -> tuple[Cell, dict[str, Any]]:
        return self._done.pop(0)

    def close(self) -> None:
        import torch.distributed as dist

        self.pool.close()
        if dist.is_initialized():
            dist.broadcast_object_list([("stop",)], src=0)
            # an undestroyed gloo group can abort the process at exit ("terminate called ...")
            dist.destroy_process_group()

    def __enter__(self) -> "DistributedExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow(memory_limit_bytes: int | None, log_dir: str) -> None:
    """A follower rank's driver: measure what the leader sends until it says stop."""
    import torch.distributed as dist

    from ctxbench.executor import WorkerPool
    from ctxbench.formatting import safe_name

    init_driver_group()
    os.makedirs(log_dir, exist_ok=True)
    rank = dist.get_rank()
    with WorkerPool(memory_limit_bytes, reuse=False) as pool:
        while True:
            msg: list[Any] = [None]
            dist.broadcast_object_list(msg, src=0)
            if msg[0][0] == "stop":
                dist.destroy_process_group()
                return
            _, cell_json, settings_json, timeout_s, index = msg[0]
            cell = Cell(**cell_json)
            _worker_env(index)
            log_path = os.path.join(log_dir, f"{safe_name(cell.impl)}.rank{rank}.log")  # beside rank 0's
            result = pool.run_cell(cell, Settings(**settings_json), timeout_s=timeout_s, log_path=log_path)
            dist.gather_object(result, None, dst=0)


# ---------------------------------------------------------------- the worker side

def ensure_group(device: str) -> tuple[int, int]:
    """Join this cell's process group (once per worker); returns (rank, world size)."""
    import torch
    import torch.distributed as dist

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
        import atexit

        atexit.register(_destroy)
    return rank, world


def measure_distributed_cell(impl: Any, cell: Cell, s: Settings) -> dict[str, Any]:
    """Measure one cell of a distributed implementation on this rank (all ranks call this).

    Returns the row fields on every rank (rank 0's are recorded): the slowest rank's latency
    per call (ms), peak_mem_bytes = the largest rank's peak (bytes), peak_mem_rank_bytes
    (JSON list per rank), world_size, comm_fraction (mean over ranks and timed calls of the
    time spent waiting for communication / the call's time), the error on sampled rows.
    """
    import torch
    import torch.distributed as dist

    from ctxbench.kernels.ring_attention import shard_bounds
    from ctxbench.measure import _quantiles, _repeats, make_inputs, peak_memory, throughput
    from ctxbench.reference import TOLERANCE, reference_attention, sample_rows

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

    def once() -> torch.Tensor:
        with torch.no_grad():
            return impl.fn(ql, kl, vl, causal=cell.causal, window=cell.attn_window, scale=None)

    out = once()
    expected = (cell.batch, cell.heads, hi - lo, cell.head_dim)
    if tuple(out.shape) != expected:
        raise ValueError(f"{impl.name} returned {tuple(out.shape)} on rank {rank}, expected {expected}")
    # Check: the globally sampled rows this rank owns, against float64 with the full K/V.
    rows = sample_rows(cell.n, s.check_rows, torch.Generator().manual_seed(s.seed + cell.n))
    mine = rows[(rows >= lo) & (rows < hi)]
    sq_err = sq_ref = max_abs = 0.0
    if len(mine):
        ref = reference_attention(q, k, v, causal=cell.causal, window=cell.attn_window, rows=mine)
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
    n_rep = _repeats(warm, s)
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
    row.update(_quantiles(samples))
    row.update(throughput(cell, row["latency_ms"], devices=world))
    problems = []
    if not rel <= TOLERANCE[cell.dtype]:
        problems.append(f"relative L2 error {rel:.3g} over the {cell.dtype} tolerance {TOLERANCE[cell.dtype]:g}")
    if not dtype_ok:
        problems.append(f"output dtype differs from the input's {cell.dtype}")
    row["status"] = "wrong" if problems else "ok"
    row["message"] = "; ".join(problems)
    return row


def _gather_floats(values: list[float], world: int, dev: Any, device: str, grouped: bool) -> list[float]:
    """values from every rank, rank order (one value per rank here)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dev if device == "cuda" else "cpu")
    if not grouped:
        return t.tolist()
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t)
    return torch.cat(parts).tolist()
