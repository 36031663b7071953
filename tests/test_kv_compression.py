"""A model answering from a compressed KV cache (ctxbench.measurements.ruler.compression) and `ctxbench ruler`:
the full cache reproduces transformers' own uncompressed greedy tokens and teacher-forced
losses, through the cells' own measure functions too; the observed queries give H2O the eager
attention's own weights; the compressed cache holds exactly the tensors an independent
reference keeps; a compressed cell's answer and perplexity are the eager model's under the
equivalent attention mask (tests/ruler_references.py); and the command runs, resumes, reports
and refuses bad input."""

from __future__ import annotations

import math
import os

import pytest
import torch

import lm_helpers as H
import ruler_references as ref
from ctxbench.measurements.ruler import compression as kc
from ctxbench.measurements.ruler import policies as kp
from ctxbench import registry
from ctxbench.models import lm
from ctxbench.measurements.ruler import prompts as ruler
from ctxbench.models.kv_cache import cache_bytes, layer_kv
from ctxbench.core.cell import Cell, Config, Settings
from ctxbench.measurements.ruler import ContinuationPlan, RetrievalPlan
from ctxbench.engine.results import read_results
from sweep_helpers import only_run_dir, run_cli, usage_error


@pytest.fixture(scope="module")
def eager(tiny_checkpoint):
    """The checkpoint under transformers' own eager attention: the independent reference."""
    return H.transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint,
                                                               attn_implementation="eager").float().eval()


def ruler_cell(**fields) -> Cell:
    """A ruler cell of the tiny checkpoint (every Cell of this file is built here): by default a
    niah_single retrieval prompt of 300 tokens under the full cache."""
    kind = fields.pop("kind", "retrieval")
    shape = {k: fields.pop(k) for k in ("impl", "n") if k in fields}
    own = {"ruler_task": "niah_single", "depth": 0.5, "trial": 0} if kind == "retrieval" else {}
    own.update(policy="full", kv_budget=None)
    own.update(fields)
    return Cell.of(Config(heads=4, kv_heads=2, head_dim=16), shape.get("impl", "sdpa"), shape.get("n", 300), kind, **own)


def settings(ckpt: str, **fields) -> Settings:
    return Settings(**{"model": ckpt, "text": "", "seed": 0, "haystack": "corpus", "continuation_tokens": 24,
                       **fields})


def random_ids(n: int, seed: int) -> list[int]:
    """n distinct token ids (not the end token 0), seeded. Distinct: a token's first-layer key
    has the same norm at every position (RoPE rotates it), so a repeated token would make
    KNorm's choice between its copies a float32 rounding."""
    return (torch.randperm(H.VOCAB - 1, generator=torch.Generator().manual_seed(seed))[:n] + 1).tolist()


def prepare(ckpt: str):
    from ctxbench.models.prepare import prepare as prepare_model

    return prepare_model(registry.get("sdpa"), ruler_cell(), ckpt)


def words(text: str) -> str:
    """Whitespace normalized, as the predicted column is."""
    return " ".join(text.split())


