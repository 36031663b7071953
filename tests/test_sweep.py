"""ctxbench.engine.sweep on its own, driven by a fake executor (the Executor protocol, with canned
results and no processes): what a row holds, which cells are submitted, skipped after an oom or a
timeout, recorded as unsupported or left alone on resume, the progress bar's weights, the bandwidth
probed once, and the lines that describe a run."""

from __future__ import annotations

import io
import os
from dataclasses import replace
from typing import Any, Callable

import pytest
import torch
from rich.console import Console

from ctxbench.core import kinds, registry
from ctxbench.core.cell import Cell, Config, Settings, key_columns, key_text
from ctxbench.core.env import ENV_FIELDS
from ctxbench.core.formatting import safe_name
from ctxbench.core.registry import register
from ctxbench.engine import sweep as sweep_module
from ctxbench.engine.executor import Executor
from ctxbench.engine.plan import SweepSpec
from ctxbench.engine.results import columns, read_results
from ctxbench.engine.sweep import describe, read_meta, run_sweep
from ctxbench.measurements.decode import DecodePlan
from ctxbench.measurements.kernel import KernelPlan
from ctxbench.measurements.passkey import PasskeyPlan
from ctxbench.measurements.perplexity import PerplexityPlan

MODEL = {"heads": 9, "kv_heads": 3, "head_dim": 64, "dtype": "float32"}


# The implementations of these runs, named as --impl module:function (this file is the module tests/
# test_sweep.py): the fake executor never calls them, the sweep only reads their declarations. A is a
# plain function (exact, no KV cache); B declares a KV cache and is not exact; CUDA runs on CUDA only.
def fast_attention(q, k, v, *, causal, window, scale=None):
    return q


@register("unit_sweep_cached", kv_cache=True, exact=False)
def cached_attention(q, k, v, *, causal, window, scale=None):
    return q


@register("unit_sweep_cuda", devices=["cuda"])
def cuda_attention(q, k, v, *, causal, window, scale=None):
    return q


A, B, CUDA = "test_sweep:fast_attention", "test_sweep:cached_attention", "test_sweep:cuda_attention"
# A known bandwidth: the run does not probe this machine's
SETTINGS = Settings(rep_ms=5.0, seed=13, bandwidth_gbps=20.0, bandwidth_source="given")


class FakeExecutor:
    """An Executor that measures nothing: outcome(cell) is each cell's result. Of the cells in flight
    the oldest finishes first (with newest_first, the newest: results out of submission order)."""

    name = "fake"

    def __init__(self, outcome: Callable[[Cell], dict[str, Any]] | None = None, capacity: int = 1,
                 newest_first: bool = False) -> None:
        self.outcome = outcome or (lambda cell: {"status": "ok", "message": ""})
        self.capacity = capacity
        self.newest_first = newest_first
        self.flying: list[Cell] = []
        self.submitted: list[tuple[Cell, Settings, float, str]] = []
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self.flying)

    def submit(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str) -> None:
        assert not self.closed and len(self.flying) < self.capacity
        # one cell of an (implementation, kind) chain at a time
        assert all((c.impl, c.kind) != (cell.impl, cell.kind) for c in self.flying), cell
        self.flying.append(cell)
        self.submitted.append((cell, settings, timeout_s, log_path))

    def wait(self) -> tuple[Cell, dict[str, Any]]:
        cell = self.flying.pop(-1 if self.newest_first else 0)
        return cell, {"wall_s": 0.25, **self.outcome(cell)}

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> "FakeExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cells(self) -> list[tuple[str, str, int]]:
        return [(c.kind, c.impl, c.n) for c, *_ in self.submitted]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def kernel_spec(impls=(A, B), lengths=(16, 32), **plans) -> SweepSpec:
    return SweepSpec(command="sweep", config=Config(heads=2, kv_heads=1, head_dim=16), lengths=list(lengths),
                     timeout_s=45.0, memory_limit_bytes=2**30, settings=SETTINGS,
                     plans={"kernel": KernelPlan(impls=list(impls)), **plans})


