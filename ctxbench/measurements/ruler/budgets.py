"""KV budgets of `ctxbench ruler` (--kv-budget): a token count or a ratio of the context, and the
tokens each keeps of a context of n tokens. No torch: the planning side and the worker share it."""

from __future__ import annotations


def parse_budget(text: str) -> int | float:
    """One budget: an integer is a token count (>= 1), a decimal 0 < r < 1 a ratio of the context.
    Raises ValueError with a one-line message naming --kv-budget."""
    t = text.strip()
    try:
        if t.isdigit():
            value: int | float = int(t)
            if value >= 1:
                return value
        else:
            value = float(t)
            if 0 < value < 1:
                return value
    except ValueError:
        pass
    raise ValueError(f"--kv-budget: {text!r} is neither a token count (an integer >= 1) nor a ratio of the "
                     "context (a decimal between 0 and 1, exclusive); e.g. --kv-budget 512,1024 or 0.25,0.5")


def parse_budgets(text: str) -> tuple[int | float, ...]:
    """Budgets from a comma-separated list (see parse_budget), each once, in the order given."""
    items = [b for b in text.split(",") if b.strip()]
    if not items:
        raise ValueError("--kv-budget: no budget given; e.g. --kv-budget 512,1024 or 0.25,0.5")
    return tuple(dict.fromkeys(parse_budget(b) for b in items))


def resolve_budget(budget: int | float | None, n: int) -> int:
    """Tokens kept of a context of n tokens: n for no budget, a token budget capped at n, or
    round(ratio x n) (at least 1)."""
    if budget is None:
        return n
    if isinstance(budget, int):
        return min(budget, n)
    return min(n, max(1, round(budget * n)))




def policy_budgets(policies: list[str], budgets: list[str], n: int) -> list[tuple[str, str | None]]:
    """(policy, budget) pairs at context length n (tokens): "full" once with no budget; a
    compressing policy at each budget that keeps fewer than the n - 1 tokens cached before the
    last prompt token (one that keeps all of them is the full cache, planned once), each
    kept-token count once per policy."""
    pairs: list[tuple[str, str | None]] = []
    for policy in policies:
        if policy == "full":
            pairs.append(("full", None))
            continue
        kept: set[int] = set()
        for budget in budgets:
            tokens = resolve_budget(parse_budget(budget), n)
            if tokens < n - 1 and tokens not in kept:
                kept.add(tokens)
                pairs.append((policy, budget))
    return pairs
