"""Tests of the Triton split-K decode kernel (kernels/triton_decode.py) on the CPU.

The kernels run in Triton's interpreter, so shapes are small (Lk <= ~600). Checked against the
float64 reference (ctxbench.core.reference, bottom-right: q_offset = kv_len - Lq), on fresh random
inputs (seeds printed, from each case's name through zlib.crc32):
* every Lq (1, 3, 16), GQA group (1, 4, 8), head dim (64, 80, 128), mask (none, causal,
  windows shorter and longer than the cache, window + sinks) and dtype (fp32/fp16/bf16),
  combined case by case rather than as a full product;
* ragged kv_lens, at BLOCK_N tile boundaries and +-1, down to kv_len == Lq (below: ValueError);
* keys at and past kv_len, and left of a window's span, are never read (they hold NaN here);
* a paged cache with shuffled pages gives exactly (torch.equal) the contiguous layout's output;
* num_splits 1, 3 and 8 agree within fp32 rounding;
* registration and check() (the interpreter up to INTERPRETER_MAX_LEN keys).
A slow test compiles both kernels for sm_90 (Hopper) with triton's ptxas, no GPU needed, through
benchmarks/kernel_stats.py's compile_one: `pytest -m slow tests/test_triton_decode.py -k sm90`.
"""

import json
import os
import subprocess
import sys
import zlib
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from ctxbench.kernels import triton_decode as td  # noqa: E402

from ctxbench import registry  # noqa: E402
from ctxbench.core.masks import Mask  # noqa: E402
from ctxbench.core.reference import errors, reference_attention  # noqa: E402
from references import random_qkv  # noqa: E402

# Kernels run interpreted here (CPU tensors), on a machine with CUDA too. TRITON_INTERPRET is
# read when a call is prepared, so setting it after triton was imported is enough.
os.environ["TRITON_INTERPRET"] = "1"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 1e-2}
MASKS = {  # name -> (causal, window, sinks)
    "none": (False, None, 0),
    "causal": (True, None, 0),
    "w7": (True, 7, 0),         # a window far shorter than the cache
    "w100": (True, 100, 0),     # a few tiles
    "w5000": (True, 5000, 0),   # longer than the cache: causal
    "w40s3": (True, 40, 3),     # window + sinks
    "w1s70": (True, 1, 70),     # sinks crossing the first tile
}


def _seed(name: str) -> int:
    seed = zlib.crc32(name.encode())
    print(f"seed {seed} for {name}")
    return seed


def _inputs(name, B, hq, hkv, lq, lk, d, dtype):
    return random_qkv(_seed(name), B, hq, hkv, lq, lk, d, DTYPES[dtype])


def _reference(q, k, v, mask_name, kv_lens=None):
    """float64 reference, sequence by sequence on its first kv_lens[b] keys (bottom-right)."""
    causal, window, sinks = MASKS[mask_name]
    lq, lk = q.shape[2], k.shape[2]
    lens = [lk] * q.shape[0] if kv_lens is None else kv_lens.tolist()
    return torch.cat([reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                          Mask.of(causal, window, sinks, q_offset=n - lq))
                      for b, n in enumerate(lens)])


def _run(q, k, v, mask_name, **kw):
    causal, window, sinks = MASKS[mask_name]
    return td.decode_attention(q, k, v, causal=causal, window=window, sinks=sinks, **kw)


# ---------------------------------------------------------------------------------------
# Against the float64 reference
# ---------------------------------------------------------------------------------------

# (Lq, Hq, Hkv, D, mask, dtype, Lk): every value of every axis appears; GQA groups 1, 4, 8.
CASES = [
    (1, 4, 4, 64, "causal", "float32", 300),
    (1, 8, 1, 80, "w7", "float32", 200),
    (1, 4, 1, 128, "none", "float16", 257),
    (1, 8, 2, 64, "w40s3", "bfloat16", 333),
    (3, 4, 1, 80, "causal", "bfloat16", 190),
    (3, 2, 2, 128, "w100", "float32", 600),
    (3, 8, 1, 64, "none", "float32", 129),
    (3, 4, 1, 64, "w5000", "float16", 150),
    (3, 4, 4, 80, "w1s70", "float32", 250),
    (16, 8, 1, 64, "causal", "float32", 200),
    (16, 4, 1, 80, "w40s3", "float32", 300),
    (16, 2, 2, 128, "w7", "bfloat16", 100),
    (16, 4, 1, 64, "none", "float16", 64),
    (16, 4, 4, 64, "w100", "float16", 210),
]


