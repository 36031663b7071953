"""ctxbench.core.registry on its own: what @register declares and the reason a cell is refused for
each capability, prepare() (the setup step, the keywords of the contract, the mask's offset),
--impl specs (file.py:function and module:function, and their one-line errors), the built-ins
discovered from the kernels/ folder, and the public module ctxbench.registry."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from ctxbench.core import registry
from ctxbench.core.cell import Cell, Config
from ctxbench.core.kv_layout import KVLayout
from ctxbench.core.masks import Mask
from ctxbench.core.registry import Impl, RegistryError, load_spec, register
from references import random_qkv

SEED = 1234


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Implementations registered by a test are forgotten after it (the built-ins are loaded first,
    so that they stay registered)."""
    registry.all_impls()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))


def attention(q, k, v, *, causal, window, scale=None):
    """Plain attention for the tests (bottom-right aligned causal, no window)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:
        hidden = torch.ones(n_q, n_k, dtype=torch.bool).triu(n_k - n_q + 1)
        s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def declared(name: str, **capabilities) -> Impl:
    """The Impl that @register(name, **capabilities) declares for `attention`."""
    fn = register(name, **capabilities)(lambda q, k, v, **kw: attention(q, k, v, **kw))
    return fn.__ctxbench_impl__


def kernel_cell(n: int = 64, **config) -> Cell:
    fields = {k: config.pop(k) for k in ("query_len", "ragged", "kv_lens") if k in config}
    return Cell.of(Config(**config), "x", n, "kernel", **fields)


# ---------------------------------------------------------------- @register

def test_register_keeps_the_function_and_records_the_declaration():
    def mine(q, k, v, *, causal, window, scale=None):
        """My attention.

        More text."""
        return attention(q, k, v, causal=causal, window=window, scale=scale)

    assert register("unit_mine", devices=["cpu"], masks=["causal"], paged=True)(mine) is mine
    impl = registry.get("unit_mine")
    assert impl is mine.__ctxbench_impl__ and impl.fn is mine
    assert (impl.devices, impl.masks, impl.dtypes) == (frozenset({"cpu"}), frozenset({"causal"}),
                                                      frozenset(registry.DTYPES))
    assert impl.paged and impl.ragged  # paged implies ragged
    assert impl.description == "My attention."
    assert impl.source == f"{__name__}:test_register_keeps_the_function_and_records_the_declaration.<locals>.mine"
    assert "unit_mine" in registry.all_impls()


@pytest.mark.parametrize("capability, value", [("devices", ["tpu"]), ("dtypes", ["float64"]),
                                               ("masks", ["alibi"]), ("modes", ["train"])])
def test_register_refuses_unknown_capabilities(capability, value):
    with pytest.raises(RegistryError, match=rf"register\('bad'\): unknown {capability} \['{value[0]}'\]"):
        register("bad", **{capability: value})


REFUSED = [
    ({"devices": ["cuda"]}, {}, "x does not run on cpu (declares cuda)"),
    ({"dtypes": ["float16", "bfloat16"]}, {}, "x does not support float32 (declares bfloat16, float16)"),
    ({"masks": ["none", "causal"]}, {"mask": "window", "window": 8},
     "x does not support mask=window (declares causal, none)"),
    ({"modes": ["fwd"]}, {"mode": "bwd"}, "x does not support mode=bwd (declares fwd)"),
    ({"gqa": False}, {"heads": 4, "kv_heads": 2},
     "x does not support grouped-query attention (heads 4 != kv-heads 2)"),
    ({}, {"mask": "window", "window": 8, "sinks": 2}, "x does not support attention sinks (sinks=2)"),
    ({}, {"batch": 2, "ragged": True}, "x does not support ragged batches (it does not declare ragged=True)"),
    ({}, {"batch": 2, "kv_lens": "10,64"}, "x does not support ragged batches (it does not declare ragged=True)"),
    ({"kv_cache": True, "max_query_len": 16}, {"query_len": 32},
     "x takes at most 16 query tokens (got 32; it is a decode kernel)"),
    ({"kv_cache": True, "max_query_len": 16}, {},
     "x takes at most 16 query tokens (got 64; it is a decode kernel)"),
    ({}, {"query_len": 4}, "x does not support fewer queries than keys (4 queries against 64 keys; it does not "
                           "declare kv_cache=True)"),
]


@pytest.mark.parametrize("capabilities, config, reason", REFUSED, ids=[r[2][2:40] for r in REFUSED])
def test_declared_reason_names_the_missing_capability(capabilities, config, reason):
    impl = declared("x", **capabilities)
    cell = kernel_cell(**config)
    assert impl.declared_reason(cell) == reason
    assert impl.unsupported_reason(cell) == reason
    # and an implementation that declares everything takes the cell
    everything = declared("all", sinks=True, ragged=True, kv_cache=True)
    assert everything.declared_reason(cell) is None


def test_a_decode_cell_needs_kv_cache():
    cell = Cell.of(Config(), "x", 64, "decode")
    assert cell.needs_kv_cache and cell.q_len == 64
    assert declared("x").declared_reason(cell) == \
        "x cannot decode with a KV cache (it does not declare kv_cache=True)"
    assert declared("x", kv_cache=True).declared_reason(cell) is None


def test_sinks_count_only_beside_a_window_and_the_first_refusal_wins():
    impl = declared("x")  # sinks=False
    assert impl.declared_reason(kernel_cell(mask="causal", sinks=2)) is None  # a causal mask has no sinks
    strict = declared("x", devices=["cuda"], dtypes=["float16"], modes=["fwd"])
    assert strict.declared_reason(kernel_cell(mode="bwd")).startswith("x does not run on cpu")


def test_a_declared_decode_kernel_takes_queries_up_to_its_limit():
    impl = declared("x", kv_cache=True, max_query_len=16)
    assert impl.declared_reason(kernel_cell(query_len=16)) is None
    assert impl.declared_reason(kernel_cell(n=16)) is None  # a 16-token square is 16 queries too


def test_unsupported_reason_asks_the_run_time_check_after_the_declaration():
    asked = []

    def check(cell):
        asked.append(cell.n)
        return "too long for this one" if cell.n > 100 else None

    impl = declared("x", devices=["cpu"], check=check)
    assert impl.unsupported_reason(kernel_cell(n=64)) is None
    assert impl.unsupported_reason(kernel_cell(n=128)) == "too long for this one"
    assert impl.declared_reason(kernel_cell(n=128)) is None  # the check is not a declaration
    assert impl.unsupported_reason(kernel_cell(n=128, device="cuda")) == "x does not run on cuda (declares cpu)"
    assert asked == [64, 128]  # a declared refusal does not ask the check


def test_in_default_sweep():
    assert declared("x").in_default_sweep("cpu")
    assert not declared("x", devices=["cuda"]).in_default_sweep("cpu")
    only_cuda = declared("x", default_devices=["cuda"])
    assert not only_cuda.in_default_sweep("cpu") and only_cuda.in_default_sweep("cuda")


# ---------------------------------------------------------------- prepare and call

def inputs(n_q: int, n_k: int, heads: int = 2, kv_heads: int = 2, d: int = 8, seed: int = SEED):
    return random_qkv(seed, 1, heads, kv_heads, n_q, n_k, d)


def test_prepare_of_a_setup_implementation_returns_its_runner():
    seen = []

    def runner(q, k, v):
        return attention(q, k, v, causal=True, window=None)

    @register("unit_setup", setup=True)
    def setup(q, k, v, *, causal, window, scale, **extra):
        seen.append({"shapes": (tuple(q.shape), tuple(k.shape)), "causal": causal, "window": window,
                     "scale": scale, **extra})
        return runner

    impl = registry.get("unit_setup")
    q, k, v = inputs(4, 16)
    assert impl.prepare(q, k, v, Mask("causal", q_offset=12)) is runner
    assert seen == [{"shapes": ((1, 2, 4, 8), (1, 2, 16, 8)), "causal": True, "window": None, "scale": None}]
    # sinks go to the implementation only when there are some; the scale as given
    impl.prepare(q, k, v, Mask("window", 5, 2, q_offset=12), scale=0.5)
    assert seen[-1] == {"shapes": ((1, 2, 4, 8), (1, 2, 16, 8)), "causal": True, "window": 5, "scale": 0.5,
                        "sinks": 2}
    impl.prepare(q, k, v, Mask("window", 5, 0, q_offset=12))
    assert "sinks" not in seen[-1]
    impl.prepare(q, k, v, Mask("none", q_offset=12))
    assert (seen[-1]["causal"], seen[-1]["window"]) == (False, None)
    # call(): the setup, then the runner, which gives bottom-right causal attention
    out = impl.call(q, k, v, Mask("causal", q_offset=12))
    want = attention(q.double(), k.double(), v.double(), causal=True, window=None)
    assert float((out.double() - want).norm() / want.norm()) < 1e-6


def test_prepare_of_a_plain_function_binds_the_contracts_keywords():
    calls = []

    def plain(q, k, v, *, causal, window, scale=None):
        calls.append((causal, window, scale))
        return attention(q, k, v, causal=causal, window=window, scale=scale)

    impl = Impl("plain", plain)
    q, k, v = inputs(8, 8)
    run = impl.prepare(q, k, v, Mask("causal"), scale=0.25)
    assert calls == []  # nothing runs before the timed call
    out = run(q, k, v)
    assert calls == [(True, None, 0.25)]
    torch.testing.assert_close(out, attention(q, k, v, causal=True, window=None, scale=0.25), rtol=0, atol=0)


def test_prepare_refuses_a_mask_offset_that_does_not_match_the_shapes():
    impl = declared("x", kv_cache=True)
    q, k, v = inputs(4, 16)
    with pytest.raises(ValueError, match="does not match 4 queries against 16 keys") as exc:
        impl.prepare(q, k, v, Mask("causal"))
    assert "q_offset must be Lk - Lq" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="does not match 4 queries against 16 keys"):
        impl.prepare(q, k, v, Mask("causal", q_offset=11))
    # a ragged batch's offset is against its longest sequence, not the padded K
    layout = KVLayout((10, 14), torch.tensor([10, 14], dtype=torch.int32))
    with pytest.raises(ValueError, match="does not match 4 queries against 14 keys"):
        impl.prepare(q, k, v, Mask("causal", q_offset=12), layout=layout)


def test_prepare_passes_kv_lens_to_a_ragged_implementation_only():
    seen = []

    @register("unit_ragged", ragged=True)
    def ragged(q, k, v, *, causal, window, scale=None, kv_lens=None):
        seen.append(kv_lens)
        return q

    layout = KVLayout((10, 14), torch.tensor([10, 14], dtype=torch.int32))
    q, k, v = inputs(4, 16)
    registry.get("unit_ragged").prepare(q, k, v, Mask("causal", q_offset=10), layout=layout)(q, k, v)
    assert seen[0].tolist() == [10, 14]
    plain_calls = []
    Impl("plain", lambda q, k, v, **kw: plain_calls.append(kw)).prepare(
        q, k, v, Mask("causal", q_offset=10), layout=layout)(q, k, v)
    assert plain_calls == [{"scale": None, "causal": True, "window": None}]


def test_a_setup_step_that_returns_no_function_is_a_type_error():
    register("unit_bad_setup", setup=True)(lambda q, k, v, **kw: q)
    q, k, v = inputs(4, 4)
    with pytest.raises(TypeError, match="unit_bad_setup declares setup=True but its setup step returned Tensor"):
        registry.get("unit_bad_setup").prepare(q, k, v, Mask("causal"))


# ---------------------------------------------------------------- --impl specs

PLAIN = '''
def attn(q, k, v, *, causal, window, scale=None):
    """A user's plain attention."""
    return q

