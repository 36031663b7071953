"""Every CPU attention implementation against the float64 reference, plus the blockwise
kernels' own promises: exact tiling plans, O(N * block) memory, O(N * W) work, gradients.

Inputs are fresh random tensors from a per-test random seed, printed in every failure
message so that a failing case can be replayed by hand.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from ctxbench.kernels import _blockwise, chunked as chunked_mod, sliding_window as sliding_mod
from ctxbench.core.cell import Cell, Config
from ctxbench.core.masks import Mask
from ctxbench.core.reference import TOLERANCE, errors, reference_attention
from ctxbench.registry import Unsupported, all_impls
from references import new_seed, random_qkv

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Axes of the accuracy matrix. The full product is 4*4*7*5*2*2 = 2240 cases per
# implementation; the orthogonal array below covers every pair of values of any two axes
# in 49 cases.
LENGTHS = [1, 7, 129, 1000]
HEAD_DIMS = [32, 64, 80, 128]
HEADS = [(8, 8), (8, 4), (8, 2), (8, 1), (1, 1), (2, 1), (4, 2)]  # (Hq, Hkv): groups 1, 2, 4, 8
MASKS = ["none", "causal", "window1", "window3", "windowN"]
DTYPE_NAMES = ["float32", "bfloat16"]
BATCHES = [1, 2]


def pairwise_cases() -> list[tuple]:
    """(n, head_dim, (hq, hkv), mask, dtype, batch) tuples covering every pair of values.

    Orthogonal array OA(49, 8, 7, 2): row (a, b) puts value index (a + j*b) mod 7 on axis j.
    Any two axes j1 != j2 see all 49 index pairs, since (a, b) -> (a + j1 b, a + j2 b) is a
    bijection mod 7; folding an index onto a shorter axis (mod its length) keeps every pair
    of that axis's values present.
    """
    axes = [LENGTHS, HEAD_DIMS, HEADS, MASKS, DTYPE_NAMES, BATCHES]
    cases = []
    for a in range(7):
        for b in range(7):
            cases.append(tuple(axis[(a + j * b) % 7 % len(axis)] for j, axis in enumerate(axes)))
    return cases


def mask_args(mask: str, n: int) -> tuple[bool, int | None]:
    """(causal, window) for a mask label; windowN is a window at least as long as the sequence."""
    if mask == "none":
        return False, None
    if mask == "causal":
        return True, None
    return True, {"window1": 1, "window3": 3, "windowN": n + 5}[mask]


# Implementations whose every case costs seconds here, with the tests that cover them by default.
SLOW_ON_CPU = {"triton": "its interpreter; tests/test_triton.py has pairwise cases of its own",
               "flex": "torch.compile per shape and mask; tests/test_flex.py"}


def cpu_impls(compiled_slow: bool = False) -> list:
    """Every implementation that runs on the CPU. compiled_slow: the cases of SLOW_ON_CPU's
    implementations are marked slow (`pytest -m slow` runs them)."""
    # decode kernels (a query-length limit) have their own tests: these grids are square
    impls = [impl for name, impl in sorted(all_impls().items())
             if "cpu" in impl.devices and impl.max_query_len is None]
    if not compiled_slow:
        return impls
    return [pytest.param(i, marks=pytest.mark.slow, id=i.name) if i.name in SLOW_ON_CPU else i for i in impls]


def cell_for(impl, *, b: int, hq: int, hkv: int, n: int, d: int, dtype: str, causal: bool,
             window: int | None, mode: str = "fwd") -> Cell:
    config = Config(batch=b, heads=hq, kv_heads=hkv, head_dim=d, dtype=dtype, mask=Mask.of(causal, window).kind,
                    window=window, mode=mode, device="cpu")
    return Cell.of(config, impl.name, n, "kernel")


def run_or_skip(impl, cell: Cell, q, k, v, causal, window, scale=None) -> torch.Tensor:
    reason = impl.unsupported_reason(cell)
    if reason is not None:
        pytest.skip(reason)
    try:
        return impl.call(q, k, v, Mask.of(causal, window), scale)
    except Unsupported as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("impl", cpu_impls(compiled_slow=True), ids=lambda i: i.name)
@pytest.mark.parametrize("n,d,heads,mask,dtype,b", pairwise_cases(),
                         ids=lambda x: str(x) if not isinstance(x, tuple) else f"{x[0]}/{x[1]}")
def test_matches_reference(impl, n, d, heads, mask, dtype, b):
    hq, hkv = heads
    causal, window = mask_args(mask, n)
    cell = cell_for(impl, b=b, hq=hq, hkv=hkv, n=n, d=d, dtype=dtype, causal=causal, window=window)
    if impl.unsupported_reason(cell) is not None:
        pytest.skip(impl.unsupported_reason(cell))
    seed = new_seed()
    q, k, v = random_qkv(seed, b, hq, hkv, n, n, d, DTYPES[dtype])
    out = run_or_skip(impl, cell, q, k, v, causal, window)
    ref = reference_attention(q, k, v, Mask.of(causal, window))
    rel, worst = errors(out, ref)
    assert rel <= TOLERANCE[dtype], (f"{impl.name} seed={seed} B={b} Hq={hq} Hkv={hkv} N={n} D={d} "
                                     f"mask={mask} {dtype}: rel L2 {rel:.2e}, max abs {worst:.2e}")


@pytest.mark.parametrize("impl", cpu_impls(compiled_slow=True), ids=lambda i: i.name)
@pytest.mark.parametrize("mask", ["none", "causal", "window3", "windowN"])
def test_peaked_scores_and_explicit_scale(impl, mask):
    """Large, spread-out scores make the running max jump between key blocks, which is where
    a wrong online-softmax rescale shows; a non-default scale must be honoured."""
    n, d, hq, hkv = 700, 64, 4, 2
    causal, window = mask_args(mask, n)
    cell = cell_for(impl, b=1, hq=hq, hkv=hkv, n=n, d=d, dtype="float32", causal=causal, window=window)
    seed = new_seed()
    q, k, v = random_qkv(seed, 1, hq, hkv, n, n, d, torch.float32, q_scale=6.0)
    scale = 0.37
    out = run_or_skip(impl, cell, q, k, v, causal, window, scale=scale)
    ref = reference_attention(q, k, v, Mask.of(causal, window), scale=scale)
    rel, _ = errors(out, ref)
    assert rel <= TOLERANCE["float32"], f"{impl.name} seed={seed} mask={mask}: rel L2 {rel:.2e}"


@pytest.mark.parametrize("impl", cpu_impls(compiled_slow=True), ids=lambda i: i.name)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_output_dtype_and_shape(impl, dtype):
    b, hq, hkv, n, d = 2, 4, 2, 33, 40
    causal, window = (True, 5) if "window" in impl.masks and len(impl.masks) == 1 else (True, None)
    cell = cell_for(impl, b=b, hq=hq, hkv=hkv, n=n, d=d, dtype=dtype, causal=causal, window=window)
    seed = new_seed()
    q, k, v = random_qkv(seed, b, hq, hkv, n, n, d, DTYPES[dtype])
    out = run_or_skip(impl, cell, q, k, v, causal, window)
    assert out.dtype == q.dtype
    assert out.shape == (b, hq, n, d)
    assert torch.isfinite(out).all(), f"{impl.name} seed={seed}: non-finite output"


# --- the tiling plans --------------------------------------------------------------------


def coverage(plan: list[_blockwise.QueryBlock], n: int) -> torch.Tensor:
    """[n, n] count of how many tiles compute each (query, key) score."""
    cov = torch.zeros(n, n, dtype=torch.int32)
    for blk in plan:
        for t in blk.tiles:
            cov[blk.start:blk.end, t.start:t.end] += 1
    return cov


def check_plan(plan: list[_blockwise.QueryBlock], n: int, mask: Mask) -> None:
    pos = torch.arange(n)
    ok = mask.visible(pos, pos)
    ok = torch.ones(n, n, dtype=torch.bool) if ok is None else ok
    cov = coverage(plan, n)
    assert (cov[ok] == 1).all(), "a visible pair is computed zero or several times"
    assert (cov <= 1).all(), "a score is computed twice"
    assert [b.start for b in plan] == list(range(0, n, plan[0].end - plan[0].start)) if plan else n == 0
    for blk in plan:
        for t in blk.tiles:
            tile_ok = ok[blk.start:blk.end, t.start:t.end]
            assert tile_ok.any(), f"tile {t} of queries [{blk.start}, {blk.end}) is entirely hidden"
            assert t.masked == (not tile_ok.all()), f"tile {t} of [{blk.start}, {blk.end}): wrong masked flag"


@pytest.mark.parametrize("n", [1, 5, 64, 100, 257])
@pytest.mark.parametrize("mask", ["none", "causal", "window1", "window3", "window40", "windowN"])
@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16), (7, 13), (64, 64)])
def test_chunked_plan_is_exact_and_skips_hidden_blocks(n, mask, block_q, block_k):
    m = Mask.of(*((True, 40) if mask == "window40" else mask_args(mask, n)))
    check_plan(chunked_mod.plan(n, m, block_q, block_k), n, m)


@pytest.mark.parametrize("n", [1, 5, 64, 100, 257])
@pytest.mark.parametrize("window", [1, 3, 16, 40, 300])
@pytest.mark.parametrize("block_q,block_k", [(16, 32), (32, 16), (7, 13), (64, 64)])
def test_sliding_plan_is_exact_band(n, window, block_q, block_k):
    m = Mask("window", window)
    plan = sliding_mod.plan(n, m, block_q, block_k)
    check_plan(plan, n, m)
    # Only the band is computed: the visible pairs plus the two edge triangles of each
    # query block, at most block_q hidden keys per row.
    assert _blockwise.visited_pairs(plan) <= m.visible_pairs(n) + n * block_q


@pytest.mark.parametrize("mask", ["none", "causal", "window3", "window40"])
@pytest.mark.parametrize("block_q,block_k", [(16, 32), (7, 13)])
def test_small_blocks_match_reference(mask, block_q, block_k):
    """Many query and key blocks at a small N: exercises every tile boundary of the engine."""
    n, d, hq, hkv = 150, 48, 4, 2
    m = Mask.of(*((True, 40) if mask == "window40" else mask_args(mask, n)))
    seed = new_seed()
    q, k, v = random_qkv(seed, 2, hq, hkv, n, n, d, torch.float32, q_scale=3.0)
    ref = reference_attention(q, k, v, m)
    plans = {"chunked": chunked_mod.plan(n, m, block_q, block_k)}
    if m.window is not None:
        plans["sliding_window"] = sliding_mod.plan(n, m, block_q, block_k)
    for name, plan in plans.items():
        out = _blockwise.attention(q, k, v, plan, mask=m, scale=None)
        rel, _ = errors(out, ref)
        assert rel <= TOLERANCE["float32"], f"{name} seed={seed} mask={mask} blocks {block_q}x{block_k}: {rel:.2e}"


# --- work and memory ---------------------------------------------------------------------


def test_sliding_window_work_is_linear_in_n_times_w(monkeypatch):
    """The kernel hands the engine a band plan: visited scores ~ N * W, not N^2."""
    plans = []
    real = sliding_mod.attention

    def spy(q, k, v, plan, **kw):
        plans.append(plan)
        return real(q, k, v, plan, **kw)

    monkeypatch.setattr(sliding_mod, "attention", spy)
    w = 64
    work = {}
    for n in (2048, 4096):
        q, k, v = random_qkv(new_seed(), 1, 1, 1, n, n, 16, torch.float32)
        all_impls()["sliding_window"].call(q, k, v, Mask("window", w))
        block_q, _ = sliding_mod.block_sizes(n, w, 1)
        work[n] = _blockwise.visited_pairs(plans[-1])
        assert Mask("window", w).visible_pairs(n) <= work[n] <= n * (w + block_q)
    assert work[4096] <= 2 * work[2048] + 2 * w * w  # linear in N, not quadratic
    assert work[4096] < 4096 * 4096 / 16


def test_chunked_causal_skips_the_upper_triangle():
    n = 4096
    block_q, block_k = chunked_mod.block_sizes(n, 8)
    causal_work = _blockwise.visited_pairs(chunked_mod.plan(n, Mask("causal"), block_q, block_k))
    assert causal_work <= n * (n + 1) // 2 + n * block_k
    window_work = _blockwise.visited_pairs(chunked_mod.plan(n, Mask("window", 100), block_q, block_k))
    assert window_work <= n * (100 + block_q + 2 * block_k)


def _peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak resident set grows while fn() runs.

    Writing 5 to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS.
    """
    def status(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    fn()
    return status("VmHWM") - before


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc/self/clear_refs")
def test_chunked_memory_is_not_quadratic():
    n, d = 8192, 64
    q, k, v = random_qkv(new_seed(), 1, 1, 1, n, n, d, torch.float32)
    quadratic = n * n * 4  # one fp32 score matrix: 256 MiB
    try:
        naive_growth = _peak_rss_growth(lambda: all_impls()["naive"].call(q, k, v, Mask("causal")))
    except OSError as exc:  # clear_refs not writable in this sandbox
        pytest.skip(f"cannot reset VmHWM: {exc}")
    # The measurement must be able to see an N x N allocation at all, or the check below is moot.
    assert naive_growth >= quadratic / 2, f"measurement broken: naive grew only {naive_growth / 2**20:.0f} MiB"
    growth = _peak_rss_growth(lambda: all_impls()["chunked"].call(q, k, v, Mask("causal")))
    assert growth < quadratic / 16, f"chunked peak grew {growth / 2**20:.1f} MiB at N={n}"


# --- gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chunked", "sliding_window"])
@pytest.mark.parametrize("n,mask", [(1, "causal"), (37, "none"), (37, "window3"), (130, "causal"),
                                    (130, "window40"), (200, "windowN")])
def test_gradients_match_float64_autograd(name, n, mask):
    impl = all_impls()[name]
    causal, window = (True, 40) if mask == "window40" else mask_args(mask, n)
    if Mask.of(causal, window).kind not in impl.masks:
        pytest.skip(f"{name} does not support {mask}")
    seed = new_seed()
    q, k, v = random_qkv(seed, 2, 4, 2, n, n, 24, torch.float32, q_scale=2.0)
    dout = torch.randn(2, 4, n, 24, generator=torch.Generator().manual_seed(seed + 1))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    impl.call(*leaves, Mask.of(causal, window)).backward(dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    reference_attention(*ref_leaves, Mask.of(causal, window)).backward(dout.double())
    for label, got, want in zip("qkv", leaves, ref_leaves):
        rel, _ = errors(got.grad, want.grad)
        assert rel <= TOLERANCE["float32"], f"{name} seed={seed} N={n} mask={mask}: d{label} rel L2 {rel:.2e}"


def test_gradients_in_bfloat16_have_input_dtype():
    q, k, v = (t.requires_grad_() for t in random_qkv(new_seed(), 1, 2, 1, 50, 50, 16, torch.bfloat16))
    all_impls()["chunked"].call(q, k, v, Mask("causal")).float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.bfloat16
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_sliding_window_refuses_a_missing_window():
    q, k, v = random_qkv(new_seed(), 1, 1, 1, 8, 8, 8, torch.float32)
    with pytest.raises(ValueError):
        all_impls()["sliding_window"].call(q, k, v, Mask("causal"))
    assert all_impls()["sliding_window"].masks == frozenset({"window"})


def test_scale_default_is_inverse_sqrt_d():
    q, k, v = random_qkv(new_seed(), 1, 2, 2, 20, 20, 36, torch.float32)
    a = all_impls()["chunked"].call(q, k, v, Mask("none"))
    b = all_impls()["chunked"].call(q, k, v, Mask("none"), 1 / math.sqrt(36))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- attention sinks (StreamingLLM): a window plus the first S keys ------------------------


@pytest.mark.parametrize("n", [1, 5, 64, 100, 257])
@pytest.mark.parametrize("window,sinks", [(1, 1), (3, 4), (16, 4), (40, 1), (16, 100), (300, 4)])
@pytest.mark.parametrize("block_q,block_k", [(16, 32), (7, 13), (64, 64)])
def test_plans_with_sinks_are_exact(n, window, sinks, block_q, block_k):
    m = Mask("window", window, sinks)
    check_plan(chunked_mod.plan(n, m, block_q, block_k), n, m)
    plan = sliding_mod.plan(n, m, block_q, block_k)
    check_plan(plan, n, m)
    # still a band: the visible pairs plus the edge triangles, never the hidden middle
    assert _blockwise.visited_pairs(plan) <= m.visible_pairs(n) + n * block_q


def sink_impls(compiled_slow: bool = False) -> list:
    return [p for p, impl in zip(cpu_impls(compiled_slow), cpu_impls()) if impl.sinks]


def test_sinks_are_declared():
    names = {impl.name for impl in sink_impls()}
    assert {"naive", "sdpa", "chunked", "sliding_window", "triton"} <= names
    cell = cell_for(all_impls()["naive"], b=1, hq=2, hkv=2, n=64, d=16, dtype="float32", causal=True, window=8)
    with_sinks = dataclasses.replace(cell, sinks=4)
    for impl in all_impls().values():
        if impl.unsupported_reason(dataclasses.replace(cell, impl=impl.name)) is None:
            reason = impl.unsupported_reason(dataclasses.replace(with_sinks, impl=impl.name))
            assert (reason is None) == impl.sinks, (impl.name, reason)
            assert impl.sinks or "attention sinks" in reason


@pytest.mark.parametrize("impl", sink_impls(compiled_slow=True), ids=lambda i: i.name)
@pytest.mark.parametrize("n,window,sinks,dtype", [(1, 1, 1, "float32"), (150, 16, 4, "float32"),
                                                  (300, 40, 1, "float32"), (300, 7, 100, "float32"),
                                                  (129, 16, 4, "bfloat16"), (64, 100, 4, "float32")])
def test_sinks_match_reference(impl, n, window, sinks, dtype):
    hq, hkv, d = 4, 2, 32
    seed = new_seed()
    q, k, v = random_qkv(seed, 2, hq, hkv, n, n, d, DTYPES[dtype], q_scale=3.0)
    out = impl.call(q, k, v, Mask("window", window, sinks))
    ref = reference_attention(q, k, v, Mask("window", window, sinks))
    rel, _ = errors(out, ref)
    assert rel <= TOLERANCE[dtype], f"{impl.name} seed={seed} N={n} W={window} S={sinks} {dtype}: {rel:.2e}"
    if n > window and sinks:  # the sinks must change something here
        assert errors(reference_attention(q, k, v, Mask("window", window)), ref)[0] > 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("name", ["chunked", "sliding_window"])
def test_sink_gradients_match_float64_autograd(name):
    impl = all_impls()[name]
    n, window, sinks = 130, 16, 4
    seed = new_seed()
    q, k, v = random_qkv(seed, 1, 4, 2, n, n, 24, torch.float32, q_scale=2.0)
    dout = torch.randn(1, 4, n, 24, generator=torch.Generator().manual_seed(seed + 1))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    impl.call(*leaves, Mask("window", window, sinks)).backward(dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    reference_attention(*ref_leaves, Mask("window", window, sinks)).backward(dout.double())
    for label, got, want in zip("qkv", leaves, ref_leaves):
        rel, _ = errors(got.grad, want.grad)
        assert rel <= TOLERANCE["float32"], f"{name} seed={seed}: d{label} rel L2 {rel:.2e}"