def run(spec: SweepSpec, run_dir, executor: FakeExecutor, console: Console | None = None, **kwargs):
    return run_sweep(spec, str(run_dir), console=console or quiet(), argv=["ctxbench", "test"], executor=executor,
                     **kwargs)


def csv_rows(run_dir) -> list[dict[str, str]]:
    return read_results(os.path.join(run_dir, "results.csv"))[1]


@pytest.fixture(scope="module", autouse=True)
def forget_the_implementations():
    """The implementations declared above are not left registered for other test modules."""
    yield
    for name in ("unit_sweep_cached", "unit_sweep_cuda"):
        registry._REGISTRY.pop(name, None)


def test_the_implementations_resolve():
    assert registry.resolve(A).name == A and registry.resolve(B).name == "unit_sweep_cached"
    assert registry.resolve(CUDA).devices == frozenset({"cuda"})


def test_the_fake_executor_is_an_executor():
    assert isinstance(FakeExecutor(), Executor)


# ---------------------------------------------------------------- rows

def test_each_row_is_the_cells_columns_its_result_and_the_bookkeeping(tmp_path):
    spec = kernel_spec()
    run_dir = tmp_path / "r1"
    latency = {(A, 16): 0.5, (B, 16): 1.5, (A, 32): 2.5, (B, 32): 3.5}
    ex = FakeExecutor(lambda c: {"status": "ok", "message": "", "latency_ms": latency[(c.impl, c.n)], "repeats": 7})
    returned = run(spec, run_dir, ex)
    assert ex.closed
    cells = spec.cells()
    assert [c for c, *_ in ex.submitted] == cells  # the plan's order, one cell at a time
    for _, settings, timeout_s, log_path in ex.submitted:
        assert settings == SETTINGS and timeout_s == 45.0
    assert [log for *_, log in ex.submitted] == [str(run_dir / "logs" / f"{safe_name(c.impl)}.log") for c in cells]
    header, rows = read_results(str(run_dir / "results.csv"))
    assert header == list(columns()) and len(rows) == 4
    torch_version = torch.__version__
    for cell, row in zip(cells, rows):
        assert tuple(row[c] for c in key_columns()) == cell.key
        assert {c: row[c] for c in cell.row()} == {c: key_text(v) for c, v in cell.row().items()}
        assert row["status"] == "ok" and float(row["latency_ms"]) == latency[(cell.impl, cell.n)]
        assert row["repeats"] == "7" and row["wall_s"] == "0.25" and row["log"] == ""
        assert (row["run_id"], row["rep_ms"], row["seed"]) == ("r1", "5.0", "13")
        assert row["impl_exact"] == ("True" if cell.impl == A else "False")  # what the implementation declares
        assert row["finished_at"] and row["torch_version"] == torch_version
        assert all(f in row for f in ENV_FIELDS)
    assert [{k: r[k] for k in ("impl", "n", "status", "latency_ms")} for r in returned] == \
           [{k: r[k] for k in ("impl", "n", "status", "latency_ms")} for r in rows]
    meta = read_meta(str(run_dir))
    assert SweepSpec.from_json(meta["spec"]) == spec and meta["run_id"] == "r1"
    assert [i["argv"] for i in meta["invocations"]] == [["ctxbench", "test"]]
    assert meta["environment"]["torch_version"] == torch_version


def test_a_nodes_environment_replaces_this_machines(tmp_path):
    ex = FakeExecutor(lambda c: {"status": "ok", "message": "", "env": {"hostname": f"node-{c.n}"}})
    run(kernel_spec(impls=(A,)), tmp_path / "r", ex)
    assert [r["hostname"] for r in csv_rows(tmp_path / "r")] == ["node-16", "node-32"]
    assert all(r["torch_version"] == "" for r in csv_rows(tmp_path / "r"))  # only what the node reported


# ---------------------------------------------------------------- oom, timeout, unsupported

