"""KV-cache policies (ctxbench.measurements.ruler.policies) against float64 references and constructed cases."""

from __future__ import annotations

import math

import pytest
import torch

from ctxbench.measurements.ruler import policies as kp
from ctxbench.engine.plan import parse_budgets, resolve_budget


def _qk(n: int, hq: int = 4, hkv: int = 2, d: int = 16, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(1, hq, n, d, generator=g), torch.randn(1, hkv, n, d, generator=g)


def _probs64(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal attention probabilities [Hq, N, N] in float64, keys repeated per query head by a loop."""
    hq, hkv = q.shape[1], k.shape[1]
    n = q.shape[2]
    out = torch.empty(hq, n, n, dtype=torch.float64)
    for h in range(hq):
        kh = k[0, h // (hq // hkv)].double()
        logits = q[0, h].double() @ kh.T * scaling
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        out[h] = torch.softmax(logits, dim=-1)
    return out


def _group_sum(x: torch.Tensor, hkv: int) -> torch.Tensor:
    return torch.stack([x[h * (x.shape[0] // hkv):(h + 1) * (x.shape[0] // hkv)].sum(0) for h in range(hkv)])


def test_h2o_scores_are_the_accumulated_attention():
    q, k = _qk(37)
    want = _group_sum(_probs64(q, k, 0.25).sum(dim=1), 2)
    got = kp.h2o_scores(q, k, scaling=0.25)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # query chunking (a few rows at a time) gives the same sums
    small = kp.h2o_scores(q, k, scaling=0.25, chunk_bytes=4 * 4 * 37 * 3)
    torch.testing.assert_close(small, got, rtol=1e-5, atol=1e-5)
    assert float(got.sum()) == pytest.approx(4 * 37, rel=1e-5)  # every query's probabilities sum to 1


def test_snapkv_scores_pool_the_window_votes():
    n, w, pool = 50, 8, 5
    q, k = _qk(n)
    p = _probs64(q, k, 0.2)[:, n - w:].sum(dim=1)  # [Hq, N]: the window's votes
    votes = _group_sum(p, 2)
    want = torch.stack([torch.stack([votes[h, max(0, j - pool // 2):min(n - w, j + pool // 2 + 1)].sum() / pool
                                     for j in range(n - w)]) for h in range(2)])
    got = kp.snapkv_scores(q, k, scaling=0.2, window=w, pool=pool)
    assert got.shape == (2, n)
    torch.testing.assert_close(got[:, :n - w].double(), want, rtol=1e-5, atol=1e-6)
    assert torch.isinf(got[:, n - w:]).all()


def test_knorm_and_random_scores():
    _, k = _qk(20)
    torch.testing.assert_close(kp.knorm_scores(k).double(), -k[0].double().pow(2).sum(-1).sqrt())
    a = kp.random_scores(k, seed=3, layer=1)
    assert torch.equal(a, kp.random_scores(k, seed=3, layer=1))
    assert not torch.equal(a, kp.random_scores(k, seed=3, layer=2))
    assert a.shape == (2, 20) and 0 <= float(a.min()) and float(a.max()) < 1


@pytest.mark.parametrize("policy", kp.POLICIES)
def test_every_policy_keeps_exactly_its_budget(policy):
    n = 61
    q, k = _qk(n)
    scores = kp.policy_scores(policy, q, k, scaling=0.25, seed=1, layer=0)
    for keep in (1, 2, 5, 17, 32, 60, 61):
        if policy == "full" and keep != n:
            continue
        index = kp.select(policy, scores, n, keep)
        assert index.shape[-1] == keep
        for row in index:
            assert len(set(row.tolist())) == keep  # distinct positions
            assert row.tolist() == sorted(row.tolist()) and 0 <= int(row.min()) and int(row.max()) < n
        v = torch.randn(1, 2, n, 8)
        kept = kp.gather(v, index)
        assert kept.shape == (1, 2, keep, 8)
        for h in range(2):
            rows = index[h if index.shape[0] > 1 else 0]
            assert torch.equal(kept[0, h], v[0, h, rows])


def test_streaming_keeps_sinks_and_the_last_window():
    n, keep = 100, 20
    assert kp.select("streaming", None, n, keep)[0].tolist() == list(range(kp.SINKS)) + list(range(n - 16, n))
    assert kp.select("streaming", None, n, 1)[0].tolist() == [n - 1]  # a tiny budget keeps the latest token


def test_h2o_keeps_the_heavy_hitters_and_the_recent_half():
    """Two planted keys aligned with every query draw the attention: H2O must keep them."""
    n, d = 80, 16
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    direction = torch.randn(d, generator=g)
    q = torch.randn(1, 2, n, d, generator=g) * 0.1 + direction
    k = torch.randn(1, 1, n, d, generator=g) * 0.1
    heavy = [3, 21]
    for j in heavy:
        k[0, 0, j] = direction * 3
    scores = kp.h2o_scores(q, k, scaling=d ** -0.5)
    index = kp.select("h2o", scores, n, 10)[0].tolist()
    assert index[5:] == list(range(n - 5, n))  # keep // 2 recent tokens, always
    assert set(heavy) <= set(index[:5])
    # the older half holds the top-scoring older keys
    older = scores[0, :n - 5]
    assert set(index[:5]) == set(older.topk(5).indices.tolist())


def test_snapkv_keeps_the_needle_the_question_asks_about():
    """The window's queries point at a needle's keys: SnapKV keeps them (and the window); a
    StreamingLLM cache of the same size does not."""
    n, d, w = 120, 16, 8
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    q = torch.randn(1, 1, n, d, generator=g) * 0.1
    k = torch.randn(1, 1, n, d, generator=g) * 0.1
    direction = torch.randn(d, generator=g)
    q[0, 0, n - w:] += direction * 2
    needle = 50
    k[0, 0, needle] = direction * 2
    scores = kp.snapkv_scores(q, k, scaling=d ** -0.5, window=w, pool=5)
    kept = kp.select("snapkv", scores, n, 5 + w)[0].tolist()
    assert set(range(needle - 2, needle + 3)) <= set(kept)  # pooled over 5: the needle's neighbours too
    assert set(range(n - w, n)) <= set(kept)
    assert needle not in kp.select("streaming", None, n, 5 + w)[0].tolist()


def test_ties_go_to_the_more_recent_token():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0]])
    assert kp.top_tokens(scores, 2).tolist() == [[2, 4]]
    assert kp.top_tokens(scores, 4).tolist() == [[1, 2, 4, 5]]


def test_budget_parsing_and_resolution():
    assert parse_budgets("512, 0.25,512") == (512, 0.25)
    assert resolve_budget(512, 300) == 300 and resolve_budget(512, 4096) == 512
    assert resolve_budget(0.25, 4096) == 1024 and resolve_budget(0.001, 100) == 1
    assert resolve_budget(None, 77) == 77
    for bad in ("0", "-3", "1.0", "1.5", "abc", "", "0.0"):
        with pytest.raises(ValueError, match="--kv-budget") as e:
            parse_budgets(bad)
        assert "\n" not in str(e.value)


def test_policy_parsing():
    assert kp.parse_policies("all") == kp.POLICIES
    assert kp.parse_policies("snapkv,full,snapkv") == ("snapkv", "full")
    with pytest.raises(ValueError, match="--policies: unknown policy 'pyramid'"):
        kp.parse_policies("full,pyramid")
