"""triton: a fused flash-attention kernel (forward and backward) written in Triton.

One source runs everywhere: compiled for CUDA GPUs, or executed by Triton's interpreter on
the CPU (slow; for correctness checks at small N only). The algorithm is FlashAttention-2
in the shape of the Triton tutorial's fused attention (06-fused-attention.py), without its
limits: any N >= 1, head dims that are not powers of two, fp32/fp16/bf16, grouped-query
attention, causal and sliding-window masks, non-contiguous inputs, and fewer queries than keys.

Fewer queries than keys (Lq < Lk: chunked prefill against a KV cache). The Lq queries are the
last Lq positions (bottom-right alignment, ctxbench.core.masks): query row i sits at position
p = Q_OFF + i with Q_OFF = Lk - Lq, and every rule below holds with positions in place of rows.
The kernels take N = Lk (keys), N_Q = Lq (query rows) and Q_OFF as int arguments (never
constexprs: one compiled kernel serves every offset); the bounds keep the q side (rows < N_Q)
and the key side (keys < N) apart. A constexpr HAS_OFFSET (Lq < Lk) selects that code: without
it (Lq = Lk) the kernels are the square ones, N_Q = N and Q_OFF = 0 folded away, so they
compile to the same registers as before the offset existed (benchmarks/kernel_stats.py).

Forward (grid: cdiv(N_Q, BLOCK_M) x B*Hq). A query tile stays on chip while K/V tiles stream
through an online softmax (running max and sum in fp32, exp2 with scale*log2(e) folded in).
It writes O and the per-row log-sum-exp (fp32, base 2) for the backward.

Block skipping. For the query block [m0, m0 + BLOCK_M), whose first row sits at position
p0 = m0 + Q_OFF, the visible keys are a contiguous range: lo = max(0, p0 - W + 1) (window) or
0, hi = min(N, p0 + BLOCK_M) (causal) or N. Only the key blocks overlapping [lo, hi) are
visited, in three loops:
  [lo, full_lo)       masked: the window's low edge cuts through these blocks,
  [full_lo, full_hi)  unmasked: every (row, key) pair of the tile is visible,
  [full_hi, hi)       masked: the diagonal and/or the end of the sequence (key N).
full_lo is the first block whose keys every real row (< N_Q) of the query block can see from
below, full_hi ends the last block entirely at or below the diagonal of the query block's first
row and entirely inside the sequence; both are clamped into [lo, hi) so the three loops always
partition the visited blocks, whatever BLOCK_M / BLOCK_N, N_Q and N are (no divisibility
needed). The backward uses the same bounds transposed (the query blocks that can see a key
block), in query-row coordinates: key j sits at j - Q_OFF there, which makes the mask the
square one of N_Q rows (a key block before the first query's position starts below row 0, so
with HAS_OFFSET those bounds are clamped at 0 before dividing: triton's integer division
truncates). A window W >= N (the keys) is clamped to N (same visibility: no query sits past
key N - 1), which keeps all bound arithmetic in int32 (positions, N + BLOCK_M and W < 2^31).

Attention sinks (StreamingLLM: with a window, keys j < S stay visible to every query i >= j).
The band loops stay as they are, with S in their masks; the sink keys left of a query block's
band (below lo, so already causal for all its rows) add at most two loops: [0, S // BLOCK_N
blocks) unmasked and the block cut by S masked. Transposed, a key block holding sinks adds the
query blocks past its band's end, up to N. Work stays O(N * (W + S)).

Backward: a preprocess computes Delta = rowsum(dO * O) over the N_Q rows; a dK/dV kernel
(grid: key blocks x B*Hkv; keys that no query sees get dK = dV = 0) loops over the `group`
query heads sharing its kv head, so GQA needs neither copies of K/V nor atomics for dK, dV.
dQ comes one of two ways (the fused_dq setting, CTXBENCH_TRITON_FUSED_DQ):
  fused     each dK/dV tile also computes dS K and adds it into an fp32 dQ with atomic adds;
            a small kernel then scales and casts it: 5 matmuls per tile pair, FlashAttention-2's;
  separate  a dQ kernel (grid: query blocks x B*Hq) mirrors the forward and recomputes S, P
            and dP: 7 matmuls per tile pair, no atomics.
"auto" (the default) fuses for fp16/bf16 with D <= 64; at D=128 the fused dK/dV program
spills registers on sm_90 in every configuration but one tile shape under triton 3.6 (see
triton_configs.NO_SPILL), and fp32 (FMAs) spills badly, so those take the separate kernel until a GPU says
which is faster (benchmarks/gpu_check.sh times both at D=128).
A key block crossing N is masked against every query block (its padding keys must get dS = 0).

Precision: fp16/bf16 inputs use tensor cores with fp32 accumulation, P and dS rounded to the
input dtype as in FlashAttention. fp32 inputs use input_precision="ieee" by default (true
fp32 products, held to the fp32 tolerance; no tensor cores, so slower); set
CTXBENCH_TRITON_FP32_PRECISION=tf32 (or the fp32_precision setting) to benchmark fp32 on tf32
tensor cores instead. The choice is reported through info().

Interpreter. Each call decides whether its kernels run compiled or in Triton's interpreter:
interpreted when TRITON_INTERPRET says so or, if it is unset, when the machine has no CUDA
(triton_interpreter.interpreted), whatever imported triton first (triton_interpreter explains
how). The INTERPRETED constexpr is True only under the interpreter (always False when compiled,
so compiled kernels are unchanged by it) and changes two things there:
  Loops: each K/V (or Q) loop is a `for ... in range(start, end, BLOCK)` when compiled, which
    triton pipelines (num_stages), and a `while` loop over the same tile body (_fwd_tile,
    _bwd_dkdv_tile, _bwd_dq_tile) when interpreted: triton 3.6's interpreter turns the bounds
    into Python ints with int() on 1-element arrays, which NumPy >= 2.4 refuses ("only
    0-dimensional arrays can be converted to Python scalars"), whereas `while start < end`
    only needs their truth value. The compiled code is the same as with one plain loop (the
    tile bodies are inlined; benchmarks/kernel_stats.py's ptx_sha compares).
  bf16 dots: triton 3.9's interpreter computes tl.dot on bf16 from the raw bit patterns
    (triton-lang/triton#11584, "not supported yet"), so bf16 dot operands are widened to fp32
    first (exact).
Everything else is the same code on the CPU and on GPUs. Tested with triton 3.6 (the GPU
image's) and 3.9: benchmarks/triton_versions.sh.

Schedule: under a causal mask the query blocks of the forward and dQ kernels start heaviest
first (the last block, which sees the most keys, has program id 0: _heaviest_first); with an
offset too (the last query block still sees the most keys, key block 0 the most queries).

Settings (triton_settings.TritonSettings): a call's `settings`, or else the CTXBENCH_TRITON_*
variables as they are at that call (never at import):
  autotune        on CUDA, autotune the block sizes (default; CTXBENCH_TRITON_AUTOTUNE=0 off).
  space           "full" (default) or "check" (CTXBENCH_TRITON_SPACE): the autotuning space, or
                  the GPU check's few configurations (triton_configs.CHECK_SPACE).
  fp32_precision  "ieee" (default) or "tf32"/"tf32x3" for fp32 inputs
                  (CTXBENCH_TRITON_FP32_PRECISION).
  fused_dq        "auto" (default), "1" or "0" (CTXBENCH_TRITON_FUSED_DQ): the backward's dQ,
                  fused into dK/dV with atomics or from a kernel of its own (see Backward).
  count_visits    debug: every kernel counts the blocks it visits per program into
                  `last_visits`, and the order its programs started in into `last_order`
                  (fixed configs, no autotuning); tests compare with the mask (Lq <= Lk).
  configs, tuners fixed configs or autotuners of one's own, by kernel (tests, tools).

This module holds the kernels and their launches. Their configurations and autotuning space
are triton_configs' (data that changes with the Triton version), the settings
triton_settings', the matmul helpers and device checks shared with triton_decode
triton_common's, and the choice between compiling and interpreting triton_interpreter's.
"""

