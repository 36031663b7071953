"""Quality under a KV budget (`ctxbench ruler`): two kinds, a RULER prompt answered from a KV cache
that a policy compressed to a budget (kind "retrieval"), and the corpus's continuation scored
after one (kind "continuation").

    prompts.py      the RULER tasks' prompts and their scoring (words.py: the needles' keys)
    policies.py     the KV-cache policies, one class each
    budgets.py      --kv-budget: tokens kept of a context
    compression.py  one cell in the worker: prefill, compress, answer or score
    report.py       the policy table, the Pareto plot and the heatmaps
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ctxbench.core.flags import Flag, fail
from ctxbench.core.kinds import Command, Field, register_command, register_kind
from ctxbench.measurements.flags import DEPTH_FIELD, DEPTHS, TEXT, TRIAL_FIELD, TRIALS, parse_depths, text_setting
from ctxbench.measurements.model import ModelKind, ModelPlan, model_dtype, model_shape, one_process_impls, seconds_for
from ctxbench.measurements.ruler.budgets import parse_budgets, policy_budgets
from ctxbench.measurements.ruler.prompts import HAYSTACKS

# Longest ruler prompt by default (tokens): a prefill and a few dozen decode steps per prompt,
# then one compression and answer per (policy, budget).
RULER_MAX_LEN = {"cpu": 4096, "cuda": 32768}
# Where the asked needle goes by default: the middle, where a compressed cache is tested hardest.
DEFAULT_DEPTHS = "0.5"

register_command(Command(
    name="ruler", max_len=RULER_MAX_LEN, default_impls=("sdpa",), specs_join_defaults=True, masks=("causal",),
    run_prefix="ruler-",
    help="Quality under a KV budget: RULER-style retrieval tasks and the continuation's perplexity, the model "
         "answering from a cache each KV-cache policy compressed to each budget; per cell the prefill and selection "
         "time, ms per generated token, the KV bytes held and the score. Writes results.csv (kinds retrieval and "
         "continuation), a quality-vs-KV-bytes Pareto plot, depth x length heatmaps per task and a policy table in "
         "report.html."))

POLICIES_FLAG = Flag("policies", "--policies", "all", str, "KV-cache policies: full, streaming, h2o, snapkv, knorm, "
                     "random, or all", show_default=True)
BUDGET_FLAG = Flag("kv_budget", "--kv-budget", "0.25,0.5", str, "KV tokens kept per layer and head: token counts "
                   "(512,1024) or ratios of the context (0.25); the full cache is measured once beside them",
                   show_default=True)
RETRIEVAL_FLAGS: tuple[Flag, ...] = (
    Flag("ruler_tasks", "--tasks", "all", str, "RULER tasks: niah_single, niah_multikey, niah_multivalue, "
         "niah_multiquery, vt, or all", show_default=True),
    POLICIES_FLAG, BUDGET_FLAG, DEPTHS, TRIALS,
    Flag("haystack", "--haystack", "corpus", str, "the text the needles hide in: the --text corpus, or repeated "
         "filler sentences", choices=HAYSTACKS, show_default=True),
    TEXT,
)
CONTINUATION_FLAGS: tuple[Flag, ...] = (
    Flag("continuation_tokens", "--continuation-tokens", 256, int, "corpus tokens scored after each compressed "
         "context (perplexity); 0: no continuation cells", show_default=True),
    POLICIES_FLAG, BUDGET_FLAG, TEXT,
)
POLICY_FIELDS = (Field("policy"), Field("kv_budget"))


@dataclass(frozen=True)
class CompressedPlan(ModelPlan):
    """The KV-cache policies and budgets a ruler kind's cells run under ("512": tokens, "0.25":
    of the context, as given)."""

    policies: list[str] = field(default_factory=list)
    budgets: list[str] = field(default_factory=list)

    def policy_budgets(self, n: int) -> list[tuple[str, str | None]]:
        return policy_budgets(self.policies, self.budgets, n)


@dataclass(frozen=True)
class RetrievalPlan(CompressedPlan):
    """The retrieval cells: per implementation, each RULER task x depth x trial prompt under every
    (policy, budget). The cells of one prompt are consecutive (policies and budgets innermost), so
    its worker prefills the prompt once and compresses the same cache for each of them."""

    tasks: list[str] = field(default_factory=list)    # RULER tasks (prompts.TASKS)
    depths: list[float] = field(default_factory=list)  # where the asked needle goes: fractions 0..1 of the haystack
    trials: int = 1                                    # prompts per (task, length, depth)

    def cells(self, config: Any, n: int) -> list[Any]:
        from ctxbench.core.cell import Cell

        base, pairs = self.base(config), self.policy_budgets(n)
        return [Cell.of(base, impl, n, "retrieval", ruler_task=task, depth=float(depth), trial=trial, policy=policy,
                        kv_budget=budget)
                for impl in self.impls for task in self.tasks for depth in self.depths for trial in range(self.trials)
                for policy, budget in pairs]


@dataclass(frozen=True)
class ContinuationPlan(CompressedPlan):
    """The continuation cells: per implementation, the corpus's first n tokens under every
    (policy, budget), then Settings.continuation_tokens more scored."""

    def cells(self, config: Any, n: int) -> list[Any]:
        from ctxbench.core.cell import Cell

        base = self.base(config)
        return [Cell.of(base, impl, n, "continuation", policy=policy, kv_budget=budget)
                for impl in self.impls for policy, budget in self.policy_budgets(n)]


def policies_and_budgets(o: Any) -> tuple[list[str], list[str]]:
    """--policies and --kv-budget, checked (UsageError, one line)."""
    from ctxbench.measurements.ruler.policies import parse_policies

    try:
        return list(parse_policies(o.policies)), [str(b) for b in parse_budgets(o.kv_budget)]
    except ValueError as exc:
        fail(str(exc))


def model_of(context: Any) -> dict[str, Any]:
    """The model's shape and dtype for a ruler plan, after checking the implementations (one
    process, a KV cache) and the model."""
    one_process_impls("ctxbench ruler", context.impls, kv_cache=True)
    heads, kv_heads, head_dim = model_shape(context.options.model_path)
    return {"impls": list(context.impls), "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "dtype": model_dtype(context.config)}


class RulerKind(ModelKind):
    """What the two kinds of `ctxbench ruler` share: a command, KV-cache policies and budgets."""

    command = "ruler"
    needs_kv_cache = True
    # prefill_ms (the prefill of the N - 1 prompt tokens plus the policy's selection), ms of the
    # policy's own scoring and selection (inside prefill_ms), the cached tokens per layer and head
    # the policy kept, kv_cache_bytes (the compressed cache), ms_per_token, n_tokens and the model
    columns = ("prefill_ms", "selection_ms", "kv_kept", "kv_cache_bytes", "ms_per_token", "n_tokens", "model",
               "tokens_per_s")
    text_columns = ("model",)
    report = "ctxbench.measurements.ruler.report:SECTION"

    def settings(self, o: Any, device: str) -> dict[str, Any]:
        return {"text": text_setting(o)}

    def extend(self, plan: Any, names: list[str], added: list[str]) -> Any:
        one_process_impls("ctxbench ruler", names, kv_cache=True)
        return replace(plan, impls=list(names))

    def legacy(self, spec: dict[str, Any]) -> dict[str, Any] | None:
        """The fields of the old single ruler plan that the new plans share."""
        old = spec.get("ruler")
        if not old:
            return None
        return {k: old[k] for k in ("impls", "policies", "budgets", "heads", "kv_heads", "head_dim", "dtype")}


@register_kind
class RetrievalKind(RulerKind):
    """A RULER prompt answered from the compressed cache: RULER's recall of the expected answers."""

    name = "retrieval"
    flags = RETRIEVAL_FLAGS
    fields = (Field("ruler_task"), DEPTH_FIELD, TRIAL_FIELD, *POLICY_FIELDS)
    # the answers expected (';'-separated), the greedy text (predicted), RULER's recall of the
    # answers in it (0..1) and the tokens generated
    columns = RulerKind.columns + ("expected", "predicted", "score", "decode_tokens")
    text_columns = RulerKind.text_columns + ("expected", "predicted")
    score_columns = ("score",)
    measurement = "ctxbench.measurements.ruler.compression:measure_retrieval"

    def settings(self, o: Any, device: str) -> dict[str, Any]:
        return {**super().settings(o, device), "haystack": o.haystack}

    def plan(self, context: Any) -> RetrievalPlan:
        """Checks the tasks, policies, budgets, depths, trials, the implementations and the model, and
        that the shortest length holds every task's prompt."""
        from ctxbench.measurements.ruler import prompts
        from ctxbench.models import lm

        o = context.options
        try:
            tasks = prompts.parse_tasks(o.ruler_tasks)
            depths = parse_depths(o.depths or DEFAULT_DEPTHS)
        except ValueError as exc:
            fail(str(exc))
        policies, budgets = policies_and_budgets(o)
        if o.trials < 1:
            fail(f"--trials must be at least 1 (got {o.trials})")
        model = model_of(context)
        try:
            _, tokenizer = lm.planning_tokenizer(o.model_path)
        except lm.ModelError as exc:
            fail(str(exc))
        shortest = max(prompts.min_length(tokenizer, t) for t in tasks)
        if min(context.lengths) < shortest:
            fail(f"--lengths: the prompts of {', '.join(tasks)} need at least {shortest} tokens "
                 f"(got {min(context.lengths)}); raise --min-len or --lengths")
        return RetrievalPlan(**model, policies=policies, budgets=budgets, tasks=list(tasks),
                             depths=list(dict.fromkeys(depths)), trials=o.trials)

    def plan_from_json(self, data: dict[str, Any]) -> RetrievalPlan:
        return RetrievalPlan(**data)

    def plan_from_legacy(self, spec: dict[str, Any]) -> RetrievalPlan | None:
        shared = self.legacy(spec)
        if shared is None:
            return None
        old = spec["ruler"]
        return RetrievalPlan(**shared, tasks=list(old["tasks"]), depths=list(old["depths"]), trials=old["trials"])

    def describe(self, plan: RetrievalPlan | None, spec: Any) -> list[str]:
        if plan is None:
            return []
        c, s = spec.config, spec.settings
        return [f"[bold]ctxbench ruler[/] {c.device} {plan.dtype} model {self.describe_model(spec)}; impls: "
                f"{', '.join(plan.impls)}; N: {', '.join(map(str, spec.lengths))}; tasks: {', '.join(plan.tasks)}; "
                f"depths: {', '.join(f'{d:g}' for d in plan.depths)}; {plan.trials} prompt(s) each; haystack: "
                f"{s.haystack}",
                f"KV-cache policies: {', '.join(plan.policies)}; budgets: {', '.join(plan.budgets)} (tokens, or a "
                "ratio of N; the full cache once)"]

    def weight(self, cell: Any, settings: Any) -> float:
        # a prompt's prefill is shared by its (policy, budget) cells (about ten by default), then
        # a compression and a few dozen decode steps
        return 0.2 + seconds_for(cell.n, cell.device) / 10 + 20 * (0.1 if cell.device == "cpu" else 0.01)

    def label(self, cell: Any) -> str:
        budget, trial = cell.get("kv_budget"), cell.get("trial")
        return (f"{cell.get('ruler_task')} {cell.get('policy')}{'' if budget is None else f'@{budget}'} N={cell.n} "
                f"d={cell.get('depth'):g}" + (f" #{trial}" if trial else ""))


