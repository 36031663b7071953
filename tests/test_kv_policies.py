"""KV-cache policies (ctxbench.measurements.ruler.policies): one class per policy, each kept set
against an independent float64 reference (tests/ruler_references.py), the scores against
float64 attention, constructed cases the papers describe, and the registry."""

from __future__ import annotations

import inspect
import math
import subprocess
import sys

import pytest
import torch

import ruler_references as ref
from references import random_qkv
from ctxbench.measurements.ruler import policies as kp
from ctxbench.measurements.ruler.budgets import parse_budgets, resolve_budget

HQ, HKV = 4, 2  # query heads and KV heads of the random inputs: two query heads per KV head


def _qk(n: int, seed: int, hq: int = HQ, hkv: int = HKV, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded standard-normal queries [1, hq, n, d] and keys [1, hkv, n, d]."""
    q, k, _ = random_qkv(seed, 1, hq, hkv, n, n, d)
    return q, k


# ---------------------------------------------------------------- registry

def test_each_policy_is_one_registered_class_declaring_its_name():
    assert kp.POLICY_NAMES == ("full", "streaming", "h2o", "snapkv", "knorm", "random")
    assert tuple(kp.POLICIES) == kp.POLICY_NAMES
    assert all(policy.name == name for name, policy in kp.POLICIES.items())

    def concrete(cls: type) -> set[type]:
        below = set().union(*(concrete(c) for c in cls.__subclasses__()))
        return below | ({cls} if not inspect.isabstract(cls) else set())

    # a new policy class that is not in the registry would never run
    assert {type(p) for p in kp.POLICIES.values()} == {c for c in concrete(kp.Policy) if c.__module__ == kp.__name__}
    assert {n for n, p in kp.POLICIES.items() if p.scored} == {"h2o", "snapkv", "knorm", "random"}


def test_get_names_the_known_policies_when_it_fails():
    assert isinstance(kp.get("snapkv"), kp.SnapKV) and kp.get("full") is kp.POLICIES["full"]
    with pytest.raises(ValueError) as info:
        kp.get("pyramid")
    assert str(info.value) == ("unknown KV-cache policy 'pyramid'; choose from full, streaming, h2o, snapkv, knorm, "
                               "random")


def test_policy_parsing():
    assert kp.parse_policies("all") == kp.POLICY_NAMES
    assert kp.parse_policies("snapkv,full,snapkv") == ("snapkv", "full")
    for bad, named in (("full,pyramid", "'pyramid'"), (" , ", "' , '")):
        with pytest.raises(ValueError) as info:
            kp.parse_policies(bad)
        message = str(info.value)
        assert message.startswith(f"--policies: unknown policy {named}; choose from full, streaming")
        assert "\n" not in message


def test_the_names_are_importable_without_torch():
    """The planning and report sides list the policies; that must not load torch."""
    code = ("import sys; from ctxbench.measurements.ruler import policies as p; "
            "print(','.join(p.POLICY_NAMES), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["full,streaming,h2o,snapkv,knorm,random", "False"]


# ---------------------------------------------------------------- scores

def test_h2o_scores_are_the_accumulated_attention():
    q, k = _qk(37, seed=11)
    want = ref.group_sum(ref.probs64(q, k, 0.25).sum(dim=1), HKV)
    got = kp.H2O().score(q, k, scaling=0.25)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # query chunking (three rows at a time) gives the same sums
    small = kp.H2O(chunk_bytes=HQ * 37 * 4 * 3).score(q, k, scaling=0.25)
    torch.testing.assert_close(small, got, rtol=1e-5, atol=1e-5)
    assert float(got.sum()) == pytest.approx(HQ * 37, rel=1e-5)  # every query's probabilities sum to 1


@pytest.mark.parametrize("pool", [5, 4])
def test_snapkv_scores_pool_the_window_votes(pool):
    """The shipped pool (5) and an even one, whose padding adds a column the policy drops."""
    n, w = 50, 8
    q, k = _qk(n, seed=12)
    want = ref.snapkv_scores64(ref.probs64(q, k, 0.2), HKV, w, pool)
    got = kp.SnapKV(window=w, pool=pool).score(q, k, scaling=0.2)
    assert got.shape == (HKV, n)
    torch.testing.assert_close(got[:, :n - w].double(), want[:, :n - w], rtol=1e-5, atol=1e-6)
    assert torch.isinf(got[:, n - w:]).all()


def test_knorm_and_random_scores():
    _, k = _qk(20, seed=13)
    torch.testing.assert_close(kp.KNorm().score(None, k, scaling=1.0).double(), -k[0].double().pow(2).sum(-1).sqrt())
    a = kp.Random().score(None, k, scaling=1.0, seed=3, layer=1)
    assert torch.equal(a, kp.Random().score(None, k, scaling=1.0, seed=3, layer=1))
    assert not torch.equal(a, kp.Random().score(None, k, scaling=1.0, seed=3, layer=2))
    assert not torch.equal(a, kp.Random().score(None, k, scaling=1.0, seed=4, layer=1))
    assert a.shape == (HKV, 20) and a.dtype == torch.float32


def test_unscored_policies_have_no_scores():
    q, k = _qk(10, seed=14)
    assert kp.FullCache().score(q, k, scaling=0.25) is None and kp.StreamingLLM().score(q, k, scaling=0.25) is None


# ---------------------------------------------------------------- kept positions, per policy

@pytest.mark.parametrize("seed", [21, 22, 23])
@pytest.mark.parametrize("name", kp.POLICY_NAMES)
def test_each_policy_keeps_what_the_reference_keeps(name, seed):
    """Every budget from one token to the whole cache: the kept positions of each KV head are
    the reference's (tests/ruler_references.py, float64 from the papers' rules)."""
    n, layer, scaling = 61, seed % 3, 0.25
    q, k = _qk(n, seed=seed)
    policy = kp.get(name)
    scores = policy.score(q, k, scaling=scaling, seed=seed, layer=layer)
    probs = ref.probs64(q, k, scaling)
    for budget in (1, 2, 3, 5, 17, 32, 33, 40, 60, 61):
        got = policy.keep(scores, n, budget)
        assert got.dtype == torch.int64 and got.shape[0] in (1, HKV)
        want = ref.expected_kept(name, probs, k, budget=budget, seed=seed, layer=layer)
        for h in range(HKV):
            assert got[min(h, got.shape[0] - 1)].tolist() == want[h], (name, budget, h)


def test_full_cache_keeps_everything_whatever_the_budget():
    assert kp.FullCache().keep(None, 30, 7).tolist() == [list(range(30))]


def test_streaming_keeps_sinks_and_the_last_window():
    n = 100
    assert kp.StreamingLLM().keep(None, n, 20)[0].tolist() == [0, 1, 2, 3] + list(range(84, 100))
    assert kp.StreamingLLM().keep(None, n, 3)[0].tolist() == [0, 1, 99]  # two sinks: one recent token stays
    assert kp.StreamingLLM().keep(None, n, 1)[0].tolist() == [n - 1]  # a tiny budget keeps the latest token
    assert kp.StreamingLLM(sinks=1).keep(None, n, 4)[0].tolist() == [0, 97, 98, 99]


def test_h2o_keeps_the_heavy_hitters_and_the_recent_half():
    """Two planted keys aligned with every query draw the attention: H2O must keep them."""
    n, d = 80, 16
    g = torch.Generator().manual_seed(31)
    direction = torch.randn(d, generator=g)
    q = torch.randn(1, 2, n, d, generator=g) * 0.1 + direction
    k = torch.randn(1, 1, n, d, generator=g) * 0.1
    heavy = [3, 21]
    for j in heavy:
        k[0, 0, j] = direction * 3
    h2o = kp.H2O()
    index = h2o.keep(h2o.score(q, k, scaling=d ** -0.5), n, 10)[0].tolist()
    assert index[5:] == list(range(n - 5, n))  # budget // 2 recent tokens, always
    assert set(heavy) <= set(index[:5])


def test_snapkv_keeps_the_needle_the_question_asks_about():
    """The window's queries point at a needle's keys: SnapKV keeps them (and the window); a
    StreamingLLM cache of the same size does not."""
    n, d, w = 120, 16, 8
    g = torch.Generator().manual_seed(32)
    q = torch.randn(1, 1, n, d, generator=g) * 0.1
    k = torch.randn(1, 1, n, d, generator=g) * 0.1
    direction = torch.randn(d, generator=g)
    q[0, 0, n - w:] += direction * 2
    needle = 50
    k[0, 0, needle] = direction * 2
    snapkv = kp.SnapKV(window=w, pool=5)
    kept = snapkv.keep(snapkv.score(q, k, scaling=d ** -0.5), n, 5 + w)[0].tolist()
    assert set(range(needle - 2, needle + 3)) <= set(kept)  # pooled over 5: the needle's neighbours too
    assert set(range(n - w, n)) <= set(kept)
    assert needle not in kp.StreamingLLM().keep(None, n, 5 + w)[0].tolist()


def test_ties_go_to_the_more_recent_token():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]])
    assert kp.top_tokens(scores, 2).tolist() == [[2, 4], [4, 5]]
    assert kp.top_tokens(scores, 4).tolist() == [[1, 2, 4, 5], [2, 3, 4, 5]]
    assert kp.KNorm().keep(scores, 6, 4).tolist() == [[1, 2, 4, 5], [2, 3, 4, 5]]


def test_keep_refuses_a_budget_outside_the_cache_and_missing_scores():
    for budget in (0, 11):
        with pytest.raises(ValueError, match=f"between 1 and 10 of 10 cached tokens, not {budget}"):
            kp.StreamingLLM().keep(None, 10, budget)
    with pytest.raises(ValueError, match="policy 'h2o' needs scores"):
        kp.H2O().keep(None, 10, 4)


def test_gather_takes_each_heads_kept_rows():
    g = torch.Generator().manual_seed(33)
    values = torch.randn(2, HKV, 12, 8, generator=g)
    per_head = torch.tensor([[0, 5, 11], [2, 3, 7]])
    got = kp.gather(values, per_head)
    assert got.shape == (2, HKV, 3, 8)
    for b in range(2):
        for h in range(HKV):
            assert torch.equal(got[b, h], values[b, h, per_head[h]])
    shared = kp.gather(values, torch.tensor([[1, 4]]))  # one row for every head
    assert torch.equal(shared, values[:, :, [1, 4]])


def test_budget_parsing_and_resolution():
    assert parse_budgets("512, 0.25,512") == (512, 0.25)
    assert resolve_budget(512, 300) == 300 and resolve_budget(512, 4096) == 512
    assert resolve_budget(0.25, 4096) == 1024 and resolve_budget(0.001, 100) == 1
    assert resolve_budget(None, 77) == 77
    for bad in ("0", "-3", "1.0", "1.5", "abc", "", "0.0"):
        with pytest.raises(ValueError, match="--kv-budget") as e:
            parse_budgets(bad)
        assert "\n" not in str(e.value)


def test_reference_ranking_flags_an_ambiguous_boundary():
    """The reference refuses a case whose kept set hinges on a float32 rounding."""
    assert ref.ranked([0.5, 2.0, 1.0, 2.0], range(4), 2) == [1, 3]
    with pytest.raises(AssertionError, match="ambiguous"):
        ref.ranked([0.5, 1.0 + 1e-7, 1.0, 2.0], range(4), 2)
    assert math.isinf(ref.snapkv_scores64(ref.probs64(*_qk(6, seed=34), 0.3), HKV, 2, 5)[0, -1])
