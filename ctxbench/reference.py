"""The float64 reference every implementation is checked against.

It is deliberately the plainest possible math (scores, mask, softmax, weighted sum) in
float64, on a chosen subset of query rows so that checking a 32K-token run stays O(N) in
memory: rows x N scores per head, never N x N.
"""

from __future__ import annotations

import math

import torch

from ctxbench.masks import Mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    *,
    scale: float | None = None,
    rows: torch.Tensor | None = None,
    row_block: int = 256,
) -> torch.Tensor:
    """Attention in float64 under `mask` for query rows `rows` (all rows when None).

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]. rows are query row indices (position
    mask.q_offset + row, as Mask.visible says). Returns float64 [B, Hq, len(rows), D].
    Rows are processed `row_block` at a time, so peak extra memory is
    B * Hq * row_block * Lk * 8 bytes.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"heads {Hq} not divisible by kv heads {Hkv}")
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if rows is None:
        rows = torch.arange(Lq, device=q.device)
    rows = rows.to(q.device)
    # Expanding K/V over the group is fine here: the reference is about clarity, not speed.
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    cols = torch.arange(Lk, device=q.device)
    out = torch.empty(B, Hq, len(rows), D, dtype=torch.float64, device=q.device)
    for start in range(0, len(rows), row_block):
        r = rows[start:start + row_block]
        qr = q[:, :, r, :].double()
        s = torch.matmul(qr, k64.transpose(-1, -2)) * scale
        ok = mask.visible(r, cols)
        if ok is not None:
            s = s.masked_fill(~ok, float("-inf"))
        p = torch.softmax(s, dim=-1)
        out[:, :, start:start + len(r), :] = torch.matmul(p, v64)
    return out


def sample_rows(n: int, max_rows: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted query rows to check: all of them when n <= max_rows, else a random subset.

    The first and last rows are always included: they are where masks and boundaries
    go wrong first (row 0 sees one key under causal; the last row pads the final block).
    """
    if n <= max_rows:
        return torch.arange(n)
    inner = torch.randperm(n - 2, generator=generator)[: max_rows - 2] + 1
    return torch.sort(torch.cat([torch.tensor([0, n - 1]), inner])).values


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, max absolute error) of `out` against float64 `ref`."""
    diff = out.double() - ref
    denom = torch.linalg.vector_norm(ref).item()
    rel = torch.linalg.vector_norm(diff).item() / (denom if denom > 0 else 1.0)
    return rel, diff.abs().max().item() if diff.numel() else 0.0


# Relative L2 error above which a result is `wrong`, by dtype. fp32 allows for a different
# summation order; fp16/bf16 for rounding P and O to the dtype (about 2^-11 and 2^-8).
TOLERANCE = {"float32": 1e-4, "float16": 3e-3, "bfloat16": 1e-2}
