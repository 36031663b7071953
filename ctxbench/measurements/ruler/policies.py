"""KV-cache compression policies: which cached keys and values a model keeps under a budget.

A policy sees one layer's prefill, the post-RoPE queries [1, Hq, N, D] and the cached keys
[1, Hkv, N, D], and keeps `keep` of the N cached tokens per KV head (ctxbench.measurements.ruler.compression
gathers them into a smaller cache). Scored policies rank the tokens of each KV head by a score
[Hkv, N] (higher is kept; ties go to the more recent token) and keep the top `keep`:

- full: every token (the baseline; `keep` is N).
- streaming (StreamingLLM, Xiao et al. 2023): the first SINKS tokens (attention sinks) and the
  most recent keep - SINKS; no scores, the same tokens for every head.
- h2o (H2O, Zhang et al. 2023): heavy hitters, the tokens with the largest attention summed over
  every query of the prefill (causal softmax, summed over the query heads that share the KV
  head), plus a recent window: the last keep // 2 tokens are always kept and the rest of the
  budget goes to the heaviest older tokens. The full N x N attention is computed in query
  chunks of at most CHUNK_BYTES, since a fused kernel does not return it: that cost is the
  policy's own and is counted in selection_ms.
- snapkv (SnapKV, Li et al. 2024): the attention of the prompt's last WINDOW queries (the
  observation window, which holds the question) summed over those queries and the head group,
  average-pooled over POOL neighbouring keys so a needle is kept whole; the window's own keys
  are always kept (score +inf). WINDOW, POOL and the pooling are the SnapKV repository's
  defaults, not tuned here.
- knorm (Devoto et al. 2024): the keys with the smallest L2 norm, which draw the most attention.
- random: uniform scores from the run's seed and the layer (the control).

kvpress (NVIDIA) implements these and more as "presses" on transformers models, but its wheel
pins transformers below 5.3, older than both this project's pin and the GPU machines' 5.17, so
the policies are written here against the same transformers cache interface (docs/ruler.md).
"""

from __future__ import annotations

import torch

from ctxbench.engine.plan import KV_POLICIES

POLICIES = KV_POLICIES
SCORED = ("h2o", "snapkv", "knorm", "random")  # the policies that rank tokens by policy_scores
SINKS = 4            # streaming: attention-sink tokens kept at the start (StreamingLLM's 4)
WINDOW = 32          # snapkv: observation window, the prompt's last queries (tokens)
POOL = 5             # snapkv: average-pooling width over neighbouring keys (tokens)
CHUNK_BYTES = 8 * 2**20  # h2o: the largest attention-probability block computed at once (bytes; 4-16 MiB were
# 1.3x as fast as 32 MiB on the 2-core CPU: the block and its softmax stay in the 32 MiB L3 cache)


