"""Implementations at a git revision (ctxbench.core.revisions) and the interleaved A/B executor
(ctxbench.engine.interleave): the revision's kernels/ is exported once per commit, a worker
measuring X@<commit> runs that code (and only that), X and X@<commit> take turns, and bad
revisions are one-line errors."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ctxbench.core import revisions
from ctxbench.core.cell import Cell, Config, Settings
from ctxbench.core.formatting import safe_name
from ctxbench.engine import interleave
from ctxbench.engine.executor import LocalExecutor, WorkerPool
from ctxbench.measurements.kernel.measure import merge_rounds, quantiles
from sweep_helpers import only_run_dir, rows_by_cell, run_cli, usage_error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(REPO, "kernels")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("CTXBENCH_CACHE", str(tmp_path / "cache"))
    return str(tmp_path / "cache")


def git(repo: str, *args: str) -> str:
    return subprocess.run(["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch) -> str:
    """A git repository whose two commits hold kernels/ (chunked.py differing) and one older
    commit with the pre-ctxbench.kernels layout (kernels/__init__.py)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = str(tmp_path / "repo")
    os.makedirs(os.path.join(root, "kernels"))
    git(root, "init", "-q")
    with open(os.path.join(root, "kernels", "__init__.py"), "w") as f:
        f.write("")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "old layout")
    os.remove(os.path.join(root, "kernels", "__init__.py"))
    for name in ("chunked.py", "_blockwise.py", "naive.py"):
        shutil.copy(os.path.join(KERNELS, name), os.path.join(root, "kernels", name))
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "one")
    with open(os.path.join(root, "kernels", "chunked.py"), "a") as f:
        f.write("\nMARK = 2\n")
    git(root, "commit", "-q", "-am", "two")
    monkeypatch.setattr(revisions, "repository", lambda: root)
    return root


def test_split_and_pinned_names():
    assert revisions.split("chunked@origin/main") == ("chunked", "origin/main")
    assert revisions.split("chunked") == ("chunked", None)
    assert revisions.split("pkg.mod:fn") == ("pkg.mod:fn", None)
    assert revisions.is_pinned("chunked@0123456789ab") and not revisions.is_pinned("chunked@HEAD~1")


def test_pin_exports_the_revisions_kernels_once(repo, cache):
    one = git(repo, "rev-parse", "HEAD~1")
    name = revisions.pin("chunked@HEAD~1")
    assert name == f"chunked@{one[:12]}"
    folder = revisions.folder(one[:12])
    assert sorted(os.listdir(folder)) == ["_blockwise.py", "chunked.py", "naive.py"]
    assert "MARK" not in open(os.path.join(folder, "chunked.py")).read()  # HEAD~1's file, not HEAD's
    head = revisions.pin("chunked@HEAD")
    assert "MARK = 2" in open(os.path.join(revisions.folder(head.split("@")[1]), "chunked.py")).read()
    # pinned again: the same name, from the cache
    assert revisions.pin(name) == name


def test_bad_revisions_are_one_line(repo, cache):
    with pytest.raises(revisions.RevisionError, match="'nope' is not a commit of the git checkout"):
        revisions.pin("chunked@nope")
    with pytest.raises(revisions.RevisionError, match="give a git revision after '@'"):
        revisions.pin("chunked@")
    with pytest.raises(revisions.RevisionError, match="predates the ctxbench.kernels layout"):
        revisions.pin("chunked@HEAD~2")
    assert not os.path.exists(os.path.join(cache, "revisions", git(repo, "rev-parse", "HEAD~2")[:12]))


def test_cli_refuses_a_bad_revision_and_ray(repo, cache, tmp_path, capsys):
    usage_error(["sweep", "--impls", "chunked,chunked@nope", "--lengths", "128", "--ppl-max-len", "0",
                 "--out", str(tmp_path / "out")], capsys, "chunked@nope", "is not a commit")
    usage_error(["sweep", "--impls", "chunked,flash9@HEAD", "--lengths", "128", "--ppl-max-len", "0",
                 "--out", str(tmp_path / "out")], capsys, "unknown implementation 'flash9'")
    usage_error(["sweep", "--impls", "chunked,chunked@HEAD", "--lengths", "128", "--ppl-max-len", "0",
                 "--executor", "ray", "--out", str(tmp_path / "out")], capsys, "local executor only")
    usage_error(["sweep", "--impls", "chunked,chunked@HEAD", "--lengths", "128", "--ppl-max-len", "0",
                 "--fresh-worker", "--out", str(tmp_path / "out")], capsys, "drop --fresh-worker")


