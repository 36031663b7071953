"""flash_attn: the FlashAttention package's own kernel, when it is installed (CUDA only).

Registered always, so that `ctxbench list` shows it; without the package every cell is
recorded as unsupported with the install hint.
"""

from __future__ import annotations

import importlib.util

import torch

from ctxbench.core.masks import Mask
from ctxbench.registry import register

_AVAILABLE = importlib.util.find_spec("flash_attn") is not None


def _check(cell) -> str | None:
    if not _AVAILABLE:
        return "flash_attn is not installed (pip install flash-attn)"
    return None


@register("flash_attn", devices=["cuda"], dtypes=["float16", "bfloat16"], check=_check,
          description="flash_attn.flash_attn_func (FlashAttention package), if installed")
def flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               window: int | None, scale: float | None = None) -> torch.Tensor:
    """flash_attn_func on [B, N, H, D] views; window W maps to window_size=(W - 1, 0)."""
    mask = Mask.of(causal, window)
    from flash_attn import flash_attn_func

    window_size = (-1, -1) if mask.window is None else (mask.window - 1, 0)
    # flash_attn's causal mask is bottom-right aligned, as Mask's q_offset is.
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale,
                          causal=mask.causal, window_size=window_size)
    return out.transpose(1, 2)
