"""Decoding through a real model: a prefilled context of N tokens, then greedy tokens one by one.

One decode cell (kind "decode") = (implementation, context length N). Method:

* The prompt is the first N tokens of the corpus (the default corpus unless --text). The model
  (the embedded default unless --model) runs with `impl` as the attention of every layer
  (ctxbench.models.attention), with a KV cache: one prefill pass over the N tokens, then
  --decode-tokens greedy steps, each one new token attending to the cache (Lq = 1 < Lk, which
  the implementation must declare: kv_cache=True).
* prefill_ms: wall time of the prefill (ms). ms_per_token: the median wall time of a decode
  step (ms): the forward pass of one token, its argmax and the read-back of the token id,
  which is what generating a token costs; tokens_per_s = 1000 / ms_per_token.
* kv_cache_bytes: the bytes of every key and value tensor the model's cache holds after the
  last step (N + decode_tokens - 1 tokens): what the context costs in memory (compare
  `ctxbench kv`).
* The same prompt is decoded again with transformers' own sdpa attention: tokens_match is how
  many leading greedy tokens agree. An exact implementation must reproduce every one (status
  wrong otherwise, naming the first step that differs); an approximate one is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from ctxbench.models import lm
from ctxbench.core.cell import Cell
from ctxbench.models.kv_cache import cache_bytes
from ctxbench.models.prepare import prepare
from ctxbench.core.registry import Impl, Unsupported


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def greedy(model: Any, ids: torch.Tensor, steps: int, device: str) -> tuple[list[int], float, list[float], Any]:
    """(greedy tokens, prefill ms, ms of each decode step, the cache) for prompt `ids` [N]:
    the first token comes from the prefill, each of the other steps - 1 from one decode step."""
    with torch.no_grad():
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids.unsqueeze(0), use_cache=True, logits_to_keep=1)
        token = out.logits[0, -1].argmax()
        tokens = [int(token)]  # reads the token back: the prefill is done
        prefill_ms = (time.perf_counter() - t0) * 1e3
        cache = out.past_key_values
        step_ms = []
        for _ in range(steps - 1):
            t0 = time.perf_counter()
            out = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            token = out.logits[0, -1].argmax()
            tokens.append(int(token))
            step_ms.append((time.perf_counter() - t0) * 1e3)
            cache = out.past_key_values
    return tokens, prefill_ms, step_ms, cache


def measure_decode(impl: Impl, cell: Cell, settings: Any) -> dict[str, Any]:
    """Measure one decode cell (see the module docstring); returns the CSV fields with status
    and message."""
    if settings.decode_tokens < 2:
        raise ValueError(f"decode cells need at least 2 tokens (got {settings.decode_tokens})")
    model, ref = prepare(impl, cell, settings.model)
    corpus = lm.load_corpus(settings.text, ref)
    if len(corpus) < cell.n:
        raise Unsupported(f"the corpus has {len(corpus)} tokens; a prompt of {cell.n} needs more "
                          "(pass --text with a longer file)")
    ids = corpus.ids[:cell.n].to(cell.device)
    tokens, prefill_ms, step_ms, cache = greedy(model, ids, settings.decode_tokens, cell.device)
    held = cache_bytes(cache)
    del cache
    model.set_attn_implementation("sdpa")  # transformers' own attention, for the reference tokens
    want, _, _, _ = greedy(model, ids, settings.decode_tokens, cell.device)
    match = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), len(tokens))
    ms = statistics.median(step_ms)
    row = {"prefill_ms": prefill_ms, "ms_per_token": ms, "tokens_per_s": 1e3 / ms if ms > 0 else None,
           "kv_cache_bytes": held, "decode_tokens": len(tokens), "tokens_match": match, "n_tokens": cell.n,
           "model": ref.label, "predicted": " ".join(lm.load_tokenizer(ref).decode(tokens).split()),
           "status": "ok", "message": ""}
    if match < len(tokens) and impl.exact:
        row["status"] = "wrong"
        row["message"] = (f"greedy tokens differ from transformers' sdpa attention from step {match + 1} of "
                          f"{len(tokens)}")
    return row
