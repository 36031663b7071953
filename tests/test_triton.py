"""Tests of the Triton flash-attention kernel (kernels/triton_attention.py) on the CPU.

The kernels run in Triton's interpreter, so shapes are small. What is checked:
* forward and gradients (dq, dk, dv) against the float64 reference, over every value of
  every axis (N, D, GQA, mask, dtype), combined pairwise rather than as a full product;
  seeds come from each case's name (zlib.crc32, the same in every process) and are printed;
* planted logits above 100 (deterministic), which fail without the online softmax's
  max-subtraction, its rescaling between key blocks, or masking before the maximum;
* block skipping: the key/query blocks each program visits, and the ones it masks, equal
  what the mask implies (computed here from the mask convention, not from the kernel);
  causal query blocks start heaviest first;
* fewer queries than keys (Lq < Lk, the queries being the last Lq positions: chunked
  prefill against a KV cache): forward, gradients and block visits against the mask with
  q_offset = Lk - Lq;
* non-contiguous inputs and gradients; registration, check() and info();
* the configurations, autotuning space and pruning (kernels/triton_configs.py), the settings
  read from the environment at call time, never at import (kernels/triton_settings.py);
* the interpreter whatever was imported first (kernels/triton_interpreter.py): in fresh
  processes that import transformers, triton, torch's flex attention or ctxbench's sdpa kernel
  before the Triton kernels, both Triton kernels against the float64 reference.
Slow tests compile the kernels for sm_90 (Hopper) with the ptxas that ships with triton, no
GPU needed, through benchmarks/kernel_stats.py: every kernel compiles, uses wgmma, fits in
shared memory and, for D <= 128 in fp16/bf16, spills no registers: `pytest -m slow
tests/test_triton.py -k sm90`.

The GPU image runs triton 3.6; the job that runs these tests (interpreter and sm_90 compile)
under triton 3.6 and under the current version, each in a venv of its own:
    benchmarks/triton_versions.sh                 # both versions, interpreter + compile tests
    benchmarks/triton_versions.sh --no-compile    # the interpreter tests only
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from ctxbench import registry  # noqa: E402
from ctxbench.kernels import triton_attention as ta  # noqa: E402
from ctxbench.kernels import triton_configs as tc  # noqa: E402
from ctxbench.kernels.triton_interpreter import interpreted, interpreter_scope  # noqa: E402
from ctxbench.kernels.triton_settings import TritonSettings  # noqa: E402
from ctxbench.core.masks import Mask  # noqa: E402
from ctxbench.core.reference import TOLERANCE, errors, reference_attention  # noqa: E402

# Kernels run interpreted here (CPU tensors), on a machine with CUDA too. TRITON_INTERPRET is
# read at each launch, so setting it after triton was imported is enough (and on purpose: the
# kernels must not depend on it preceding the import).
os.environ["TRITON_INTERPRET"] = "1"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# ---------------------------------------------------------------------------------------
# Forward and gradients against the float64 reference
# ---------------------------------------------------------------------------------------

AXES = {
    "n": [1, 17, 64, 130],
    "d": [16, 64, 80],
    "heads": [(4, 4), (4, 1)],
    "mask": ["none", "causal", "w1", "w5", "wN", "w5s3", "w1s20"],
    "dtype": ["float32", "bfloat16"],
    # the backward's dQ: fused into dK/dV (atomic adds, 5 matmuls) or its own kernel (7)
    "dq": ["fused", "separate"],
}


def _pairwise(axes: dict) -> list[dict]:
    """A small deterministic set of cases in which every pair of axis values occurs."""
    names = list(axes)
    todo = {((a, va), (b, vb)) for a, b in itertools.combinations(names, 2)
            for va in axes[a] for vb in axes[b]}
    cases = []
    while todo:
        best, best_gain = None, -1
        for combo in itertools.product(*axes.values()):
            case = dict(zip(names, combo))
            gain = sum(((a, case[a]), (b, case[b])) in todo for a, b in itertools.combinations(names, 2))
            if gain > best_gain:
                best, best_gain = case, gain
        cases.append(best)
        todo -= {((a, best[a]), (b, best[b])) for a, b in itertools.combinations(names, 2)}
    return cases


CASES = _pairwise(AXES)


def _window(mask: str, n: int) -> tuple[bool, int | None, int]:
    """(causal, window, sinks) for a mask label; wN is a window at least as long as the
    sequence, wWsS a window W with S attention sinks."""
    return {"none": (False, None, 0), "causal": (True, None, 0), "w1": (True, 1, 0), "w5": (True, 5, 0),
            "wN": (True, n + 7, 0), "w5s3": (True, 5, 3), "w1s20": (True, 1, 20)}[mask]


def _seed(label: str) -> int:
    """A seed that is the same in every process (unlike hash(), which str hashing randomises),
    set and printed, so a failing case reruns with the same inputs."""
    seed = zlib.crc32(label.encode()) % 2**31
    print(f"seed {seed} for {label}")
    torch.manual_seed(seed)
    return seed


def _check_against_reference(q, k, v, causal, window, scale=None, dout=None, tol=None, sinks=0, label="",
                             settings=None):
    """Run triton forward + backward (with `settings`, default the environment's) and compare
    out, dq, dk, dv with float64 autograd."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ta.triton_attention(q, k, v, causal=causal, window=window, scale=scale, sinks=sinks, settings=settings)
    assert out.dtype == q.dtype and out.shape == q.shape
    if dout is None:
        dout = torch.randn_like(out)
    out.backward(dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    # Lq < Lk: the queries are the last Lq positions (bottom-right alignment)
    mask = Mask.of(causal, window, sinks, q_offset=k.shape[2] - q.shape[2])
    ref = reference_attention(q64, k64, v64, mask, scale=scale)
    ref.backward(dout.double())
    tol = TOLERANCE[str(q.dtype).removeprefix("torch.")] if tol is None else tol
    got = {"out": (out, ref), "dq": (q.grad, q64.grad), "dk": (k.grad, k64.grad), "dv": (v.grad, v64.grad)}
    tols = tol if isinstance(tol, dict) else dict.fromkeys(got, tol)
    for name, (x, r) in got.items():
        tol = tols[name]
        assert x.shape == r.shape, name
        assert torch.isfinite(x.float()).all(), f"{label} {name}: not finite"
        rel, _ = errors(x, r.detach())
        assert rel < tol, f"{label} {name}: relative L2 error {rel:.3g} >= {tol}"


def test_pairwise_cases_cover_every_pair():
    names = list(AXES)
    for a, b in itertools.combinations(names, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(AXES[a], AXES[b])), (a, b)


# The cases at n=130 (about 60 s of interpretation on 2 cores) run in `pytest -m ci`: the default
# suite keeps every other pair of the covering design (n in 1, 17, 64).
@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow, pytest.mark.ci]) if c["n"] == 130 else c
                                  for c in CASES], ids=lambda c: "-".join(str(v) for v in c.values()).replace(" ", ""))
