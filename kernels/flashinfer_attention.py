"""flashinfer: FlashInfer's batch prefill kernel over a paged KV cache, when installed (CUDA only).

Registered always, so that `ctxbench list` shows it; without the package every cell is
recorded as unsupported with the install hint. Forward only: FlashInfer has no backward.

Built on ``flashinfer.BatchPrefillWithPagedKVCacheWrapper``, the kernel serving engines
(vLLM, SGLang) call for prefill. Its API splits into ``plan(...)`` (page table, mask and
scheduling: once per shape) and ``run(q, paged_kv_cache)`` (the kernel: per call), which maps
onto ctxbench's setup step (``setup=True``) and the timed call.

API facts this file relies on, checked against FlashInfer's source (flashinfer-ai/flashinfer,
flashinfer/prefill.py, BatchPrefillWithPagedKVCacheWrapper, snapshot of 2026-08) and the docs
(https://docs.flashinfer.ai/api/prefill.html, docs/tutorials/kv_layout.rst):

* ``BatchPrefillWithPagedKVCacheWrapper(float_workspace_buffer, kv_layout="NHD")``; the docs
  recommend a 128 MB uint8 workspace on the inputs' device.
* ``plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
  num_kv_heads, head_dim, page_size, *, causal, sm_scale, window_left, q_data_type,
  kv_data_type, ...)``. The head-dim argument is named ``head_dim`` in older releases and
  ``head_dim_qk`` in newer ones, so the eight leading arguments are passed by position (as the
  docs' own example does). ``q_data_type`` and ``kv_data_type`` are keywords of plan()
  (kv_data_type defaults to q_data_type); sm_scale=None means 1/sqrt(head_dim).
* ``run(q, paged_kv_cache)``: q is ragged ``[qo_indptr[-1], num_qo_heads, head_dim]``;
  paged_kv_cache may be a tuple ``(k_cache, v_cache)`` of 4-D tensors, each
  ``[max_num_pages, num_kv_heads, page_size, head_dim]`` with kv_layout="HND"; the output is
  ragged like q.
* Sequence length of request i = page_size * (pages of i - 1) + last_page_len[i], with
  1 <= last_page_len <= page_size (kv_layout tutorial).
* ``window_left``: "the left (inclusive) window size", -1 for none. The kernel's mask
  (include/flashinfer/attention/variants.cuh) keeps kv_idx + qo_len + window_left >=
  kv_len + qo_idx, i.e. with p = qo_idx + kv_len - qo_len: p - window_left <= j. Ours keeps
  p - W < j, so window_left = W - 1.
* The causal mask is bottom-right aligned (col_limit_right = qo_idx + 1 + kv_len - qo_len in
  include/flashinfer/attention/hopper/mainloop_mma.cuh), as ctxbench's q_offset = Lk - Lq is.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from ctxbench.core.masks import Mask
from ctxbench.registry import register

_AVAILABLE = importlib.util.find_spec("flashinfer") is not None

INSTALL_HINT = "flashinfer is not installed (pip install flashinfer-python)"

# FlashInfer's documented workspace size: scratch for split-KV partial results, in bytes.
WORKSPACE_BYTES = 128 * 1024 * 1024

# One page per sequence: k [B, Hkv, N, D] read as HND pages [num_pages=B, Hkv, page_size=N, D].
KV_LAYOUT = "HND"


def _check(cell: Any) -> str | None:
    if not _AVAILABLE:
        return INSTALL_HINT
    return None


def window_left(mask: Mask) -> int:
    """FlashInfer's ``window_left`` (keys left of the query, inclusive) for `mask`: -1 (no window)
    for none/causal, W - 1 for a window of W keys (the query's own key is one of the W)."""
    return -1 if mask.window is None else mask.window - 1


def page_table(batch: int, seq_len: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ragged-query and paged-KV description of `batch` sequences of `seq_len` tokens each,
    one page of `seq_len` tokens per sequence (page b is sequence b): int32 tensors on `device`.

    Returns (qo_indptr [B+1] in query rows, paged_kv_indptr [B+1] in pages,
    paged_kv_indices [B] page ids, paged_kv_last_page_len [B] in tokens).
    """
    if batch < 1 or seq_len < 1:
        raise ValueError(f"need at least one sequence of at least one token (got batch={batch}, seq_len={seq_len})")
    rows = torch.arange(batch + 1, dtype=torch.int32, device=device)
    qo_indptr = rows * seq_len                       # sequence b's query rows: [b*N, (b+1)*N)
    kv_indptr = rows.clone()                         # sequence b owns pages [b, b+1): one page
    kv_indices = torch.arange(batch, dtype=torch.int32, device=device)  # ... and it is page b
    last_page_len = torch.full((batch,), seq_len, dtype=torch.int32, device=device)  # full page
    return qo_indptr, kv_indptr, kv_indices, last_page_len


def to_ragged(q: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> FlashInfer's ragged [B*N, H, D] (row b*N + i is token i of sequence b).

    A copy (transpose then reshape of a contiguous tensor), made per call: FlashInfer has no
    batched-query layout, queries of all requests are concatenated along the token axis.
    """
    b, h, n, d = q.shape
    return q.transpose(1, 2).reshape(b * n, h, d)


def from_ragged(out: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of to_ragged: [B*N, H, D] -> [B, H, N, D] (a view, no copy)."""
    rows, h, d = out.shape
    return out.view(batch, rows // batch, h, d).transpose(1, 2)


def paged_kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our k, v [B, Hkv, N, D] as FlashInfer's HND page pools [num_pages=B, Hkv, page_size=N, D]:
    the same tensors, no copy, which is why the layout is HND with one page per sequence."""
    return k, v


def plan_args(q: torch.Tensor, k: torch.Tensor, mask: Mask, scale: float | None
              ) -> tuple[tuple, dict[str, Any]]:
    """(positional, keyword) arguments of ``BatchPrefillWithPagedKVCacheWrapper.plan`` for
    q [B, Hq, N, D], k [B, Hkv, N, D] under `mask` (index tensors on q's device)."""
    b, hq, n, d = q.shape
    hkv, n_k = k.shape[1], k.shape[2]
    if n_k != n:  # one page table for both: queries and keys are the same N tokens
        raise ValueError(f"flashinfer engine expects as many keys as queries (got {n} queries, {n_k} keys)")
    qo_indptr, kv_indptr, kv_indices, last_page_len = page_table(b, n, q.device)
    args = (qo_indptr, kv_indptr, kv_indices, last_page_len, hq, hkv, d, n)  # page_size = N
    kwargs = {
        "causal": mask.causal,            # a window implies causal (Mask.of)
        "window_left": window_left(mask),
        "sm_scale": scale,                # None: FlashInfer uses 1/sqrt(D), as the contract does
        "q_data_type": q.dtype,
        "kv_data_type": k.dtype,
    }
    return args, kwargs


@register("flashinfer", devices=["cuda"], dtypes=["float16", "bfloat16"], modes=["fwd"],
          masks=["none", "causal", "window"], gqa=True, sinks=False, setup=True, check=_check,
          description="FlashInfer BatchPrefillWithPagedKVCacheWrapper (paged KV, one page per sequence), if installed")
def flashinfer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               window: int | None, scale: float | None = None) -> Callable[..., torch.Tensor]:
    """Setup step: plan FlashInfer's paged prefill for these shapes; returns run(q, k, v).

    q [B, Hq, N, D], k/v [B, Hkv, N, D] (fp16/bf16, CUDA). Once per cell: the 128 MiB
    workspace, the int32 page table and plan() (FlashInfer's scheduling, which reads the
    indptrs on the host). Per call (timed): q to ragged [B*N, Hq, D] (one copy), the kernel on
    K/V read in place as HND pages, and the output back to [B, Hq, N, D] (a view).
    """
    import flashinfer as fi

    mask = Mask.of(causal, window, q_offset=k.shape[-2] - q.shape[-2])
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=q.device)
    # Layout choice: with "HND", k [B, Hkv, N, D] already is [num_pages=B, Hkv, page_size=N, D],
    # one page per sequence, so the timed call passes our K/V with no copy and no cache write.
    # Trade-off: a page of N tokens is not what a serving engine uses (pages of 16-128
    # tokens scattered in a pool), so this measures the attention kernel at contiguous KV,
    # not the cost of page-table indirection; and backends that only accept small page sizes
    # (FlashInfer's trtllm-gen paths) are out of reach, which is why the backend stays "auto".
    wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout=KV_LAYOUT)
    args, kwargs = plan_args(q, k, mask, scale)
    wrapper.plan(*args, **kwargs)
    batch = q.shape[0]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # K/V values may differ between calls (layers): they are passed as they are, never cached.
        out = wrapper.run(to_ragged(q), paged_kv(k, v))
        return from_ragged(out, batch)

    return run
