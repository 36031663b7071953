"""pytest-benchmark suite: forward latency of every CPU attention implementation.

    pytest benchmarks/ --benchmark-only                      # all of them
    pytest benchmarks/ --benchmark-only -k chunked           # one implementation

fp32, B=1, H=8 (no GQA), D=64; causal for every implementation that supports it and a
window of 256 for every one that supports windows (sliding_window only does windows).
Each case is timed `ROUNDS` times after one warm-up call, so the whole suite takes a few
minutes on two cores rather than pytest-benchmark's default calibration loop.
"""

from __future__ import annotations

import pytest
import torch

from ctxbench.core.cell import Cell, Config
from ctxbench.core.masks import Mask
from ctxbench.registry import all_impls

LENGTHS = [1024, 4096]
WINDOW = 256
B, H, D = 1, 8, 64
ROUNDS = 3


def cases() -> list:
    out = []
    for name, impl in sorted(all_impls().items()):
        if "cpu" not in impl.devices:
            continue
        for mask, window in (("causal", None), ("window", WINDOW)):
            for n in LENGTHS:
                config = Config(batch=B, heads=H, kv_heads=H, head_dim=D, dtype="float32", mask=mask, window=window,
                                mode="fwd", device="cpu")
                cell = Cell.of(config, name, n, "kernel")
                if impl.unsupported_reason(cell) is None:
                    out.append(pytest.param(impl, n, window, id=f"{name}-{mask}-{n}"))
    return out


@pytest.mark.parametrize("impl,n,window", cases())
def test_forward(benchmark, impl, n: int, window: int | None) -> None:
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for _ in range(3))
    benchmark.group = f"{'window' if window else 'causal'} N={n}"
    # Two matmuls of 2 * D FLOPs per visible (query, key) pair and head.
    benchmark.extra_info["gflop"] = 4 * B * H * D * Mask.of(True, window).visible_pairs(n) / 1e9
    with torch.inference_mode():
        run = impl.prepare(q, k, v, Mask.of(True, window))  # setup outside the timed call
        out = benchmark.pedantic(run, args=(q, k, v), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert out.shape == q.shape