import functools
import math
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ctxbench.kernels.triton_common import NOT_INSTALLED, device_reason, jit, mm, mma
from ctxbench.kernels.triton_configs import (INTERPRETER_CONFIGS, INTERPRETER_PRE_BLOCK_M, KINDS, PRE_BLOCK_M,
                                             TUNE_KEY, Config, default_config, describe, from_triton, fused_dq,
                                             prune, to_triton, tuning_space, uses_fma)
from ctxbench.kernels.triton_interpreter import interpreted, launch_scope, launchable
from ctxbench.kernels.triton_settings import TritonSettings
from ctxbench.registry import Unsupported, register

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports and registers `triton`, as unsupported
    triton = None
    tl = SimpleNamespace(constexpr=None)  # for the annotations below; no kernel runs

INTERPRETER_MAX_LEN = 512  # keys; more on the CPU needs --allow-interpreter
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634

# settings.count_visits: per kernel kind, (visits [heads, blocks], BLOCK_M, BLOCK_N) and the
# programs' launch ranks [heads, blocks] of the last call
last_visits: dict = {}
last_order: dict = {}
_LAST: dict = {}  # info(): the last call's details


# ---------------------------------------------------------------------------------------
# Tile loads. Rows are bounds-checked only where a tile may cross N (masked loops); the
# head-dim axis only when D is padded up to BLOCK_D (EVEN_D false).
# ---------------------------------------------------------------------------------------


