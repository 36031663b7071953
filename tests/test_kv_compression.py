"""A model answering from a compressed KV cache (ctxbench.measurements.ruler.compression) and `ctxbench ruler`:
the full cache reproduces transformers' own uncompressed greedy tokens and teacher-forced
losses, the observed queries give H2O the eager attention's own weights, the compressed cache
holds exactly the kept tensors, and the command runs, resumes, reports and refuses bad input."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import lm_helpers as H
from ctxbench.measurements.ruler import compression as kc
from ctxbench.measurements.ruler import policies as kp
from ctxbench import registry
from ctxbench.models import lm
from ctxbench.measurements.ruler import prompts as ruler
from ctxbench.measurements.decode.measure import cache_bytes
from ctxbench.engine.plan import Cell, Config, RulerPlan
from ctxbench.engine.results import read_results
from sweep_helpers import only_run_dir, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return H.checkpoint(str(tmp_path_factory.mktemp("tiny-ruler") / "model"))


def cell(ckpt_n: int = 300, **kw) -> Cell:
    fields = dict(impl="sdpa", n=ckpt_n, task="retrieval", heads=4, kv_heads=2, head_dim=16, ruler_task="niah_single",
                  depth=0.5, trial=0, policy="full", kv_budget=None)
    fields.update(kw)
    return Cell(**fields)


def settings(ckpt: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(**{"model": ckpt, "text": "", "seed": 0, "haystack": "corpus", "continuation_tokens": 24,
                              **kw})


def reference_model(ckpt: str):
    """The checkpoint under transformers' own eager attention: the independent reference."""
    return H.transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").float().eval()


def random_ids(n: int) -> list[int]:
    return torch.randint(1, H.VOCAB, (n,), generator=torch.Generator().manual_seed(torch.seed() % 2**31)).tolist()


