"""Tests of the Triton flash-attention kernel (kernels/triton_attention.py) on the CPU.

The kernels run in Triton's interpreter, so shapes are small. What is checked:
* forward and gradients (dq, dk, dv) against the float64 reference, over every value of
  every axis (N, D, GQA, mask, dtype), combined pairwise rather than as a full product;
* block skipping: the key/query blocks each program visits, and the ones it masks, equal
  what the mask implies (computed here from the mask convention, not from the kernel);
* non-contiguous inputs and gradients; registration, check() and info().
A slow test compiles the kernels for sm_90 (Hopper) with the ptxas that ships with triton,
no GPU needed: `pytest -m slow tests/test_triton.py`.
"""

import os

# Kernels must run interpreted here; this has to precede any triton import. When run as a
# script (the sm_90 compile helper below), kernels are compiled instead.
os.environ["TRITON_INTERPRET"] = "0" if __name__ == "__main__" else "1"

import importlib.util  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import zlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from ctxbench import registry  # noqa: E402
from ctxbench.kernels import triton_attention as ta  # noqa: E402
from ctxbench.masks import Mask  # noqa: E402
from ctxbench.plan import Cell  # noqa: E402
from ctxbench.reference import TOLERANCE, errors, reference_attention  # noqa: E402

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


def _check_against_reference(q, k, v, causal, window, scale=None, dout=None, tol=None, sinks=0):
    """Run triton forward + backward and compare out, dq, dk, dv with float64 autograd."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = ta.triton_attention(q, k, v, causal=causal, window=window, scale=scale, sinks=sinks)
    assert out.dtype == q.dtype and out.shape == q.shape
    if dout is None:
        dout = torch.randn_like(out)
    out.backward(dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, Mask.of(causal, window, sinks), scale=scale)
    ref.backward(dout.double())
    tol = TOLERANCE[str(q.dtype).removeprefix("torch.")] if tol is None else tol
    got = {"out": (out, ref), "dq": (q.grad, q64.grad), "dk": (k.grad, k64.grad), "dv": (v.grad, v64.grad)}
    for name, (x, r) in got.items():
        assert x.shape == r.shape, name
        assert torch.isfinite(x.float()).all(), name
        rel, _ = errors(x, r.detach())
        assert rel < tol, f"{name}: relative L2 error {rel:.3g} >= {tol}"


def test_pairwise_cases_cover_every_pair():
    names = list(AXES)
    for a, b in itertools.combinations(names, 2):
        seen = {(c[a], c[b]) for c in CASES}
        assert seen == set(itertools.product(AXES[a], AXES[b])), (a, b)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()).replace(" ", ""))
def test_forward_and_gradients_match_reference(case):
    # a seed fixed by the case (hash() of a str changes between processes), printed on failure
    seed = zlib.crc32("-".join(map(str, case.values())).encode())
    print(f"seed={seed}")
    torch.manual_seed(seed)
    n, d, (hq, hkv), dtype = case["n"], case["d"], case["heads"], DTYPES[case["dtype"]]
    causal, window, sinks = _window(case["mask"], n)
    batch = 2 if n <= 17 else 1
    q = torch.randn(batch, hq, n, d, dtype=dtype)
    k = torch.randn(batch, hkv, n, d, dtype=dtype)
    v = torch.randn(batch, hkv, n, d, dtype=dtype)
    _check_against_reference(q, k, v, causal, window, sinks=sinks)


def test_float16_and_explicit_scale():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 32, dtype=torch.float16) for _ in range(3))
    _check_against_reference(q, k, v, True, None, scale=0.3)


def test_window_only_implies_causal():
    """window without causal=True still means keys j with i - W < j <= i."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 1, 33, 16) for _ in range(3))
    out = ta.triton_attention(q, k, v, causal=False, window=4, scale=None)
    ref = reference_attention(q, k, v, Mask.of(True, 4))
    assert errors(out, ref)[0] < TOLERANCE["float32"]


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


