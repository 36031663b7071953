"""naive: the textbook O(N^2)-memory baseline.

It materialises the full score matrix (B x Hq x N x N, in fp32) and its softmax, which is
exactly what a long context cannot afford; it is here to show where that wall is.
"""

from __future__ import annotations

import math

import torch

from ctxbench.masks import Mask
from ctxbench.registry import register


@register("naive", sinks=True, description="full N x N score matrix in fp32; O(N^2) memory baseline")
def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
          window: int | None, scale: float | None = None, sinks: int = 0) -> torch.Tensor:
    """Attention with the whole [B, Hq, N, N] score matrix materialised."""
    mask = Mask.of(causal, window, sinks)
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # GQA without copying K/V: stack the `group` query heads that share a kv head along the
    # row axis, so one [group*N, D] x [D, N] matmul per kv head covers them all.
    qg = q.reshape(B, Hkv, group * N, D).float()
    s = torch.matmul(qg, k.float().transpose(-1, -2))
    s.mul_(scale)
    pos = torch.arange(N, device=q.device)
    ok = mask.visible(pos, pos)
    if ok is not None:
        s.view(B, Hkv, group, N, N).masked_fill_(~ok, float("-inf"))
    p = torch.softmax(s, dim=-1)
    del s
    out = torch.matmul(p, v.float())
    return out.view(B, Hq, N, D).to(q.dtype)
