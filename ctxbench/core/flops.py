"""Mask-aware FLOP and byte counts and device peaks: the numerators and denominators of TFLOP/s,
%-of-peak, GB/s and %-of-bandwidth."""

from __future__ import annotations

from ctxbench.core.masks import Mask

# Backward costs 2.5 forwards (five matmuls against two), the convention every repo uses.
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}

# Dense peak TFLOP/s by device-name fragment and dtype (vendor datasheets, SXM parts).
# fp32 is the non-tensor-core rate: ctxbench holds fp32 to fp32 (not tf32) precision.
DEVICE_PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
    "L40S": {"bfloat16": 362.0, "float16": 362.0, "float32": 91.6},
    "A10G": {"bfloat16": 70.0, "float16": 70.0, "float32": 31.2},
}


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def attention_flops(batch: int, heads: int, n: int, head_dim: int, mask: Mask, mode: str, *,
                    n_k: int | None = None) -> float:
    """FLOPs of one call: 4 * B * Hq * D * (visible query-key pairs), times the mode factor.

    n query rows against n_k keys (default n). GQA does not change the count: every query
    head does its own two matmuls.
    """
    return 4.0 * batch * heads * head_dim * mask.visible_pairs(n, n_k) * MODE_FACTOR[mode]


def attention_bytes(batch: int, heads: int, kv_heads: int, n_q: int, n_k: int, head_dim: int, mask: Mask,
                    dtype: str) -> int:
    """The minimum memory traffic of one forward call (bytes): read Q and write O (Hq * n_q * D
    each), and read once each K and V row that some query sees (Hkv * keys seen * D each), in
    the dtype's size. Decode is bound by this, not by FLOPs: GB/s = bytes / time.
    """
    per_sequence = 2 * heads * n_q * head_dim + 2 * kv_heads * mask.keys_seen(n_q, n_k) * head_dim
    return batch * per_sequence * DTYPE_BYTES[dtype]


def device_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Datasheet dense peak for a CUDA device name, or None when ctxbench doesn't know it."""
    for fragment, peaks in DEVICE_PEAK_TFLOPS.items():
        if fragment in device_name:
            return peaks.get(dtype)
    return None
