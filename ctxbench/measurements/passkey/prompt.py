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

Where it runs: a trial is a cell of kind "passkey" (key columns `rope`, `depth` and `trial`;
ctxbench.measurements.passkey plans them), measured by ctxbench.measurements.passkey.measure in
the implementation's worker with the sweep's isolation, timeout, memory cap, resume and
results.csv. This module builds and scores the prompts; report.py shows what a run found.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}"


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
