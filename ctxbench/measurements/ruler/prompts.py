"""Synthetic retrieval tasks in the manner of NVIDIA's RULER, generated offline from a seed.

Each sample is one prompt of exactly `length` tokens that ends where the model's answer begins:

    INTRO  haystack ... [NEEDLE at depth d] ... haystack  QUESTION  ANSWER PREFIX

The tasks (RULER's templates, shortened where a 135M model needs it):

- niah_single: one needle "One of the special magic numbers for {key} is: {value}." (key a
  word of ctxbench.measurements.ruler.words.WORDS, value a 7-digit number); the question "What is the special
  magic number for {key} mentioned in the provided text?"; the answer prefix "The special magic
  number for {key} mentioned in the provided text is". Answers: [value].
- niah_multikey: 4 needles with distinct keys and values; one key is asked (the question and
  prefix of niah_single). Answers: [its value]; the other three needles are distractors.
- niah_multivalue: 4 needles with the same key and distinct values; "What are all the special
  magic numbers for {key} ...?", prefix "... numbers for {key} ... are". Answers: the 4 values.
- niah_multiquery: 4 needles with distinct keys; two are asked ("for {key} and {key2}").
  Answers: their 2 values.
- vt (variable tracking): a chain of 5 statements "VAR QZXJK = 12345.", "VAR ABCDE = QZXJK.",
  ... (distinct random 5-letter uppercase names, a 5-digit value), in chain order; the question
  "Find all variables that are assigned the value 12345 in the text above."; the prefix
  "Answer: According to the chain of variable assignments in the text above, 5 variables are
  assigned the value 12345, they are:". Answers: the 5 names.

NIAH tasks open with RULER's "Some special magic numbers are hidden within the following text.
Make sure to memorize it. I will quiz you about the numbers afterwards."; vt with "Memorize and
track the chain of variable assignments hidden in the following text."

Template: the prompt is wrapped in the tokenizer's chat template when it has one (SmolLM2's
ChatML: its default system turn, the intro, haystack and question as the user turn, then the
assistant turn's start followed by the answer prefix), and is plain text otherwise (intro,
haystack, question, answer prefix, as RULER's base-model format); `chat=False` forces plain
text. Measured with the embedded SmolLM2-135M-Instruct at 1024 tokens (corpus haystack, seed 0,
greedy decoding), mean score plain / chat: niah_single 1.0 / 1.0 (5 depths x 2 trials each),
niah_multikey 0.5 / 0.5, niah_multiquery 0.25 / 0.75, niah_multivalue 0.12 / 0.5, vt 0 / 0
(depths 0.25 and 0.75, one trial each). Chat is never worse and plain text drifts into
repeating the answer prefix on the multi-answer tasks, so chat is the default (CHAT).

Haystack: `haystack_ids` (token ids: the tokenized corpus, or `filler_ids`, passkey's filler
repeated), repeated if too short and cut to exactly the tokens the prompt has left. Needles go
in as token sequences between haystack tokens, only at boundaries: after a token whose text
ends with a newline or "." and before one that begins with whitespace, the intro counting as a
line end before the haystack and the question as a line start after it. So a needle (which
begins with a space and ends with ".") splits neither a word nor a number like 3.14, and no
word sticks to its end; a haystack without boundaries gets every needle at its end. The asked
needle (niah_multiquery: the first asked; niah_multivalue: the first value; vt: the statement
holding the value) goes at the boundary nearest to fraction `depth` of the haystack's tokens
(0: the first boundary, right after the intro if the haystack begins with whitespace; 1: the
last, right before the question if the cut haystack happens to end a sentence, otherwise before
its last, partial sentence). The other NIAH needles go at boundaries drawn uniformly from the
whole haystack; the other vt statements at boundaries drawn uniformly from those at or after
the first one, sorted, so statement i always precedes statement i + 1 and the chain starts at
`depth`. Needles drawn to the same boundary keep their order.

Exact length: every template piece and every key, value and name (with its leading space) is
tokenized on its own and the pieces are concatenated, so a prompt's tokens without haystack are
a sum over pieces. `min_length` is that sum for the longest draw: each key slot counts as the
longest word of WORDS in tokens, each number or name as one token per character (an upper bound
on any BPE tokenizer's count of ASCII; exact for SmolLM2's digits). Every length from
`min_length` on can be built; the haystack takes the rest.

Scoring (RULER's string_match_all, on whole words): the fraction of `answers` that occur in the
generated text as whole words (regex word boundaries, case-insensitive), so 1234567 inside
91234567 does not count. For the single-answer tasks it is exact match, 0 or 1.

Seeds: everything random (keys, values, names, which keys are asked, the other needles'
boundaries) comes from random.Random(f"{seed}:{task}:{length}:{depth:g}:{trial}"), so every
implementation and KV policy answers the same questions. Values within a sample are distinct,
and so are keys and names.
"""

