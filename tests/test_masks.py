"""ctxbench.core.masks.Mask against brute force: every answer it gives (visible pairs, counts, key
spans, tile flags) is recomputed here by looping over (query, key) pairs with the rule written
out independently, for masks and shapes drawn at random from a fixed, printed seed.
"""

from __future__ import annotations

import random

import pytest
import torch

from ctxbench.core.masks import Mask
from ctxbench.registry import Impl

SEED = 20240610
CASES = 300


def sees(kind: str, w: int | None, s: int, off: int, i: int, j: int) -> bool:
    """The convention, written out for one pair: query row i (position off + i), key j."""
    if kind == "none":
        return True
    p = off + i
    if j > p:
        return False
    return kind == "causal" or j > p - w or j < s


def random_mask(rng: random.Random) -> Mask:
    kind = rng.choice(["none", "causal", "window", "window"])
    if kind != "window":
        return Mask(kind, q_offset=rng.choice([0, 0, rng.randrange(1, 40)]))
    return Mask("window", rng.randrange(1, 30), rng.choice([0, 0, rng.randrange(1, 12)]),
                rng.choice([0, 0, rng.randrange(1, 40)]))


def random_shape(rng: random.Random, m: Mask) -> tuple[int, int]:
    """(n_q, n_k): often the decode shape (bottom-right, n_k = q_offset + n_q), sometimes not."""
    n_q = rng.randrange(0, 45)
    if rng.random() < 0.6:
        return n_q, m.q_offset + n_q
    return n_q, rng.randrange(0, 60)


def brute(m: Mask, n_q: int, n_k: int) -> torch.Tensor:
    return torch.tensor([[sees(m.kind, m.window, m.sinks, m.q_offset, i, j) for j in range(n_k)] for i in range(n_q)],
                        dtype=torch.bool).reshape(n_q, n_k)


def cases(offset: int = 0):
    rng = random.Random(SEED + offset)
    print(f"masks drawn from random.Random({SEED + offset})")
    for _ in range(CASES):
        m = random_mask(rng)
        n_q, n_k = random_shape(rng, m)
        yield rng, m, n_q, n_k


def test_visible_and_visible_pairs_match_brute_force():
    for _, m, n_q, n_k in cases():
        want = brute(m, n_q, n_k)
        got = m.visible(torch.arange(n_q), torch.arange(n_k))
        got = torch.ones(n_q, n_k, dtype=torch.bool) if got is None else got
        assert torch.equal(got, want), (SEED, m, n_q, n_k)
        assert m.visible_pairs(n_q, n_k) == int(want.sum()), (SEED, m, n_q, n_k)
    assert Mask("none").visible(torch.arange(3), torch.arange(3)) is None


def test_visible_takes_any_rows_and_cols():
    """Rows are query row indices and cols key positions, in any order or subset."""
    rng = random.Random(SEED + 1)
    for _ in range(50):
        m = Mask("window", rng.randrange(1, 9), rng.randrange(0, 4), rng.randrange(0, 10))
        rows = torch.tensor(rng.sample(range(30), 7))
        cols = torch.tensor(rng.sample(range(40), 11))
        want = torch.tensor([[sees(m.kind, m.window, m.sinks, m.q_offset, int(i), int(j)) for j in cols] for i in rows])
        assert torch.equal(m.visible(rows, cols), want), (SEED + 1, m, rows, cols)


def old_visible_pairs(n: int, causal: bool, window: int | None, sinks: int = 0) -> int:
    """ctxbench.core.masks.visible_pairs before the Mask, kept as an independent closed form."""
    if window is not None:
        w = min(window, n)
        pairs = w * (w + 1) // 2 + (n - w) * w
        if sinks > 0 and n > w:
            m, s = n - w, sinks
            pairs += m * (m + 1) // 2 if m <= s else s * (s + 1) // 2 + (m - s) * s
        return pairs
    if causal:
        return n * (n + 1) // 2
    return n * n


@pytest.mark.parametrize("n", [0, 1, 2, 5, 40, 100, 1000, 32768, 10**6])
def test_visible_pairs_equals_the_old_closed_form_at_offset_0(n):
    for window in (None, 1, 3, 16, 200, 4096, max(n, 1), n + 5):
        for sinks in (0, 1, 4, 50, 10**5):
            m = Mask.of(True, window, sinks)
            assert m.visible_pairs(n) == old_visible_pairs(n, True, window, sinks if window else 0), (n, window, sinks)
    assert Mask("none").visible_pairs(n) == old_visible_pairs(n, False, None)


def brute_span(m: Mask, q_start: int, q_end: int, n_k: int) -> set[int]:
    """Keys seen by some row of [q_start, q_end), sinks left of the band excluded as key_span does."""
    return {j for j in range(n_k) for i in range(q_start, q_end) if sees(m.kind, m.window, 0, m.q_offset, i, j)}