def model_sweep(lengths=(16, 32, 64, 128)) -> SweepSpec:
    return kernel_spec(lengths=lengths,
                       perplexity=PerplexityPlan(impls=[A], **MODEL, max_len=128, ropes=["default"]),
                       decode=DecodePlan(impls=[B], **MODEL, max_len=64))


def test_an_oom_skips_the_same_implementation_and_kind_at_longer_lengths_only(tmp_path):
    spec = model_sweep()
    ex = FakeExecutor(lambda c: {"status": "oom", "message": "MemoryError"} if (c.kind, c.impl, c.n) == (
        "kernel", A, 32) else {"status": "ok", "message": ""})
    run(spec, tmp_path / "r", ex)
    rows = {(r["kind"], r["impl"], int(r["n"])): r for r in csv_rows(tmp_path / "r")}
    assert len(rows) == len(spec.cells()) == 4 * 2 + 4 + 3
    for n in (64, 128):
        row = rows[("kernel", A, n)]
        assert row["status"] == "skipped"
        assert row["message"] == f"not attempted: {A} (kernel cells) ran out of memory at N=32"
        assert row["wall_s"] == "" and row["latency_ms"] == ""
    assert rows[("kernel", A, 32)]["log"] == os.path.join("logs", safe_name(A) + ".log")
    # the model cells of the same implementation, and the other implementation, go on
    assert [n for kind, impl, n in ex.cells() if (kind, impl) == ("perplexity", A)] == [16, 32, 64, 128]
    assert [n for kind, impl, n in ex.cells() if (kind, impl) == ("kernel", B)] == [16, 32, 64, 128]
    assert [n for kind, impl, n in ex.cells() if (kind, impl) == ("kernel", A)] == [16, 32]
    assert all(rows[k]["status"] == "ok" for k in rows if k[:2] != ("kernel", A) or k[2] == 16)


@pytest.mark.parametrize("status, skipped, what", [("timeout", True, "timed out"), ("oom", True, "ran out of memory"),
                                                   ("error", False, ""), ("wrong", False, "")])
def test_only_oom_and_timeout_stop_a_chain(tmp_path, status, skipped, what):
    ex = FakeExecutor(lambda c: {"status": status, "message": "x"} if c.n == 16 else {"status": "ok", "message": ""})
    run(kernel_spec(impls=(B,), lengths=(16, 32, 64)), tmp_path / "r", ex)
    statuses = [(r["n"], r["status"]) for r in csv_rows(tmp_path / "r")]
    if skipped:
        assert statuses == [("16", status), ("32", "skipped"), ("64", "skipped")] and ex.cells() == [
            ("kernel", B, 16)]
        assert csv_rows(tmp_path / "r")[1]["message"] == f"not attempted: {B} (kernel cells) {what} at N=16"
    else:
        assert statuses == [("16", status), ("32", "ok"), ("64", "ok")] and len(ex.cells()) == 3
    assert (csv_rows(tmp_path / "r")[0]["log"] != "") == (status != "wrong")  # a log for a failure only


def test_unsupported_cells_are_recorded_without_submitting(tmp_path):
    spec = kernel_spec(impls=(CUDA, A),
                       decode=DecodePlan(impls=[A], **MODEL, max_len=32))  # A takes no KV cache
    ex = FakeExecutor()
    run(spec, tmp_path / "r", ex)
    assert ex.cells() == [("kernel", A, 16), ("kernel", A, 32)]
    rows = {(r["kind"], r["impl"], r["n"]): r for r in csv_rows(tmp_path / "r")}
    for n in ("16", "32"):
        assert rows[("kernel", CUDA, n)]["status"] == "unsupported"
        assert rows[("kernel", CUDA, n)]["message"] == "unit_sweep_cuda does not run on cpu (declares cuda)"
        assert rows[("decode", A, n)]["message"] == \
            f"{A} cannot decode with a KV cache (it does not declare kv_cache=True)"
        assert rows[("kernel", A, n)]["status"] == "ok"


