"""ctxbench.measurements.kernel.measure on its own: the inputs a cell is measured on, the latency
quantiles and repeat count, the throughput numbers of a known cell, and measure_cell on tiny cells
against the float64 reference of tests/references.py. (verdict's rules: tests/test_verdict.py.)"""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import torch

from ctxbench.core import kinds, registry
from ctxbench.core.cell import Cell, Config, Settings
from ctxbench.core.registry import Impl
from ctxbench.measurements.kernel.measure import make_inputs, measure_cell, quantiles, repeats, throughput, verdict
from references import attention64

FAST = Settings(warmup_ms=0.5, rep_ms=2.0, min_repeats=3, max_repeats=6, seed=29)


@pytest.fixture(scope="module", autouse=True)
def quick_gc():
    """measure_cell collects garbage several times per cell; with torch's modules frozen out of the
    collector's way each collection takes microseconds instead of a third of a second."""
    registry.all_impls()
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def kernel(config: Config, n: int, impl: str = "sdpa", **fields) -> Cell:
    return Cell.of(config, impl, n, "kernel", **fields)


def rel_l2(got, want) -> float:
    return float((got.double() - want).norm() / want.norm())


# ---------------------------------------------------------------- make_inputs

def test_inputs_are_fresh_seeded_draws_of_the_cells_shape():
    cell = kernel(Config(batch=2, heads=4, kv_heads=2, head_dim=16), 48)
    q, k, v, dout = make_inputs(cell, 3, False)
    assert q.shape == dout.shape == (2, 4, 48, 16) and k.shape == v.shape == (2, 2, 48, 16)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (q, k, v, dout))
    for t in (q, k, v, dout):  # standard normal draws, not zeros or copies
        assert abs(float(t.mean())) < 0.1 and 0.9 < float(t.std()) < 1.1
    assert not torch.equal(k, v) and not torch.equal(q[:, :2], k)
    decode = kernel(Config(heads=4, kv_heads=2, head_dim=16), 48, query_len=3)
    q, k, v, dout = make_inputs(decode, 3, False)
    assert q.shape == dout.shape == (1, 4, 3, 16) and k.shape == (1, 2, 48, 16)


def test_inputs_are_the_same_per_seed_and_length_and_differ_otherwise():
    config = Config(heads=2, kv_heads=1, head_dim=8)
    a = make_inputs(kernel(config, 40, "sdpa"), 5, False)
    same = make_inputs(kernel(config, 40, "naive"), 5, False)  # another implementation, the same inputs
    assert all(torch.equal(x, y) for x, y in zip(a, same))
    other_seed = make_inputs(kernel(config, 40), 6, False)
    assert not any(torch.equal(x, y) for x, y in zip(a, other_seed))
    # another length, another draw: not the same stream cut longer (its first query row differs too)
    other_n = make_inputs(kernel(config, 41), 5, False)
    assert not torch.equal(a[0][0, 0, 0], other_n[0][0, 0, 0])
    assert not torch.equal(a[1][0, 0, :40], other_n[1][0, 0, :40])
    # seeds drawn at random: each pair of seeds gives different inputs, each seed the same twice
    rng = random.Random(99)
    seeds = rng.sample(range(10**6), 4)
    draws = [make_inputs(kernel(config, 16), s, False)[0] for s in seeds]
    assert all(not torch.equal(x, y) for i, x in enumerate(draws) for y in draws[i + 1:])
    assert torch.equal(draws[0], make_inputs(kernel(config, 16), seeds[0], False)[0])


def test_inputs_in_half_precision_are_the_float32_draws_rounded():
    fp32 = make_inputs(kernel(Config(heads=2, kv_heads=2, head_dim=8), 32), 1, False)
    fp16 = make_inputs(kernel(Config(heads=2, kv_heads=2, head_dim=8, dtype="float16"), 32), 1, False)
    bf16 = make_inputs(kernel(Config(heads=2, kv_heads=2, head_dim=8, dtype="bfloat16"), 32), 1, False)
    for x, h, b in zip(fp32, fp16, bf16):
        assert h.dtype == torch.float16 and torch.equal(h, x.half())
        assert b.dtype == torch.bfloat16 and torch.equal(b, x.bfloat16())


def test_inputs_for_a_backward_cell_need_gradients_and_dout_does_not():
    q, k, v, dout = make_inputs(kernel(Config(heads=2, kv_heads=2, head_dim=8, mode="bwd"), 16), 0, True)
    assert q.requires_grad and k.requires_grad and v.requires_grad and q.is_leaf
    assert not dout.requires_grad


# ---------------------------------------------------------------- quantiles and repeats

def test_quantiles_of_known_samples():
    row = quantiles([5.0, 1.0, 4.0, 2.0, 3.0])
    # linear interpolation between order statistics: p20 at 0.8 of the way from 1 to 2
    assert row == {"latency_ms": 3.0, "latency_p20_ms": pytest.approx(1.8), "latency_p80_ms": pytest.approx(4.2),
                   "latency_min_ms": 1.0, "repeats": 5, "latency_samples_ms": "5;1;4;2;3"}
    assert quantiles([2.5])["latency_ms"] == quantiles([2.5])["latency_p80_ms"] == 2.5
    assert quantiles([1.23456789, 10.0])["latency_samples_ms"] == "1.23457;10"
    assert quantiles([1.0, 2.0])["latency_ms"] == 1.5


