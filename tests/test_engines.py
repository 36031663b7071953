"""The optional CUDA engines (flashinfer, xformers), tested on the CPU without their packages.

What runs here: the declarations, the install-hint and device refusals, a sweep that records
them, the pure-tensor glue (page table, ragged reshapes, window mapping, GQA views), and each
setup step end to end against a stand-in package that follows the real one's documented
semantics (so a wrong layout, mask mapping or head mapping gives wrong numbers here).
"""

from __future__ import annotations

import os
import sys
import types
from typing import ClassVar

import ctxbench.kernels.flashinfer_attention as fia
import ctxbench.kernels.xformers_attention as xfa
import pytest
import torch
from references import attention64, mask_kwargs, random_qkv
from sweep_helpers import only_run_dir, run_cli

from ctxbench import registry
from ctxbench.core.cell import Cell, Config
from ctxbench.core.masks import Mask
from ctxbench.engine.results import read_results

MASKS = [Mask("none"), Mask("causal"), Mask("window", 1), Mask("window", 5), Mask("window", 64)]


# ---------------------------------------------------------------- (a) declarations

@pytest.mark.parametrize("name, dtypes, modes", [
    ("flashinfer", {"float16", "bfloat16"}, {"fwd"}),
    ("xformers", {"float32", "float16", "bfloat16"}, {"fwd", "bwd", "fwd+bwd"}),
])
def test_declared_capabilities(name, dtypes, modes):
    impl = registry.get(name)
    assert impl.devices == {"cuda"}
    assert impl.dtypes == dtypes
    assert impl.modes == modes
    assert impl.masks == {"none", "causal", "window"}
    assert impl.gqa is True
    assert impl.sinks is False
    assert impl.setup is True
    assert impl.exact is True
    assert impl.check is not None


# ---------------------------------------------------------------- (b) refusals

def _cell(impl: str, **kw) -> Cell:
    base = {"device": "cuda", "dtype": "float16", "heads": 8, "kv_heads": 2, "head_dim": 64, "mask": "causal", "mode": "fwd"}
    return Cell.of(Config(**{**base, **kw}), impl, 1024, "kernel")


@pytest.mark.parametrize("module, name, hint", [
    (fia, "flashinfer", "flashinfer is not installed (pip install flashinfer-python)"),
    (xfa, "xformers", "xformers is not installed (pip install xformers)"),
])
def test_install_hint_and_cpu_refusal(monkeypatch, module, name, hint):
    impl = registry.get(name)
    monkeypatch.setattr(module, "_AVAILABLE", False)
    assert impl.unsupported_reason(_cell(name)) == hint
    assert impl.unsupported_reason(_cell(name, mask="window", window=128)) == hint
    cpu = impl.unsupported_reason(_cell(name, device="cpu"))
    assert cpu is not None and f"{name} does not run on cpu" in cpu
    # The flag is what decides: with the package "present" the same cell is runnable.
    monkeypatch.setattr(module, "_AVAILABLE", True)
    assert impl.unsupported_reason(_cell(name)) is None


def test_absent_here_without_forcing():
    """On this machine neither package is installed, so the flags say so (not a forced value)."""
    import importlib.util

    assert fia._AVAILABLE == (importlib.util.find_spec("flashinfer") is not None)
    assert xfa._AVAILABLE == (importlib.util.find_spec("xformers") is not None)


def test_declared_limits_refuse_before_the_check(monkeypatch):
    monkeypatch.setattr(fia, "_AVAILABLE", True)
    monkeypatch.setattr(xfa, "_AVAILABLE", True)
    fi, xf = registry.get("flashinfer"), registry.get("xformers")
    assert "mode=bwd" in fi.unsupported_reason(_cell("flashinfer", mode="bwd"))
    assert "float32" in fi.unsupported_reason(_cell("flashinfer", dtype="float32"))
    assert "sinks" in fi.unsupported_reason(_cell("flashinfer", mask="window", window=64, sinks=4))
    assert xf.unsupported_reason(_cell("xformers", dtype="float32", mode="fwd+bwd")) is None
    assert xf.unsupported_reason(_cell("xformers", dtype="bfloat16", mask="window", window=64, mode="bwd")) is None
    gap = xf.unsupported_reason(_cell("xformers", dtype="float32", mask="window", window=64, mode="bwd"))
    assert gap is not None and "float32 backward" in gap
    assert xf.unsupported_reason(_cell("xformers", dtype="float32", mask="window", window=64, mode="fwd")) is None


