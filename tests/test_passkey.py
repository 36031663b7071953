"""Passkey retrieval: prompts of exact length with the key at the asked depth, teacher-forced
scoring equal to greedy decoding, and passkey trials as cells of the sweep (one row each in
results.csv, the same keys for every implementation, resume, isolation, heatmaps), with the
window's sinks reaching the model."""

from __future__ import annotations

import io
import os
from dataclasses import asdict

import pytest
import torch
from rich.console import Console

import lm_helpers as H
from ctxbench.core import kinds
from ctxbench.core.cell import Cell, Config, Settings, key_columns
from ctxbench.core.flags import UsageError
from ctxbench.engine.options import Options
from ctxbench.engine.plan import PlanContext, SweepSpec
from ctxbench.engine.results import read_results
from ctxbench.engine.sweep import read_meta, run_sweep
from ctxbench.measurements.flags import parse_depths
from ctxbench.measurements.kernel import KernelPlan
from ctxbench.measurements.passkey import PasskeyPlan, passkey_plan
from ctxbench.measurements.passkey import prompt as passkey  # the prompts and their scoring
from ctxbench.measurements.passkey.measure import measure_passkey
from ctxbench.measurements.passkey.report import passkey_summary
from ctxbench.models import lm
from ctxbench.models.attention import attention_name
from ctxbench.registry import all_impls
from ctxbench.reports.report import report
from sweep_helpers import run_cli, usage_error, usage_message


# --- prompts and scoring --------------------------------------------------------------------


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


# --- planning -------------------------------------------------------------------------------


def test_passkey_cells_follow_the_length_major_plan():
    plan = PasskeyPlan(impls=["sdpa", "chunked"], ropes=["default", "yarn:2"], depths=[0, 0.5], trials=2,
                       heads=4, kv_heads=2, head_dim=16, dtype="float32")
    config = Config(heads=8, head_dim=64, batch=4, mode="fwd+bwd", mask="window", window=32, sinks=2)
    cells = spec_of([200, 256], config=config, kernel=["naive"], passkey=plan).cells()
    assert [c.kind for c in cells] == (["kernel"] + ["passkey"] * 16) * 2
    pk = [c for c in cells if c.kind == "passkey"]
    assert len({c.key for c in pk}) == 32
    for c in pk:
        assert (c.batch, c.heads, c.kv_heads, c.head_dim, c.mode) == (1, 4, 2, 16, "fwd")
        assert isinstance(c.depth, float) and c.trial in (0, 1)
        assert (c.attn_window, c.attn_sinks) == (32, 2)
    assert pk[0].label == "passkey sdpa N=200 d=0" and pk[-1].label == "passkey chunked N=256 d=0.5 #1 yarn:2"
    kernel = cells[0]
    key = dict(zip(key_columns(), kernel.key))
    assert kernel.depth is None and kernel.trial is None and (key["depth"], key["trial"]) == ("", "")


def test_passkey_plan_checks_its_input_in_one_line(tiny_checkpoint, tmp_path):
    ok = dict(ropes=["default"], depths=[0.0, 1.0], trials=1, model_path=tiny_checkpoint, dtype="float32")
    plan = passkey_plan(["sdpa"], [200, 256], **ok)
    assert (plan.heads, plan.kv_heads, plan.head_dim, plan.depths, plan.ropes) == (4, 2, 16, [0.0, 1.0], ["default"])
    cases = [(dict(trials=0), "--trials"), (dict(model_path=str(tmp_path / "none")), "no such file or folder")]
    for change, fragment in cases:
        assert fragment in usage_message(passkey_plan, ["sdpa"], [200], **{**ok, **change}), change
    with pytest.raises(UsageError, match="needs at least 164 tokens"):
        passkey_plan(["sdpa"], [8, 256], **ok)
    with pytest.raises(UsageError, match="unknown implementation"):
        passkey_plan(["nosuch"], [200], **ok)
    # the depths and RoPE variants are flags parsed by the kind's plan (passkey_plan takes them parsed)
    kind = kinds.get("passkey")
    flags = dict(depths="0,1", rope="default", trials=1, model_path=tiny_checkpoint)
    context = lambda **change: PlanContext(options=Options("passkey", {**flags, **change}),  # noqa: E731
                                           config=Config(), lengths=[200], impls=["sdpa"], named=True)
    assert kind.plan(context()) == passkey_plan(["sdpa"], [200], **ok)
    for change, fragment in ((dict(depths="0,1.5"), "--depths"), (dict(rope="bogus"), "unknown --rope")):
        assert fragment in usage_message(kind.plan, context(**change)), change
    assert parse_depths("0, 0.5,1,1") == [0.0, 0.5, 1.0]
    for bad in ("", "x", "0,-0.1"):
        with pytest.raises(ValueError, match="--depths"):
            parse_depths(bad)


