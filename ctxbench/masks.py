"""The mask convention in one place: which (query, key) pairs are visible.

query i sees key j when j <= i (causal) and, with a window W, also i - W < j.
Everything that needs the convention (kernels, the reference, FLOP counts) derives from here.
"""

from __future__ import annotations

import torch


def mask_of(causal: bool, window: int | None) -> str:
    """The mask name for a (causal, window) pair: 'none', 'causal' or 'window'."""
    if window is not None:
        return "window"
    return "causal" if causal else "none"


def visible(rows: torch.Tensor, cols: torch.Tensor, causal: bool, window: int | None) -> torch.Tensor | None:
    """Boolean [len(rows), len(cols)] of visible pairs, or None when every pair is visible.

    rows and cols are 1-D integer tensors of absolute query and key positions.
    """
    if window is None and not causal:
        return None
    i = rows[:, None]
    j = cols[None, :]
    ok = j <= i
    if window is not None:
        ok = ok & (j > i - window)
    return ok


def visible_pairs(n: int, causal: bool, window: int | None) -> int:
    """Number of visible (query, key) pairs for a sequence of n tokens (exact integer)."""
    if window is not None:
        w = min(window, n)
        # query i sees min(i + 1, w) keys: a triangle of w rows, then full rows of w.
        return w * (w + 1) // 2 + (n - w) * w
    if causal:
        return n * (n + 1) // 2
    return n * n
