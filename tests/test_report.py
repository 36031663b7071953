"""Reports: the files `ctxbench report` writes for a real small run, the scaling fits, and a
plotting failure that must not cost the run."""

from __future__ import annotations

import os
import re

import pytest

from ctxbench.engine.results import ResultsWriter, columns, read_results
from ctxbench.measurements.kernel.report import fits_markdown, pivot_markdown
from ctxbench.reports.fits import fit_all, fit_impl, slope
from ctxbench.reports.report import markdown, report
from sweep_helpers import only_run_dir, run_cli, usage_error

# Kernel cells only: a perplexity cell runs a language model (tens of seconds on a CPU).
SMALL = ["--device", "cpu", "--heads", "2", "--head-dim", "16", "--rep-ms", "5", "--lengths", "16,32,64",
         "--ppl-max-len", "0"]
PLOTS = [f"{name}.{ext}" for name in ("latency", "tflops", "memory") for ext in ("png", "svg")]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> str:
    """A real two-implementation sweep; the sweep itself writes the report at its end."""
    from ctxbench.cli import main

    out = tmp_path_factory.mktemp("runs")
    with pytest.raises(SystemExit) as exc:
        main(["sweep", *SMALL, "--impls", "naive,sdpa", "--out", str(out), "--run-id", "small"])
    assert exc.value.code == 0
    return only_run_dir(str(out))


def test_sweep_writes_the_report(small_run):
    for name in PLOTS + ["report.html"]:
        path = os.path.join(small_run, name)
        assert os.path.getsize(path) > 1000, name


def test_report_command_writes_every_file(small_run, capsys):
    for name in PLOTS + ["report.html"]:
        os.remove(os.path.join(small_run, name))
    code, out, err = run_cli(["report", small_run], capsys)
    assert code == 0, err
    for name in PLOTS + ["report.html"]:
        path = os.path.join(small_run, name)
        assert os.path.getsize(path) > 1000, name
        assert path in out
    with open(os.path.join(small_run, PLOTS[0]), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(small_run, "latency.svg")) as f:
        assert "<svg" in f.read(2000)
    assert "| naive |" in out and "| sdpa |" in out  # the pivot, as markdown
    assert "latency ~N^p" in out


def test_report_html_is_self_contained(small_run):
    with open(os.path.join(small_run, "report.html")) as f:
        page = f.read()
    # Three plots embedded, nothing fetched from elsewhere.
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)) == 3
    assert not re.search(r'(src|href)="(?!data:)', page)
    _, rows = read_results(os.path.join(small_run, "results.csv"))
    for title in ("latency (median)", "TFLOP/s at the median latency", "peak memory above the inputs", "status"):
        assert f"<h3>{title}</h3>" in page
    assert rows[0]["torch_version"] in page and rows[0]["device_name"] in page  # the environment
    assert "Scaling fits" in page and "largest N that fit" in page and "fit over N" in page
    assert page.count("<td>naive</td>") >= 5  # one line per pivot and one in the fits