def planted(cache: str, commit: str) -> None:
    """An exported revision whose chunked returns twice the attention: its cells must be wrong."""
    folder = revisions.folder(commit)
    shutil.copytree(KERNELS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(folder, "chunked.py"), "a") as f:
        f.write(PLANT)


# appended to the exported chunked.py: chunked registered again, its runner's output doubled
PLANT = """
_orig = next(f for f in list(globals().values()) if getattr(getattr(f, "__ctxbench_impl__", None), "name", "") == "chunked")
_i = _orig.__ctxbench_impl__


def _twice(*args, **kwargs):
    run = _orig(*args, **kwargs)
    return lambda *a, **kw: 2 * run(*a, **kw)


register("chunked", devices=_i.devices, dtypes=_i.dtypes, masks=_i.masks, modes=_i.modes, gqa=_i.gqa, sinks=_i.sinks,
         kv_cache=_i.kv_cache, ragged=_i.ragged, paged=_i.paged, setup=True)(_twice)
"""


def test_a_worker_measures_the_revisions_code(cache, tmp_path):
    """X@<commit>'s worker imports kernels/ from the export: a planted chunked that doubles its
    output is `wrong` there, while the current chunked, in its own worker, is ok."""
    commit = "feedfacecafe"
    planted(cache, commit)
    cell = Cell.of(Config(heads=2, kv_heads=2, head_dim=16), "chunked", 64, "kernel")
    settings = Settings(warmup_ms=1, rep_ms=1, min_repeats=2, max_repeats=2, check_rows=16)
    with WorkerPool(None) as pool:
        now = pool.run_cell(cell, settings, timeout_s=300, log_path=str(tmp_path / "a.log"))
        then = pool.run_cell(Cell.of(Config(heads=2, kv_heads=2, head_dim=16), f"chunked@{commit}", 64, "kernel"),
                             settings, timeout_s=300, log_path=str(tmp_path / "b.log"))
    assert now["status"] == "ok", now
    assert then["status"] == "wrong" and "relative L2 error" in then["message"], then


def test_a_missing_export_is_an_error_row(cache, tmp_path):
    cell = Cell.of(Config(heads=2, kv_heads=2, head_dim=16), "chunked@0123456789ab", 64, "kernel")
    with WorkerPool(None) as pool:
        got = pool.run_cell(cell, Settings(), timeout_s=300, log_path=str(tmp_path / "w.log"))
    assert got["status"] == "error" and "no exported kernels/" in got["message"]


def test_partners_and_round_budget():
    assert interleave.partners(["naive", "chunked", "chunked@0123456789ab", "sdpa@0123456789ab"]) == {
        "chunked": "chunked@0123456789ab", "chunked@0123456789ab": "chunked"}
    first = interleave.round_settings(Settings(rep_ms=1200, min_repeats=3, max_repeats=100), 6, first=True)
    assert (first.rep_ms, first.min_repeats, first.max_repeats, first.warmup_ms) == (200, 1, 17, Settings().warmup_ms)
    assert first.keep_for_more
    later = interleave.round_settings(Settings(rep_ms=1200, min_repeats=3, max_repeats=100), 6, first=False)
    assert (later.rep_ms, later.warmup_ms, later.keep_for_more) == (200, 0.0, True)
    last = interleave.round_settings(Settings(rep_ms=1200), 6, first=False, last=True)
    assert not last.keep_for_more  # the worker drops the kept call after the last round


