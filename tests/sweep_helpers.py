"""Running `ctxbench` in-process from tests and reading what it wrote."""

from __future__ import annotations

import glob
import os

import pytest

from ctxbench.cli import main
from ctxbench.core.flags import UsageError
from ctxbench.engine.results import read_results

HERE = os.path.dirname(os.path.abspath(__file__))
MISBEHAVING = os.path.join(HERE, "misbehaving.py")


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `ctxbench ARGS`."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def usage_error(args: list[str], capsys, *fragments: str, quiet: bool = False) -> str:
    """`ctxbench ARGS` is refused as a usage error: exit status 2, no traceback, exactly one
    non-blank line on stderr, starting with `ctxbench: error:` and containing every fragment
    (quiet: and nothing on stdout). Returns that line."""
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ctxbench: error:"), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in out + err
    if quiet:
        assert out == "", out
    return lines[0]


def usage_message(fn, *args, **kwargs) -> str:
    """The one-line message of the UsageError that fn(*args, **kwargs) raises (the same refusal
    as usage_error's, one level down: a function of ctxbench's rather than the command line)."""
    with pytest.raises(UsageError) as exc:
        fn(*args, **kwargs)
    message = str(exc.value)
    assert message and "\n" not in message, message
    return message


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
