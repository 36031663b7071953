"""ring_attention (kernels/ring_attention.py) against the float64 reference, on real gloo rings.

Ranks are spawned processes on the CPU. Starting one costs seconds (it imports torch), so
each launch runs a whole list of cases on the same process group; every rank writes its
output shards and last_stats() to tmp_path, and the test process reassembles the sequence.
Inputs are fresh random tensors from a per-launch seed, printed in every failure message.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import traceback

import pytest
import torch

from ctxbench.kernels import ring_attention as ring_mod
from ctxbench.kernels.ring_attention import last_stats, ring_attention
from ctxbench.core.masks import Mask
from ctxbench.core.reference import TOLERANCE, errors, reference_attention
from ctxbench.core.shards import shard_bounds
from references import new_seed, random_qkv

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAUNCH_TIMEOUT_S = 120  # a hung ring fails the test instead of blocking the run


def case(n: int, *, causal: bool = True, window: int | None = None, b: int = 1, hq: int = 2,
         hkv: int = 2, d: int = 16, dtype: str = "float32", scale: float | None = None,
         chunk: int = 1024) -> dict:
    return dict(n=n, causal=causal, window=window, b=b, hq=hq, hkv=hkv, d=d, dtype=dtype,
                scale=scale, chunk=chunk)


def full_qkv(seed: int, c: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole sequence's q, k, v: identical on every rank and in the test process."""
    return random_qkv(seed, c["b"], c["hq"], c["hkv"], c["n"], c["n"], c["d"], DTYPES[c["dtype"]])


def _rank_main(rank: int, world: int, init_method: str, seed: int, cases: list[dict], out_dir: str) -> None:
    """One rank: run every case on the shared gloo group and save the shards and stats."""
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)  # ranks share the test machine's cores
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
        results = []
        for i, c in enumerate(cases):
            q, k, v = full_qkv(seed + i, c)
            lo, hi = shard_bounds(c["n"], world)[rank]
            ring_mod.QUERY_CHUNK = c["chunk"]
            out = ring_attention(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], causal=c["causal"],
                                 window=c["window"], scale=c["scale"])
            results.append((out, last_stats()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, cases: list[dict], seed: int, tmp_path) -> list[list[tuple[torch.Tensor, dict]]]:
    """Run `cases` on a fresh gloo ring of `world` processes: results[rank][case]."""
    ctx = multiprocessing.get_context("spawn")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, world, init_method, seed, cases, str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(LAUNCH_TIMEOUT_S)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        assert not hung, f"ranks {hung} still running after {LAUNCH_TIMEOUT_S}s (seed {seed})"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    errs = [(tmp_path / f"rank{r}.err") for r in range(world)]
    msgs = [f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errs) if e.exists()]
    assert not msgs, f"seed {seed}\n" + "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), ([p.exitcode for p in procs], seed)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def expected_skips(n: int, world: int, rank: int, causal: bool, window: int | None) -> int:
    """Other ranks' K/V shards in which no (local query, key) pair is visible."""
    bounds = shard_bounds(n, world)
    q_lo, q_hi = bounds[rank]
    skips = 0
    for src in range(world):
        if src == rank:
            continue
        k_lo, k_hi = bounds[src]
        if q_hi == q_lo or k_hi == k_lo:
            skips += 1
            continue
        ok = Mask.of(causal, window).visible(torch.arange(q_lo, q_hi), torch.arange(k_lo, k_hi))
        skips += ok is not None and not bool(ok.any())
    return skips


def check_launch(world: int, cases: list[dict], tmp_path) -> list[list[dict]]:
    """Launch, then compare every case with the reference and check the stats; stats[case][rank]."""
    seed = new_seed()
    results = launch(world, cases, seed, tmp_path)
    all_stats = []
    for i, c in enumerate(cases):
        q, k, v = full_qkv(seed + i, c)
        shards = [results[r][i][0] for r in range(world)]
        stats = [results[r][i][1] for r in range(world)]
        where = f"case {c}, world {world}, seed {seed}"
        for r, s in enumerate(shards):
            lo, hi = shard_bounds(c["n"], world)[r]
            assert s.shape == (c["b"], c["hq"], hi - lo, c["d"]), where
            assert s.dtype == DTYPES[c["dtype"]], where
        out = torch.cat(shards, dim=2)
        ref = reference_attention(q.double(), k.double(), v.double(), Mask.of(c["causal"], c["window"]),
                                  scale=c["scale"])
        assert torch.isfinite(out).all(), where
        rel, mx = errors(out, ref)
        assert rel <= TOLERANCE[c["dtype"]], f"{where}: rel L2 {rel:.3g}, max abs {mx:.3g}"
        for r, st in enumerate(stats):
            assert st["world_size"] == world and st["rank"] == r, (where, st)
            assert st["steps"] == world - 1, (where, st)
            assert st["skipped_steps"] == expected_skips(c["n"], world, r, c["causal"], c["window"]), (where, r, st)
            assert 0.0 <= st["comm_fraction"] <= 1.0, (where, st)
            assert st["comm_s"] >= 0 and st["compute_s"] >= 0 and st["total_s"] > 0, (where, st)
            assert st["comm_s"] + st["compute_s"] <= st["total_s"] * 1.01 + 1e-4, (where, st)
        all_stats.append(stats)
    return all_stats


