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
to its first wrong token. Exact match is
on the answer's tokens (a different tokenization of the same digits counts as a miss).

Keys are drawn from a seeded generator per (length, depth, trial), so every implementation
and RoPE variant answers the same questions.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from ctxbench import lm
from ctxbench.model_attention import attention_name
from ctxbench.plan import Cell
from ctxbench.registry import Impl, Unsupported

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
COLUMNS = ("run_id", "impl", "rope", "n", "n_tokens", "depth", "trial", "key", "predicted", "correct", "status",
           "message", "mask", "window", "sinks", "dtype", "device", "model", "seconds", "finished_at")


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


def score(model: Any, tokenizer: Any, prompt: Prompt, device: str) -> tuple[bool, str]:
    """(exact match of greedy decoding, the teacher-forced predictions as text); one forward pass."""
    ids = torch.tensor([prompt.ids], device=device)
    n_answer = len(prompt.ids) - prompt.answer_start
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=n_answer + 1).logits[0]
    predicted = logits[:-1].argmax(dim=-1).tolist()  # predictions for the answer tokens
    correct = predicted == prompt.ids[prompt.answer_start:]
    return correct, " ".join(tokenizer.decode(predicted).split())  # one line for the CSV


@dataclass
class PasskeySpec:
    impls: list[str]
    ropes: list[str]
    lengths: list[int]
    depths: list[float]
    trials: int
    mask: str
    window: int | None
    sinks: int
    dtype: str
    device: str
    model: str
    seed: int


class Writer:
    """passkey.csv: one row per trial, written and fsynced as each finishes."""

    def __init__(self, path: str, env: dict[str, str]) -> None:
        self.path, self.env = path, env
        self.header = list(COLUMNS) + list(env)
        with open(path, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(self.header)

    def append(self, row: dict[str, Any]) -> None:
        row = {**row, **self.env}
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(["" if row.get(c) is None else row.get(c) for c in self.header])
        with open(self.path, "a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())


def _one_line(exc: BaseException) -> str:
    from ctxbench.worker import one_line

    return one_line(exc)


def run_passkey(spec: PasskeySpec, run_dir: str, run_id: str, env: dict[str, str],
                progress: Any = None) -> list[dict[str, Any]]:
    """Every impl x rope x length x depth x trial; rows are written to run_dir/passkey.csv as
    they finish. A failing implementation (error, out of memory, refusal) costs its own rows."""
    from ctxbench import registry
    from ctxbench.worker import is_oom

    ref = lm.resolve_model(spec.model)
    tokenizer = lm.load_tokenizer(ref)
    model = lm.load_model(ref, spec.dtype, spec.device)
    heads, kv_heads, head_dim = lm.model_shape(model.config)
    window = spec.window if spec.mask == "window" else None
    sinks = spec.sinks if window is not None else 0
    writer = Writer(os.path.join(run_dir, "passkey.csv"), env)
    rows: list[dict[str, Any]] = []
    for rope in spec.ropes:
        for name in spec.impls:
            base = {"run_id": run_id, "impl": name, "rope": rope, "mask": spec.mask, "window": window, "sinks": sinks,
                    "dtype": spec.dtype, "device": spec.device, "model": ref.label}
            stop: tuple[str, str] | None = None  # (status, message) for every remaining row
            impl: Impl | None = None
            try:
                impl = registry.resolve(name)
                lm.set_rope(model, rope)
                model.set_attn_implementation(attention_name(impl, window=window, sinks=sinks))
            except (Unsupported, registry.RegistryError) as exc:
                stop = ("unsupported", (str(exc).splitlines() or [""])[0])
            for n in spec.lengths:
                reason = None
                if impl is not None and stop is None:
                    cell = Cell(batch=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=spec.dtype,
                                mask=spec.mask, window=window, sinks=sinks, device=spec.device, impl=name, n=n,
                                task="perplexity", rope=rope)
                    reason = impl.unsupported_reason(cell)
                for depth in spec.depths:
                    for trial in range(spec.trials):
                        key = make_key(spec.seed, n, depth, trial)
                        row = {**base, "n": n, "depth": depth, "trial": trial, "key": key}
                        if stop is not None:
                            row.update(status=stop[0], message=stop[1])
                        elif reason is not None:
                            row.update(status="unsupported", message=reason)
                        else:
                            prompt = build_prompt(tokenizer, n, depth, key)
                            t0 = time.perf_counter()
                            try:
                                correct, predicted = score(model, tokenizer, prompt, spec.device)
                                row.update(status="ok", correct=int(correct), predicted=predicted,
                                           n_tokens=len(prompt.ids))
                            except Unsupported as exc:
                                row.update(status="unsupported", message=str(exc).splitlines()[0] if str(exc) else "")
                            except Exception as exc:  # noqa: BLE001 - a failing implementation costs its rows
                                oom = is_oom(exc)
                                row.update(status="oom" if oom else "error", message=_one_line(exc))
                                if oom:  # longer lengths of this implementation would too
                                    stop = ("skipped", f"not attempted: {name} ran out of memory at N={n}")
                            row["seconds"] = round(time.perf_counter() - t0, 3)
                        row["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                        writer.append(row)
                        rows.append(row)
                        if progress is not None:
                            progress(row)
    return rows


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def heatmaps(rows: list[dict[str, Any]], run_dir: str) -> list[str]:
    """A depth x length heatmap of retrieval accuracy per (impl, rope), PNG and SVG; the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    import seaborn as sns

    df = pd.DataFrame([r for r in rows if r.get("status") == "ok"])
    written = []
    if df.empty:
        return written
    df["correct"] = df["correct"].astype(float)
    for (impl, rope), part in df.groupby(["impl", "rope"], sort=False):
        table = part.pivot_table(index="depth", columns="n", values="correct", aggfunc="mean")
        table.index = [f"{d:g}" for d in table.index]
        fig, ax = plt.subplots(figsize=(max(5.0, 1.8 + 0.9 * len(table.columns)), max(3.2, 1.6 + 0.5 * len(table.index))))
        sns.heatmap(table, vmin=0, vmax=1, cmap="RdYlGn", annot=True, fmt=".0%", cbar_kws={"label": "retrieved"},
                    linewidths=0.5, ax=ax)
        mask = part.iloc[0]
        what = "" if mask["mask"] != "window" else f", window {mask['window']}" + (
            f" + {mask['sinks']} sinks" if mask["sinks"] else "")
        ax.set_title(f"passkey retrieval (exact match, {int(part['trial'].max()) + 1} key(s) per cell)\n"
                     f"{impl}, rope {rope}{what}", fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("key depth (fraction of the context)")
        fig.tight_layout()
        stem = os.path.join(run_dir, f"passkey-{_safe(impl)}-{_safe(rope)}")
        for ext in ("png", "svg"):
            fig.savefig(f"{stem}.{ext}", dpi=120)
            written.append(f"{stem}.{ext}")
        plt.close(fig)
    return written
