"""sdpa: torch.nn.functional.scaled_dot_product_attention, the reference implementation.

`sdpa` lets PyTorch pick its backend. On CUDA each backend is also its own implementation
(`sdpa_flash`, `sdpa_efficient`, `sdpa_cudnn`, `sdpa_math`), pinned with
torch.nn.attention.sdpa_kernel: a backend that refuses a shape raises Unsupported, and the
cell is recorded as unsupported instead of silently running on another backend.

Every one is a setup implementation (ctxbench.registry): SDPA has no window argument, so a
window (and its sink columns) goes in as an Lq x Lk boolean mask, which the setup step builds
once per cell instead of on every timed call.

Fewer queries than keys (decode, chunked prefill): SDPA's is_causal=True aligns the queries
top-left (query i sees keys j <= i), which is wrong against a KV cache; a causal cell with
Lq < Lk passes torch.nn.attention.bias.causal_lower_right instead (query i sees j <= Lk - Lq + i).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ctxbench.core.kv_layout import gather_all, ragged_visible
from ctxbench.core.masks import Mask
from ctxbench.registry import Runner, Unsupported, register


def _prepare(q: torch.Tensor, k: torch.Tensor, mask_of: Callable[[int], Mask], scale: float | None,
             backend: SDPBackend | None = None, kv_lens: torch.Tensor | None = None,
             block_table: torch.Tensor | None = None) -> Runner:
    """run(q, k, v) calling SDPA under the mask mask_of(kv length), pinned to `backend` when one
    is given; a ragged batch (kv_lens) gets a [B, 1, Lq, Lk] mask, a paged one (block_table)
    is gathered into contiguous K and V inside the call (SDPA cannot read pages)."""
    n_q = q.shape[2]
    if kv_lens is not None:
        lengths = kv_lens.tolist()
        n_k = max(lengths)
        kwargs = {"attn_mask": ragged_visible(mask_of, lengths, n_q, n_k, q.device)[:, None]}
    else:
        n_k = k.shape[2]
        mask = mask_of(n_k)
        # SDPA's is_causal aligns queries top-left, ours bottom-right: the same only at offset 0.
        # For Lq < Lk, causal_lower_right says bottom-right without a mask tensor, which keeps
        # the flash and efficient backends available (an explicit mask rules flash out).
        if not mask.needs_mask(0, n_q, 0, n_k):  # e.g. one query at the end sees every key: no mask at all
            kwargs = {}
        elif mask.kind == "none" or (mask.kind == "causal" and mask.q_offset == 0):
            kwargs = {"is_causal": mask.causal}
        elif mask.kind == "causal":
            # imported here, in setup: torch.nn.attention.bias imports torch._dynamo (2 s on a
            # 2-core CPU), which every process that lists the implementations would pay otherwise
            from torch.nn.attention.bias import causal_lower_right

            kwargs = {"attn_mask": causal_lower_right(n_q, n_k)}
        else:
            # The band (and the sink columns) as a boolean mask: Lq x Lk bytes, shared by every
            # batch and head, and what rules out the flash and cudnn backends.
            rows, cols = torch.arange(n_q, device=q.device), torch.arange(n_k, device=q.device)
            kwargs = {"attn_mask": mask.visible(rows, cols)}

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if block_table is not None:
            k, v = gather_all(k, block_table, n_k), gather_all(v, block_table, n_k)
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=q.shape[1] != k.shape[1], **kwargs)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if backend is None:
            return attend(q, k, v)
        try:
            with sdpa_kernel([backend]):
                return attend(q, k, v)
        except RuntimeError as exc:
            # PyTorch says "No available kernel" (with the reasons as warnings) when the
            # pinned backend rejects the inputs.
            if "No available kernel" in str(exc):
                raise Unsupported(f"SDPA backend {backend.name} refused this shape/dtype/mask") from exc
            raise
    return run


@register("sdpa", sinks=True, kv_cache=True, paged=True, setup=True,
          description="torch SDPA, backend chosen by PyTorch")
def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
         scale: float | None = None, sinks: int = 0, kv_lens: torch.Tensor | None = None,
         block_table: torch.Tensor | None = None) -> Runner:
    """torch.nn.functional.scaled_dot_product_attention with PyTorch's own backend choice."""
    n_q = q.shape[-2]
    return _prepare(q, k, lambda n: Mask.of(causal, window, sinks, n - n_q), scale, None, kv_lens, block_table)


def _pinned(backend: SDPBackend):
    def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
             scale: float | None = None, sinks: int = 0, kv_lens: torch.Tensor | None = None,
             block_table: torch.Tensor | None = None) -> Runner:
        n_q = q.shape[-2]
        return _prepare(q, k, lambda n: Mask.of(causal, window, sinks, n - n_q), scale, backend, kv_lens,
                        block_table)
    attn.__name__ = attn.__qualname__ = f"sdpa_{backend.name.lower()}"
    return attn


_BACKENDS = {
    "sdpa_flash": (SDPBackend.FLASH_ATTENTION, ("float16", "bfloat16"), ("none", "causal")),
    "sdpa_efficient": (SDPBackend.EFFICIENT_ATTENTION, ("float32", "float16", "bfloat16"), ("none", "causal", "window")),
    "sdpa_cudnn": (SDPBackend.CUDNN_ATTENTION, ("float16", "bfloat16"), ("none", "causal")),
    "sdpa_math": (SDPBackend.MATH, ("float32", "float16", "bfloat16"), ("none", "causal", "window")),
}

for _name, (_backend, _dtypes, _masks) in _BACKENDS.items():
    register(_name, devices=["cuda"], dtypes=_dtypes, masks=_masks, sinks="window" in _masks, kv_cache=True,
             paged=True, setup=True,
             description=f"torch SDPA pinned to the {_backend.name} backend")(_pinned(_backend))
