"""Independent float64 attention for the tests, written from the definition, and the seeded random
inputs the tests feed it.

Deliberately NOT built on ctxbench.core.masks or ctxbench.core.reference: tests that check those
(or the kernels checked against them) need a second, independent statement of the rule.

The convention: keys sit at positions 0 .. n_k - 1; query row i sits at position p = q_offset + i,
where q_offset defaults to n_k - n_q (the queries are the last n_q positions: bottom-right, as in
decoding or chunked prefill against a KV cache). The query at p sees the key at j when

    no mask:  always
    causal:   j <= p
    window W: j <= p and p - W < j (W keys, the query's own included); a window implies causal
    sinks S:  with a window, the keys j < S stay visible too: j <= p and (p - W < j or j < S)

Grouped-query attention: query head h reads KV head h // (Hq // Hkv) (the KV heads are repeated).

Random inputs: `random_qkv(seed, ...)` draws q, then k, then v from one generator seeded with
`seed`. For fresh inputs on every run, take the seed from `new_seed()`: it prints `seed N`, which
pytest shows with a failing test's captured output, and CTXBENCH_TEST_SEED=N replays that draw.
"""

from __future__ import annotations

import math
import os
import random
from typing import Any

import torch

SEED_VARIABLE = "CTXBENCH_TEST_SEED"


# ---------------------------------------------------------------- seeds and inputs

def new_seed() -> int:
    """A fresh random seed (or CTXBENCH_TEST_SEED's, to replay a failure), printed as `seed N`."""
    given = os.environ.get(SEED_VARIABLE)
    seed = int(given) if given else random.SystemRandom().randrange(2**31)
    print(f"seed {seed}")
    return seed


def random_qkv(seed: int, b: int, hq: int, hkv: int, n_q: int, n_k: int, d: int,
               dtype: torch.dtype = torch.float32, *, q_scale: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard-normal q [b, hq, n_q, d] (times q_scale), k and v [b, hkv, n_k, d], drawn in that
    order in float32 from a generator seeded with `seed`, then cast to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, n_q, d, generator=g) * q_scale).to(dtype)
    k = torch.randn(b, hkv, n_k, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, n_k, d, generator=g).to(dtype)
    return q, k, v


# ---------------------------------------------------------------- the mask

def sees(p: Any, j: Any, *, causal: bool = True, window: int | None = None, sinks: int = 0) -> Any:
    """Whether the query at position p sees the key at position j: ints (a bool) or broadcastable
    integer tensors (a bool tensor). A window implies causal; sinks only count with a window."""
    if window is None and not causal:
        return j >= 0  # every key
    ok = j <= p
    if window is not None:
        ok = ok & ((j > p - window) | (j < sinks))
    return ok


def mask_kwargs(mask: Any) -> dict[str, Any]:
    """sees()/attention64()'s keywords for a ctxbench Mask, read from its fields (kind, window,
    sinks, q_offset) only: none of its methods."""
    return dict(causal=mask.kind != "none", window=mask.window, sinks=mask.sinks, q_offset=mask.q_offset)


def visible(n_q: int, n_k: int, *, causal: bool = True, window: int | None = None, sinks: int = 0,
            q_offset: int | None = None) -> torch.Tensor:
    """Bool [n_q, n_k]: whether query row i (position q_offset + i; default n_k - n_q) sees key j."""
    offset = n_k - n_q if q_offset is None else q_offset
    p = torch.arange(n_q)[:, None] + offset
    j = torch.arange(n_k)[None, :]
    return torch.broadcast_to(sees(p, j, causal=causal, window=window, sinks=sinks), (n_q, n_k))


# ---------------------------------------------------------------- attention in float64

def _repeat_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hq, N, D] in float64: each KV head repeated for its Hq // Hkv query heads."""
    hkv = x.shape[1]
    assert hq % hkv == 0, f"heads {hq} not divisible by KV heads {hkv}"
    return x.double().repeat_interleave(hq // hkv, dim=1)


def probs64(q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, window: int | None = None, sinks: int = 0,
            q_offset: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Attention probabilities [B, Hq, n_q, n_k] in float64 of q [B, Hq, n_q, D] over k [B, Hkv, n_k, D]
    under the mask above; scale defaults to 1 / sqrt(D)."""
    n_q, n_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    scores = (q.double() @ _repeat_kv(k, q.shape[1]).transpose(-1, -2)) * (1 / math.sqrt(d) if scale is None else scale)
    ok = visible(n_q, n_k, causal=causal, window=window, sinks=sinks, q_offset=q_offset)
    return torch.softmax(scores.masked_fill(~ok, -math.inf), dim=-1)


def attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                window: int | None = None, sinks: int = 0, q_offset: int | None = None,
                kv_lens: Any = None, scale: float | None = None) -> torch.Tensor:
    """Softmax attention [B, Hq, n_q, D] in float64 of q [B, Hq, n_q, D] over k, v [B, Hkv, n_k, D]
    under the mask above (differentiable: float64 leaves get their gradients).

    kv_lens: per-sequence KV lengths (a list or 1-D tensor of B ints): sequence b attends to its
    first kv_lens[b] keys only, its queries the last n_q positions of those (q_offset, if given,
    applies to every sequence). Keys past a length are padding and never read.
    """
    if kv_lens is not None:
        lens = [int(n) for n in kv_lens]
        assert len(lens) == q.shape[0], f"{len(lens)} KV lengths for a batch of {q.shape[0]}"
        return torch.cat([attention64(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], causal=causal, window=window,
                                      sinks=sinks, q_offset=q_offset, scale=scale) for b, n in enumerate(lens)])
    p = probs64(q, k, causal=causal, window=window, sinks=sinks, q_offset=q_offset, scale=scale)
    return p @ _repeat_kv(v, q.shape[1])