def test_quantiles_against_numpy():
    rng = np.random.default_rng(20240612)
    for size in (3, 10, 57):
        samples = list(rng.lognormal(0.0, 0.5, size))
        row = quantiles(samples)
        assert row["latency_ms"] == pytest.approx(float(np.median(samples)), rel=1e-12)
        assert row["latency_p20_ms"] == pytest.approx(float(np.percentile(samples, 20)), rel=1e-12)
        assert row["latency_p80_ms"] == pytest.approx(float(np.percentile(samples, 80)), rel=1e-12)
        assert row["latency_min_ms"] == min(samples) and row["repeats"] == size
        assert [float(x) for x in row["latency_samples_ms"].split(";")] == pytest.approx(samples, rel=1e-5)


@pytest.mark.parametrize("estimate_ms, rep_ms, want", [
    (1000.0, 1000.0, 3),    # one call fills the budget: the minimum
    (30.0, 1000.0, 34),     # ceil(33.3)
    (10.0, 1000.0, 100),
    (7.0, 1000.0, 100),     # 143 capped at the maximum
    (0.0, 1000.0, 100),     # no estimate: as if 1 us
    (1e6, 1000.0, 3),
    (3.0, 50.0, 17),        # ceil(16.7)
])
def test_repeats_fill_the_budget_within_the_bounds(estimate_ms, rep_ms, want):
    assert repeats(estimate_ms, Settings(rep_ms=rep_ms, min_repeats=3, max_repeats=100)) == want


def test_repeats_bounds_hold_for_any_estimate():
    rng = random.Random(4)
    for _ in range(500):
        s = Settings(rep_ms=rng.uniform(1, 2000), min_repeats=rng.randint(1, 10), max_repeats=rng.randint(10, 200))
        estimate = rng.choice([0.0, rng.uniform(1e-4, 1e4)])
        got = repeats(estimate, s)
        assert s.min_repeats <= got <= s.max_repeats
        if s.min_repeats < got < s.max_repeats:
            assert (got - 1) * max(estimate, 1e-3) < s.rep_ms <= got * max(estimate, 1e-3) * (1 + 1e-12)


# ---------------------------------------------------------------- throughput

def test_throughput_of_a_causal_square():
    cell = kernel(Config(batch=2, heads=4, kv_heads=2, head_dim=32), 100)
    row = throughput(cell, 2.0, Settings())
    flops = 4 * 2 * 4 * 32 * 100 * 101 / 2
    # Q and O at 4 heads, K and V at 2 heads, every key seen, 4 bytes each, both sequences
    moved = 2 * (2 * 4 * 100 * 32 + 2 * 2 * 100 * 32) * 4
    assert row["flops"] == flops and row["tflops"] == pytest.approx(flops / 2e-3 / 1e12, rel=1e-12)
    assert row["bytes_moved"] == moved and row["gbps"] == pytest.approx(moved / 2e-3 / 1e9, rel=1e-12)
    assert "bw_fraction" not in row and "peak_fraction" not in row  # no bandwidth known; no GPU
    assert (row["device_bw_gbps"], row["device_bw_probe_gbps"], row["device_bw_source"]) == (None, None, None)
    known = throughput(cell, 2.0, Settings(bandwidth_gbps=40.0, bandwidth_probe_gbps=38.0, bandwidth_source="probe"))
    assert known["bw_fraction"] == pytest.approx(moved / 2e-3 / 1e9 / 40.0, rel=1e-12)
    assert (known["device_bw_gbps"], known["device_bw_probe_gbps"], known["device_bw_source"]) == (40.0, 38.0, "probe")


def test_throughput_counts_visible_pairs_of_other_masks_and_modes():
    n, w, heads, d = 50, 8, 2, 16
    window = kernel(Config(heads=heads, kv_heads=heads, head_dim=d, mask="window", window=w), n)
    assert throughput(window, 1.0, Settings())["flops"] == 4 * heads * d * sum(min(i + 1, w) for i in range(n))
    sinks = kernel(Config(heads=heads, kv_heads=heads, head_dim=d, mask="window", window=w, sinks=3), n)
    pairs = sum(min(i + 1, w) + min(3, max(0, i + 1 - w)) for i in range(n))
    assert throughput(sinks, 1.0, Settings())["flops"] == 4 * heads * d * pairs
    none = kernel(Config(heads=heads, kv_heads=heads, head_dim=d, mask="none"), n)
    assert throughput(none, 1.0, Settings())["flops"] == 4 * heads * d * n * n
    backward = kernel(Config(heads=heads, kv_heads=heads, head_dim=d, mode="bwd"), n)
    row = throughput(backward, 1.0, Settings())
    assert row["flops"] == 2.5 * 4 * heads * d * n * (n + 1) / 2
    assert "bytes_moved" not in row and "gbps" not in row  # no minimum traffic for a backward