# ---------------------------------------------------------------- (c) a sweep records them

def test_sweep_on_cpu_records_unsupported_rows(tmp_path, capsys):
    code, out, err = run_cli(["sweep", "--device", "cpu", "--heads", "2", "--head-dim", "16", "--rep-ms", "5",
                              "--min-len", "64", "--max-len", "64", "--ppl-max-len", "0",
                              "--impls", "flashinfer,xformers,sdpa", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "Traceback" not in out + err
    _, rows = read_results(os.path.join(only_run_dir(str(tmp_path)), "results.csv"))
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == {"flashinfer", "xformers", "sdpa"}
    for name in ("flashinfer", "xformers"):
        row = by_impl[name]
        assert row["status"] == "unsupported", row
        assert f"{name} does not run on cpu" in row["message"]
        assert row["latency_ms"] == ""
    assert by_impl["sdpa"]["status"] == "ok", by_impl["sdpa"]["message"]


# ---------------------------------------------------------------- (d) FlashInfer's pure pieces

@pytest.mark.parametrize("batch, n", [(1, 1), (1, 64), (3, 17), (5, 128)])
def test_page_table_one_page_per_sequence(batch, n):
    qo, kv_indptr, indices, last = fia.page_table(batch, n)
    for t in (qo, kv_indptr, indices, last):
        assert t.dtype == torch.int32 and t.device.type == "cpu"
    assert qo.tolist() == [b * n for b in range(batch + 1)]
    assert kv_indptr.tolist() == list(range(batch + 1))
    assert indices.tolist() == list(range(batch))
    assert last.tolist() == [n] * batch
    # FlashInfer's length rule: page_size * (pages - 1) + last_page_len, with 1 <= last <= page_size.
    pages = (kv_indptr[1:] - kv_indptr[:-1]).tolist()
    assert [n * (p - 1) + int(lp) for p, lp in zip(pages, last)] == [n] * batch
    assert all(1 <= int(lp) <= n for lp in last)
    with pytest.raises(ValueError):
        fia.page_table(0, n)


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 4, 33, 16), (3, 8, 64, 64)])
def test_ragged_round_trip(shape):
    q = torch.randn(*shape)
    b, h, n, d = shape
    r = fia.to_ragged(q)
    assert r.shape == (b * n, h, d)
    # Row b*N + i is token i of sequence b, every head.
    for bb in range(b):
        for i in (0, n - 1):
            assert torch.equal(r[bb * n + i], q[bb, :, i])
    back = fia.from_ragged(r, b)
    assert back.shape == q.shape
    assert torch.equal(back, q)
    assert back.data_ptr() == r.data_ptr()  # the way back is a view


def test_window_left_for_every_mask():
    assert fia.window_left(Mask("none")) == -1
    assert fia.window_left(Mask("causal")) == -1
    for w in (1, 2, 7, 4096):
        assert fia.window_left(Mask("window", w)) == w - 1
    # Under FlashInfer's rule (p - window_left <= j <= p) the mapped window sees what ours does.
    for w in (1, 3, 10):
        p, j = torch.arange(16)[:, None], torch.arange(16)[None, :]
        theirs = (j <= p) & (p - fia.window_left(Mask("window", w)) <= j)
        assert torch.equal(theirs, Mask("window", w).visible(torch.arange(16), torch.arange(16)))


