"""flex (FlexAttention, compiled): its block mask against the mask's own block counts, its
output against the float64 reference, and what it refuses on the CPU."""

from __future__ import annotations

import os

import pytest
import torch

from ctxbench.kernels import flex as flex_mod
from ctxbench.core.cell import Cell, Config
from ctxbench.core.masks import Mask
from ctxbench.core.reference import TOLERANCE, errors, reference_attention
from ctxbench.registry import all_impls
from references import new_seed, random_qkv
from sweep_helpers import only_run_dir, rows_by_cell, run_cli

BS = flex_mod.BLOCK_SIZE
needs_cxx = pytest.mark.skipif(flex_mod.cpp_compiler() is None, reason="Inductor's CPU backend needs a C++ compiler")


def expected_blocks(mask: Mask, n_q: int, n_k: int) -> tuple[list[list[int]], list[list[int]]]:
    """(partial, full) key blocks of every query block, from Mask's own block predicates.

    FlexAttention pads both axes to whole blocks and treats padding as hidden, so a block
    that reaches past n_q or n_k is never full, only partial (when any real pair is visible).
    """
    partial, full = [], []
    for qs in range(0, n_q, BS):
        qe = min(qs + BS, n_q)
        p, f = [], []
        for ks in range(0, n_k, BS):
            ke = min(ks + BS, n_k)
            if not mask.sees_any(qs, qe, ks, ke):
                continue
            whole = qe - qs == BS and ke - ks == BS
            (f if whole and not mask.needs_mask(qs, qe, ks, ke) else p).append(ks // BS)
        partial.append(p)
        full.append(f)
    return partial, full


def block_lists(num: torch.Tensor, indices: torch.Tensor) -> list[list[int]]:
    return [sorted(indices[0, 0, i, : int(num[0, 0, i])].tolist()) for i in range(num.shape[-1])]


MASKS = [(Mask("causal"), 1000, 1000), (Mask("causal"), 1024, 1024), (Mask("window", 256), 2048, 2048),
         (Mask("window", 300, 4), 1500, 1500), (Mask("window", 1), 640, 640), (Mask("window", 100, 200), 900, 900),
         (Mask("causal", q_offset=700), 300, 1000), (Mask("window", 130, 3, q_offset=333), 517, 850)]


@pytest.mark.parametrize("mask,n_q,n_k", MASKS, ids=[f"{m.describe()}-{a}x{b}" for m, a, b in MASKS])
def test_block_mask_skips_exactly_the_hidden_blocks(mask, n_q, n_k):
    """The block mask's partial and full blocks are the mask's (so block skipping is real)."""
    bm = flex_mod.block_mask(mask, n_q, n_k, "cpu", compile=False)
    partial, full = expected_blocks(mask, n_q, n_k)
    assert block_lists(bm.kv_num_blocks, bm.kv_indices) == partial
    assert block_lists(bm.full_kv_num_blocks, bm.full_kv_indices) == full
    computed = sum(map(len, partial)) + sum(map(len, full))
    total = -(-n_q // BS) * -(-n_k // BS)
    if mask.kind == "window" and n_q >= 4 * mask.window + 4 * BS:
        assert computed < total / 2  # a window really leaves most blocks out


def test_mask_mod_is_the_mask_rule():
    """mask_mod(b, h, q, kv) equals Mask.visible on the whole grid, offsets included."""
    for mask, n_q, n_k in MASKS:
        q_idx, kv_idx = torch.arange(n_q)[:, None], torch.arange(n_k)[None, :]
        got = flex_mod.mask_mod(mask)(0, 0, q_idx, kv_idx)
        assert torch.equal(got, mask.visible(torch.arange(n_q), torch.arange(n_k))), mask


def flex_cell(**config) -> Cell:
    """A kernel cell of flex at N=256 under Config(**config)."""
    return Cell.of(Config(**config), "flex", 256, "kernel")


def test_cpu_refusals_are_unsupported_rows_with_the_reason(monkeypatch):
    impl = all_impls()["flex"]
    assert impl.setup and impl.sinks and impl.modes == frozenset({"fwd", "bwd", "fwd+bwd"})
    cell = flex_cell(device="cpu", dtype="float32", mask="causal", mode="fwd+bwd")
    assert "forward-only" in impl.unsupported_reason(cell)
    assert impl.unsupported_reason(flex_cell(device="cuda", dtype="bfloat16", mode="bwd")) is None
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    reason = impl.unsupported_reason(flex_cell(device="cpu", dtype="float32", mode="fwd"))
    assert "C++ compiler" in reason and "/nonexistent/c++" in reason and "CXX" in reason


def test_flex_is_in_default_sweeps_on_cuda_and_named_only_on_the_cpu():
    from ctxbench.engine.options import Options, choose_impls
    from ctxbench.engine.plan import PlanContext

    def sweep_impls(config: Config, impls: str | None = None) -> list[str]:
        """The implementations `ctxbench sweep [--impls IMPLS]` resolves for `config`."""
        o = Options("sweep", {"impl_names": impls})
        return choose_impls(o, PlanContext(options=o, config=config, lengths=[1024], impls=[], named=bool(impls)))

    assert "flex" not in sweep_impls(Config(device="cpu"))
    assert "sdpa" in sweep_impls(Config(device="cpu"))
    assert "flex" in sweep_impls(Config(device="cuda", dtype="bfloat16"))
    assert sweep_impls(Config(device="cpu"), "flex") == ["flex"]


def test_a_sweep_without_a_compiler_records_unsupported(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    code, out, err = run_cli(["sweep", "--device", "cpu", "--lengths", "64", "--heads", "2", "--head-dim", "16",
                              "--impls", "flex,sdpa", "--ppl-max-len", "0", "--rep-ms", "10", "--out", str(tmp_path)],
                             capsys)
    assert code == 0, err
    cells = rows_by_cell(only_run_dir(str(tmp_path)))
    assert cells[("flex", 64)]["status"] == "unsupported"
    assert "C++ compiler" in cells[("flex", 64)]["message"]
    assert cells[("sdpa", 64)]["status"] == "ok"
    assert "Traceback" not in out + err


def check_against_reference(mask: Mask, hq: int, hkv: int, n: int, dtype: torch.dtype, d: int = 64) -> None:
    seed = new_seed()
    q, k, v = random_qkv(seed, 1, hq, hkv, n, n, d, dtype, q_scale=2)
    out = all_impls()["flex"].call(q, k, v, mask)
    assert out.dtype == dtype and out.shape == q.shape
    rel, _ = errors(out, reference_attention(q, k, v, mask))
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    assert rel <= TOLERANCE[name], f"flex seed={seed} {mask.describe()} Hq={hq} Hkv={hkv} N={n} {name}: {rel:.2e}"


@pytest.mark.slow
@pytest.mark.ci
@needs_cxx
def test_flex_compiled_matches_float64_window_sinks_gqa():
    """.ci/run's one compiled case (about 30 s of compilation): the mask with the most rules
    (window + sinks), grouped-query heads and N not a multiple of the block."""
    check_against_reference(Mask("window", 50, 4), 4, 2, 300, torch.float32)


CASES = [("none", Mask("none"), 4, 4), ("causal", Mask("causal"), 4, 4), ("window", Mask("window", 64), 4, 4),
         ("window+sinks", Mask("window", 64, 3), 4, 4), ("gqa-causal", Mask("causal"), 8, 2),
         ("gqa-none", Mask("none"), 6, 3)]


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("label,mask,hq,hkv", CASES, ids=[c[0] for c in CASES])
def test_flex_compiled_matches_float64(label, mask, hq, hkv, dtype):
    check_against_reference(mask, hq, hkv, 333, dtype)


@pytest.mark.slow
@needs_cxx
def test_compiled_block_mask_equals_the_materialised_one():
    for mask, n_q, n_k in MASKS[:4]:
        a = flex_mod.block_mask(mask, n_q, n_k, "cpu", compile=True)
        b = flex_mod.block_mask(mask, n_q, n_k, "cpu", compile=False)
        assert block_lists(a.kv_num_blocks, a.kv_indices) == block_lists(b.kv_num_blocks, b.kv_indices)
        assert block_lists(a.full_kv_num_blocks, a.full_kv_indices) == block_lists(b.full_kv_num_blocks,
                                                                                 b.full_kv_indices)


def test_inductor_cache_location_is_documented():
    docs = open(os.path.join(os.path.dirname(__file__), "..", "docs", "implementations.md")).read()
    assert "TORCHINDUCTOR_CACHE_DIR" in docs


def test_ragged_mask_mod_is_each_sequences_mask():
    """A ragged batch's document mask: sequence b sees its own kv_lens[b] keys, bottom-right."""
    from ctxbench.core.kv_layout import ragged_visible

    lengths, n_q, n_k = [900, 130, 517], 3, 900
    kv_lens = torch.tensor(lengths)
    for mask in (Mask("causal"), Mask("none"), Mask("window", 100, 4)):
        mod = flex_mod.ragged_mask_mod(mask, kv_lens, n_q)
        want = ragged_visible(lambda n: Mask(mask.kind, mask.window, mask.sinks, n - n_q), lengths, n_q, n_k, "cpu")
        b = torch.arange(3)[:, None, None]
        got = mod(b, 0, torch.arange(n_q)[None, :, None], torch.arange(n_k)[None, None, :])
        assert torch.equal(got.expand_as(want), want), mask
        bm = flex_mod.block_mask(mask, n_q, n_k, "cpu", compile=False, kv_lens=kv_lens)
        assert bm.kv_num_blocks.shape[0] == 3  # one block list per sequence
        # sequence 1 (130 keys) reads only its first two key blocks
        seen = bm.kv_indices[1, 0, 0, : int(bm.kv_num_blocks[1, 0, 0])].tolist()
        seen += bm.full_kv_indices[1, 0, 0, : int(bm.full_kv_num_blocks[1, 0, 0])].tolist()
        assert max(seen) <= 1


@pytest.mark.slow
@needs_cxx
def test_flex_compiled_decode_ragged_matches_float64():
    from ctxbench.core.kv_layout import KVLayout

    lengths = [700, 129, 1000]
    q, k, v = random_qkv(new_seed(), 3, 4, 2, 2, 1000, 64)
    impl = all_impls()["flex"]
    mask = Mask("window", 300, 4, q_offset=998)
    out = impl.prepare(q, k, v, mask, layout=KVLayout(tuple(lengths), torch.tensor(lengths)))(q, k, v)
    for b, n in enumerate(lengths):
        ref = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], Mask("window", 300, 4, n - 2))
        assert errors(out[b:b + 1], ref)[0] < TOLERANCE["float32"]
