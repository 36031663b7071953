"""Running `ctxbench` in-process from tests and reading what it wrote."""

from __future__ import annotations

import glob
import os

import pytest

from ctxbench.cli import main
from ctxbench.engine.results import read_results

HERE = os.path.dirname(os.path.abspath(__file__))
MISBEHAVING = os.path.join(HERE, "misbehaving.py")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `ctxbench ARGS`."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def only_run_dir(out: str) -> str:
    dirs = [d for d in glob.glob(os.path.join(out, "*")) if os.path.isdir(d)]
    assert len(dirs) == 1, dirs
    return dirs[0]


def rows_by_cell(run_dir: str) -> dict[tuple[str, int], dict[str, str]]:
    _, rows = read_results(os.path.join(run_dir, "results.csv"))
    cells = {}
    for r in rows:
        key = (r["impl"], int(r["n"]))
        assert key not in cells, f"cell {key} recorded twice"
        cells[key] = r
    return cells
