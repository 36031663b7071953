"""Perplexity of a causal language model whose attention runs through one implementation.

One perplexity cell = (implementation, length L, mask, RoPE variant, scheme). Method:

* The corpus is tokenized once (no special tokens). A window is L + 1 consecutive tokens:
  one forward pass over the first L (batch 1, no KV cache), and the token after each
  position is that position's target, so every position of a window can be scored.
* truncated: consecutive, non-overlapping windows; every position is scored, so a token's
  context ranges from 1 to L tokens (the mean over a window of length L).
* strided: windows start every S tokens (S = --ppl-stride, at most L) and only their last S
  positions are scored, so every scored token has at least L - S + 1 tokens of context and
  the scored tokens are contiguous, each scored once.
* Windows are taken from the start of the corpus until --ppl-tokens tokens are scored
  (at least one window; fewer when the corpus runs out).
* Per-token NLL (natural log) comes from the model's logits in fp32; sums accumulate in
  float64. ppl = exp(total NLL / tokens scored); bits_per_byte = total NLL / (ln 2 * bytes
  of the scored tokens' text), which compares across tokenizers; loss_curve is the mean
  NLL per bin of window positions (LOSS_BINS equal bins of [0, L); null where nothing was
  scored, e.g. the early bins of the strided scheme).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ctxbench.models import lm
from ctxbench.measurements.perplexity import SCHEMES
from ctxbench.models.prepare import prepare
from ctxbench.core.cell import Cell
from ctxbench.core.registry import Impl, Unsupported

LOSS_BINS = 16
# Positions whose logits go through cross entropy at once (bounds the fp32 copy of the logits).
CE_CHUNK = 1024


@dataclass(frozen=True)
class Window:
    """Forward tokens [start, start + length); targets one further; positions from
    `score_from` on are scored."""

    start: int
    score_from: int


def plan_windows(n_tokens: int, length: int, scheme: str, stride: int, budget: int) -> list[Window]:
    """The windows of a cell (see the module docstring); Unsupported when the corpus is too short."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown perplexity scheme {scheme!r}; choose {' or '.join(SCHEMES)}")
    if n_tokens < length + 1:
        raise Unsupported(f"the corpus has {n_tokens} tokens; a window of {length} needs {length + 1} "
                          "(pass --text with a longer file)")
    if scheme == "truncated":
        available = (n_tokens - 1) // length
        count = min(available, max(1, math.ceil(budget / length)))
        return [Window(i * length, 0) for i in range(count)]
    s = min(stride, length)
    available = (n_tokens - 1 - length) // s + 1
    count = min(available, max(1, math.ceil(budget / s)))
    return [Window(i * s, length - s) for i in range(count)]


class Accumulator:
    """Sums of per-token NLL in float64: totals, tokens, bytes, and per position bin."""

    def __init__(self, length: int, bins: int = LOSS_BINS) -> None:
        self.length = length
        self.bins = max(1, min(bins, length))
        self.nll = 0.0
        self.tokens = 0
        self.bytes = 0
        self.bin_sum = torch.zeros(self.bins, dtype=torch.float64)
        self.bin_count = torch.zeros(self.bins, dtype=torch.float64)

    def add(self, nll: torch.Tensor, score_from: int, n_bytes: int) -> None:
        """NLL of positions score_from .. score_from + len(nll) - 1 of one window, and the
        bytes of the scored tokens' text."""
        nll64 = nll.detach().to("cpu", torch.float64)
        self.nll += nll64.sum().item()
        self.tokens += nll64.numel()
        self.bytes += n_bytes
        pos = torch.arange(score_from, score_from + nll64.numel())
        b = pos * self.bins // self.length
        self.bin_sum.index_add_(0, b, nll64)
        self.bin_count.index_add_(0, b, torch.ones_like(nll64))

    def result(self) -> dict[str, Any]:
        mean = self.nll / self.tokens if self.tokens else float("nan")
        curve = [round(s / c, 5) if c else None for s, c in zip(self.bin_sum.tolist(), self.bin_count.tolist())]
        try:
            ppl = math.exp(mean)
        except OverflowError:
            ppl = float("inf")
        return {"ppl": ppl,
                "bits_per_byte": self.nll / (math.log(2) * self.bytes) if self.bytes else float("nan"),
                "ppl_tokens": self.tokens, "ppl_bytes": self.bytes, "loss_curve": json.dumps(curve)}


def window_nll(model: Any, ids: torch.Tensor, score_from: int) -> torch.Tensor:
    """Per-token NLL (fp32) of positions score_from .. L-1 of one window; ids holds L + 1 tokens."""
    length = ids.numel() - 1
    keep = length - score_from
    out = model(input_ids=ids[:-1].unsqueeze(0), use_cache=False, logits_to_keep=keep if score_from else 0)
    logits = out.logits[0]
    targets = ids[score_from + 1:]
    return torch.cat([F.cross_entropy(logits[a:a + CE_CHUNK].float(), targets[a:a + CE_CHUNK], reduction="none")
                      for a in range(0, keep, CE_CHUNK)])


def corpus_nll(model: Any, corpus: lm.Corpus, windows: list[Window], length: int,
               device: str) -> tuple[Accumulator, float]:
    """(accumulated NLL over `windows`, seconds spent in forward passes)."""
    acc = Accumulator(length)
    seconds = 0.0
    with torch.no_grad():
        for w in windows:
            ids = corpus.ids[w.start:w.start + length + 1].to(device)
            t0 = time.perf_counter()
            nll = window_nll(model, ids, w.score_from)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds += time.perf_counter() - t0
            acc.add(nll, w.score_from, corpus.bytes_of(w.start + w.score_from + 1, w.start + length + 1))
    return acc, seconds


def measure_perplexity(impl: Impl, cell: Cell, settings: Any) -> dict[str, Any]:
    """Measure one perplexity cell; returns the measured CSV fields with status and message."""
    model, ref = prepare(impl, cell, settings.model)
    corpus = lm.load_corpus(settings.text, ref)
    scheme = cell.get("ppl_scheme")
    windows = plan_windows(len(corpus), cell.n, scheme, settings.ppl_stride, settings.ppl_tokens)
    acc, seconds = corpus_nll(model, corpus, windows, cell.n, cell.device)
    row = acc.result()
    row.update(ppl_windows=len(windows), model=ref.label, corpus_sha256=corpus.sha256,
               ppl_stride=min(settings.ppl_stride, cell.n) if scheme == "strided" else None,
               tokens_per_s=len(windows) * cell.n / seconds if seconds > 0 else None)
    finite = math.isfinite(row["bits_per_byte"])
    row["status"] = "ok" if finite else "wrong"
    row["message"] = "" if finite else "non-finite loss: the attention output has NaN or inf"
    return row
