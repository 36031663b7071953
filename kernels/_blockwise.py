"""Shared engine of the blockwise kernels (chunked, sliding_window): online softmax over tiles.

A kernel describes *which* (query block, key tile) pairs to compute as a plan, a list of
QueryBlock; this module does the arithmetic, identically for every plan:

    for each query block Q_i (rows [start, end) of every head):
        m = -big, l = 0, acc = 0                      # running max, sum, output (fp32)
        for each key tile K_j, V_j of the block:
            S = Q_i K_j^T * scale * log2(e)           # [BH, rows, keys] scores, base 2
            S[hidden] = -inf                          # only tiles straddling the mask edge
            m' = max(m, rowmax(S))
            P = exp2(S - m')                          # unnormalised probabilities
            l = l * exp2(m - m') + rowsum(P)
            acc = acc * exp2(m - m') + P V_j
            m = m'
        O_i = acc / l;  lse_i = m + log2(l)           # lse kept for the backward pass

That is FlashAttention's algorithm in plain PyTorch: peak extra memory is one score tile
plus O(N * D) for fp32 copies of K and V, never N x N. Base 2 (log2(e) folded into the
query scale once) because torch's exp2 is about three times faster than exp on the CPU,
and the rescaling is the same math.

The backward pass (a custom autograd.Function) recomputes each tile's probabilities from
the saved log-sum-exp instead of storing them, so backward memory stays O(N * block) too.

Grouped-query attention without copying K/V: the `group` query heads that share a kv head
are stacked along the row axis, so one [group*rows, D] x [D, keys] matmul per kv head
covers them all (as kernels/naive.py does for the whole sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ctxbench.core.masks import Mask

LOG2E = math.log2(math.e)
# The running max starts finite so that a row with no visible key in a tile gives
# exp2(-inf - (-big)) = 0 and a rescale factor of exp2(0) = 1, instead of the NaN of
# -inf - -inf; no extra pass is needed to guard such rows.
_NEG_BIG = -0.5 * torch.finfo(torch.float32).max


@dataclass(frozen=True)
class Tile:
    """Keys [start, end) of one tile; `masked` when some (query, key) pair in it is hidden."""

    start: int
    end: int
    masked: bool


@dataclass(frozen=True)
class QueryBlock:
    """Queries [start, end) and the key tiles they read, in order."""

    start: int
    end: int
    tiles: tuple[Tile, ...]


def sink_tiles(band_lo: int, sinks: int, block_k: int) -> list[Tile]:
    """Tiles over the sink keys [0, min(sinks, band_lo)) that a query block's band does not
    already cover. Every query of the block sits at or past band_lo, so these keys are
    visible to all of them: no masking."""
    hi = min(sinks, band_lo)
    return [Tile(a, min(a + block_k, hi), False) for a in range(0, hi, block_k)]


def visited_pairs(plan: list[QueryBlock], rows_per_position: int = 1) -> int:
    """Number of (query, key) scores the plan computes per head (the kernel's work)."""
    return rows_per_position * sum((b.end - b.start) * (t.end - t.start) for b in plan for t in b.tiles)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: list[QueryBlock], *,
              mask: Mask, scale: float | None, bias: MaskBias | None = None) -> torch.Tensor:
    """Exact attention over the tiles of `plan`; q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hq, Lq, D].

    The plan must cover every pair `mask` makes visible exactly once per query block; hidden
    pairs inside a tile marked `masked` are removed here (Mask.visible), with `bias` when a
    setup step built it (MaskBias.for_plan), else with biases built during this call.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _Attention.apply(q, k, v, plan, mask, scale, MaskBias(mask, q.device) if bias is None else bias)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, mask, scale, bias):  # type: ignore[override]
        out, lse = _forward(q, k, v, plan, bias, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.bias, ctx.scale = plan, bias, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, ctx.plan, ctx.bias, ctx.scale)
        return dq, dk, dv, None, None, None, None


class MaskBias:
    """Additive masks (0 where visible, -inf where hidden) for the masked tiles of a plan.

    A tile's mask depends only on its shape and on the offset between its first query and
    first key, so a plan's edge tiles share a handful of masks: build each once, and apply
    it with one in-place add (cheaper than masked_fill with a broadcast boolean).
    """

    def __init__(self, mask: Mask, device: torch.device) -> None:
        self.mask, self.device = mask, device
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    @classmethod
    def for_plan(cls, plan: list[QueryBlock], mask: Mask, device: torch.device) -> "MaskBias":
        """Every masked tile's bias built now (a setup step's work), none left for the calls."""
        bias = cls(mask, device)
        for blk in plan:
            for tile in blk.tiles:
                if tile.masked:
                    bias(blk.start, blk.end, tile)
        return bias

    def __call__(self, q_start: int, q_end: int, tile: Tile) -> torch.Tensor:
        """Float32 [rows, keys] bias for queries [q_start, q_end) against the tile's keys."""
        key = (q_start - tile.start, q_end - q_start, tile.end - tile.start)
        if tile.start < self.mask.sinks:
            key += (tile.start,)  # a tile holding sink keys also depends on where it starts
        bias = self._cache.get(key)
        if bias is None:
            rows = torch.arange(q_start, q_end, device=self.device)
            cols = torch.arange(tile.start, tile.end, device=self.device)
            hidden = ~self.mask.visible(rows, cols)
            bias = torch.zeros(hidden.shape, dtype=torch.float32, device=self.device)
            bias.masked_fill_(hidden, float("-inf"))
            self._cache[key] = bias
        return bias


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: list[QueryBlock],
             mask_bias: MaskBias, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Lq, D] in q's dtype, lse [B, Hkv, group, Lq] fp32: log2 of each row's
    softmax denominator in the base-2 units of the scaled scores, for the backward pass)."""
    B, Hq, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    BH = B * Hkv
    # fp32 copies of K and V (no-ops for fp32): O(N * D), and every tile then multiplies
    # in fp32 with fp32 accumulation whatever the input dtype.
    kf = k.float().reshape(BH, Nk, D)
    vf = v.float().reshape(BH, Nk, D)
    q5 = q.reshape(B, Hkv, G, N, D)
    out = torch.empty(B, Hkv, G, N, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hkv, G, N, dtype=torch.float32, device=q.device)
    qscale = scale * LOG2E
    # One flat buffer reused for every score tile: allocating a fresh multi-MB tile per step
    # costs page faults on the CPU allocator.
    max_tile = max((G * (b.end - b.start) * (t.end - t.start) for b in plan for t in b.tiles), default=0)
    sbuf = torch.empty(BH * max_tile, dtype=torch.float32, device=q.device)
    for blk in plan:
        nq = blk.end - blk.start
        R = G * nq
        # Fold the scale (and log2 e) into Q once per block rather than into every tile.
        qb = (q5[:, :, :, blk.start:blk.end].float() * qscale).reshape(BH, R, D)
        m = torch.full((BH, R, 1), _NEG_BIG, dtype=torch.float32, device=q.device)
        l = torch.zeros((BH, R, 1), dtype=torch.float32, device=q.device)
        acc = torch.zeros((BH, R, D), dtype=torch.float32, device=q.device)
        for tile in blk.tiles:
            nk = tile.end - tile.start
            s = sbuf[: BH * R * nk].view(BH, R, nk)
            torch.bmm(qb, kf[:, tile.start:tile.end].transpose(1, 2), out=s)
            if tile.masked:
                s.view(BH, G, nq, nk).add_(mask_bias(blk.start, blk.end, tile))
            m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
            s.sub_(m_new).exp2_()
            alpha = (m - m_new).exp2_()
            l.mul_(alpha).add_(s.sum(dim=-1, keepdim=True))
            acc.mul_(alpha).baddbmm_(s, vf[:, tile.start:tile.end])
            m = m_new
        acc.div_(l)
        out[:, :, :, blk.start:blk.end] = acc.view(B, Hkv, G, nq, D)
        lse[:, :, :, blk.start:blk.end] = (m + l.log2()).view(B, Hkv, G, nq)
    return out.view(B, Hq, N, D), lse


def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
              dout: torch.Tensor, plan: list[QueryBlock], mask_bias: MaskBias,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlashAttention's backward: recompute P per tile from lse, accumulate dQ, dK, dV in fp32."""
    B, Hq, N, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    BH = B * Hkv
    kf = k.float().reshape(BH, Nk, D)
    vf = v.float().reshape(BH, Nk, D)
    q5 = q.reshape(B, Hkv, G, N, D)
    do5 = dout.reshape(B, Hkv, G, N, D)
    o5 = out.reshape(B, Hkv, G, N, D)
    dq = torch.empty(B, Hkv, G, N, D, dtype=torch.float32, device=q.device)
    dk = torch.zeros(BH, Nk, D, dtype=torch.float32, device=q.device)
    dv = torch.zeros(BH, Nk, D, dtype=torch.float32, device=q.device)
    qscale = scale * LOG2E
    for blk in plan:
        nq = blk.end - blk.start
        R = G * nq
        qb = q5[:, :, :, blk.start:blk.end].float().reshape(BH, R, D)
        qs = qb * qscale
        dob = do5[:, :, :, blk.start:blk.end].float().reshape(BH, R, D)
        # delta_i = sum_j P_ij dP_ij = dO_i . O_i: the softmax Jacobian's row term.
        delta = (dob * o5[:, :, :, blk.start:blk.end].float().reshape(BH, R, D)).sum(-1, keepdim=True)
        lse_b = lse[:, :, :, blk.start:blk.end].reshape(BH, R, 1)
        dqb = torch.zeros(BH, R, D, dtype=torch.float32, device=q.device)
        for tile in blk.tiles:
            nk = tile.end - tile.start
            kt = kf[:, tile.start:tile.end]
            vt = vf[:, tile.start:tile.end]
            s = torch.bmm(qs, kt.transpose(1, 2))
            if tile.masked:
                s.view(BH, G, nq, nk).add_(mask_bias(blk.start, blk.end, tile))
            p = s.sub_(lse_b).exp2_()
            dv[:, tile.start:tile.end].baddbmm_(p.transpose(1, 2), dob)
            ds = torch.bmm(dob, vt.transpose(1, 2)).sub_(delta).mul_(p)
            dqb.baddbmm_(ds, kt)
            dk[:, tile.start:tile.end].baddbmm_(ds.transpose(1, 2), qb)
        dq[:, :, :, blk.start:blk.end] = dqb.view(B, Hkv, G, nq, D)
    dq.mul_(scale)
    dk.mul_(scale)
    return (dq.view(B, Hq, N, D).to(q.dtype), dk.view(B, Hkv, Nk, D).to(k.dtype),
            dv.view(B, Hkv, Nk, D).to(v.dtype))