# The default suite runs every other case (each axis still covered: Lq 1/3/16, groups 1/4/8,
# D 64/80/128, every mask kind and dtype); `pytest -m slow` the rest.
@pytest.mark.parametrize("lq,hq,hkv,d,mask,dtype,lk",
                         [c if i % 2 == 0 else pytest.param(*c, marks=pytest.mark.slow) for i, c in enumerate(CASES)],
                         ids=[f"lq{c[0]}-g{c[1] // c[2]}-d{c[3]}-{c[4]}-{c[5]}-lk{c[6]}" for c in CASES])
def test_matches_reference(lq, hq, hkv, d, mask, dtype, lk):
    q, k, v = _inputs(f"ref-{lq}-{hq}-{hkv}-{d}-{mask}-{dtype}-{lk}", 2, hq, hkv, lq, lk, d, dtype)
    out = _run(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == q.dtype
    rel, _ = errors(out, _reference(q, k, v, mask))
    assert rel < TOL[dtype], (rel, td.info())


def test_scale_argument():
    q, k, v = _inputs("scale", 1, 4, 2, 2, 90, 64, "float32")
    out = td.decode_attention(q, k, v, causal=True, scale=0.3)
    ref = reference_attention(q, k, v, Mask("causal", q_offset=88), scale=0.3)
    assert errors(out, ref)[0] < 1e-5


# ---------------------------------------------------------------------------------------
# Ragged lengths, and keys that must never be read
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["causal", "none", "w40s3"])
@pytest.mark.parametrize("lq", [1, 3, 16])
def test_ragged_lengths(mask, lq):
    n = td.BLOCK_N
    lens = torch.tensor([lq, n - 1, n, n + 1, 2 * n, 2 * n + 1, 5 * n - 1], dtype=torch.int32)
    q, k, v = _inputs(f"ragged-{mask}-{lq}", len(lens), 4, 1, lq, 5 * n, 64, "float32")
    for b, length in enumerate(lens.tolist()):  # keys past each length are poison: never read
        k[b, :, length:] = float("nan")
        v[b, :, length:] = float("nan")
    out = _run(q, k, v, mask, kv_lens=lens, num_splits=3)
    assert torch.isfinite(out).all()
    assert errors(out, _reference(q, k, v, mask, lens))[0] < 1e-5


def test_window_reads_only_its_span():
    """Keys left of the window's first tile are never loaded: poisoned with NaN there, the
    output stays finite and right (the window of 40 at 600 keys spans at most two tiles)."""
    lq, lk, w = 3, 600, 40
    q, k, v = _inputs("span", 2, 4, 2, lq, lk, 80, "float32")
    first_tile = (lk - lq - w + 1) // td.BLOCK_N * td.BLOCK_N
    k[:, :, :first_tile] = float("nan")
    v[:, :, :first_tile] = float("nan")
    ref = reference_attention(q, k.nan_to_num(), v.nan_to_num(), Mask("window", w, q_offset=lk - lq))
    for splits in (1, 3):
        out = td.decode_attention(q, k, v, causal=True, window=w, num_splits=splits)
        assert torch.isfinite(out).all()
        assert errors(out, ref)[0] < 1e-5