def test_paged_kv_is_our_tensors_and_plan_args():
    q, k, v = torch.randn(2, 8, 32, 16), torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16)
    pk, pv = fia.paged_kv(k, v)
    assert pk is k and pv is v  # HND pages [num_pages=B, Hkv, page_size=N, D]: no copy
    args, kwargs = fia.plan_args(q, k, Mask("window", 5), 0.25)
    assert [int(a) if isinstance(a, int) else a.tolist() for a in args] == \
        [[0, 32, 64], [0, 1, 2], [0, 1], [32, 32], 8, 2, 16, 32]
    assert kwargs == {"causal": True, "window_left": 4, "sm_scale": 0.25,
                      "q_data_type": torch.float32, "kv_data_type": torch.float32}
    _, kwargs = fia.plan_args(q, k, Mask("none"), None)
    assert (kwargs["causal"], kwargs["window_left"], kwargs["sm_scale"]) == (False, -1, None)
    with pytest.raises(ValueError):
        fia.plan_args(q, k[:, :, :16], Mask("causal"), None)


# ---------------------------------------------------------------- (d) xFormers' pure pieces

@pytest.mark.parametrize("hq, hkv", [(8, 2), (6, 3), (4, 1), (4, 4)])
def test_gqa_views_are_views_reading_the_right_kv_head(hq, hkv):
    b, n, d = 2, 9, 8
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    q5, k5, v5 = xfa.gqa_views(q, k, v)
    group = hq // hkv
    for x5 in (q5, k5, v5):
        assert x5.shape == (b, n, hkv, group, d)
    for x5, x in ((q5, q), (k5, k), (v5, v)):
        assert x5.data_ptr() == x.data_ptr() and x5.untyped_storage().nbytes() == x.untyped_storage().nbytes()
    if group > 1:
        assert k5.stride(3) == 0 and v5.stride(3) == 0  # expanded over the group, nothing copied
    # Head h of the view (group h // g, member h % g) reads kv head h // g, as repeat_interleave does.
    assert torch.equal(xfa.from_bmghk(k5.contiguous()), k.repeat_interleave(group, 1))
    assert torch.equal(xfa.from_bmghk(v5.contiguous()), v.repeat_interleave(group, 1))
    assert torch.equal(xfa.from_bmghk(q5.contiguous()), q)
    assert torch.equal(xfa.repeat_kv(k, group), k.repeat_interleave(group, 1))
    with pytest.raises(ValueError):
        xfa.gqa_views(torch.randn(1, 5, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


def test_bmhk_views():
    x = torch.randn(2, 3, 5, 8)
    y = xfa.to_bmhk(x)
    assert y.shape == (2, 5, 3, 8) and y.data_ptr() == x.data_ptr() and y.stride(-1) == 1
    assert torch.equal(xfa.from_bmhk(y), x)


# ---------------------------------------------------------------- stand-ins for the packages

class _FakeLowerTriangularFromBottomRightMask:
    """xformers.ops.fmha.attn_bias.LowerTriangularFromBottomRightMask, as its source defines it."""

    window = None

    def make_local_attention(self, window_size: int) -> _FakeLocal:
        return _FakeLocal(window_size)

    def materialize(self, shape) -> torch.Tensor:
        nq, nk = shape[-2:]
        s = nk - nq
        m = torch.tril(torch.ones(nq, nk), diagonal=s)
        if self.window is not None:
            m = torch.triu(m, diagonal=s - self.window + 1)
        return torch.log(m)


class _FakeLocal(_FakeLowerTriangularFromBottomRightMask):
    def __init__(self, window_size: int) -> None:
        if window_size <= 0:
            raise ValueError("Expected `window_size > 0`")
        self.window = window_size


@pytest.fixture
def fake_xformers(monkeypatch):
    """A stand-in xformers package: memory_efficient_attention on [B, M, H, K] or [B, M, G, H, K]."""
    calls: list[dict] = []

    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):
        assert query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        calls.append({"ndim": query.ndim, "k_shared": key.ndim == 5 and key.stride(3) == 0})
        gh = tuple(query.shape[2:4]) if query.ndim == 5 else None
        if gh is not None:
            assert key.shape == query.shape  # xFormers does not broadcast: the caller expands
            query, key, value = (x.flatten(2, 3) for x in (query, key, value))
        q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))
        s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if attn_bias is not None:
            s = s + attn_bias.materialize(s.shape)
        out = (s.softmax(-1) @ v).to(query.dtype).transpose(1, 2).contiguous()
        return out.unflatten(2, gh) if gh is not None else out

    pkg, ops, fmha = (types.ModuleType(n) for n in ("xformers", "xformers.ops", "xformers.ops.fmha"))
    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")
    attn_bias.LowerTriangularFromBottomRightMask = _FakeLowerTriangularFromBottomRightMask
    ops.memory_efficient_attention = memory_efficient_attention
    pkg.ops, ops.fmha, fmha.attn_bias = ops, fmha, attn_bias
    for mod in (pkg, ops, fmha, attn_bias):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return calls


