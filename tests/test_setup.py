"""The setup phase of the contract: per-shape work is timed once (setup_ms), never per call."""

from __future__ import annotations

import os

import pytest
import torch

from ctxbench.core.masks import Mask
from ctxbench.models.attention import make_attention_function
from ctxbench.registry import Impl, all_impls
from references import new_seed, random_qkv
from setup_plugins import FIRST_CALL_SLEEP_S, SETUP_SLEEP_S
from sweep_helpers import HERE, only_run_dir, rows_by_cell, run_cli

PLUGINS = os.path.join(HERE, "setup_plugins.py")


def test_setup_is_timed_once_and_never_in_the_latency(tmp_path, capsys):
    plain = f"{os.path.join(HERE, 'misbehaving.py')}:raises"  # a plain function (it only raises at N=64)
    args = ["sweep", "--device", "cpu", "--lengths", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
            "--impls", "sdpa", "--impl", plain, "--rep-ms", "20", "--ppl-max-len", "0", "--out", str(tmp_path)]
    for name in ("slow_setup", "slow_first_call", "holds_memory", "returns_a_tensor"):
        args += ["--impl", f"{PLUGINS}:{name}"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    # rows carry the spec the sweep was given
    cells = {impl.rsplit(":", 1)[-1]: row for (impl, _), row in rows_by_cell(only_run_dir(str(tmp_path))).items()}

    row = cells["slow_setup"]
    assert row["status"] == "ok", row["message"]
    assert float(row["setup_ms"]) >= SETUP_SLEEP_S * 1e3
    # SDPA at N=32 with 2 heads takes well under a millisecond: 50 ms is 10x below the setup
    assert float(row["latency_ms"]) < SETUP_SLEEP_S * 1e3 / 10, row["latency_ms"]
    assert float(row["first_call_ms"]) < SETUP_SLEEP_S * 1e3 / 10

    first = cells["slow_first_call"]
    assert first["status"] == "ok", first["message"]
    assert float(first["first_call_ms"]) >= FIRST_CALL_SLEEP_S * 1e3
    assert float(first["latency_ms"]) < FIRST_CALL_SLEEP_S * 1e3 / 10
    assert max(map(float, first["latency_samples_ms"].split(";"))) < FIRST_CALL_SLEEP_S * 1e3 / 10
    assert float(first["setup_ms"]) < FIRST_CALL_SLEEP_S * 1e3 / 10

    held = cells["holds_memory"]
    assert held["status"] == "ok", held["message"]
    assert float(held["setup_mem_bytes"]) >= 0.9 * 64 * 2**20  # what setup keeps for the calls
    assert float(held["peak_mem_bytes"]) < 16 * 2**20  # ... is not the call's peak

    assert cells["sdpa"]["status"] == "ok" and float(cells["sdpa"]["setup_ms"]) < 50
    # a plain function has no setup step; its first call is still timed apart
    assert cells["raises"]["status"] == "ok", cells["raises"]["message"]
    assert float(cells["raises"]["setup_ms"]) == 0 and float(cells["raises"]["setup_mem_bytes"]) == 0
    assert float(cells["raises"]["first_call_ms"]) > 0

    bad = cells["returns_a_tensor"]
    assert bad["status"] == "error"
    assert "setup=True" in bad["message"] and "not the function to time" in bad["message"]


@pytest.mark.parametrize("name,mask", [("sdpa", Mask("window", 7)), ("sdpa", Mask("window", 7, 2)),
                                       ("naive", Mask("window", 5, 1)), ("naive", Mask("causal")),
                                       ("chunked", Mask("window", 9, 3)), ("sliding_window", Mask("window", 9, 3))])
def test_masks_are_built_in_setup_not_per_call(name, mask, monkeypatch):
    """After prepare(), a call builds no mask: Mask.visible may not run again."""
    seed = new_seed()
    q, k, v = random_qkv(seed, 1, 2, 2, 600, 600, 16)
    impl = all_impls()[name]
    assert impl.setup
    run = impl.prepare(q, k, v, mask)
    want = run(q, k, v)

    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} built a mask inside the timed call")

    monkeypatch.setattr(Mask, "visible", refuse)
    q2, k2, v2 = random_qkv(seed + 1, 1, 2, 2, 600, 600, 16)
    out = run(q2, k2, v2)  # other values, same shapes: the prepared state must not depend on them
    monkeypatch.undo()
    torch.testing.assert_close(out, impl.call(q2, k2, v2, mask), rtol=0, atol=0)
    assert not torch.equal(out, want)


def test_a_model_prepares_once_per_shape_not_per_layer():
    prepared = []

    def counting(q, k, v, *, causal, window, scale=None):
        prepared.append(tuple(q.shape))
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=True)

    fn = make_attention_function(Impl("counting", counting, setup=True))
    layer = torch.nn.Module()
    for n in (10, 10, 10, 12, 12):  # three layers at N=10, then a longer window's two layers
        q, k = torch.randn(1, 4, n, 8), torch.randn(1, 2, n, 8)
        out, _ = fn(layer, q, k, k.clone(), None, scaling=None)
        assert out.shape == (1, n, 4, 8)
    assert prepared == [(1, 4, 10, 8), (1, 4, 12, 8)]
