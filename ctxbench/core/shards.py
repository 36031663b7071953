"""How a sequence is split across the ranks of a distributed implementation, and how a worker
learns which rank it is: shared by the kernel (kernels/ring_attention.py), its measurement
(ctxbench.measurements.kernel.sharded) and the driver that starts the ranks' workers
(ctxbench.engine.torchrun). torch is imported only by destroy_group."""

from __future__ import annotations


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Token ranges [start, end) of a sequence of `n` tokens split over `world` ranks.

    Contiguous and in rank order; the first n % world ranks get one token more, so shard
    lengths differ by at most one. Shards are empty when n < world.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if n < 0:
        raise ValueError(f"sequence length must be >= 0, got {n}")
    base, extra = divmod(n, world)
    bounds = []
    start = 0
    for r in range(world):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


# Environment of a worker that is one rank of a distributed cell, set by the driver: its rank,
# the world size, and the address and port its process group meets at.
ENV_RANK, ENV_WORLD, ENV_ADDR, ENV_PORT = ("CTXBENCH_DIST_RANK", "CTXBENCH_DIST_WORLD", "CTXBENCH_DIST_ADDR",
                                          "CTXBENCH_DIST_PORT")


def destroy_group() -> None:
    """Destroy this process's default process group, if any (an undestroyed gloo group can
    abort the process at exit: "terminate called ...")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