@jit
def _load_rows(ptrs, rows, offs_d, N, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               EVEN_D: tl.constexpr):
    """A [R, BLOCK_D] tile: rows along axis 0, head dim along axis 1."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=rows[:, None] < N, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@jit
def _load_cols(ptrs, cols, offs_d, N, CHECK_COLS: tl.constexpr, HEAD_DIM: tl.constexpr,
               EVEN_D: tl.constexpr):
    """A transposed [BLOCK_D, C] tile: head dim along axis 0, rows of the tensor along axis 1."""
    if CHECK_COLS:
        if EVEN_D:
            x = tl.load(ptrs, mask=cols[None, :] < N, other=0.0)
        else:
            x = tl.load(ptrs, mask=(cols[None, :] < N) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    return x


@jit
def _store_rows(ptrs, x, rows, offs_d, N, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr):
    if EVEN_D:
        tl.store(ptrs, x, mask=rows[:, None] < N)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM))




@jit
def _visible(rows, cols, N, WINDOW, SINKS, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
             HAS_SINKS: tl.constexpr):
    """[len(rows), len(cols)] visibility (ctxbench.core.masks convention), keys >= N invisible:
    key j is visible to the query at position p iff j <= p and (p - WINDOW < j or j < SINKS).
    rows are query positions (row + Q_OFF), N the number of keys."""
    ok = cols[None, :] < N
    if IS_CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if HAS_WINDOW:
        band = cols[None, :] > rows[:, None] - WINDOW
        if HAS_SINKS:
            band = band | (cols[None, :] < SINKS)
        ok = ok & band
    return ok


@jit
def _visible_t(cols, rows, N, WINDOW, SINKS, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SINKS: tl.constexpr):
    """The transpose of _visible: [len(cols), len(rows)], query rows >= N invisible, and keys
    >= N (under a causal mask no row < N sees them anyway). The dK/dV kernel calls it in
    query-row coordinates, where the mask is square: rows are query rows, N their count N_Q,
    cols the keys' positions minus Q_OFF and SINKS the sinks' end minus Q_OFF."""
    ok = rows[None, :] < N
    if IS_CAUSAL:
        ok = ok & (rows[None, :] >= cols[:, None])
    else:
        ok = ok & (cols[:, None] < N)
    if HAS_WINDOW:
        band = rows[None, :] < cols[:, None] + WINDOW
        if HAS_SINKS:
            band = band | (cols[:, None] < SINKS)
        ok = ok & band
    return ok


@jit
def _key_bounds(start_m, N, N_Q, Q_OFF, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Key-block bounds (multiples of BLOCK_N) for the query block starting at row start_m:
    N keys, N_Q query rows, row i at position Q_OFF + i (Q_OFF = N - N_Q).

    Returns lo <= full_lo <= full_hi <= hi: [lo, hi) covers every key block holding a key
    some row of the block can see; [full_lo, full_hi) are the blocks needing no mask.
    Every numerator of a division is >= 0 (triton's integer division truncates).
    """
    pos = start_m + Q_OFF  # the position of the block's first row
    if HAS_WINDOW:
        lo = tl.maximum(pos - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        # every real row (< N_Q), at a position p < min(start_m + BLOCK_M, N_Q) + Q_OFF, sees
        # the keys > p - WINDOW: full from here up
        last = tl.minimum(start_m + BLOCK_M, N_Q) + Q_OFF
        full_lo = (tl.maximum(last - WINDOW, lo) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    else:
        lo = start_m * 0
        full_lo = lo
    full_hi = N // BLOCK_N * BLOCK_N
    if IS_CAUSAL:
        hi = tl.minimum(N, pos + BLOCK_M)
        # the block's first row sees the keys <= pos
        full_hi = tl.minimum(full_hi, (pos + 1) // BLOCK_N * BLOCK_N)
    else:
        hi = start_m * 0 + N
    hi = (hi + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@jit
def _clamp0(x, ON: tl.constexpr):
    """max(x, 0) when ON, else x (known >= 0)."""
    if ON:
        x = tl.maximum(x, 0)
    return x


@jit
def _query_bounds(start_n, N, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """Query-block bounds (multiples of BLOCK_M) for the key block starting at start_n, in
    query-row coordinates (see _bwd_dkdv_kernel): N query rows, key j at j - Q_OFF, so that
    start_n may be negative (only when HAS_OFFSET) and the keys end at N too.

    Query i sees key j when j <= i (causal) and i < j + WINDOW (window): the rows that see
    keys [start_n, start_n + BLOCK_N) are [start_n, start_n + BLOCK_N - 1 + WINDOW), clipped
    to [0, N). With HAS_OFFSET the numerators of lo, full_lo and hi are clamped to >= 0
    (triton's integer division truncates, the interpreter's floors; without an offset they
    are >= 0 already); full_hi's needs no clamp (see there).
    """
    if IS_CAUSAL:
        lo = _clamp0(start_n, HAS_OFFSET) // BLOCK_M * BLOCK_M
        # a query block is below the diagonal once its first row sees the block's last real key
        last_key = tl.minimum(start_n + BLOCK_N, N) - 1
        full_lo = (_clamp0(last_key, HAS_OFFSET) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        lo = start_n * 0
        full_lo = lo
    full_hi = N // BLOCK_M * BLOCK_M
    if not IS_CAUSAL:
        # the key block crossing N: its padding keys must get dS = 0 (it feeds dQ), so every
        # query block is masked (with a causal mask they are: no row < N sees a key >= N)
        full_hi = tl.where(start_n + BLOCK_N > N, full_lo, full_hi)
    if HAS_WINDOW:
        # 0 (empty) for a key block left of every query's window
        hi = _clamp0(tl.minimum(N, start_n + BLOCK_N - 1 + WINDOW), HAS_OFFSET)
        # its last row must still see the block's first key: m0 + BLOCK_M <= start_n + WINDOW
        # (a negative start_n + WINDOW rounds to <= 0 either way: full_hi then ends at full_lo
        # >= 0 below, so it needs no clamp, which would cost the tight dK/dV configs a register)
        full_hi = tl.minimum(full_hi, (start_n + WINDOW) // BLOCK_M * BLOCK_M)
    else:
        hi = start_n * 0 + N
    hi = (hi + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@jit
def _sink_key_bounds(lo, SINKS, BLOCK_N: tl.constexpr):
    """Sink key blocks left of the band [lo, hi) of a query block: [0, full) hold sinks only,
    [full, end) are cut by SINKS. Every row of the block sees a sink key j < lo (j < lo <= its
    first row), so only the cut needs a mask. Empty when the band reaches key 0."""
    end = tl.minimum((SINKS + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo)
    full = tl.minimum(SINKS // BLOCK_N * BLOCK_N, lo)
    return full, end


@jit
def _sink_query_bounds(start_n, hi, N, SINKS, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks past the band's end hi that see sink keys of the key block at start_n:
    all of them up to N when the block holds a sink. [hi, full) need no mask (the key block
    is sinks only, rows inside the sequence), [full, end) do. Empty for other key blocks.
    In query-row coordinates, as _query_bounds (start_n and SINKS minus Q_OFF)."""
    end = tl.where(start_n < SINKS, (N + BLOCK_M - 1) // BLOCK_M * BLOCK_M, hi)
    full = tl.where(start_n + BLOCK_N <= SINKS, N // BLOCK_M * BLOCK_M, hi)
    full = tl.maximum(tl.minimum(full, end), hi)
    return full, end


@jit
def _heaviest_first(pid, num, IS_CAUSAL: tl.constexpr):
    """The query block a program works on. Blocks start in launch order (program id 0 first,
    head by head), and under a causal mask the last query block sees the most keys: reversed,
    the longest rows start first and the shortest fill the last wave. (A window or sinks keep
    this order: every block's work is then about the same except the first, lighter ones.)
    Key blocks (dK/dV) need no reversal: under a causal mask block 0 has the most queries."""
    if IS_CAUSAL:
        pid = num - 1 - pid
    return pid


@jit
def _count(Visits, visits, block):
    """count_visits: add this program's visits at [head, block], and record when it ran: its
    launch rank (an atomic counter after the visits and ranks) at [head, block] of the ranks."""
    size = tl.num_programs(0) * tl.num_programs(1)
    slot = tl.program_id(1) * tl.num_programs(0) + block
    tl.atomic_add(Visits + slot, visits)
    tl.store(Visits + size + slot, tl.atomic_add(Visits + 2 * size, 1))


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------


@jit
def _fwd_tile(acc, l_i, m_i, visits, q, kt_ptrs, v_ptrs, start_n, pos_m, offs_n, offs_d, N, WINDOW, SINKS,
              qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
              PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, COUNT: tl.constexpr):
    """One K/V tile of the online softmax: the body of _fwd_inner's loop (pos_m: the query
    rows' positions, N: the number of keys)."""
    cols = start_n + offs_n
    kt = _load_cols(kt_ptrs, cols, offs_d, N, MASKED, HEAD_DIM, EVEN_D)
    qk = mm(q, kt, PRECISION, INTERPRETED)
    if MASKED:
        ok = _visible(pos_m, cols, N, WINDOW, SINKS, IS_CAUSAL, HAS_WINDOW, HAS_SINKS)
        qk = tl.where(ok, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = _load_rows(v_ptrs, cols, offs_d, N, MASKED, HEAD_DIM, EVEN_D)
    acc = mma(p.to(v.dtype), v, acc, PRECISION, INTERPRETED)
    if COUNT:  # low 16 bits: blocks visited; high bits: those that paid for masking
        if MASKED:
            visits += 65537
        else:
            visits += 1
    return acc, l_i, m_ij, visits


@jit
def _fwd_inner(acc, l_i, m_i, visits, q, k_base, v_base, start, end, pos_m, offs_n, offs_d,
               stride_kn, stride_kd, stride_vn, stride_vd, N, WINDOW, SINKS, qk_scale,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_SINKS: tl.constexpr,
               HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
               PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, COUNT: tl.constexpr):
    # K^T tiles are [BLOCK_D, BLOCK_N], V tiles [BLOCK_N, BLOCK_D]; the start row in int64.
    row0 = start.to(tl.int64)
    kt_ptrs = k_base + row0 * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_ptrs = v_base + row0 * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    if INTERPRETED:  # a while loop: see "Loops" in the module docstring
        start_n = start
        while start_n < end:
            acc, l_i, m_i, visits = _fwd_tile(acc, l_i, m_i, visits, q, kt_ptrs, v_ptrs, start_n, pos_m, offs_n,
                                              offs_d, N, WINDOW, SINKS, qk_scale, MASKED, IS_CAUSAL, HAS_WINDOW,
                                              HAS_SINKS, HEAD_DIM, EVEN_D, PRECISION, INTERPRETED, COUNT)
            kt_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
            start_n += BLOCK_N
    else:
        for start_n in range(start, end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            acc, l_i, m_i, visits = _fwd_tile(acc, l_i, m_i, visits, q, kt_ptrs, v_ptrs, start_n, pos_m, offs_n,
                                              offs_d, N, WINDOW, SINKS, qk_scale, MASKED, IS_CAUSAL, HAS_WINDOW,
                                              HAS_SINKS, HEAD_DIM, EVEN_D, PRECISION, INTERPRETED, COUNT)
            kt_ptrs += BLOCK_N * stride_kn
            v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i, visits


@jit
def _fwd_kernel(Q, K, V, O, LSE, Visits,
                stride_qb, stride_qh, stride_qn, stride_qd,
                stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_ob, stride_oh, stride_on, stride_od,
                H, N, N_Q, Q_OFF, WINDOW, SINKS, qk_scale,
                N_BUCKET, NQ_BUCKET, W_BUCKET,  # autotuning keys only
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                HAS_SINKS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, COUNT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = _heaviest_first(tl.program_id(0), tl.num_programs(0), IS_CAUSAL)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    off_hk = (off_h // GROUP).to(tl.int64)  # GQA: the kv head, indexed, never copied
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    if HAS_OFFSET:  # fewer queries than keys: row i sits at position Q_OFF + i
        n_q = N_Q
        q_off = Q_OFF
    else:  # Lq = Lk: the code of a square problem, as if there were no offset
        n_q = N
        q_off = 0

    offs_m = start_m + tl.arange(0, BLOCK_M)
    # query positions, what the masks compare; rows < n_q are the positions < N, so that every
    # row mask uses pos_m too (one index vector: offs_m is not needed past the Q load)
    pos_m = offs_m + q_off
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = start_m.to(tl.int64)
    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qn
              + tl.arange(0, BLOCK_M)[:, None] * stride_qn + offs_d[None, :] * stride_qd)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh

    # m_i starts finite: a row whose keys in a masked block are all hidden keeps p = 0 and
    # alpha = 1 instead of computing (-inf) - (-inf).
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visits = pid_m * 0
    q = _load_rows(q_ptrs, pos_m, offs_d, N, True, HEAD_DIM, EVEN_D)

    lo, full_lo, full_hi, hi = _key_bounds(start_m, N, n_q, q_off, WINDOW, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_SINKS:  # attention sinks left of the band: whole blocks, then the one cut by SINKS
        sink_full, sink_end = _sink_key_bounds(lo, SINKS, BLOCK_N)
        acc, l_i, m_i, visits = _fwd_inner(acc, l_i, m_i, visits, q, k_base, v_base, lo * 0, sink_full,
                                           pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                           stride_vd, N, WINDOW, SINKS, qk_scale, False, IS_CAUSAL,
                                           HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                                           INTERPRETED, COUNT)
        acc, l_i, m_i, visits = _fwd_inner(acc, l_i, m_i, visits, q, k_base, v_base, sink_full, sink_end,
                                           pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                           stride_vd, N, WINDOW, SINKS, qk_scale, True, IS_CAUSAL,
                                           HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                                           INTERPRETED, COUNT)
    if HAS_WINDOW:  # blocks cut by the window's low edge
        acc, l_i, m_i, visits = _fwd_inner(acc, l_i, m_i, visits, q, k_base, v_base, lo, full_lo,
                                           pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                           stride_vd, N, WINDOW, SINKS, qk_scale, True, IS_CAUSAL,
                                           HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                                           INTERPRETED, COUNT)
    acc, l_i, m_i, visits = _fwd_inner(acc, l_i, m_i, visits, q, k_base, v_base, full_lo, full_hi,
                                       pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                       stride_vd, N, WINDOW, SINKS, qk_scale, False, IS_CAUSAL,
                                       HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                                       INTERPRETED, COUNT)
    # the diagonal and the sequence end (key N)
    acc, l_i, m_i, visits = _fwd_inner(acc, l_i, m_i, visits, q, k_base, v_base, full_hi, hi,
                                       pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                       stride_vd, N, WINDOW, SINKS, qk_scale, True, IS_CAUSAL,
                                       HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_N, PRECISION,
                                       INTERPRETED, COUNT)

    # Epilogue. Rows >= n_q (padding of the last block, positions >= N) may have l_i = 0; they
    # are not stored. LSE is [B, Hq, n_q]: indexed by position from its row -q_off.
    l_i = tl.where(pos_m < N, l_i, 1.0)
    lse = m_i + tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    tl.store(LSE + (pid_bh.to(tl.int64) * n_q - q_off) + pos_m, lse, mask=pos_m < N)
    o_ptrs = (O + off_b * stride_ob + off_h * stride_oh + row0 * stride_on
              + tl.arange(0, BLOCK_M)[:, None] * stride_on + offs_d[None, :] * stride_od)
    _store_rows(o_ptrs, acc.to(O.dtype.element_ty), pos_m, offs_d, N, HEAD_DIM, EVEN_D)
    if COUNT:
        _count(Visits, visits, pid_m)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------


@jit
def _bwd_preprocess(O, DO, Delta,
                    stride_ob, stride_oh, stride_on, stride_od,
                    stride_dob, stride_doh, stride_don, stride_dod,
                    H, N, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32 (N: the query rows)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    rel = tl.arange(0, BLOCK_M)[:, None]
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + row0 * stride_on
                + rel * stride_on + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + row0 * stride_don
                 + rel * stride_don + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + pid_bh.to(tl.int64) * N + rows, delta, mask=rows < N)


@jit
def _bwd_dkdv_tile(dk, dv, visits, k, v, qt_ptrs, do_ptrs, dq_ptrs, lse_base, delta_base, start_m, offs_n,
                   offs_d, N, WINDOW, SINKS, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
                   INTERPRETED: tl.constexpr, COUNT: tl.constexpr, FUSED_DQ: tl.constexpr):
    """One query tile of a key block's dK, dV (and, FUSED_DQ, its dQ contribution): the body
    of _bwd_dkdv_inner's loop. Matmuls: S^T = K Q^T, dV += P^T dO, dP^T = V dO^T,
    dK += dS^T Q, and with FUSED_DQ dQ += dS K (5 in all, FlashAttention-2's count).
    In query-row coordinates (see _bwd_dkdv_kernel): start_m and rows are query rows, N the
    query rows' count, offs_n the keys' positions minus Q_OFF and SINKS the sinks' likewise."""
    rows = start_m + tl.arange(0, BLOCK_M)
    qt = _load_cols(qt_ptrs, rows, offs_d, N, MASKED, HEAD_DIM, EVEN_D)
    if MASKED:
        # rows >= N get lse = +inf, so their p is exactly 0
        lse = tl.load(lse_base + rows, mask=rows < N, other=float("inf"))
    else:
        lse = tl.load(lse_base + rows)
    qkt = mm(k, qt, PRECISION, INTERPRETED)
    st = qkt * qk_scale - lse[None, :]
    if MASKED:  # hidden pairs get exp2(-inf) = 0
        ok = _visible_t(offs_n, rows, N, WINDOW, SINKS, IS_CAUSAL, HAS_WINDOW, HAS_SINKS)
        st = tl.where(ok, st, float("-inf"))
    pt = tl.math.exp2(st)
    do = _load_rows(do_ptrs, rows, offs_d, N, MASKED, HEAD_DIM, EVEN_D)
    dv = mma(pt.to(do.dtype), do, dv, PRECISION, INTERPRETED)
    if MASKED:
        delta = tl.load(delta_base + rows, mask=rows < N, other=0.0)
    else:
        delta = tl.load(delta_base + rows)
    dpt = mm(v, tl.trans(do), PRECISION, INTERPRETED)
    dst = (pt * (dpt - delta[None, :])).to(qt.dtype)
    dk = mma(dst, tl.trans(qt), dk, PRECISION, INTERPRETED)
    if FUSED_DQ:  # this key block's share of dQ for these rows, summed over key blocks in fp32
        dq = mm(tl.trans(dst), k, PRECISION, INTERPRETED)
        if MASKED:
            if EVEN_D:
                tl.atomic_add(dq_ptrs, dq, mask=rows[:, None] < N, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=(rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
        else:
            if EVEN_D:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, mask=offs_d[None, :] < HEAD_DIM, sem="relaxed")
    if COUNT:  # low 16 bits: blocks visited; high bits: those that paid for masking
        if MASKED:
            visits += 65537
        else:
            visits += 1
    return dk, dv, visits


@jit
def _bwd_dkdv_inner(dk, dv, visits, k, v, q_base, do_base, dq_base, lse_base, delta_base, start, end,
                    offs_n, offs_d, stride_qn, stride_qd, stride_don, stride_dod,
                    N, WINDOW, SINKS, qk_scale,
                    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_SINKS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, COUNT: tl.constexpr,
                    FUSED_DQ: tl.constexpr):
    # Works on transposed scores: S^T = K Q^T is [BLOCK_N, BLOCK_M].
    offs_m = tl.arange(0, BLOCK_M)
    row0 = start.to(tl.int64)
    qt_ptrs = q_base + row0 * stride_qn + offs_m[None, :] * stride_qn + offs_d[:, None] * stride_qd
    do_ptrs = do_base + row0 * stride_don + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    # the fp32 dQ accumulator is [B, H, N, HEAD_DIM] (N query rows here), contiguous
    dq_ptrs = dq_base + row0 * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    if INTERPRETED:  # a while loop: see "Loops" in the module docstring
        start_m = start
        while start_m < end:
            dk, dv, visits = _bwd_dkdv_tile(dk, dv, visits, k, v, qt_ptrs, do_ptrs, dq_ptrs, lse_base, delta_base,
                                            start_m, offs_n, offs_d, N, WINDOW, SINKS, qk_scale, MASKED,
                                            IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_M, PRECISION,
                                            INTERPRETED, COUNT, FUSED_DQ)
            qt_ptrs += BLOCK_M * stride_qn
            do_ptrs += BLOCK_M * stride_don
            dq_ptrs += BLOCK_M * HEAD_DIM
            start_m += BLOCK_M
    else:
        for start_m in range(start, end, BLOCK_M):
            start_m = tl.multiple_of(start_m, BLOCK_M)
            dk, dv, visits = _bwd_dkdv_tile(dk, dv, visits, k, v, qt_ptrs, do_ptrs, dq_ptrs, lse_base, delta_base,
                                            start_m, offs_n, offs_d, N, WINDOW, SINKS, qk_scale, MASKED,
                                            IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_M, PRECISION,
                                            INTERPRETED, COUNT, FUSED_DQ)
            qt_ptrs += BLOCK_M * stride_qn
            do_ptrs += BLOCK_M * stride_don
            dq_ptrs += BLOCK_M * HEAD_DIM
    return dk, dv, visits


@jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, DQ_ACC, Visits,
                     stride_qb, stride_qh, stride_qn, stride_qd,
                     stride_kb, stride_kh, stride_kn, stride_kd,
                     stride_vb, stride_vh, stride_vn, stride_vd,
                     stride_dob, stride_doh, stride_don, stride_dod,
                     stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                     stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                     HKV, N, N_Q, Q_OFF, WINDOW, SINKS, qk_scale, sm_scale,
                     N_BUCKET, NQ_BUCKET, W_BUCKET,  # autotuning keys only
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_SINKS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, COUNT: tl.constexpr,
                     FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)  # over B * Hkv
    off_b = (pid_bh // HKV).to(tl.int64)
    off_hk = (pid_bh % HKV).to(tl.int64)
    start_n = pid_n * BLOCK_N
    if HAS_OFFSET:  # fewer queries than keys: row i sits at position Q_OFF + i
        n_q = N_Q
        q_off = Q_OFF
    else:  # Lq = Lk: the code of a square problem, as if there were no offset
        n_q = N
        q_off = 0
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = start_n.to(tl.int64)
    rel = tl.arange(0, BLOCK_N)[:, None]

    # K and V of this key block stay on chip for every query block of every head in the group.
    k = _load_rows(K + off_b * stride_kb + off_hk * stride_kh + row0 * stride_kn + rel * stride_kn
                   + offs_d[None, :] * stride_kd, offs_n, offs_d, N, True, HEAD_DIM, EVEN_D)
    v = _load_rows(V + off_b * stride_vb + off_hk * stride_vh + row0 * stride_vn + rel * stride_vn
                   + offs_d[None, :] * stride_vd, offs_n, offs_d, N, True, HEAD_DIM, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    visits = pid_n * 0

    # Query-row coordinates: the query at position Q_OFF + i is row i, and key j sits at
    # j - Q_OFF, so that row i sees it exactly when that query sees key j and the mask is the
    # square one of n_q rows (key j < N iff j - Q_OFF < n_q). SINKS comes shifted already
    # (the sinks' end minus Q_OFF). With Lq = Lk (no HAS_OFFSET) nothing moves.
    rel_n = start_n - q_off
    keys_rel = offs_n - q_off
    lo, full_lo, full_hi, hi = _query_bounds(rel_n, n_q, WINDOW, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW, HAS_OFFSET)
    if HAS_SINKS:
        sink_full, sink_end = _sink_query_bounds(rel_n, hi, n_q, SINKS, BLOCK_M, BLOCK_N)
    H = HKV * GROUP
    for g in range(GROUP):  # GQA: sum the contributions of every query head of this kv head
        off_h = off_hk * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + (off_b * H + off_h) * n_q
        delta_base = Delta + (off_b * H + off_h) * n_q
        dq_base = DQ_ACC + (off_b * H + off_h) * n_q * HEAD_DIM
        if IS_CAUSAL:  # query blocks crossing the diagonal
            dk, dv, visits = _bwd_dkdv_inner(dk, dv, visits, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                                             lo, full_lo, keys_rel, offs_d, stride_qn, stride_qd,
                                             stride_don, stride_dod, n_q, WINDOW, SINKS, qk_scale,
                                             True, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_M,
                                             PRECISION, INTERPRETED, COUNT, FUSED_DQ)
        dk, dv, visits = _bwd_dkdv_inner(dk, dv, visits, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                                         full_lo, full_hi, keys_rel, offs_d, stride_qn, stride_qd,
                                         stride_don, stride_dod, n_q, WINDOW, SINKS, qk_scale,
                                         False, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_M,
                                         PRECISION, INTERPRETED, COUNT, FUSED_DQ)
        # query blocks crossing the window's far edge, and the sequence end
        dk, dv, visits = _bwd_dkdv_inner(dk, dv, visits, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                                         full_hi, hi, keys_rel, offs_d, stride_qn, stride_qd,
                                         stride_don, stride_dod, n_q, WINDOW, SINKS, qk_scale,
                                         True, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D, BLOCK_M,
                                         PRECISION, INTERPRETED, COUNT, FUSED_DQ)
        if HAS_SINKS:  # a key block holding sinks is seen by every later query row
            dk, dv, visits = _bwd_dkdv_inner(dk, dv, visits, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                                             hi, sink_full, keys_rel, offs_d, stride_qn, stride_qd,
                                             stride_don, stride_dod, n_q, WINDOW, SINKS, qk_scale,
                                             False, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D,
                                             BLOCK_M, PRECISION, INTERPRETED, COUNT, FUSED_DQ)
            dk, dv, visits = _bwd_dkdv_inner(dk, dv, visits, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                                             sink_full, sink_end, keys_rel, offs_d, stride_qn, stride_qd,
                                             stride_don, stride_dod, n_q, WINDOW, SINKS, qk_scale,
                                             True, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D,
                                             BLOCK_M, PRECISION, INTERPRETED, COUNT, FUSED_DQ)

    dk = dk * sm_scale
    _store_rows(DK + off_b * stride_dkb + off_hk * stride_dkh + row0 * stride_dkn + rel * stride_dkn
                + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), offs_n, offs_d, N,
                HEAD_DIM, EVEN_D)
    _store_rows(DV + off_b * stride_dvb + off_hk * stride_dvh + row0 * stride_dvn + rel * stride_dvn
                + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), offs_n, offs_d, N,
                HEAD_DIM, EVEN_D)
    if COUNT:
        _count(Visits, visits, pid_n)


@jit
def _bwd_dq_cast(DQ_ACC, DQ, stride_dqb, stride_dqh, stride_dqn, stride_dqd, H, N, sm_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """FUSED_DQ: dQ = sm_scale * DQ_ACC (the fp32 sum of the dK/dV programs' atomic adds,
    [B, H, N, HEAD_DIM] contiguous, N the query rows), in dQ's dtype and strides."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    rel = tl.arange(0, BLOCK_M)[:, None]
    acc = tl.load(DQ_ACC + (pid_bh.to(tl.int64) * N + row0) * HEAD_DIM + rel * HEAD_DIM + offs_d[None, :],
                  mask=mask, other=0.0)
    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqn + rel * stride_dqn
             + offs_d[None, :] * stride_dqd, (acc * sm_scale).to(DQ.dtype.element_ty), mask=mask)


@jit
def _bwd_dq_tile(dq, visits, q, do, lse, delta, kt_ptrs, vt_ptrs, start_n, pos_m, offs_n, offs_d, N, WINDOW,
                 SINKS, qk_scale, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_SINKS: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, COUNT: tl.constexpr):
    """One K/V tile of a query block's dQ: the body of _bwd_dq_inner's loop (pos_m: the query
    rows' positions, N: the number of keys)."""
    cols = start_n + offs_n
    kt = _load_cols(kt_ptrs, cols, offs_d, N, MASKED, HEAD_DIM, EVEN_D)
    vt = _load_cols(vt_ptrs, cols, offs_d, N, MASKED, HEAD_DIM, EVEN_D)
    qk = mm(q, kt, PRECISION, INTERPRETED)
    s = qk * qk_scale - lse[:, None]
    if MASKED:
        s = tl.where(_visible(pos_m, cols, N, WINDOW, SINKS, IS_CAUSAL, HAS_WINDOW, HAS_SINKS), s, float("-inf"))
    p = tl.math.exp2(s)
    dp = mm(do, vt, PRECISION, INTERPRETED)
    ds = p * (dp - delta[:, None])
    dq = mma(ds.to(kt.dtype), tl.trans(kt), dq, PRECISION, INTERPRETED)
    if COUNT:  # low 16 bits: blocks visited; high bits: those that paid for masking
        if MASKED:
            visits += 65537
        else:
            visits += 1
    return dq, visits


@jit
def _bwd_dq_inner(dq, visits, q, do, lse, delta, k_base, v_base, start, end, pos_m, offs_n, offs_d,
                  stride_kn, stride_kd, stride_vn, stride_vd, N, WINDOW, SINKS, qk_scale,
                  MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SINKS: tl.constexpr,
                  HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, COUNT: tl.constexpr):
    row0 = start.to(tl.int64)
    kt_ptrs = k_base + row0 * stride_kn + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vt_ptrs = v_base + row0 * stride_vn + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd
    if INTERPRETED:  # a while loop: see "Loops" in the module docstring
        start_n = start
        while start_n < end:
            dq, visits = _bwd_dq_tile(dq, visits, q, do, lse, delta, kt_ptrs, vt_ptrs, start_n, pos_m, offs_n,
                                      offs_d, N, WINDOW, SINKS, qk_scale, MASKED, IS_CAUSAL, HAS_WINDOW, HAS_SINKS,
                                      HEAD_DIM, EVEN_D, PRECISION, INTERPRETED, COUNT)
            kt_ptrs += BLOCK_N * stride_kn
            vt_ptrs += BLOCK_N * stride_vn
            start_n += BLOCK_N
    else:
        for start_n in range(start, end, BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            dq, visits = _bwd_dq_tile(dq, visits, q, do, lse, delta, kt_ptrs, vt_ptrs, start_n, pos_m, offs_n,
                                      offs_d, N, WINDOW, SINKS, qk_scale, MASKED, IS_CAUSAL, HAS_WINDOW, HAS_SINKS,
                                      HEAD_DIM, EVEN_D, PRECISION, INTERPRETED, COUNT)
            kt_ptrs += BLOCK_N * stride_kn
            vt_ptrs += BLOCK_N * stride_vn
    return dq, visits


@jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, Visits,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_don, stride_dod,
                   stride_dqb, stride_dqh, stride_dqn, stride_dqd,
                   H, N, N_Q, Q_OFF, WINDOW, SINKS, qk_scale, sm_scale,
                   N_BUCKET, NQ_BUCKET, W_BUCKET,  # autotuning keys only
                   GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   EVEN_D: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_SINKS: tl.constexpr, HAS_OFFSET: tl.constexpr,
                   PRECISION: tl.constexpr, INTERPRETED: tl.constexpr, COUNT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = _heaviest_first(tl.program_id(0), tl.num_programs(0), IS_CAUSAL)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = pid_bh % H
    off_hk = (off_h // GROUP).to(tl.int64)
    off_h = off_h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    if HAS_OFFSET:  # fewer queries than keys: row i sits at position Q_OFF + i
        n_q = N_Q
        q_off = Q_OFF
    else:  # Lq = Lk: the code of a square problem, as if there were no offset
        n_q = N
        q_off = 0
    offs_m = start_m + tl.arange(0, BLOCK_M)
    pos_m = offs_m + q_off  # query positions, as in the forward
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row0 = start_m.to(tl.int64)
    rel = tl.arange(0, BLOCK_M)[:, None]

    q = _load_rows(Q + off_b * stride_qb + off_h * stride_qh + row0 * stride_qn + rel * stride_qn
                   + offs_d[None, :] * stride_qd, offs_m, offs_d, n_q, True, HEAD_DIM, EVEN_D)
    do = _load_rows(DO + off_b * stride_dob + off_h * stride_doh + row0 * stride_don + rel * stride_don
                    + offs_d[None, :] * stride_dod, offs_m, offs_d, n_q, True, HEAD_DIM, EVEN_D)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    visits = pid_m * 0

    lo, full_lo, full_hi, hi = _key_bounds(start_m, N, n_q, q_off, WINDOW, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_WINDOW)
    if HAS_SINKS:  # as in the forward
        sink_full, sink_end = _sink_key_bounds(lo, SINKS, BLOCK_N)
        dq, visits = _bwd_dq_inner(dq, visits, q, do, lse, delta, k_base, v_base, lo * 0, sink_full,
                                   pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                   N, WINDOW, SINKS, qk_scale, False, IS_CAUSAL, HAS_WINDOW, HAS_SINKS,
                                   HEAD_DIM, EVEN_D, BLOCK_N, PRECISION, INTERPRETED, COUNT)
        dq, visits = _bwd_dq_inner(dq, visits, q, do, lse, delta, k_base, v_base, sink_full, sink_end,
                                   pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                   N, WINDOW, SINKS, qk_scale, True, IS_CAUSAL, HAS_WINDOW, HAS_SINKS,
                                   HEAD_DIM, EVEN_D, BLOCK_N, PRECISION, INTERPRETED, COUNT)
    if HAS_WINDOW:
        dq, visits = _bwd_dq_inner(dq, visits, q, do, lse, delta, k_base, v_base, lo, full_lo,
                                   pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                   N, WINDOW, SINKS, qk_scale, True, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D,
                                   BLOCK_N, PRECISION, INTERPRETED, COUNT)
    dq, visits = _bwd_dq_inner(dq, visits, q, do, lse, delta, k_base, v_base, full_lo, full_hi,
                               pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                               N, WINDOW, SINKS, qk_scale, False, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D,
                               BLOCK_N, PRECISION, INTERPRETED, COUNT)
    dq, visits = _bwd_dq_inner(dq, visits, q, do, lse, delta, k_base, v_base, full_hi, hi,
                               pos_m, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                               N, WINDOW, SINKS, qk_scale, True, IS_CAUSAL, HAS_WINDOW, HAS_SINKS, HEAD_DIM, EVEN_D,
                               BLOCK_N, PRECISION, INTERPRETED, COUNT)
    dq = dq * sm_scale
    _store_rows(DQ + off_b * stride_dqb + off_h * stride_dqh + row0 * stride_dqn + rel * stride_dqn
                + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), offs_m, offs_d, n_q,
                HEAD_DIM, EVEN_D)
    if COUNT:
        _count(Visits, visits, pid_m)


# ---------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------

# Every kernel, by the kind its launches name: the autotuned three (triton_configs.KINDS) and
# the backward's two small ones, launched with one block size given in their meta.
KERNELS = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel, "pre": _bwd_preprocess,
           "dq_cast": _bwd_dq_cast}

# launch(kind, rows, cols, args, meta) -> the description of the config it ran: kernel `kind`
# over cdiv(rows, block) x cols programs, rows being query rows (keys for "dkdv") in blocks of the
# chosen config's BLOCK_M (BLOCK_N for "dkdv"), or of meta's BLOCK_M for "pre" and "dq_cast".
Launcher = Callable[[str, int, int, tuple, dict], str]


def make_tuner(kind: str, configs: list[Config], interpret: bool = False, **kwargs: Any) -> Any:
    """A triton autotuner of kernel `kind` over `configs` ((BLOCK_M, BLOCK_N, warps, stages)
    tuples), pruned per call by triton_configs.prune, launching compiled or (interpret) in the
    interpreter; kwargs go to triton.autotune (do_bench=..., say)."""
    return triton.autotune(
        configs=[to_triton(c) for c in configs], key=TUNE_KEY,
        prune_configs_by={"early_config_prune": functools.partial(prune, kind)},
        # the fused dQ accumulates with atomics: zero it before each timed config (and the run)
        reset_to_zero=["DQ_ACC"] if kind == "dkdv" else None, **kwargs,
    )(launchable(KERNELS[kind], interpret))


_TUNERS: dict[tuple[str, str, bool], Any] = {}  # (kind, space, interpret) -> its autotuner


def autotuner(kind: str, space: str = "full", interpret: bool = False) -> Any:
    """The autotuner of kernel `kind` over triton_configs.tuning_space(kind, space), made on
    first use and kept for the process (it remembers the config it chose per tuning key)."""
    key = (kind, space, interpret)
    if key not in _TUNERS:
        _TUNERS[key] = make_tuner(kind, tuning_space(kind, space), interpret)
    return _TUNERS[key]


def _fixed_config(kind: str, settings: TritonSettings, interpret: bool, fma: bool, block_d: int,
                  fused: bool = False) -> Config | None:
    """The config to launch `kind` with, or None to autotune."""
    if settings.configs and kind in settings.configs:
        return tuple(settings.configs[kind])
    if settings.tuners and kind in settings.tuners:
        return None
    if interpret:
        return INTERPRETER_CONFIGS[kind]
    if settings.count_visits or not settings.autotune:
        return default_config(kind, fma, block_d, fused)
    return None


def _launch(kind: str, rows: int, cols: int, args: tuple, meta: dict, *, settings: TritonSettings,
            interpret: bool) -> str:
    """The Launcher of a call: kernel `kind`, compiled or interpreted, with the config the
    settings fix or the one its autotuner picks; returns that config's description."""
    kernel = launchable(KERNELS[kind], interpret)
    if kind not in KINDS:
        kernel[(triton.cdiv(rows, meta["BLOCK_M"]), cols)](*args, **meta)
        return f"BLOCK_M={meta['BLOCK_M']} warps={meta['num_warps']}"
    fixed = _fixed_config(kind, settings, interpret, uses_fma(args[0].dtype, meta["PRECISION"]), meta["BLOCK_D"],
                          meta.get("FUSED_DQ", False))
    if fixed is None:
        tuner = settings.tuners[kind] if settings.tuners and kind in settings.tuners else \
            autotuner(kind, settings.space, interpret)
        axis = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
        tuner[lambda m: (triton.cdiv(rows, m[axis]), cols)](*args, **meta)
        return describe(from_triton(tuner.best_config))
    bm, bn, warps, stages = fixed
    kernel[(triton.cdiv(rows, bn if kind == "dkdv" else bm), cols)](
        *args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return describe(fixed)


_DUMMY: dict = {}


def _dummy(device):
    key = str(device)
    if key not in _DUMMY:
        _DUMMY[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _DUMMY[key]


def _precision(dtype, fp32_precision):
    """input_precision for tl.dot, and how info() names it."""
    if dtype == torch.float32:
        return fp32_precision, fp32_precision
    # 16-bit inputs run on tensor cores whatever input_precision says (it only concerns fp32)
    return "tf32", {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _pow2(x):
    return triton.next_power_of_2(max(int(x), 1))


def _common(q, k, v, causal, window, scale, sinks, settings, interpret):
    B, Hq, n_q, D = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[2] < n_q or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, Hkv, Lk, D] with Lk >= Lq "
                         f"for q {tuple(q.shape)} (the queries are the last Lq positions)")
    N = k.shape[2]
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"heads {Hq} not divisible by kv heads {Hkv}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise Unsupported("triton needs q, k, v of one dtype among float32/float16/bfloat16 "
                          f"(got {q.dtype}, {k.dtype}, {v.dtype})")
    if D > MAX_HEAD_DIM:
        raise Unsupported(f"triton supports head_dim <= {MAX_HEAD_DIM} (got {D})")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (got {window})")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0 (got {sinks})")
    has_window = window is not None
    # window >= N (the keys) sees what causal sees (no query sits past key N - 1); clamping
    # keeps every bound computation within int32
    w = min(int(window), N) if has_window else N
    # sinks only add keys left of a window; more than N of them are N
    s = min(int(sinks), N) if has_window and w < N else 0
    block_d = max(16, _pow2(D))
    precision, precision_name = _precision(q.dtype, settings.fp32_precision)
    meta = dict(GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, EVEN_D=block_d == D,
                IS_CAUSAL=bool(causal or has_window), HAS_WINDOW=has_window, HAS_SINKS=s > 0,
                HAS_OFFSET=n_q < N, PRECISION=precision,
                INTERPRETED=interpret, COUNT=bool(settings.count_visits))
    sm_scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    keys = (_pow2(N), _pow2(n_q), _pow2(w) if has_window else 0)
    return meta, w, s, sm_scale, keys, precision_name


def _visit_buffer(rows, cols, device):
    """count_visits: visits [rows, cols], then launch ranks [rows, cols], then a counter."""
    return torch.zeros(2 * rows * cols + 1, dtype=torch.int32, device=device)


def _record(kind, buffer, rows, bm, bn):
    size = (buffer.numel() - 1) // 2
    last_visits[kind] = (buffer[:size].view(rows, -1), bm, bn)
    last_order[kind] = buffer[size:2 * size].view(rows, -1)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None,
                      scale: float | None, sinks: int = 0, *, settings: TritonSettings | None = None,
                      launcher: Launcher | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel: returns (out in q's dtype, base-2 log-sum-exp [B, Hq, Lq] fp32).

    q: [B, Hq, Lq, D], k and v: [B, Hkv, Lk, D] with Lq <= Lk: query row i sits at position
    Lk - Lq + i (bottom-right alignment). window, sinks: in keys; scale multiplies q.k (default
    1/sqrt(D)). settings: default, the environment's now (TritonSettings.from_environment).
    launcher: called for the launch instead of launching (benchmarks/kernel_stats.py captures
    it so); the outputs are then left unwritten."""
    settings = TritonSettings.from_environment() if settings is None else settings
    interpret = interpreted()
    B, Hq, n_q, D = q.shape
    meta, w, s, sm_scale, (n_bucket, nq_bucket, w_bucket), precision_name = _common(
        q, k, v, causal, window, scale, sinks, settings, interpret)
    N = k.shape[2]
    o = torch.empty((B, Hq, n_q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, n_q), dtype=torch.float32, device=q.device)
    if n_q == 0 or B * Hq == 0:
        return o, lse
    launch = functools.partial(_launch, settings=settings, interpret=interpret) if launcher is None else launcher
    visits = None
    if settings.count_visits:
        bm, bn = _fixed_config("fwd", settings, interpret, uses_fma(q.dtype, meta["PRECISION"]), meta["BLOCK_D"])[:2]
        visits = _visit_buffer(B * Hq, triton.cdiv(n_q, bm), q.device)
    # N keys, n_q query rows, their offset N - n_q: ints, not constexprs (one compiled kernel
    # for every offset, the one of Lq = Lk included)
    args = (q, k, v, o, lse, visits if visits is not None else _dummy(q.device),
            *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            Hq, N, n_q, N - n_q, w, s, sm_scale * LOG2E, n_bucket, nq_bucket, w_bucket)
    with launch_scope(interpret):
        desc = launch("fwd", n_q, B * Hq, args, meta)
    if visits is not None:
        _record("fwd", visits, B * Hq, bm, bn)
    _LAST.clear()  # a backward, if one follows, adds its configs
    _LAST.update(interpreted=interpret, config=desc, precision=precision_name)
    return o, lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, causal: bool, window: int | None, scale: float | None, sinks: int = 0, *,
                       settings: TritonSettings | None = None,
                       launcher: Launcher | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) from the saved output and log-sum-exp; dq is [B, Hq, Lq, D],
    dk and dv are [B, Hkv, Lk, D] (keys that no query sees get zeros). settings and launcher:
    as in attention_forward (a call's forward and backward should share its settings)."""
    settings = TritonSettings.from_environment() if settings is None else settings
    interpret = interpreted()
    B, Hq, n_q, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    meta, w, s, sm_scale, (n_bucket, nq_bucket, w_bucket), _ = _common(q, k, v, causal, window, scale, sinks,
                                                                       settings, interpret)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if n_q == 0 or B * Hq == 0:
        return dq, dk.zero_(), dv.zero_()
    launch = functools.partial(_launch, settings=settings, interpret=interpret) if launcher is None else launcher
    delta = torch.empty_like(lse)
    pre_bm = INTERPRETER_PRE_BLOCK_M if interpret else PRE_BLOCK_M
    small = dict(HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_bm, num_warps=4)  # pre and dq_cast
    qk_scale = sm_scale * LOG2E
    dummy = _dummy(q.device)

    fused = fused_dq(meta["BLOCK_D"], q.element_size(), settings.fused_dq)
    meta_kv = dict(meta, FUSED_DQ=fused)
    vis_kv = vis_q = None
    if settings.count_visits:
        fma = uses_fma(q.dtype, meta["PRECISION"])
        kv_config = _fixed_config("dkdv", settings, interpret, fma, meta["BLOCK_D"], fused)
        vis_kv = _visit_buffer(B * Hkv, triton.cdiv(N, kv_config[1]), q.device)
        if not fused:
            q_config = _fixed_config("dq", settings, interpret, fma, meta["BLOCK_D"])
            vis_q = _visit_buffer(B * Hq, triton.cdiv(n_q, q_config[0]), q.device)
    # FUSED_DQ: the dK/dV programs add dS K into an fp32 dQ (5 matmuls per tile pair in all);
    # otherwise a dQ kernel recomputes S, P and dP per query block (7).
    dq_acc = torch.zeros((B, Hq, n_q, D), dtype=torch.float32, device=q.device) if fused else dummy
    with launch_scope(interpret):
        launch("pre", n_q, B * Hq, (o, do, delta, *o.stride(), *do.stride(), Hq, n_q), small)
        args = (q, k, v, do, lse, delta, dk, dv, dq_acc, vis_kv if vis_kv is not None else dummy,
                *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
                # the dK/dV kernel works in query-row coordinates (keys shifted by -(N - n_q)): its
                # SINKS is the sinks' end shifted likewise
                Hkv, N, n_q, N - n_q, w, s - (N - n_q), qk_scale, sm_scale, n_bucket, nq_bucket, w_bucket)
        kv_desc = launch("dkdv", N, B * Hkv, args, meta_kv)
        if fused:
            launch("dq_cast", n_q, B * Hq, (dq_acc, dq, *dq.stride(), Hq, n_q, sm_scale), small)
            q_desc = "fused into dkdv (fp32 atomic adds), then scaled and cast"
        else:
            args = (q, k, v, do, lse, delta, dq, vis_q if vis_q is not None else dummy,
                    *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                    Hq, N, n_q, N - n_q, w, s, qk_scale, sm_scale, n_bucket, nq_bucket, w_bucket)
            q_desc = launch("dq", n_q, B * Hq, args, meta)
    if settings.count_visits:
        _record("dkdv", vis_kv, B * Hkv, *kv_config[:2])
        last_visits.pop("dq", None)
        last_order.pop("dq", None)
        if not fused:
            _record("dq", vis_q, B * Hq, *q_config[:2])
    _LAST.update(interpreted=interpret, bwd_config=f"dkdv: {kv_desc}; dq: {q_desc}")
    return dq, dk, dv


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale, sinks, settings):
        o, lse = attention_forward(q, k, v, causal, window, scale, sinks, settings=settings)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, window, scale, sinks)
        ctx.settings = settings
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, *ctx.args, settings=ctx.settings)
        return dq, dk, dv, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------


def check(cell: Any) -> str | None:
    """Why `cell` cannot run here, or None: triton missing, a head dim over MAX_HEAD_DIM, or its
    device (triton_common.device_reason; the interpreter up to INTERPRETER_MAX_LEN keys)."""
    if triton is None:
        return NOT_INSTALLED
    if cell.head_dim > MAX_HEAD_DIM:
        return f"triton supports head_dim <= {MAX_HEAD_DIM} (got {cell.head_dim})"
    return device_reason(cell, INTERPRETER_MAX_LEN)


def info() -> dict:
    """Details of the last call: interpreted or compiled, the kernel config(s), the precision."""
    return dict(_LAST)


@register("triton", devices=["cpu", "cuda"], dtypes=["float32", "float16", "bfloat16"],
          masks=["none", "causal", "window"], modes=["fwd", "bwd", "fwd+bwd"], gqa=True, exact=True, sinks=True,
          kv_cache=True,
          description="fused flash attention in Triton (fwd+bwd, GQA, causal/window/sinks block skipping, "
                      "Lq <= Lk, autotuned)",
          check=check, info=info)
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                     window: int | None, scale: float | None = None, sinks: int = 0,
                     settings: TritonSettings | None = None) -> torch.Tensor:
    """Fused flash attention in Triton: O(N) memory, masked blocks skipped, differentiable.

    q may hold fewer rows than k and v (Lq <= Lk: chunked prefill against a KV cache); they
    are the last Lq positions (bottom-right alignment, ctxbench.core.masks).
    sinks: with a window, the first `sinks` keys stay visible to every later query.
    settings: how to launch (triton_settings.TritonSettings); default, the CTXBENCH_TRITON_*
    variables as they are now, kept for this call's backward."""
    if triton is None:
        raise Unsupported(NOT_INSTALLED)
    if q.device.type == "cpu" and not interpreted():
        raise Unsupported("triton on CPU tensors needs the interpreter (TRITON_INTERPRET=1)")
    settings = TritonSettings.from_environment() if settings is None else settings
    if q.device.type == "cuda":
        with torch.cuda.device(q.device):
            return _TritonAttention.apply(q, k, v, causal, window, scale, sinks, settings)
    return _TritonAttention.apply(q, k, v, causal, window, scale, sinks, settings)
