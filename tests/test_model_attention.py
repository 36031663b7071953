"""Registered implementations inside transformers models (AttentionInterface): the same
per-token losses as transformers' own eager and sdpa attention, in fp32, within 1e-4 relative."""

from __future__ import annotations

import pytest
import torch

import lm_helpers as H
from references import attention64, random_qkv
from ctxbench.models import lm
from ctxbench.core.masks import Mask
from ctxbench.models.attention import PaddingUnsupported, attention_name, make_attention_function
from ctxbench.core.cell import Cell, Config
from ctxbench.registry import Impl, all_impls

N = 96
WINDOW = 16
RTOL = 1e-4


def builtin_impls() -> dict[str, Impl]:
    """The built-in implementations only: earlier tests in this process register misbehaving
    ones (one allocates until its worker's memory cap, and there is no cap in this process)."""
    return {n: i for n, i in all_impls().items() if i.source.startswith("ctxbench.kernels.")}


def exact_cpu_impls(mask: str) -> list[Impl]:
    """Exact built-in CPU implementations that declare this model's shape (GQA, fp32) and mask, at N."""
    out = []
    for name, impl in sorted(builtin_impls().items()):
        config = Config(batch=1, heads=4, kv_heads=2, head_dim=16, dtype="float32", mask=mask,
                        window=WINDOW if mask == "window" else None, device="cpu")
        cell = Cell.of(config, name, N, "perplexity")  # the cells whose model calls this attention
        if impl.exact and impl.unsupported_reason(cell) is None:
            out.append(impl)
    return out


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, H.VOCAB, (N,), generator=torch.Generator().manual_seed(seed))


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    rel = ((got - want).abs() / want.abs()).max().item()
    assert rel <= RTOL, f"{what}: per-token losses differ by {rel:.2e} relative (tolerance {RTOL:g})"


def test_llama_losses_match_eager_and_sdpa():
    x = ids()
    m = H.model("llama", attn="eager")
    eager = H.token_losses(m, x)
    m.set_attn_implementation("sdpa")
    sdpa = H.token_losses(m, x)
    assert_close(sdpa, eager, "transformers sdpa vs eager")
    impls = exact_cpu_impls("causal")
    assert {"naive", "sdpa", "chunked"} <= {i.name for i in impls}
    for impl in impls:
        m.set_attn_implementation(attention_name(impl))
        got = H.token_losses(m, x)
        assert_close(got, eager, f"{impl.name} vs eager")
        assert_close(got, sdpa, f"{impl.name} vs sdpa")


@pytest.mark.slow
@pytest.mark.ci  # about 12 s; the llama case stays in the default suite
def test_mistral_sliding_window_matches_eager_and_sdpa():
    """Mistral passes its sliding_window to the attention function; ours apply it themselves."""
    x = ids(2)
    m = H.model("mistral", attn="eager", sliding_window=WINDOW)
    eager = H.token_losses(m, x)
    m.set_attn_implementation("sdpa")
    sdpa = H.token_losses(m, x)
    assert_close(sdpa, eager, "transformers sdpa vs eager")
    impls = exact_cpu_impls("window")
    assert {"naive", "sdpa", "chunked", "sliding_window"} <= {i.name for i in impls}
    for impl in impls:
        m.set_attn_implementation(attention_name(impl))
        got = H.token_losses(m, x)
        assert_close(got, eager, f"{impl.name} vs eager")
        assert_close(got, sdpa, f"{impl.name} vs sdpa")
    # The window must matter here, or the comparison above would prove nothing.
    full = H.model("mistral", attn="eager", sliding_window=None)
    assert ((H.token_losses(full, x) - eager).abs() / eager).max() > 1e-2


FAST_WINDOW_IMPLS = ("naive", "chunked")


def test_mistral_own_sliding_window_reaches_the_kernel() -> None:
    """Fast twin of the slow Mistral test: with no window in the registered name, the adapter must
    take each layer's own `sliding_window` kwarg. Sequence N = 96 > WINDOW = 16, compared against
    transformers' own eager and sdpa attention on the same seeded model and tokens."""
    x = ids(5)
    m = H.model("mistral", attn="eager", seed=7, sliding_window=WINDOW)
    eager = H.token_losses(m, x)
    m.set_attn_implementation("sdpa")
    sdpa = H.token_losses(m, x)
    assert_close(sdpa, eager, "transformers sdpa vs eager")
    # The window must matter here, or the comparison below would prove nothing.
    full = H.model("mistral", attn="eager", seed=7, sliding_window=None)
    assert ((H.token_losses(full, x) - eager).abs() / eager).max() > 1e-2
    for name in FAST_WINDOW_IMPLS:
        m.set_attn_implementation(attention_name(builtin_impls()[name]))
        got = H.token_losses(m, x)
        assert_close(got, eager, f"{name} (the layer's sliding_window {WINDOW}) vs eager")
        assert_close(got, sdpa, f"{name} (the layer's sliding_window {WINDOW}) vs sdpa")


