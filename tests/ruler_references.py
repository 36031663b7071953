"""Independent references for the KV-cache policy tests (tests/test_kv_policies.py,
tests/test_kv_compression.py), written from the papers' rules rather than from
ctxbench.measurements.ruler.policies:

* attention probabilities in float64 (tests/references.py);
* each policy's kept positions per KV head, ranked by Python's own sort;
* what a model answers from a compressed cache, computed without any cache: transformers'
  eager attention over the whole sequence, with every layer's attention masked so that the
  tokens after the prefill see only the kept tokens of the prefill (and each other). A
  compressed cache that keeps the rotary positions its keys were computed at, and feeds the
  next token at its own position, must give the same logits.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch

import references
from ctxbench.measurements.ruler import policies as kp

# Scores that close (absolute + relative) may rank differently in float32 and float64: a case
# whose kept set hinges on such a pair is ambiguous, not a pass or a failure.
TIE_TOLERANCE = 1e-5


def probs64(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention probabilities [Hq, N, N] in float64 of queries [1, Hq, N, D] over keys
    [1, Hkv, N, D] (grouped-query attention: tests/references.py)."""
    return references.probs64(queries, keys, scale=scaling)[0]


def group_sum(x: torch.Tensor, hkv: int) -> torch.Tensor:
    """[Hq, ...] -> [Hkv, ...]: the sum over each KV head's consecutive query heads."""
    per = x.shape[0] // hkv
    return torch.stack([x[h * per:(h + 1) * per].sum(0) for h in range(hkv)])


def ranked(scores: Sequence[float], candidates: Sequence[int], count: int) -> list[int]:
    """The `count` candidate positions of highest score, the later one first among equal
    scores; AssertionError if the last kept and the first dropped differ by less than
    TIE_TOLERANCE (the case is ambiguous in float32: choose another seed)."""
    order = sorted(candidates, key=lambda p: (-scores[p], -p))
    if 0 < count < len(order):
        a, b = scores[order[count - 1]], scores[order[count]]
        assert a == b or abs(a - b) > TIE_TOLERANCE * (1 + min(abs(a), abs(b))), (
            f"ambiguous case: positions {order[count - 1]} and {order[count]} score {a} and {b}")
    return sorted(order[:count])


def streaming_kept(n: int, budget: int) -> list[int]:
    """StreamingLLM: the first SINKS tokens (fewer if the budget can't also hold one recent
    token) and the most recent ones."""
    sinks = min(kp.SINKS, budget - 1)
    return [p for p in range(n) if p < sinks or p >= n - (budget - sinks)]


def snapkv_scores64(probs: torch.Tensor, hkv: int, window: int, pool: int) -> torch.Tensor:
    """SnapKV's scores [Hkv, N] from attention probabilities [Hq, N, N]: the last `window` rows
    summed, each earlier key averaged with its pool-wide neighbourhood (the key at pool // 2
    of it; keys past either end count as zero), the window's keys +inf."""
    n = probs.shape[-1]
    votes = group_sum(probs.double()[:, n - window:].sum(dim=1), hkv)
    out = torch.full((hkv, n), math.inf, dtype=torch.float64)
    for j in range(n - window):
        lo = j - pool // 2
        out[:, j] = votes[:, max(lo, 0):min(lo + pool, n - window)].sum(dim=1) / pool
    return out


def expected_kept(name: str, probs: torch.Tensor, keys: torch.Tensor, *, budget: int, seed: int,
                  layer: int) -> list[list[int]]:
    """Kept positions (ascending) per KV head of the policy `name` for one layer, from its
    causal attention probabilities probs [Hq, N, N] and keys [1, Hkv, N, D]."""
    hkv, n = keys.shape[1], keys.shape[2]
    every = range(n)
    if name == "full" or budget == n:
        return [list(every)] * hkv
    if name == "streaming":
        return [streaming_kept(n, budget)] * hkv
    if name == "h2o":
        heavy = group_sum(probs.double().sum(dim=1), hkv)  # attention received, over every query
        recent = budget // 2
        return [ranked(heavy[h].tolist(), range(n - recent), budget - recent) + list(range(n - recent, n))
                for h in range(hkv)]
    if name == "snapkv":
        scores = snapkv_scores64(probs, hkv, min(kp.WINDOW, n), kp.POOL)
        return [ranked(scores[h].tolist(), every, budget) for h in range(hkv)]
    if name == "knorm":
        norms = keys[0].double().pow(2).sum(-1).sqrt()
        return [ranked((-norms[h]).tolist(), every, budget) for h in range(hkv)]
    if name == "random":
        # the documented draw: uniform [Hkv, N] from a generator seeded with seed * 1_000_003 + layer
        draw = torch.rand(hkv, n, generator=torch.Generator().manual_seed(seed * 1_000_003 + layer))
        return [ranked(draw[h].tolist(), every, budget) for h in range(hkv)]
    raise AssertionError(f"no reference for policy {name!r}")


