"""Fewer queries than keys (decode, chunked prefill): the bottom-right convention, the
implementations that declare it, the byte counts and bandwidth columns, and the CLI's checks.

Every implementation is checked against the float64 reference (ctxbench.core.reference) on fresh
random inputs; the reference itself is checked against tests/references.py, written from the
convention's definition, independently of ctxbench.core.masks.
"""

from __future__ import annotations

import json
import math
import os
import types
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ctxbench import registry

from ctxbench.engine import bandwidth
from ctxbench.core.flops import attention_bytes, attention_flops
from ctxbench.core.masks import Mask
from ctxbench.measurements.kernel.measure import make_inputs
from ctxbench.core.cell import Cell, Config
from ctxbench.core.reference import TOLERANCE, errors, reference_attention
from references import attention64, random_qkv, visible
from sweep_helpers import only_run_dir, run_cli, usage_error

SMALL = ["--device", "cpu", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--rep-ms", "5"]
MASKS = [("none", None, 0), ("causal", None, 0), ("window", 5, 0), ("window", 4, 2), ("window", 40, 0)]


@pytest.mark.parametrize("kind, window, sinks", MASKS)
def test_reference_follows_the_bottom_right_convention(kind, window, sinks, seed):
    q, k, v = random_qkv(seed, 2, 4, 2, 3, 11, 8)
    mask = Mask.named(kind, window, sinks, q_offset=11 - 3)
    want = attention64(q, k, v, causal=kind != "none", window=window, sinks=sinks)
    for key_block in (None, 1, 4):  # the reference reads keys in blocks; any block size is the same math
        got = reference_attention(q, k, v, mask, key_block=key_block)
        assert errors(got, want)[0] < 1e-12


@pytest.mark.parametrize("kind, window, sinks", MASKS)
def test_keys_seen_and_pairs_count_the_visible_keys(kind, window, sinks):
    for n_q, n_k in [(1, 1), (1, 30), (3, 30), (7, 9), (30, 30)]:
        mask = Mask.named(kind, window, sinks, q_offset=n_k - n_q)
        grid = visible(n_q, n_k, causal=kind != "none", window=window, sinks=sinks)
        assert mask.visible_pairs(n_q, n_k) == int(grid.sum())
        assert mask.keys_seen(n_q, n_k) == int(grid.any(0).sum())


def test_bytes_moved_by_hand():
    # decode, B=1, Hq=32, Hkv=8, D=128, 131072 keys, fp32: Q and O are 32*128 values each,
    # K and V 8*131072*128 each, 4 bytes a value
    causal = Mask("causal", q_offset=131071)
    assert attention_bytes(1, 32, 8, 1, 131072, 128, causal, "float32") == 4 * (2 * 32 * 128 + 2 * 8 * 131072 * 128)
    # a window of 1024 keys reads 1024 of them; 4 sinks add 4; bf16 halves it all
    window = Mask("window", 1024, 4, q_offset=131071)
    assert attention_bytes(2, 32, 8, 1, 131072, 128, window, "bfloat16") == \
        2 * 2 * (2 * 32 * 128 + 2 * 8 * 1028 * 128)
    # 16 queries see 15 keys more than one (the last 16 positions), FLOPs count pairs
    assert attention_flops(1, 32, 16, 128, Mask("causal", q_offset=1000 - 16), "fwd", n_k=1000) == \
        4 * 32 * 128 * sum(1000 - 16 + i + 1 for i in range(16))


def kernel_cell(impl: str, n: int, *, query_len: int | None = None, ragged: bool = False,
                page_size: int | None = None, **config) -> Cell:
    """A kernel cell (every Cell of this file is built here)."""
    return Cell.of(Config(**config), impl, n, "kernel", query_len=query_len, ragged=ragged, kv_lens=None,
                   page_size=page_size)


def test_square_cells_are_unchanged_by_the_query_length():
    """query_len = n is today's square cell: the same inputs, mask, FLOPs and bytes."""
    square = kernel_cell("sdpa", 64, heads=4, kv_heads=2, head_dim=16)
    same = kernel_cell("sdpa", 64, query_len=64, heads=4, kv_heads=2, head_dim=16)
    assert same.q_len == square.q_len == 64
    assert same.attention_mask == square.attention_mask == Mask("causal")
    for a, b in zip(make_inputs(square, 3, False), make_inputs(same, 3, False)):
        assert torch.equal(a, b)
    decode = kernel_cell("sdpa", 64, query_len=2, heads=4, kv_heads=2, head_dim=16)
    q, k, v, dout = make_inputs(decode, 3, False)
    assert q.shape == dout.shape == (1, 4, 2, 16) and k.shape == v.shape == (1, 2, 64, 16)
    assert decode.attention_mask == Mask("causal", q_offset=62)


# Shapes that take each path: chunked's split-K decode (group * Lq <= 64 rows, >= 1024 keys)
# with one or several key tiles and masked edges, and its blockwise path (more rows, or short).
CASES = [(1, 3000), (3, 2100), (16, 1500), (1, 700), (40, 1100), (300, 1200)]
IMPL_MASKS = [Mask("causal"), Mask("none"), Mask("window", 600), Mask("window", 300, 5), Mask("window", 1),
              Mask("window", 17, 40)]


@pytest.mark.parametrize("name", ["naive", "sdpa", "chunked", "sliding_window"])
@pytest.mark.parametrize("n_q, n_k", CASES)
def test_implementations_match_the_reference_with_fewer_queries(name, n_q, n_k, seed):
    impl = registry.get(name)
    assert impl.kv_cache
    q, k, v = random_qkv(seed, 1, 8, 2, n_q, n_k, 32)
    for m in IMPL_MASKS:
        if m.kind not in impl.masks:
            continue
        mask = Mask(m.kind, m.window, m.sinks, n_k - n_q)
        err = errors(impl.call(q, k, v, mask), reference_attention(q, k, v, mask))[0]
        assert err < TOLERANCE["float32"] / 10, (mask.describe(), err)


def split_counting(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, list[int]]:
    """chunked's module, with its split_k wrapped to record the number of splits (key tiles) of
    every call: proof that a case ran split-K, and over how many splits."""
    from ctxbench.kernels import chunked as chunked_module

    splits: list[int] = []
    real = chunked_module.split_k

    def counting(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: Any, **kwargs: Any) -> torch.Tensor:
        splits.append(len(block.tiles))
        return real(q, k, v, block, **kwargs)

    monkeypatch.setattr(chunked_module, "split_k", counting)
    return chunked_module, splits


def check_split_k(n_q: int, n_k: int, heads: tuple[int, int], masks: list[Mask], seed: int,
                  splits: list[int], min_splits: int) -> None:
    """chunked on random q [2, Hq, n_q, 16], k/v [2, Hkv, n_k, 16] of `seed` under each mask (no sinks)
    equals the float64 reference, and each call ran split-K over at least `min_splits` splits."""
    hq, hkv = heads
    q, k, v = random_qkv(seed, 2, hq, hkv, n_q, n_k, 16)
    for m in masks:
        mask = Mask(m.kind, m.window, 0, n_k - n_q)
        splits.clear()
        err = errors(registry.get("chunked").call(q, k, v, mask), reference_attention(q, k, v, mask))[0]
        assert splits and min(splits) >= min_splits, (mask.describe(), f"split-K calls with splits {splits}")
        assert err < TOLERANCE["float32"] / 10, (mask.describe(), heads, f"splits {splits}, error {err:.2e}")


@pytest.mark.parametrize("heads", [(4, 2), (8, 1), (2, 2)], ids=["gqa2", "gqa8", "mha"])
@pytest.mark.parametrize("n_q", [1, 4])
def test_split_k_over_many_small_splits(heads: tuple[int, int], n_q: int, seed: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The split-K merge (log-sum-exp over splits) with SPLIT_K_BLOCK shrunk to 256 keys: 3000 keys
    are up to a dozen splits (12 causal, 2 to 5 under the windows), whose edges fall inside splits;
    GQA and MHA, no sinks, against the float64 reference."""
    chunked_module, splits = split_counting(monkeypatch)
    monkeypatch.setattr(chunked_module, "SPLIT_K_BLOCK", 256)
    masks = [Mask("causal"), Mask("none"), Mask("window", 1000), Mask("window", 600), Mask("window", 300)]
    check_split_k(n_q, 3000, heads, masks, seed, splits, min_splits=2)


@pytest.mark.parametrize("heads", [(4, 2), (2, 2)], ids=["gqa2", "mha"])
@pytest.mark.parametrize("n_q", [1, 3])
def test_split_k_over_several_real_size_splits(heads: tuple[int, int], n_q: int, seed: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real SPLIT_K_BLOCK (16,384 keys): 40,000 keys are three splits, the last one partial
    (and with the causal diagonal when n_q > 1); windows of 35,000 and 20,000 keys start inside
    the first or second split. No sinks."""
    chunked_module, splits = split_counting(monkeypatch)
    assert chunked_module.SPLIT_K_BLOCK * 2 < 40_000
    masks = [Mask("causal"), Mask("none"), Mask("window", 35_000)]
    check_split_k(n_q, 40_000, heads, masks, seed, splits, min_splits=3)
    check_split_k(n_q, 40_000, heads, [Mask("window", 20_000)], seed + 1, splits, min_splits=2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_split_k_in_low_precision(dtype, seed):
    q, k, v = random_qkv(seed, 2, 8, 2, 2, 5000, 64, getattr(torch, dtype))
    mask = Mask("window", 3000, 4, q_offset=4998)
    out = registry.get("chunked").call(q, k, v, mask)
    assert out.dtype == q.dtype
    assert errors(out, reference_attention(q, k, v, mask))[0] < TOLERANCE[dtype]


def test_chunked_prefill_gradients(seed):
    """A call that needs gradients takes chunked's blockwise path, whose backward handles Lq < Lk."""
    q, k, v = (t.requires_grad_() for t in random_qkv(seed, 1, 4, 2, 48, 300, 16))
    dout = torch.randn(1, 4, 48, 16, generator=torch.Generator().manual_seed(seed + 1))
    for mask in (Mask("causal", q_offset=252), Mask("window", 64, 3, q_offset=252)):
        registry.get("chunked").call(q, k, v, mask).backward(dout)
        got = [t.grad.clone() for t in (q, k, v)]
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        reference_attention(q64, k64, v64, mask).backward(dout.double())
        for g, t in zip(got, (q64, k64, v64)):
            assert errors(g, t.grad)[0] < 1e-5
        q.grad = k.grad = v.grad = None


def test_sdpa_top_left_causal_would_be_wrong(seed):
    """SDPA's is_causal aligns queries top-left; ctxbench's sdpa uses the lower-right bias."""
    q, k, v = random_qkv(seed, 1, 4, 4, 4, 16, 16)
    mask = Mask("causal", q_offset=12)
    ref = reference_attention(q, k, v, mask)
    top_left = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert errors(top_left, ref)[0] > 0.1  # query 0 would see one key instead of 13
    assert errors(registry.get("sdpa").call(q, k, v, mask), ref)[0] < 1e-6


def test_undeclared_implementations_are_unsupported_for_fewer_queries():
    registry.register("square_only_test")(lambda q, k, v, *, causal, window, scale=None: q)
    impl = registry.get("square_only_test")
    decode = kernel_cell("square_only_test", 64, query_len=1)
    reason = impl.unsupported_reason(decode)
    assert reason is not None and "kv_cache=True" in reason and "1 queries against 64 keys" in reason
    assert impl.unsupported_reason(kernel_cell("square_only_test", 64, query_len=64)) is None
    with pytest.raises(ValueError, match="q_offset must be Lk - Lq"):
        impl.prepare(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 8, 4), torch.ones(1, 1, 8, 4), Mask("causal"))


def test_datasheet_bandwidths():
    assert bandwidth.peak_hbm_gbps("NVIDIA H200") == 4800.0
    assert bandwidth.peak_hbm_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert bandwidth.peak_hbm_gbps("NVIDIA H100 PCIe") == 2000.0
    assert bandwidth.peak_hbm_gbps("Some CPU") is None


def test_cpu_read_probe_measures_something_plausible():
    bests = bandwidth.cpu_read_gbps(64 * 2**20, repeats=3, probes=2)
    assert len(bests) == 2 and all(0.1 < gbps < 10_000 for gbps in bests)


def test_the_cpu_denominator_is_the_best_probe_with_its_spread(monkeypatch):
    """The best pass of every probe is the denominator (as STREAM reports its best time), the
    median probe is the measured figure beside it, and the source names the estimator and spread."""
    monkeypatch.setattr(bandwidth, "cpu_read_gbps", lambda **kw: [25.9, 31.0, 32.5, 30.2, 28.4])
    found = bandwidth.probe("cpu")
    assert found["bandwidth_gbps"] == 32.5 and found["bandwidth_probe_gbps"] == 30.2
    assert "best pass of 5 probes x 3 reads" in found["bandwidth_source"]
    assert "probes' best 25.9-32.5 GB/s, median 30.2" in found["bandwidth_source"]


def test_decode_sweep_records_bytes_and_bandwidth(tmp_path, capsys):
    code, out, err = run_cli(["sweep", *SMALL, "--query-len", "2", "--lengths", "1024,2048", "--impls",
                              "chunked,sdpa", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    run_dir = only_run_dir(str(tmp_path))
    import csv

    rows = list(csv.DictReader(open(os.path.join(run_dir, "results.csv"))))
    assert len(rows) == 4, "kernel cells only: no perplexity unless asked for"
    settings = json.load(open(os.path.join(run_dir, "meta.json")))["spec"]["settings"]
    bw = settings["bandwidth_gbps"]
    assert bw > 0 and "best pass of 5 probes" in settings["bandwidth_source"]
    for r in rows:
        assert r["status"] == "ok", r["message"]
        n = int(r["n"])
        assert r["query_len"] == "2"
        assert int(r["bytes_moved"]) == 4 * (2 * 4 * 2 * 16 + 2 * 2 * n * 16)
        assert math.isclose(float(r["gbps"]), int(r["bytes_moved"]) / (float(r["latency_ms"]) * 1e-3) / 1e9)
        assert math.isclose(float(r["bw_fraction"]), float(r["gbps"]) / bw)
        assert float(r["device_bw_gbps"]) == bw
        assert float(r["flops"]) == 4 * 4 * 16 * (2 * (n - 1) + 1)


@pytest.mark.parametrize("args, fragment", [
    (["--query-len", "0"], "--query-len must be a positive number"),
    (["--query-len", "-3"], "--query-len must be a positive number"),
    (["--query-len", "2048", "--lengths", "1024,4096"], "--query-len 2048 is above the KV length 1024"),
])
def test_bad_query_lengths_are_one_line_and_exit_2(args, fragment, tmp_path, capsys):
    usage_error(["sweep", *SMALL, "--out", str(tmp_path), *args], capsys, fragment)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- ragged batches and paged caches

def test_pages_hold_each_sequence_in_a_shuffled_order(seed):
    from ctxbench.core.kv_layout import gather, gather_all, paginate

    _, k, v = random_qkv(seed, 3, 2, 2, 50, 50, 8)
    lengths = [50, 17, 33]
    k_pool, v_pool, table = paginate(k, v, lengths, 16, seed=5)
    assert k_pool.shape == (4 + 2 + 3, 16, 2, 8) and table.shape == (3, 4)
    used = torch.cat([table[b, :-(-n // 16)] for b, n in enumerate(lengths)])
    assert sorted(used.tolist()) == list(range(9)) and used.tolist() != list(range(9))
    for b, n in enumerate(lengths):
        assert torch.equal(gather(k_pool, table, b, n), k[b:b + 1, :, :n])
        assert torch.equal(gather(v_pool, table, b, n), v[b:b + 1, :, :n])
    full = gather_all(k_pool, table, 50)
    for b, n in enumerate(lengths):
        assert torch.equal(full[b, :, :n], k[b, :, :n])


def test_ragged_lengths_are_drawn_from_the_seed():
    from ctxbench.core.kv_layout import draw_lengths

    a = draw_lengths(4096, 8, 1, seed=0)
    assert a == draw_lengths(4096, 8, 1, seed=0) and a != draw_lengths(4096, 8, 1, seed=1)
    assert max(a) == 4096 and min(a) >= 512 and len(set(a)) > 1
    assert min(draw_lengths(64, 8, 30, seed=0)) >= 30  # never fewer keys than queries


RAGGED = ["naive", "sdpa", "chunked"]


@pytest.mark.parametrize("name", RAGGED)
@pytest.mark.parametrize("n_q", [1, 4, 40])
def test_ragged_and_paged_batches_match_the_reference(name, n_q, seed):
    from ctxbench.core.kv_layout import KVLayout, paginate

    impl = registry.get(name)
    assert impl.ragged and impl.paged
    lengths = [1500, 260, 1100]
    n = max(lengths)
    q, k, v = random_qkv(seed, 3, 4, 2, n_q, n, 16)  # keys past a length are random padding
    kv_lens = torch.tensor(lengths, dtype=torch.int32)
    k_pool, v_pool, table = paginate(k, v, lengths, 16, seed=seed)
    for m in (Mask("causal"), Mask("window", 300, 4), Mask("none")):
        mask = Mask(m.kind, m.window, m.sinks, n - n_q)
        ragged = impl.prepare(q, k, v, mask, layout=KVLayout(tuple(lengths), kv_lens))(q, k, v)
        for b, length in enumerate(lengths):
            seq = Mask(m.kind, m.window, m.sinks, length - n_q)
            ref = reference_attention(q[b:b + 1], k[b:b + 1, :, :length], v[b:b + 1, :, :length], seq)
            assert errors(ragged[b:b + 1], ref)[0] < 1e-5, (mask.describe(), b)
        paged = impl.prepare(q, k_pool, v_pool, mask,
                             layout=KVLayout(tuple(lengths), kv_lens, table, 16))(q, k_pool, v_pool)
        assert torch.equal(paged, ragged), "the same data, paged or contiguous, must give the same output"


def test_ragged_cells_need_a_declaration():
    registry.register("not_ragged_test", kv_cache=True)(lambda q, k, v, *, causal, window, scale=None: q)
    cell = kernel_cell("not_ragged_test", 64, query_len=1, ragged=True)
    assert "does not support ragged batches" in registry.get("not_ragged_test").unsupported_reason(cell)
    # a paged (not ragged) cell runs it on contiguous K and V
    assert registry.get("not_ragged_test").unsupported_reason(kernel_cell(
        "not_ragged_test", 64, query_len=1, page_size=16)) is None


def test_ragged_paged_sweep_counts_only_real_tokens(tmp_path, capsys):
    code, out, err = run_cli(["sweep", *SMALL, "--batch", "3", "--query-len", "1", "--kv-lens", "300,1024,77",
                              "--page-size", "16", "--impls", "sdpa,chunked", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    import csv

    rows = list(csv.DictReader(open(os.path.join(only_run_dir(str(tmp_path)), "results.csv"))))
    assert [r["n"] for r in rows] == ["1024", "1024"]
    for r in rows:
        assert r["status"] == "ok", r["message"]
        assert r["kv_lens"] == r["kv_lens_used"] == "300,1024,77" and r["page_size"] == "16"
        assert int(r["bytes_moved"]) == 4 * sum(2 * 4 * 16 + 2 * 2 * n * 16 for n in (300, 1024, 77))
        assert float(r["flops"]) == 4 * 4 * 16 * (300 + 1024 + 77)


@pytest.mark.parametrize("args, fragment", [
    (["--page-size", "0"], "--page-size must be a positive integer"),
    (["--page-size", "x"], "'x' is not a valid integer"),
    (["--kv-lens", "100,200", "--batch", "3"], "gives 2 lengths for --batch 3"),
    (["--kv-lens", "100,5000", "--batch", "2", "--max-len", "4096"], "5000 is above --max-len 4096"),
    (["--kv-lens", "100,2x", "--batch", "2"], "not a comma-separated list"),
    (["--kv-lens", "100,200", "--batch", "2", "--lengths", "1024"], "--kv-lens fixes the KV lengths"),
    (["--ragged", "--mode", "fwd+bwd"], "measured forward only"),
])
def test_bad_kv_layouts_are_one_line_and_exit_2(args, fragment, tmp_path, capsys):
    usage_error(["sweep", *SMALL, "--out", str(tmp_path), *args], capsys, fragment)
    assert not list(tmp_path.iterdir())
