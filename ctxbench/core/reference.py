"""The float64 reference every implementation is checked against.

It is deliberately the plainest possible math (scores, mask, softmax, weighted sum) in
float64, on a chosen subset of query rows so that checking a 32K-token run stays O(N) in
memory: rows x N scores per head, never N x N; K and V are read in blocks of keys, so that a
decode cell at a million keys is checked without a float64 copy of its cache.
"""

from __future__ import annotations

import math

import torch

from ctxbench.core.masks import Mask


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    *,
    scale: float | None = None,
    rows: torch.Tensor | None = None,
    row_block: int = 256,
    key_block: int | None = None,
) -> torch.Tensor:
    """Attention in float64 under `mask` for query rows `rows` (all rows when None).

    q: [B, Hq, Lq, D]; k, v: [B, Hkv, Lk, D]. rows are query row indices (position
    mask.q_offset + row, as Mask.visible says). Returns float64 [B, Hq, len(rows), D].
    Rows are processed `row_block` at a time and keys `key_block` at a time (default: K and V
    blocks of about 64 MiB in float64), so peak extra memory is about
    B * Hq * row_block * Lk * 8 bytes of scores plus one key block: a decode cell at 1M keys
    never holds K or V in float64 whole.
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
    if key_block is None:
        key_block = max(1, (64 * 2**20) // (8 * B * Hkv * D))
    out = torch.empty(B, Hq, len(rows), D, dtype=torch.float64, device=q.device)
    for start in range(0, len(rows), row_block):
        r = rows[start:start + row_block]
        # the `group` query heads of a kv head as one block of rows: [B, Hkv, group * rows, D]
        qr = q[:, :, r, :].double().reshape(B, Hkv, group * len(r), D)
        s = torch.empty(B, Hkv, group * len(r), Lk, dtype=torch.float64, device=q.device)
        for ks in range(0, Lk, key_block):
            kb = k[:, :, ks:ks + key_block].double()
            s[..., ks:ks + kb.shape[2]] = torch.matmul(qr, kb.transpose(-1, -2)) * scale
        ok = mask.visible(r, torch.arange(Lk, device=q.device))
        if ok is not None:
            s.view(B, Hkv, group, len(r), Lk).masked_fill_(~ok, float("-inf"))
        p = torch.softmax(s, dim=-1)
        del s
        o = torch.zeros(B, Hkv, group * len(r), D, dtype=torch.float64, device=q.device)
        for ks in range(0, Lk, key_block):
            vb = v[:, :, ks:ks + key_block].double()
            o += torch.matmul(p[..., ks:ks + vb.shape[2]], vb)
        out[:, :, start:start + len(r), :] = o.view(B, Hq, len(r), D)
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