def test_cells_in_flight_together_keep_each_chain_in_length_order(tmp_path):
    """With capacity for several cells (as on a Ray cluster) and results coming back in another
    order, an (implementation, kind) chain still has one cell in flight, so an oom at N skips 2N."""
    spec = model_sweep()
    ex = FakeExecutor(lambda c: {"status": "oom", "message": "m"} if (c.kind, c.impl, c.n) == ("kernel", B, 32)
                      else {"status": "ok", "message": ""}, capacity=3, newest_first=True)
    run(spec, tmp_path / "r", ex)
    rows = csv_rows(tmp_path / "r")
    assert sorted((r["kind"], r["impl"], int(r["n"])) for r in rows) == sorted((c.kind, c.impl, c.n)
                                                                              for c in spec.cells())
    for kind, impl in {(c.kind, c.impl) for c in spec.cells()}:
        chain = [n for k, i, n in ex.cells() if (k, i) == (kind, impl)]
        assert chain == sorted(chain), (kind, impl)
    assert [n for k, i, n in ex.cells() if (k, i) == ("kernel", B)] == [16, 32]
    assert {r["n"]: r["status"] for r in rows if (r["kind"], r["impl"]) == ("kernel", B)} == \
           {"16": "ok", "32": "oom", "64": "skipped", "128": "skipped"}


# ---------------------------------------------------------------- resume

def test_a_resumed_run_submits_only_the_missing_cells(tmp_path):
    run_dir = tmp_path / "r"
    spec = kernel_spec(lengths=(16, 32))
    first = FakeExecutor(lambda c: {"status": "oom", "message": "m"} if (c.impl, c.n) == (A, 32)
                         else {"status": "ok", "message": "", "latency_ms": 1.0})
    run(spec, run_dir, first)
    before = csv_rows(run_dir)
    grown = replace(spec, lengths=[16, 32, 64, 128])
    again = FakeExecutor(lambda c: {"status": "ok", "message": "", "latency_ms": 2.0})
    console = quiet()
    rows = run(grown, run_dir, again, console=console, changes={"lengths": [16, 32, 64, 128]})
    # finished cells stay; A's oom at 32 (read back from results.csv) still skips its 64 and 128
    assert again.cells() == [("kernel", B, 64), ("kernel", B, 128)]
    after = csv_rows(run_dir)
    assert after[:4] == before and len(after) == len(rows) == 8
    assert [(r["impl"], r["n"], r["status"]) for r in after[4:]] == [
        (A, "64", "skipped"), (B, "64", "ok"), (A, "128", "skipped"), (B, "128", "ok")]
    assert "resuming r: 4 cells done, 4 to go" in " ".join(console.file.getvalue().split())
    meta = read_meta(str(run_dir))
    assert len(meta["invocations"]) == 2 and meta["invocations"][1]["changed"] == {"lengths": [16, 32, 64, 128]}
    assert meta["spec"]["lengths"] == [16, 32, 64, 128]
    # nothing left: a third run submits nothing and writes nothing
    idle = FakeExecutor()
    run(grown, run_dir, idle)
    assert idle.cells() == [] and csv_rows(run_dir) == after


def test_a_resumed_run_stops_a_chain_of_the_kind_that_ran_out_only(tmp_path):
    run_dir = tmp_path / "r"
    spec = kernel_spec(impls=(A,), lengths=(16,),
                       perplexity=PerplexityPlan(impls=[A], **MODEL, max_len=128, ropes=["default"]))
    run(spec, run_dir, FakeExecutor(lambda c: {"status": "oom" if c.kind == "perplexity" else "ok", "message": ""}))
    again = FakeExecutor()
    run(replace(spec, lengths=[16, 32]), run_dir, again)
    assert again.cells() == [("kernel", A, 32)]
    row = csv_rows(run_dir)[-1]
    assert (row["kind"], row["n"], row["status"]) == ("perplexity", "32", "skipped")
    assert row["message"] == f"not attempted: {A} (perplexity cells) ran out of memory at N=16"


