"""The mask convention in one place: which (query, key) pairs are visible.

query i sees key j when j <= i (causal) and, with a window W, also i - W < j; with a window
and S attention sinks (StreamingLLM), also every j < S: j <= i and (i - W < j or j < S).
Everything that needs the convention (kernels, the reference, FLOP counts) derives from here.
"""

from __future__ import annotations

import torch


def mask_of(causal: bool, window: int | None) -> str:
    """The mask name for a (causal, window) pair: 'none', 'causal' or 'window'."""
    if window is not None:
        return "window"
    return "causal" if causal else "none"


def visible(rows: torch.Tensor, cols: torch.Tensor, causal: bool, window: int | None,
            sinks: int = 0) -> torch.Tensor | None:
    """Boolean [len(rows), len(cols)] of visible pairs, or None when every pair is visible.

    rows and cols are 1-D integer tensors of absolute query and key positions. `sinks`
    (keys 0..sinks-1 stay visible) only matters with a window.
    """
    if window is None and not causal:
        return None
    i = rows[:, None]
    j = cols[None, :]
    ok = j <= i
    if window is not None:
        band = j > i - window
        if sinks > 0:
            band = band | (j < sinks)
        ok = ok & band
    return ok


def visible_pairs(n: int, causal: bool, window: int | None, sinks: int = 0) -> int:
    """Number of visible (query, key) pairs for a sequence of n tokens (exact integer)."""
    if window is not None:
        w = min(window, n)
        # query i sees min(i + 1, w) keys: a triangle of w rows, then full rows of w.
        pairs = w * (w + 1) // 2 + (n - w) * w
        if sinks > 0 and n > w:
            # Query i >= w also sees the sinks left of its window: min(sinks, i - w + 1) keys,
            # i.e. min(sinks, t) for t = 1 .. n - w.
            m, s = n - w, sinks
            pairs += m * (m + 1) // 2 if m <= s else s * (s + 1) // 2 + (m - s) * s
        return pairs
    if causal:
        return n * (n + 1) // 2
    return n * n