# ---------------------------------------------------------------- split-K decode

def split_k(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: QueryBlock, *, scale: float | None,
            bias: MaskBias) -> torch.Tensor:
    """Forward-only attention of a few queries against many keys, split over the keys
    (flash-decoding); q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D] -> [B, Hq, Lq, D].

    `block` is the single query block of a plan covering all Lq rows; each of its key tiles is
    a split. Instead of one running softmax carried from tile to tile, every split gets its
    own statistics (row max m_c, sum l_c, unnormalised output o_c) and the splits are merged
    with the log-sum-exp rule

        out = sum_c 2^(m_c - M) o_c / sum_c 2^(m_c - M) l_c,   M = max_c m_c,

    so no split waits for the one before it (on a GPU they run in parallel; here each is one
    large matmul that BLAS spreads over the cores). Scores are computed as K Q^T ([keys, rows]:
    a tall-skinny product, which the CPU's BLAS streams K through faster than Q K^T, and
    whose P^T V then reads V once), and the `group` query heads of a kv head are the rows, so
    each K and V row is read once for all of them: decode is bound by reading K and V.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    G, BH = Hq // Hkv, B * Hkv
    R = G * Nq
    kf = k.float().reshape(BH, Nk, D)
    vf = v.float().reshape(BH, Nk, D)
    qt = (q.reshape(B, Hkv, G, Nq, D).float() * (scale * LOG2E)).reshape(BH, R, D).transpose(1, 2)  # [BH, D, R]
    ms, ls, os_ = [], [], []
    for t in block.tiles:
        s = torch.bmm(kf[:, t.start:t.end], qt)  # [BH, keys, R], base-2 scores
        if t.masked:
            s.view(BH, t.end - t.start, G, Nq).add_(bias(block.start, block.end, t).t()[:, None, :])
        m = s.amax(dim=1, keepdim=True).clamp_min_(_NEG_BIG)  # a row that sees no key of the split: p = 0
        p = s.sub_(m).exp2_()
        ms.append(m)
        ls.append(p.sum(dim=1, keepdim=True))
        os_.append(torch.bmm(p.transpose(1, 2), vf[:, t.start:t.end]))  # [BH, R, D]
    m = torch.cat(ms, dim=1)  # [BH, splits, R]
    w = (m - m.amax(dim=1, keepdim=True)).exp2_()
    denom = (torch.cat(ls, dim=1) * w).sum(dim=1)  # [BH, R]
    out = sum(o * w[:, i, :, None] for i, o in enumerate(os_)) / denom[..., None]
    return out.view(B, Hkv, G, Nq, D).reshape(B, Hq, Nq, D).to(q.dtype)
