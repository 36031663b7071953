"""The seam of measurement kinds: a kind registered from a test file (tests/toy_kind.py) is planned
from its command's options, measured isolated in a worker, appended to results.csv, resumed after
an interrupt and shown in the report, by the engine as it is: nothing in ctxbench names it."""

from __future__ import annotations

import io
import os

import pytest
from rich.console import Console

from ctxbench import cli
from ctxbench.core import kinds
from ctxbench.core.cell import Cell, Config
from ctxbench.engine.executor import LocalExecutor
from ctxbench.engine.options import Options, resolve
from ctxbench.engine.results import columns, read_results
from ctxbench.engine.sweep import run_sweep
from ctxbench.reports.report import markdown, report
from ctxbench.reports.summary import print_summary
from sweep_helpers import run_cli, usage_error

LENGTHS = (32, 64, 96)
IMPLS = ("naive", "sdpa")


class InterruptedAfter(LocalExecutor):
    """The local executor, with Ctrl-C pressed in the driver after `cells` results."""

    def __init__(self, cells: int) -> None:
        super().__init__(memory_limit_bytes=None)
        self.left = cells

    def wait(self) -> tuple[Cell, dict]:
        if self.left == 0:
            raise KeyboardInterrupt
        self.left -= 1
        return super().wait()


@pytest.fixture
def toy():
    import toy_kind

    kinds.register_kind(toy_kind.ToyKind)
    kinds.register_command(toy_kind.TOY_COMMAND)
    yield toy_kind
    kinds.unregister(toy_kind.NAME)


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def test_a_kind_from_a_test_file_plans_runs_resumes_and_reports(toy, tmp_path):
    assert "toy_err" in columns() and "toy_heads" in columns()
    o = Options("toy", {"lengths": ",".join(map(str, LENGTHS)), "impl_names": ",".join(IMPLS),
                        "out": str(tmp_path), "run_id": "t", "toy_heads": 3, "timeout": 120.0})
    spec, run_dir, _ = resolve(o)
    assert spec.command == "toy" and list(spec.plans) == ["toy"] and spec.plans["toy"].heads == 3
    assert [(c.impl, c.n, c.kind, c.get("toy_heads")) for c in spec.cells()] == [
        (impl, n, "toy", 3) for n in LENGTHS for impl in IMPLS]

    os.makedirs(run_dir)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, run_dir, console=quiet(), argv=["test"], executor=InterruptedAfter(3))
    _, first = read_results(os.path.join(run_dir, "results.csv"))
    assert len(first) == 3

    # resumed from what the run saved (meta.json), as `ctxbench toy --resume` would
    spec, run_dir, changes = resolve(Options("toy", {"resume": run_dir}))
    assert changes == {} and spec.plans["toy"].heads == 3
    run_sweep(spec, run_dir, console=quiet(), argv=["test", "--resume"], executor=LocalExecutor(None))
    _, rows = read_results(os.path.join(run_dir, "results.csv"))
    assert sorted((r["impl"], int(r["n"])) for r in rows) == sorted((i, n) for i in IMPLS for n in LENGTHS)
    for r in rows:
        assert r["kind"] == "toy" and r["toy_heads"] == "3" and r["status"] == "ok", r
        assert float(r["toy_err"]) < 1e-5
        # measured in a worker process, not here
        assert int(r["toy_pid"]) != os.getpid()
    assert rows[:3] == first

    written = report(run_dir)
    page = open(written[-1]).read()
    assert "<h2>Toy measurements</h2>" in page and "toy cells: 6" in page
    assert markdown(rows).startswith("toy: 6 cells, worst error")
    console = quiet()
    print_summary(rows, run_dir, console)
    assert "toy: 6 cells" in console.file.getvalue()


def test_a_new_kinds_command_takes_its_flags(toy, capsys, tmp_path):
    cli.add_run_command(kinds.command("toy"))
    try:
        code, out, _ = run_cli(["toy", "--help"], capsys)
        assert code == 0 and "--toy-heads" in out and "--ppl-max-len" not in out
        usage_error(["toy", "--toy-heads", "x", "--out", str(tmp_path)], capsys, "--toy-heads")
        code, out, err = run_cli(["toy", "--lengths", "32", "--toy-heads", "2", "--out", str(tmp_path),
                                  "--run-id", "cli"], capsys)
        assert code == 0, err
        _, rows = read_results(os.path.join(tmp_path, "cli", "results.csv"))
        assert [(r["impl"], r["kind"], r["status"]) for r in rows] == [("sdpa", "toy", "ok")]
    finally:
        cli.cli.commands.pop("toy")


def test_a_kinds_fields_and_columns_leave_other_rows_as_they_were(toy):
    kernel = Cell.of(Config(), "sdpa", 64, "kernel", query_len=None, ragged=False, kv_lens=None, page_size=None)
    row = kernel.row()
    assert row["toy_heads"] == "" and row["rope"] == "default" and row["kind"] == "kernel"
    assert kinds.get("kernel").fields == tuple(f for f in kinds.fields() if f.name in
                                              ("query_len", "ragged", "kv_lens", "page_size"))
