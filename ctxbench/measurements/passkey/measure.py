"""Passkey retrieval: can the model still find a 5-digit key hidden at depth d of N tokens?

Each trial is one prompt of exactly N tokens:

    INTRO  filler ... [KEY LINE at depth d] ... filler  QUESTION  ANSWER

filler is a fixed group of sentences repeated; the key line ("The pass key is 12345.
Remember it. 12345 is the pass key.") goes in at the group boundary nearest to fraction d
of the filler (0: right after the introduction, 1: right before the question); the
question ends "The pass key is" and ANSWER is the key's tokens.

Scoring: greedy decoding retrieves the key iff, at every answer position, the argmax of the
model's next-token distribution is the next answer token. With teacher forcing (the true
answer appended) one forward pass yields all those argmaxes: greedy decoding would produce
exactly the answer tokens iff each argmax matches (by induction over the answer: while the
prefix matches, greedy's next input is the true token), so the score is exactly that of
greedy decoding, without a KV cache or N forward passes. `predicted` is the teacher-forced
argmax sequence as text (whitespace runs shown as one space), which equals greedy's output up
to its first wrong token. Exact match is on the answer's tokens (a different tokenization of
the same digits counts as a miss).

Keys are drawn from a seeded generator per (length, depth, trial), so every implementation
and RoPE variant answers the same questions.

Where it runs: a trial is a cell of the sweep (task "passkey", with key columns `depth` and
`trial`; ctxbench.engine.plan.PasskeyPlan plans them), measured by `measure_passkey` in the
implementation's worker with the sweep's isolation, timeout, memory cap, resume and
results.csv. `ctxbench passkey` is a front end: `passkey_plan` validates its input, and the
sweep runs the cells. `heatmaps` draws the run's results.csv rows; `passkey_summary` counts them.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any

from ctxbench.models import lm
from ctxbench.core.formatting import number, safe_name
from ctxbench.engine.plan import Cell, PasskeyPlan
from ctxbench.core.registry import Impl, Unsupported

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]      # N tokens: prompt then answer
    answer_start: int   # index of the first answer token
    key: str


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def overhead_tokens(tokenizer: Any) -> int:
    """Tokens of a prompt without filler (the shortest possible length)."""
    return sum(len(_encode(tokenizer, s)) for s in (INTRO, KEY_LINE.format(key="12345"), QUESTION, ANSWER.format(key="12345")))


def build_prompt(tokenizer: Any, length: int, depth: float, key: str) -> Prompt:
    """The prompt of exactly `length` tokens with `key` at `depth` (0..1) of the filler."""
    intro, key_ids, question = _encode(tokenizer, INTRO), _encode(tokenizer, KEY_LINE.format(key=key)), \
        _encode(tokenizer, QUESTION)
    answer = _encode(tokenizer, ANSWER.format(key=key))
    unit = _encode(tokenizer, FILLER)
    budget = length - len(intro) - len(key_ids) - len(question) - len(answer)
    if budget < 0:
        raise ValueError(f"a passkey prompt needs at least {length - budget} tokens (got length {length})")
    groups = budget // len(unit)
    filler = (unit * (groups + 1))[:budget]
    at = min(round(depth * groups) * len(unit), budget)
    ids = intro + filler[:at] + key_ids + filler[at:] + question + answer
    return Prompt(ids=ids, answer_start=len(ids) - len(answer), key=key)


def make_key(seed: int, length: int, depth: float, trial: int) -> str:
    return str(random.Random(f"{seed}:{length}:{depth:g}:{trial}").randrange(10000, 100000))


def answer_logits(model: Any, prompt: Prompt, device: str) -> Any:
    """Logits [answer tokens + 1, vocab] of the last positions of one forward pass over the
    prompt and its answer: row i predicts answer token i (the last row, past the answer, is unused)."""
    import torch

    ids = torch.tensor([prompt.ids], device=device)
    n_answer = len(prompt.ids) - prompt.answer_start
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, logits_to_keep=n_answer + 1).logits[0]


def score(model: Any, tokenizer: Any, prompt: Prompt, device: str) -> tuple[bool, str]:
    """(exact match of greedy decoding, the teacher-forced predictions as text); one forward pass."""
    logits = answer_logits(model, prompt, device)
    predicted = logits[:-1].argmax(dim=-1).tolist()  # predictions for the answer tokens
    correct = predicted == prompt.ids[prompt.answer_start:]
    return correct, " ".join(tokenizer.decode(predicted).split())  # one line for the CSV


# ---------------------------------------------------------------- one trial (in the worker)

def measure_passkey(impl: Impl, cell: Cell, settings: Any) -> dict[str, Any]:
    """Measure one passkey cell: the model (loaded once per worker) with `cell`'s RoPE variant,
    window and sinks and `impl` as its attention, one prompt of cell.n tokens with the key of
    (settings.seed, n, depth, trial) at cell.depth. Returns the CSV fields with status and message."""
    from ctxbench.measurements.perplexity.measure import prepare  # the same "model with this impl and rope" step

    model, ref = prepare(impl, cell, settings.model)
    tokenizer = lm.load_tokenizer(ref)
    key = make_key(settings.seed, cell.n, cell.depth, cell.trial)
    try:
        prompt = build_prompt(tokenizer, cell.n, cell.depth, key)
    except ValueError as exc:  # a length below the prompt's overhead
        raise Unsupported(str(exc)) from None
    t0 = time.perf_counter()
    correct, predicted = score(model, tokenizer, prompt, cell.device)  # synchronises: .tolist()
    seconds = time.perf_counter() - t0
    return {"status": "ok", "message": "", "key": key, "predicted": predicted, "correct": int(correct),
            "n_tokens": len(prompt.ids), "model": ref.label,
            "tokens_per_s": len(prompt.ids) / seconds if seconds > 0 else None}


# ---------------------------------------------------------------- planning (in the CLI)

def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0], each once; ValueError (one line) unless fractions in [0, 1]."""
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        depths = []
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths {text!r} must be comma-separated fractions between 0 and 1, e.g. 0,0.5,1")
    return list(dict.fromkeys(depths))


