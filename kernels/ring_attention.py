"""ring_attention: context-parallel ("ring") attention over a torch.distributed process group.

The sequence is split into `world` contiguous shards (shard_bounds), one per rank. Every rank
keeps its query shard Q_r for the whole call, while the key/value shards travel around the
ring: rank r sends the K/V it holds to rank r+1 and receives the next one from rank r-1, so
after world-1 steps every rank has seen every K/V shard exactly once:

    out, lse = 0, -inf                                # running result per query row (fp32)
    kv = (K_r, V_r)
    for step in 0 .. world-1:
        if step < world-1: post send(kv -> r+1), recv(kv' <- r-1)   # overlaps the compute
        o_s, lse_s = attend(Q_r, kv, global positions)              # skipped if all masked
        out, lse = merge(out, lse, o_s, lse_s)                      # log-sum-exp rule
        wait for send/recv; kv = kv'

Merging uses the same identity as FlashAttention's online softmax: for two partial results
over disjoint key sets, lse = log(e^lse_a + e^lse_b) and out = (e^lse_a o_a + e^lse_b o_b) / e^lse.
The result is exact (up to summation order), whatever the order in which shards arrive.

Memory per rank is O(n_r * D) for the shards and accumulators plus one score tile of
QUERY_CHUNK x n_kv per (batch, kv head), never n_r x N. Only the forward pass exists.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from ctxbench.core.masks import Mask
from ctxbench.registry import register
from ctxbench.core.shards import shard_bounds

LOG2E = math.log2(math.e)

# Query rows per score tile: the scores of one step take B * Hq * QUERY_CHUNK * n_kv * 4 bytes.
# A module constant (not an argument) so the signature matches every other implementation;
# tests lower it to exercise the chunk boundaries.
QUERY_CHUNK = 1024

_LAST_STATS: dict = {}


def last_stats() -> dict:
    """Statistics of the last ring_attention call in this process (this rank).

    world_size, rank; steps: ring steps (K/V shards received from other ranks, world-1);
    skipped_steps: those of them whose shard the mask hides from every local query (no
    compute); comm_s: seconds spent waiting for communication to finish (the length
    all_gather and the send/recv waits, i.e. communication not hidden behind compute,
    which also absorbs any load imbalance between ranks); compute_s: seconds of attention
    and merging; total_s: seconds of the whole call; comm_fraction = comm_s / total_s.
    Times are host wall-clock (time.perf_counter): on CUDA, compute_s only counts the time
    to launch kernels unless something synchronises, since no extra sync is added here.
    """
    return dict(_LAST_STATS)


def _partial(q5: torch.Tensor, kv: torch.Tensor, q_lo: int, k_lo: int, mask: Mask,
             qscale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the local queries against one K/V shard, unnormalised across shards.

    q5: [B, Hkv, G, nq, D] local queries (any float dtype), global positions q_lo + t, which
    are also their row indices for `mask` (the whole sequence's mask, q_offset 0).
    kv: [2, B, Hkv, nk, D] the visiting keys and values, global positions k_lo + t.
    qscale: softmax scale times log2(e): scores are kept in base 2 (exp2 is cheaper than exp
    on the CPU, and the merge only needs a consistent base).
    Returns (out fp32 [B, Hkv, G, nq, D] normalised over this shard's visible keys,
    lse fp32 [B, Hkv, G, nq] = log2 of each row's sum of exp2(scores)); rows that see no key
    of this shard get out = 0 and lse = -inf.
    """
    B, Hkv, G, nq, D = q5.shape
    nk = kv.shape[3]
    BH = B * Hkv
    # fp32 copies of this shard's K and V (no-ops for fp32): O(nk * D), and every matmul then
    # accumulates in fp32 whatever the input dtype.
    kf = kv[0].float().reshape(BH, nk, D)
    vf = kv[1].float().reshape(BH, nk, D)
    out = torch.zeros(B, Hkv, G, nq, D, dtype=torch.float32, device=q5.device)
    lse = torch.full((B, Hkv, G, nq), float("-inf"), dtype=torch.float32, device=q5.device)
    for c0 in range(0, nq, QUERY_CHUNK):
        c1 = min(c0 + QUERY_CHUNK, nq)
        i_lo, i_hi = q_lo + c0, q_lo + c1  # global query positions of the chunk
        # Keys of the shard that some query of the chunk can see: a window or causal mask
        # bounds them, so a narrow window costs O(chunk * W), not O(chunk * nk). (The ring
        # takes no sinks, so the band is all there is.)
        lo, hi = mask.key_span(i_lo, i_hi, k_lo + nk)
        j_lo, j_hi = max(k_lo, lo), hi
        if j_lo >= j_hi:
            continue  # the chunk sees none of these keys: out 0, lse -inf already
        nc, nj = c1 - c0, j_hi - j_lo
        # The G query heads sharing a kv head are stacked along the row axis, so one
        # [G*nc, D] x [D, nj] matmul per (batch, kv head) covers them without copying K/V.
        qc = (q5[:, :, :, c0:c1].float() * qscale).reshape(BH, G * nc, D)
        s = torch.bmm(qc, kf[:, j_lo - k_lo:j_hi - k_lo].transpose(1, 2))  # [BH, G*nc, nj]
        if mask.needs_mask(i_lo, i_hi, j_lo, j_hi):
            ok = mask.visible(torch.arange(i_lo, i_hi, device=q5.device), torch.arange(j_lo, j_hi, device=q5.device))
            s.view(BH, G, nc, nj).masked_fill_(~ok, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        # A row with every key hidden has m = -inf; subtracting 0 instead keeps exp2 at 0
        # rather than the NaN of -inf - -inf.
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        s.sub_(m).exp2_()
        l = s.sum(dim=-1, keepdim=True)
        o = torch.bmm(s, vf[:, j_lo - k_lo:j_hi - k_lo])
        o.div_(torch.where(l > 0, l, torch.ones_like(l)))
        out[:, :, :, c0:c1] = o.view(B, Hkv, G, nc, D)
        lse[:, :, :, c0:c1] = (m + l.log2()).view(B, Hkv, G, nc)  # log2(0) = -inf for blind rows
        # Free this chunk's scores now: otherwise the next chunk's bmm allocates its tile while
        # this one is still referenced, and the peak holds two score tiles instead of one.
        del s, o
    return out, lse


def _merge(out: torch.Tensor, lse: torch.Tensor, p_out: torch.Tensor, p_lse: torch.Tensor) -> None:
    """Fold a partial result (p_out, p_lse) into the running (out, lse), in place, in fp32.

    Base-2 log-sum-exp rule; a row with lse = -inf on both sides stays (0, -inf), no NaN.
    """
    m = torch.maximum(lse, p_lse)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both -inf: weights exp2(-inf) = 0
    a = (lse - m).exp2_()
    b = (p_lse - m).exp2_()
    denom = a + b
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out.mul_((a / safe).unsqueeze(-1)).add_(p_out * (b / safe).unsqueeze(-1))
    lse.copy_(m + denom.log2())


def _ring_neighbours(group, rank: int, world: int) -> tuple[int, int]:
    """Global ranks of the next and previous members of `group` (P2POp takes global ranks)."""
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    if group is None:
        return nxt, prv
    return dist.get_global_rank(group, nxt), dist.get_global_rank(group, prv)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                   window: int | None, scale: float | None = None, group=None,
                   seq_len: int | None = None) -> torch.Tensor:
    """This rank's shard of exact attention, with K/V shards passed around the ring of `group`.

    Call on every rank of `group` (default: the default process group) with the local shard
    q [B, Hq, n_r, D] and k, v [B, Hkv, n_r, D] (Hq divisible by Hkv: grouped-query
    attention), the shard being shard_bounds(seq_len, world)[rank] of the global sequence.
    seq_len (tokens) defaults to the sum of every rank's n_r, learnt with one all_gather
    of the local lengths (which also checks that the shards follow shard_bounds; passing
    seq_len skips it). Masks use global positions: causal j <= i; window W (implies causal)
    i - W < j <= i; neither: every pair visible. scale defaults to 1/sqrt(D).
    Returns [B, Hq, n_r, D] in q's dtype. Without an initialised process group (and
    group=None), or with a group of one, it is plain attention over the local tensors.

    Forward only: the call runs under torch.no_grad, so the output never requires grad
    even when q does. Statistics of the call: last_stats().
    """
    t_start = time.perf_counter()
    mask = Mask.of(causal, window)
    B, Hq, n_r, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"heads {Hq} not divisible by kv heads {Hkv}")
    if k.shape != (B, Hkv, n_r, D) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, Hkv, n_r, D] like q {tuple(q.shape)}")
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qscale = scale * LOG2E

    distributed = group is not None or (dist.is_available() and dist.is_initialized())
    world = dist.get_world_size(group) if distributed else 1
    rank = dist.get_rank(group) if distributed else 0
    if rank < 0:
        raise ValueError("this process is not a member of the given process group")

    comm_s = 0.0
    compute_s = 0.0
    with torch.no_grad():
        if seq_len is None:
            if world == 1:
                seq_len = n_r
            else:
                # Every rank learns every shard length, so each can size its receive buffers
                # and all ranks raise together (rather than hang) if the split is not ours.
                t0 = time.perf_counter()
                mine = torch.tensor([n_r], dtype=torch.int64, device=q.device)
                lengths = [torch.empty_like(mine) for _ in range(world)]
                dist.all_gather(lengths, mine, group=group)
                comm_s += time.perf_counter() - t0
                got = [int(t.item()) for t in lengths]
                seq_len = sum(got)
                want = [e - s for s, e in shard_bounds(seq_len, world)]
                if got != want:
                    raise ValueError(f"shard lengths {got} do not follow shard_bounds({seq_len}, {world}) = {want}")
        bounds = shard_bounds(seq_len, world)
        q_lo, q_hi = bounds[rank]
        if q_hi - q_lo != n_r:
            raise ValueError(f"rank {rank} holds {n_r} tokens, shard_bounds({seq_len}, {world}) gives {q_hi - q_lo}")

        q5 = q.reshape(B, Hkv, G, n_r, D)  # a view: head h uses kv head h // G
        out = torch.zeros(B, Hkv, G, n_r, D, dtype=torch.float32, device=q.device)
        lse = torch.full((B, Hkv, G, n_r), float("-inf"), dtype=torch.float32, device=q.device)

        # K and V travel as one packed [2, B, Hkv, n, D] tensor: one message per step instead
        # of two. Two flat buffers sized for the longest shard alternate: one is being sent
        # (and computed on) while the other receives; shard lengths differ by at most one.
        max_n = max(e - s for s, e in bounds)
        numel = 2 * B * Hkv * max_n * D
        bufs = [torch.empty(numel, dtype=k.dtype, device=k.device) for _ in range(2 if world > 1 else 1)]

        def view(buf: torch.Tensor, n: int) -> torch.Tensor:
            return buf[: 2 * B * Hkv * n * D].view(2, B, Hkv, n, D)

        cur = view(bufs[0], n_r)
        cur[0].copy_(k)
        cur[1].copy_(v)
        nxt_rank, prv_rank = _ring_neighbours(group, rank, world) if world > 1 else (0, 0)

        steps = skipped = 0
        for step in range(world):
            src = (rank - step) % world  # whose K/V shard `cur` is
            works = []
            nxt = None
            if step < world - 1:
                # Post the next exchange before computing, so the transfer overlaps the math.
                # The shard sent now is src's; the one received is (src - 1)'s, which is also
                # what rank r+1 sends and what r-1 expects: both sides skip empty shards alike.
                incoming = (src - 1) % world
                nxt = view(bufs[(step + 1) % 2], bounds[incoming][1] - bounds[incoming][0])
                ops = []
                if cur.numel():
                    ops.append(dist.P2POp(dist.isend, cur, nxt_rank, group=group))
                if nxt.numel():
                    ops.append(dist.P2POp(dist.irecv, nxt, prv_rank, group=group))
                if ops:
                    works = dist.batch_isend_irecv(ops)
            k_lo, k_hi = bounds[src]
            if step > 0:
                steps += 1
            if not mask.sees_any(q_lo, q_hi, k_lo, k_hi):  # the mask hides the whole shard
                if step > 0:
                    skipped += 1
            else:
                t0 = time.perf_counter()
                p_out, p_lse = _partial(q5, cur, q_lo, k_lo, mask, qscale)
                _merge(out, lse, p_out, p_lse)
                compute_s += time.perf_counter() - t0
            if works:
                t0 = time.perf_counter()
                for w in works:
                    w.wait()
                comm_s += time.perf_counter() - t0
            if nxt is not None:
                cur = nxt

        result = out.to(q.dtype).view(B, Hq, n_r, D)

    total_s = time.perf_counter() - t_start
    _LAST_STATS.clear()
    _LAST_STATS.update(world_size=world, rank=rank, steps=steps, skipped_steps=skipped,
                       comm_s=comm_s, compute_s=compute_s, total_s=total_s,
                       comm_fraction=min(1.0, comm_s / total_s) if total_s > 0 else 0.0)
    return result


@register("ring", devices=["cpu", "cuda"], dtypes=["float32", "float16", "bfloat16"],
          masks=["none", "causal", "window"], modes=["fwd"], gqa=True, exact=True, distributed=True,
          description="context-parallel ring attention: K/V shards passed around torch.distributed ranks "
                      "(run the sweep under torchrun)",
          info=last_stats)
def ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, window: int | None,
         scale: float | None = None) -> torch.Tensor:
    """This rank's output shard; q, k, v are this rank's shards (shard_bounds) of the sequence."""
    return ring_attention(q, k, v, causal=causal, window=window, scale=scale)