def test_forward_and_gradients_match_reference(case):
    """dQ is forced down the path the case names (the fused_dq setting), so both backward paths
    meet every value of every other axis."""
    label = "-".join(str(v) for v in case.values()).replace(" ", "")
    label = f"{label} seed={_seed(label)}"
    settings = TritonSettings(fused_dq="1" if case["dq"] == "fused" else "0")
    n, d, (hq, hkv), dtype = case["n"], case["d"], case["heads"], DTYPES[case["dtype"]]
    causal, window, sinks = _window(case["mask"], n)
    batch = 2 if n <= 17 else 1
    q = torch.randn(batch, hq, n, d, dtype=dtype)
    k = torch.randn(batch, hkv, n, d, dtype=dtype)
    v = torch.randn(batch, hkv, n, d, dtype=dtype)
    _check_against_reference(q, k, v, causal, window, sinks=sinks, label=label, settings=settings)
    assert ("fused into dkdv" in ta.info()["bwd_config"]) == (case["dq"] == "fused"), ta.info()


def test_float16_and_explicit_scale():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 32, dtype=torch.float16) for _ in range(3))
    _check_against_reference(q, k, v, True, None, scale=0.3)


def _planted_logits(n: int, d: int, dtype: torch.dtype):
    """q, k, v (B=1, Hq=2, Hkv=1) whose logits q.k (scale 1) are known, deterministic, and far
    beyond what exp() survives in fp32 (|logit| > 88 overflows or underflows it):

    * rows i % 4 == 0: every key scores about +120 (a common component), so exp(logit)
      overflows unless the row maximum is subtracted;
    * rows i % 4 == 1: every key scores about -120, so exp(logit) underflows to 0 (0/0);
    * rows i % 4 == 2: one visible key (i - 3 - (i % 7), or i) scores +110 and then a later one
      (i itself) +150, so the running maximum jumps by 40 between key blocks and the earlier
      sum must be rescaled by exp(-40);
    * rows i % 4 == 3: key i + 1 (hidden by a causal mask) scores +200: a mask not applied
      before the maximum would put all the weight there.
    Keys get orthogonal directions (u_j, j < d - 1) to plant exact scores; the last axis is
    the common component. Values are random; the scores' small remainder is noise."""
    g = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=g, dtype=torch.float64))
    u = torch.zeros(n, d, dtype=torch.float64)
    u[:, : d - 1] = basis[torch.arange(n) % (d - 1)]  # key j's direction (repeats every d-1 keys)
    k = 0.2 * torch.randn(n, d, generator=g, dtype=torch.float64)
    k[:, : d - 1] += 10.0 * u[:, : d - 1]
    k[:, d - 1] = 10.0  # the common component
    q = 0.05 * torch.randn(n, d, generator=g, dtype=torch.float64)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            q[i, d - 1] += 12.0
        elif kind == 1:
            q[i, d - 1] -= 12.0
        elif kind == 2:
            early = max(0, i - 3 - i % 7)
            q[i] += 11.0 * u[early] + 15.0 * u[i] if early % (d - 1) != i % (d - 1) else 15.0 * u[i]
        elif i + 1 < n:
            q[i] += 20.0 * u[i + 1]
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    q2 = torch.stack([q, q.flip(0)])[None]  # two query heads sharing one kv head (GQA)
    return q2.to(dtype), k[None, None].to(dtype), v[None, None].to(dtype)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=[pytest.mark.slow, pytest.mark.ci])])
@pytest.mark.parametrize("mask", ["none", "w5s3", *(pytest.param(m, marks=[pytest.mark.slow, pytest.mark.ci])
                                                    for m in ("causal", "w5"))])
def test_planted_large_logits(mask, dtype):
    """Deterministic logits above 100 (see _planted_logits), at N <= 512 so the interpreter
    runs triton: the max-subtraction of the online softmax, its rescaling between blocks and
    masking before the maximum are each needed to pass (checked by removing each)."""
    n, d = 150, 32
    q, k, v = _planted_logits(n, d, DTYPES[dtype])
    logits = (q[0, 0].double() @ k[0, 0].double().T)
    assert logits.abs().max() > 100 and (logits.amax(1) > 100).sum() > n // 4
    causal, window, sinks = _window(mask, n)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(q.dtype)
    tol = TOLERANCE[dtype]
    if dtype == "bfloat16":
        # Saturated rows have a true dS of about 0, so the bf16 rounding of O (in Delta) and of
        # P dominates their dq and dk: torch SDPA's bf16 dq is 2.1e-2 off here, triton's 4.6e-2
        # (mask none). The forward and dv keep the bf16 tolerance; a missing max-subtraction
        # shows as inf/NaN whatever the tolerance.
        tol = {"out": tol, "dv": tol, "dq": 8e-2, "dk": 4e-2}
    _check_against_reference(q, k, v, causal, window, scale=1.0, dout=dout, sinks=sinks, tol=tol,
                             label=f"planted logits mask={mask} {dtype}")


