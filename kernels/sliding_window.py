"""sliding_window: exact windowed attention that only computes the band, O(N * W).

With a window W, query i sees keys (i - W, i]. A block of queries [qs, qe) therefore sees
the band of keys [qs - W + 1, qe), W + block_q - 1 keys whatever N is. This kernel walks
only that band, with the same online softmax as chunked (the arithmetic is shared in
_blockwise.py), so time and memory are O(N * (W + block_q)) = O(N * W), not O(N^2).

Unlike chunked, whose key blocks sit on a fixed grid, the tiles here are anchored to the
band of each query block and cut where the mask changes, so only the two triangles at the
band's edges are masked and nothing outside the band is ever multiplied:

    keys ->   qs-W        qe-W              qs           qe
              |  left edge  |  fully visible  |  diagonal  |
              |  (masked)   | (block_k tiles) |  (masked)  |

Each edge is block_q keys wide and about half hidden, so the wasted work is about block_q / W
of the useful work; block_q follows W (never above it, for W >= MIN_BLOCK_Q) to keep that
small, and shrinks further when many heads share a tile, as in chunked.

Attention sinks (StreamingLLM): with sinks=S the first S keys stay visible to every query
beside its window. Each query block then also reads the sink keys left of its band,
[0, min(S, qs - W)), as unmasked tiles (every query of the block is past them), so the
work is O(N * (W + S)).
"""

from __future__ import annotations

import torch

from ctxbench.kernels._blockwise import MaskBias, QueryBlock, Tile, attention, sink_tiles
from ctxbench.core.masks import Mask
from ctxbench.registry import Runner, register

# fp32 elements of one score tile for all (batch, head) pairs: 4 MiB, the L2 caches of the
# CPU this was tuned on (as in chunked).
TILE_ELEMENTS = 1 << 20
BLOCK_K = 512
MAX_BLOCK_Q = 128
# Below this the per-block Python overhead dominates: a window of 1 or 3 still gets
# 16-row blocks, so the work is O(N * (W + 16)).
MIN_BLOCK_Q = 16


def block_sizes(n: int, window: int, rows_per_block_row: int) -> tuple[int, int]:
    """(block_q, block_k) for n tokens, window W, and `rows_per_block_row` = batch * query heads."""
    block_q = MIN_BLOCK_Q
    while (block_q * 2 <= min(window, MAX_BLOCK_Q)
           and rows_per_block_row * block_q * 2 * BLOCK_K <= TILE_ELEMENTS):
        block_q *= 2
    return min(block_q, n), BLOCK_K


def plan(n: int, mask: Mask, block_q: int, block_k: int, n_k: int | None = None) -> list[QueryBlock]:
    """For each block of the n query rows, the band of the n_k keys (default n) it can see
    under the window `mask`, cut at the mask edges and into tiles of at most block_k keys; with
    sinks, first the sink keys left of the band. Queries sit at positions mask.q_offset + row
    (the last n of n_k tokens), so a decode block reads only the last W keys."""
    window, off = mask.window, mask.q_offset
    blocks = []
    for qs in range(0, n, block_q):
        qe = min(qs + block_q, n)
        ps, pe = qs + off, qe + off  # the block's query positions [ps, pe)
        # Edges of block_q keys, not block_q - 1: the left edge starts one key early (at
        # ps - W, hidden from every query of the block) and the diagonal tile includes key
        # ps. One wasted column per row keeps tile widths multiples of block_q, which MKL
        # multiplies markedly faster than odd widths such as 127.
        left = max(0, ps - window)
        full_lo = min(max(left, pe - window), ps)  # keys in [full_lo, ps) are seen by every query
        cuts = [left] + list(range(full_lo, ps, block_k)) + [ps, pe]
        # a tile the window hides entirely (the left edge, when it holds no sink keys) is dropped
        band = [Tile(a, b, mask.needs_mask(qs, qe, a, b))
                for a, b in zip(cuts, cuts[1:]) if mask.sees_any(qs, qe, a, b)]
        blocks.append(QueryBlock(qs, qe, tuple(sink_tiles(left, mask.sinks, block_k) + band)))
    return blocks


@register("sliding_window", masks=["window"], sinks=True, kv_cache=True, setup=True,
          description="computes only the W-wide band of keys per query block (plus sinks); O(N*W) time and memory")
def sliding_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   window: int | None, scale: float | None = None, sinks: int = 0) -> Runner:
    """Exact sliding-window attention; q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], window required.

    Setup: the band's tile plan and the edge tiles' masks, once per shape."""
    B, Hq, N, _ = q.shape
    mask = Mask.of(causal, window, sinks, k.shape[2] - N)
    if mask.window is None:
        raise ValueError("sliding_window needs a window (it declares masks=['window'] only)")
    block_q, block_k = block_sizes(N, mask.window, B * Hq)
    blocks = plan(N, mask, block_q, block_k, k.shape[2])
    bias = MaskBias.for_plan(blocks, mask, q.device)
    return lambda q, k, v: attention(q, k, v, blocks, mask=mask, scale=scale, bias=bias)
