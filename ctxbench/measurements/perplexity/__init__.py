"""The perplexity kind: a language model's perplexity on a corpus with its attention running
through an implementation (cells of `ctxbench sweep`, after the kernel cells at each length).

The method is in measure.py; the report section (table, ppl.png, loss_curve.png) in report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ctxbench.core.flags import Flag, fail
from ctxbench.core.kinds import Field, register_kind
from ctxbench.measurements.flags import ROPE, ROPE_FIELD, TEXT, parse_ropes, text_setting
from ctxbench.measurements.model import ModelKind, ModelPlan, model_dtype, model_shape, seconds_for

# CPU: the default model's fp32 forward pass runs at a few hundred tokens/s on 2 cores, so
# perplexity at 1024 and 2048 with 2048 tokens scored per cell keeps the default sweep (kernel
# cells included) inside 15 minutes. CUDA: up to 32768 (beyond the default model's trained 8192,
# where RoPE variants matter) and 32768 tokens per cell (one window at 32K, 32 at 1K): seconds
# per cell on a GPU.
PPL_MAX_LEN = {"cpu": 2048, "cuda": 32768}
PPL_TOKENS = {"cpu": 2048, "cuda": 32768}
SCHEMES = ("truncated", "strided")

FLAGS: tuple[Flag, ...] = (
    Flag("ppl_max_len", "--ppl-max-len", None, int, f"perplexity cells up to this length (default: "
         f"{PPL_MAX_LEN['cpu']} cpu, {PPL_MAX_LEN['cuda']} cuda; 0: no perplexity)"),
    Flag("ppl_tokens", "--ppl-tokens", None, int, f"tokens scored per perplexity cell (default: {PPL_TOKENS['cpu']} "
         f"cpu, {PPL_TOKENS['cuda']} cuda)"),
    Flag("ppl_scheme", "--ppl-scheme", "truncated", str, "score every position of each window, or only its last "
         "--ppl-stride tokens", choices=SCHEMES, show_default=True),
    Flag("ppl_stride", "--ppl-stride", 256, int, "strided scheme: tokens scored at the end of each window",
         show_default=True),
    TEXT, ROPE,
)


@dataclass(frozen=True)
class PerplexityPlan(ModelPlan):
    """Which perplexity cells a sweep has: lengths up to max_len (tokens), each implementation x
    RoPE variant, windows cut by `scheme`."""

    max_len: int = 0
    ropes: list[str] = field(default_factory=list)  # RoPE variants, e.g. ["default", "yarn:4"]
    scheme: str = "truncated"

    def cells(self, config: Any, n: int) -> list[Any]:
        """The perplexity cells at length n: one forward pass per window of n tokens each."""
        from ctxbench.core.cell import Cell

        if n > self.max_len:
            return []
        base = self.base(config)
        return [Cell.of(base, impl, n, "perplexity", rope=rope, ppl_scheme=self.scheme)
                for impl in self.impls for rope in self.ropes]


@register_kind
class PerplexityKind(ModelKind):
    """Perplexity and bits per byte of the model on the corpus, per implementation and RoPE variant."""

    name = "perplexity"
    command = "sweep"
    flags = FLAGS
    fields = (ROPE_FIELD, Field("ppl_scheme", "truncated"))
    # perplexity and bits per byte over the scored tokens, how many tokens and bytes were scored,
    # in how many windows, the scored tail per window (strided), mean NLL (nats) per position bin
    # (JSON), the model, the corpus hash, and tokens through the model per second of forward passes
    columns = ("ppl", "bits_per_byte", "ppl_tokens", "ppl_bytes", "ppl_windows", "ppl_stride", "loss_curve",
               "model", "corpus_sha256", "tokens_per_s")
    text_columns = ("loss_curve", "model", "corpus_sha256")
    measurement = "ctxbench.measurements.perplexity.measure:measure_perplexity"
    report = "ctxbench.measurements.perplexity.report:SECTION"

    def validate(self, o: Any) -> None:
        for flag, value in (("--ppl-max-len", o.ppl_max_len), ("--ppl-tokens", o.ppl_tokens),
                            ("--ppl-stride", o.ppl_stride)):
            if value is not None and (value < 0 or (value == 0 and flag != "--ppl-max-len")):
                fail(f"{flag} must be a positive integer (got {value})"
                     + (" or 0 for no perplexity" if flag == "--ppl-max-len" else ""))

    def settings(self, o: Any, device: str) -> dict[str, Any]:
        return {"ppl_tokens": PPL_TOKENS[device] if o.ppl_tokens is None else o.ppl_tokens,
                "ppl_stride": o.ppl_stride, "text": text_setting(o)}

    def plan(self, context: Any) -> PerplexityPlan | None:
        """Every implementation swept when the user named them, else the exact ones, none
        distributed (a model layer can't give one a rank's shard); lengths up to --ppl-max-len
        (by default none in a decode-shaped sweep, --query-len); the model and corpus checked."""
        from ctxbench.core import registry

        o, config = context.options, context.config
        ropes = parse_ropes(o.rope)
        max_len = o.ppl_max_len
        if max_len is None:
            # perplexity measures the model's prefill: a decode-shaped sweep (the command's --query-len)
            # has none unless asked
            max_len = 0 if o.get("query_len") is not None else PPL_MAX_LEN[config.device]
        if max_len == 0 or config.mask == "none" or not any(n <= max_len for n in context.lengths):
            return None
        chosen = context.impls if context.named else [n for n in context.impls if registry.resolve(n).exact]
        chosen = [n for n in chosen if not registry.resolve(n).distributed]
        if not chosen:
            return None
        hint = "" if o.model_path else " (or --ppl-max-len 0 to sweep without perplexity)"
        heads, kv_heads, head_dim = model_shape(o.model_path, text_path=o.text_path, hint=hint)
        return PerplexityPlan(impls=chosen, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                              dtype=model_dtype(config), max_len=max_len, ropes=ropes, scheme=o.ppl_scheme)

    def plan_from_json(self, data: dict[str, Any]) -> PerplexityPlan:
        return PerplexityPlan(**data)

    def plan_from_legacy(self, spec: dict[str, Any]) -> PerplexityPlan | None:
        if not spec.get("ppl"):
            return None
        return PerplexityPlan(**spec["ppl"], scheme=spec["config"].get("ppl_scheme", "truncated"))

    def extend(self, plan: PerplexityPlan, names: list[str], added: list[str]) -> PerplexityPlan:
        # implementations added by name get perplexity cells, as named ones do in a new run
        from ctxbench.core import registry

        return replace(plan, impls=plan.impls + [n for n in added if not registry.resolve(n).distributed])

    def describe(self, plan: PerplexityPlan | None, spec: Any) -> list[str]:
        if plan is None:
            return ["perplexity: none (--ppl-max-len 0, --mask none, or no length within --ppl-max-len)"]
        s = spec.settings
        ns = [n for n in spec.lengths if n <= plan.max_len]
        scheme = plan.scheme + (f" (last {s.ppl_stride} of each window)" if plan.scheme == "strided" else "")
        return [f"perplexity: {self.describe_model(spec)}, corpus {s.text or 'pydoc_data.topics'}, N: "
                f"{', '.join(map(str, ns))}; {s.ppl_tokens} tokens per cell, {scheme} windows, {plan.dtype}; rope: "
                f"{', '.join(plan.ropes)}; impls: {', '.join(plan.impls)}"]

    def weight(self, cell: Any, settings: Any) -> float:
        scored = cell.n if cell.get("ppl_scheme") == "truncated" else min(settings.ppl_stride, cell.n)
        windows = max(1, -(-settings.ppl_tokens // scored))
        return self.worker_start_s + windows * seconds_for(cell.n, cell.device)

    def label(self, cell: Any) -> str:
        rope = cell.get("rope")
        return f"ppl {cell.impl} N={cell.n}" + ("" if rope == "default" else f" {rope}")