def test_window_only_implies_causal():
    """window without causal=True still means keys j with i - W < j <= i."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 1, 33, 16) for _ in range(3))
    out = ta.triton_attention(q, k, v, causal=False, window=4, scale=None)
    ref = reference_attention(q, k, v, Mask.of(True, 4))
    assert errors(out, ref)[0] < TOLERANCE["float32"]


# ---------------------------------------------------------------------------------------
# Fewer queries than keys (Lq < Lk): the queries are the last Lq positions
# ---------------------------------------------------------------------------------------

# (Lq, Lk, D, (Hq, Hkv), mask, dtype, dq): the interpreter's blocks are 16 x 16, so Lq and Lk
# cross block edges (or not) in every combination, with offsets Lk - Lq of 1 to 69; "w100" is a
# window longer than Lk. Each case runs forward and backward (its dq path) against float64.
KV_CASES = [
    (7, 50, 16, (2, 2), "none", "float32", "separate"),
    (19, 50, 16, (4, 1), "causal", "float32", "fused"),
    (1, 40, 32, (2, 2), "causal", "float32", "separate"),  # decode: one query
    (20, 61, 80, (2, 1), "w5", "bfloat16", "separate"),
    (17, 45, 16, (2, 2), "w100", "float32", "fused"),
    (23, 70, 48, (2, 1), "w5s3", "float32", "fused"),
    (9, 78, 16, (2, 2), "w1s20", "bfloat16", "separate"),
    (16, 64, 16, (2, 1), "w20", "float32", "separate"),  # both lengths multiples of the blocks
    (40, 41, 16, (2, 2), "w8s17", "float32", "fused"),  # offset 1
    (33, 50, 80, (4, 2), "none", "bfloat16", "fused"),
]


def _kv_window(mask: str) -> tuple[bool, int | None, int]:
    """(causal, window, sinks) of a KV_CASES mask label: none, causal, wW or wWsS."""
    if mask in ("none", "causal"):
        return mask == "causal", None, 0
    w, _, s = mask[1:].partition("s")
    return True, int(w), int(s or 0)


@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: "q{}-k{}-d{}-h{}x{}-{}-{}-{}".format(
    c[0], c[1], c[2], *c[3], *c[4:]))
def test_fewer_queries_than_keys_match_reference(case):
    lq, lk, d, (hq, hkv), mask, dtype, dq = case
    label = "-".join(map(str, case)).replace(" ", "")
    label = f"{label} seed={_seed(label)}"
    settings = TritonSettings(fused_dq="1" if dq == "fused" else "0")
    causal, window, sinks = _kv_window(mask)
    dtype = DTYPES[dtype]
    q = torch.randn(2, hq, lq, d, dtype=dtype)
    k = torch.randn(2, hkv, lk, d, dtype=dtype)
    v = torch.randn(2, hkv, lk, d, dtype=dtype)
    _check_against_reference(q, k, v, causal, window, sinks=sinks, label=label, settings=settings)
    assert ("fused into dkdv" in ta.info()["bwd_config"]) == (dq == "fused"), ta.info()


@pytest.mark.slow
@pytest.mark.parametrize("dq", ["fused", "separate"])
@pytest.mark.parametrize("mask", ["none", "causal", "w1", "w5", "w100", "w5s3", "w1s20", "w8s40"])
@pytest.mark.parametrize("lq,lk", [(1, 17), (15, 16), (31, 97), (48, 128), (50, 130)])
def test_fewer_queries_than_keys_grid(lq, lk, mask, dq):
    """Every mask against several (Lq, Lk) shapes, GQA and D=80, both dQ paths."""
    label = f"q{lq}-k{lk}-{mask}-{dq}"
    label = f"{label} seed={_seed(label)}"
    settings = TritonSettings(fused_dq="1" if dq == "fused" else "0")
    causal, window, sinks = _kv_window(mask)
    q = torch.randn(1, 4, lq, 80)
    k = torch.randn(1, 2, lk, 80)
    v = torch.randn(1, 2, lk, 80)
    _check_against_reference(q, k, v, causal, window, sinks=sinks, label=label, settings=settings)


def test_more_queries_than_keys_refused():
    q = torch.randn(1, 2, 20, 16)
    k = torch.randn(1, 2, 19, 16)
    with pytest.raises(ValueError, match="Lk >= Lq"):
        ta.triton_attention(q, k, k, causal=True, window=None)


def test_keys_no_query_sees_get_zero_gradients():
    """A window far from the first keys: their dK and dV are zeros (stored, not left unset)."""
    torch.manual_seed(8)
    q = torch.randn(1, 2, 10, 16, requires_grad=True)
    k = torch.randn(1, 1, 60, 16, requires_grad=True)
    v = torch.randn(1, 1, 60, 16, requires_grad=True)
    ta.triton_attention(q, k, v, causal=True, window=4).sum().backward()
    assert torch.equal(k.grad[:, :, :47], torch.zeros_like(k.grad[:, :, :47]))
    assert torch.equal(v.grad[:, :, :47], torch.zeros_like(v.grad[:, :, :47]))
    assert (k.grad[:, :, 47:].abs().sum(-1) > 0).all() and (v.grad[:, :, 47:].abs().sum(-1) > 0).all()


# ---------------------------------------------------------------------------------------
# Non-contiguous inputs
# ---------------------------------------------------------------------------------------


def test_non_contiguous_inputs_and_grad():
    torch.manual_seed(3)
    B, H, Hkv, N, D = 2, 4, 2, 37, 80
    q = torch.randn(B, N, H, D).transpose(1, 2)  # from a [B, N, H, D] layout
    kv = torch.randn(B, N, 2, Hkv, D)  # packed K and V, [B, N, 2, Hkv, D]
    k = kv[:, :, 0].transpose(1, 2)
    v = kv[:, :, 1].transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    dout = torch.randn(B, N, H, D).transpose(1, 2)  # a non-contiguous upstream gradient
    _check_against_reference(q, k, v, True, 9, dout=dout)


def test_sliced_head_dim_and_expanded_grad():
    torch.manual_seed(4)
    q = torch.randn(1, 2, 21, 128)[..., 16:80]  # D = 64 with a row stride of 128
    k = torch.randn(1, 2, 21, 64)
    v = torch.randn(1, 2, 21, 64)
    # out.sum().backward() hands the kernel an expanded (all strides 0) gradient
    dout = torch.ones(1, 1, 1, 1).expand(1, 2, 21, 64)
    _check_against_reference(q, k, v, False, None, dout=dout)


# ---------------------------------------------------------------------------------------
# Block skipping: blocks visited (and masked) per program, against the mask
# ---------------------------------------------------------------------------------------


def _tile_stats(n, bq, bk, causal, window, streamed_queries: bool, sinks: int = 0, n_k: int | None = None):
    """Per (query block, key block): (visited, masked) as the mask convention implies, for n
    query rows against n_k keys (default n), the queries being the last n positions.

    visited: some (row, key) pair inside the sequence is visible.
    masked: visited, and the tile is not entirely visible. The streamed side of the tile
    (keys in the forward and dQ kernels, queries in dK/dV) must also lie inside the sequence,
    since a tile crossing N needs bounds masks; positions past N on the resident side are
    ignored in the forward and dQ kernels (their rows are never stored), not in dK/dV (whose
    dS for padding keys would reach the fused dQ).
    With sinks, the kernels visit the window's band as without sinks and mask its tiles as
    for the window alone (a sink key can make a band edge tile fully visible: that tile is
    masked anyway, at most a few per program); the tiles visited only for their sinks are
    masked exactly when they are not fully visible.
    """
    n_k = n if n_k is None else n_k
    nq, nk = -(-n // bq), -(-n_k // bk)
    size_q, size_k = nq * bq, nk * bk
    rows, cols = torch.arange(size_q), torch.arange(size_k)
    vis = Mask.of(causal, window, sinks, q_offset=n_k - n).visible(rows, cols)
    vis = torch.ones(size_q, size_k, dtype=torch.bool) if vis is None else vis
    inside = (rows[:, None] < n) & (cols[None, :] < n_k)
    if streamed_queries:  # dK/dV: its keys' dS also feeds dQ, so neither side may cross N
        full_ok = vis & inside
    else:
        full_ok = (vis | (rows[:, None] >= n)) & (cols[None, :] < n_k)
    visited = (vis & inside).view(nq, bq, nk, bk).any(dim=3).any(dim=1)
    full = full_ok.view(nq, bq, nk, bk).all(dim=3).all(dim=1)
    if not sinks:
        return visited, visited & ~full
    band, band_masked = _tile_stats(n, bq, bk, causal, window, streamed_queries, n_k=n_k)
    assert not (band & ~visited).any()
    return visited, band_masked | (visited & ~band & ~full)


VISIT_CONFIGS = [
    # (fwd BLOCK_M, BLOCK_N), (dkdv BLOCK_M, BLOCK_N), (dq BLOCK_M, BLOCK_N)
    ((16, 16), (16, 16), (16, 16)),
    ((32, 16), (16, 32), (32, 16)),
    ((16, 32), (32, 16), (16, 32)),
]
VISIT_MASKS = [(False, None, 0), (True, None, 0), (True, 1, 0), (True, 5, 0), (True, 20, 0), (True, 100, 0),
               (True, 5, 3), (True, 1, 20), (True, 20, 17), (True, 8, 40)]


# the default suite runs the first configuration at N=50; the other five cases run in CI (-m ci)
@pytest.mark.parametrize("blocks", [VISIT_CONFIGS[0]] + [pytest.param(b, marks=[pytest.mark.slow, pytest.mark.ci])
                                                         for b in VISIT_CONFIGS[1:]],
                         ids=lambda b: "fwd{}x{}-dkdv{}x{}-dq{}x{}".format(*b[0], *b[1], *b[2]))
@pytest.mark.parametrize("n", [50, pytest.param(64, marks=[pytest.mark.slow, pytest.mark.ci])])
def test_block_visits_match_mask(blocks, n):
    """(n=50 with the separate dQ kernel, n=64 with dQ fused into dK/dV.)"""
    _check_block_visits(blocks, n, n, fused=n != 50)


# (Lq, Lk, fused dQ): offsets that are and are not multiples of the blocks, a single query
KV_VISIT_SHAPES = [(21, 50, False), (16, 64, True), (1, 37, False), (33, 47, True), (40, 100, False)]


@pytest.mark.parametrize("blocks", [VISIT_CONFIGS[0]] + [pytest.param(b, marks=pytest.mark.slow)
                                                         for b in VISIT_CONFIGS[1:]],
                         ids=lambda b: "fwd{}x{}-dkdv{}x{}-dq{}x{}".format(*b[0], *b[1], *b[2]))
@pytest.mark.parametrize("lq,lk,fused", [KV_VISIT_SHAPES[0]] + [pytest.param(*s, marks=pytest.mark.slow)
                                                                for s in KV_VISIT_SHAPES[1:]])
def test_block_visits_match_mask_fewer_queries(blocks, lq, lk, fused):
    """Lq < Lk: each program's visited and masked blocks follow the mask with q_offset = Lk - Lq."""
    _check_block_visits(blocks, lq, lk, fused)


