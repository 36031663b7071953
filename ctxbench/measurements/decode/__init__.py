"""The decode kind: a real model prefilling N tokens and generating greedy tokens one by one
through an implementation with a KV cache (cells of `ctxbench sweep --decode-max-len`, after
the perplexity cells at each length).

The method is in measure.py; the report section (table, decode.png) in report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ctxbench.core.flags import Flag, fail
from ctxbench.core.kinds import register_kind
from ctxbench.measurements.flags import TEXT, text_setting
from ctxbench.measurements.model import ModelKind, ModelPlan, model_dtype, model_shape, seconds_for

FLAGS: tuple[Flag, ...] = (
    Flag("decode_max_len", "--decode-max-len", 0, int, "decode cells (a prefill of N tokens through the model, then "
         "greedy tokens with a KV cache) at lengths up to this; 0: none", show_default=True),
    Flag("decode_tokens", "--decode-tokens", 16, int, "greedy tokens generated per decode cell", show_default=True),
    TEXT,
)


@dataclass(frozen=True)
class DecodePlan(ModelPlan):
    """Which decode cells a sweep has: lengths up to max_len (tokens), each implementation."""

    max_len: int = 0

    def cells(self, config: Any, n: int) -> list[Any]:
        """The decode cells at length n: one per implementation."""
        from ctxbench.core.cell import Cell

        if n > self.max_len:
            return []
        base = self.base(config)
        return [Cell.of(base, impl, n, "decode") for impl in self.impls]


def takes_a_cache(names: list[str]) -> list[str]:
    """The implementations among `names` that decode with a KV cache in one process."""
    from ctxbench.core import registry

    return [n for n in names if registry.resolve(n).kv_cache and not registry.resolve(n).distributed]


@register_kind
class DecodeKind(ModelKind):
    """Prefill and decode through the model: ms per generated token, the KV cache's bytes, and
    whether the greedy tokens are transformers' own."""

    name = "decode"
    command = "sweep"
    flags = FLAGS
    needs_kv_cache = True
    # prefill ms, median ms per generated token, bytes of the KV cache held, tokens generated,
    # leading tokens equal to transformers' sdpa attention's; model, the greedy text (predicted),
    # the prompt's tokens (n_tokens) and tokens per second of decoding
    columns = ("prefill_ms", "ms_per_token", "kv_cache_bytes", "decode_tokens", "tokens_match", "model", "predicted",
               "n_tokens", "tokens_per_s")
    text_columns = ("model", "predicted")
    measurement = "ctxbench.measurements.decode.measure:measure_decode"
    report = "ctxbench.measurements.decode.report:SECTION"

    def validate(self, o: Any) -> None:
        if o.decode_max_len < 0:
            fail(f"--decode-max-len must be >= 0 tokens (got {o.decode_max_len}); 0 plans no decode cells")
        if o.decode_tokens < 2:
            fail(f"--decode-tokens must be at least 2 (got {o.decode_tokens}): the first token comes from the prefill")

    def settings(self, o: Any, device: str) -> dict[str, Any]:
        return {"decode_tokens": o.decode_tokens, "text": text_setting(o)}

    def plan(self, context: Any) -> DecodePlan | None:
        """The swept implementations that declare kv_cache=True, at the lengths up to
        --decode-max-len (None when there are none); the model must be there."""
        o, config = context.options, context.config
        max_len = o.decode_max_len
        if max_len == 0 or config.mask == "none" or not any(n <= max_len for n in context.lengths):
            return None
        chosen = takes_a_cache(context.impls)
        if not chosen:
            fail(f"--decode-max-len {max_len}: none of {', '.join(context.impls)} takes a KV cache (kv_cache=True); "
                 "add e.g. --impls sdpa,chunked")
        heads, kv_heads, head_dim = model_shape(o.model_path)
        return DecodePlan(impls=chosen, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=model_dtype(config),
                          max_len=max_len)

    def plan_from_json(self, data: dict[str, Any]) -> DecodePlan:
        return DecodePlan(**data)

    def plan_from_legacy(self, spec: dict[str, Any]) -> DecodePlan | None:
        return DecodePlan(**spec["decode"]) if spec.get("decode") else None

    def extend(self, plan: DecodePlan, names: list[str], added: list[str]) -> DecodePlan:
        # implementations added by name get decode cells when they take a KV cache
        return replace(plan, impls=plan.impls + takes_a_cache(added))

    def describe(self, plan: DecodePlan | None, spec: Any) -> list[str]:
        if plan is None:
            return []
        s = spec.settings
        ns = [n for n in spec.lengths if n <= plan.max_len]
        return [f"decode: {self.describe_model(spec)}, a prefill of N tokens of {s.text or 'pydoc_data.topics'} then "
                f"{s.decode_tokens} greedy tokens with a KV cache, {plan.dtype}; N: {', '.join(map(str, ns))}; "
                f"impls: {', '.join(plan.impls)}"]

    def weight(self, cell: Any, settings: Any) -> float:
        # a prefill and greedy steps, twice (the sdpa reference)
        return 2 * (seconds_for(cell.n, cell.device) + settings.decode_tokens * 0.1)

    def label(self, cell: Any) -> str:
        return f"decode {cell.impl} N={cell.n}"