def test_a_row_cut_off_mid_write_runs_again(tmp_path):
    run_dir = tmp_path / "r"
    spec = kernel_spec(impls=(A,))
    run(spec, run_dir, FakeExecutor())
    path = run_dir / "results.csv"
    text = path.read_text()
    path.write_text(text[:text.rstrip("\n").rfind("\n") + 1] + A + ",32,ker")  # the last row, half written
    again = FakeExecutor()
    run(spec, run_dir, again)
    assert again.cells() == [("kernel", A, 32)]
    assert [(r["impl"], r["n"]) for r in csv_rows(run_dir)] == [(A, "16"), (A, "32")]


# ---------------------------------------------------------------- progress and bandwidth

class RecordingProgress(sweep_module.Progress):
    """rich's Progress, recording the bar's total and what each cell moves it by."""

    log: list[tuple[str, float]] = []

    def add_task(self, description, *args, total=None, **fields):
        RecordingProgress.log.append(("total", total))
        return super().add_task(description, *args, total=total, **fields)

    def advance(self, task_id, advance=1.0):
        RecordingProgress.log.append(("advance", advance))
        super().advance(task_id, advance)

    def update(self, task_id, *, total=None, **fields):
        if total is not None:
            RecordingProgress.log.append(("total", total))
        super().update(task_id, total=total, **fields)


def test_the_progress_bar_weighs_each_cell_as_its_kind_says(tmp_path, monkeypatch):
    RecordingProgress.log = []
    monkeypatch.setattr(sweep_module, "Progress", RecordingProgress)
    asked = []

    def kernel_weight(cell, settings):
        asked.append(("kernel", cell.impl, cell.n, settings.seed))
        return cell.n / 16 + (0.5 if cell.impl == B else 0.0)

    def decode_weight(cell, settings):
        return 100.0 + cell.n

    monkeypatch.setattr(kinds.get("kernel"), "weight", kernel_weight)
    monkeypatch.setattr(kinds.get("decode"), "weight", decode_weight)
    spec = kernel_spec(impls=(A, B, CUDA), lengths=(16, 32, 64),
                       decode=DecodePlan(impls=[B], **MODEL, max_len=32))
    ex = FakeExecutor(lambda c: {"status": "oom", "message": "m"} if (c.impl, c.n) == (A, 16)
                      else {"status": "ok", "message": ""})
    run(spec, tmp_path / "r", ex)
    # CUDA can't run on the CPU: it weighs nothing and is never asked
    kernel = {(i, n): n / 16 + (0.5 if i == B else 0.0) for i in (A, B) for n in (16, 32, 64)}
    decode = {(B, n): 100.0 + n for n in (16, 32)}
    assert sorted(a[1:3] for a in asked) == sorted(kernel) and {a[3] for a in asked} == {13}
    total = sum(kernel.values()) + sum(decode.values())
    log = RecordingProgress.log
    assert log[0] == ("total", pytest.approx(total))
    # measured cells advance the bar by their weight, in the order they finish; skipped cells take
    # theirs out of the total; unsupported ones move it by nothing
    advances = [a for what, a in log if what == "advance"]
    by_cell = {**{("kernel",) + k: w for k, w in kernel.items()}, **{("decode",) + k: w for k, w in decode.items()}}
    rows = csv_rows(tmp_path / "r")
    want = [by_cell.get((r["kind"], r["impl"], int(r["n"])), 0.0) for r in rows if r["status"] != "skipped"]
    assert advances == pytest.approx(want)
    totals = [t for what, t in log if what == "total"]
    assert totals[1:] == pytest.approx([total - kernel[(A, 32)], total - kernel[(A, 32)] - kernel[
        (A, 64)]])