from __future__ import annotations

import bisect
import random
import re
import string
from dataclasses import dataclass
from typing import Any

from ctxbench.measurements.passkey.prompt import FILLER
from ctxbench.measurements.ruler.words import WORDS

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
HAYSTACKS = ("corpus", "filler")

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION_ONE = "\nWhat is the special magic number for {key} mentioned in the provided text?"
ANSWER_ONE = " The special magic number for {key} mentioned in the provided text is"
QUESTION_ALL = "\nWhat are all the special magic numbers for {key} mentioned in the provided text?"
ANSWER_ALL = " The special magic numbers for {key} mentioned in the provided text are"
QUESTION_TWO = "\nWhat are all the special magic numbers for {key} and {key2} mentioned in the provided text?"
ANSWER_TWO = " The special magic numbers for {key} and {key2} mentioned in the provided text are"

VT_INTRO = "Memorize and track the chain of variable assignments hidden in the following text.\n"
VT_STATEMENT = " VAR {name} = {value}."
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER = (" Answer: According to the chain of variable assignments in the text above, 5 variables are "
             "assigned the value {value}, they are:")  # 5: NEEDLES["vt"]

NEEDLES = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4, "vt": 5}
NIAH_DIGITS = 7
VT_DIGITS = 5
VT_NAME_LETTERS = 5

# The measurement in the module docstring decided this; chat=False in build_sample overrides it.
CHAT = True

_TEMPLATES = {  # task: (intro, needle, question, answer prefix)
    "niah_single": (NIAH_INTRO, NEEDLE, QUESTION_ONE, ANSWER_ONE),
    "niah_multikey": (NIAH_INTRO, NEEDLE, QUESTION_ONE, ANSWER_ONE),
    "niah_multivalue": (NIAH_INTRO, NEEDLE, QUESTION_ALL, ANSWER_ALL),
    "niah_multiquery": (NIAH_INTRO, NEEDLE, QUESTION_TWO, ANSWER_TWO),
    "vt": (VT_INTRO, VT_STATEMENT, VT_QUESTION, VT_ANSWER),
}
_SLOT = re.compile(r" (\{\w+\})")  # every slot follows a space, which is tokenized with the slot
_MARK = "\x00"  # stands for the user turn's content when splitting the chat template


@dataclass(frozen=True)
class Sample:
    """One prompt and what its answer must contain."""

    task: str
    ids: list[int]        # the prompt, exactly `length` tokens, ending with the answer prefix the model continues
    answers: list[str]    # every string the answer must contain
    max_new_tokens: int   # greedy tokens to generate (enough for all answers plus slack)


# ---------------------------------------------------------------- token pieces

def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _fill(tokenizer: Any, template: str, slots: dict[str, str]) -> list[int]:
    """`template` with its slots filled, each literal part and each " value" tokenized alone."""
    ids: list[int] = []
    for i, part in enumerate(_SLOT.split(template)):
        ids += _encode(tokenizer, " " + slots[part[1:-1]]) if i % 2 else _encode(tokenizer, part)
    return ids


