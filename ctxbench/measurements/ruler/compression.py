"""A model answering from a compressed KV cache: the cells of `ctxbench ruler`.

One cell = (implementation, context length N, prompt, KV-cache policy, budget). Method:

* Prefill. The model (the embedded default unless --model; `impl` as the attention of every
  layer, ctxbench.models.attention) runs once over the first N - 1 prompt tokens with a cache,
  uncompressed; an observer on every attention layer keeps its post-RoPE queries, which the
  attention-based policies score keys with. The worker keeps that prefill (ctxbench.measurements.ruler.compression
  holds the last one), so every policy and budget of a prompt compresses the same cache
  (the sweep plans a prompt's cells one after another) and the prefill runs once per prompt.
* Compression. The policy (ctxbench.measurements.ruler.policies) scores the cached keys of each layer and keeps
  `kv_kept` of the N - 1 per layer and KV head: the budget (--kv-budget: tokens, or a ratio of
  N), or all of them for the full cache. The kept keys and values are gathered into a fresh
  cache; they keep the rotary positions they were computed at, as kvpress and the papers do.
* Answer (kind "retrieval", a RULER prompt of ctxbench.measurements.ruler.prompts). The last prompt token is fed at
  its own position N - 1 against the compressed cache, then greedy tokens follow one by one at
  positions N, N + 1, ... (explicit position_ids: the cache is shorter than the context) until
  the end-of-turn token or the sample's max_new_tokens. Every answer token comes from the
  compressed cache. score: RULER's recall of the expected strings in the answer (ruler.score).
* Continuation (kind "continuation"). The prompt is the first N corpus tokens; the last one is
  fed with the next --continuation-tokens M corpus tokens in one pass against the compressed
  cache, and ppl is the perplexity of those M tokens (each predicted from the compressed
  context and the continuation before it).

Columns. prefill_ms: the prefill of the N - 1 tokens plus selection_ms, the policy's scoring of
every layer (once per prompt and policy, reused across its budgets) and its selection and gather
(per cell); ms_per_token: the median ms of a decode step against the compressed cache (one
token's forward pass, its argmax and the read-back of the id); kv_cache_bytes: the bytes of
every key and value tensor of the compressed cache, before the answer is generated.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ctxbench.core.cell import Cell
from ctxbench.core.registry import Impl, Unsupported
from ctxbench.measurements.ruler import policies as kv_policies
from ctxbench.measurements.ruler import prompts as ruler
from ctxbench.measurements.ruler.budgets import parse_budget, resolve_budget
from ctxbench.models import lm
from ctxbench.models.kv_cache import cache_bytes, layer_kv
from ctxbench.models.prepare import prepare


@dataclass
class Prefill:
    """An uncompressed prefill of one prompt prefix, with what the policies need."""

    key: tuple                          # which model, attention, dtype and tokens it is
    cache: Any                          # the transformers cache after the prefill
    queries: dict[int, torch.Tensor]    # layer -> its post-RoPE queries [1, Hq, L, D]
    scaling: float                      # the attention's softmax scale
    ms: float                           # wall time of the prefill (ms)
    scores: dict[str, tuple[list[torch.Tensor | None], float]] = field(default_factory=dict)  # policy -> (per layer, ms)

    @property
    def length(self) -> int:
        """Tokens in the prefilled cache."""
        return next(iter(self.queries.values())).shape[2]


_LAST: list[Prefill] = []  # the worker's last prefill (one: a prompt's cells are consecutive)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def attention_layers(model: Any) -> list[Any]:
    """The model's attention modules (those with a layer_idx), in layer order."""
    found = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]
    if not found:
        raise Unsupported(f"{type(model).__name__} has no self_attn modules with a layer_idx; the KV-cache policies "
                          "need a decoder of transformers' usual layout")
    return sorted(found, key=lambda m: m.layer_idx)