def _check_block_visits(blocks, n, n_k, fused):
    """Every mask of VISIT_MASKS: the blocks each program of each kernel visits and masks equal
    _tile_stats' for n query rows against n_k keys; the outputs match the reference."""
    (fm, fn), (km, kn), (qm, qn) = blocks
    settings = TritonSettings(count_visits=True, fused_dq="1" if fused else "0",
                              configs={"fwd": (fm, fn, 4, 1), "dkdv": (km, kn, 4, 1), "dq": (qm, qn, 4, 1)})
    torch.manual_seed(5)
    B, H, Hkv, D = 1, 2, 1, 16
    group = H // Hkv
    for causal, window, sinks in VISIT_MASKS:
        q = torch.randn(B, H, n, D, requires_grad=True)
        k = torch.randn(B, Hkv, n_k, D, requires_grad=True)
        v = torch.randn(B, Hkv, n_k, D, requires_grad=True)
        out = ta.triton_attention(q, k, v, causal=causal, window=window, scale=None, sinks=sinks, settings=settings)
        out.backward(torch.randn_like(out))
        label = f"causal={causal} window={window} sinks={sinks} n={n} n_k={n_k} blocks={blocks}"

        counts, bm, bn = ta.last_visits["fwd"]
        assert (bm, bn) == (fm, fn)
        visited, masked = _tile_stats(n, bm, bn, causal, window, False, sinks, n_k)
        assert torch.equal(counts & 0xFFFF, visited.sum(1).int().expand(B * H, -1)), "fwd visits " + label
        assert torch.equal(counts >> 16, masked.sum(1).int().expand(B * H, -1)), "fwd masked " + label

        assert ("dq" in ta.last_visits) == (not fused)  # the dQ kernel runs only when not fused
        if "dq" in ta.last_visits:
            counts, bm, bn = ta.last_visits["dq"]
            visited, masked = _tile_stats(n, bm, bn, causal, window, False, sinks, n_k)
            assert torch.equal(counts & 0xFFFF, visited.sum(1).int().expand(B * H, -1)), "dq visits " + label
            assert torch.equal(counts >> 16, masked.sum(1).int().expand(B * H, -1)), "dq masked " + label

        counts, bm, bn = ta.last_visits["dkdv"]
        visited, masked = _tile_stats(n, bm, bn, causal, window, True, sinks, n_k)
        # one dK/dV program per key block loops over the `group` query heads of its kv head
        assert torch.equal(counts & 0xFFFF, group * visited.sum(0).int().expand(B * Hkv, -1)), "dkdv visits " + label
        assert torch.equal(counts >> 16, group * masked.sum(0).int().expand(B * Hkv, -1)), "dkdv masked " + label

        # the same run, checked for correctness with these block shapes
        q64, k64, v64 = (t.detach().double() for t in (q, k, v))
        ref = reference_attention(q64, k64, v64, Mask.of(causal, window, sinks, q_offset=n_k - n))
        assert errors(out, ref)[0] < TOLERANCE["float32"], label


@pytest.mark.parametrize("causal,window,sinks,lq", [
    (True, 5, 3, 100), (True, None, 0, 37),
    *(pytest.param(*c, marks=[pytest.mark.slow, pytest.mark.ci]) for c in ((True, None, 0, 100), (False, None, 0, 100)))])
