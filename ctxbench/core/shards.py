"""How a sequence is split across the ranks of a distributed implementation: shared by the
kernel (kernels/ring_attention.py) and its measurement (ctxbench.measurements.kernel.sharded), with no imports."""

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