def _bound(tokenizer: Any, template: str, widths: dict[str, int]) -> int:
    """The most tokens `template` can take when slot s takes at most widths[s] tokens."""
    return sum(widths[part[1:-1]] if i % 2 else len(_encode(tokenizer, part))
               for i, part in enumerate(_SLOT.split(template)))


def _use_chat(tokenizer: Any, chat: bool | None) -> bool:
    return (CHAT if chat is None else chat) and bool(getattr(tokenizer, "chat_template", None))


def _frame(tokenizer: Any, task: str, chat: bool) -> tuple[list[int], list[int], str]:
    """(tokens before the haystack, tokens between the question and the answer prefix, the
    answer prefix's template)."""
    intro, _, _, answer = _TEMPLATES[task]
    if not chat:
        return _encode(tokenizer, intro), [], answer
    wrapped = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                            add_generation_prompt=True)
    before, after = wrapped.split(_MARK)
    # the assistant turn starts a line: its prefix needs no leading space
    return _encode(tokenizer, before) + _encode(tokenizer, intro), _encode(tokenizer, after), answer[1:]


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def min_length(tokenizer: Any, task: str, *, chat: bool | None = None) -> int:
    """Tokens of the prompt with no haystack for the longest draw of keys, values and names:
    the shortest `length` that build_sample accepts (every draw fits in it)."""
    _check_task(task)
    use_chat = _use_chat(tokenizer, chat)
    head, turn, answer = _frame(tokenizer, task, use_chat)
    key = max(len(ids) for ids in tokenizer([" " + w for w in WORDS], add_special_tokens=False)["input_ids"])
    # one token per character, space included: no tokenizer splits ASCII finer
    widths = {"key": key, "key2": key, "value": 1 + (NIAH_DIGITS if task != "vt" else max(VT_DIGITS, VT_NAME_LETTERS)),
              "name": 1 + VT_NAME_LETTERS}
    _, needle, question, _ = _TEMPLATES[task]
    return (len(head) + NEEDLES[task] * _bound(tokenizer, needle, widths) + _bound(tokenizer, question, widths)
            + len(turn) + _bound(tokenizer, answer, widths))


# ---------------------------------------------------------------- drawing a sample

def _draw(task: str, rng: random.Random) -> tuple[list[dict[str, str]], dict[str, str], list[str]]:
    """(the needles' slots, the asked needle first; the question's slots; the answers)."""
    if task == "vt":
        names: list[str] = []
        while len(names) < NEEDLES[task]:
            name = "".join(rng.choice(string.ascii_uppercase) for _ in range(VT_NAME_LETTERS))
            if name not in names:
                names.append(name)
        value = str(rng.randrange(10 ** (VT_DIGITS - 1), 10 ** VT_DIGITS))
        chain = [value] + names[:-1]  # statement i assigns names[i] the previous name (the value first)
        return [{"name": n, "value": v} for n, v in zip(names, chain)], {"value": value}, names
    n = NEEDLES[task]
    values = [str(v) for v in rng.sample(range(10 ** (NIAH_DIGITS - 1), 10 ** NIAH_DIGITS), n)]
    keys = [rng.choice(WORDS)] * n if task == "niah_multivalue" else rng.sample(WORDS, n)
    needles = [{"key": k, "value": v} for k, v in zip(keys, values)]
    if task == "niah_multiquery":
        return needles, {"key": keys[0], "key2": keys[1]}, values[:2]
    return needles, {"key": keys[0]}, values if task == "niah_multivalue" else values[:1]


def _boundaries(tokenizer: Any, hay: list[int]) -> list[int]:
    """Positions p (0..len(hay)) where a needle may go before hay[p]: after a line or sentence
    end and before whitespace. The intro (ending a line) precedes hay[0] and the question
    (starting one) follows hay[-1]; a haystack without such a position gets its end."""
    text = {t: tokenizer.decode([t]) for t in set(hay)}  # decode each distinct token once
    points = [p for p in range(len(hay) + 1)
              if (p == 0 or text[hay[p - 1]].endswith(("\n", "."))) and (p == len(hay) or text[hay[p]][:1].isspace())]
    return points or [len(hay)]


