"""Any registered implementation as the attention of a transformers model (AttentionInterface).

    name = attention_name(impl)                # registers "ctxbench:<impl>" once, returns it
    model.set_attn_implementation(name)        # or from_pretrained(..., attn_implementation=name)

transformers calls the registered function from every attention layer as

    fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)

with query [B, Hq, N, D] and key/value [B, Hkv, N, D] (grouped-query attention: fewer kv
heads), and expects (output [B, N, Hq, D], attention weights or None). That is the registry's
contract up to the output layout, so the adapter is a call and a transpose.

Masking. No mask function is registered under these names, so transformers builds no mask
and the layer receives attention_mask=None (masking_utils returns None for an attention
implementation it has no mask function for): the kernel applies causality itself, as it
does in a sweep. A mask that does arrive (a 4D mask built by the caller, i.e. padding) is
refused with a clear error rather than silently ignored; padded batches are unsupported.

Window and sinks. A name registered with a window W runs every layer with that window
(the sweep's --mask window --window W); without one, a layer's own `sliding_window` kwarg
(Mistral passes it, Gemma only on its sliding layers) is used, which follows ctxbench's
convention: query i sees keys i - W < j <= i. Sinks (S > 0) are passed only with a window.

Setup. Every layer of one forward pass sees the same shapes, so an implementation's setup
step (ctxbench.core.registry: a block mask, a plan) runs once for the first layer and its run(q, k, v)
serves the rest; a new shape (the next window's length) prepares again.

One name per (implementation, window, sinks): nothing global is switched at run time, so
two models in one process can run different implementations side by side.

KV cache. With use_cache=True a layer gets the new tokens' queries against the cached keys
plus their own (Lq < Lk): an implementation that declares kv_cache=True runs it with the
queries aligned to the last keys (the registry's convention, transformers' too), so a model
can prefill and decode through it (ctxbench.measurements.decode.measure); any other is refused with the reason.
Every decode step is a new shape, so its setup step runs per step.

Observer. A module with a `ctxbench_observer` attribute has it called as
observer(module, query, key, scaling) before the attention runs: the post-RoPE queries and the
keys (cached ones included) the layer attends with, which the KV-cache policies score keys by
(ctxbench.measurements.ruler.compression sets and removes it around a prefill).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from ctxbench.core.formatting import safe_name
from ctxbench.core.masks import Mask
from ctxbench.core.registry import Impl

PREFIX = "ctxbench:"
_NAMES: dict[tuple[str, int | None, int], str] = {}


class PaddingUnsupported(ValueError):
    """An attention mask reached a ctxbench attention function (padding is unsupported)."""


def make_attention_function(impl: Impl, *, window: int | None = None, sinks: int = 0) -> Callable[..., Any]:
    """The AttentionInterface function that runs `impl` (window W and sinks S overriding the layer's)."""
    prepared: dict[tuple, Callable[..., Any]] = {}  # the last shape's run(q, k, v) only

    def ctxbench_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if attention_mask is not None:
            raise PaddingUnsupported(
                f"ctxbench attention ({impl.name}) got an attention mask of shape {tuple(attention_mask.shape)}; "
                "padding is unsupported: pass unpadded sequences (the kernel applies causality itself)")
        if dropout:
            raise ValueError(f"ctxbench attention ({impl.name}) does not implement attention dropout; use model.eval()")
        if query.shape[2] != key.shape[2] and not impl.kv_cache:
            raise ValueError(f"ctxbench attention ({impl.name}) got {query.shape[2]} queries against {key.shape[2]} "
                             "keys (a KV cache), which it does not declare (kv_cache=True): call the model with "
                             "use_cache=False, or use an implementation that takes a KV cache")
        w = window if window is not None else kwargs.get("sliding_window")
        # with a KV cache the queries are the last tokens: bottom-right, as the registry's contract
        mask = Mask.of(bool(getattr(module, "is_causal", True)), w, sinks, key.shape[2] - query.shape[2])
        shape = (tuple(query.shape), tuple(key.shape), query.dtype, query.device, mask, scaling)
        run = prepared.get(shape)
        if run is None:
            prepared.clear()
            run = prepared[shape] = impl.prepare(query, key, value, mask, scaling)
        observer = getattr(module, "ctxbench_observer", None)
        if observer is not None:
            observer(module, query, key, scaling)
        out = run(query, key, value)
        return out.transpose(1, 2).contiguous(), None

    ctxbench_attention.__qualname__ = ctxbench_attention.__name__ = f"ctxbench_attention_{_attention_safe(impl.name)}"
    return ctxbench_attention


def _attention_safe(name: str) -> str:
    # transformers treats a name with "flash" in it as a FlashAttention variant and one shaped
    # like "org/repo" as a Hub kernel: keep neither pattern.
    return safe_name(name).replace("flash", "fl_ash")


def attention_name(impl: Impl, *, window: int | None = None, sinks: int = 0) -> str:
    """Register `impl` with transformers' AttentionInterface (once) and return the name to
    load or switch a model with: "ctxbench:<impl>", plus ":w<W>" / ":s<S>" for an override."""
    from transformers import AttentionInterface

    key = (impl.name, window, sinks)
    name = _NAMES.get(key)
    if name is None:
        safe = _attention_safe(impl.name)
        if safe != impl.name:  # two specs that sanitise alike must not share a name
            safe += "-" + hashlib.sha1(impl.name.encode()).hexdigest()[:8]
        name = PREFIX + safe + (f":w{window}" if window is not None else "") + (f":s{sinks}" if sinks else "")
        AttentionInterface.register(name, make_attention_function(impl, window=window, sinks=sinks))
        _NAMES[key] = name
    return name