@register_kind
class ContinuationKind(RulerKind):
    """The corpus's continuation scored after the compressed context: its perplexity."""

    name = "continuation"
    flags = CONTINUATION_FLAGS
    fields = POLICY_FIELDS
    # the continuation's perplexity over ppl_tokens tokens, the corpus hash
    columns = RulerKind.columns + ("ppl", "ppl_tokens", "corpus_sha256")
    text_columns = RulerKind.text_columns + ("corpus_sha256",)
    measurement = "ctxbench.measurements.ruler.compression:measure_continuation"

    def validate(self, o: Any) -> None:
        if o.continuation_tokens < 0:
            fail(f"--continuation-tokens must be >= 0 (got {o.continuation_tokens}); 0 plans no continuation cells")

    def settings(self, o: Any, device: str) -> dict[str, Any]:
        return {**super().settings(o, device), "continuation_tokens": o.continuation_tokens}

    def plan(self, context: Any) -> ContinuationPlan | None:
        if context.options.continuation_tokens == 0:
            return None
        policies, budgets = policies_and_budgets(context.options)
        return ContinuationPlan(**model_of(context), policies=policies, budgets=budgets)

    def plan_from_json(self, data: dict[str, Any]) -> ContinuationPlan:
        return ContinuationPlan(**data)

    def plan_from_legacy(self, spec: dict[str, Any]) -> ContinuationPlan | None:
        shared = self.legacy(spec)
        return ContinuationPlan(**shared) if shared is not None and spec["ruler"].get("continuation") else None

    def describe(self, plan: ContinuationPlan | None, spec: Any) -> list[str]:
        if plan is None:
            return ["continuation: none (--continuation-tokens 0)"]
        return [f"continuation: {spec.settings.continuation_tokens} corpus tokens scored after each compressed "
                f"context ({spec.settings.text or 'pydoc_data.topics'})"]

    def weight(self, cell: Any, settings: Any) -> float:
        return 0.2 + seconds_for(cell.n, cell.device) / 10 + 2 * (0.1 if cell.device == "cpu" else 0.01)

    def label(self, cell: Any) -> str:
        budget = cell.get("kv_budget")
        return f"continuation {cell.get('policy')}{'' if budget is None else f'@{budget}'} N={cell.n}"
