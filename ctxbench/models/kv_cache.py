"""What a transformers KV cache holds: one layer's keys and values, and the bytes of them all
(DynamicCache and kin, with a fallback for older caches that iterate as (key, value) pairs)."""

from __future__ import annotations

from typing import Any

import torch


def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [1, Hkv, L, D] of one layer of a transformers cache."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]


def cache_bytes(cache: Any) -> int:
    """Bytes of the key and value tensors a transformers cache holds."""
    layers = getattr(cache, "layers", None)
    tensors: list[torch.Tensor] = []
    if layers is not None:
        for layer in layers:
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                        if isinstance(t, torch.Tensor)]
    else:  # older caches iterate as (key, value) pairs
        for pair in cache:
            tensors += [t for t in pair if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)