def test_rounds_alternate_and_merge(monkeypatch, tmp_path):
    """A B, B A, A B ...: each side's rows merged (samples of every round, rates at the merged
    median); the partner's row is returned when the sweep submits its cell, without measuring."""
    calls: list[str] = []
    mores: list[bool] = []

    def fake(self, cell, settings, *, timeout_s, log_path, more=False):
        calls.append(cell.impl)
        mores.append(more)
        assert settings.keep_for_more == (len(calls) <= 6)  # rounds 1-3 keep the call, the last (4) drops it
        k = len([c for c in calls if c == cell.impl])
        ms = 2.0 if "@" in cell.impl else 3.0
        return {"status": "ok", "message": "", "latency_samples_ms": f"{ms * k};{ms * k + 1}", "wall_s": 1.0,
                "timing_rounds": 1, "err_rel_l2": 1e-7, "log": os.path.basename(log_path)}

    monkeypatch.setattr(LocalExecutor, "run_cell", fake)
    names = ["chunked", "chunked@0123456789ab"]
    ex = interleave.InterleavedExecutor(None, names, rounds=4)
    a = Cell.of(Config(heads=2, kv_heads=2, head_dim=16), "chunked", 128, "kernel")
    b = Cell.of(Config(heads=2, kv_heads=2, head_dim=16), "chunked@0123456789ab", 128, "kernel")
    s = Settings()
    got_a = ex.run_cell(a, s, timeout_s=10, log_path=str(tmp_path / "chunked.log"))
    assert calls == ["chunked", "chunked@0123456789ab", "chunked@0123456789ab", "chunked",
                     "chunked", "chunked@0123456789ab", "chunked@0123456789ab", "chunked"]
    assert mores == [False, False] + [True] * 6  # round 1 measures, the later rounds time again
    got_b = ex.run_cell(b, s, timeout_s=10, log_path=str(tmp_path / "x.log"))
    assert len(calls) == 8  # kept, not measured again
    a_samples = [3.0, 4.0, 6.0, 7.0, 9.0, 10.0, 12.0, 13.0]
    assert got_a["timing_rounds"] == 4 and got_a["latency_samples_ms"] == quantiles(a_samples)["latency_samples_ms"]
    assert got_a["latency_ms"] == pytest.approx(8.0) and got_a["latency_min_ms"] == 3.0 and got_a["repeats"] == 8
    assert got_b["latency_ms"] == pytest.approx(5.5) and got_b["wall_s"] == 4.0
    assert got_b["log"] == safe_name("chunked@0123456789ab") + ".log"  # each side logs to its own file, as the sweep names it
    assert got_a["tflops"] == pytest.approx(got_a["flops"] / (8.0e-3) / 1e12)
    assert got_a["round_latency_ms"] == "3.5;6.5;9.5;12.5"  # each round's median, in order


def test_a_failed_round_ends_that_side(monkeypatch, tmp_path):
    calls: list[str] = []

    def fake(self, cell, settings, *, timeout_s, log_path, more=False):
        calls.append(cell.impl)
        if "@" in cell.impl and calls.count(cell.impl) == 2:
            return {"status": "timeout", "message": "no result after 10 s; worker killed", "wall_s": 10.0}
        return {"status": "ok", "message": "", "latency_samples_ms": "1;2", "wall_s": 1.0}

    monkeypatch.setattr(LocalExecutor, "run_cell", fake)
    ex = interleave.InterleavedExecutor(None, ["chunked", "chunked@0123456789ab"], rounds=4)
    a = Cell.of(Config(), "chunked", 128, "kernel")
    got = ex.run_cell(a, Settings(), timeout_s=10, log_path=str(tmp_path / "chunked.log"))
    b = ex.run_cell(Cell.of(Config(), "chunked@0123456789ab", 128, "kernel"), Settings(), timeout_s=10,
                    log_path=str(tmp_path / "chunked.log"))
    assert got["status"] == "ok" and got["repeats"] == 8
    assert b["status"] == "timeout" and calls.count("chunked@0123456789ab") == 2


def test_merge_keeps_a_single_round_and_failures():
    cell = Cell.of(Config(), "chunked", 128, "kernel")
    one = {"status": "ok", "latency_samples_ms": "1;2"}
    assert merge_rounds(cell, [one], Settings()) is one
    bad = {"status": "oom", "message": "out of memory"}
    assert merge_rounds(cell, [bad], Settings()) is bad


