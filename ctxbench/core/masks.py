"""The mask convention in one place: which (query, key) pairs are visible.

Keys sit at positions 0 .. Lk-1. Query row i sits at position p = q_offset + i: q_offset is
0 when queries and keys are the same sequence (Lq == Lk: prefill), and Lk - Lq when the
queries are the last Lq tokens (decoding or chunked prefill against a KV cache): queries are aligned to
the bottom-right corner of the score matrix, as FlashAttention's causal mask is.

    none:    every pair is visible
    causal:  query i sees key j when j <= p
    window:  causal, and also p - W < j (W keys, the query's own included); with S attention
             sinks (StreamingLLM) the keys j < S stay visible too:
             j <= p and (p - W < j or j < S)

Mask.of maps an implementation's (causal, window, sinks) arguments onto this, and holds the
two rules of that contract: a window implies causal, and sinks only count with a window.
Everything that needs the convention (kernels, the reference, FLOP counts, the sweep plan)
asks a Mask rather than restating it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only tensor operators are used: plan.py and the CLI import this without torch
    import torch

KINDS = ("none", "causal", "window")


@dataclass(frozen=True)
class Mask:
    """Which keys each query sees: kind, window W (keys), sinks S (keys), q_offset (positions).

    Positions are token indices; every count a method returns is a number of keys or of
    (query, key) pairs. Immutable and hashable, so it can key caches and travel in cells.
    """

    kind: str = "causal"
    window: int | None = None
    sinks: int = 0
    q_offset: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"mask kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.kind == "window":
            if self.window is None or self.window < 1:
                raise ValueError(f"a window mask needs a window of at least 1 key (got {self.window}); "
                                 "a window of W keys includes the query itself")
        elif self.window is not None:
            raise ValueError(f"window={self.window} given with mask kind {self.kind!r}; only 'window' has one")
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0 (got {self.sinks})")
        if self.sinks and self.kind != "window":
            raise ValueError(f"sinks={self.sinks} given with mask kind {self.kind!r}; sinks only exist beside a window")
        if self.q_offset < 0:
            raise ValueError(f"q_offset must be >= 0 (got {self.q_offset})")

    # ------------------------------------------------------------------ construction

    @classmethod
    def of(cls, causal: bool, window: int | None, sinks: int = 0, q_offset: int = 0) -> "Mask":
        """The mask an implementation called with (causal, window, sinks) must apply.

        The one place the contract's two rules live: a window implies causal, and sinks only
        count with a window (they are dropped, not refused, without one).
        """
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0 (got {sinks})")
        if window is not None:
            return cls("window", window, sinks, q_offset)
        return cls("causal" if causal else "none", None, 0, q_offset)

    @classmethod
    def named(cls, name: str, window: int | None = None, sinks: int = 0, q_offset: int = 0) -> "Mask":
        """The mask of a sweep's mask column `name`: only 'window' keeps the window and sinks
        (a configuration may carry a window or sinks that its mask does not use)."""
        if name == "window":
            return cls("window", window, sinks, q_offset)
        return cls(name, q_offset=q_offset)

    # ------------------------------------------------------------------ the contract

    @property
    def causal(self) -> bool:
        """Whether queries never see keys after their own position."""
        return self.kind != "none"

    def contract_kwargs(self) -> dict:
        """Keyword arguments for an implementation: causal, window, and sinks only when > 0
        (plain functions without a sinks parameter keep working). The offset is not passed:
        bottom-right alignment makes it Lk - Lq, which the shapes already say."""
        kwargs: dict = {"causal": self.causal, "window": self.window}
        if self.sinks > 0:
            kwargs["sinks"] = self.sinks
        return kwargs

    def describe(self) -> str:
        """Short text for messages, e.g. 'causal' or 'window W=256 + 4 sinks'."""
        text = {"none": "no mask", "causal": "causal"}.get(self.kind) or f"window W={self.window}"
        if self.sinks:
            text += f" + {self.sinks} sinks"
        if self.q_offset:
            text += f" (queries from position {self.q_offset})"
        return text

    # ------------------------------------------------------------------ pairs

    def visible(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
        """Boolean [len(rows), len(cols)]: whether query row rows[a] sees key cols[b].

        rows are query row indices (position q_offset + row), cols key positions, both 1-D
        integer tensors. None when every pair is visible (no mask), so callers can skip masking.
        """
        if self.kind == "none":
            return None
        p = rows[:, None] + self.q_offset if self.q_offset else rows[:, None]
        return self.sees(p, cols[None, :])

    def sees(self, p, j):
        """Whether the query at position p sees the key at position j, elementwise: p and j are
        integer tensors of broadcastable shapes (or ints; positions, not rows: p = q_offset + row).

        The rule itself, stated once: visible() calls it on a grid, FlexAttention's mask_mod
        (kernels/flex.py) on the indices flex_attention traces it with.
        """
        if self.kind == "none":
            return j >= 0  # every position is visible
        ok = j <= p
        if self.window is not None:
            band = j > p - self.window
            if self.sinks > 0:
                band = band | (j < self.sinks)
            ok = ok & band
        return ok

    def visible_pairs(self, n_q: int, n_k: int | None = None) -> int:
        """Exact number of visible (query, key) pairs for n_q query rows and n_k keys
        (n_k defaults to n_q): the work of one head, in O(1)."""
        n_k = n_q if n_k is None else n_k
        if self.kind == "none":
            return n_q * n_k
        a, b = self.q_offset, self.q_offset + n_q  # query positions [a, b)
        # Query p sees the keys [p - W + 1, p] clipped to [0, n_k), plus with sinks the keys
        # below both S and that band: each count is a clipped line in p, summed in closed form.
        pairs = _sum_clamped(a, b, 1, n_k)
        if self.window is not None:
            pairs -= _sum_clamped(a, b, 1 - self.window, n_k)
            if self.sinks > 0:
                pairs += _sum_clamped(a, b, 1 - self.window, min(self.sinks, n_k))
        return pairs

    def keys_seen(self, n_q: int, n_k: int | None = None) -> int:
        """How many of the n_k keys at least one of the n_q query rows sees: the K and V rows an
        implementation must read at least once (the minimum traffic of ctxbench.core.flops)."""
        n_k = n_q if n_k is None else n_k
        if n_q <= 0 or n_k <= 0:
            return 0
        lo, hi = self.key_span(0, n_q, n_k)
        return (hi - lo) + min(self.sinks, lo)

    # ------------------------------------------------------------------ blocks and tiles

    def key_span(self, q_start: int, q_end: int, n_k: int) -> tuple[int, int]:
        """Keys [lo, hi) forming the band that query rows [q_start, q_end) see, sinks excluded.

        Every key in the band is seen by at least one of the rows; with sinks, the keys
        [0, min(sinks, lo)) are also seen, by every row. lo == hi when the band is empty.
        """
        if self.kind == "none":
            return 0, n_k
        hi = min(n_k, self.q_offset + q_end)
        lo = 0 if self.window is None else max(0, self.q_offset + q_start - self.window + 1)
        return min(lo, hi), hi

    def needs_mask(self, q_start: int, q_end: int, k_start: int, k_end: int) -> bool:
        """Whether some query row in [q_start, q_end) cannot see some key in [k_start, k_end)
        (False for an empty tile): only such tiles pay for masking."""
        if self.kind == "none" or q_start >= q_end or k_start >= k_end:
            return False
        first_p, last_p = self.q_offset + q_start, self.q_offset + q_end - 1
        if k_end - 1 > first_p:  # the first query cannot see the last key
            return True
        if self.window is not None:
            first = max(k_start, self.sinks)  # keys below `sinks` are never hidden by the window
            if first < k_end and first <= last_p - self.window:  # the last query's window misses it
                return True
        return False

    def sees_any(self, q_start: int, q_end: int, k_start: int, k_end: int) -> bool:
        """Whether some query row in [q_start, q_end) sees some key in [k_start, k_end)."""
        if q_start >= q_end or k_start >= k_end:
            return False
        lo, hi = self.key_span(q_start, q_end, k_end)
        return (k_start < hi and lo < k_end) or k_start < min(self.sinks, lo)


def _sum_clamped(a: int, b: int, c: int, cap: int) -> int:
    """sum over p in [a, b) of clamp(p + c, 0, cap), exactly."""
    if b <= a or cap <= 0:
        return 0
    return _prefix(b + c, cap) - _prefix(a + c, cap)


def _prefix(m: int, cap: int) -> int:
    """sum over x < m of clamp(x, 0, cap) (terms below 0 are 0)."""
    if m <= 0:
        return 0
    if m <= cap + 1:
        return m * (m - 1) // 2
    return cap * (cap + 1) // 2 + (m - cap - 1) * cap