def parse_policies(text: str) -> tuple[str, ...]:
    """Policy names from a comma-separated list ("all": every policy), in the order given.
    Raises ValueError with a one-line message naming --policies."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return POLICIES
    unknown = [p for p in names if p not in POLICIES]
    if unknown or not names:
        raise ValueError(f"--policies: unknown policy {', '.join(map(repr, unknown)) or repr(text)}; "
                         f"choose from {', '.join(POLICIES)} (or all)")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------- scores [Hkv, N], higher kept

def _grouped(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[Hq, N] -> [Hkv, N]: summed over the query heads that share each KV head."""
    return scores.reshape(kv_heads, scores.shape[0] // kv_heads, -1).sum(dim=1)


def _probabilities(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention probabilities [Hq, c, L] (float32) of the queries at positions L - c ..
    L - 1 (q [Hq, c, D]) over the keys at 0 .. L - 1 (k [Hq, L, D], repeated per query head)."""
    logits = torch.matmul(q.float() * scaling, k.float().transpose(-1, -2))
    c = q.shape[1]
    # only the block's own keys (the last c) can lie in a query's future
    logits[:, :, k.shape[1] - c:].masked_fill_(torch.ones(c, c, dtype=torch.bool, device=q.device).triu_(1),
                                               float("-inf"))
    return torch.softmax(logits, dim=-1)


def _per_query_head(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[Hq, N, D] queries and keys repeated to one per query head (grouped-query attention)."""
    q, k = queries[0], keys[0]
    return q, k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)


def h2o_scores(queries: torch.Tensor, keys: torch.Tensor, *, scaling: float,
               chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
    """Attention each key receives summed over every (causal) query and the head group: [Hkv, N].
    Blocks of queries against only the keys they can see: half the N x N work of a full matrix."""
    q, k = _per_query_head(queries, keys)
    hq, n, _ = q.shape
    rows = max(1, chunk_bytes // (hq * n * 4))
    total = torch.zeros(hq, n, dtype=torch.float32, device=q.device)
    for first in range(0, n, rows):
        last = min(n, first + rows)
        total[:, :last] += _probabilities(q[:, first:last], k[:, :last], scaling).sum(dim=1)
    return _grouped(total, keys.shape[1])


def snapkv_scores(queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, window: int = WINDOW,
                  pool: int = POOL) -> torch.Tensor:
    """Attention of the last `window` queries, summed and averaged over `pool` neighbouring keys
    (zeros past the ends count); the window's keys +inf: [Hkv, N]."""
    q, k = _per_query_head(queries, keys)
    n = q.shape[1]
    w = min(window, n)
    votes = _grouped(_probabilities(q[:, n - w:], k, scaling).sum(dim=1), keys.shape[1])
    before = votes[:, :n - w]
    if before.shape[1] and pool > 1:
        before = torch.nn.functional.avg_pool1d(before.unsqueeze(1), pool, stride=1, padding=pool // 2).squeeze(1)
        before = before[:, :n - w]
    return torch.cat([before, torch.full((votes.shape[0], w), float("inf"), device=votes.device)], dim=1)


def knorm_scores(keys: torch.Tensor) -> torch.Tensor:
    """Minus each key's L2 norm: [Hkv, N]."""
    return -keys[0].float().norm(dim=-1)


def random_scores(keys: torch.Tensor, *, seed: int, layer: int) -> torch.Tensor:
    """Uniform scores drawn from (seed, layer): [Hkv, N]."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return torch.rand(keys.shape[1], keys.shape[2], generator=g).to(keys.device)


def policy_scores(policy: str, queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, seed: int = 0,
                  layer: int = 0) -> torch.Tensor | None:
    """The scores [Hkv, N] (float32) a scored policy ranks one layer's cached tokens by, from its
    prefill queries [1, Hq, N, D] and keys [1, Hkv, N, D]; None for full and streaming."""
    if policy == "h2o":
        return h2o_scores(queries, keys, scaling=scaling)
    if policy == "snapkv":
        return snapkv_scores(queries, keys, scaling=scaling)
    if policy == "knorm":
        return knorm_scores(keys)
    if policy == "random":
        return random_scores(keys, seed=seed, layer=layer)
    if policy in ("full", "streaming"):
        return None
    raise ValueError(f"unknown KV-cache policy {policy!r}; choose from {', '.join(POLICIES)}")


# ---------------------------------------------------------------- selection and gather

def streaming_keep(n: int, keep: int) -> torch.Tensor:
    """StreamingLLM's kept positions [keep]: the first SINKS (fewer when the budget is tiny, so at
    least one recent token stays) and the last keep - sinks."""
    sinks = min(SINKS, max(keep - 1, 0))
    return torch.cat([torch.arange(sinks), torch.arange(n - (keep - sinks), n)])


def top_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions [H, keep] (ascending) of each row's `keep` highest scores; equal scores go to the
    later position."""
    n = scores.shape[-1]
    reversed_positions = torch.arange(n - 1, -1, -1, device=scores.device)
    order = torch.sort(scores[:, reversed_positions], dim=-1, descending=True, stable=True).indices[:, :keep]
    return reversed_positions[order].sort(dim=-1).values


def select(policy: str, scores: torch.Tensor | None, n: int, keep: int) -> torch.Tensor:
    """Kept positions (int64, ascending per row) of n cached tokens: [1, keep] for full and
    streaming (every head alike), [Hkv, keep] for a scored policy."""
    if not 1 <= keep <= n:
        raise ValueError(f"a policy keeps between 1 and {n} of {n} cached tokens, not {keep}")
    if policy == "full" or keep == n:
        return torch.arange(n).unsqueeze(0)
    if policy == "streaming":
        return streaming_keep(n, keep).unsqueeze(0)
    if scores is None:
        raise ValueError(f"policy {policy!r} needs scores (policy_scores)")
    if policy == "h2o":
        recent = keep // 2
        older = top_tokens(scores[:, :n - recent], keep - recent)
        tail = torch.arange(n - recent, n, device=scores.device).expand(scores.shape[0], recent)
        return torch.cat([older, tail], dim=1)
    return top_tokens(scores, keep)


def gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [B, Hkv, N, D] at positions index [Hkv or 1, K] of each head: [B, Hkv, K, D]."""
    b, h, _, d = tensor.shape
    index = index.to(tensor.device).expand(h, index.shape[-1])
    return torch.gather(tensor, 2, index[None, :, :, None].expand(b, h, index.shape[-1], d))
