"""triton_decode: split-K ("flash-decoding") attention of a few query tokens against a KV cache.

Decode: Lq = 1..16 query tokens per sequence, the last Lq positions of a sequence whose keys
are cached (contiguous [B, Hkv, Lk, D], ragged through kv_lens, or paged as in vLLM). Queries
are bottom-right aligned (FlashAttention >= 2.1, ctxbench.core.masks): for sequence b with
kv_len keys, query row i sits at position p = kv_len - Lq + i and sees key j when
j <= p (causal) and, with a window W, p - W < j or j < S (S attention sinks).

One query row has too little parallelism for a GPU, so the keys are split (split-K):

  split kernel (grid: B * Hkv x NUM_SPLITS). A program owns one (batch, kv head) and one
    contiguous part of the visible keys [lo, hi). It loads the Q rows of all GROUP = Hq / Hkv
    query heads that share the kv head at once: M = GROUP * Lq rows (padded to BLOCK_M, a power
    of two >= 16), so each K/V tile is read from memory once for the whole group, the point of
    GQA decode. It walks its keys in BLOCK_N tiles with an online softmax (running max and sum
    in fp32, exp2 with scale * log2(e) folded in), masks each row with its own position, and
    writes a partial output (fp32, already divided by its sum) and a base-2 log-sum-exp per row.
    A row that sees no key of the part writes out = 0 and lse = -inf.
  merge kernel (grid: B * Hq * Lq). lse = logsumexp over the splits, out = sum_s 2^(lse_s - lse)
    out_s: a split with lse_s = -inf weighs 0, so it contributes nothing (and no NaN).

Visited keys: only the visible span. Without a window it is [0, kv_len); with one it starts at
the first query row's band, max(0, kv_len - Lq - W + 1) rounded down to a tile, so a window
never walks the whole cache. The span is cut into NUM_SPLITS parts of whole tiles. Sinks
below the span ([0, min(S, lo))) are a range of their own, walked by split 0 in whole tiles
(the keys of its last tile past S are masked, and lie below lo: never walked twice). A key in the
tile cut by lo but below S is a sink too; it is walked once, in the span, where the mask
(which includes the sinks) keeps it. Keys >= kv_len are never read (masked loads).

Paged KV: k and v are pools [num_pages, PAGE_SIZE, Hkv, D]; key j of sequence b lives at page
block_table[b, j // PAGE_SIZE], slot j % PAGE_SIZE. The kernel gathers each key's row through
the table; everything else (tiles, splits, arithmetic) is the contiguous code, so both layouts
give bit-identical results for the same data.

num_splits is a run-time argument (no recompilation per value; only the merge kernel's BLOCK_S,
its next power of two, is a constexpr). Its default: enough programs to fill the GPU twice
(2 x its SM count, 132 as on H100 / H200 when unknown), at least MIN_KEYS_PER_SPLIT keys per
split, at most MAX_SPLITS.

Interpreter: each call's setup decides whether its launches run compiled or in Triton's
interpreter (TRITON_INTERPRET if set, else whether the machine has CUDA: triton_interpreter,
which makes that work whatever imported triton first). Interpreted, the same code runs with the
two changes explained in kernels/triton_attention.py's docstring under INTERPRETED: the key
loops are `while` loops (triton 3.6's interpreter turns `range` bounds into ints from 1-element
arrays, which NumPy >= 2.4 refuses), and bf16 dot operands are widened to fp32 (triton 3.9's
interpreter multiplies bf16 bit patterns; widening is exact: triton_common.mm, mma). Compiled
kernels take the plain branches.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ctxbench.kernels.triton_common import NOT_INSTALLED, device_reason, jit, mm, mma
from ctxbench.kernels.triton_interpreter import interpreted, interpreter_scope, launchable
from ctxbench.registry import Unsupported, register

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports and registers `triton_decode`, as unsupported
    triton = None
    tl = SimpleNamespace(constexpr=None)

LOG2E = 1.4426950408889634
MAX_Q_LEN = 16
MAX_HEAD_DIM = 256
INTERPRETER_MAX_LEN = 4096  # keys; a decode call is Lq x Lk, so the interpreter goes further than for prefill
# Block sizes and split policy (module attributes, read at each call).
BLOCK_N = 64            # keys per tile
MAX_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256
DEFAULT_SMS = 132       # H100 / H200, when the device cannot be asked
_LAST: dict = {}


# ---------------------------------------------------------------------------------------
# Split kernel
# ---------------------------------------------------------------------------------------


@jit
def _tile(acc, l_i, m_i, q, pos, start_n, offs_n, offs_d, K, V, BT, k_base, v_base,
          stride_kn, stride_kp, stride_kd, stride_vn, stride_vp, stride_vd, stride_btn, kv_len, WINDOW, SINKS, qk_scale,
          IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, PAGED: tl.constexpr,
          PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
          PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """One BLOCK_N tile of keys [start_n, start_n + BLOCK_N) of the online softmax."""
    cols = start_n + offs_n
    in_seq = cols < kv_len
    if PAGED:  # row of key j: pool page block_table[b, j // PAGE_SIZE], slot j % PAGE_SIZE
        page = tl.load(BT + (cols // PAGE_SIZE) * stride_btn, mask=in_seq, other=0)
        k_rows = page.to(tl.int64) * stride_kp + (cols % PAGE_SIZE) * stride_kn
        v_rows = page.to(tl.int64) * stride_vp + (cols % PAGE_SIZE) * stride_vn
    else:
        k_rows = cols.to(tl.int64) * stride_kn
        v_rows = cols.to(tl.int64) * stride_vn
    if EVEN_D:
        kmask = in_seq[None, :]
        vmask = in_seq[:, None]
    else:
        kmask = in_seq[None, :] & (offs_d[:, None] < HEAD_DIM)
        vmask = in_seq[:, None] & (offs_d[None, :] < HEAD_DIM)
    kt = tl.load(K + k_base + k_rows[None, :] + offs_d[:, None] * stride_kd, mask=kmask, other=0.0)
    qk = mm(q, kt, PRECISION, INTERPRETED)
    # visibility (ctxbench.core.masks): j < kv_len, j <= p, and p - W < j or j < S
    ok = in_seq[None, :]
    if IS_CAUSAL:
        ok = ok & (cols[None, :] <= pos[:, None])
    if HAS_WINDOW:
        band = cols[None, :] > pos[:, None] - WINDOW
        if HAS_SINKS:
            band = band | (cols[None, :] < SINKS)
        ok = ok & band
    qk = tl.where(ok, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key so far
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + v_base + v_rows[:, None] + offs_d[None, :] * stride_vd, mask=vmask, other=0.0)
    acc = mma(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, INTERPRETED)
    return acc, l_i, m_new


@jit
def _keys(acc, l_i, m_i, q, pos, start, end, offs_n, offs_d, K, V, BT, k_base, v_base,
          stride_kn, stride_kp, stride_kd, stride_vn, stride_vp, stride_vd, stride_btn, kv_len, WINDOW, SINKS, qk_scale,
          IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, PAGED: tl.constexpr,
          PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
          PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """The tiles starting at start, start + BLOCK_N, ... below end."""
    if INTERPRETED:  # `while`: see "Loops" in kernels/triton_attention.py's docstring
        start_n = start
        while start_n < end:
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, pos, start_n, offs_n, offs_d, K, V, BT, k_base, v_base,
                                  stride_kn, stride_kp, stride_kd, stride_vn, stride_vp, stride_vd, stride_btn, kv_len, WINDOW, SINKS,
                                  qk_scale, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, PAGED, PAGE_SIZE, HEAD_DIM, EVEN_D,
                                  PRECISION, INTERPRETED)
            start_n += BLOCK_N
    else:
        for start_n in range(start, end, BLOCK_N):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, pos, start_n, offs_n, offs_d, K, V, BT, k_base, v_base,
                                  stride_kn, stride_kp, stride_kd, stride_vn, stride_vp, stride_vd, stride_btn, kv_len, WINDOW, SINKS,
                                  qk_scale, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, PAGED, PAGE_SIZE, HEAD_DIM, EVEN_D,
                                  PRECISION, INTERPRETED)
    return acc, l_i, m_i


@jit
def _split_kernel(Q, K, V, KVLens, BT, OP, LSEP,
                  stride_qb, stride_qh, stride_qn, stride_qd,
                  stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_kp, stride_vp,
                  stride_btb, stride_btn,
                  Hkv, LK, WINDOW, SINKS, qk_scale, NUM_SPLITS,
                  LQ: tl.constexpr, GROUP: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr,
                  HAS_LENS: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    if HAS_LENS:
        kv_len = tl.load(KVLens + b)
    else:
        kv_len = LK + b * 0

    # The M rows: row r is query head hkv * GROUP + r // LQ, query token r % LQ (position pos).
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    head = hkv * GROUP + offs_m // LQ
    tok = offs_m % LQ
    real = offs_m < GROUP * LQ
    pos = kv_len - LQ + tok
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + tok[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    if EVEN_D:
        q = tl.load(q_ptrs, mask=real[:, None], other=0.0)
    else:
        q = tl.load(q_ptrs, mask=real[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    # This program's keys: part `split` of the span [lo, kv_len), in whole tiles.
    if HAS_WINDOW:
        lo = tl.maximum(kv_len - LQ - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    else:
        lo = kv_len * 0
    tiles = (kv_len - lo + BLOCK_N - 1) // BLOCK_N
    per_split = (tiles + NUM_SPLITS - 1) // NUM_SPLITS * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, kv_len)

    if PAGED:  # pools [pages, PAGE_SIZE, Hkv, D]: stride_kn is the slot stride, stride_kp the page's
        k_base = hkv.to(tl.int64) * stride_kh
        v_base = hkv.to(tl.int64) * stride_vh
        bt = BT + b.to(tl.int64) * stride_btb
    else:
        k_base = b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
        v_base = b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
        bt = BT

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_SINKS:  # the sinks below the span, walked by split 0 only
        sink_end = tl.where(split == 0, tl.minimum(SINKS, lo), 0)
        acc, l_i, m_i = _keys(acc, l_i, m_i, q, pos, lo * 0, sink_end, offs_n, offs_d, K, V, bt, k_base, v_base,
                              stride_kn, stride_kp, stride_kd, stride_vn, stride_vp, stride_vd, stride_btn, kv_len, WINDOW, SINKS,
                              qk_scale, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, PAGED, PAGE_SIZE, HEAD_DIM, EVEN_D,
                              BLOCK_N, PRECISION, INTERPRETED)
    acc, l_i, m_i = _keys(acc, l_i, m_i, q, pos, start, end, offs_n, offs_d, K, V, bt, k_base, v_base,
                          stride_kn, stride_kp, stride_kd, stride_vn, stride_vp, stride_vd, stride_btn, kv_len, WINDOW, SINKS,
                          qk_scale, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, PAGED, PAGE_SIZE, HEAD_DIM, EVEN_D,
                          BLOCK_N, PRECISION, INTERPRETED)

    # Partials: OP [B, Hq, LQ, NUM_SPLITS, HEAD_DIM] fp32, LSEP [B, Hq, LQ, NUM_SPLITS], contiguous.
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    row = (b.to(tl.int64) * (Hkv * GROUP) + head) * LQ + tok  # flat (b, head, token)
    tl.store(LSEP + row * NUM_SPLITS + split, lse, mask=real)
    op_ptrs = OP + (row * NUM_SPLITS + split)[:, None] * HEAD_DIM + offs_d[None, :]
    if EVEN_D:
        tl.store(op_ptrs, out, mask=real[:, None])
    else:
        tl.store(op_ptrs, out, mask=real[:, None] & (offs_d[None, :] < HEAD_DIM))


# ---------------------------------------------------------------------------------------
# Merge kernel
# ---------------------------------------------------------------------------------------


@jit
def _merge_kernel(OP, LSEP, O, NUM_SPLITS, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """One (batch, head, token) row: out = sum_s 2^(lse_s - lse) out_s, lse = log2 sum_s 2^lse_s."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse_s = tl.load(LSEP + row * NUM_SPLITS + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse_s - m)  # 0 for the splits that saw nothing
    total = tl.sum(w, 0)
    mask = (offs_s[:, None] < NUM_SPLITS) & (offs_d[None, :] < HEAD_DIM)
    parts = tl.load(OP + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------

KERNELS = {"split": _split_kernel, "merge": _merge_kernel}  # by the kind their launches name

# launch(kind, grid, args, meta): launch KERNELS[kind] over `grid` programs with these
# arguments and keywords (constexprs, num_warps, num_stages).
Launcher = Callable[[str, tuple, tuple, dict], None]


def _pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def num_warps_for(block_m: int, block_d: int) -> int:
    """Warps of the split kernel: 4, or 8 once the fp32 accumulator BLOCK_M x BLOCK_D exceeds
    64 x 128 (at 4 warps it would not fit in registers with the score tile beside it)."""
    return 4 if block_m * block_d <= 64 * 128 else 8


def choose_num_splits(programs: int, span: int, device: torch.device) -> int:
    """Splits per (batch, kv head): enough programs for 2 waves over the SMs, at least
    MIN_KEYS_PER_SPLIT keys each (span: the most keys one sequence visits), at most MAX_SPLITS."""
    sms = DEFAULT_SMS
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(programs, 1))
    most = max(1, -(-span // MIN_KEYS_PER_SPLIT))
    return max(1, min(want, most, MAX_SPLITS))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                     window: int | None = None, scale: float | None = None, sinks: int = 0,
                     kv_lens: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """Attention of Lq query tokens per sequence against a KV cache, split-K (flash-decoding):
    prepare_decode_attention's checks and launch parameters, then its launch (see there)."""
    return prepare_decode_attention(q, k, v, causal=causal, window=window, scale=scale, sinks=sinks,
                                    kv_lens=kv_lens, block_table=block_table, num_splits=num_splits)(q, k, v)


def prepare_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                             window: int | None = None, scale: float | None = None, sinks: int = 0,
                             kv_lens: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                             num_splits: int | None = None, launcher: Launcher | None = None
                             ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Check the arguments and fix the launch parameters once; returns launch(q, k, v) -> out
    for tensors of the same shapes, strides, dtype and device (their values may change), which
    never syncs with the host, so a CUDA graph can capture it. The checks of kv_lens read it
    back to the host here, once.

    q: [B, Hq, Lq, D], Lq in 1..16, the last Lq positions of each sequence (bottom-right).
    Contiguous cache (block_table None): k, v [B, Hkv, Lk, D]; kv_lens None (every sequence
    has Lk keys) or int32 [B] with values in Lq..Lk (keys at and past kv_lens[b] are never read).
    Paged cache: k, v pools [num_pages, page_size, Hkv, D] (vLLM's layout), block_table int32
    [B, max_pages] of pool pages (key j of sequence b: page block_table[b, j // page_size],
    slot j % page_size), kv_lens required, at most max_pages * page_size.
    causal / window (keys, the query's own included) / sinks (keys kept visible beside a
    window): ctxbench.core.masks' rule at position kv_len - Lq + i; a window implies causal.
    scale: multiplies q.k (default 1/sqrt(D)). num_splits: parts the visible keys of each
    (sequence, kv head) are split into (default: choose_num_splits).
    Hq % Hkv == 0 (GQA), D <= 256 (any, padded), fp32/fp16/bf16 (one dtype); softmax
    statistics and partial outputs in fp32. Returns [B, Hq, Lq, D] in q's dtype.
    Whether the launches run compiled or interpreted is decided here (interpreted()).
    launcher: called for each kernel launch instead of launching it (a Launcher; the sm_90
    compile test captures the launches so), leaving the output unwritten.
    """
    if triton is None:
        raise Unsupported(NOT_INSTALLED)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, Hq, Lq, D] (got {tuple(q.shape)})")
    B, Hq, Lq, D = q.shape
    if not 1 <= Lq <= MAX_Q_LEN:
        raise Unsupported(f"triton_decode takes 1..{MAX_Q_LEN} query tokens (got {Lq})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported(f"triton_decode needs q, k, v of one dtype among float32/float16/bfloat16 "
                          f"(got {q.dtype}, {k.dtype}, {v.dtype})")
    if D > MAX_HEAD_DIM:
        raise Unsupported(f"triton_decode supports head_dim <= {MAX_HEAD_DIM} (got {D})")
    if k.dim() != 4 or k.shape != v.shape or k.shape[-1] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must match, with head dim {D}")
    paged = block_table is not None
    if paged:
        if kv_lens is None:
            raise ValueError("a paged cache (block_table) needs kv_lens")
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must be [B={B}, max_pages] (got {tuple(block_table.shape)})")
        page_size, Hkv = k.shape[1], k.shape[2]
        max_len = block_table.shape[1] * page_size
        if page_size & (page_size - 1):
            raise Unsupported(f"triton_decode needs a power-of-two page size (got {page_size})")
    else:
        if k.shape[0] != B:
            raise ValueError(f"k {tuple(k.shape)} must be [B={B}, Hkv, Lk, D]")
        Hkv, max_len, page_size = k.shape[1], k.shape[2], 1
    if Hq % Hkv:
        raise ValueError(f"heads {Hq} not divisible by kv heads {Hkv}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0 (got {sinks})")
    if kv_lens is not None:
        if kv_lens.shape != (B,):
            raise ValueError(f"kv_lens must be [B={B}] (got {tuple(kv_lens.shape)})")
        lo_len, hi_len = (int(x) for x in torch.stack([kv_lens.min(), kv_lens.max()]).tolist())
        if lo_len < Lq or hi_len > max_len:
            raise ValueError(f"kv_lens must lie in [Lq={Lq}, {max_len}] (got {lo_len}..{hi_len}): "
                             "every query token is one of its sequence's keys")
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
    elif max_len < Lq:
        raise ValueError(f"Lk={max_len} keys is fewer than the Lq={Lq} query tokens they must include")
    group = Hq // Hkv
    has_window = window is not None
    w = min(int(window), max_len + 1) if has_window else 0  # W > every kv_len: same visibility, int32 safe
    s = min(int(sinks), max_len) if has_window else 0  # sinks only count beside a window
    span = min(max_len, Lq + w - 1) + s if has_window else max_len
    if num_splits is None:
        num_splits = choose_num_splits(B * Hkv, span, q.device)
    if not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be in 1..1024 (got {num_splits})")
    if B * Hq == 0 or D == 0:
        return lambda q, k, v: torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    block_m = max(16, _pow2(group * Lq))
    block_d = max(16, _pow2(D))
    interp = interpreted()
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    if paged:
        bt = block_table.to(device=q.device, dtype=torch.int32)
        # pools [pages, page, Hkv, D]: (batch unused, head, slot, dim) strides, then the page strides
        k_strides = (0, k.stride(2), k.stride(1), k.stride(3), k.stride(0))
        v_strides = (0, v.stride(2), v.stride(1), v.stride(3), v.stride(0))
        bt_strides = bt.stride()
    else:
        bt = dummy
        k_strides, v_strides, bt_strides = (*k.stride(), 0), (*v.stride(), 0), (0, 0)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_n = BLOCK_N
    warps = num_warps_for(block_m, block_d)
    lens = kv_lens if kv_lens is not None else dummy
    q_strides = q.stride()
    _LAST.clear()
    _LAST.update(interpreted=interp, num_splits=num_splits, block_m=block_m, block_n=block_n, num_warps=warps,
                 paged=paged, grid=(B * Hkv, num_splits))

    split_meta = dict(LQ=Lq, GROUP=group, HEAD_DIM=D, BLOCK_D=block_d, EVEN_D=block_d == D,
                      IS_CAUSAL=bool(causal or has_window), HAS_WINDOW=has_window, HAS_SINKS=s > 0,
                      HAS_LENS=kv_lens is not None, PAGED=paged, PAGE_SIZE=page_size,
                      PRECISION=precision, INTERPRETED=interp, BLOCK_M=block_m, BLOCK_N=block_n,
                      num_warps=warps, num_stages=2)
    merge_meta = dict(HEAD_DIM=D, BLOCK_S=_pow2(num_splits), BLOCK_D=block_d, num_warps=4 if block_d >= 128 else 2)
    kernels = {kind: launchable(kernel, interp) for kind, kernel in KERNELS.items()}

    def launch_kernel(kind: str, grid: tuple, args: tuple, meta: dict) -> None:
        kernels[kind][grid](*args, **meta)
    run = launch_kernel if launcher is None else launcher

    def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
        op = torch.empty((B, Hq, Lq, num_splits, D), dtype=torch.float32, device=q.device)
        lsep = torch.empty((B, Hq, Lq, num_splits), dtype=torch.float32, device=q.device)
        run("split", (B * Hkv, num_splits),
                 (q, k, v, lens, bt, op, lsep,
                  *q_strides, *k_strides[:4], *v_strides[:4], k_strides[4], v_strides[4], *bt_strides,
                  Hkv, max_len, w, s, sm_scale * LOG2E, num_splits), split_meta)
        run("merge", (B * Hq * Lq,), (op, lsep, out, num_splits), merge_meta)
        return out

    if not interp:
        return launch

    def launch_interpreted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with interpreter_scope():
            return launch(q, k, v)
    return launch_interpreted


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


def check(cell: Any) -> str | None:
    """Why `cell` cannot run here, or None: triton missing, not a decode cell (1..MAX_Q_LEN
    query tokens), a head dim over MAX_HEAD_DIM, or its device (triton_common.device_reason;
    the interpreter up to INTERPRETER_MAX_LEN keys)."""
    if triton is None:
        return NOT_INSTALLED
    q_len = getattr(cell, "q_len", cell.n)
    if not 1 <= q_len <= MAX_Q_LEN:
        return f"triton_decode is for decoding: 1..{MAX_Q_LEN} query tokens (got {q_len})"
    if cell.head_dim > MAX_HEAD_DIM:
        return f"triton_decode supports head_dim <= {MAX_HEAD_DIM} (got {cell.head_dim})"
    return device_reason(cell, INTERPRETER_MAX_LEN)


def info() -> dict:
    """Details of the last call: interpreted or compiled, splits, block sizes, layout."""
    return dict(_LAST)


@register("triton_decode", devices=["cpu", "cuda"], dtypes=["float32", "float16", "bfloat16"],
          masks=["none", "causal", "window"], modes=["fwd"], gqa=True, exact=True, sinks=True, kv_cache=True,
          ragged=True, paged=True, max_query_len=MAX_Q_LEN, setup=True,
          description="split-K decode attention in Triton (Lq 1..16, GQA group as M, ragged/paged KV, window/sinks)",
          check=check, info=info)
def triton_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
                  scale: float | None = None, sinks: int = 0, kv_lens: torch.Tensor | None = None,
                  block_table: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    """Split-K (flash-decoding) attention in Triton for 1..16 query tokens against a KV cache.

    Setup: the checks (kv_lens read back once), the number of splits and the strides; the
    timed call is the two kernel launches, with no host sync (CUDA-graph capturable)."""
    if triton is None:
        raise Unsupported(NOT_INSTALLED)
    if q.device.type == "cpu" and not interpreted():
        raise Unsupported("triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1)")
    kwargs = {"causal": causal, "window": window, "scale": scale, "sinks": sinks, "kv_lens": kv_lens,
              "block_table": block_table}
    if q.device.type != "cuda":
        return prepare_decode_attention(q, k, v, **kwargs)
    with torch.cuda.device(q.device):
        launch = prepare_decode_attention(q, k, v, **kwargs)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(q.device):
            return launch(q, k, v)
    return run
