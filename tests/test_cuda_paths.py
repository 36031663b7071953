"""CUDA-only branches, exercised on the CPU with the device string passed through and the CUDA
calls replaced by recorders: what they would call, with which arguments, and what they do
with the answers. (The kernels themselves run only on a GPU: benchmarks/gpu_check.sh.)"""

from __future__ import annotations

import random

import pytest
import torch

from ctxbench.core.cell import Cell, Config, Settings
from ctxbench.measurements.kernel import sharded
from ctxbench.measurements.kernel.measure import throughput


def test_nccl_group_uses_the_local_rank_device(monkeypatch):
    """A distributed CUDA cell's worker pins its GPU to LOCAL_RANK before NCCL starts, and
    joins its own group on the port the driver chose."""
    calls = {}
    monkeypatch.setenv(sharded.ENV_WORLD, "4")
    monkeypatch.setenv(sharded.ENV_RANK, "3")
    monkeypatch.setenv(sharded.ENV_ADDR, "127.0.0.1")
    monkeypatch.setenv(sharded.ENV_PORT, "29777")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setattr(sharded.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("device", i))

    def init(backend, **kw):
        calls["backend"], calls["kw"] = backend, kw

    monkeypatch.setattr(sharded.dist, "init_process_group", init)
    monkeypatch.setattr(sharded.atexit, "register", lambda fn: None)
    assert sharded.ensure_group("cuda") == (3, 4)
    assert calls["device"] == 1 and calls["backend"] == "nccl"
    assert calls["kw"]["init_method"] == "tcp://127.0.0.1:29777"
    assert calls["kw"]["rank"] == 3 and calls["kw"]["world_size"] == 4
    import os

    assert "TORCHELASTIC_USE_AGENT_STORE" not in os.environ  # the cell's group has a store of its own


@pytest.mark.parametrize("name, dtype, peak", [("NVIDIA H200", "bfloat16", 989.0), ("NVIDIA H100 80GB HBM3", "float16", 989.0),
                                               ("NVIDIA H200", "float32", 67.0), ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0),
                                               ("Some Future GPU", "bfloat16", None)])
def test_peak_fraction_from_the_device_name(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)
    rng = random.Random(7)
    n = rng.choice([1024, 4096, 32768])
    cell = Cell.of(Config(heads=32, kv_heads=8, head_dim=128, dtype=dtype, device="cuda", mask="causal"), "x", n,
                   "kernel")
    latency_ms = rng.uniform(0.1, 50.0)
    row = throughput(cell, latency_ms, Settings(), devices=2)
    flops = 4.0 * 32 * 128 * n * (n + 1) // 2  # causal pairs, forward
    assert row["flops"] == flops
    assert row["tflops"] == pytest.approx(flops / (latency_ms * 1e-3) / 1e12)
    if peak is None:
        assert row["peak_fraction"] is None
    else:
        assert row["peak_fraction"] == pytest.approx(row["tflops"] / (2 * peak))


def test_decode_bandwidth_fraction_of_the_h200(monkeypatch):
    """A CUDA decode cell's GB/s is divided by the run's bandwidth (the H200's datasheet 4.8 TB/s),
    once per GPU."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    cell = Cell.of(Config(batch=8, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", device="cuda", mask="causal"),
                   "x", 131072, "kernel", query_len=1)
    s = Settings(bandwidth_gbps=4800.0, bandwidth_probe_gbps=4300.0, bandwidth_source="datasheet HBM peak")
    row = throughput(cell, 0.5, s)
    moved = 8 * 2 * (2 * 32 * 128 + 2 * 8 * 131072 * 128)
    assert row["bytes_moved"] == moved
    assert row["gbps"] == pytest.approx(moved / 0.5e-3 / 1e9)
    assert row["bw_fraction"] == pytest.approx(row["gbps"] / 4800.0)
    assert (row["device_bw_gbps"], row["device_bw_probe_gbps"]) == (4800.0, 4300.0)


def test_cuda_defaults_of_a_sweep(monkeypatch, tmp_path):
    """On a CUDA machine a sweep defaults to bf16, 100 ms timing budgets and a shorter warm-up,
    and its workers are started without the address-space cap (tests/test_isolation.py)."""
    from ctxbench.engine import options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    o = options.Options("sweep", {"lengths": "64,128", "impl_names": "sdpa", "ppl_max_len": 0, "out": str(tmp_path)})
    spec = options.build_spec(o)
    assert spec.config.device == "cuda" and spec.config.dtype == "bfloat16"
    assert spec.settings.rep_ms == 100.0 and spec.settings.warmup_ms == 25.0
    assert "perplexity" not in spec.plans