@pytest.mark.parametrize("name", FAST_WINDOW_IMPLS)
@pytest.mark.parametrize("n_q", [40, 1])
def test_adapter_applies_the_sliding_window_kwarg(name: str, n_q: int) -> None:
    """The AttentionInterface function called as transformers calls it, with sliding_window=W in
    kwargs (a fake layer module, GQA, 40 keys > W = 6; n_q = 1 is a decode step against a cache):
    the output is the windowed float64 reference (tests/references.py), not the causal one; a
    window in the registered name overrides the layer's."""
    n_k, window, scale = 40, 6, 0.3
    q, k, v = random_qkv(11, 1, 4, 2, n_q, n_k, 8)
    module = torch.nn.Module()
    impl = builtin_impls()[name]
    out, weights = make_attention_function(impl)(module, q, k, v, None, scaling=scale, sliding_window=window)
    assert weights is None and out.shape == (1, n_q, 4, 8)
    want = attention64(q, k, v, window=window, scale=scale)
    err = (out.transpose(1, 2).double() - want).abs().max().item()
    assert err < 1e-5, f"{name}: the layer's sliding_window={window} not applied (max error {err:.2e})"
    causal = attention64(q, k, v, window=n_k, scale=scale)
    assert (causal - want).abs().max() > 0.1, "the window must change the output, or this proves nothing"
    # the registered window wins over the layer's own
    out, _ = make_attention_function(impl, window=3)(module, q, k, v, None, scaling=scale, sliding_window=window)
    err = (out.transpose(1, 2).double() - attention64(q, k, v, window=3, scale=scale)).abs().max().item()
    assert err < 1e-5, f"{name}: the registered window 3 did not override sliding_window={window} ({err:.2e})"


def test_sweep_window_overrides_a_model_without_one():
    """--mask window W runs a Llama (no window of its own) as Mistral with sliding_window=W."""
    x = ids(3)
    llama = H.model("llama")
    mistral = H.model("mistral", sliding_window=WINDOW)
    mistral.load_state_dict(llama.state_dict())
    want = H.token_losses(mistral, x)
    for name in ("sdpa", "sliding_window"):
        llama.set_attn_implementation(attention_name(all_impls()[name], window=WINDOW))
        assert_close(H.token_losses(llama, x), want, f"{name} with window {WINDOW}")


def test_sinks_reach_the_kernel_only_when_positive():
    seen = []

    def plain(q, k, v, *, causal, window, scale=None):  # no sinks parameter: must keep working
        seen.append((causal, window))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                                enable_gqa=True)

    def with_sinks(q, k, v, *, causal, window, scale=None, sinks=0):
        seen.append((causal, window, sinks))
        return all_impls()["naive"].call(q, k, v, Mask.of(causal, window, sinks), scale)

    q, k, v = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    module = torch.nn.Module()
    out, weights = make_attention_function(Impl("plain", plain))(module, q, k, v, None, scaling=0.3)
    assert out.shape == (1, 10, 4, 8) and weights is None
    make_attention_function(Impl("s", with_sinks, sinks=True), window=4, sinks=0)(module, q, k, v, None)
    make_attention_function(Impl("s", with_sinks, sinks=True), window=4, sinks=2)(module, q, k, v, None)
    assert seen == [(True, None), (True, 4, 0), (True, 4, 2)]


def test_a_mask_is_refused_and_a_kv_cache_needs_a_declaration():
    fn = make_attention_function(all_impls()["sdpa"])
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(PaddingUnsupported, match="padding is unsupported"):
        fn(torch.nn.Module(), q, k, v, torch.zeros(1, 1, 6, 6))
    # sdpa declares kv_cache: the last query against the cache is aligned bottom-right
    out, _ = fn(torch.nn.Module(), q[:, :, -1:], k, v, None)
    assert torch.allclose(out.transpose(1, 2), torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, :, -1:],
                          atol=1e-6)
    square_only = make_attention_function(Impl("square", lambda q, k, v, *, causal, window, scale=None: q))
    with pytest.raises(ValueError, match="use_cache=False"):
        square_only(torch.nn.Module(), q[:, :, -1:], k, v, None)


def test_registered_names_avoid_transformers_special_patterns():
    names = {attention_name(Impl(n, all_impls()["sdpa"].fn)) for n in ("flash_attn", "dir/file.py:fn", "a:b")}
    assert len(names) == 3
    for name in names:
        assert "flash" not in name and "/" not in name and name.startswith("ctxbench:")
    impl = all_impls()["sdpa"]
    assert attention_name(impl) == attention_name(impl) == "ctxbench:sdpa"
    assert attention_name(impl, window=8, sinks=2) == "ctxbench:sdpa:w8:s2"


@pytest.mark.parametrize("variant", ["linear:4", "dynamic:2", "yarn:4"])
def test_rope_variant_equals_a_model_built_with_it(variant):
    """set_rope swaps the rotary embedding; the result is the model transformers builds from a
    config with those rope_parameters (at a length past the trained 64 so dynamic acts)."""
    x = torch.randint(0, H.VOCAB, (80,), generator=torch.Generator().manual_seed(4))
    m = H.model("llama", max_position_embeddings=64)
    base = H.token_losses(m, x)
    lm.set_rope(m, variant)
    got = H.token_losses(m, x)
    cfg = H.config("llama", max_position_embeddings=64)
    cfg.rope_parameters = lm.rope_parameters(cfg, variant)
    cfg._attn_implementation = "eager"
    want_model = type(m)(cfg).eval()
    want_model.load_state_dict(m.state_dict())
    assert_close(got, H.token_losses(want_model, x), variant)
    assert (got - base).abs().max() > 1e-3, "the variant changed nothing"
    lm.set_rope(m, "default")
    assert_close(H.token_losses(m, x), base, "back to default")


def test_rope_variants_parse():
    assert lm.parse_rope("YaRN:4.0") == "yarn:4"
    assert lm.parse_rope(" default ") == "default"
    for bad in ("ntk:4", "linear", "linear:0.5", "yarn:x", "linear:nan"):
        with pytest.raises(lm.ModelError, match="unknown --rope variant"):
            lm.parse_rope(bad)
    cfg = H.config("llama")
    assert lm.rope_parameters(cfg, "yarn:4")["original_max_position_embeddings"] == 512