def run_prefill(model: Any, ids: list[int], device: str, key: tuple) -> Prefill:
    """Prefill `ids` (one sequence) uncompressed, keeping every layer's post-RoPE queries."""
    queries: dict[int, torch.Tensor] = {}
    scaling: list[float] = []

    def observe(module: Any, query: torch.Tensor, key_: torch.Tensor, scale: float | None) -> None:
        if query.shape[2] == key_.shape[2]:  # the prefill pass, not a decode step
            queries[module.layer_idx] = query.detach()
            scaling.append(scale if scale is not None else query.shape[-1] ** -0.5)

    layers = attention_layers(model)
    for m in layers:
        m.ctxbench_observer = observe
    try:
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
            out.logits[0, -1].argmax().item()  # the prefill is done when a result is read back
            ms = (time.perf_counter() - t0) * 1e3
    finally:
        for m in layers:
            del m.ctxbench_observer
    if len(queries) != len(layers):
        raise RuntimeError(f"the observer saw {len(queries)} of {len(layers)} attention layers in the prefill")
    return Prefill(key=key, cache=out.past_key_values, queries=queries, scaling=scaling[0], ms=ms)


def prefill_of(model: Any, ids: list[int], device: str, what: tuple) -> Prefill:
    """The worker's prefill of `ids` under `what` (model, attention, dtype...), reused when the
    previous cell prefilled the same tokens, else computed (after freeing the old one)."""
    key = what + (len(ids), hashlib.sha256(str(ids).encode()).hexdigest())
    if _LAST and _LAST[0].key == key:
        return _LAST[0]
    _LAST.clear()
    if device == "cuda":
        torch.cuda.empty_cache()
    _LAST.append(run_prefill(model, ids, device, key))
    return _LAST[0]


def compress(prefill: Prefill, policy: str, keep: int, seed: int) -> tuple[Any, float]:
    """(a new cache holding `keep` of the prefill's tokens per layer and KV head as `policy`
    chooses, selection ms): the policy's scores (computed once per prefill and policy, their
    ms counted in every cell that uses them) plus this selection and gather."""
    from transformers import DynamicCache

    chosen = kv_policies.get(policy)
    n = prefill.length
    if chosen.scored and policy not in prefill.scores:
        t0 = time.perf_counter()
        per_layer = [chosen.score(prefill.queries[i], layer_kv(prefill.cache, i)[0], scaling=prefill.scaling,
                                  seed=seed, layer=i)
                     for i in sorted(prefill.queries)]
        prefill.scores[policy] = (per_layer, (time.perf_counter() - t0) * 1e3)
    per_layer, score_ms = prefill.scores.get(policy, ([None] * len(prefill.queries), 0.0))
    t0 = time.perf_counter()
    cache = DynamicCache()
    for i, scores in zip(sorted(prefill.queries), per_layer):
        keys, values = layer_kv(prefill.cache, i)
        index = chosen.keep(scores, n, keep).to(keys.device)
        cache.update(kv_policies.gather(keys, index), kv_policies.gather(values, index), i)
    return cache, score_ms + (time.perf_counter() - t0) * 1e3


def stop_tokens(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end an answer: the model's end-of-sequence ids and the end of a chat turn."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    end_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_turn, int) and end_turn != tokenizer.unk_token_id:
        found.add(end_turn)
    return found


def generate(model: Any, cache: Any, first: int, position: int, steps: int, stop: set[int],
             device: str) -> tuple[list[int], list[float]]:
    """Greedy tokens after feeding token `first` at `position` against `cache` (which it
    extends), at most `steps`, ending at a token of `stop` (not returned); and the ms of each
    step (one token's forward pass, argmax and read-back)."""
    tokens: list[int] = []
    step_ms: list[float] = []
    token = torch.tensor([[first]], device=device)
    with torch.no_grad():
        for i in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[position + i]], device=device))
            token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            value = int(token)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            cache = out.past_key_values
            if value in stop:
                break
            tokens.append(value)
    return tokens, step_ms