def test_heaviest_query_blocks_start_first(causal, window, sinks, lq):
    """Under a causal mask, forward and dQ programs start in order of decreasing work (the
    last query block, which sees the most keys, first); dK/dV programs start with key block 0,
    which the most queries see. The interpreter runs programs in launch order, and each
    records its launch rank (count_visits). lq < 100: the last lq queries against 100 keys."""
    # fused_dq "0": so the dQ kernel runs (and starts heaviest first)
    settings = TritonSettings(count_visits=True, fused_dq="0")
    torch.manual_seed(7)
    n, D = 100, 16
    q = torch.randn(1, 2, lq, D, requires_grad=True)
    k, v = (torch.randn(1, 1, n, D, requires_grad=True) for _ in range(2))
    out = ta.triton_attention(q, k, v, causal=causal, window=window, scale=None, sinks=sinks, settings=settings)
    out.backward(torch.randn_like(out))
    for kind in ("fwd", "dq", "dkdv"):
        counts, _, _ = ta.last_visits[kind]
        order = ta.last_order[kind]
        work = counts & 0xFFFF
        assert order.unique().numel() == order.numel(), kind  # every program ran once
        for head in range(order.shape[0]):
            steps = order[head].diff()
            if kind != "dkdv" and (causal or window):
                assert (steps < 0).all(), f"{kind}: the last query block must start first: {order[head]}"
            else:
                assert (steps > 0).all(), f"{kind}: blocks must start in index order: {order[head]}"
            if window is None:  # causal or none: started in order of non-increasing work
                started = work[head][order[head].argsort()]
                assert (started.diff() <= 0).all(), f"{kind}: work in start order {started.tolist()}"


def test_window_skips_blocks():
    """A narrow window visits a bounded number of key blocks per query block, whatever N."""
    visited, _ = _tile_stats(256, 16, 16, True, 8, False)
    assert visited.sum(1).max().item() == 2
    causal_visited, _ = _tile_stats(256, 16, 16, True, None, False)
    assert causal_visited.sum().item() == 16 * 17 // 2
    # 4 sinks add one key block (the first) per query block, no more
    sink_visited, _ = _tile_stats(256, 16, 16, True, 8, False, 4)
    assert sink_visited.sum(1).max().item() == 3
    assert sink_visited[:, 0].all()
    # the last 64 queries against 256 keys: each query block sees the 4 key blocks up to its own
    # under the window (at most 2) or all those before them (causal)
    visited, _ = _tile_stats(64, 16, 16, True, 8, False, n_k=256)
    assert visited.shape == (4, 16) and visited.sum(1).tolist() == [2, 2, 2, 2]
    assert _tile_stats(64, 16, 16, True, None, False, n_k=256)[0].sum(1).tolist() == [13, 14, 15, 16]


# ---------------------------------------------------------------------------------------
# Registration, check(), info(), interpreter selection, triton missing
# ---------------------------------------------------------------------------------------


def _cell(**kw):
    """A cell as an implementation's checks see it (the attributes Impl.declared_reason and
    check read): by default 256 tokens of fp32 causal attention on the CPU, Lq = n, the
    interpreter not allowed past its limit."""
    base = dict(batch=1, heads=4, kv_heads=4, head_dim=64, dtype="float32", mask="causal", window=None,
                mode="fwd", device="cpu", allow_interpreter=False, impl="triton", n=256)
    base.update(kw)
    base.setdefault("q_len", base["n"])
    return SimpleNamespace(**base)


def test_registration_declares_capabilities():
    impl = ta.triton_attention.__ctxbench_impl__
    assert impl.name == "triton" and registry.get("triton") is impl
    assert impl.devices == {"cpu", "cuda"}
    assert impl.dtypes == {"float32", "float16", "bfloat16"}
    assert impl.masks == {"none", "causal", "window"}
    assert impl.modes == {"fwd", "bwd", "fwd+bwd"}
    assert impl.gqa and impl.exact and impl.sinks and impl.kv_cache


def test_check_reasons():
    impl = ta.triton_attention.__ctxbench_impl__
    assert impl.unsupported_reason(_cell(n=512)) is None
    reason = impl.unsupported_reason(_cell(n=1024))
    assert "Triton interpreter on CPU is for correctness only; N > 512 needs --allow-interpreter" in reason
    assert impl.unsupported_reason(_cell(n=1024, allow_interpreter=True)) is None
    # fewer queries than keys: declared (kv_cache), and the interpreter's limit is on the keys
    assert impl.unsupported_reason(_cell(n=512, q_len=16)) is None
    assert "N > 512" in impl.unsupported_reason(_cell(n=1024, q_len=16))
    assert "head_dim" in impl.unsupported_reason(_cell(head_dim=512))
    assert "TRITON_INTERPRET" in impl.unsupported_reason(_cell(device="cuda"))


def test_info_reports_config_and_precision():
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    ta.triton_attention(q, k, v, causal=True, window=None, scale=None)
    info = ta.triton_attention.__ctxbench_impl__.info()
    assert info["interpreted"] is True
    assert info["precision"] == "ieee"
    assert info["config"].startswith("BLOCK_M=") and "warps=" in info["config"]
    ta.triton_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True, window=None, scale=None)
    assert ta.triton_attention.__ctxbench_impl__.info()["precision"] == "bf16"


def test_autotune_space_and_pruning():
    """The autotuned space is the one documented; pruning always leaves a config."""
    fwd = tc.tuning_space("fwd")
    assert {c[0] for c in fwd} == {64, 128} and {c[1] for c in fwd} == {32, 64, 128}
    assert {c[2] for c in fwd} == {4, 8} and {c[3] for c in fwd} == {2, 3, 4}
    for kind in ("fwd", "dkdv", "dq"):
        configs = [tc.to_triton(c) for c in tc.tuning_space(kind)]
        for fma_config in tc.FP32_IEEE_SPACE[kind]:
            assert fma_config in tc.tuning_space(kind)
        for n in (1, 100, 4096):
            for d, dtype, precision in ((16, torch.float16, "tf32"), (128, torch.bfloat16, "tf32"),
                                        (128, torch.float32, "ieee"), (256, torch.float32, "tf32")):
                args = {"N": n, "Q": torch.empty(0, dtype=dtype)}
                kept = tc.prune(kind, configs, args, BLOCK_D=d, PRECISION=precision)
                assert kept, (kind, n, d, dtype)
                tuples = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
                if precision == "ieee":
                    assert tuples == tc.FP32_IEEE_SPACE[kind]
                elif n == 1:
                    assert all(min(bm, bn) <= 32 for bm, bn, _, _ in tuples)
                if dtype != torch.float32 and d <= 128:  # only configs that spill nothing on sm_90
                    assert set(tuples) <= set(tc.NO_SPILL[kind][64 if d <= 64 else 128]), (kind, n, d)
        # the spill-free lists, the defaults and the GPU check's list are all in the space
        space = set(tc.tuning_space(kind))
        for block_d in (64, 128):
            assert tc.NO_SPILL[kind][block_d] and set(tc.NO_SPILL[kind][block_d]) <= space
            assert tc.default_config(kind, False, block_d) in tc.NO_SPILL[kind][block_d]
        assert set(tc.CHECK_SPACE[kind]) <= set(tc.NO_SPILL[kind][128])
        assert tc.tuning_space(kind, "check") == tc.CHECK_SPACE[kind]
        if kind == "dkdv":  # the fused dQ's own spill-free lists and defaults
            for block_d in (64, 128):
                fused = tc.NO_SPILL["dkdv_fused"][block_d]
                assert fused and set(fused) <= space
                assert tc.default_config(kind, False, block_d, True) in fused
                args = {"N": 4096, "Q": torch.empty(0, dtype=torch.bfloat16)}
                kept = tc.prune(kind, configs, args, BLOCK_D=block_d, PRECISION="tf32", FUSED_DQ=True)
                assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept} \
                    <= set(fused)
            assert tc.fused_dq(64) and not tc.fused_dq(128) and not tc.fused_dq(64, 4)  # "auto"
            assert tc.fused_dq(128, 4, "1") and not tc.fused_dq(64, 2, "0")
        assert tc.default_config(kind, False, 256) in space
        assert tc.default_config(kind, True, 64) == tc.FP32_IEEE_SPACE[kind][0]
        # the wide (D > 128) defaults fit in shared memory
        bm, bn, _, stages = tc.default_config(kind, False, 256)
        assert tc.smem_estimate(kind, bm, bn, stages, 256, 2) <= tc.SMEM_LIMIT