class _FakePrefillWrapper:
    """flashinfer.BatchPrefillWithPagedKVCacheWrapper, as its docs and kernels define the mask."""

    instances: ClassVar[list] = []

    def __init__(self, float_workspace_buffer, kv_layout="NHD"):
        assert float_workspace_buffer.dtype == torch.uint8 and float_workspace_buffer.numel() == 128 * 2**20
        self.kv_layout = kv_layout
        self.planned = None
        _FakePrefillWrapper.instances.append(self)

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads,
             num_kv_heads, head_dim, page_size, *, causal=False, sm_scale=None, window_left=-1,
             q_data_type="float16", kv_data_type=None):
        for t in (qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len):
            assert t.dtype == torch.int32
        self.planned = {"qo": qo_indptr.tolist(), "kv_indptr": paged_kv_indptr.tolist(),
                            "indices": paged_kv_indices.tolist(), "last": paged_kv_last_page_len.tolist(),
                            "hq": num_qo_heads, "hkv": num_kv_heads, "d": head_dim, "page": page_size, "causal": causal,
                            "scale": sm_scale, "window_left": window_left, "q_dtype": q_data_type, "kv_dtype": kv_data_type}

    def run(self, q, paged_kv_cache):
        p = self.planned
        assert p is not None, "run before plan"
        k_cache, v_cache = paged_kv_cache
        assert self.kv_layout == "HND" and k_cache.shape[1:] == (p["hkv"], p["page"], p["d"])
        assert q.shape == (p["qo"][-1], p["hq"], p["d"]) and q.dtype == p["q_dtype"]
        out = torch.empty_like(q)
        group = p["hq"] // p["hkv"]
        for b in range(len(p["qo"]) - 1):
            pages = p["indices"][p["kv_indptr"][b]:p["kv_indptr"][b + 1]]
            kv_len = p["page"] * (len(pages) - 1) + p["last"][b]
            # HND pages [P, H, page, D] -> [H, P*page, D], the request's first kv_len tokens
            k = k_cache[pages].transpose(0, 1).flatten(1, 2)[:, :kv_len].float()
            v = v_cache[pages].transpose(0, 1).flatten(1, 2)[:, :kv_len].float()
            qb = q[p["qo"][b]:p["qo"][b + 1]].transpose(0, 1).float()  # [Hq, qo_len, D]
            qo_len = qb.shape[1]
            s = qb @ k.repeat_interleave(group, 0).transpose(-1, -2)
            s = s * (p["d"] ** -0.5 if p["scale"] is None else p["scale"])
            qi, kj = torch.arange(qo_len)[:, None], torch.arange(kv_len)[None, :]
            keep = torch.ones(qo_len, kv_len, dtype=torch.bool)
            if p["causal"]:
                keep &= kj < qi + 1 + kv_len - qo_len                   # hopper col_limit_right
            if p["window_left"] >= 0:
                keep &= kj + qo_len + p["window_left"] >= kv_len + qi    # variants.cuh
            s = s.masked_fill(~keep, float("-inf"))
            out[p["qo"][b]:p["qo"][b + 1]] = (s.softmax(-1) @ v.repeat_interleave(group, 0)).transpose(0, 1).to(q.dtype)
        return out


