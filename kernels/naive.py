"""naive: the textbook O(N^2)-memory baseline.

It materialises the full score matrix (B x Hq x N x N, in fp32) and its softmax, which is
exactly what a long context cannot afford; it is here to show where that wall is.
"""

from __future__ import annotations

import math

import torch

from ctxbench.core.kv_layout import gather_all, ragged_visible
from ctxbench.core.masks import Mask
from ctxbench.registry import Runner, register


@register("naive", sinks=True, kv_cache=True, paged=True, setup=True,
          description="full N x N score matrix in fp32; O(N^2) memory baseline")
def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
          scale: float | None = None, sinks: int = 0, kv_lens: torch.Tensor | None = None,
          block_table: torch.Tensor | None = None) -> Runner:
    """Attention with the whole [B, Hq, Lq, Lk] score matrix materialised.

    Setup: the Lq x Lk boolean mask (Lq * Lk bytes, shared by every head; one per sequence
    for a ragged batch), once per shape. A paged cache is gathered into contiguous K and V
    inside the call: that copy is what reading pages costs without a paged kernel."""
    n_q = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if kv_lens is None:
        mask = Mask.of(causal, window, sinks, k.shape[-2] - n_q)
        ok = mask.visible(torch.arange(n_q, device=q.device), torch.arange(k.shape[-2], device=q.device))
        hidden = None if ok is None else ~ok  # [Lq, Lk], broadcast over batch and heads
    else:
        lengths = kv_lens.tolist()
        hidden = ~ragged_visible(lambda n: Mask.of(causal, window, sinks, n - n_q), lengths, n_q, max(lengths),
                                 q.device)[:, None, None]  # [B, 1, 1, Lq, Lk]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if block_table is not None:
            n = hidden.shape[-1]
            k, v = gather_all(k, block_table, n), gather_all(v, block_table, n)
        B, Hq, N, D = q.shape
        Hkv, Nk = k.shape[1], k.shape[2]
        group = Hq // Hkv
        # GQA without copying K/V: stack the `group` query heads that share a kv head along the
        # row axis, so one [group*N, D] x [D, Nk] matmul per kv head covers them all.
        qg = q.reshape(B, Hkv, group * N, D).float()
        s = torch.matmul(qg, k.float().transpose(-1, -2))
        s.mul_(scale)
        if hidden is not None:
            s.view(B, Hkv, group, N, Nk).masked_fill_(hidden, float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        out = torch.matmul(p, v.float())
        return out.view(B, Hq, N, D).to(q.dtype)
    return run