# --- passkey cells in the sweep ------------------------------------------------------------


def spec_of(lengths: list[int], *, config: Config | None = None, kernel: list[str] | None = None,
            passkey: PasskeyPlan | None = None, timeout_s: float = 60.0, memory_limit_bytes: int | None = None,
            settings: Settings | None = None) -> SweepSpec:
    """A run of kernel cells of the `kernel` implementations (if any), then `passkey`'s cells, at each length."""
    plans = {"kernel": KernelPlan(impls=list(kernel))} if kernel else {}
    if passkey is not None:
        plans["passkey"] = passkey
    return SweepSpec(command="passkey", config=config or Config(device="cpu"), lengths=lengths, timeout_s=timeout_s,
                     memory_limit_bytes=memory_limit_bytes, settings=settings or Settings(), plans=plans)


def passkey_spec(model: str, impls: list[str], lengths: list[int], *, config: Config | None = None,
                 ropes: tuple[str, ...] = ("default",), depths: tuple[float, ...] = (0.0, 1.0), trials: int = 1,
                 timeout_s: float = 120.0, memory_limit_bytes: int | None = None) -> SweepSpec:
    """What `ctxbench passkey` builds: a sweep with no kernel cells and a passkey plan."""
    plan = passkey_plan(impls, lengths, ropes=list(ropes), depths=list(depths), trials=trials, model_path=model,
                        dtype="float32")
    return spec_of(lengths, config=config, passkey=plan, timeout_s=timeout_s, memory_limit_bytes=memory_limit_bytes,
                   settings=Settings(seed=0, model=model))


def sweep(spec: SweepSpec, run_dir: str) -> tuple[list[dict[str, str]], str]:
    out = io.StringIO()
    rows = run_sweep(spec, run_dir, console=Console(file=out, width=200), argv=["test"])
    return rows, out.getvalue()