def test_the_bandwidth_is_probed_once_and_saved_with_the_run(tmp_path, monkeypatch):
    probed = []

    def probe(spec, console):
        probed.append(spec.config.device)
        return replace(spec, settings=replace(spec.settings, bandwidth_gbps=31.5, bandwidth_probe_gbps=30.0,
                                              bandwidth_source="probe"))

    monkeypatch.setattr(sweep_module, "with_bandwidth", probe)
    spec = replace(kernel_spec(impls=(A,)), settings=Settings(rep_ms=5.0))
    ex = FakeExecutor()
    run(spec, tmp_path / "r", ex)
    assert probed == ["cpu"]
    assert {s.bandwidth_gbps for _, s, *_ in ex.submitted} == {31.5}
    saved = SweepSpec.from_json(read_meta(str(tmp_path / "r"))["spec"])
    assert (saved.settings.bandwidth_gbps, saved.settings.bandwidth_source) == (31.5, "probe")
    # resumed with the saved figure, the run probes nothing
    grown = replace(saved, lengths=[16, 32, 64])
    run(grown, tmp_path / "r", FakeExecutor())
    assert probed == ["cpu"]
    # a run with no kind that divides by the bandwidth (passkey) never probes
    passkey = SweepSpec(command="passkey", config=Config(), lengths=[64], timeout_s=60.0, memory_limit_bytes=None,
                        plans={"passkey": PasskeyPlan(impls=[A], **MODEL, ropes=["default"], depths=[0.5])})
    run(passkey, tmp_path / "p", FakeExecutor())
    assert probed == ["cpu"]


# Settings promise that the bandwidth is "filled in once per run, so a resumed run divides by the same
# figure": a run whose first probe failed keeps the figure its first successful resume probed.
def test_a_bandwidth_probed_on_resume_is_kept_for_later_resumes(tmp_path, monkeypatch):
    figures = iter([None, 31.5, 99.0])  # the first probe fails, then two that would succeed
    probed = []

    def probe(spec, console):
        figure = next(figures)
        probed.append(figure)
        return spec if figure is None else replace(spec, settings=replace(spec.settings, bandwidth_gbps=figure))

    monkeypatch.setattr(sweep_module, "with_bandwidth", probe)
    run_dir = tmp_path / "r"
    run(replace(kernel_spec(impls=(A,), lengths=(16,)), settings=Settings(rep_ms=5.0)), run_dir, FakeExecutor())
    for lengths in ([16, 32], [16, 32, 64]):  # each resume as the CLI makes it: the spec from meta.json
        saved = SweepSpec.from_json(read_meta(str(run_dir))["spec"])
        ex = FakeExecutor()
        run(replace(saved, lengths=lengths), run_dir, ex)
    assert {s.bandwidth_gbps for _, s, *_ in ex.submitted} == {31.5}
    assert probed == [None, 31.5]


# ---------------------------------------------------------------- describe

def test_describe_is_each_kinds_lines_in_the_commands_order():
    spec = kernel_spec(impls=("sdpa", "naive"))  # describe() names them; it resolves none
    assert describe(spec) == [
        "[bold]ctxbench sweep[/] cpu float32 B=1 Hq=2 Hkv=1 D=16 mask=causal mode=fwd; impls: sdpa, naive; N: 16, 32",
        "perplexity: none (--ppl-max-len 0, --mask none, or no length within --ppl-max-len)"]
    decode_spec = replace(spec, config=Config(heads=2, kv_heads=1, head_dim=16, mask="window", window=8, sinks=1),
                          plans={"kernel": KernelPlan(impls=["sdpa"], query_len=1)})
    assert describe(decode_spec)[0] == ("[bold]ctxbench sweep[/] cpu float32 B=1 Hq=2 Hkv=1 D=16 Lq=1 mask=window "
                                        "W=8 sinks=1 mode=fwd; impls: sdpa; N: 16, 32")


def test_describe_asks_every_kind_of_the_command_with_its_plan(monkeypatch):
    spec = model_sweep()
    asked = []
    for kind in kinds.kinds_of("sweep"):
        def lines(plan, s, name=kind.name):
            asked.append((name, plan, s))
            return [f"{name} line"] if plan is not None else []
        monkeypatch.setattr(kind, "describe", lines)
    spec.plans.pop("perplexity")
    assert describe(spec) == ["kernel line", "decode line"]
    assert [(name, plan) for name, plan, _ in asked] == [("kernel", spec.plans["kernel"]), ("perplexity", None),
                                                         ("decode", spec.plans["decode"])]
    assert all(s is spec for *_, s in asked)
