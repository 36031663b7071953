"""triton_configs: the launch configurations of the Triton flash-attention kernel (triton_attention).

A configuration is a tuple (BLOCK_M, BLOCK_N, warps, stages): BLOCK_M query rows by BLOCK_N
keys per tile, in every kernel (the forward and dQ keep a query tile and stream key tiles; dK/dV
keeps a key tile and streams query tiles). Three kernels are configured: "fwd", "dkdv" and "dq"
(KINDS). What is here changes with the Triton version the GPU image runs, since it rests on what
that version's compiler allocates on sm_90 (benchmarks/kernel_stats.py measures it on a CPU):
  * the autotuning space (tuning_space), its spill-free subsets (NO_SPILL, OFFSET_SINKS_SPILL),
    the fp32 (FMA) space and the GPU check's short list (CHECK_SPACE);
  * the configs used without autotuning (default_config) and under the interpreter;
  * the pruning of a space for one call (prune: spills, tile lengths, shared memory by
    smem_estimate against SMEM_LIMIT), and whether dQ is fused into dK/dV (fused_dq).
Everything is data or a pure function of its arguments: nothing is read from the environment
(the settings that choose among these, CTXBENCH_TRITON_*, are triton_settings').
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

try:
    import triton
except ImportError:  # the data stays importable; configs are only built where triton runs
    triton = None

Config = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, warps, stages)

KINDS = ("fwd", "dkdv", "dq")  # the autotuned kernels: forward, dK/dV (dQ fused or not), dQ

# Keys of every autotuner: the key and query lengths and the window rounded up to a power of
# two, the head dim, the mask and the fp32 precision (triton appends the tensors' dtypes itself).
TUNE_KEY = ["N_BUCKET", "NQ_BUCKET", "W_BUCKET", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_SINKS", "HAS_OFFSET",
            "PRECISION"]
PRE_BLOCK_M = 64  # query rows per program of the backward's preprocess and dQ cast kernels (compiled)
INTERPRETER_PRE_BLOCK_M = 16  # the same under the interpreter (small tiles: NumPy per program)
SMEM_LIMIT = 232448  # bytes per block on H100/H200 (227 KiB); prune configs needing far more

# The configurations of tuning_space("full") that spill no registers on sm_90 (Hopper) for fp16
# and bf16 inputs, by head-dim tile BLOCK_D (<= 64, and 128 for 65 <= D <= 128), for every mask
# (none, causal, window, window + sinks: the window and sink masks add registers), with triton
# 3.6, the version the GPU image runs. Measured on the CPU by
#   python benchmarks/kernel_stats.py --arch sm_90 --head-dim 64,128 --dtype bf16 \
#       --mask none,causal,window,sinks --which all|tuned
# (results/kernels/; fp16 compiles to the same registers). The rest of the space spills for at
# least one mask, and a spilled register is a local-memory round trip on every tile:
#   dK/dV keeps four [BLOCK_N, BLOCK_D] tiles per program (K, V and the fp32 dK, dV
#     accumulators): at D=128 only 8 warps with 16-row query tiles and 64-key blocks fit in 255
#     registers (16x128 spills 8 B with a window, 132 B with sinks; the former default, 32x128
#     with 4 warps, spilled 3.5 KB per thread);
#   the forward and dQ at D=128 need 8 warps for 128-row query tiles (the former forward
#     default, 128x64 with 4 warps, spilled 1.1 KB; dQ 128x32 with 4 warps 252 B), and 64x64
#     tiles with 4 warps spill with sinks at 4 stages (forward) or at any (dQ);
#   the fused dK/dV at D=64 (dQ's tile and atomics on top) keeps 16-row query tiles on 8 warps.
# triton 3.9 allocates differently: with sinks at D=128 every dK/dV config of the list spills
# 80-132 B there, and a few forward/dQ configs spill 8-156 B with a window or sinks
# (tests/test_triton.py's slow sm_90 tests hold 3.6 to zero and other versions to a bound).
# Pruning by shared memory (SMEM_LIMIT) and sequence length still applies on top.
NO_SPILL = {
    "fwd": {
        64: [(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for s in (2, 3, 4) for w in (4, 8)
             if not (bm == 128 and bn >= 64 and w == 4) and (bm, bn, w, s) not in ((64, 128, 4, 2), (64, 128, 4, 4))],
        128: [(64, bn, w, s) for bn in (32, 64) for w in (4, 8) for s in (2, 3, 4) if (bn, w, s) != (64, 4, 4)]
             + [(64, 128, 8, s) for s in (2, 3)] + [(128, bn, 8, s) for bn in (32, 64) for s in (2, 3, 4)],
    },
    "dkdv": {  # the separate dQ kernel's dK/dV (fused_dq "0" at D <= 64; the default at D=128)
        64: [(16, 64, w, s) for w in (4, 8) for s in (2, 3, 4) if (w, s) != (4, 4)]
            + [(16, 128, 8, s) for s in (2, 3, 4)]
            + [(32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2), (32, 128, 8, 3)],
        128: [(16, 64, 8, 2), (16, 64, 8, 3)],
    },
    # dK/dV with the fused dQ (the default for 16-bit D <= 64). At D=128 only 16x64 with 8 warps
    # is spill-free, and not with sinks (28-136 B with triton 3.6, 32-76 B more with 3.9): so by
    # default (fused_dq "auto") D=128 takes the separate dQ kernel, and these are for fused_dq "1".
    "dkdv_fused": {
        64: [(16, 64, 8, s) for s in (2, 3, 4)] + [(16, 128, 8, s) for s in (2, 3, 4)],
        128: [(16, 64, 8, s) for s in (2, 3, 4)],
    },
    "dq": {
        64: [(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64) for w in (4, 8) for s in (2, 3, 4)
             if not (bm == 128 and bn == 64 and w == 4)],
        128: [(64, 32, w, s) for w in (4, 8) for s in (2, 3, 4)] + [(64, 64, 8, s) for s in (2, 3, 4)]
             + [(128, 32, 8, s) for s in (2, 3, 4)] + [(128, 64, 8, 2)],
    },
}

# Lq < Lk (HAS_OFFSET, the query-row shift of the dK/dV kernel) with sinks: the configs of
# NO_SPILL that spill there on sm_90 with triton 3.6 (kernel_stats --n 4096 --q-len 1024
# --which tuned: 12 and 20 B); autotuning leaves them out of such calls.
OFFSET_SINKS_SPILL = {"dkdv_fused": {64: [(16, 64, 8, 2), (16, 64, 8, 4)]}}

# fp32 with input_precision="ieee" has no tensor cores: tl.dot becomes FMAs held in registers,
# where big tiles spill and each config takes tens of seconds to compile. It is tuned over
# these few small tiles only (a subset of the full space, first = default).
FP32_IEEE_SPACE = {
    "fwd": [(64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
    "dkdv": [(32, 64, 4, 2), (32, 64, 8, 2), (64, 64, 8, 2)],
    "dq": [(64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
}
# Used when autotuning is off (or while counting visits on a GPU): for 16-bit inputs with
# D <= 128, from NO_SPILL (big query tiles on two warpgroups; 16-row query tiles in dK/dV);
# for D > 128 (BLOCK_D 256), smaller tiles that fit in shared memory.
DEFAULT_CONFIGS = {"fwd": (128, 64, 8, 3), "dkdv": (16, 64, 8, 3), "dq": (128, 64, 8, 2)}
# the fused dK/dV at D <= 64: 128-key blocks (fewer dQ atomics per query row than 64)
FUSED_DKDV_DEFAULT_64 = (16, 128, 8, 3)
FUSED_DKDV_DEFAULT_128 = (16, 64, 8, 3)  # fused_dq "1" at D=128 (triton 3.6: no spill but with sinks)
WIDE_DEFAULT_CONFIGS = {"fwd": (64, 64, 4, 2), "dkdv": (16, 64, 8, 2), "dq": (64, 64, 4, 2)}
INTERPRETER_CONFIGS = {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}
# The GPU check's space (benchmarks/gpu_check.sh sets CTXBENCH_TRITON_SPACE=check): a few
# configs from NO_SPILL, so autotuning there compiles little (see its compile estimate).
CHECK_SPACE = {
    "fwd": [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    "dkdv": [(16, 64, 8, 3), (16, 64, 8, 2)],
    "dq": [(128, 64, 8, 2), (64, 32, 4, 3)],
}
SPACES = ("full", "check")  # the names tuning_space takes


def tuning_space(kind: str, space: str = "full") -> list[Config]:
    """The configs the autotuner of kernel `kind` is built with, before pruning: "full", the
    candidate space (for 16-bit inputs and D <= 128 prune keeps those of NO_SPILL only), or
    "check", the GPU check's CHECK_SPACE."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel {kind!r}; choose from {KINDS}")
    if space == "check":
        return list(CHECK_SPACE[kind])
    if space != "full":
        raise ValueError(f"the tuning space must be one of {SPACES} (got {space!r})")
    if kind == "fwd":  # the tutorial's space: the query tile is BLOCK_M, keys stream by BLOCK_N
        return [(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64, 128) for s in (2, 3, 4) for w in (4, 8)]
    if kind == "dkdv":  # the key tile (BLOCK_N) stays, query blocks (BLOCK_M) stream
        return [(bm, bn, w, s) for bm in (16, 32, 64) for bn in (64, 128) for s in (2, 3, 4) for w in (4, 8)]
    return [(bm, bn, w, s) for bm in (64, 128) for bn in (32, 64) for s in (2, 3, 4) for w in (4, 8)]  # dq