def continuation_nll(model: Any, cache: Any, ids: list[int], position: int, device: str) -> list[float]:
    """NLL (nats) of ids[1:] given the cache and ids fed at positions position, position + 1, ...
    in one pass; ids[0] is the context's last token."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(position, position + len(ids), device=device).unsqueeze(0))
        logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
        target = torch.tensor(ids[1:], device=device)
        return (-logp.gather(1, target.unsqueeze(1)).squeeze(1)).tolist()


def kept_tokens(cell: Cell, cached: int) -> int:
    """Tokens per layer and KV head the cell's policy keeps of `cached`: its budget (tokens, or
    a ratio of the context N), at most all of them; all of them for the full cache."""
    if cell.kv_budget is None:  # the full cache (planned without a budget)
        return cached
    return min(resolve_budget(parse_budget(cell.kv_budget), cell.n), cached)


def _model_for(impl: Impl, cell: Cell, settings: Any) -> tuple[Any, lm.ModelRef, tuple]:
    model, ref = prepare(impl, cell, settings.model)
    return model, ref, (ref.label, impl.name, cell.dtype, cell.device, cell.rope, cell.attn_window, cell.attn_sinks)


def _compressed_row(prefill: Prefill, cache: Any, keep: int, selection_ms: float, ref: lm.ModelRef,
                    cell: Cell) -> dict[str, Any]:
    return {"prefill_ms": prefill.ms + selection_ms, "selection_ms": selection_ms, "kv_kept": keep,
            "kv_cache_bytes": cache_bytes(cache), "n_tokens": cell.n, "model": ref.label, "status": "ok",
            "message": ""}


def haystack(settings: Any, tokenizer: Any, ref: lm.ModelRef, n: int) -> list[int]:
    """The haystack's token ids: the corpus's (settings.text, the default corpus if unset), or
    passkey's filler repeated to n tokens."""
    if settings.haystack == "filler":
        return ruler.filler_ids(tokenizer, n)
    return lm.load_corpus(settings.text, ref).ids.tolist()


def measure_retrieval(impl: Impl, cell: Cell, settings: Any) -> dict[str, Any]:
    """Measure one retrieval cell (see the module docstring); the CSV fields with status and message."""
    model, ref, what = _model_for(impl, cell, settings)
    tokenizer = lm.load_tokenizer(ref)
    try:
        sample = ruler.build_sample(tokenizer, cell.ruler_task, cell.n, cell.depth, settings.seed, cell.trial,
                                    haystack(settings, tokenizer, ref, cell.n))
    except ValueError as exc:  # a length below the task's shortest prompt
        raise Unsupported(str(exc)) from None
    prefill = prefill_of(model, sample.ids[:-1], cell.device, what + ("retrieval",))
    keep = kept_tokens(cell, prefill.length)
    cache, selection_ms = compress(prefill, cell.policy, keep, settings.seed)
    row = _compressed_row(prefill, cache, keep, selection_ms, ref, cell)
    tokens, step_ms = generate(model, cache, sample.ids[-1], cell.n - 1, sample.max_new_tokens,
                               stop_tokens(model, tokenizer), cell.device)
    del cache
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    ms = statistics.median(step_ms)
    row.update(expected=";".join(sample.answers), predicted=" ".join(text.split()),
               score=ruler.score(cell.ruler_task, sample.answers, text), ms_per_token=ms,
               tokens_per_s=1e3 / ms if ms > 0 else None, decode_tokens=len(step_ms))
    return row


def measure_continuation(impl: Impl, cell: Cell, settings: Any) -> dict[str, Any]:
    """Measure one continuation cell (see the module docstring); the CSV fields with status and message."""
    model, ref, what = _model_for(impl, cell, settings)
    corpus = lm.load_corpus(settings.text, ref)
    m = settings.continuation_tokens
    if len(corpus) < cell.n + m:
        raise Unsupported(f"the corpus has {len(corpus)} tokens; a context of {cell.n} and {m} continuation tokens "
                          "need more (pass --text with a longer file, or fewer --continuation-tokens)")
    ids = corpus.ids[:cell.n + m].tolist()
    prefill = prefill_of(model, ids[:cell.n - 1], cell.device, what + ("continuation",))
    keep = kept_tokens(cell, prefill.length)
    cache, selection_ms = compress(prefill, cell.policy, keep, settings.seed)
    row = _compressed_row(prefill, cache, keep, selection_ms, ref, cell)
    _sync(cell.device)
    t0 = time.perf_counter()
    nll = continuation_nll(model, cache, ids[cell.n - 1:], cell.n - 1, cell.device)
    seconds = time.perf_counter() - t0
    mean = sum(nll) / len(nll)
    row.update(ppl=math.exp(mean), ppl_tokens=len(nll), corpus_sha256=corpus.sha256,
               tokens_per_s=len(nll) / seconds if seconds > 0 else None)
    if not math.isfinite(mean):
        row.update(status="wrong", message="non-finite loss: the attention output has NaN or inf")
    return row