def test_two_ranks(tmp_path):
    cases = [
        case(64, causal=True, b=2),                       # even split
        case(64, window=5),                               # window narrower than a shard (32)
        case(37, window=2),                               # query 19 sees exactly one key (18) of shard 0
        case(37, window=25),                              # window spanning both shards, uneven split
        case(37, causal=False),                           # no mask: every shard computed
        case(101, hq=4, hkv=2, d=32),                     # grouped-query attention
        case(101, causal=False, hq=4, hkv=1, scale=0.3),  # explicit scale, 4 query heads per kv head
        case(67, window=9, hq=4, hkv=2, chunk=8),         # several query chunks per step, rows blind to a shard
        case(1, causal=True),                             # fewer tokens than ranks: rank 1 empty
        case(1, causal=False),
        case(64, hq=4, hkv=2, dtype="bfloat16"),          # fp32 accumulation of bf16 inputs
        case(37, causal=False, dtype="bfloat16"),
    ]
    stats = check_launch(2, cases, tmp_path)
    # Causal: rank 0 never needs rank 1's keys; rank 1 needs rank 0's.
    assert [s["skipped_steps"] for s in stats[0]] == [1, 0]
    assert [s["skipped_steps"] for s in stats[4]] == [0, 0]


def test_three_ranks(tmp_path):
    cases = [
        case(101, window=1),                 # shards 34/34/33; a 1-token window sees only its own shard
        case(101, window=3, hq=4, hkv=2),    # rank 1 reads the tail of shard 0, rank 2 skips it
        case(101, window=70, chunk=16),      # window spanning several shards
        case(101, window=36),                # query 68 sees exactly key 33 of shard 0 ...
        case(101, window=35),                # ... and here none: rank 2 skips shard 0
        case(101, causal=False),
        case(2, causal=True),                # rank 2 holds no token
    ]
    stats = check_launch(3, cases, tmp_path)
    # By hand, [rank 0, rank 1, rank 2]: rank 0 never sees a later shard (causal). Window 1:
    # every rank sees only its own shard. Window 3: rank 1's first query (34) also reads keys
    # 32, 33 of shard 0, rank 2's reads 66, 67 of shard 1. Window 70 or 36: only later shards
    # hide; window 35: query 68's window starts at key 34, just past shard 0.
    assert [s["skipped_steps"] for s in stats[0]] == [2, 2, 2]
    assert [s["skipped_steps"] for s in stats[1]] == [2, 1, 1]
    assert [s["skipped_steps"] for s in stats[2]] == [2, 1, 0]
    assert [s["skipped_steps"] for s in stats[3]] == [2, 1, 0]
    assert [s["skipped_steps"] for s in stats[4]] == [2, 1, 1]


@pytest.mark.parametrize("n,world,want", [
    (10, 1, [(0, 10)]),
    (37, 2, [(0, 19), (19, 37)]),
    (101, 3, [(0, 34), (34, 68), (68, 101)]),
    (1, 2, [(0, 1), (1, 1)]),
    (2, 4, [(0, 1), (1, 2), (2, 2), (2, 2)]),
    (0, 3, [(0, 0), (0, 0), (0, 0)]),
])
def test_shard_bounds_examples(n, world, want):
    assert shard_bounds(n, world) == want


def test_shard_bounds_properties():
    for n in range(0, 40):
        for world in range(1, 9):
            b = shard_bounds(n, world)
            assert len(b) == world
            assert b[0][0] == 0 and b[-1][1] == n
            assert all(b[r][1] == b[r + 1][0] for r in range(world - 1))  # contiguous, in order
            sizes = [e - s for s, e in b]
            assert sizes == [n // world + (r < n % world) for r in range(world)]


def test_shard_bounds_rejects_bad_arguments():
    with pytest.raises(ValueError):
        shard_bounds(5, 0)
    with pytest.raises(ValueError):
        shard_bounds(-1, 2)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 4), (False, None)])
def test_single_process_is_plain_attention(causal, window, monkeypatch):
    """No process group: attention over the local tensors, in query chunks."""
    monkeypatch.setattr(ring_mod, "QUERY_CHUNK", 7)
    c = case(29, causal=causal, window=window, b=2, hq=4, hkv=2)
    q, k, v = full_qkv(new_seed(), c)
    q.requires_grad_(True)
    out = ring_attention(q, k, v, causal=causal, window=window)
    assert not out.requires_grad  # forward only, documented
    rel, _ = errors(out.detach(), reference_attention(q.detach().double(), k.double(), v.double(),
                                                      Mask.of(causal, window)))
    assert rel <= TOLERANCE["float32"]
    st = last_stats()
    assert (st["world_size"], st["rank"], st["steps"], st["skipped_steps"], st["comm_s"]) == (1, 0, 0, 0, 0.0)
    assert st["comm_fraction"] == 0.0 and st["total_s"] > 0


def test_single_process_argument_checks():
    q, k, v = full_qkv(0, case(8))
    with pytest.raises(ValueError):
        ring_attention(q, k, v, causal=True, window=None, seq_len=9)  # 8 local tokens, not 9
    with pytest.raises(ValueError):
        ring_attention(q, k, v, causal=True, window=0)
    k3, v3 = torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError):
        ring_attention(q, k3, v3, causal=True, window=None)  # 2 query heads over 3 kv heads
