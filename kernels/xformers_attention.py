"""xformers: xFormers' ``memory_efficient_attention``, when the package is installed (CUDA only).

Registered always, so that `ctxbench list` shows it; without the package every cell is
recorded as unsupported with the install hint. (The file is not named xformers.py so that it
never shadows the package it imports.)

API facts this file relies on, checked against xFormers' source (facebookresearch/xformers,
xformers/ops/fmha/__init__.py and xformers/ops/fmha/attn_bias.py, as of 2025-09; newer
releases re-export the same names from the mslk package):

* ``memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None)`` takes
  ``[B, M, H, K]`` inputs that "can be non-contiguous - we only require the last dimension's
  stride to be 1", so transposes of our [B, H, N, D] tensors go in as views. scale=None means
  1/sqrt(K).
* GQA/MQA: 5-D ``[B, M, G, H, K]`` inputs, G head groups of H query heads, with K/V broadcast
  by hand (``k.reshape([B, M, G, 1, K]).expand([B, M, G, H, K])`` in the docstring's example).
  The docstring calls this "supported only for the forward pass", and the backward operators
  declare SUPPORTS_BMGHK = False (ops/fmha/flash.py), so with gradients the K/V heads are
  materialized instead (see _gqa_needs_copy).
* ``LowerTriangularFromBottomRightMask``: causal, shifted so the last query sees the last key
  (bottom-right, like ctxbench's q_offset = Lk - Lq); equal to LowerTriangularMask when Lq == Lk.
* ``LowerTriangularFromBottomRightMask().make_local_attention(W)`` returns
  ``LowerTriangularFromBottomRightLocalAttentionMask(W)``, whose materialize() is
  tril(diagonal=s) then triu(diagonal=s - W + 1) with s = Lk - Lq: query i (position
  p = i + s) sees keys p - W + 1 <= j <= p, i.e. p - W < j <= p, W keys including itself:
  exactly ctxbench's window, bottom-right aligned.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from ctxbench.core.masks import Mask
from ctxbench.registry import Unsupported, register

_AVAILABLE = importlib.util.find_spec("xformers") is not None

INSTALL_HINT = "xformers is not installed (pip install xformers)"


def _check(cell: Any) -> str | None:
    if not _AVAILABLE:
        return INSTALL_HINT
    return backward_gap(cell.dtype, cell.mask, cell.mode)


def backward_gap(dtype: str, mask: str, mode: str) -> str | None:
    """Why xFormers has no backward operator for this (dtype, mask kind, mode), or None.

    Its cutlass backward (the only one with fp32) leaves the bottom-right local-attention bias
    out of its supported biases (ops/fmha/cutlass.py, BwOp), and its flash backward is fp16/bf16
    only (ops/fmha/flash.py): such a cell would fail inside autograd, after the forward was
    timed, so it is refused up front.
    """
    if dtype == "float32" and mask == "window" and mode != "fwd":
        return "xformers has no float32 backward for a sliding window (cutlass BwOp lacks local attention)"
    return None


def make_attn_bias(mask: Mask, attn_bias: Any = None) -> Any:
    """The xFormers attn_bias object for `mask` (None for no mask).

    attn_bias: the module holding the bias classes (xformers.ops.fmha.attn_bias by default;
    tests pass a stand-in). Sinks are not declared, so a mask with sinks is refused.
    """
    if mask.sinks:
        raise ValueError("the xformers engine does not support attention sinks")
    if mask.kind == "none":
        return None
    if attn_bias is None:
        from xformers.ops.fmha import attn_bias
    causal = attn_bias.LowerTriangularFromBottomRightMask()
    if mask.window is None:
        return causal
    # W keys, the query's own included: p - W < j <= p (see the module docstring).
    return causal.make_local_attention(mask.window)


def to_bmhk(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> xFormers' [B, M=N, H, K=D]: a transpose view, no copy."""
    return x.transpose(1, 2)


def from_bmhk(out: torch.Tensor) -> torch.Tensor:
    """[B, M, H, K] -> [B, H, N, D]: a transpose view, no copy."""
    return out.transpose(1, 2)


def gqa_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, Hq, N, D], k/v [B, Hkv, N, D] -> xFormers' 5-D [B, N, G=Hkv, H=Hq//Hkv, D] views.

    Query head h lands at (group h // (Hq//Hkv), member h % (Hq//Hkv)); K/V are expanded over
    the members of each group with stride 0, so head h reads kv head h // (Hq//Hkv) and
    nothing is copied.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    group = hq // hkv
    q5 = to_bmhk(q).unflatten(2, (hkv, group))

    def expand(x: torch.Tensor) -> torch.Tensor:
        b, n, _, d = to_bmhk(x).shape
        return to_bmhk(x).unsqueeze(3).expand(b, n, hkv, group, d)

    return q5, expand(k), expand(v)


def from_bmghk(out: torch.Tensor) -> torch.Tensor:
    """[B, M, G, H, K] -> [B, G*H, N, D] (a view of xFormers' contiguous output)."""
    return out.flatten(2, 3).transpose(1, 2)


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """k or v [B, Hkv, N, D] -> [B, Hkv*group, N, D], head h a copy of kv head h // group."""
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _gqa_needs_copy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether this call will be differentiated: xFormers' backward has no 5-D GQA layout."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


@register("xformers", devices=["cuda"], dtypes=["float32", "float16", "bfloat16"],
          modes=["fwd", "bwd", "fwd+bwd"], masks=["none", "causal", "window"], gqa=True, sinks=False,
          setup=True, check=_check,
          description="xformers.ops.memory_efficient_attention (xFormers package), if installed")
def xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
             window: int | None, scale: float | None = None) -> Callable[..., torch.Tensor]:
    """Setup step: build xFormers' attn_bias for this mask once; returns run(q, k, v).

    q [B, Hq, N, D], k/v [B, Hkv, N, D] (CUDA; fp16, bf16 or fp32). Per call (timed): the
    kernel on transpose views ([B, N, H, D], no copy); with GQA, on 5-D [B, N, Hkv, Hq//Hkv, D]
    views with K/V expanded at stride 0 (no copy) for the forward pass, and on K/V heads
    repeated to Hq (one copy per call, inside the timing) when the call is differentiated,
    since xFormers' backward has no 5-D layout. The output is [B, Hq, N, D], a view.
    """
    import xformers.ops as xops

    mask = Mask.of(causal, window, q_offset=k.shape[-2] - q.shape[-2])
    # The bias objects are lazy descriptions (no tensor), built once per cell.
    bias = make_attn_bias(mask)
    group = q.shape[1] // k.shape[1]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        try:
            return attend(q, k, v)
        except NotImplementedError as exc:
            # xFormers' dispatcher found no operator for these inputs (head dim, dtype, GPU):
            # a refusal of the shape, recorded as unsupported rather than as an error.
            raise Unsupported(f"xformers: {exc}".splitlines()[0]) from exc

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if group == 1:
            out = xops.memory_efficient_attention(to_bmhk(q), to_bmhk(k), to_bmhk(v), attn_bias=bias, scale=scale)
            return from_bmhk(out)
        if _gqa_needs_copy(q, k, v):
            # Gradients flow back through repeat_interleave, summing each group into its kv head.
            out = xops.memory_efficient_attention(to_bmhk(q), to_bmhk(repeat_kv(k, group)),
                                                  to_bmhk(repeat_kv(v, group)), attn_bias=bias, scale=scale)
            return from_bmhk(out)
        q5, k5, v5 = gqa_views(q, k, v)
        return from_bmghk(xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias, scale=scale))

    return run
