"""naive: the textbook O(N^2)-memory baseline.

It materialises the full score matrix (B x Hq x N x N, in fp32) and its softmax, which is
exactly what a long context cannot afford; it is here to show where that wall is.
"""

from __future__ import annotations

import math

import torch

from ctxbench.masks import Mask
from ctxbench.registry import Runner, register


@register("naive", sinks=True, kv_cache=True, setup=True, description="full N x N score matrix in fp32; O(N^2) memory baseline")
def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
          window: int | None, scale: float | None = None, sinks: int = 0) -> Runner:
    """Attention with the whole [B, Hq, N, N] score matrix materialised.

    Setup: the N x N boolean mask (N^2 bytes, shared by every batch and head), once per shape."""
    mask = Mask.of(causal, window, sinks, k.shape[-2] - q.shape[-2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    ok = mask.visible(torch.arange(q.shape[-2], device=q.device), torch.arange(k.shape[-2], device=q.device))
    hidden = None if ok is None else ~ok

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
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