def _tile_stats(n, bq, bk, causal, window, streamed_queries: bool, sinks: int = 0):
    """Per (query block, key block): (visited, masked) as the mask convention implies.

    visited: some (row, key) pair inside the sequence is visible.
    masked: visited, and the tile is not entirely visible. The streamed side of the tile
    (keys in the forward and dQ kernels, queries in dK/dV) must also lie inside the sequence,
    since a tile crossing N needs bounds masks; positions past N on the resident side are
    ignored (their rows are never stored).
    With sinks, the kernels visit the window's band as without sinks and mask its tiles as
    for the window alone (a sink key can make a band edge tile fully visible: that tile is
    masked anyway, at most a few per program); the tiles visited only for their sinks are
    masked exactly when they are not fully visible.
    """
    nq, nk = -(-n // bq), -(-n // bk)
    size_q, size_k = nq * bq, nk * bk
    rows, cols = torch.arange(size_q), torch.arange(size_k)
    vis = Mask.of(causal, window, sinks).visible(rows, cols)
    vis = torch.ones(size_q, size_k, dtype=torch.bool) if vis is None else vis
    inside = (rows[:, None] < n) & (cols[None, :] < n)
    if streamed_queries:
        full_ok = (vis | (cols[None, :] >= n)) & (rows[:, None] < n)
    else:
        full_ok = (vis | (rows[:, None] >= n)) & (cols[None, :] < n)
    visited = (vis & inside).view(nq, bq, nk, bk).any(dim=3).any(dim=1)
    full = full_ok.view(nq, bq, nk, bk).all(dim=3).all(dim=1)
    if not sinks:
        return visited, visited & ~full
    band, band_masked = _tile_stats(n, bq, bk, causal, window, streamed_queries)
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


@pytest.mark.parametrize("blocks", VISIT_CONFIGS,
                         ids=lambda b: "fwd{}x{}-dkdv{}x{}-dq{}x{}".format(*b[0], *b[1], *b[2]))
@pytest.mark.parametrize("n", [50, 64])
def test_block_visits_match_mask(monkeypatch, blocks, n):
    (fm, fn), (km, kn), (qm, qn) = blocks
    monkeypatch.setattr(ta, "COUNT_VISITS", True)
    monkeypatch.setattr(ta, "INTERPRETER_CONFIGS",
                        {"fwd": (fm, fn, 4, 1), "dkdv": (km, kn, 4, 1), "dq": (qm, qn, 4, 1)})
    torch.manual_seed(5)
    B, H, Hkv, D = 1, 2, 1, 16
    group = H // Hkv
    for causal, window, sinks in VISIT_MASKS:
        q = torch.randn(B, H, n, D, requires_grad=True)
        k = torch.randn(B, Hkv, n, D, requires_grad=True)
        v = torch.randn(B, Hkv, n, D, requires_grad=True)
        out = ta.triton_attention(q, k, v, causal=causal, window=window, scale=None, sinks=sinks)
        out.backward(torch.randn_like(out))
        label = f"causal={causal} window={window} sinks={sinks} n={n} blocks={blocks}"

        counts, bm, bn = ta.last_visits["fwd"]
        assert (bm, bn) == (fm, fn)
        visited, masked = _tile_stats(n, bm, bn, causal, window, False, sinks)
        assert torch.equal(counts & 0xFFFF, visited.sum(1).int().expand(B * H, -1)), "fwd visits " + label
        assert torch.equal(counts >> 16, masked.sum(1).int().expand(B * H, -1)), "fwd masked " + label

        counts, bm, bn = ta.last_visits["dq"]
        visited, masked = _tile_stats(n, bm, bn, causal, window, False, sinks)
        assert torch.equal(counts & 0xFFFF, visited.sum(1).int().expand(B * H, -1)), "dq visits " + label
        assert torch.equal(counts >> 16, masked.sum(1).int().expand(B * H, -1)), "dq masked " + label

        counts, bm, bn = ta.last_visits["dkdv"]
        visited, masked = _tile_stats(n, bm, bn, causal, window, True, sinks)
        # one dK/dV program per key block loops over the `group` query heads of its kv head
        assert torch.equal(counts & 0xFFFF, group * visited.sum(0).int().expand(B * Hkv, -1)), "dkdv visits " + label
        assert torch.equal(counts >> 16, group * masked.sum(0).int().expand(B * Hkv, -1)), "dkdv masked " + label

        # the same run, checked for correctness with these block shapes
        q64, k64, v64 = (t.detach().double() for t in (q, k, v))
        ref = reference_attention(q64, k64, v64, Mask.of(causal, window, sinks))
        assert errors(out, ref)[0] < TOLERANCE["float32"], label


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


# ---------------------------------------------------------------------------------------
# Registration, check(), info(), interpreter selection, triton missing
# ---------------------------------------------------------------------------------------


def _cell(**kw):
    base = dict(batch=1, heads=4, kv_heads=4, head_dim=64, dtype="float32", mask="causal", window=None,
                mode="fwd", device="cpu", allow_interpreter=False, impl="triton", n=256)
    base.update(kw)
    return Cell(**base)


def test_registration_declares_capabilities():
    impl = ta.triton_attention.__ctxbench_impl__
    assert impl.name == "triton" and registry._REGISTRY["triton"] is impl
    assert impl.devices == {"cpu", "cuda"}
    assert impl.dtypes == {"float32", "float16", "bfloat16"}
    assert impl.masks == {"none", "causal", "window"}
    assert impl.modes == {"fwd", "bwd", "fwd+bwd"}
    assert impl.gqa and impl.exact and impl.sinks


def test_check_reasons():
    impl = ta.triton_attention.__ctxbench_impl__
    assert impl.unsupported_reason(_cell(n=512)) is None
    reason = impl.unsupported_reason(_cell(n=1024))
    assert "Triton interpreter on CPU is for correctness only; N > 512 needs --allow-interpreter" in reason
    assert impl.unsupported_reason(_cell(n=1024, allow_interpreter=True)) is None
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
    fwd = ta._space("fwd")
    assert {c[0] for c in fwd} == {64, 128} and {c[1] for c in fwd} == {32, 64, 128}
    assert {c[2] for c in fwd} == {4, 8} and {c[3] for c in fwd} == {2, 3, 4}
    for kind in ("fwd", "dkdv", "dq"):
        configs = [ta._config(*c) for c in ta._space(kind)]
        for fma_config in ta.FP32_IEEE_SPACE[kind]:
            assert fma_config in ta._space(kind)
        for n in (1, 100, 4096):
            for d, dtype, precision in ((16, torch.float16, "tf32"), (128, torch.bfloat16, "tf32"),
                                        (128, torch.float32, "ieee"), (256, torch.float32, "tf32")):
                args = {"N": n, "Q": torch.empty(0, dtype=dtype)}
                kept = ta._prune(kind)(configs, args, BLOCK_D=d, PRECISION=precision)
                assert kept, (kind, n, d, dtype)
                tuples = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
                if precision == "ieee":
                    assert tuples == ta.FP32_IEEE_SPACE[kind]
                elif n == 1:
                    assert all(min(bm, bn) <= 32 for bm, bn, _, _ in tuples)


def test_autotuned_launch_path(monkeypatch):
    """The GPU control flow (autotuner, pruning, grid from the chosen config, best_config into
    info) on the interpreter: small spaces, and a stand-in for do_bench (triton's needs a
    GPU driver) that runs each config and makes the last one the fastest."""
    import triton

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
        tuned[kind] = triton.autotune(configs=[ta._config(*c) for c in configs], key=ta.TUNE_KEY,
                                      prune_configs_by={"early_config_prune": ta._prune(kind)},
                                      do_bench=fake_do_bench)(ta._PLAIN[kind])
    monkeypatch.setattr(ta, "_TUNED", tuned)
    monkeypatch.setattr(ta, "_fixed_config", lambda kind, fma: None)  # take the autotuning branch
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.bfloat16) for _ in range(3))
    fake_do_bench.calls = 0
    _check_against_reference(q, k, v, True, 7)
    info = ta._info()
    assert info["config"] == "BLOCK_M=32 BLOCK_N=16 warps=4 stages=1"
    assert info["bwd_config"] == ("dkdv: BLOCK_M=16 BLOCK_N=32 warps=4 stages=1; "
                                  "dq: BLOCK_M=32 BLOCK_N=16 warps=4 stages=1")
    assert tuned["fwd"].best_config.kwargs == {"BLOCK_M": 32, "BLOCK_N": 16}


