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

from ctxbench.kernels._blockwise import MaskBias, QueryBlock, Tile, attention, sink_tiles, split_k
from ctxbench.core.kv_layout import gather
from ctxbench.core.masks import Mask
from ctxbench.registry import Runner, register

# Score-tile budget in fp32 elements for all (batch, head) pairs together: 1M elements =
# 4 MiB, the two cores' L2 caches here. Tuned on a 2-core AVX-512 CPU (see
# benchmarks/cpu_targets.py); GPUs are not the target of this kernel.
TILE_ELEMENTS = 1 << 20
BLOCK_Q = 256
BLOCK_K = 512
MIN_BLOCK = 16
# Split-K decode (see _blockwise.split_k): at most this many query rows per kv head (query
# heads per kv head x Lq), at least this many keys, and keys per split: large splits, because
# each is one matmul that BLAS spreads over the cores (measured here at 16K keys:
# benchmarks/decode_targets.py), and their scores (16K x rows x heads fp32: 2 MiB for 32 heads) stay small.
SPLIT_K_MAX_ROWS = 64
SPLIT_K_MIN_KEYS = 1024
SPLIT_K_BLOCK = 16384


def block_sizes(n: int, rows_per_block_row: int) -> tuple[int, int]:
    """(block_q, block_k) for a sequence of n tokens when each query row is repeated
    `rows_per_block_row` times in a tile (batch * query heads)."""
    block_k = BLOCK_K
    block_q = BLOCK_Q
    # Shrink the query block until the tile fits the budget (many heads, batches or GQA).
    while block_q > MIN_BLOCK and rows_per_block_row * block_q * block_k > TILE_ELEMENTS:
        block_q //= 2
    return min(block_q, n), min(block_k, n)


def plan(n: int, mask: Mask, block_q: int, block_k: int, n_k: int | None = None) -> list[QueryBlock]:
    """Query blocks of `block_q` rows (of n), each with the grid key blocks (multiples of
    `block_k`, of n_k keys: default n) it can see at least partly, clipped to the visible key
    span [lo, hi); with a window and sinks, first the sink keys left of that span (unmasked)."""
    n_k = n if n_k is None else n_k
    blocks = []
    for qs in range(0, n, block_q):
        qe = min(qs + block_q, n)
        lo, hi = mask.key_span(qs, qe, n_k)
        tiles = sink_tiles(lo, mask.sinks, block_k)
        for ks in range(lo - lo % block_k, hi, block_k):
            a, b = max(ks, lo), min(ks + block_k, hi)
            tiles.append(Tile(a, b, mask.needs_mask(qs, qe, a, b)))
        blocks.append(QueryBlock(qs, qe, tuple(tiles)))
    return blocks


def uses_split_k(n_q: int, n_k: int, rows_per_query: int) -> bool:
    """Whether a call of n_q queries against n_k keys, each query repeated `rows_per_query`
    times in a tile (query heads per kv head), runs as split-K decode."""
    return n_q * rows_per_query <= SPLIT_K_MAX_ROWS and n_k >= SPLIT_K_MIN_KEYS


@register("chunked", sinks=True, kv_cache=True, paged=True, setup=True,
          description="blockwise online softmax (FlashAttention in PyTorch), split-K for decode; O(N*block) memory")
def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
            scale: float | None = None, sinks: int = 0, kv_lens: torch.Tensor | None = None,
            block_table: torch.Tensor | None = None) -> Runner:
    """Exact attention over query blocks x key blocks; q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D].

    A few queries against many keys (decode: group * Lq <= SPLIT_K_MAX_ROWS rows per kv
    head) run split-K in the forward (_blockwise.split_k); calls that need gradients always
    take the blockwise path with its backward. A ragged batch runs sequence by sequence, each
    on its own keys; a paged one gathers each sequence's pages first (inside the call).
    Setup: the block plans and the edge tiles' masks, once per shape (per distinct length)."""
    if kv_lens is None:
        return _prepared(q.shape, k.shape[1], k.shape[2], causal, window, sinks, scale, q.device)
    lengths = kv_lens.tolist()
    one = (1,) + tuple(q.shape[1:])
    hkv = k.shape[1] if block_table is None else k.shape[2]  # pools are [pages, page_size, Hkv, D]
    runs = {n: _prepared(one, hkv, n, causal, window, sinks, scale, q.device) for n in set(lengths)}

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        for b, n in enumerate(lengths):
            if block_table is None:
                kb, vb = k[b:b + 1, :, :n], v[b:b + 1, :, :n]
            else:
                kb, vb = gather(k, block_table, b, n), gather(v, block_table, b, n)
            out[b:b + 1] = runs[n](q[b:b + 1], kb, vb)
        return out
    return run


def _prepared(q_shape: tuple[int, ...], n_kv_heads: int, n_k: int, causal: bool, window: int | None, sinks: int,
              scale: float | None, device: torch.device) -> Runner:
    """run(q, k, v) for q of q_shape [B, Hq, Lq, D] against n_k keys of n_kv_heads heads."""
    B, Hq, N, _ = q_shape
    mask = Mask.of(causal, window, sinks, n_k - N)
    block_q, _ = block_sizes(N, B * Hq)
    block_k = min(BLOCK_K, n_k)  # keys are cut on their own grid, whatever Lq is
    blocks = plan(N, mask, block_q, block_k, n_k)
    bias = MaskBias.for_plan(blocks, mask, device)
    if not uses_split_k(N, n_k, Hq // n_kv_heads):
        return lambda q, k, v: attention(q, k, v, blocks, mask=mask, scale=scale, bias=bias)
    # split-K: one query block, its key tiles as the splits (SPLIT_K_BLOCK keys each)
    decode_plan = plan(N, mask, N, min(SPLIT_K_BLOCK, n_k), n_k)
    decode_bias = MaskBias.for_plan(decode_plan, mask, device)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            return attention(q, k, v, blocks, mask=mask, scale=scale, bias=bias)
        return split_k(q, k, v, decode_plan[0], scale=scale, bias=decode_bias)
    return run