def recall(answers: Sequence[str], text: str) -> float:
    """RULER's score: the fraction of the answers found in `text` as whole words, any case."""
    return sum(bool(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text, re.IGNORECASE)) for a in answers) / len(answers)


# ---------------------------------------------------------------- compressed caches, by masking

def prefill_kept(model: Any, ids: list[int], policy: str, budget: int, seed: int) -> list[list[list[int]]]:
    """Kept positions [layer][KV head] of the policy over the uncompressed prefill of `ids`,
    from the eager model's own attention probabilities and cached keys."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True, output_attentions=True)
    cache = out.past_key_values
    return [expected_kept(policy, probs[0], cache.layers[i].keys, budget=budget, seed=seed, layer=i)
            for i, probs in enumerate(out.attentions)]


def _mask(model: Any, per_head: list[list[int]], prefix: int, first: int, length: int) -> torch.Tensor:
    """The additive mask [1, Hq, length - first, length] of one layer for the queries at
    positions first .. length - 1: causal, and from `prefix` on blind to the prefix positions
    their KV head (per_head[kv head]) did not keep."""
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    rows = torch.arange(first, length)[:, None]
    allowed = references.visible(length - first, length).repeat(hq, 1, 1)  # causal, the queries the last ones
    for h in range(hq):
        visible = torch.zeros(length, dtype=torch.bool)
        visible[per_head[h // (hq // hkv)]] = True
        visible[prefix:] = True
        allowed[h] &= visible | (rows < prefix)
    return torch.zeros(1, hq, length - first, length).masked_fill(~allowed, -math.inf)


def masked_forward(model: Any, ids: list[int], kept: list[list[list[int]]], prefix: int,
                   cache: Any = None) -> tuple[torch.Tensor, Any]:
    """(logits [len(ids), V], the cache) of an eager model fed `ids` after the tokens `cache`
    holds (none: ids start the sequence; the cache is a plain, uncompressed one), where the
    tokens at positions >= prefix see, in layer l and query head h, only the prefix positions
    kept[l][h's KV head] and the tokens from prefix on (causally); earlier tokens see all
    earlier ones, as in the uncompressed prefill."""
    first = cache.get_seq_length() if cache is not None else 0
    masks = [_mask(model, per_head, prefix, first, first + len(ids)) for per_head in kept]

    def hook(index: int):
        def replace(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "attention_mask": masks[index]}
        return replace

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return out.logits[0].float(), out.past_key_values


def masked_greedy(model: Any, prompt: list[int], kept: list[list[list[int]]], steps: int,
                  stop: set[int]) -> list[int]:
    """Greedy tokens after `prompt` whose first len(prompt) - 1 tokens were prefilled and
    compressed to `kept`: at most `steps`, ending at a token of `stop` (not returned)."""
    tokens: list[int] = []
    logits, cache = masked_forward(model, prompt, kept, len(prompt) - 1)
    for _ in range(steps):
        token = int(logits[-1].argmax())
        if token in stop:
            break
        tokens.append(token)
        logits, cache = masked_forward(model, [token], kept, len(prompt) - 1, cache)
    return tokens


def masked_ppl(model: Any, ids: list[int], context: int, kept: list[list[list[int]]]) -> float:
    """Perplexity of ids[context:] given ids[:context], whose first context - 1 tokens were
    prefilled and compressed to `kept`."""
    logits, _ = masked_forward(model, ids, kept, context - 1)
    nll = torch.nn.functional.cross_entropy(logits[context - 1:-1].double(), torch.tensor(ids[context:]))
    return math.exp(float(nll))