@pytest.fixture
def fake_flashinfer(monkeypatch):
    _FakePrefillWrapper.instances = []
    mod = types.ModuleType("flashinfer")
    mod.BatchPrefillWithPagedKVCacheWrapper = _FakePrefillWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", mod)
    return _FakePrefillWrapper


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.describe())
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2)])
def test_flashinfer_setup_step_end_to_end(fake_flashinfer, mask, hq, hkv):
    impl = registry.get("flashinfer")
    q, k, v = random_qkv(hq * 7 + (mask.window or 0), 2, hq, hkv, 24, 24, 16)
    run = impl.prepare(q, k, v, mask, scale=None)
    assert len(fake_flashinfer.instances) == 1  # the plan is made once, in the setup step
    planned = fake_flashinfer.instances[0].planned
    assert planned["window_left"] == fia.window_left(mask) and planned["page"] == 24
    for layer in range(2):  # new values, same shapes: nothing derived from K/V may be stale
        q, k, v = random_qkv(100 + layer, 2, hq, hkv, 24, 24, 16)
        out = run(q, k, v)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out.double(), attention64(q, k, v, **mask_kwargs(mask)), atol=1e-5, rtol=1e-5)
    assert len(fake_flashinfer.instances) == 1


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.describe())
@pytest.mark.parametrize("hq, hkv", [(4, 4), (6, 2)])
def test_xformers_setup_step_end_to_end(fake_xformers, mask, hq, hkv):
    impl = registry.get("xformers")
    q, k, v = random_qkv(hq * 11 + (mask.window or 0), 2, hq, hkv, 24, 24, 16)
    run = impl.prepare(q, k, v, mask, scale=0.3)
    for layer in range(2):
        q, k, v = random_qkv(200 + layer, 2, hq, hkv, 24, 24, 16)
        out = run(q, k, v)
        assert out.shape == q.shape
        want = attention64(q, k, v, **mask_kwargs(mask), scale=0.3)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    # GQA forward goes in as 5-D views with K shared at stride 0; MHA as 4-D views.
    assert all(c["ndim"] == (5 if hq != hkv else 4) for c in fake_xformers)
    assert all(c["k_shared"] == (hq != hkv) for c in fake_xformers)


def test_xformers_gqa_backward_uses_the_4d_layout_and_gradients_match(fake_xformers):
    mask = Mask("window", 5)
    impl = registry.get("xformers")
    q, k, v = (t.requires_grad_(True) for t in random_qkv(3, 1, 6, 2, 16, 16, 8))
    run = impl.prepare(q, k, v, mask)
    out = run(q, k, v)
    assert fake_xformers[-1]["ndim"] == 4  # xFormers' backward has no BMGHK layout
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(attention64(q64, k64, v64, **mask_kwargs(mask)), (q64, k64, v64), dout.double())
    for got, want in zip(grads, ref):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_xformers_refusal_at_run_time_is_unsupported(fake_xformers, monkeypatch):
    def no_operator(*args, **kwargs):
        raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n...")

    monkeypatch.setattr(sys.modules["xformers.ops"], "memory_efficient_attention", no_operator)
    q, k, v = random_qkv(0, 1, 2, 2, 8, 8, 8)
    run = registry.get("xformers").prepare(q, k, v, Mask("causal"))
    with pytest.raises(registry.Unsupported, match="xformers: No operator found"):
        run(q, k, v)


def test_make_attn_bias_maps_every_mask(fake_xformers):
    attn_bias = sys.modules["xformers.ops.fmha.attn_bias"]
    assert xfa.make_attn_bias(Mask("none"), attn_bias) is None
    assert type(xfa.make_attn_bias(Mask("causal"), attn_bias)) is _FakeLowerTriangularFromBottomRightMask
    local = xfa.make_attn_bias(Mask("window", 7))  # the default finds the (stand-in) package
    assert isinstance(local, _FakeLocal) and local.window == 7
    with pytest.raises(ValueError, match="sinks"):
        xfa.make_attn_bias(Mask("window", 7, sinks=2), attn_bias)