@pytest.mark.slow
@pytest.mark.ci
def test_passkey_cells_run_in_the_sweep_and_resume(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' tiny forward passes, on a shared CPU
    config = Config(device="cpu", mask="window", window=32, sinks=2)
    spec = passkey_spec(tiny_checkpoint, ["sdpa", "chunked"], [200, 256], config=config, ropes=("default", "yarn:2"),
                        depths=(0.0, 1.0), trials=2)
    run_dir = str(tmp_path / "pk")
    sweep(spec, run_dir)
    header, rows = read_results(os.path.join(run_dir, "results.csv"))
    assert {"depth", "trial", "key", "predicted", "correct", "n_tokens"} <= set(header)
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # impls x ropes x lengths x depths x trials
    by = {(r["impl"], r["rope"], r["n"], r["depth"], r["trial"]): r for r in rows}
    assert len(by) == len(rows)  # one row per (impl, rope, n, depth, trial)
    for (impl, rope, n, depth, trial), r in by.items():
        assert r["kind"] == "passkey" and r["status"] == "ok", r["message"]
        assert (r["mask"], r["window"], r["sinks"], r["heads"], r["kv_heads"]) == ("window", "32", "2", "4", "2")
        assert r["correct"] in ("0", "1") and int(r["n_tokens"]) == int(n) and r["model"] == tiny_checkpoint
        assert r["key"] == passkey.make_key(0, int(n), float(depth), int(trial)) and r["torch_version"]
        # every implementation answers the same keys; exact implementations give the same answers
        twin = by[("sdpa", rope, n, depth, trial)]
        assert (r["key"], r["predicted"], r["correct"]) == (twin["key"], twin["predicted"], twin["correct"])
    assert len({r["key"] for r in rows}) > 1  # trials and depths draw different keys
    # heatmaps: one per (impl, rope), drawn by the report from results.csv
    written = [os.path.basename(p) for p in report(run_dir)]
    assert sorted(p for p in written if p.endswith(".png")) == [
        "passkey-chunked-default.png", "passkey-chunked-yarn_2.png", "passkey-sdpa-default.png",
        "passkey-sdpa-yarn_2.png"]
    assert "report.html" in written and not any(p.startswith("latency") for p in written)
    assert passkey_summary(rows).endswith(f"/{len(rows)} keys retrieved; 0 trials not ok")
    # resume: the spec comes back from meta.json and nothing runs again
    again = SweepSpec.from_json(read_meta(run_dir)["spec"])
    assert again == spec
    _, out = sweep(again, run_dir)
    assert f"{len(rows)} cells done, 0 to go" in " ".join(out.split())
    assert len(read_results(os.path.join(run_dir, "results.csv"))[1]) == len(rows)
    # a meta.json from before kinds (a `passkey` entry beside the kernel's `impls`) resumes as the same run
    old = {k: v for k, v in spec.to_json().items() if k not in ("command", "plans")}
    old.update(impls=[], ppl=None, passkey=asdict(spec.plans["passkey"]))
    assert SweepSpec.from_json(old) == spec
    del old["passkey"]  # a meta.json from before passkey cells
    assert "passkey" not in SweepSpec.from_json(old).plans


MISBEHAVING_MODEL_ATTENTION = """
import os

import torch.nn.functional as F


def _good(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def aborts_at_256(q, k, v, *, causal, window, scale=None):
    if q.shape[2] == 256:
        os.abort()
    return _good(q, k, v, causal)


def oom_at_256(q, k, v, *, causal, window, scale=None):
    if q.shape[2] >= 256:
        raise MemoryError("deliberate: no memory for this length")
    return _good(q, k, v, causal)
"""


@pytest.mark.slow
@pytest.mark.ci
def test_a_crashing_or_oom_implementation_costs_only_its_own_passkey_rows(tiny_checkpoint, tmp_path, monkeypatch,
                                                                         capsys):
    """`ctxbench passkey --impl mod:fn --impls sdpa` where fn calls os.abort() (the issue's
    reproduction, which used to kill the whole command with status 134): abort() inside the
    model's attention kills that implementation's worker, not the run: its trial at that length
    is an error and its other lengths run; sdpa's trials are all there; a real out-of-memory at
    N skips the implementation's longer lengths; the command ends normally."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' tiny forward passes, on a shared CPU
    path = tmp_path / "misbehaving_attention.py"
    path.write_text(MISBEHAVING_MODEL_ATTENTION)
    aborts, oom = f"{path}:aborts_at_256", f"{path}:oom_at_256"
    code, out, err = run_cli(["passkey", "--impls", "sdpa", "--impl", aborts, "--impl", oom, "--lengths",
                              "200,256,320", "--depths", "0.5", "--model", tiny_checkpoint, "--device", "cpu",
                              "--timeout", "120", "--out", str(tmp_path), "--run-id", "pk"], capsys)
    assert code == 0, err
    assert "passkey:" in out and "keys retrieved" in out
    run_dir = str(tmp_path / "pk")
    _, rows = read_results(os.path.join(run_dir, "results.csv"))
    by = {(r["impl"], int(r["n"])): r for r in rows}
    assert len(by) == len(rows) == 3 * 3 and {r["kind"] for r in rows} == {"passkey"}
    for n in (200, 256, 320):
        assert by[("sdpa", n)]["status"] == "ok", by[("sdpa", n)]["message"]
        crashed = by[(aborts, n)]
        if n == 256:
            assert crashed["status"] == "error" and "SIGABRT" in crashed["message"], crashed["message"]
            assert crashed["log"].endswith(".log")
        else:
            assert crashed["status"] == "ok", crashed["message"]
        expected = {200: "ok", 256: "oom", 320: "skipped"}[n]
        assert by[(oom, n)]["status"] == expected, (n, by[(oom, n)]["status"], by[(oom, n)]["message"])
    assert by[(oom, 320)]["message"] == f"not attempted: {oom} (passkey cells) ran out of memory at N=256"


class Scripted:
    """An executor that measures nothing: each cell's result is `outcome(cell)`."""

    name, capacity = "scripted", 1

    def __init__(self, outcome):
        self.outcome, self.done, self.submitted = outcome, [], []

    @property
    def in_flight(self) -> int:
        return len(self.done)

    def submit(self, cell, settings, *, timeout_s, log_path) -> None:
        self.submitted.append(cell)
        self.done.append((cell, self.outcome(cell)))

    def wait(self):
        return self.done.pop(0)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_an_oom_at_n_skips_only_longer_passkey_lengths(tmp_path):
    """chunked's passkey trials run out of memory at 256: every other depth, trial and RoPE
    variant at 256 is still attempted, 320 is skipped, and neither sdpa's trials nor chunked's
    kernel cells are touched (the rule keys on implementation and kind)."""
    plan = PasskeyPlan(impls=["sdpa", "chunked"], ropes=["default", "yarn:2"], depths=[0.0, 1.0], trials=2,
                       heads=4, kv_heads=2, head_dim=16, dtype="float32")
    spec = spec_of([200, 256, 320], kernel=["chunked"], passkey=plan)

    def outcome(cell):
        if cell.kind == "passkey" and cell.impl == "chunked" and cell.n >= 256:
            return {"status": "oom", "message": "MemoryError"}
        return {"status": "ok", "message": ""}

    ex = Scripted(outcome)
    rows = run_sweep(spec, str(tmp_path / "run"), console=Console(file=io.StringIO()), argv=["test"], executor=ex)
    assert len(rows) == len(spec.cells()) == 3 + 2 * 2 * 3 * 2 * 2
    status = {}
    for r in rows:
        status.setdefault((r["kind"], r["impl"], int(r["n"])), set()).add(r["status"])
    assert status[("passkey", "chunked", 200)] == {"ok"} and status[("passkey", "chunked", 256)] == {"oom"}
    assert status[("passkey", "chunked", 320)] == {"skipped"}
    assert all(status[("passkey", "sdpa", n)] == {"ok"} and status[("kernel", "chunked", n)] == {"ok"}
               for n in (200, 256, 320))
    assert sum(c.kind == "passkey" and c.impl == "chunked" and c.n == 256 for c in ex.submitted) == 8
    assert not any(c.kind == "passkey" and c.impl == "chunked" and c.n == 320 for c in ex.submitted)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) == 8 and {r["message"] for r in skipped} == {
        "not attempted: chunked (passkey cells) ran out of memory at N=256"}