def test_full_cache_reproduces_the_uncompressed_greedy_tokens(tiny_checkpoint, eager):
    model, _ = prepare(tiny_checkpoint)
    ids = random_ids(150, seed=41)
    prefill = kc.run_prefill(model, ids[:-1], "cpu", ("test",))
    cache, _ = kc.compress(prefill, "full", prefill.length, seed=0)
    tokens, steps = kc.generate(model, cache, ids[-1], len(ids) - 1, 12, set(), "cpu")
    want, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(12):  # full forward passes, no cache at all
            nxt = int(eager(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            want.append(nxt)
            seq.append(nxt)
    assert tokens == want and len(steps) == 12


def test_continuation_under_the_full_cache_is_the_teacher_forced_loss(tiny_checkpoint, eager):
    model, _ = prepare(tiny_checkpoint)
    ids = random_ids(140, seed=42)
    context = 100
    prefill = kc.run_prefill(model, ids[:context - 1], "cpu", ("test",))
    cache, _ = kc.compress(prefill, "full", prefill.length, seed=0)
    nll = kc.continuation_nll(model, cache, ids[context - 1:], context - 1, "cpu")
    want = H.token_losses(eager, torch.tensor(ids))[context - 1:]
    torch.testing.assert_close(torch.tensor(nll), want, rtol=1e-4, atol=1e-4)


def test_measure_retrieval_with_the_full_cache_answers_as_the_uncompressed_model(tiny_checkpoint, eager):
    """The cell's own path (prefill, compression, the position it feeds the last prompt token
    at): its answer is transformers' plain greedy generation from the same prompt."""
    s = settings(tiny_checkpoint)
    c = ruler_cell(n=300)
    row = kc.measure_retrieval(registry.get("sdpa"), c, s)
    path = lm.resolve_model(tiny_checkpoint)
    tok = lm.load_tokenizer(path)
    sample = ruler.build_sample(tok, "niah_single", 300, 0.5, 0, 0, kc.haystack(s, tok, path, 300))
    eos = H.config().eos_token_id
    with torch.no_grad():
        out = eager.generate(torch.tensor([sample.ids]), max_new_tokens=sample.max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)[0, len(sample.ids):].tolist()
    answer = out[:out.index(eos)] if eos in out else out
    assert len(answer) >= 3, "the reference must answer with a few tokens for the comparison to mean anything"
    assert row["status"] == "ok" and row["predicted"] == words(tok.decode(answer, skip_special_tokens=True))
    assert row["decode_tokens"] == len(out)  # one step per generated token, the end token's included
    assert row["score"] == ref.recall(sample.answers, tok.decode(answer)) and row["kv_kept"] == 299


def test_measure_continuation_with_the_full_cache_is_the_uncompressed_perplexity(tiny_checkpoint, eager):
    """The cell's own path: its ppl is exp(mean NLL) of the continuation in one plain forward
    pass over context and continuation."""
    s = settings(tiny_checkpoint, continuation_tokens=24)
    c = ruler_cell(n=300, kind="continuation")  # as ContinuationPlan plans it
    row = kc.measure_continuation(registry.get("sdpa"), c, s)
    ids = lm.load_corpus("", lm.resolve_model(tiny_checkpoint)).ids[:300 + 24]
    want = math.exp(float(H.token_losses(eager, ids)[300 - 1:].double().mean()))
    assert row["status"] == "ok" and row["ppl_tokens"] == 24 and row["kv_kept"] == 299
    assert row["ppl"] == pytest.approx(want, rel=1e-5)


def test_observed_queries_give_h2o_the_eager_attention_weights(tiny_checkpoint, eager):
    """H2O's scores from the observer's queries and the cache's keys are the attention
    probabilities transformers' eager attention returns, summed over queries and head groups."""
    model, _ = prepare(tiny_checkpoint)
    ids = random_ids(90, seed=43)
    prefill = kc.run_prefill(model, ids, "cpu", ("test",))
    with torch.no_grad():
        attentions = eager(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    assert len(attentions) == len(prefill.queries) == 2
    for layer, probs in enumerate(attentions):
        keys = layer_kv(prefill.cache, layer)[0]
        got = kp.H2O().score(prefill.queries[layer], keys, scaling=prefill.scaling)
        want = probs[0].double().sum(dim=1).reshape(2, 2, -1).sum(dim=1)  # [Hq, N, N] -> [Hkv, N]
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "knorm", "random"])
def test_the_compressed_cache_holds_exactly_the_kept_keys_and_values(tiny_checkpoint, eager, policy):
    """The positions come from the reference (the eager model's own attention and keys, the
    papers' rules in float64), the tensors from the prefill's cache."""
    model, _ = prepare(tiny_checkpoint)
    ids = random_ids(120, seed=44)
    prefill = kc.run_prefill(model, ids, "cpu", ("test",))
    keep = 37
    cache, ms = kc.compress(prefill, policy, keep, seed=5)
    assert ms >= 0 and cache_bytes(cache) == 2 * 2 * 2 * keep * 16 * 4  # layers x K,V x heads x keep x D x fp32
    expected = ref.prefill_kept(eager, ids, policy, keep, seed=5)
    for layer in range(2):
        keys, values = layer_kv(prefill.cache, layer)
        got_k, got_v = layer_kv(cache, layer)
        for h in range(2):
            rows = expected[layer][h]
            assert len(rows) == keep
            assert torch.equal(got_k[0, h], keys[0, h, rows]) and torch.equal(got_v[0, h], values[0, h, rows])
    assert layer_kv(prefill.cache, 0)[0].shape[2] == 120  # the prefill itself is untouched


def test_a_prompt_is_prefilled_once_for_all_its_policies(tiny_checkpoint, eager):
    """Three policies of one prompt: each answer is the eager model's under the attention mask
    of the reference's kept tokens, each score the answers' recall in it, and the prefill (its
    ms) is shared."""
    s = settings(tiny_checkpoint)
    cases = [("full", None, 299), ("streaming", "64", 64), ("snapkv", "0.25", 75)]
    rows = [kc.measure_retrieval(registry.get("sdpa"), ruler_cell(policy=p, kv_budget=b), s) for p, b, _ in cases]
    path = lm.resolve_model(tiny_checkpoint)
    tok = lm.load_tokenizer(path)
    sample = ruler.build_sample(tok, "niah_single", 300, 0.5, 0, 0, kc.haystack(s, tok, path, 300))
    stop = {H.config().eos_token_id}
    for r, (policy, _, keep) in zip(rows, cases):
        kept = ref.prefill_kept(eager, sample.ids[:-1], policy, keep, seed=0)
        answer = tok.decode(ref.masked_greedy(eager, sample.ids, kept, sample.max_new_tokens, stop))
        assert r["status"] == "ok" and r["kv_kept"] == keep and r["expected"] == ";".join(sample.answers)
        assert r["predicted"] == words(answer) and r["score"] == ref.recall(sample.answers, answer), policy
        assert r["kv_cache_bytes"] == 2 * 2 * 2 * keep * 16 * 4 and r["ms_per_token"] > 0
        assert r["prefill_ms"] >= r["selection_ms"] >= 0
    # the same prefill (its ms) under every policy: computed once, compressed three ways
    assert len({r["prefill_ms"] - r["selection_ms"] for r in rows}) == 1


def test_policy_budgets_plan_each_kept_size_once():
    plan = RetrievalPlan(impls=["sdpa"], tasks=["niah_single", "vt"], policies=["full", "streaming", "h2o"],
                         budgets=["256", "0.25", "0.5", "2048"], depths=[0.25, 0.75], trials=2,
                         heads=4, kv_heads=2, head_dim=16, dtype="float32")
    # at 1024: 256 and 0.25 keep the same 256 tokens; 2048 would keep everything (the full cache)
    assert plan.policy_budgets(1024) == [("full", None), ("streaming", "256"), ("streaming", "0.5"),
                                         ("h2o", "256"), ("h2o", "0.5")]
    cells = plan.cells(Config(), 1024)
    assert len(cells) == 2 * 2 * 2 * 5
    # a prompt's cells are consecutive, so its worker prefills it once
    prompts = [(c.kind, c.ruler_task, c.depth, c.trial) for c in cells]
    assert all(len(set(prompts[i:i + 5])) == 1 for i in range(0, len(prompts), 5))
    # the continuation: the same (policy, budget) pairs, once per implementation
    continuation = ContinuationPlan(impls=["sdpa"], policies=plan.policies, budgets=plan.budgets, heads=4,
                                    kv_heads=2, head_dim=16, dtype="float32")
    assert [(c.kind, c.get("policy"), c.get("kv_budget")) for c in continuation.cells(Config(), 1024)] == [
        ("continuation", policy, budget) for policy, budget in plan.policy_budgets(1024)]


def test_ruler_command_runs_resumes_and_reports(tiny_checkpoint, eager, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["ruler", "--device", "cpu", "--model", tiny_checkpoint, "--lengths", "420", "--tasks",
            "niah_single,niah_multivalue", "--policies", "full,snapkv", "--kv-budget", "64",
            "--continuation-tokens", "16", "--out", str(tmp_path), "--run-id", "r"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run_dir = only_run_dir(str(tmp_path))
    _, rows = read_results(os.path.join(run_dir, "results.csv"))
    assert len(rows) == (2 + 1) * 2 and all(r["status"] == "ok" for r in rows), [r["message"] for r in rows]
    assert {(r["kind"], r["ruler_task"], r["policy"], r["kv_budget"]) for r in rows} >= {
        ("retrieval", "niah_multivalue", "snapkv", "64"), ("continuation", "", "full", "")}
    # each continuation's ppl is the eager model's under the attention mask of the reference's kept tokens
    ids = lm.load_corpus("", lm.resolve_model(tiny_checkpoint)).ids[:420 + 16].tolist()
    for r in (r for r in rows if r["kind"] == "continuation"):
        kept = ref.prefill_kept(eager, ids[:419], r["policy"], int(r["kv_kept"]), seed=0)
        assert float(r["ppl"]) == pytest.approx(ref.masked_ppl(eager, ids, 420, kept), rel=1e-4), r["policy"]
    for name in ("ruler-pareto.png", "ruler-niah_single.png", "report.html"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert "KV-cache policies" in open(os.path.join(run_dir, "report.html")).read()
    assert "quality and cost per KV-cache policy" in out
    code, out, err = run_cli(["ruler", "--resume", run_dir], capsys)
    assert code == 0, err
    assert len(read_results(os.path.join(run_dir, "results.csv"))[1]) == len(rows)  # nothing measured twice
    code, out, err = run_cli(["report", run_dir], capsys)
    assert code == 0 and "| snapkv@64 |" in out.replace("  ", " ")
    usage_error(["passkey", "--resume", run_dir], capsys,  # a ruler run resumes as one
                "is a `ctxbench ruler` run; continue it with ctxbench ruler --resume")


@pytest.mark.parametrize("args, fragments", [
    (["--tasks", "niah_single,nope"], ["--tasks", "unknown task nope"]),
    (["--policies", "pyramid"], ["--policies: unknown policy 'pyramid'"]),
    (["--kv-budget", "1.5"], ["--kv-budget: '1.5'"]),
    (["--continuation-tokens", "-2"], ["--continuation-tokens must be >= 0"]),
    (["--lengths", "40"], ["need at least", "tokens (got 40)"]),
    (["--impls", "flash_attn"], ["flash_attn"]),
    (["--impls", "ring"], ["distributed implementation"]),
    (["--depths", "1.2"], ["--depths"]),
    (["--heads", "4"], ["No such option '--heads'"]),
])
def test_bad_ruler_input_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, args, fragments):
    usage_error(["ruler", "--device", "cpu", "--lengths", "420", "--model", tiny_checkpoint, "--out", str(tmp_path),
                 *args], capsys, *fragments)
    assert not list(tmp_path.iterdir()), "bad input must not leave a run behind"