def uses_fma(dtype: torch.dtype, precision: str) -> bool:
    """Whether tl.dot runs as FMAs: fp32 inputs with IEEE products (precision "ieee")."""
    return dtype == torch.float32 and precision == "ieee"


def default_config(kind: str, fma: bool, block_d: int, fused: bool = False) -> Config:
    """The config `kind` runs with when autotuning is off (fma: fp32 with IEEE products;
    block_d: the head dim padded to a power of two >= 16; fused: dK/dV with the fused dQ)."""
    if fma:
        return FP32_IEEE_SPACE[kind][0]
    if kind == "dkdv" and fused and block_d <= 128:
        return FUSED_DKDV_DEFAULT_64 if block_d <= 64 else FUSED_DKDV_DEFAULT_128
    return DEFAULT_CONFIGS[kind] if block_d <= 128 else WIDE_DEFAULT_CONFIGS[kind]


def fused_dq(block_d: int, element_size: int = 2, setting: str = "auto") -> bool:
    """Whether the backward fuses dQ into the dK/dV kernel. setting (triton_settings' fused_dq):
    "1" always, "0" never, "auto" for 16-bit inputs (element_size 2 bytes) with block_d <= 64
    (see Backward in triton_attention's docstring; fp32's fused dK/dV spills 57 KB per thread
    on sm_90 as FMAs, D=64)."""
    if setting == "auto":
        return block_d <= 64 and element_size == 2
    if setting not in ("1", "0"):
        raise ValueError(f"fused_dq must be auto, 1 or 0 (got {setting!r})")
    return setting == "1"


