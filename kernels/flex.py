"""flex: PyTorch's FlexAttention (torch.nn.attention.flex_attention), compiled.

FlexAttention takes the mask as a function, mask_mod(b, h, q_idx, kv_idx) -> bool, and turns
it into a BlockMask: for every (query block, key block) pair of 128 x 128, whether it is
hidden (never computed), full (no masking) or partial (the mask_mod is applied inside the
tile). Block skipping is what makes a window O(N * W): only the band's blocks are visited.

    setup (once per cell): mask_mod from ctxbench's Mask (the rule lives in masks.py), then
        torch.compile(create_block_mask), which evaluates the mask block by block
        instead of materialising N x N booleans (1 GiB at 32K);
    call (timed): torch.compile(flex_attention)(q, k, v, block_mask=..., enable_gqa=...).

torch.compile generates the kernel on the first call (Triton on CUDA, C++ through Inductor on
the CPU), which is why first_call_ms holds seconds and latency_ms does not. The uncompiled
(eager) flex_attention materialises the full score matrix; it is never used here.

On the CPU, torch compiles FlexAttention for inference only: cells of a backward mode are
refused, and so is every CPU cell when no C++ compiler is installed (Inductor needs one).
Compiled kernels are cached on disk (TORCHINDUCTOR_CACHE_DIR, by default
/tmp/torchinductor_$USER), so a repeated sweep compiles again only what changed.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import torch

from ctxbench.core.masks import Mask
from ctxbench.registry import Runner, register

BLOCK_SIZE = 128  # FlexAttention's default block, in tokens, for queries and keys
_COMPILED: dict[str, Callable[..., Any]] = {}
_LAST: dict[str, Any] = {}


def mask_mod(mask: Mask) -> Callable[..., torch.Tensor]:
    """FlexAttention's mask_mod(b, h, q_idx, kv_idx) for `mask`: query row q_idx sits at
    position q_offset + q_idx (bottom-right alignment), the rule is Mask.sees."""
    offset = mask.q_offset

    def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return mask.sees(q_idx + offset if offset else q_idx, kv_idx)

    visible.__name__ = f"ctxbench_{mask.kind}" + (f"_w{mask.window}" if mask.window else "") + (
        f"_s{mask.sinks}" if mask.sinks else "")
    return visible


def ragged_mask_mod(mask: Mask, kv_lens: torch.Tensor, n_q: int) -> Callable[..., torch.Tensor]:
    """mask_mod of a ragged batch (a document mask over the padded keys): sequence b has
    kv_lens[b] keys, its query row q_idx sits at position kv_lens[b] - n_q + q_idx, and keys
    at or past kv_lens[b] are hidden. `mask` gives the kind, window and sinks (its own offset
    is not used: each sequence has its own)."""
    base = Mask(mask.kind, mask.window, mask.sinks)

    def visible(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        length = kv_lens[b]
        return (kv_idx < length) & base.sees(q_idx + length - n_q, kv_idx)

    visible.__name__ = f"ctxbench_ragged_{mask.kind}" + (f"_w{mask.window}" if mask.window else "") + (
        f"_s{mask.sinks}" if mask.sinks else "")
    return visible


def block_mask(mask: Mask, n_q: int, n_k: int, device: torch.device | str, compile: bool = True,
               kv_lens: torch.Tensor | None = None) -> Any:
    """The BlockMask of `mask` for n_q queries and n_k keys (tokens), shared by every batch
    and head (one per sequence for a ragged batch, kv_lens [B]); None for no mask on a plain
    batch (flex_attention is then dense). compile=True evaluates the mask per block (no N x N
    tensor), compile=False materialises it (small N only)."""
    if mask.kind == "none" and kv_lens is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask

    if kv_lens is None:
        mod, batch = mask_mod(mask), None
    else:
        mod, batch = ragged_mask_mod(mask, kv_lens, n_q), kv_lens.shape[0]
    if compile:
        # torch.compile(create_block_mask), as torch recommends over its _compile flag
        build = _COMPILED.get("block_mask")
        if build is None:
            build = _COMPILED["block_mask"] = torch.compile(create_block_mask)
        return build(mod, batch, None, n_q, n_k, device=device, BLOCK_SIZE=BLOCK_SIZE)
    return create_block_mask(mod, batch, None, n_q, n_k, device=device, BLOCK_SIZE=BLOCK_SIZE)


def compiled_flex() -> Callable[..., Any]:
    """flex_attention under torch.compile, made once per process (its compiled kernels are
    cached per shape, and across processes on disk)."""
    fn = _COMPILED.get("flex")
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        fn = _COMPILED["flex"] = torch.compile(flex_attention)
    return fn


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor's CPU backend would call ($CXX, else g++), or None if absent."""
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


def _check(cell: Any) -> str | None:
    if cell.device != "cpu":
        return None
    if cell.mode != "fwd":
        return (f"flex on the CPU is forward-only (torch compiles FlexAttention's backward for CUDA only; "
                f"got mode={cell.mode})")
    if cpp_compiler() is None:
        return (f"flex on the CPU needs a C++ compiler for Inductor ({os.environ.get('CXX') or 'g++'} not found): "
                "install g++ (apt install g++) or set CXX")
    return None


def _info() -> dict:
    """The last prepared block mask: block size (tokens), blocks computed, and the share skipped."""
    return dict(_LAST)


# On the CPU flex runs when named (--impls flex,...): its compiled kernel is 2.7x slower than
# sdpa there at 16K (benchmarks/flex_targets.py; Inductor's own vectorised micro-GEMM against
# MKL's) and compiles for about 20 s per mask and shape, which would add minutes to the
# default sweep and nothing that sdpa's rows do not already say.
@register("flex", sinks=True, kv_cache=True, ragged=True, setup=True, check=_check, info=_info,
          default_devices=["cuda"],
          description="torch FlexAttention, compiled (forward only on the CPU); block mask built once per shape")
def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
         scale: float | None = None, sinks: int = 0, kv_lens: torch.Tensor | None = None) -> Runner:
    """flex_attention with the mask as a BlockMask; q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D]; a
    ragged batch (kv_lens) as a per-sequence document mask, built here in the setup step."""
    mask = Mask.of(causal, window, sinks, k.shape[-2] - q.shape[-2])
    blocks = block_mask(mask, q.shape[-2], k.shape[-2], q.device, kv_lens=kv_lens)
    _LAST.clear()
    _LAST["block_size"] = BLOCK_SIZE
    if blocks is not None:
        partial = int(blocks.kv_num_blocks.sum())
        full = int(blocks.full_kv_num_blocks.sum()) if blocks.full_kv_num_blocks is not None else 0
        total = -(-q.shape[-2] // BLOCK_SIZE) * -(-k.shape[-2] // BLOCK_SIZE) * blocks.kv_num_blocks.shape[0]
        _LAST.update(partial_blocks=partial, full_blocks=full, skipped_pct=round(100 * (1 - (partial + full) / total), 2))
    gqa = q.shape[1] != k.shape[1]
    attend = compiled_flex()

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attend(q, k, v, block_mask=blocks, scale=scale, enable_gqa=gqa)
    return run
