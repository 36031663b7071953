"""`ctxbench passkey`: prompts of exact length with the key at the asked depth, teacher-forced
scoring equal to greedy decoding, and a run that writes its CSV and heatmaps even when one
implementation fails."""

from __future__ import annotations

import csv
import os

import pytest
import torch

import lm_helpers as H
from ctxbench import passkey
from ctxbench.model_attention import attention_name
from ctxbench.registry import all_impls
from sweep_helpers import run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return H.checkpoint(str(tmp_path_factory.mktemp("tiny-passkey") / "model"))


@pytest.mark.parametrize("length", [200, 256, 333])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_prompt_has_the_exact_length_and_the_key_at_its_depth(length, depth):
    tok = H.tokenizer()
    p = passkey.build_prompt(tok, length, depth, "12345")
    assert len(p.ids) == length
    answer = tok.decode(p.ids[p.answer_start:])
    assert answer.strip() == "12345"
    text = tok.decode(p.ids)
    assert text.startswith(passkey.INTRO) and text.rstrip().endswith("The pass key is 12345")
    # the key line starts `depth` of the way through the filler, to within one filler group
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    intro, key_line, unit = enc(passkey.INTRO), enc(passkey.KEY_LINE.format(key="12345")), enc(passkey.FILLER)
    at = next(i for i in range(len(p.ids)) if p.ids[i:i + len(key_line)] == key_line) - len(intro)
    filler = length - len(intro) - len(key_line) - len(enc(passkey.QUESTION)) - (length - p.answer_start)
    assert 0 <= at <= filler and abs(at - depth * filler) <= len(unit)
    with pytest.raises(ValueError, match="at least"):
        passkey.build_prompt(tok, passkey.overhead_tokens(tok) - 1, depth, "12345")


def test_teacher_forcing_is_greedy_decoding():
    """The one-pass score says 'retrieved' exactly when step-by-step greedy decoding would
    produce the answer: checked against real greedy decoding on a random model, for the
    answer greedy produces (retrieved) and for that answer with one token changed (not)."""
    tok = H.tokenizer()
    m = H.model("llama")
    m.set_attn_implementation(attention_name(all_impls()["chunked"]))
    prompt = passkey.build_prompt(tok, 200, 0.5, "12345")
    context = prompt.ids[:prompt.answer_start]
    greedy = []
    with torch.no_grad():
        for _ in range(len(prompt.ids) - prompt.answer_start):
            logits = m(input_ids=torch.tensor([context + greedy]), use_cache=False).logits[0, -1]
            greedy.append(int(logits.argmax()))
    as_answer = passkey.Prompt(ids=context + greedy, answer_start=len(context), key="")
    correct, predicted = passkey.score(m, tok, as_answer, "cpu")
    assert correct and predicted == " ".join(tok.decode(greedy).split())
    changed = greedy[:-1] + [(greedy[-1] + 1) % H.VOCAB]
    assert not passkey.score(m, tok, passkey.Prompt(ids=context + changed, answer_start=len(context), key=""),
                             "cpu")[0]
    assert not passkey.score(m, tok, prompt, "cpu")[0] or greedy == prompt.ids[prompt.answer_start:]


FAILING = """
from ctxbench.kernels.naive import naive


def fails_at_256(q, k, v, *, causal, window, scale=None, sinks=0):
    if q.shape[2] == 256:
        raise ValueError("deliberate failure inside the kernel")
    return naive(q, k, v, causal=causal, window=window, scale=scale, sinks=sinks)
"""


def test_passkey_run_writes_csv_and_heatmaps_and_survives_a_failing_impl(tiny, tmp_path, capsys):
    (tmp_path / "failing.py").write_text(FAILING)
    raises = f"{tmp_path / 'failing.py'}:fails_at_256"
    code, out, err = run_cli(["passkey", "--device", "cpu", "--model", tiny, "--lengths", "256,320",
                              "--depths", "0,0.5,1", "--trials", "2", "--impls", "sdpa,sliding_window",
                              "--impl", raises, "--window", "32", "--sinks", "2", "--rope", "default,yarn:2",
                              "--out", str(tmp_path / "runs"), "--run-id", "pk"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "pk"
    rows = list(csv.DictReader(open(run_dir / "passkey.csv", newline="")))
    assert len(rows) == 2 * 3 * 2 * 3 * 2  # ropes x impls x lengths x depths x trials
    for r in rows:
        assert r["mask"] == "window" and r["window"] == "32" and r["sinks"] == "2" and r["torch_version"]
        if r["impl"] == raises and r["n"] == "256":
            assert r["status"] == "error" and "deliberate failure" in r["message"]
            continue
        assert r["status"] == "ok", r["message"]
        assert r["correct"] in ("0", "1") and len(r["key"]) == 5 and int(r["n_tokens"]) == int(r["n"])
    # every implementation answers the same keys; exact implementations agree on every answer
    key = {(r["impl"], r["rope"], r["n"], r["depth"], r["trial"]): r for r in rows}
    for (impl, rope, n, depth, trial), r in key.items():
        if impl != "sdpa" and not (impl == raises and n == "256"):
            twin = key[("sdpa", rope, n, depth, trial)]
            assert (r["key"], r["predicted"], r["correct"]) == (twin["key"], twin["predicted"], twin["correct"])
    pngs = sorted(p for p in os.listdir(run_dir) if p.endswith(".png"))
    svgs = sorted(p for p in os.listdir(run_dir) if p.endswith(".svg"))
    assert len(pngs) == len(svgs) == 6  # 3 impls x 2 ropes (the failing one still has its N=320 rows)
    assert "passkey-sdpa-default.png" in pngs and "passkey-sdpa-yarn_2.png" in pngs
    assert (run_dir / "meta.json").exists()
    assert "keys retrieved" in out


def test_bad_passkey_input_is_one_line_and_exit_2(tiny, tmp_path, capsys):
    base = ["passkey", "--device", "cpu", "--model", tiny, "--out", str(tmp_path)]
    for args, fragment in ((["--depths", "0,1.5"], "--depths"), (["--trials", "0"], "--trials"),
                           (["--lengths", "8"], "needs at least"), (["--rope", "bogus"], "unknown --rope"),
                           (["--sinks", "2"], "--sinks needs --mask window"), (["--impls", "nosuch"], "unknown implementation"),
                           (["--model", str(tmp_path / "none")], "no such file or folder")):
        code, _, err = run_cli(base + args, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, code, err)
