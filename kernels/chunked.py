"""chunked: exact attention, blockwise over queries and keys with an online softmax.

The FlashAttention algorithm in plain PyTorch (the arithmetic lives in _blockwise.py):

    queries are cut into blocks of `block_q` rows, keys into a fixed grid of `block_k`;
    for each query block, walk the key blocks left to right keeping a running row max m,
    row sum l and output accumulator; each key block rescales the old state by
    exp(m_old - m_new) and adds its own exp(S - m_new) V.

What the grid buys under a mask:

    causal                    window W
    k ->                      k ->
    F . . .                   F . . .        F  fully visible: no masking at all
    F E . .   q               E E . .        E  straddles the mask edge: masked_fill
    F F E .   |               . E E .        .  hidden: never computed
    F F F E   v               . . E E

Key blocks the mask hides entirely are never visited, so causal does about half the work
of no mask and a window does O(N * W); only the blocks on an edge pay for masking.

Peak extra memory is one [B*Hkv, group*block_q, block_k] fp32 score tile plus fp32
copies of K and V: O(N * block), never N x N.

Block sizes are chosen for a CPU: the score tile of all heads together (one bmm call, so
MKL splits heads across cores) should stay about the size of the L2 caches, because the
softmax passes over it (max, subtract, exp2, sum) are memory-bound when it spills.
Queries are cut finer than keys: every query block pays a masked diagonal tile of about
block_q x block_q, and longer key tiles amortise the per-call Python overhead.
"""

from __future__ import annotations

import torch

from ctxbench.kernels._blockwise import MaskBias, QueryBlock, Tile, attention, sink_tiles
from ctxbench.masks import Mask
from ctxbench.registry import Runner, register

# Score-tile budget in fp32 elements for all (batch, head) pairs together: 1M elements =
# 4 MiB, the two cores' L2 caches here. Tuned on a 2-core AVX-512 CPU (see
# benchmarks/cpu_targets.py); GPUs are not the target of this kernel.
TILE_ELEMENTS = 1 << 20
BLOCK_Q = 256
BLOCK_K = 512
MIN_BLOCK = 16


def block_sizes(n: int, rows_per_block_row: int) -> tuple[int, int]:
    """(block_q, block_k) for a sequence of n tokens when each query row is repeated
    `rows_per_block_row` times in a tile (batch * query heads)."""
    block_k = BLOCK_K
    block_q = BLOCK_Q
    # Shrink the query block until the tile fits the budget (many heads, batches or GQA).
    while block_q > MIN_BLOCK and rows_per_block_row * block_q * block_k > TILE_ELEMENTS:
        block_q //= 2
    return min(block_q, n), min(block_k, n)


def plan(n: int, mask: Mask, block_q: int, block_k: int) -> list[QueryBlock]:
    """Query blocks of `block_q` rows, each with the grid key blocks (multiples of `block_k`)
    it can see at least partly, clipped to the visible key span [lo, hi); with a window and
    sinks, first the sink keys left of that span (unmasked)."""
    blocks = []
    for qs in range(0, n, block_q):
        qe = min(qs + block_q, n)
        lo, hi = mask.key_span(qs, qe, n)
        tiles = sink_tiles(lo, mask.sinks, block_k)
        for ks in range(lo - lo % block_k, hi, block_k):
            a, b = max(ks, lo), min(ks + block_k, hi)
            tiles.append(Tile(a, b, mask.needs_mask(qs, qe, a, b)))
        blocks.append(QueryBlock(qs, qe, tuple(tiles)))
    return blocks


@register("chunked", sinks=True, setup=True,
          description="blockwise online softmax (FlashAttention in PyTorch); O(N*block) memory")
def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
            window: int | None, scale: float | None = None, sinks: int = 0) -> Runner:
    """Exact attention over query blocks x key blocks; q [B, Hq, N, D], k/v [B, Hkv, N, D].

    Setup: the block plan and the edge tiles' masks, once per shape."""
    mask = Mask.of(causal, window, sinks)
    B, Hq, N, _ = q.shape
    block_q, block_k = block_sizes(N, B * Hq)
    blocks = plan(N, mask, block_q, block_k)
    bias = MaskBias.for_plan(blocks, mask, q.device)
    return lambda q, k, v: attention(q, k, v, blocks, mask=mask, scale=scale, bias=bias)