# --- sinks reach the model -----------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "chunked", "sliding_window", "sdpa"])
def test_sinks_change_what_the_passkey_measurement_sees(tiny_checkpoint, impl, monkeypatch):
    """A window with sinks gives other answer logits than the same window alone (the prompt's
    first tokens are outside a 16-token window at the answer), and the window alone others than
    causal attention: the measurement's model really gets the cell's window and sinks."""
    seen: list[torch.Tensor] = []
    real = passkey.answer_logits

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(passkey, "answer_logits", spy)
    settings = Settings(model=tiny_checkpoint)
    logits = {}
    for name, kw in (("window", {"mask": "window", "window": 16}),
                     ("window+sinks", {"mask": "window", "window": 16, "sinks": 4}), ("causal", {})):
        config = Config(batch=1, heads=4, kv_heads=2, head_dim=16, dtype="float32", device="cpu", **kw)
        cell = Cell.of(config, impl, 256, "passkey", rope="default", depth=0.5, trial=0)
        if name == "causal" and all_impls()[impl].unsupported_reason(cell) is not None:
            continue  # sliding_window declares only windows
        assert all_impls()[impl].unsupported_reason(cell) is None
        row = measure_passkey(all_impls()[impl], cell, settings)
        assert row["status"] == "ok" and row["n_tokens"] == 256
        logits[name] = seen.pop()
    assert (logits["window"] - logits["window+sinks"]).abs().max() > 1e-3, "the sinks were dropped"
    if "causal" in logits:
        assert (logits["causal"] - logits["window"]).abs().max() > 1e-3, "the window was dropped"


# --- the default model (slow) ------------------------------------------------------------


@pytest.mark.slow
def test_default_model_retrieves_a_key_in_the_sweeps_measurement():
    """The real pipeline can say 'retrieved': the default model finds the key at 1024 tokens
    (depths 0 and 1: the key next to the introduction and next to the question)."""
    try:
        ref = lm.default_model()
        lm.check_dependencies(ref)
    except lm.ModelError as exc:
        pytest.skip(str(exc))
    plan = passkey_plan(["sdpa"], [1024], ropes=["default"], depths=[0.0, 1.0], trials=1, model_path=None,
                        dtype="float32")
    rows = [measure_passkey(all_impls()["sdpa"], cell, Settings()) for cell in plan.cells(Config(), 1024)]
    assert all(r["status"] == "ok" and r["n_tokens"] == 1024 for r in rows)
    assert sum(r["correct"] for r in rows) >= 1 and any(r["predicted"] == r["key"] for r in rows)


@pytest.mark.parametrize("args, fragments", [
    (["--depths", "0,1.5"], ["--depths"]),
    (["--trials", "0"], ["--trials must be at least 1"]),
    (["--lengths", "8"], ["at least", "tokens"]),
    (["--rope", "bogus"], ["unknown --rope variant"]),
    (["--sinks", "4"], ["--mask causal --sinks 4:", "sinks only exist beside a window"]),
    (["--mask", "none"], ["--mask none is not available here"]),
    (["--impls", "nosuch"], ["unknown implementation 'nosuch'"]),
    (["--impls", "ring"], ["distributed implementation"]),
    (["--model", "/no/such/model"], ["no such file or folder"]),
    (["--heads", "4"], ["No such option '--heads'"]),
])
def test_bad_passkey_input_is_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys, args, fragments):
    model = [] if "--model" in args else ["--model", tiny_checkpoint]
    usage_error(["passkey", "--device", "cpu", "--lengths", "256", *model, "--out", str(tmp_path), *args], capsys,
                *fragments)
    assert not list(tmp_path.iterdir()), "bad input must not leave a run behind"