def describe(config: Config) -> str:
    """A config as info() and benchmarks/kernel_stats.py print it."""
    bm, bn, warps, stages = config
    return f"BLOCK_M={bm} BLOCK_N={bn} warps={warps} stages={stages}"


def to_triton(config: Config) -> Any:
    """A config as a triton.Config (what an autotuner is built with)."""
    bm, bn, warps, stages = config
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def from_triton(config: Any) -> Config:
    """The (BLOCK_M, BLOCK_N, warps, stages) tuple of a triton.Config."""
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _stationary_and_streamed(kind: str, bm: int, bn: int) -> tuple[int, int]:
    return (bn, bm) if kind == "dkdv" else (bm, bn)


def smem_estimate(kind: str, bm: int, bn: int, stages: int, block_d: int, size: int, fused: bool = False) -> int:
    """Shared memory of a 16-bit config, in bytes (size: bytes per input element): two streamed
    tiles (K, V or Q, dO) per pipeline stage plus the resident tiles (Q in the forward; K, V or
    Q, dO in the backward kernels), and up to 2 KiB for the pipelined fp32 LSE/Delta rows of
    dK/dV. The fused dQ (fused) adds K once more as the dS K operand, an fp32 [BLOCK_M, BLOCK_D]
    staging tile for its atomic adds and 128 B per stage. On sm_90 (triton 3.6 and 3.9) this is
    exact for the forward and dQ kernels and an upper bound for dK/dV (at most 2.5 KiB high from
    64 KiB up; tests/test_triton.py's slow sm_90 tests check both), so no config kept by
    pruning fails to launch."""
    stay, stream = _stationary_and_streamed(kind, bm, bn)
    resident = 1 if kind == "fwd" else 2
    rows = 2048 if kind == "dkdv" else 0
    extra = stay * block_d * size + bm * block_d * 4 + 128 * stages if kind == "dkdv" and fused else 0
    return (2 * stages * stream + resident * stay) * block_d * size + rows + extra


