"""Sweeps of distributed implementations (ring attention) across the ranks of torchrun: the driver side.

    torchrun --nproc-per-node 2 -m ctxbench sweep --impls ring --max-len 65536

Every rank runs `ctxbench sweep`, and the drivers (one per rank) form a gloo group of their
own on torchrun's store. Rank 0 leads: it validates the command line, plans the cells, writes
results.csv and shows progress; the other ranks follow. The CLI's handshake:

    if follow_if_follower():       # rank != 0: waits for rank 0's run, measures it, returns True
        return
    ...validate, make the executor (DistributedExecutor); on failure: release_followers()
    start_followers(run_dir, memory_limit_bytes)

For each cell the leader sends the cell to every follower; every rank measures it in a fresh
worker process of its own (the local executor's isolation), and those workers form a process
group of their own (ctxbench.measurements.kernel.sharded, which measures; gloo on CPU, NCCL on CUDA) on a port
the leader picks per cell, so a worker that crashed or hung leaves no broken group behind.
The leader's worker gathers what every rank measured, and the leader's driver records one
row; a failure on any rank is the cell's status (merge_statuses).
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import asdict
from typing import Any

from ctxbench.engine.executor import LocalExecutor, WorkerPool
from ctxbench.core.formatting import safe_name
from ctxbench.core import kinds
from ctxbench.core.cell import Cell, Settings
from ctxbench.core.shards import ENV_ADDR, ENV_PORT, ENV_RANK, ENV_WORLD, destroy_group

# Workers' process groups use ports above torchrun's MASTER_PORT, a new one per cell.
PORT_SPAN = 1000


def world() -> tuple[int, int, int]:
    """(rank, world size, local world size) of this process under torchrun; (0, 1, 1) otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1, 1
    return int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))


def init_driver_group() -> None:
    """Join the drivers' own gloo group on torchrun's store (cells, statuses and stop signals),
    once per process; every rank's driver must call it."""
    import atexit

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
        atexit.register(destroy_group)


def follow_if_follower() -> bool:
    """The handshake's first step, on every rank before the command line is validated.

    Without torchrun: False. Under torchrun every rank joins the drivers' group; rank 0 then
    returns False (it validates and leads). Any other rank waits for rank 0's run, measures
    its cells until rank 0 says stop and returns True; if rank 0 refused the input
    (release_followers) it exits with status 2, rank 0 having said why.
    """
    rank, size, _ = world()
    if size <= 1:
        return False
    init_driver_group()
    if rank == 0:
        return False
    import torch.distributed as dist

    msg: list[Any] = [None]
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is None:
        _leave_together()
        sys.exit(2)  # rank 0 printed why
    run_dir, memory_limit_bytes = msg[0]
    _follow(memory_limit_bytes, os.path.join(run_dir, "logs"))
    return True


def release_followers() -> None:
    """Rank 0, when the sweep won't start (bad input): tell the followers there is no run, so
    they exit with status 2. Does nothing without torchrun."""
    if world()[1] <= 1:
        return
    import torch.distributed as dist

    init_driver_group()
    dist.broadcast_object_list([None], src=0)
    _leave_together()


def _leave_together() -> None:
    """Every rank, when there is no run: wait for the others, then take the group down before
    exiting. A rank that exits while its peer's gloo pair still reads from it can abort that peer
    at exit (SIGABRT instead of status 2: seen once in a fresh clone's CI run)."""
    import torch.distributed as dist

    dist.barrier()
    destroy_group()


def start_followers(run_dir: str, memory_limit_bytes: int | None) -> None:
    """Rank 0, once the run is set up: send the followers the run folder (their worker logs go
    to run_dir/logs) and the per-rank memory cap (bytes) of their workers. Does nothing
    without torchrun."""
    if world()[1] <= 1:
        return
    import torch.distributed as dist

    init_driver_group()
    dist.broadcast_object_list([(run_dir, memory_limit_bytes)], src=0)


def _worker_env(cell_index: int) -> None:
    """Tell the next worker which rank it is and where its group meets (see ctxbench.measurements.kernel.sharded)."""
    rank, size, _ = world()
    os.environ[ENV_RANK] = str(rank)
    os.environ[ENV_WORLD] = str(size)
    os.environ[ENV_ADDR] = os.environ.get("MASTER_ADDR", "127.0.0.1")
    os.environ[ENV_PORT] = str(int(os.environ.get("MASTER_PORT", "29500")) + 1 + cell_index % PORT_SPAN)


_FAILURE_ORDER = ("oom", "timeout", "error", "wrong", "unsupported")


def merge_statuses(leader: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """The leader's result, unless another rank failed: then that failure (oom first), with
    "rank R: " before that rank's message. others: ranks 1, 2, ... in order."""
    worst = leader
    for rank, res in enumerate(others, start=1):
        status = res.get("status")
        if status in _FAILURE_ORDER and (worst.get("status") not in _FAILURE_ORDER
                                         or _FAILURE_ORDER.index(status) < _FAILURE_ORDER.index(worst["status"])):
            worst = {**leader, "status": status, "message": f"rank {rank}: {res.get('message', '')}"}
    return worst


class DistributedExecutor(LocalExecutor):
    """The leader's executor under torchrun (an executor.Executor): the local executor with a
    fresh worker per cell, where measuring a cell first sends it to every rank, and the row is
    every rank's results merged (merge_statuses)."""

    name = "torchrun"

    def __init__(self, memory_limit_bytes: int | None) -> None:
        init_driver_group()
        super().__init__(memory_limit_bytes, reuse=False)
        self._count = 0

    def run_cell(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str) -> dict[str, Any]:
        import torch.distributed as dist

        index = self._count
        self._count += 1
        dist.broadcast_object_list([("cell", cell.to_json(), asdict(settings), timeout_s, index,
                                     kinds.origin(cell.kind))], src=0)
        _worker_env(index)
        result = super().run_cell(cell, settings, timeout_s=timeout_s, log_path=log_path)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.gather_object(result, gathered, dst=0)
        return merge_statuses(result, gathered[1:])

    def close(self) -> None:
        import torch.distributed as dist

        super().close()
        if dist.is_initialized():
            dist.broadcast_object_list([("stop",)], src=0)
            # an undestroyed gloo group can abort the process at exit ("terminate called ...")
            dist.destroy_process_group()


def _follow(memory_limit_bytes: int | None, log_dir: str) -> None:
    """A follower rank's driver: measure what the leader sends until it says stop."""
    import torch.distributed as dist

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
            _, cell_json, settings_json, timeout_s, index, kind_origin = msg[0]
            cell = Cell.from_job(cell_json, kind_origin)
            _worker_env(index)
            log_path = os.path.join(log_dir, f"{safe_name(cell.impl)}.rank{rank}.log")  # beside rank 0's
            result = pool.run_cell(cell, Settings(**settings_json), timeout_s=timeout_s, log_path=log_path)
            dist.gather_object(result, None, dst=0)
