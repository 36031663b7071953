"""How a cell's KV cache is laid out: ragged lengths and pages (what serving engines store).

Ragged: the B sequences of a batch hold different numbers of keys, kv_lens[b] <= n. K and V
stay [B, Hkv, n, D]; the keys of sequence b past kv_lens[b] are padding, filled with random
values (never zeros), so an implementation that reads them is caught by the error check.
Query i of sequence b sits at position kv_lens[b] - Lq + i (bottom-right, per sequence).

Paged (vLLM's and FlashInfer's NHD layout): K and V live in pools [num_pages, page_size, Hkv,
D]; sequence b's key j is in page block_table[b, j // page_size], slot j % page_size. Each
sequence owns ceil(kv_lens[b] / page_size) pages, handed out in a shuffled order, as an
allocator that has served many requests would; unused table entries are 0 and never read.

Implementations receive these as keywords (ctxbench.core.registry): `kv_lens` (int32 [B]) when
they declare ragged=True and the cell is ragged or paged, `block_table` (int32 [B, pages])
with the pools as k and v when they declare paged=True. The others get contiguous K and V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """A cell's KV layout: per-sequence lengths (tokens) and, when paged, the block table."""

    lengths: tuple[int, ...]               # kv_lens, tokens, one per sequence
    kv_lens: torch.Tensor                   # the same as int32 [B], on the cell's device
    block_table: torch.Tensor | None = None  # int32 [B, max pages], pool page indices
    page_size: int | None = None            # tokens per page

    def kwargs(self, ragged: bool, paged: bool) -> dict:
        """The keywords an implementation declaring (ragged, paged) is called with."""
        out: dict = {}
        if ragged or paged:
            out["kv_lens"] = self.kv_lens
        if paged and self.block_table is not None:
            out["block_table"] = self.block_table
        return out


def draw_lengths(n: int, batch: int, q_len: int, seed: int) -> list[int]:
    """KV lengths (tokens) of a ragged batch: uniform in [max(n // 8, Lq), n], drawn with
    the run's seed and n, so every implementation gets the same batch; the longest sequence
    of the batch is set to n, so the cell's n is its longest KV length."""
    gen = torch.Generator().manual_seed(seed * 7_919 + n)
    lo = max(n // 8, q_len, 1)
    lengths = torch.randint(lo, n + 1, (batch,), generator=gen).tolist()
    lengths[int(torch.randint(0, batch, (1,), generator=gen))] = n
    return lengths


def paginate(k: torch.Tensor, v: torch.Tensor, lengths: list[int], page_size: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k pool, v pool, block table) holding the first lengths[b] keys of each sequence of
    k, v [B, Hkv, n, D], in pages of `page_size` tokens placed in a shuffled order."""
    B, Hkv, n, D = k.shape
    pages = [-(-length // page_size) for length in lengths]
    total = sum(pages)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed * 104_729 + n)).to(k.device)
    table = torch.zeros(B, max(pages), dtype=torch.int32, device=k.device)
    k_pool = torch.empty(total, page_size, Hkv, D, dtype=k.dtype, device=k.device)
    v_pool = torch.empty_like(k_pool)
    used = 0
    for b, count in enumerate(pages):
        ids = order[used:used + count]
        used += count
        table[b, :count] = ids.to(torch.int32)
        padded = count * page_size
        for pool, src in ((k_pool, k), (v_pool, v)):
            seq = src[b, :, :min(padded, n)].transpose(0, 1)  # [tokens, Hkv, D]
            if seq.shape[0] < padded:  # the last page runs past n: pad it with the sequence's first keys
                seq = torch.cat([seq, seq[:padded - seq.shape[0]]])
            pool[ids] = seq.reshape(count, page_size, Hkv, D)
    return k_pool, v_pool, table


def gather(pool: torch.Tensor, block_table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """The first `length` keys of sequence b as a contiguous [1, Hkv, length, D] tensor (laid out
    as a contiguous cache is, so a kernel given either computes in the same order)."""
    page_size = pool.shape[1]
    count = -(-length // page_size)
    pages = pool[block_table[b, :count].long()]  # [count, page_size, Hkv, D]
    return pages.reshape(count * page_size, *pool.shape[2:])[:length].transpose(0, 1).unsqueeze(0).contiguous()


def gather_all(pool: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """Every sequence's first n keys, [B, Hkv, n, D] (keys past a sequence's length are
    whatever its pages hold): the contiguous view a non-paged kernel needs."""
    page_size = pool.shape[1]
    count = -(-n // page_size)
    B = block_table.shape[0]
    table = block_table[:, :count].long()
    if table.shape[1] < count:  # a table narrower than n: pad with page 0 (never visible)
        table = torch.cat([table, table.new_zeros(B, count - table.shape[1])], dim=1)
    pages = pool[table]  # [B, count, page_size, Hkv, D]
    return pages.reshape(B, count * page_size, *pool.shape[2:])[:, :n].transpose(1, 2).contiguous()


def ragged_visible(mask_of_length, lengths: list[int], n_q: int, n: int, device: torch.device) -> torch.Tensor:
    """Boolean [B, n_q, n]: which padded key each query of each sequence sees, for a ragged
    batch: mask_of_length(kv_len) is the sequence's ctxbench.core.masks.Mask (its offset is
    kv_len - Lq), and keys at or past kv_len are never visible."""
    rows, cols = torch.arange(n_q, device=device), torch.arange(n, device=device)
    out = torch.empty(len(lengths), n_q, n, dtype=torch.bool, device=device)
    for b, length in enumerate(lengths):
        ok = mask_of_length(length).visible(rows, cols)
        out[b] = (cols < length) if ok is None else ok & (cols < length)
    return out