def test_full_cache_reproduces_the_uncompressed_greedy_tokens(tiny):
    model, _ = prepare(tiny)
    ids = random_ids(150)
    prefill = kc.run_prefill(model, ids[:-1], "cpu", ("test",))
    cache, _ = kc.compress(prefill, "full", prefill.length, seed=0)
    tokens, steps = kc.generate(model, cache, ids[-1], len(ids) - 1, 12, set(), "cpu")
    want, seq = [], list(ids)
    eager = reference_model(tiny)
    with torch.no_grad():
        for _ in range(12):  # full forward passes, no cache at all
            nxt = int(eager(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
            want.append(nxt)
            seq.append(nxt)
    assert tokens == want and len(steps) == 12


def prepare(ckpt: str):
    from ctxbench.measurements.perplexity.measure import prepare as prepare_model

    return prepare_model(registry.get("sdpa"), cell(), ckpt)


def test_continuation_under_the_full_cache_is_the_teacher_forced_loss(tiny):
    model, _ = prepare(tiny)
    ids = random_ids(140)
    context = 100
    prefill = kc.run_prefill(model, ids[:context - 1], "cpu", ("test",))
    cache, _ = kc.compress(prefill, "full", prefill.length, seed=0)
    nll = kc.continuation_nll(model, cache, ids[context - 1:], context - 1, "cpu")
    want = H.token_losses(reference_model(tiny), torch.tensor(ids))[context - 1:]
    torch.testing.assert_close(torch.tensor(nll), want, rtol=1e-4, atol=1e-4)


def test_observed_queries_give_h2o_the_eager_attention_weights(tiny):
    """H2O's scores from the observer's queries and the cache's keys are the attention
    probabilities transformers' eager attention returns, summed over queries and head groups."""
    model, _ = prepare(tiny)
    ids = random_ids(90)
    prefill = kc.run_prefill(model, ids, "cpu", ("test",))
    with torch.no_grad():
        attentions = reference_model(tiny)(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    assert len(attentions) == len(prefill.queries) == 2
    for layer, probs in enumerate(attentions):
        keys = kc.layer_kv(prefill.cache, layer)[0]
        got = kp.h2o_scores(prefill.queries[layer], keys, scaling=prefill.scaling)
        want = probs[0].double().sum(dim=1).reshape(2, 2, -1).sum(dim=1)  # [Hq, N, N] -> [Hkv, N]
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv", "knorm", "random"])
def test_the_compressed_cache_holds_exactly_the_kept_keys_and_values(tiny, policy):
    model, _ = prepare(tiny)
    ids = random_ids(120)
    prefill = kc.run_prefill(model, ids, "cpu", ("test",))
    keep = 37
    cache, ms = kc.compress(prefill, policy, keep, seed=5)
    assert ms >= 0 and cache_bytes(cache) == 2 * 2 * 2 * keep * 16 * 4  # layers x K,V x heads x keep x D x fp32
    for layer in range(2):
        keys, values = kc.layer_kv(prefill.cache, layer)
        scores = kp.policy_scores(policy, prefill.queries[layer], keys, scaling=prefill.scaling, seed=5, layer=layer)
        index = kp.select(policy, scores, 120, keep)
        got_k, got_v = kc.layer_kv(cache, layer)
        for h in range(2):
            rows = index[h if index.shape[0] > 1 else 0]
            assert torch.equal(got_k[0, h], keys[0, h, rows]) and torch.equal(got_v[0, h], values[0, h, rows])
    assert kc.layer_kv(prefill.cache, 0)[0].shape[2] == 120  # the prefill itself is untouched


def test_a_prompt_is_prefilled_once_for_all_its_policies(tiny):
    s = settings(tiny)
    rows = [kc.measure_retrieval(registry.get("sdpa"), cell(policy=p, kv_budget=b), s)
            for p, b in [("full", None), ("streaming", "64"), ("snapkv", "0.25")]]
    tok = lm.load_tokenizer(lm.resolve_model(tiny))
    sample = ruler.build_sample(tok, "niah_single", 300, 0.5, 0, 0, kc.haystack(s, tok, lm.resolve_model(tiny), 300))
    for r, keep in zip(rows, (299, 64, 75)):
        assert r["status"] == "ok" and r["kv_kept"] == keep and r["expected"] == ";".join(sample.answers)
        assert r["kv_cache_bytes"] == 2 * 2 * 2 * keep * 16 * 4 and 0 <= r["score"] <= 1 and r["ms_per_token"] > 0
        assert r["prefill_ms"] >= r["selection_ms"] >= 0
    # the same prefill (its ms) under every policy: computed once, compressed three ways
    assert len({r["prefill_ms"] - r["selection_ms"] for r in rows}) == 1


def test_policy_budgets_plan_each_kept_size_once():
    plan = RulerPlan(impls=["sdpa"], tasks=["niah_single", "vt"], policies=["full", "streaming", "h2o"],
                     budgets=["256", "0.25", "0.5", "2048"], depths=[0.25, 0.75], trials=2, continuation=16,
                     heads=4, kv_heads=2, head_dim=16, dtype="float32")
    # at 1024: 256 and 0.25 keep the same 256 tokens; 2048 would keep everything (the full cache)
    assert plan.policy_budgets(1024) == [("full", None), ("streaming", "256"), ("streaming", "0.5"),
                                         ("h2o", "256"), ("h2o", "0.5")]
    cells = plan.cells(Config(), 1024)
    assert len(cells) == (2 * 2 * 2 + 1) * 5
    # a prompt's cells are consecutive, so its worker prefills it once
    prompts = [(c.task, c.ruler_task, c.depth, c.trial) for c in cells]
    assert all(len(set(prompts[i:i + 5])) == 1 for i in range(0, len(prompts), 5))


def test_ruler_command_runs_resumes_and_reports(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["ruler", "--device", "cpu", "--model", tiny, "--lengths", "420", "--tasks", "niah_single,niah_multivalue",
            "--policies", "full,snapkv", "--kv-budget", "64", "--continuation-tokens", "16",
            "--out", str(tmp_path), "--run-id", "r"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run_dir = only_run_dir(str(tmp_path))
    _, rows = read_results(os.path.join(run_dir, "results.csv"))
    assert len(rows) == (2 + 1) * 2 and all(r["status"] == "ok" for r in rows), [r["message"] for r in rows]
    assert {(r["task"], r["ruler_task"], r["policy"], r["kv_budget"]) for r in rows} >= {
        ("retrieval", "niah_multivalue", "snapkv", "64"), ("continuation", "", "full", "")}
    assert all(float(r["ppl"]) > 1 for r in rows if r["task"] == "continuation")
    for name in ("ruler-pareto.png", "ruler-niah_single.png", "report.html"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert "KV-cache policies" in open(os.path.join(run_dir, "report.html")).read()
    assert "quality and cost per KV-cache policy" in out
    code, out, err = run_cli(["ruler", "--resume", run_dir], capsys)
    assert code == 0, err
    assert len(read_results(os.path.join(run_dir, "results.csv"))[1]) == len(rows)  # nothing measured twice
    code, out, err = run_cli(["report", run_dir], capsys)
    assert code == 0 and "| snapkv@64 |" in out.replace("  ", " ")
    code, out, err = run_cli(["passkey", "--resume", run_dir], capsys)  # a ruler run resumes as one
    assert code == 2 and "is a `ctxbench ruler` run; continue it with ctxbench ruler --resume" in err


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
def test_bad_ruler_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, args, fragments):
    code, out, err = run_cli(["ruler", "--device", "cpu", "--lengths", "420", "--model", tiny, "--out", str(tmp_path),
                              *args], capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ctxbench: error:"), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not list(tmp_path.iterdir()), "bad input must not leave a run behind"


