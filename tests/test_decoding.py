"""Decode cells (ctxbench.measurements.decode.measure): a real model prefills and generates through an
implementation with a KV cache; the tokens, the cache bytes and the columns are checked against
transformers' own attention and a hand count."""

from __future__ import annotations

import csv
import os
from types import SimpleNamespace

import pytest
import torch

import lm_helpers as H
from ctxbench import registry
from ctxbench.measurements.decode.measure import greedy, measure_decode
from ctxbench.models.kv_cache import cache_bytes
from ctxbench.models.attention import attention_name
from ctxbench.core.cell import Cell, Config
from sweep_helpers import only_run_dir, run_cli, usage_error


def decode_cell(impl: str, n: int, **config) -> Cell:
    """A decode cell of `impl` at n tokens (the kind has no fields of its own)."""
    return Cell.of(Config(**config), impl, n, "decode")


def settings(model: str, tokens: int = 6) -> SimpleNamespace:
    return SimpleNamespace(model=model, text="", decode_tokens=tokens, seed=0)


def test_greedy_with_the_cache_equals_greedy_without_it():
    """The decode loop itself: the tokens a cache gives are those of full forward passes."""
    m = H.model(attn="sdpa", seed=3)
    ids = torch.randint(0, H.VOCAB, (40,), generator=torch.Generator().manual_seed(7))
    tokens, prefill_ms, step_ms, cache = greedy(m, ids, 5, "cpu")
    seq = ids.clone()
    want = []
    with torch.no_grad():
        for _ in range(5):
            nxt = int(m(input_ids=seq.unsqueeze(0), use_cache=False).logits[0, -1].argmax())
            want.append(nxt)
            seq = torch.cat([seq, torch.tensor([nxt])])
    assert tokens == want and len(step_ms) == 4 and prefill_ms > 0
    # 2 layers x (K and V) x 2 kv heads x head_dim 16 x 4 bytes, for 40 + 4 tokens
    assert cache_bytes(cache) == 2 * 2 * 2 * 16 * 4 * 44


@pytest.mark.parametrize("name", ["sdpa", "chunked", "naive"])
def test_exact_implementations_decode_the_same_tokens(name, tiny_checkpoint):
    impl = registry.get(name)
    cell = decode_cell(name, 200, heads=4, kv_heads=2, head_dim=16)
    row = measure_decode(impl, cell, settings(tiny_checkpoint))
    assert row["status"] == "ok", row["message"]
    assert row["tokens_match"] == row["decode_tokens"] == 6
    assert row["kv_cache_bytes"] == 2 * 2 * 2 * 16 * 4 * (200 + 5)
    assert row["ms_per_token"] > 0 and row["prefill_ms"] > 0 and row["n_tokens"] == 200


def test_a_wrong_decoder_is_caught(tiny_checkpoint):
    """An implementation that ignores the cache's offset (top-left causal) reproduces the
    prefill but not the decode steps: its tokens differ, and an exact one is then wrong."""
    def top_left(q, k, v, *, causal, window, scale=None):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                                enable_gqa=q.shape[1] != k.shape[1])

    impl = registry.Impl("top_left_test", top_left, kv_cache=True)
    row = measure_decode(impl, decode_cell("top_left_test", 120), settings(tiny_checkpoint, tokens=8))
    assert row["status"] == "wrong" and row["tokens_match"] < 8
    assert "differ from transformers' sdpa" in row["message"]


def test_decode_cells_need_a_kv_cache_declaration():
    impl = registry.Impl("square_test", lambda q, k, v, *, causal, window, scale=None: q)
    assert "kv_cache=True" in impl.unsupported_reason(decode_cell("square_test", 64))


def test_decode_sweep_writes_the_columns(tmp_path, capsys, tiny_checkpoint):
    code, out, err = run_cli(["sweep", "--device", "cpu", "--impls", "sdpa", "--lengths", "64,128", "--rep-ms", "5",
                              "--heads", "2", "--head-dim", "16", "--ppl-max-len", "0", "--decode-max-len", "64",
                              "--decode-tokens", "3", "--model", tiny_checkpoint, "--out", str(tmp_path)], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(os.path.join(only_run_dir(str(tmp_path)), "results.csv"))))
    decode = [r for r in rows if r["kind"] == "decode"]
    assert [(r["impl"], r["n"]) for r in decode] == [("sdpa", "64")]  # only up to --decode-max-len
    assert decode[0]["status"] == "ok" and decode[0]["tokens_match"] == "3"
    assert "3/3 tokens" in out  # the terminal decode table
    # the model was registered under ctxbench's name, so a later cell gets ctxbench's attention again
    assert attention_name(registry.get("sdpa")).startswith("ctxbench:")


def test_decode_max_len_refuses_implementations_without_a_cache(tmp_path, capsys, tiny_checkpoint):
    usage_error(["sweep", "--device", "cpu", "--impls", "sdpa", "--lengths", "64", "--decode-max-len", "64",
                 "--decode-tokens", "1", "--model", tiny_checkpoint, "--out", str(tmp_path)], capsys,
                "--decode-tokens must be at least 2")
