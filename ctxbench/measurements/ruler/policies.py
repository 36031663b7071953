"""KV-cache compression policies: which cached keys and values a model keeps under a budget.

A policy sees one layer's prefill, the post-RoPE queries [1, Hq, N, D] and the cached keys
[1, Hkv, N, D], and keeps `budget` of the N cached tokens per KV head (ctxbench.measurements.ruler.compression
gathers them into a smaller cache). Each policy is one class declaring its `name` once, in the
manner of kvpress's presses: `keep(scores, n, budget)` returns the kept positions, and a scored
policy (ScoredPolicy) first ranks the tokens of each KV head with `score(queries, keys, ...)`,
[Hkv, N] (higher is kept; ties go to the more recent token), and keeps the top `budget`:

- full (FullCache): every token (the baseline; the budget is N).
- streaming (StreamingLLM, Xiao et al. 2023): the first SINKS tokens (attention sinks) and the
  most recent budget - SINKS; no scores, the same tokens for every head.
- h2o (H2O, Zhang et al. 2023): heavy hitters, the tokens with the largest attention summed over
  every query of the prefill (causal softmax, summed over the query heads that share the KV
  head), plus a recent window: the last budget // 2 tokens are always kept and the rest of the
  budget goes to the heaviest older tokens. The full N x N attention is computed in query
  chunks of at most CHUNK_BYTES, since a fused kernel does not return it: that cost is the
  policy's own and is counted in selection_ms.
- snapkv (SnapKV, Li et al. 2024): the attention of the prompt's last WINDOW queries (the
  observation window, which holds the question) summed over those queries and the head group,
  average-pooled over POOL neighbouring keys so a needle is kept whole; the window's own keys
  are always kept (score +inf). WINDOW, POOL and the pooling are the SnapKV repository's
  defaults, not tuned here.
- knorm (KNorm, Devoto et al. 2024): the keys with the smallest L2 norm, which draw the most
  attention.
- random (Random): uniform scores from the run's seed and the layer (the control).

POLICIES maps each name to its policy, in the order `--policies all` runs them and reports list
them; POLICY_NAMES is that order. The module imports torch only inside the methods that
compute, so the planning and report sides can list and parse the names without it.

kvpress (NVIDIA) implements these and more as "presses" on transformers models, but its wheel
pins transformers below 5.3, older than both this project's pin and the GPU machines' 5.17, so
the policies are written here against the same transformers cache interface (docs/ruler.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:  # annotations only: importing this module must not load torch
    import torch

SINKS = 4            # streaming: attention-sink tokens kept at the start (StreamingLLM's 4)
WINDOW = 32          # snapkv: observation window, the prompt's last queries (tokens)
POOL = 5             # snapkv: average-pooling width over neighbouring keys (tokens)
CHUNK_BYTES = 8 * 2**20  # h2o: the largest attention-probability block computed at once (bytes; 4-16 MiB were
# 1.3x as fast as 32 MiB on the 2-core CPU: the block and its softmax stay in the 32 MiB L3 cache)


# ---------------------------------------------------------------- the policy interface

class Policy(ABC):
    """One KV-cache policy: which `budget` of one layer's n cached tokens each KV head keeps.

    A subclass declares `name` (its --policies and CSV name) and implements `choose`; one that
    ranks tokens derives from ScoredPolicy and implements `score` instead."""

    name: ClassVar[str]
    scored: ClassVar[bool] = False  # whether keep() needs score()'s output (computed once per prefill)

    def score(self, queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, seed: int = 0,
              layer: int = 0) -> torch.Tensor | None:
        """The scores [Hkv, N] (float32, higher kept) one layer's cached tokens are ranked by,
        from its prefill queries [1, Hq, N, D] and keys [1, Hkv, N, D] (`scaling`: the
        attention's softmax scale; `seed` and `layer` for a seeded draw); None for a policy
        that chooses by position alone."""
        return None

    def keep(self, scores: torch.Tensor | None, n: int, budget: int) -> torch.Tensor:
        """Kept positions (int64, ascending per row) of n cached tokens: [1, budget] where every
        head keeps the same tokens, [Hkv, budget] per head; all n when the budget is n.
        `scores`: this policy's score() of the layer (None for an unscored policy)."""
        import torch

        if not 1 <= budget <= n:
            raise ValueError(f"a policy keeps between 1 and {n} of {n} cached tokens, not {budget}")
        if budget == n:
            return torch.arange(n).unsqueeze(0)
        if self.scored and scores is None:
            raise ValueError(f"policy {self.name!r} needs scores (its score method)")
        return self.choose(scores, n, budget)

    @abstractmethod
    def choose(self, scores: torch.Tensor | None, n: int, budget: int) -> torch.Tensor:
        """keep() below the whole cache (1 <= budget < n, checked there)."""


class ScoredPolicy(Policy):
    """A policy that ranks each KV head's tokens by `score` and keeps the top `budget`."""

    scored: ClassVar[bool] = True

    @abstractmethod
    def score(self, queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, seed: int = 0,
              layer: int = 0) -> torch.Tensor:
        """The scores [Hkv, N] (float32, higher kept); see Policy.score."""

    def choose(self, scores: torch.Tensor | None, n: int, budget: int) -> torch.Tensor:
        return top_tokens(scores, budget)


# ---------------------------------------------------------------- the policies

@dataclass(frozen=True)
class FullCache(Policy):
    """The uncompressed cache, the baseline every other policy is compared with."""

    name: ClassVar[str] = "full"

    def choose(self, scores: torch.Tensor | None, n: int, budget: int) -> torch.Tensor:
        import torch

        # every token whatever the budget: the full cache is the budget-free row of a run
        return torch.arange(n).unsqueeze(0)


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """StreamingLLM: the first `sinks` tokens and the most recent, the same in every head."""

    name: ClassVar[str] = "streaming"
    sinks: int = SINKS  # attention-sink tokens kept at the start (tokens)

    def choose(self, scores: torch.Tensor | None, n: int, budget: int) -> torch.Tensor:
        import torch

        # fewer sinks when the budget is tiny, so at least one recent token stays
        sinks = min(self.sinks, max(budget - 1, 0))
        return torch.cat([torch.arange(sinks), torch.arange(n - (budget - sinks), n)]).unsqueeze(0)


@dataclass(frozen=True)
class H2O(ScoredPolicy):
    """H2O: the heaviest older tokens (attention summed over every causal query of the prefill
    and the head group) plus the last budget // 2 tokens."""

    name: ClassVar[str] = "h2o"
    chunk_bytes: int = CHUNK_BYTES  # the largest attention-probability block computed at once (bytes)

    def score(self, queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, seed: int = 0,
              layer: int = 0) -> torch.Tensor:
        """Attention each key receives summed over every (causal) query and the head group:
        [Hkv, N]. Blocks of queries against only the keys they can see: half the N x N work of
        a full matrix."""
        import torch

        q, k = _per_query_head(queries, keys)
        hq, n, _ = q.shape
        rows = max(1, self.chunk_bytes // (hq * n * 4))  # 4: bytes of a float32 probability
        total = torch.zeros(hq, n, dtype=torch.float32, device=q.device)
        for first in range(0, n, rows):
            last = min(n, first + rows)
            total[:, :last] += _probabilities(q[:, first:last], k[:, :last], scaling).sum(dim=1)
        return _grouped(total, keys.shape[1])

    def choose(self, scores: torch.Tensor | None, n: int, budget: int) -> torch.Tensor:
        import torch

        recent = budget // 2
        older = top_tokens(scores[:, :n - recent], budget - recent)
        tail = torch.arange(n - recent, n, device=scores.device).expand(scores.shape[0], recent)
        return torch.cat([older, tail], dim=1)


@dataclass(frozen=True)
class SnapKV(ScoredPolicy):
    """SnapKV: the tokens the observation window (the prompt's last `window` queries) attends
    to most, pooled over `pool` neighbours; the window itself always."""

    name: ClassVar[str] = "snapkv"
    window: int = WINDOW  # observation window, the prompt's last queries (tokens)
    pool: int = POOL      # average-pooling width over neighbouring keys (tokens)

    def score(self, queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, seed: int = 0,
              layer: int = 0) -> torch.Tensor:
        """Attention of the last `window` queries, summed and averaged over `pool` neighbouring
        keys (zeros past the ends count); the window's keys +inf: [Hkv, N]."""
        import torch

        q, k = _per_query_head(queries, keys)
        n = q.shape[1]
        w = min(self.window, n)
        votes = _grouped(_probabilities(q[:, n - w:], k, scaling).sum(dim=1), keys.shape[1])
        before = votes[:, :n - w]
        if before.shape[1] and self.pool > 1:
            before = torch.nn.functional.avg_pool1d(before.unsqueeze(1), self.pool, stride=1,
                                                    padding=self.pool // 2).squeeze(1)
            before = before[:, :n - w]  # an even pool pads one column more than it drops
        return torch.cat([before, torch.full((votes.shape[0], w), float("inf"), device=votes.device)], dim=1)


@dataclass(frozen=True)
class KNorm(ScoredPolicy):
    """KNorm: the keys with the smallest L2 norm, which draw the most attention."""

    name: ClassVar[str] = "knorm"

    def score(self, queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, seed: int = 0,
              layer: int = 0) -> torch.Tensor:
        """Minus each key's L2 norm: [Hkv, N]."""
        return -keys[0].float().norm(dim=-1)


@dataclass(frozen=True)
class Random(ScoredPolicy):
    """A seeded random set of tokens per head: the control."""

    name: ClassVar[str] = "random"

    def score(self, queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, seed: int = 0,
              layer: int = 0) -> torch.Tensor:
        """Uniform scores drawn from (seed, layer), on the CPU so every device draws the same:
        [Hkv, N]."""
        import torch

        g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
        return torch.rand(keys.shape[1], keys.shape[2], generator=g).to(keys.device)


# ---------------------------------------------------------------- the registry

def _registry(*policies: Policy) -> dict[str, Policy]:
    """name -> policy, in the order given; a name declared twice is a programming error."""
    found: dict[str, Policy] = {}
    for policy in policies:
        if policy.name in found:
            raise ValueError(f"KV-cache policy name {policy.name!r} is declared by both "
                             f"{type(found[policy.name]).__name__} and {type(policy).__name__}")
        found[policy.name] = policy
    return found


POLICIES: dict[str, Policy] = _registry(FullCache(), StreamingLLM(), H2O(), SnapKV(), KNorm(), Random())
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)  # the order "all" runs them in and reports list them


def get(name: str) -> Policy:
    """The policy called `name`; ValueError (one line) naming the known ones."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown KV-cache policy {name!r}; choose from {', '.join(POLICY_NAMES)}") from None


def parse_policies(text: str) -> tuple[str, ...]:
    """Policy names from a comma-separated list ("all": every policy), in the order given.
    Raises ValueError with a one-line message naming --policies."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    if names == ["all"]:
        return POLICY_NAMES
    unknown = [p for p in names if p not in POLICIES]
    if unknown or not names:
        raise ValueError(f"--policies: unknown policy {', '.join(map(repr, unknown)) or repr(text)}; "
                         f"choose from {', '.join(POLICY_NAMES)} (or all)")
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------- shared steps

def _grouped(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[Hq, N] -> [Hkv, N]: summed over the query heads that share each KV head."""
    return scores.reshape(kv_heads, scores.shape[0] // kv_heads, -1).sum(dim=1)


def _probabilities(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention probabilities [Hq, c, L] (float32) of the queries at positions L - c ..
    L - 1 (q [Hq, c, D]) over the keys at 0 .. L - 1 (k [Hq, L, D], repeated per query head)."""
    import torch

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


def top_tokens(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions [H, keep] (ascending) of each row's `keep` highest scores; equal scores go to the
    later position."""
    import torch

    n = scores.shape[-1]
    # a stable descending sort of the reversed row puts the later of equal scores first
    reversed_positions = torch.arange(n - 1, -1, -1, device=scores.device)
    order = torch.sort(scores[:, reversed_positions], dim=-1, descending=True, stable=True).indices[:, :keep]
    return reversed_positions[order].sort(dim=-1).values


def gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [B, Hkv, N, D] at positions index [Hkv or 1, K] of each head: [B, Hkv, K, D]."""
    import torch

    b, h, _, d = tensor.shape
    index = index.to(tensor.device).expand(h, index.shape[-1])
    return torch.gather(tensor, 2, index[None, :, :, None].expand(b, h, index.shape[-1], d))
