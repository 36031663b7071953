"""The passkey kind: can the model still find a 5-digit key hidden at depth d of N tokens?
(`ctxbench passkey`: one cell per implementation x RoPE variant x length x depth x trial.)

The prompts and their scoring are in prompt.py, one trial in the worker in measure.py, the
report section (heatmaps, retrieval table) in report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ctxbench.core.flags import fail
from ctxbench.core.kinds import Command, register_command, register_kind
from ctxbench.measurements.flags import (DEPTH_FIELD, DEPTHS, MASK, ROPE, ROPE_FIELD, SINKS, TRIAL_FIELD, TRIALS,
                                        WINDOW, parse_depths, parse_ropes)
from ctxbench.measurements.model import ModelKind, ModelPlan, model_shape, one_process_impls, seconds_for

# Longest passkey prompt by default (tokens): one forward pass of the default model each.
PASSKEY_MAX_LEN = {"cpu": 4096, "cuda": 32768}
# Where the key goes by default (fractions of the filler).
DEFAULT_DEPTHS = "0,0.25,0.5,0.75,1"

register_command(Command(
    name="passkey", max_len=PASSKEY_MAX_LEN, default_impls=("sdpa",), specs_join_defaults=True,
    masks=("causal", "window"), run_prefix="passkey-",
    help="Passkey retrieval: a 5-digit key hidden at each depth of each length, exact-match greedy retrieval per "
         "implementation and RoPE variant, each trial a cell in the implementation's worker; writes results.csv "
         "(kind=passkey rows) and depth x length heatmaps."))


@dataclass(frozen=True)
class PasskeyPlan(ModelPlan):
    """The passkey cells of a run. Every length gets them; the key of a trial is drawn from the
    seed, the length, the depth and the trial, so every implementation and RoPE variant answers
    the same questions."""

    ropes: list[str] = field(default_factory=list)   # RoPE variants, e.g. ["default", "yarn:4"]
    depths: list[float] = field(default_factory=list)  # where the key goes: fractions 0..1 of the filler
    trials: int = 1                                    # keys per (length, depth)

    def cells(self, config: Any, n: int) -> list[Any]:
        """The passkey cells at length n: implementation x RoPE variant x depth x trial, one
        forward pass of n tokens each."""
        from ctxbench.core.cell import Cell

        base = self.base(config)
        return [Cell.of(base, impl, n, "passkey", rope=rope, depth=float(depth), trial=trial)
                for impl in self.impls for rope in self.ropes for depth in self.depths for trial in range(self.trials)]


def passkey_plan(impls: list[str], lengths: list[int], *, ropes: list[str], depths: list[float], trials: int,
                 model_path: str | None, dtype: str) -> PasskeyPlan:
    """The passkey cells of a run, after checking what a run needs before it starts: the
    implementations (resolvable, none distributed), depths in [0, 1], trials >= 1, the RoPE
    variants, the model and its tokenizer, and that the shortest length holds a prompt. UsageError
    (one line naming the flag) if not.
    The model's shape comes from its config; the model itself is loaded by the workers."""
    from ctxbench.measurements.passkey.prompt import overhead_tokens
    from ctxbench.models import lm

    if not impls:
        fail("no implementation given; e.g. --impls sdpa,chunked")
    one_process_impls("passkey", impls)
    if not depths or any(not 0 <= d <= 1 for d in depths):
        fail(f"--depths {','.join(f'{d:g}' for d in depths) or '(none)'} must be fractions between 0 and 1, "
             "e.g. 0,0.5,1")
    if trials < 1:
        fail(f"--trials must be at least 1 (got {trials})")
    ropes = parse_ropes(",".join(ropes))
    if not lengths:
        fail("--lengths is empty; give e.g. --lengths 1024,2048,4096")
    heads, kv_heads, head_dim = model_shape(model_path)
    try:
        shortest = overhead_tokens(lm.planning_tokenizer(model_path)[1])
    except lm.ModelError as exc:
        fail(str(exc))
    if min(lengths) < shortest:
        fail(f"--lengths: a passkey prompt needs at least {shortest} tokens (got {min(lengths)})")
    return PasskeyPlan(impls=list(dict.fromkeys(impls)), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       dtype=dtype, ropes=list(ropes), depths=list(dict.fromkeys(float(d) for d in depths)),
                       trials=trials)


@register_kind
class PasskeyKind(ModelKind):
    """One passkey trial: whether greedy decoding retrieves the key exactly."""

    name = "passkey"
    command = "passkey"
    flags = (DEPTHS, TRIALS, ROPE, MASK, WINDOW, SINKS)
    fields = (ROPE_FIELD, DEPTH_FIELD, TRIAL_FIELD)
    # the 5-digit key hidden in the prompt, the teacher-forced argmax text at the answer positions
    # (greedy decoding's output up to its first wrong token), 1 when greedy decoding retrieves the
    # key exactly else 0, the prompt's length in tokens (prompt and answer: N); model and
    # tokens per second of the forward pass
    columns = ("key", "predicted", "correct", "n_tokens", "model", "tokens_per_s")
    text_columns = ("key", "predicted", "model")
    score_columns = ("correct",)
    measurement = "ctxbench.measurements.passkey.measure:measure_passkey"
    report = "ctxbench.measurements.passkey.report:SECTION"

    def plan(self, context: Any) -> PasskeyPlan:
        o = context.options
        try:
            depths = parse_depths(o.depths or DEFAULT_DEPTHS)
        except ValueError as exc:
            fail(str(exc))
        return passkey_plan(context.impls, context.lengths, ropes=parse_ropes(o.rope), depths=depths,
                            trials=o.trials, model_path=o.model_path, dtype=context.config.dtype)

    def plan_from_json(self, data: dict[str, Any]) -> PasskeyPlan:
        return PasskeyPlan(**data)

    def plan_from_legacy(self, spec: dict[str, Any]) -> PasskeyPlan | None:
        return PasskeyPlan(**spec["passkey"]) if spec.get("passkey") else None

    def extend(self, plan: PasskeyPlan, names: list[str], added: list[str]) -> PasskeyPlan:
        one_process_impls("passkey", names)
        return replace(plan, impls=list(names))

    def describe(self, plan: PasskeyPlan | None, spec: Any) -> list[str]:
        if plan is None:
            return []
        c = spec.config
        return [f"[bold]ctxbench passkey[/] {c.device} {plan.dtype} mask={c.mask}"
                f"{f' W={c.window}' if c.mask == 'window' else ''}{f' sinks={c.sinks}' if c.attn_sinks else ''}; "
                f"model {self.describe_model(spec)}; impls: {', '.join(plan.impls)}; rope: {', '.join(plan.ropes)}; "
                f"N: {', '.join(map(str, spec.lengths))}; depths: {', '.join(f'{d:g}' for d in plan.depths)}; "
                f"{plan.trials} key(s) each"]

    def weight(self, cell: Any, settings: Any) -> float:
        # one forward pass of n tokens; the model stays loaded between trials
        return 0.1 + seconds_for(cell.n, cell.device)

    def label(self, cell: Any) -> str:
        rope, trial = cell.get("rope"), cell.get("trial")
        return (f"passkey {cell.impl} N={cell.n} d={cell.get('depth'):g}" + (f" #{trial}" if trial else "")
                + ("" if rope == "default" else f" {rope}"))