def test_sweep_summary_prints_the_fits(tmp_path, capsys):
    code, out, err = run_cli(["sweep", *SMALL, "--impls", "sdpa", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert "latency ~N^p" in out and "(all ran)" in out
    assert "report: " in out and "report.html" in out


def test_a_plotting_failure_keeps_the_run(tmp_path, capsys, monkeypatch):
    import ctxbench.reports.report

    def broken(run_dir: str) -> list[str]:
        raise RuntimeError("no fonts\nsecond line")

    monkeypatch.setattr(ctxbench.reports.report, "report", broken)
    code, out, err = run_cli(["sweep", *SMALL, "--impls", "sdpa", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    run_dir = only_run_dir(str(tmp_path))
    _, rows = read_results(os.path.join(run_dir, "results.csv"))
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert "no report (RuntimeError: no fonts); the results are complete" in out.replace("\n", " ")
    assert not os.path.exists(os.path.join(run_dir, "report.html"))


def _synthetic(path: str, rows: list[dict[str, object]], header: tuple[str, ...] = columns()) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w = ResultsWriter(path, header)
    for r in rows:
        w.append({"run_id": "syn", "batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 16, "dtype": "float32",
                  "mask": "causal", "mode": "fwd", "device": "cpu", "allow_interpreter": False, **r})


def scaling_rows() -> list[dict[str, object]]:
    """naive: latency 1e-6 N^2 ms and memory 4 N^2 bytes, plus a fixed overhead that only the two
    shortest lengths feel; oom at 2^16. window: latency and memory linear in N."""
    rows: list[dict[str, object]] = []
    for n in [2**k for k in range(8, 17)]:
        if n < 2**16:
            overhead = 50.0 if n < 2**10 else 0.0
            rows.append({"impl": "naive", "n": n, "status": "ok", "latency_ms": 1e-6 * n * n + overhead,
                         "peak_mem_bytes": 4 * n * n + overhead * 2**20, "tflops": 1.0})
        else:
            rows.append({"impl": "naive", "n": n, "status": "oom"})
        rows.append({"impl": "window", "n": n, "status": "ok", "latency_ms": 3e-3 * n, "peak_mem_bytes": 512 * n,
                     "tflops": 2.0})
    return rows


def test_fits_recover_planted_exponents():
    naive = fit_impl(scaling_rows(), "naive")
    # The 4 longest ok lengths, 2^12..2^15: the overhead at 2^8 and 2^9 is left out.
    assert naive.latency_points == (2**12, 2**13, 2**14, 2**15)
    assert naive.latency_exponent == pytest.approx(2.0, abs=1e-9)
    assert naive.memory_exponent == pytest.approx(2.0, abs=1e-9)
    assert (naive.largest_fit, naive.stopped_at, naive.stop_status) == (2**15, 2**16, "oom")
    assert naive.reach_text() == "32K (oom at 64K)"
    window = fit_impl(scaling_rows(), "window")
    assert window.latency_exponent == pytest.approx(1.0, abs=1e-9)
    assert window.memory_exponent == pytest.approx(1.0, abs=1e-9)
    assert window.largest_fit == 2**16 and window.stopped_at is None
    # Over every point, the overhead pulls naive's exponent well below 2.
    assert fit_impl(scaling_rows(), "naive", n_points=8).latency_exponent < 1.7
    assert [f.impl for f in fit_all(scaling_rows())] == ["naive", "window"]
    with pytest.raises(ValueError):
        slope([1024], [1.0])


def test_fit_with_one_point_says_so():
    f = fit_impl([{"impl": "x", "n": 64, "status": "ok", "latency_ms": 1.0}], "x")
    assert f.latency_exponent is None and f.latency_points == (64,)


def test_report_of_synthetic_run_marks_oom_and_plots_perplexity(tmp_path, capsys):
    run = tmp_path / "syn"
    ppl_rows = [{"impl": impl, "n": n, "kind": "perplexity", "status": "ok", "ppl": 10.0 + n / 2**12,
                 "latency_ms": 1e3} for impl in ("naive", "window") for n in (256, 1024, 4096)]
    rows = scaling_rows() + ppl_rows
    _synthetic(str(run / "results.csv"), rows, columns() + tuple(c for c in ("kind", "ppl") if c not in columns()))
    written = report(str(run))
    assert sorted(os.path.basename(p) for p in written) == sorted(
        PLOTS + ["ppl.png", "ppl.svg", "report.html"])
    page = (run / "report.html").read_text()
    assert "<h3>perplexity</h3>" in page and "32K (oom at 64K)" in page
    # The perplexity cells' whole-model latency stays out of the kernel's fits and pivots.
    assert "<td>2.00</td>" in page and "<td>4K-32K (4 pts)</td>" in page
    assert "<td>1.00</td>" in page and "<td>8K-64K (4 pts)</td>" in page
    assert "<td>10.06</td>" in page and "<td>11</td>" in page  # perplexity pivot: 10 + N/4096
    _, saved = read_results(str(run / "results.csv"))
    md = markdown(saved)  # what `ctxbench report` prints: each section's markdown, the kernel cells' first
    assert md.startswith(pivot_markdown([r for r in saved if r["kind"] == "kernel"]))
    assert "1 s" not in md  # the perplexity rows are not in the kernel's pivot
    assert md.splitlines()[0].startswith("| impl \\ N | 256 | 512 |")
    assert "| naive |" in md and md.splitlines()[2].endswith("| oom |")


def test_report_bad_input(tmp_path, capsys):
    usage_error(["report", str(tmp_path / "nope")], capsys, "no such run folder")
    usage_error(["report", str(tmp_path)], capsys, "has no results.csv")


# ---------------------------------------------------------------- implementations that never ran

TRITON_CPU = ("triton runs on the CPU only through its interpreter, and this process compiles for CUDA "
              "(TRITON_INTERPRET is not set)")


def never_ran_rows() -> list[dict[str, object]]:
    """naive and sdpa ran at every length; triton is unsupported at every one, the way a sweep on a
    CPU records it, in the kernel cells and the perplexity cells (two RoPE variants each)."""
    common = {"run_id": "syn", "batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 16, "dtype": "float32",
              "mask": "causal", "mode": "fwd", "device": "cpu", "allow_interpreter": "False", "message": ""}
    rows: list[dict[str, object]] = []
    for kind in ("kernel", "perplexity"):
        for rope in (("default",) if kind == "kernel" else ("default", "yarn:4")):
            for impl in ("naive", "sdpa", "triton"):
                for n in (256, 512, 1024):
                    r = dict(common, impl=impl, n=n, kind=kind, rope=rope, ppl_scheme="truncated")
                    if impl == "triton":
                        r.update(status="unsupported", message=TRITON_CPU)
                    elif kind == "kernel":
                        r.update(status="ok", latency_ms=n / 100, tflops=1.0, peak_mem_bytes=n * 2**12)
                    else:
                        r.update(status="ok", ppl=12.0, bits_per_byte=0.9, model="tiny.gguf", latency_ms=1e3)
                    rows.append(r)
    return rows


def _rendered(table) -> str:
    from rich.console import Console

    console = Console(width=100, record=True, color_system=None)
    console.print(table)
    return " ".join(console.export_text().split())  # the reason may wrap at the console's width


def test_an_impl_unsupported_everywhere_is_named_once_under_the_terminal_pivots():
    from ctxbench.measurements.kernel.report import cell_text
    from ctxbench.measurements.perplexity.report import perplexity_table
    from ctxbench.reports.summary import pivot_table

    rows = never_ran_rows()
    kernel = [r for r in rows if r["kind"] == "kernel"]
    text = _rendered(pivot_table(kernel, "latency", cell_text))
    assert "│ naive" in text and "│ sdpa" in text
    assert "│ triton" not in text and "unsupported" not in text
    assert text.count(f"not run: triton ({TRITON_CPU})") == 1 and text.count("interpreter") == 1
    ppl = _rendered(perplexity_table([r for r in rows if r["kind"] == "perplexity"]))
    assert "│ sdpa, yarn:4" in ppl and "│ triton" not in ppl and "unsupported" not in ppl
    # one line for the implementation, not one per RoPE variant
    assert ppl.count(f"not run: triton ({TRITON_CPU})") == 1 and ppl.count("interpreter") == 1
    # A line that ran somewhere stays, with its unsupported cells shown as such.
    partly = [dict(r, status="unsupported", message="N > 512 needs --allow-interpreter", latency_ms="")
              if r["impl"] == "sdpa" and r["n"] == 1024 else r for r in kernel]
    text = _rendered(pivot_table(partly, "", cell_text))
    assert "│ sdpa" in text and "unsupported" in text and "not run: sdpa" not in text


def test_an_impl_unsupported_everywhere_is_named_once_in_the_markdown_and_html(tmp_path):
    from ctxbench.reports.report import render_html
    from ctxbench.reports.summary import sections_of

    rows = never_ran_rows()
    kernel = [r for r in rows if r["kind"] == "kernel"]
    md = pivot_markdown(kernel)
    assert "| naive |" in md and "| sdpa |" in md and "| triton |" not in md and "unsupported" not in md
    assert md.count(f"not run: triton ({TRITON_CPU})") == 1
    assert md.splitlines()[-2] == ""  # a paragraph of its own, not a row of the table
    assert "| naive |" in fits_markdown(kernel) and "triton" not in fits_markdown(kernel)
    # report.html as report() builds it, less the plots: each section's tables under its <h2>
    text = [{k: str(v) for k, v in r.items()} for r in rows]
    sections = [(section.title, [], section.html([r for r in text if r["kind"] in covered]))
                for section, covered in sections_of(text)]
    page = render_html(text, {}, sections, "run")
    assert re.findall(r"<h2>(.*?)</h2>", page) == ["Attention calls", "Perplexity", "Environment"]
    assert "<td>triton</td>" not in page  # in no pivot and no fit
    kernel_pivots = page.split("<h2>Attention calls</h2>")[1].split("<h3>Scaling fits</h3>")[0]
    ppl_pivots = page.split("<h2>Perplexity</h2>")[1].split("<h2>Environment</h2>")[0]
    assert "unsupported" not in kernel_pivots and "unsupported" not in ppl_pivots
    # named once under the kernel pivots and once under the perplexity pivots
    assert page.count('<p class="not-run">not run: triton (') == 2
    assert page.count("interpreter") == 2


def test_plot_legends_leave_out_an_impl_with_nothing_plotted():
    from ctxbench.measurements.kernel.report import figures as kernel_figures
    from ctxbench.measurements.perplexity.report import figures as perplexity_figures
    from ctxbench.reports.plots import legend_labels

    rows = never_ran_rows()
    rows.append(dict(rows[0], impl="chunked", status="oom", latency_ms="", tflops="", peak_mem_bytes=""))
    figs = dict(kernel_figures([r for r in rows if r["kind"] == "kernel"])
                + perplexity_figures([r for r in rows if r["kind"] == "perplexity"]))
    assert set(figs) == {"latency", "tflops", "memory", "ppl"}
    for name in ("latency", "tflops", "memory"):
        assert legend_labels(figs[name]) == ["naive", "sdpa"], name
    assert "triton" not in " ".join(legend_labels(figs["ppl"]))
    assert legend_labels(figs["ppl"]) and all(label.startswith(("naive", "sdpa")) for label in legend_labels(figs["ppl"]))


def test_passkey_table_counts_retrieved_keys_per_depth_and_length():
    """report.html and `ctxbench report` show passkey runs as keys retrieved / trials, not as a
    kernel pivot."""
    from ctxbench.measurements.passkey.report import passkey_markdown, passkey_table

    rows = []
    for n, depth, trial, status, correct in [(256, 0.0, 0, "ok", "1"), (256, 0.0, 1, "ok", "0"),
                                             (256, 0.5, 0, "ok", "1"), (512, 0.0, 0, "oom", ""),
                                             (512, 0.0, 1, "skipped", ""), (512, 0.5, 0, "ok", "1")]:
        rows.append({"impl": "sdpa", "rope": "default", "kind": "passkey", "n": str(n), "depth": str(depth),
                     "trial": str(trial), "status": status, "correct": correct})
    header, body = passkey_table(rows)
    assert header == ["impl", "depth", "256", "512"]
    assert body == [["sdpa", "0", "1/2", "oom skipped"], ["sdpa", "0.5", "1/1", "1/1"]]
    md = passkey_markdown(rows)
    assert md.splitlines()[0] == "| impl | depth | 256 | 512 |" and "| sdpa | 0.5 | 1/1 | 1/1 |" in md