def test_settings_read_from_the_environment_at_call_time(monkeypatch):
    """CTXBENCH_TRITON_SPACE=check (benchmarks/gpu_check.sh) builds the autotuners over
    CHECK_SPACE only; the variables count when a call reads them (after import: this module
    was imported long before), and anything but the documented values is refused then."""
    monkeypatch.setenv("CTXBENCH_TRITON_SPACE", "check")
    monkeypatch.setenv("CTXBENCH_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("CTXBENCH_TRITON_FP32_PRECISION", "tf32")
    monkeypatch.setenv("CTXBENCH_TRITON_FUSED_DQ", "1")
    settings = TritonSettings.from_environment()
    assert settings == TritonSettings(autotune=False, space="check", fp32_precision="tf32", fused_dq="1")
    assert TritonSettings.from_environment({}) == TritonSettings()  # the defaults
    for kind in tc.KINDS:
        assert [tc.from_triton(c) for c in ta.autotuner(kind, settings.space).configs] == tc.CHECK_SPACE[kind]
        assert [tc.from_triton(c) for c in ta.autotuner(kind).configs] == tc.tuning_space(kind)
    # a call without settings reads them now: fp32 on tf32, dQ fused at D=16 in fp32
    q, k, v = (torch.randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    ta.triton_attention(q, k, v, causal=True, window=None).sum().backward()
    assert ta.info()["precision"] == "tf32" and "fused into dkdv" in ta.info()["bwd_config"], ta.info()
    monkeypatch.setenv("CTXBENCH_TRITON_FUSED_DQ", "0")
    monkeypatch.setenv("CTXBENCH_TRITON_FP32_PRECISION", "ieee")
    ta.triton_attention(q, k, v, causal=True, window=None).sum().backward()
    assert ta.info()["precision"] == "ieee" and "fused into dkdv" not in ta.info()["bwd_config"], ta.info()
    for name, value in (("CTXBENCH_TRITON_SPACE", "bogus"), ("CTXBENCH_TRITON_FUSED_DQ", "2")):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            ta.triton_attention(q, k, v, causal=True, window=None)
        monkeypatch.delenv(name)


@pytest.mark.parametrize("fused", ["0", "1"])
def test_autotuned_launch_path(fused):
    """The GPU control flow (autotuner, pruning, grid from the chosen config, best_config into
    info) on the interpreter: small spaces, and a stand-in for do_bench (triton's needs a
    GPU driver) that runs each config and makes the last one the fastest. With the fused dQ,
    every timed run adds into the dQ accumulator: the autotuner must zero it each time."""

    def fake_do_bench(kernel_call, quantiles=None, **kw):
        kernel_call()
        fake_do_bench.calls += 1
        t = 1.0 / fake_do_bench.calls
        return [t, t, t]

    space = {"fwd": [(16, 16, 4, 1), (32, 16, 4, 1)], "dkdv": [(16, 16, 4, 1), (16, 32, 4, 1)],
             "dq": [(16, 16, 4, 1), (32, 16, 4, 1)]}
    tuned = {}
    for kind, configs in space.items():
        fake_do_bench.calls = 0
        tuned[kind] = ta.make_tuner(kind, configs, interpret=interpreted(), do_bench=fake_do_bench)
    # tuners given: the autotuning branch, on the interpreter too
    settings = TritonSettings(fused_dq=fused, tuners=tuned)
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.bfloat16) for _ in range(3))
    fake_do_bench.calls = 0
    _check_against_reference(q, k, v, True, 7, settings=settings)
    info = ta.info()
    assert info["config"] == "BLOCK_M=32 BLOCK_N=16 warps=4 stages=1"
    dq = ("fused into dkdv (fp32 atomic adds), then scaled and cast" if fused == "1"
          else "BLOCK_M=32 BLOCK_N=16 warps=4 stages=1")
    assert info["bwd_config"] == f"dkdv: BLOCK_M=16 BLOCK_N=32 warps=4 stages=1; dq: {dq}"
    assert tuned["fwd"].best_config.kwargs == {"BLOCK_M": 32, "BLOCK_N": 16}


def test_empty_batch_and_n1_gqa():
    q = torch.randn(0, 4, 5, 16)
    k = torch.randn(0, 2, 5, 16)
    assert ta.triton_attention(q, k, k, causal=True, window=None).shape == (0, 4, 5, 16)


def _without(*names: str) -> dict:
    """This process's environment without the variables `names`."""
    return {k: v for k, v in os.environ.items() if k not in names}