def passkey_plan(impls: list[str], lengths: list[int], *, ropes: list[str] | tuple[str, ...] = ("default",),
                 depths: list[float] | tuple[float, ...] = DEPTHS, trials: int = 1, model_path: str | None = None,
                 dtype: str = "float32") -> PasskeyPlan:
    """The passkey cells of a sweep, after checking what a run needs before it starts: the
    implementations (names or --impl specs, resolvable, none distributed), depths in [0, 1],
    trials >= 1, the RoPE variants, the model and its dependencies, and that the shortest
    length holds a prompt. Raises lm.ModelError (model, RoPE) or ValueError (the rest), each
    one line naming the flag. The model's shape comes from its config; the model itself is
    loaded by the workers."""
    from ctxbench.core import registry

    if not impls:
        raise ValueError("no implementation given; e.g. --impls sdpa,chunked")
    for name in impls:
        impl = registry.resolve(name)  # RegistryError (a ValueError) naming the problem
        if impl.distributed:
            raise ValueError(f"{name} is a distributed implementation; passkey runs a whole model in one process, "
                             "which can't give it a rank's shard")
    ds = [float(d) for d in depths]
    if not ds or any(not 0 <= d <= 1 for d in ds):
        raise ValueError(f"--depths {','.join(f'{d:g}' for d in ds) or '(none)'} must be fractions between 0 and 1, "
                         "e.g. 0,0.5,1")
    if trials < 1:
        raise ValueError(f"--trials must be at least 1 (got {trials})")
    variants = list(dict.fromkeys(lm.parse_rope(r) for r in ropes))
    if not variants:
        raise ValueError("--rope is empty; give e.g. --rope default or --rope default,yarn:4")
    if not lengths:
        raise ValueError("--lengths is empty; give e.g. --lengths 1024,2048,4096")
    ref, tokenizer = lm.planning_tokenizer(model_path)
    shortest = overhead_tokens(tokenizer)
    if min(lengths) < shortest:
        raise ValueError(f"--lengths: a passkey prompt needs at least {shortest} tokens (got {min(lengths)})")
    heads, kv_heads, head_dim = lm.model_shape(lm.load_config(ref))
    return PasskeyPlan(impls=list(dict.fromkeys(impls)), ropes=variants, depths=list(dict.fromkeys(ds)),
                       trials=trials, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)


# ---------------------------------------------------------------- what a run shows

def _passkey_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("task") == "passkey"]


def passkey_summary(rows: list[dict[str, Any]]) -> str:
    """'k/n keys retrieved; m trials not ok' over the passkey rows of `rows` (results.csv rows)."""
    rows = _passkey_rows(rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    retrieved = sum(int(float(r["correct"])) for r in ok if str(r.get("correct", "")) != "")
    return f"passkey: {retrieved}/{len(ok)} keys retrieved; {len(rows) - len(ok)} trials not ok"


def heatmaps(rows: list[dict[str, Any]], run_dir: str) -> list[str]:
    """A depth x length heatmap of retrieval accuracy per (impl, rope) from a run's results.csv
    rows (task passkey, status ok), PNG and SVG, as run_dir/passkey-<impl>-<rope>.*; the paths."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    from ctxbench.core.masks import Mask

    df = pd.DataFrame([r for r in _passkey_rows(rows) if r.get("status") == "ok"])
    written: list[str] = []
    if df.empty:
        return written
    for col in ("correct", "depth", "n", "trial"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for (impl, rope), part in df.groupby(["impl", "rope"], sort=False):
        table = part.pivot_table(index="depth", columns="n", values="correct", aggfunc="mean")
        table.index = [f"{d:g}" for d in table.index]
        table.columns = [str(int(n)) for n in table.columns]
        fig = Figure(figsize=(max(5.0, 1.8 + 0.9 * len(table.columns)), max(3.2, 1.6 + 0.5 * len(table.index))),
                     layout="constrained")
        ax = fig.add_subplot()
        sns.heatmap(table, vmin=0, vmax=1, cmap="RdYlGn", annot=True, fmt=".0%", cbar_kws={"label": "retrieved"},
                    linewidths=0.5, ax=ax)
        first = part.iloc[0]
        mask = Mask.named(str(first.get("mask", "causal")), _as_int(first.get("window")),
                          _as_int(first.get("sinks")) or 0)
        ax.set_title(f"passkey retrieval (exact match, {int(part['trial'].max()) + 1} key(s) per cell)\n"
                     f"{impl}, rope {rope}, {mask.describe()}", fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("key depth (fraction of the context)")
        stem = os.path.join(run_dir, f"passkey-{safe_name(str(impl))}-{safe_name(str(rope))}")
        for ext in ("png", "svg"):
            fig.savefig(f"{stem}.{ext}", dpi=120)
            written.append(f"{stem}.{ext}")
    return written


def _as_int(value: Any) -> int | None:
    f = number(value)
    return None if f is None else int(f)