def with_sinks(q, k, v, *, causal, window, scale=None, sinks=0):
    return q

def with_kwargs(q, k, v, **kwargs):
    return q

class holder:
    @staticmethod
    def attn(q, k, v, *, causal, window, scale=None):
        return q

NOT_CALLABLE = 3
'''

DECORATED = '''
from ctxbench.registry import register

@register("unit_user_declared", devices=["cpu"], kv_cache=True)
def attn(q, k, v, *, causal, window, scale=None):
    return q
'''


@pytest.fixture
def user_files(tmp_path):
    (tmp_path / "unit_plain_attn.py").write_text(PLAIN)
    (tmp_path / "unit_declared_attn.py").write_text(DECORATED)
    (tmp_path / "unit_broken_attn.py").write_text("def attn(q, k, v:\n")
    return tmp_path


def test_load_spec_of_a_file_function(user_files):
    spec = f"{user_files / 'unit_plain_attn.py'}:attn"
    impl = load_spec(spec)
    assert impl.name == spec and impl.source == spec and impl.description == "A user's plain attention."
    # default capabilities: everything but what a function has to declare
    assert impl.devices == frozenset(registry.DEVICES) and impl.masks == frozenset(registry.MASKS)
    assert not (impl.sinks or impl.kv_cache or impl.ragged or impl.setup or impl.distributed)
    assert spec not in registry.all_impls()  # kept apart from the registry
    # a colon makes resolve() read a spec (the file is imported again: a fresh function)
    assert registry.resolve(spec).name == spec and registry.resolve(spec).fn.__qualname__ == "attn"
    assert load_spec(f"{user_files / 'unit_plain_attn.py'}:with_sinks").sinks
    assert load_spec(f"{user_files / 'unit_plain_attn.py'}:with_kwargs").sinks
    assert load_spec(f"{user_files / 'unit_plain_attn.py'}:holder.attn").name.endswith(":holder.attn")


def test_load_spec_of_a_module_function(user_files, monkeypatch):
    monkeypatch.syspath_prepend(str(user_files))
    impl = load_spec("unit_plain_attn:attn")
    assert impl.name == "unit_plain_attn:attn" and impl.fn is sys.modules["unit_plain_attn"].attn


def test_load_spec_of_a_decorated_function_keeps_its_declaration(user_files):
    impl = load_spec(f"{user_files / 'unit_declared_attn.py'}:attn")
    assert impl.name == "unit_user_declared" and impl.kv_cache and impl.devices == frozenset({"cpu"})
    assert registry.get("unit_user_declared") is impl


@pytest.mark.parametrize("spec, fragment", [
    ("not-a-spec", "--impl 'not-a-spec' is not of the form package.module:function"),
    ("a:b:c", "is not of the form package.module:function"),
    (":attn", "is not of the form package.module:function"),
    ("unit_plain_attn:", "is not of the form package.module:function"),
    ("{dir}/missing.py:attn", "no file {dir}/missing.py"),
    ("no_such_module_xyz:attn", "cannot import no_such_module_xyz (ModuleNotFoundError: No module named "
                                "'no_such_module_xyz')"),
    ("{dir}/unit_broken_attn.py:attn", "cannot import {dir}/unit_broken_attn.py (SyntaxError"),
    ("{dir}/unit_plain_attn.py:nosuch", "unit_plain_attn.py has no attribute 'nosuch'"),
    ("{dir}/unit_plain_attn.py:holder.nosuch", "has no attribute 'holder.nosuch'"),
    ("{dir}/unit_plain_attn.py:NOT_CALLABLE", "NOT_CALLABLE is not callable"),
])
def test_load_spec_errors_are_one_line(user_files, spec, fragment):
    spec, fragment = spec.format(dir=user_files), fragment.format(dir=user_files)
    with pytest.raises(RegistryError) as exc:
        load_spec(spec)
    message = str(exc.value)
    assert fragment in message and "\n" not in message, message


def test_get_of_an_unknown_name_lists_the_known_ones():
    with pytest.raises(RegistryError) as exc:
        registry.get("nosuch")
    message = str(exc.value)
    assert message.startswith("unknown implementation 'nosuch'; known: ")
    assert "naive, " in message and "sdpa" in message and "--impl package.module:function" in message


# ---------------------------------------------------------------- built-ins

def test_load_builtins_imports_every_module_of_the_kernels_folder():
    import ctxbench.kernels

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(ctxbench.__file__))), "kernels")
    if not os.path.isdir(folder):
        folder = os.path.join(os.path.dirname(os.path.abspath(ctxbench.__file__)), "kernels")  # a wheel's layout
    assert [os.path.abspath(p) for p in ctxbench.kernels.__path__] == [folder]
    files = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
    assert {"naive", "sdpa", "chunked"} <= set(files)
    registry.load_builtins()
    loaded = sorted(m.rsplit(".", 1)[1] for m in sys.modules if m.startswith("ctxbench.kernels.")
                    and not m.rsplit(".", 1)[1].startswith("_"))
    assert loaded == files
    # every built-in implementation comes from one of those modules
    builtins = [impl for impl in registry.all_impls().values() if impl.source.startswith("ctxbench.kernels.")]
    assert {impl.source.split(":")[0].rsplit(".", 1)[1] for impl in builtins} <= set(files)
    assert {"naive", "sdpa", "chunked", "ring"} <= {impl.name for impl in builtins}


def test_the_public_registry_module():
    from ctxbench.registry import Impl as PublicImpl
    from ctxbench.registry import Unsupported, register as public_register

    import ctxbench.registry as public

    assert public_register is register and PublicImpl is Impl and Unsupported is registry.Unsupported
    for name in public.__all__:
        assert getattr(public, name) is getattr(registry, name), name

    @public_register("unit_public", masks=["causal"])
    def mine(q, k, v, *, causal, window, scale=None):
        return q

    assert registry.get("unit_public").fn is mine and public.get("unit_public").masks == frozenset({"causal"})