def _nearest(points: list[int], target: float) -> int:
    i = bisect.bisect_left(points, target)
    return min(points[max(i - 1, 0):i + 1], key=lambda p: (abs(p - target), p))


def build_sample(tokenizer: Any, task: str, length: int, depth: float, seed: int, trial: int,
                 haystack_ids: list[int], *, chat: bool | None = None) -> Sample:
    """The `task` sample of exactly `length` tokens with its asked needle at `depth` (0..1) of
    the haystack, drawn from (seed, task, length, depth, trial). `chat` None: the module's
    choice (CHAT, where the tokenizer has a chat template). ValueError (one line) for an
    unknown task, a depth outside [0, 1], a length below min_length or an empty haystack."""
    _check_task(task)
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be a fraction between 0 and 1 (got {depth})")
    use_chat = _use_chat(tokenizer, chat)
    shortest = min_length(tokenizer, task, chat=use_chat)
    if length < shortest:
        raise ValueError(f"a {task} prompt needs at least {shortest} tokens (got {length})")
    rng = random.Random(f"{seed}:{task}:{length}:{depth:g}:{trial}")
    slots, asked, answers = _draw(task, rng)
    head, turn, answer = _frame(tokenizer, task, use_chat)
    _, needle, question, _ = _TEMPLATES[task]
    needles = [_fill(tokenizer, needle, s) for s in slots]
    tail = _fill(tokenizer, question, asked) + turn + _fill(tokenizer, answer, asked)
    budget = length - len(head) - sum(len(n) for n in needles) - len(tail)
    if budget and not haystack_ids:
        raise ValueError(f"the haystack is empty; a {length}-token {task} prompt needs {budget} haystack tokens")
    hay = list(haystack_ids[:budget])
    while len(hay) < budget:  # a short haystack, repeated
        hay += haystack_ids[:budget - len(hay)]
    points = _boundaries(tokenizer, hay)
    first = _nearest(points, depth * budget)
    if task == "vt":
        later = points[points.index(first):]
        at = [first] + sorted(rng.choice(later) for _ in needles[1:])
    else:
        at = [first] + [rng.choice(points) for _ in needles[1:]]
    ids, done = list(head), 0
    for i in sorted(range(len(needles)), key=lambda i: (at[i], i)):
        ids += hay[done:at[i]] + needles[i]
        done = at[i]
    ids += hay[done:] + tail
    # the answers as a list, plus room for other separators or numbering and a closing phrase
    listed = len(_encode(tokenizer, " " + ", ".join(answers) + "."))
    return Sample(task=task, ids=ids, answers=answers, max_new_tokens=listed + 4 * len(answers) + 8)


# ---------------------------------------------------------------- scoring and options

def score(task: str, answers: list[str], text: str) -> float:
    """The fraction of `answers` found in `text` as whole words (case-insensitive), in [0, 1];
    every task scores this way (`task` is checked, not otherwise used)."""
    _check_task(task)
    if not answers:
        raise ValueError("score needs at least one answer")
    found = sum(1 for a in answers if re.search(rf"\b{re.escape(a)}\b", text, re.IGNORECASE))
    return found / len(answers)


def parse_tasks(text: str) -> list[str]:
    """'niah_single,vt' -> ['niah_single', 'vt'], each once; 'all' -> every task; ValueError
    (one line naming --tasks and the choices) for an unknown or empty list."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(TASKS)
    unknown = [t for t in names if t not in TASKS]
    if not names or unknown:
        what = f"unknown task {', '.join(unknown)}" if unknown else "no task given"
        raise ValueError(f"--tasks {text!r}: {what}; choose from {', '.join(TASKS)} or all")
    return list(dict.fromkeys(names))


def filler_ids(tokenizer: Any, count: int) -> list[int]:
    """`count` tokens of passkey's filler sentences repeated (the "filler" haystack)."""
    unit = _encode(tokenizer, FILLER)
    return (unit * (count // len(unit) + 1))[:count]