@pytest.mark.slow
@pytest.mark.ci  # an A/B sweep through the CLI, two workers, 20 rounds: about 12 s
def test_an_ab_sweep_end_to_end(cache, tmp_path, capsys):
    """chunked beside chunked@HEAD in one sweep: the name pinned to HEAD's commit, both measured in
    the interleaved rounds, and `ctxbench compare RUN` joins every cell."""
    if shutil.which("git") is None or subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"],
                                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout[:12]
    out = str(tmp_path / "out")
    code, _, err = run_cli(["sweep", "--impls", "chunked,chunked@HEAD", "--lengths", "64", "--heads", "2",
                            "--head-dim", "16", "--ppl-max-len", "0", "--rep-ms", "30", "--out", out], capsys)
    assert code == 0, err
    run = only_run_dir(out)
    rows = rows_by_cell(run)
    for impl in ("chunked", f"chunked@{head}"):
        for n in (64,):
            row = rows[(impl, n)]
            assert row["status"] == "ok" and row["timing_rounds"] == str(interleave.ROUNDS), row
            assert int(row["repeats"]) >= interleave.ROUNDS
            assert len(row["round_latency_ms"].split(";")) == interleave.ROUNDS
    code, out_text, _ = run_cli(["compare", run, "--max-slowdown", "1000%"], capsys)
    assert code == 0 and "1 cells in common" in out_text and "Wilcoxon signed-rank" in out_text


def test_the_kept_call_is_timed_again_then_dropped():
    """Round 1 keeps the prepared call (keep_for_more), a later round times it again without
    setting it up, and the last round (keep_for_more False) drops it: no tensors stay behind."""
    from ctxbench.core import registry
    from ctxbench.measurements.kernel import measure

    cell = Cell.of(Config(heads=2, kv_heads=2, head_dim=16), "chunked", 64, "kernel")
    s = Settings(warmup_ms=1, rep_ms=1, min_repeats=2, max_repeats=2, check_rows=16, keep_for_more=True)
    impl = registry.resolve("chunked")
    first = measure.measure_cell(impl, cell, s)
    assert first["status"] == "ok" and first["timing_rounds"] == 1
    again = measure.measure_more(impl, cell, s)
    assert again["status"] == "ok" and again["repeats"] == 2 and again["latency_ms"] > 0
    last = measure.measure_more(impl, cell, Settings(warmup_ms=0, rep_ms=1, min_repeats=1, max_repeats=1))
    assert last["repeats"] == 1
    with pytest.raises(RuntimeError, match="no prepared call"):
        measure.measure_more(impl, cell, s)
    # another cell's round never times this one's call
    measure.measure_cell(impl, cell, s)
    other = Cell.of(Config(heads=2, kv_heads=2, head_dim=16), "chunked", 128, "kernel")
    with pytest.raises(RuntimeError, match="no prepared call"):
        measure.measure_more(impl, other, s)


def test_the_revision_declares_its_own_capabilities(cache, tmp_path):
    """The driver plans X@<commit> with today's X's declarations; the worker asks the revision's:
    an export whose chunked declares no window mask makes the window cell unsupported there."""
    commit = "0badc0ffee00"
    folder = revisions.folder(commit)
    shutil.copytree(KERNELS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(folder, "chunked.py"), "a") as f:
        f.write(NO_WINDOW)
    config = Config(heads=2, kv_heads=2, head_dim=16, mask="window", window=16)
    with WorkerPool(None) as pool:
        got = pool.run_cell(Cell.of(config, f"chunked@{commit}", 64, "kernel"), Settings(rep_ms=1, check_rows=16),
                            timeout_s=300, log_path=str(tmp_path / "w.log"))
    assert got["status"] == "unsupported" and "window" in got["message"], got


# appended to the exported chunked.py: chunked registered again without the window mask
NO_WINDOW = """
_orig = next(f for f in list(globals().values()) if getattr(getattr(f, "__ctxbench_impl__", None), "name", "") == "chunked")
_i = _orig.__ctxbench_impl__
register("chunked", devices=_i.devices, dtypes=_i.dtypes, masks=("none", "causal"), modes=_i.modes, gqa=_i.gqa,
         sinks=_i.sinks, kv_cache=_i.kv_cache, ragged=_i.ragged, paged=_i.paged, setup=True)(_orig)
"""