def prune(kind: str, configs: Iterable[Any], named_args: dict, **kwargs: Any) -> list[Any]:
    """The triton.Configs among `configs` that kernel `kind` may run with for one call, never
    none: triton's early_config_prune (an autotuner calls it with its configs, the call's named
    arguments and its constexprs as keywords). Read from the arguments: N (keys), N_Q (query
    rows, default N), BLOCK_D, Q (its element size), PRECISION, FUSED_DQ, HAS_OFFSET, HAS_SINKS.
    Kept: for fp32 with IEEE products, FP32_IEEE_SPACE's; else, for 16-bit inputs with D <= 128,
    the spill-free ones among the full space's (NO_SPILL; a config from outside the space, a
    test's say, was not measured and meets the other rules), no tile much longer than its side
    of the sequence, and shared memory within SMEM_LIMIT (smem_estimate)."""
    configs = list(configs)
    args = {**named_args, **kwargs}
    n = int(args["N"])  # keys
    n_q = int(args.get("N_Q", n))  # query rows (fewer than the keys against a KV cache)
    block_d = int(args["BLOCK_D"])
    size = args["Q"].element_size()
    fma = size == 4 and args.get("PRECISION", "ieee") == "ieee"
    fused = kind == "dkdv" and bool(args.get("FUSED_DQ"))
    name = "dkdv_fused" if fused else kind
    no_spill = set(NO_SPILL[name][64 if block_d <= 64 else 128]) if size == 2 and block_d <= 128 else None
    if no_spill is not None and args.get("HAS_OFFSET") and args.get("HAS_SINKS"):
        no_spill -= set(OFFSET_SINKS_SPILL.get(name, {}).get(64 if block_d <= 64 else 128, ()))
    candidates = set(tuning_space(kind))
    kept = []
    for c in configs:
        t = from_triton(c)
        bm, bn = t[0], t[1]
        if fma:
            if t in FP32_IEEE_SPACE[kind]:
                kept.append(c)
            continue
        if no_spill is not None and t in candidates and t not in no_spill:
            continue  # spills registers on sm_90 (see NO_SPILL)
        stay, stream = _stationary_and_streamed(kind, bm, bn)
        # beyond the measured lists (fp32 on tf32, D > 128): 8 warps only pay off on big
        # tiles (the tutorial's rule, relaxed to 64x128)
        if no_spill is None and c.num_warps == 8 and bm * bn < 64 * 128:
            continue
        # no tile much longer than its side of the sequence (query rows or keys)
        n_stay, n_stream = (n, n_q) if kind == "dkdv" else (n_q, n)
        cap_stay, cap_stream = max(32, triton.next_power_of_2(n_stay)), max(32, triton.next_power_of_2(n_stream))
        if stay > max(64, cap_stay) or stream > cap_stream:
            continue
        if smem_estimate(kind, bm, bn, c.num_stages, block_d, size, fused) > SMEM_LIMIT:
            continue
        kept.append(c)
    if not kept:  # keep the smallest rather than nothing (spill-free where measured)
        pool = [c for c in configs if no_spill is None or from_triton(c) in no_spill] or configs
        kept = [min(pool, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
    return kept