def test_throughput_of_a_ragged_decode_batch_counts_each_sequences_keys():
    cell = kernel(Config(batch=2, heads=4, kv_heads=1, head_dim=8), 100, query_len=4, kv_lens="60,100")
    row = throughput(cell, 0.5, Settings(), lengths=[60, 100])
    # 4 queries at the end of each sequence: positions 56..59 and 96..99
    pairs = sum(range(57, 61)) + sum(range(97, 101))
    assert row["flops"] == 4 * 4 * 8 * pairs
    assert row["bytes_moved"] == 4 * sum(2 * 4 * 4 * 8 + 2 * 1 * n * 8 for n in (60, 100))


# ---------------------------------------------------------------- measure_cell

def check_row(row: dict, cell: Cell, s: Settings) -> None:
    """What every measured row holds, whatever the cell."""
    assert set(row) - {"status", "message"} <= set(kinds.get("kernel").columns)
    assert row["repeats"] == len(row["latency_samples_ms"].split(";"))
    assert s.min_repeats <= row["repeats"] <= s.max_repeats
    assert row["latency_min_ms"] <= row["latency_p20_ms"] <= row["latency_ms"] <= row["latency_p80_ms"]
    assert row["timing_method"] == "perf_counter" and row["first_call_ms"] > 0
    assert row["err_rows"] == min(cell.q_len, s.check_rows)
    assert row["tflops"] == pytest.approx(row["flops"] / (row["latency_ms"] * 1e-3) / 1e12, rel=1e-9)


def test_measure_cell_of_sdpa_against_a_float64_reference():
    cell = kernel(Config(heads=4, kv_heads=2, head_dim=16), 40)
    row = measure_cell(registry.get("sdpa"), cell, FAST)
    check_row(row, cell, FAST)
    assert (row["status"], row["message"]) == ("ok", "")
    assert row["err_rel_l2"] < 1e-5 and row["err_max_abs"] < 1e-5 and row["err_tolerance"] == 1e-4
    assert row["flops"] == 4 * 4 * 16 * 40 * 41 / 2
    assert row["setup_ms"] > 0  # sdpa declares a setup step
    # the error is the output's against the float64 attention of the very inputs measured
    q, k, v, _ = make_inputs(cell, FAST.seed, False)
    out = registry.get("sdpa").call(q, k, v, cell.attention_mask)
    assert rel_l2(out, attention64(q, k, v)) == pytest.approx(row["err_rel_l2"], rel=1e-6, abs=1e-12)


def test_measure_cell_of_a_decode_window_with_sinks():
    cell = kernel(Config(heads=4, kv_heads=1, head_dim=8, mask="window", window=9, sinks=2), 64, query_len=5)
    row = measure_cell(registry.get("naive"), cell, FAST)
    check_row(row, cell, FAST)
    assert row["status"] == "ok" and row["err_rel_l2"] < 1e-5
    q, k, v, _ = make_inputs(cell, FAST.seed, False)
    out = registry.get("naive").call(q, k, v, cell.attention_mask)
    assert rel_l2(out, attention64(q, k, v, window=9, sinks=2, q_offset=59)) == \
        pytest.approx(row["err_rel_l2"], rel=1e-6, abs=1e-12)


def test_measure_cell_of_a_backward_checks_gradients():
    cell = kernel(Config(heads=2, kv_heads=2, head_dim=8, mode="fwd+bwd"), 24)
    row = measure_cell(registry.get("sdpa"), cell, FAST)
    check_row(row, cell, FAST)
    assert row["status"] == "ok" and row["err_rel_l2"] < 1e-5 and row["grad_err_rel_l2"] < 1e-5
    assert row["flops"] == 3.5 * 4 * 2 * 8 * 24 * 25 / 2 and "bytes_moved" not in row


def test_measure_cell_of_a_plain_function_that_is_one_percent_off():
    def off(q, k, v, *, causal, window, scale=None):
        return attention64(q, k, v, causal=causal).float() * 1.01

    cell = kernel(Config(heads=2, kv_heads=2, head_dim=8), 32, impl="off")
    row = measure_cell(Impl("off", off), cell, FAST)
    check_row(row, cell, FAST)
    assert row["status"] == "wrong" and row["err_rel_l2"] == pytest.approx(0.01, rel=1e-5)
    assert row["message"] == verdict(row["err_rel_l2"], 1e-4, "float32", True)[1]
    assert row["setup_ms"] == 0.0 and row["setup_mem_bytes"] == 0  # a plain function has no setup step


def test_measure_cell_refuses_an_output_of_the_wrong_shape():
    def transposed(q, k, v, *, causal, window, scale=None):
        return q.transpose(1, 2).contiguous()

    cell = kernel(Config(heads=2, kv_heads=2, head_dim=8), 16, impl="transposed")
    with pytest.raises(ValueError, match=r"transposed returned \(1, 16, 2, 8\), expected a tensor of shape "
                                         r"\(1, 2, 16, 8\)"):
        measure_cell(Impl("transposed", transposed), cell, FAST)