def test_key_span_needs_mask_and_sees_any_match_brute_force():
    for rng, m, n_q, n_k in cases(2):
        if n_q == 0:
            continue
        q_start = rng.randrange(0, n_q)
        q_end = rng.randrange(q_start + 1, n_q + 1)
        lo, hi = m.key_span(q_start, q_end, n_k)
        band = brute_span(m, q_start, q_end, n_k)
        assert lo <= hi and set(range(lo, hi)) == band, (SEED + 2, m, q_start, q_end, n_k, lo, hi)
        # With sinks, the keys below min(sinks, lo) are the rest of what the rows see, seen by all.
        ok = brute(m, n_q, n_k)[q_start:q_end]
        sink_keys = list(range(min(m.sinks, lo)))
        assert bool(ok[:, sink_keys].all()), (SEED + 2, m, q_start, q_end, n_k)
        assert set(torch.nonzero(ok.any(0)).flatten().tolist()) == band | set(sink_keys), (SEED + 2, m)
        for _ in range(5):
            k_start = rng.randrange(0, n_k + 1)
            k_end = rng.randrange(k_start, n_k + 1)
            tile = ok[:, k_start:k_end]
            assert m.needs_mask(q_start, q_end, k_start, k_end) == (not bool(tile.all())), \
                (SEED + 2, m, q_start, q_end, k_start, k_end)
            assert m.sees_any(q_start, q_end, k_start, k_end) == bool(tile.any()), \
                (SEED + 2, m, q_start, q_end, k_start, k_end)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="window"), "window of at least 1"),
    (dict(kind="window", window=0), "window of at least 1"),
    (dict(kind="causal", window=4), "only 'window'"),
    (dict(kind="none", window=4), "only 'window'"),
    (dict(kind="causal", sinks=2), "sinks only exist beside a window"),
    (dict(kind="window", window=4, sinks=-1), "sinks must be >= 0"),
    (dict(kind="causal", q_offset=-1), "q_offset must be >= 0"),
    (dict(kind="sliding"), "mask kind must be one of"),
])
def test_invalid_masks_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mask(**kwargs)


def test_of_holds_the_contract_rules():
    assert Mask.of(False, None) == Mask("none")
    assert Mask.of(True, None) == Mask("causal")
    assert Mask.of(False, 8) == Mask.of(True, 8) == Mask("window", 8)  # a window implies causal
    assert Mask.of(True, None, sinks=4) == Mask("causal")               # sinks only with a window
    assert Mask.of(False, 8, sinks=4) == Mask("window", 8, 4)
    assert Mask.of(True, 8, 0, q_offset=3).q_offset == 3
    with pytest.raises(ValueError):
        Mask.of(True, 0)
    with pytest.raises(ValueError):
        Mask.of(True, 8, sinks=-1)


def test_named_keeps_window_and_sinks_only_for_window():
    assert Mask.named("causal", 16, 4) == Mask("causal")
    assert Mask.named("none", 16) == Mask("none")
    assert Mask.named("window", 16, 4) == Mask("window", 16, 4)


def test_properties_and_text():
    assert [Mask(k, 4 if k == "window" else None).causal for k in ("none", "causal", "window")] == [False, True, True]
    assert Mask("causal").describe() == "causal"
    assert Mask("window", 256, 4).describe() == "window W=256 + 4 sinks"
    assert Mask("none").contract_kwargs() == {"causal": False, "window": None}
    assert Mask("window", 256).contract_kwargs() == {"causal": True, "window": 256}
    assert Mask("window", 256, 4).contract_kwargs() == {"causal": True, "window": 256, "sinks": 4}
    assert hash(Mask("window", 3, 1)) == hash(Mask.of(False, 3, 1))


def test_impl_call_passes_sinks_only_when_positive():
    seen = []

    def plain(q, k, v, *, causal, window, scale=None):  # no sinks parameter: must keep working
        seen.append(("plain", causal, window, scale))
        return q

    def with_sinks(q, k, v, *, causal, window, scale=None, sinks=0):
        seen.append(("sinks", causal, window, scale, sinks))
        return q

    t = torch.zeros(1, 1, 4, 2)
    Impl("p", plain).call(t, t, t, Mask("causal"))
    Impl("p", plain).call(t, t, t, Mask("window", 3), 0.5)
    Impl("s", with_sinks, sinks=True).call(t, t, t, Mask("window", 3, 2))
    assert seen == [("plain", True, None, None), ("plain", True, 3, 0.5), ("sinks", True, 3, None, 2)]


def test_impl_call_refuses_an_offset_the_shapes_contradict():
    def fn(q, k, v, *, causal, window, scale=None):
        return q

    q, kv = torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 6, 4)
    assert Impl("f", fn).call(q, kv, kv, Mask("causal", q_offset=4)) is q  # decode shape: fine
    with pytest.raises(ValueError, match="q_offset"):
        Impl("f", fn).call(q, kv, kv, Mask("causal"))