def test_empty_batch_and_n1_gqa():
    q = torch.randn(0, 4, 5, 16)
    k = torch.randn(0, 2, 5, 16)
    assert ta.triton_attention(q, k, k, causal=True, window=None).shape == (0, 4, 5, 16)


def test_interpreter_selected_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the module does not select the interpreter")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import os, ctxbench.kernels.triton_attention as t; "
            "print(os.environ.get('TRITON_INTERPRET'), t.interpreted())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True"]


def test_without_triton_module_imports_and_refuses(monkeypatch):
    saved = registry._REGISTRY.get("triton")
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    try:
        spec = importlib.util.spec_from_file_location("ctxbench_triton_missing_probe", ta.__file__)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        impl = mod.triton_attention.__ctxbench_impl__
        for device in ("cpu", "cuda"):
            assert impl.unsupported_reason(_cell(device=device)) == "triton is not installed: pip install triton"
        with pytest.raises(registry.Unsupported):
            mod.triton_attention(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16),
                                 causal=False, window=None)
    finally:
        registry._REGISTRY["triton"] = saved


# ---------------------------------------------------------------------------------------
# Compiling for Hopper (sm_90) without a GPU
# ---------------------------------------------------------------------------------------

def _sm90_compile(dtype: str, head_dim: int, mask: str, which: str) -> list[dict]:
    """Compile every kernel of one forward+backward exactly as launched, for sm_90.

    which: "default" (the configs used without autotuning), "pruned" (those the autotuner
    tries at N=1024) or "all" (the whole autotuning space).

    The wrappers run on CPU tensors with the launches captured; each launch's arguments go
    through triton's own binder (so stride 1 and divisibility specialise as on a GPU) and
    triton.compile with a CUDA 9.0 target, down to a cubin via the bundled ptxas.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    captured = []

    class _Capture:
        def __getitem__(self, grid):
            return lambda *args, **meta: captured.append(("pre", args, meta))

    plain = dict(ta._PLAIN, pre=ta._bwd_preprocess)
    saved = ta._launch, ta._bwd_preprocess
    ta._launch = lambda kind, rows, cols, args, meta: (captured.append((kind, args, meta)) or (0, 0, ""))
    ta._bwd_preprocess = _Capture()
    try:
        dt = DTYPES[dtype]
        causal, window = mask != "none", (300 if mask in ("window", "sinks") else None)
        sinks = 4 if mask == "sinks" else 0
        q = torch.randn(2, 4, 1024, head_dim, dtype=dt)
        k, v = (torch.randn(2, 2, 1024, head_dim, dtype=dt) for _ in range(2))
        o, lse = ta.attention_forward(q, k, v, causal, window, None, sinks)
        ta.attention_backward(torch.randn_like(o), q, k, v, o, lse, causal, window, None, sinks)
    finally:
        ta._launch, ta._bwd_preprocess = saved

    results = []
    for kind, args, meta in captured:
        meta = dict(meta)
        if kind == "pre":
            configs = [(None, None, meta.pop("num_warps"), 1)]
        elif which == "default":
            fma = ta._fma(args[0], meta)
            configs = [ta.FP32_IEEE_SPACE[kind][0] if fma else ta.DEFAULT_CONFIGS[kind]]
        elif which == "pruned":
            kept = ta._prune(kind)([ta._config(*c) for c in ta._space(kind)], {"N": 1024, "Q": args[0]}, **meta)
            configs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
        else:
            configs = ta._space(kind)
        for bm, bn, warps, stages in configs:
            kw = dict(meta, num_warps=warps, num_stages=stages)
            if bm is not None:
                kw.update(BLOCK_M=bm, BLOCK_N=bn)
            fn = plain[kind]
            row = dict(kind=kind, config=ta._describe(bm, bn, warps, stages), dtype=dtype, head_dim=head_dim, mask=mask)
            try:
                binder = create_function_from_signature(fn.signature, fn.params, backend)
                bound, spec, options = binder(*args, **kw)
                options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, options)
                kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                        options=options.__dict__)
                ptx = kernel.asm["ptx"]
                row.update(ok=True, shared=kernel.metadata.shared,
                           mma="wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma"))
                if bm is not None:
                    row["estimate"] = ta._smem_estimate(kind, bm, bn, stages, meta["BLOCK_D"], args[0].element_size())
            except Exception as exc:  # noqa: BLE001 - reported, the test decides
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:400]}")
            results.append(row)
    return results


def _run_sm90(*argv: str) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode == 3:
        pytest.skip(out.stdout.strip() or "this triton has no AOT binder API")
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_compiles_for_sm90(dtype):
    """The default configs compile for Hopper for every mask and head-dim family: tensor
    cores (wgmma) for 16-bit inputs, FMAs for IEEE fp32, within the shared memory limit.
    (fp32 kernels take 5-40 s each to compile on a small CPU: fewer head dims and masks there.)"""
    rows = []
    for head_dim in ((16, 80) if dtype == "float32" else (16, 64, 80, 128)):
        for mask in ("none", "causal", "window") + (() if dtype == "float32" else ("sinks",)):
            rows += _run_sm90(dtype, str(head_dim), mask, "default")
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        if r["kind"] != "pre":
            assert r["mma"] == ("fma" if dtype == "float32" else "wgmma"), r
            assert r["shared"] <= ta.SMEM_LIMIT, r


@pytest.mark.slow
@pytest.mark.parametrize("dtype,head_dim,mask", [("bfloat16", 128, "window"), ("float16", 256, "causal")])
def test_autotune_space_compiles_for_sm90(dtype, head_dim, mask):
    """Every config the autotuner tries compiles and fits in shared memory, and the pruning
    estimate of shared memory is what the compiler allocates (so no config is lost to a
    launch failure or wrongly pruned)."""
    rows = _run_sm90(dtype, str(head_dim), mask, "pruned")
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        if r["kind"] != "pre":
            assert r["shared"] <= ta.SMEM_LIMIT, r
            slack = 2048 if r["kind"] == "dkdv" else 0
            assert r["estimate"] - slack <= r["shared"] <= r["estimate"], r


if __name__ == "__main__":
    # python tests/test_triton.py DTYPE HEAD_DIM MASK default|pruned|all -> a JSON line per kernel
    try:
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
        assert hasattr(ta._fwd_kernel, "_pack_args")
    except (ImportError, AssertionError):
        print("this triton has no create_function_from_signature/_pack_args")
        sys.exit(3)
    for row in _sm90_compile(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]):
        print(json.dumps(row), flush=True)