def test_interpreter_selected_without_cuda():
    """Without CUDA and with TRITON_INTERPRET unset, each call chooses the interpreter; importing
    the module sets nothing in the environment and reads nothing from it (settings that would be
    refused at a call do not stop the import)."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: calls compile unless TRITON_INTERPRET says otherwise")
    env = dict(_without("TRITON_INTERPRET"), CTXBENCH_TRITON_SPACE="bogus", CTXBENCH_TRITON_FUSED_DQ="bogus")
    code = ("import os, ctxbench.kernels.triton_attention as t, ctxbench.kernels.triton_decode; "
            "print(os.environ.get('TRITON_INTERPRET'), t.interpreted())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "True"]


# Run in a fresh process after importing FIRST (which imports triton without TRITON_INTERPRET):
# the triton kernel (forward and backward) and triton_decode on fresh random inputs, against the
# float64 reference; then whether what the interpreter scope patches (JITFunction.__call__ and
# the JITFunctions attached to triton's tensor class as methods) is as it was.
IMPORTED_FIRST_SCRIPT = r'''
import importlib, json, os, sys
importlib.import_module(sys.argv[1])
import torch
if torch.cuda.is_available():  # interpreted all the same: set only now, after triton's import
    os.environ["TRITON_INTERPRET"] = "1"
import triton.language as tl
from triton.runtime.jit import JITFunction
def patched():
    return vars(JITFunction).get("__call__"), {name: value for name, value in vars(tl.core.tensor).items()
                                               if isinstance(value, JITFunction)}
before = patched()
from ctxbench.core.masks import Mask
from ctxbench.core.reference import errors, reference_attention
from ctxbench.kernels import triton_attention, triton_decode
torch.manual_seed(int(sys.argv[2]))
rel = {}
# prefill: GQA, a window with sinks across two blocks of the interpreter's 16; forward and gradients
q = torch.randn(1, 2, 20, 16, requires_grad=True)
k, v = (torch.randn(1, 1, 20, 16, requires_grad=True) for _ in range(2))
mask = Mask.of(True, 9, 2)
out = triton_attention.triton_attention(q, k, v, causal=True, window=9, sinks=2)
dout = torch.randn_like(out)
grads = torch.autograd.grad(out, (q, k, v), dout)
q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
ref = reference_attention(q64, k64, v64, mask)
ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
    rel["triton " + name] = errors(x.detach(), r.detach())[0]
# decode: 2 query tokens of a GQA group against 40 cached keys, the merge of 2 splits
q = torch.randn(2, 2, 2, 16)
k, v = (torch.randn(2, 1, 40, 16) for _ in range(2))
out = triton_decode.decode_attention(q, k, v, causal=True, num_splits=2)
ref = reference_attention(q.double(), k.double(), v.double(), Mask.of(True, None, 0, q_offset=38))
rel["triton_decode out"] = errors(out, ref)[0]
restored = before == patched()
print(json.dumps({"rel": rel, "restored": restored, "interpreted": triton_attention.info()["interpreted"]}))
'''


# What imports triton before ctxbench does: transformers' model code (the case of the issue),
# triton itself, torch's flex attention, and ctxbench's sdpa kernel module.
FIRST_IMPORTS = ["transformers.modeling_utils", "triton", "torch.nn.attention.flex_attention", "ctxbench.kernels.sdpa"]


@pytest.mark.slow
@pytest.mark.ci  # four interpreters, one importing transformers' model code: about 20 s; .ci/run's
# every-file-alone step checks the same property for every test file
def test_interpreter_whatever_was_imported_first(tmp_path):
    """A process that imported triton before ctxbench, with TRITON_INTERPRET unset then (the
    transformers import used to fail every interpreted call with "Cannot call @triton.jit'd
    outside of the scope of a kernel"): both kernels run interpreted and match float64, and
    triton is left as it was. One fresh process per FIRST_IMPORTS, run side by side (each
    spends most of its time importing)."""
    procs = {}
    for first in FIRST_IMPORTS:
        if importlib.util.find_spec(first.split(".")[0]) is None:  # transformers: a test extra
            continue
        out, err = (open(tmp_path / f"{first}.{name}", "w+") for name in ("out", "err"))
        cmd = [sys.executable, "-c", IMPORTED_FIRST_SCRIPT, first, str(_seed(f"imported-first-{first}"))]
        procs[first] = (subprocess.Popen(cmd, env=_without("TRITON_INTERPRET"), stdout=out, stderr=err), out, err)
    assert "triton" in procs
    for first, (proc, out, err) in procs.items():
        proc.wait(timeout=600)
        out.seek(0)
        err.seek(0)
        assert proc.returncode == 0, (first, err.read()[-3000:])
        result = json.loads(out.read().strip().splitlines()[-1])
        assert result["interpreted"] is True and result["restored"] is True, (first, result)
        for name, rel in result["rel"].items():
            assert rel < TOLERANCE["float32"], (first, name, rel)


def test_interpreter_scope_restores_triton():
    """interpreter_scope() routes JITFunction calls and the tensor methods that are JITFunctions
    only while a scope is open (scopes nest: the outer one keeps them routed), and puts them
    back as they were."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    call = vars(JITFunction).get("__call__")
    methods = {name: value for name, value in vars(tl.core.tensor).items() if isinstance(value, JITFunction)}
    with interpreter_scope():
        with interpreter_scope():
            assert JITFunction.__call__ is not call
        assert JITFunction.__call__ is not call
        assert not any(isinstance(vars(tl.core.tensor)[name], JITFunction) for name in methods)
    assert vars(JITFunction).get("__call__") is call
    assert {name: vars(tl.core.tensor)[name] for name in methods} == methods


WITHOUT_TRITON_SCRIPT = r'''
import sys
sys.modules["triton"] = sys.modules["triton.language"] = None  # `import triton` raises ImportError
from types import SimpleNamespace
import torch
from ctxbench import registry
from ctxbench.kernels import triton_attention, triton_decode
cell = dict(batch=1, heads=4, kv_heads=4, head_dim=64, dtype="float32", mask="causal", window=None, mode="fwd",
            allow_interpreter=False, n=256, q_len=256)
for device in ("cpu", "cuda"):
    print(triton_attention.triton_attention.__ctxbench_impl__.unsupported_reason(SimpleNamespace(**cell, device=device)))
    print(triton_decode.check(SimpleNamespace(**dict(cell, n=1, q_len=1), device=device)))
for call in (lambda x: triton_attention.triton_attention(x, x, x, causal=False, window=None),
             lambda x: triton_decode.decode_attention(x, x, x)):
    try:
        call(torch.zeros(1, 1, 1, 16))
    except registry.Unsupported as exc:
        print(exc)
'''


def test_without_triton_module_imports_and_refuses():
    """Without triton, the Triton modules import (configs, settings and helpers included) and
    both kernels refuse every cell and call, saying so."""
    out = subprocess.run([sys.executable, "-c", WITHOUT_TRITON_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["triton is not installed: pip install triton"] * 6


# ---------------------------------------------------------------------------------------
# Compiling for Hopper (sm_90) without a GPU: benchmarks/kernel_stats.py compiles every kernel
# of one forward + backward as launched, down to a cubin with the ptxas that ships with triton,
# and reports each one's registers, spills, shared memory and wgmma count.
# ---------------------------------------------------------------------------------------

KERNEL_STATS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                            "kernel_stats.py")


def _run_sm90(dtype: str, head_dim: int, mask: str, which: str, q_len: int | None = None,
              **env_vars: str) -> list[dict]:
    """kernel_stats' rows (one per kernel and configuration) for one dtype, head dim and mask.
    which: "default" (the configs used without autotuning), "tuned" (those the autotuner
    tries at N=1024), "check" (the GPU check's fixed list). q_len: that many queries against
    the 1024 keys (the last ones, as against a KV cache) instead of 1024."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1", **env_vars)
    cmd = [sys.executable, KERNEL_STATS, "--arch", "sm_90", "--dtype", dtype, "--head-dim", str(head_dim),
           "--mask", mask, "--which", which, "--n", "1024", "--json"]
    if q_len is not None:
        cmd += ["--q-len", str(q_len)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode == 3:
        pytest.skip(out.stdout.strip() or "this triton has no AOT binder API")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows and out.returncode in (0, 1), out.stderr[-3000:]
    return rows


# Spill bytes per thread allowed under a triton other than 3.6 (the GPU image's version, held
# to zero): 3.9 allocates registers differently and spills up to 156 B in some window/sink
# configs of NO_SPILL (see its comment); more than this would be a regression of the kernel.
OTHER_TRITON_SPILL_BOUND = 256


def _spilling(rows: list[dict]) -> list[str]:
    """The rows that spill more than this triton version is allowed to (see above)."""
    import triton

    bound = 0 if triton.__version__.startswith("3.6") else OTHER_TRITON_SPILL_BOUND
    return [f"{r['kernel']} {r['dtype']} D={r['head_dim']} {r['mask']} {r['config']}: {r['regs']} registers, "
            f"{r['spill']} B spilled (triton {triton.__version__})" for r in rows if (r["spill"] or 0) > bound]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_compiles_for_sm90(dtype):
    """The default configs compile for Hopper for every mask and head-dim family: tensor
    cores (wgmma) for 16-bit inputs, FMAs for IEEE fp32, within the shared memory limit; for
    16-bit inputs and D <= 128 they do not spill registers.
    (fp32 kernels take 5-40 s each to compile on a small CPU: fewer head dims and masks there.)"""
    rows = []
    for head_dim in ((16, 80) if dtype == "float32" else (16, 64, 80, 128, 256)):
        for mask in ("none", "causal", "window") + (() if dtype == "float32" else ("sinks",)):
            rows += _run_sm90(dtype, head_dim, mask, "default")
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        if r["kernel"] in ("fwd", "dkdv", "dq"):
            assert r["mma"] == ("fma" if dtype == "float32" else "wgmma"), r
            assert r["shared"] <= tc.SMEM_LIMIT, r
    if dtype != "float32":
        assert not _spilling([r for r in rows if r["head_dim"] <= 128]), _spilling(rows)
    _check_matmuls_per_tile(rows)


def _check_matmuls_per_tile(rows: list[dict], fused: bool | None = None) -> None:
    """From the compiled TTIR: the forward does 2 matmuls per tile, the backward 5 per tile
    pair with the fused dQ (FlashAttention-2's count) and 7 with the separate dQ kernel."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["head_dim"], r["mask"]), {})[r["kernel"]] = r["mma_per_tile"]
    for (head_dim, mask), mma in groups.items():
        size = 4 if rows[0]["dtype"] == "fp32" else 2
        use_fused = tc.fused_dq(max(16, 1 << (head_dim - 1).bit_length()), size) if fused is None else fused
        assert mma["fwd"] == 2, (head_dim, mask, mma)
        assert ("dq" in mma) != use_fused and ("dq_cast" in mma) == use_fused, (head_dim, mask, mma)
        assert mma["dkdv"] + mma.get("dq", 0) == (5 if use_fused else 7), (head_dim, mask, mma)
        assert mma.get("pre", 0) == mma.get("dq_cast", 0) == 0


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_fewer_queries_compile_for_sm90(dtype):
    """Lq < Lk (here 256 queries against 1024 keys: the HAS_OFFSET kernels) compiles for Hopper
    like Lq = Lk: wgmma, the shared memory of Lq = Lk, no spilled register for D <= 128.
    (Query counts that are not multiples of 16 are not held to this: there the dK/dV kernel
    with sinks spills on sm_90, 144-176 B per thread with its default configs at D=64 and 128,
    where Lq = Lk at such lengths spills 72 B at D=128.)"""
    rows = []
    for head_dim in (64, 128):
        for mask in ("none", "causal", "window", "sinks"):
            rows += _run_sm90(dtype, head_dim, mask, "default", q_len=256)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        if r["kernel"] in ("fwd", "dkdv", "dq"):
            assert r["mma"] == "wgmma" and r["shared"] <= tc.SMEM_LIMIT, r
    assert not _spilling(rows), _spilling(rows)
    _check_matmuls_per_tile(rows)


@pytest.mark.slow
def test_fused_backward_at_d128_compiles_for_sm90():
    """CTXBENCH_TRITON_FUSED_DQ=1 takes the 5-matmul backward at D=128 too (off by default
    there: see NO_SPILL["dkdv_fused"]); it compiles to wgmma with 5 matmuls per tile pair,
    and under triton 3.6 (the GPU image's) its default config does not spill."""
    import triton

    rows = _run_sm90("bfloat16", 128, "causal", "default", CTXBENCH_TRITON_FUSED_DQ="1")
    assert all(r["ok"] for r in rows), rows
    _check_matmuls_per_tile(rows, fused=True)
    if triton.__version__.startswith("3.6"):
        assert not _spilling(rows), _spilling(rows)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,head_dim,mask", [("bfloat16", 128, "window"), ("float16", 128, "sinks"),
                                                 ("bfloat16", 64, "causal"), ("float16", 80, "none"),
                                                 ("bfloat16", 32, "causal"), ("float16", 256, "causal")])
def test_autotune_space_compiles_for_sm90(dtype, head_dim, mask):
    """Every config the autotuner can pick compiles and fits in shared memory; the pruning
    estimate of shared memory bounds what the compiler allocates (so no kept config fails to
    launch), exactly for the forward and dQ kernels (so none is wrongly pruned there) and within
    4 KiB for dK/dV from 64 KiB up (the compiler lays out its LSE/Delta rows and the fused dQ's
    staging in varying ways); and for D <= 128 none spills registers (see NO_SPILL and _prune)."""
    rows = _run_sm90(dtype, head_dim, mask, "tuned")
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        if r["kernel"] in ("fwd", "dkdv", "dq"):
            assert r["shared"] <= tc.SMEM_LIMIT, r
            assert r["shared"] <= r["smem_estimate"], r
            if r["kernel"] != "dkdv":
                assert r["shared"] == r["smem_estimate"], r
            elif r["shared"] >= 65536:  # a close bound where SMEM_LIMIT can bind (a loose one
                assert r["smem_estimate"] - r["shared"] <= 4096, r  # would prune usable configs)
    if head_dim <= 128:
        assert not _spilling(rows), _spilling(rows)
