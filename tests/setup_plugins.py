"""Setup implementations for the setup-phase tests: passed with --impl tests/setup_plugins.py:NAME.

Each is a real @register(..., setup=True) declaration, as a user's would be, so the sweep
takes the declaration (setup=True) from the function itself.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ctxbench.registry import register

SETUP_SLEEP_S = 0.5
FIRST_CALL_SLEEP_S = 0.3


def _sdpa(q, k, v, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@register("slow_setup", devices=["cpu"], masks=["none", "causal"], setup=True)
def slow_setup(q, k, v, *, causal, window, scale=None):
    """Setup sleeps 0.5 s (per-shape work); the call is SDPA, fast."""
    time.sleep(SETUP_SLEEP_S)
    return lambda q, k, v: _sdpa(q, k, v, causal, scale)


@register("slow_first_call", devices=["cpu"], masks=["none", "causal"], setup=True)
def slow_first_call(q, k, v, *, causal, window, scale=None):
    """Like a JIT: the first call sleeps 0.3 s ("compiles"), every later one is fast."""
    compiled = []

    def run(q, k, v):
        if not compiled:
            time.sleep(FIRST_CALL_SLEEP_S)
            compiled.append(True)
        return _sdpa(q, k, v, causal, scale)
    return run


@register("holds_memory", devices=["cpu"], masks=["none", "causal"], setup=True)
def holds_memory(q, k, v, *, causal, window, scale=None):
    """Setup builds 64 MiB of state (touched) that the calls keep alive."""
    state = torch.ones(16 * 2**20)  # 64 MiB of fp32

    def run(q, k, v):
        assert state.numel()  # the calls hold on to it, as a real setup's plan is held
        return _sdpa(q, k, v, causal, scale)
    return run


@register("returns_a_tensor", devices=["cpu"], masks=["none", "causal"], setup=True)
def returns_a_tensor(q, k, v, *, causal, window, scale=None):
    """A setup step that forgot its contract: it returns the output, not the function to time."""
    return _sdpa(q, k, v, causal, scale)