def test_kv_len_shorter_than_lq_is_refused():
    q, k, v = _inputs("short", 2, 4, 1, 3, 50, 64, "float32")
    with pytest.raises(ValueError, match="kv_lens"):
        td.decode_attention(q, k, v, kv_lens=torch.tensor([50, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="kv_lens"):
        td.decode_attention(q, k, v, kv_lens=torch.tensor([51, 20], dtype=torch.int32))
    with pytest.raises(registry.Unsupported):
        td.decode_attention(torch.randn(1, 1, 17, 64), k[:1, :1], v[:1, :1])


# ---------------------------------------------------------------------------------------
# Paged cache: bit-identical to the contiguous one
# ---------------------------------------------------------------------------------------

def _paged(k, v, lens, page_size, generator):
    """k, v [B, Hkv, Lk, D] -> pools [pages, page_size, Hkv, D] in shuffled page order (unused
    pages and slots past each length hold NaN) and a block table [B, max_pages]."""
    B, hkv, lk, d = k.shape
    per_seq = -(-lk // page_size)
    total = B * per_seq + 3  # a few pages nobody uses
    order = torch.randperm(total, generator=generator)
    pools = [torch.full((total, page_size, hkv, d), float("nan"), dtype=k.dtype) for _ in range(2)]
    table = torch.zeros(B, per_seq + 2, dtype=torch.int32)  # spare columns point at page 0: never read
    for b in range(B):
        for p in range(-(-int(lens[b]) // page_size)):
            page = int(order[b * per_seq + p])
            table[b, p] = page
            lo, hi = p * page_size, min((p + 1) * page_size, int(lens[b]))
            for pool, src in zip(pools, (k, v)):
                pool[page, : hi - lo] = src[b, :, lo:hi].transpose(0, 1)
    return pools[0], pools[1], table


@pytest.mark.parametrize("page_size,mask,dtype", [
    (16, "causal", "float32"), (64, "w40s3", "float32"),
    *(pytest.param(*c, marks=[pytest.mark.slow, pytest.mark.ci]) for c in ((32, "none", "bfloat16"), (128, "w7", "float16")))])
def test_paged_equals_contiguous(page_size, mask, dtype):
    lq = 3
    lens = torch.tensor([300, 64, 129, lq], dtype=torch.int32)
    q, k, v = _inputs(f"paged-{page_size}-{mask}-{dtype}", 4, 8, 2, lq, 300, 80, dtype)
    g = torch.Generator().manual_seed(_seed(f"perm-{page_size}-{mask}"))
    kp, vp, table = _paged(k, v, lens, page_size, g)
    for splits in (1, 3):
        contiguous = _run(q, k, v, mask, kv_lens=lens, num_splits=splits)
        paged = _run(q, kp, vp, mask, kv_lens=lens, block_table=table, num_splits=splits)
        assert torch.equal(paged, contiguous)
    assert errors(contiguous, _reference(q, k, v, mask, lens))[0] < TOL[dtype]


def test_paged_needs_kv_lens():
    q, k, v = _inputs("paged-args", 1, 2, 1, 1, 32, 64, "float32")
    kp, vp, table = _paged(k, v, [32], 16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="kv_lens"):
        td.decode_attention(q, kp, vp, block_table=table)


# ---------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", ["causal", "w100", "w40s3"])
def test_num_splits_agree(mask):
    lens = torch.tensor([520, 17], dtype=torch.int32)  # the short sequence leaves splits empty
    q, k, v = _inputs(f"splits-{mask}", 2, 8, 2, 3, 520, 64, "float32")
    outs = {s: _run(q, k, v, mask, kv_lens=lens, num_splits=s) for s in (1, 3, 8)}
    for s in (3, 8):
        assert errors(outs[s], outs[1].double())[0] < 1e-5, s
    assert errors(outs[1], _reference(q, k, v, mask, lens))[0] < 1e-5
    assert td.info()["num_splits"] == 8


def test_default_num_splits():
    cpu = torch.device("cpu")
    assert td.choose_num_splits(1 * 8, 131072, cpu) == 2 * td.DEFAULT_SMS // 8 + (2 * td.DEFAULT_SMS % 8 > 0)
    assert td.choose_num_splits(1 * 8, 100, cpu) == 1  # too few keys to split
    assert td.choose_num_splits(1, 10 ** 7, cpu) == td.MAX_SPLITS
    assert td.choose_num_splits(4096, 10 ** 6, cpu) == 1  # the batch fills the GPU already


# ---------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------

def _cell(**kw):
    """A decode cell as an implementation's checks see it (what Impl.declared_reason and check
    read): one query token against 256 keys, fp32 on the CPU."""
    base = {"n": 256, "q_len": 1, "head_dim": 64, "device": "cpu", "dtype": "float32", "allow_interpreter": False,
            "mask": "causal", "mode": "fwd", "heads": 4, "kv_heads": 4}
    return SimpleNamespace(**{**base, **kw})


def test_registered_and_checked():
    impl = registry.get("triton_decode")
    assert impl.modes == {"fwd"} and impl.sinks and impl.gqa and impl.masks == {"none", "causal", "window"}
    assert impl.kv_cache and impl.ragged and impl.paged and impl.setup and impl.max_query_len == 16
    assert "at most 16 query tokens" in impl.declared_reason(_cell(n=64, q_len=17))
    assert td.check(_cell()) is None
    assert "query tokens" in td.check(_cell(q_len=17))
    assert "query tokens" in td.check(SimpleNamespace(**{k: v for k, v in vars(_cell(n=64)).items()
                                                          if k != "q_len"}))  # no q_len: n is Lq
    assert "allow-interpreter" in td.check(_cell(n=10 ** 6))
    assert td.check(_cell(n=10 ** 6, allow_interpreter=True)) is None
    # the interpreter's limit is decode's own, 4096 keys (the prefill kernel's is 512)
    assert td.check(_cell(n=td.INTERPRETER_MAX_LEN)) is None
    assert f"N > {td.INTERPRETER_MAX_LEN} needs --allow-interpreter" in td.check(_cell(n=td.INTERPRETER_MAX_LEN + 1))
    assert "CUDA" in td.check(_cell(device="cuda")) or "TRITON_INTERPRET" in td.check(_cell(device="cuda"))
    q, k, v = _inputs("registered", 1, 4, 2, 2, 70, 64, "float32")
    out = impl.call(q, k, v, Mask("causal", q_offset=k.shape[2] - q.shape[2]))
    assert errors(out, _reference(q, k, v, "causal"))[0] < 1e-5


# ---------------------------------------------------------------------------------------
# Compiling for Hopper (sm_90) without a GPU
# ---------------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a subprocess (it compiles: TRITON_INTERPRET=0): captures the launches of one
# prepare_decode_attention call per case on CPU tensors (its launcher), compiles each with
# kernel_stats.compile_one.
SM90_SCRIPT = r'''
import importlib.util, json, os, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="ctxbench-decode-sm90-"))
import torch
from ctxbench.kernels import triton_decode as td
spec = importlib.util.spec_from_file_location("kernel_stats", sys.argv[1])
ks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ks)
DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
for case in sys.argv[2].split(","):
    dt, d, group, lq, mask, layout = case.split(":")
    d, group, lq = int(d), int(group), int(lq)
    captured = []
    B, Hkv, Lk = 2, 2, 1024
    q = torch.randn(B, Hkv * group, lq, d, dtype=DT[dt])
    kw = dict(causal=mask != "none", window=300 if mask in ("window", "sinks") else None,
              sinks=4 if mask == "sinks" else 0, num_splits=4,
              launcher=lambda kind, grid, args, meta: captured.append((kind, td.KERNELS[kind], args, meta)))
    if layout == "paged":
        k = torch.randn(B * Lk // 16, 16, Hkv, d, dtype=DT[dt])
        kw.update(kv_lens=torch.full((B,), Lk, dtype=torch.int32),
                  block_table=torch.arange(B * Lk // 16, dtype=torch.int32).view(B, -1))
    else:
        k = torch.randn(B, Hkv, Lk, d, dtype=DT[dt])
    v = torch.randn_like(k)
    td.prepare_decode_attention(q, k, v, **kw)(q, k, v)
    for name, fn, args, meta in captured:
        meta = dict(meta)
        config = (None, None, meta.pop("num_warps"), meta.pop("num_stages", 1))
        row = ks.compile_one(td, fn, args, meta, config, 90)
        row.update(kernel=name, case=case, warps=config[2], stages=config[3], block_m=meta.get("BLOCK_M"),
                   block_n=meta.get("BLOCK_N"))
        print(json.dumps(row), flush=True)
'''

SM90_CASES = [f"bf16:128:{g}:{lq}:{m}:{layout}" for g in (1, 4, 8) for lq in (1, 16)
              for m, layout in (("causal", "contig"), ("sinks", "paged"))] + ["fp16:64:4:3:none:contig",
                                                                              "bf16:80:4:1:window:paged"]


def sm90_rows(cases: list[str]) -> list[dict]:
    """One row per compiled kernel (registers, spills, shared memory, wgmma) per case
    "dtype:D:group:Lq:mask:layout"; skips when this triton cannot compile without a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    if not hasattr(pytest.importorskip("triton.runtime.jit"), "create_function_from_signature"):
        pytest.skip("this triton has no AOT binder API (create_function_from_signature)")
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-c", SM90_SCRIPT, os.path.join(ROOT, "benchmarks", "kernel_stats.py"),
                          ",".join(cases)], check=False, env=env, capture_output=True, text=True, timeout=1800)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert rows and out.returncode == 0, out.stderr[-3000:]
    return rows


@pytest.mark.slow
def test_compiles_for_sm90_without_spills():
    """Both kernels compile for Hopper for bf16/fp16, D 64..128, groups 1..8, Lq 1..16, contiguous
    and paged: the split kernel on tensor cores (mma.sync or wgmma), no spilled registers."""
    rows = sm90_rows(SM90_CASES)
    assert len(rows) == 2 * len(SM90_CASES)
    failed = [r for r in rows if not r["ok"]]
    assert not failed, failed
    for r in rows:
        print(f"{r['kernel']:<6} {r['case']:<28} M={r['block_m']} N={r['block_n']} warps={r['warps']}: "
              f"{r['regs']} regs, {r['spill']} B spilled, {r['shared']} B shared, {r['mma']}")
        assert not r["spill"], r
        if r["kernel"] == "split":
            assert r["mma"] in ("mma", "wgmma"), r
