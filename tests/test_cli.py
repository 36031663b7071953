"""Bad input gets one line and exit status 2; good input gets a complete, resumable run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ctxbench.cli import main
from ctxbench.core.env import ENV_FIELDS
from ctxbench.engine.results import columns, read_results
from sweep_helpers import MISBEHAVING, only_run_dir, rows_by_cell, run_cli, usage_error

# Kernel cells only: perplexity cells (a language model per worker) have their own tests.
SMALL = ["--device", "cpu", "--heads", "2", "--head-dim", "16", "--rep-ms", "5", "--ppl-max-len", "0"]


@pytest.mark.parametrize("args, fragments", [
    (["--impls", "nosuch"], ["unknown implementation 'nosuch'", "known:", "naive", "sdpa"]),
    (["--lengths", "0,128"], ["positive"]),
    (["--lengths", "128,64"], ["strictly increasing"]),
    (["--lengths", "128,128"], ["strictly increasing"]),
    (["--lengths", "12x"], ["comma-separated"]),
    (["--min-len", "0"], ["positive"]),
    (["--min-len", "256", "--max-len", "128"], ["below --min-len"]),
    (["--window", "0"], ["--mask window --window 0:", "at least 1 key"]),
    (["--mask", "window"], ["--mask window:", "needs a window"]),
    (["--mask", "causal", "--window", "8"], ["window=8 given with mask kind 'causal'"]),
    (["--sinks", "-1"], ["sinks must be >= 0"]),
    (["--heads", "6", "--kv-heads", "4"], ["not divisible by --kv-heads 4"]),
    (["--dtype", "float64"], ["unsupported --dtype 'float64'", "bf16"]),
    (["--device", "tpu"], ["unsupported --device 'tpu'"]),
    (["--impl", "no_such_module_xyz:attn"], ["cannot import no_such_module_xyz"]),
    (["--impl", f"{MISBEHAVING}:no_such_function"], ["has no attribute 'no_such_function'"]),
    (["--impl", "not-a-spec"], ["package.module:function"]),
    (["--timeout", "0"], ["--timeout must be positive"]),
    (["--bogus-flag"], ["No such option"]),
])
def test_bad_input_is_one_line_and_exit_2(args, fragments, tmp_path, capsys):
    usage_error(["sweep", *SMALL, "--out", str(tmp_path), *args], capsys, *fragments)
    assert not list(tmp_path.iterdir()), "bad input must not leave a run behind"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_but_absent(tmp_path, capsys):
    usage_error(["sweep", "--device", "cuda", "--out", str(tmp_path)], capsys, "no CUDA device", "--device cpu")


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    usage_error(["sweep", *SMALL, "--out", str(blocker)], capsys, "is a file, not a folder")
    usage_error(["sweep", *SMALL, "--out", str(blocker / "sub")], capsys, "cannot write to output folder")


def test_resume_of_missing_or_corrupt_run(tmp_path, capsys):
    usage_error(["sweep", "--resume", str(tmp_path / "nope")], capsys, "no such run folder")
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    usage_error(["sweep", "--resume", str(not_a_run)], capsys, "no meta.json")

    code, _, err = run_cli(["sweep", *SMALL, "--lengths", "8,16", "--impls", "sdpa", "--out", str(tmp_path / "r")],
                           capsys)
    assert code == 0, err
    run_dir = only_run_dir(str(tmp_path / "r"))
    csv_path = os.path.join(run_dir, "results.csv")
    lines = open(csv_path).read().splitlines(keepends=True)
    lines.insert(2, "garbage,with,too,few,fields\n")
    open(csv_path, "w").write("".join(lines))
    usage_error(["sweep", "--resume", run_dir], capsys, "results.csv line 3", "fields")


def test_csv_is_long_format_with_configuration_and_environment(tmp_path, capsys):
    code, out, err = run_cli(["sweep", *SMALL, "--kv-heads", "1", "--lengths", "16,33", "--impls", "naive,sdpa",
                              "--out", str(tmp_path)], capsys)
    assert code == 0, err
    run_dir = only_run_dir(str(tmp_path))
    header, rows = read_results(os.path.join(run_dir, "results.csv"))
    assert header == list(columns())
    assert len(rows) == 4
    for r in rows:
        assert r["status"] == "ok", r["message"]
        assert (r["heads"], r["kv_heads"], r["head_dim"], r["dtype"], r["mask"], r["device"]) == \
               ("2", "1", "16", "float32", "causal", "cpu")
        assert float(r["latency_p20_ms"]) <= float(r["latency_ms"]) <= float(r["latency_p80_ms"])
        assert int(r["repeats"]) >= 3
        assert float(r["err_rel_l2"]) < 1e-5
        n = int(r["n"])
        assert float(r["flops"]) == 4 * 2 * 16 * n * (n + 1) / 2  # causal pairs, B=1, Hq=2, D=16
        assert r["mem_method"] == "cpu_rss_peak_growth"
        for field in ENV_FIELDS:
            assert field in r
        assert r["torch_version"] == torch.__version__
    meta = json.load(open(os.path.join(run_dir, "meta.json")))
    assert meta["spec"]["command"] == "sweep" and meta["spec"]["plans"]["kernel"]["impls"] == ["naive", "sdpa"]
    assert meta["environment"]["torch_version"] == torch.__version__
    # The terminal gets a pivot table: one line per implementation, lengths as columns.
    assert "naive" in out and "sdpa" in out and "33" in out


def test_unsupported_cells_are_recorded_not_attempted(tmp_path, capsys):
    code, _, err = run_cli(["sweep", *SMALL, "--lengths", "16", "--impls", "sdpa_flash,sdpa",
                            "--out", str(tmp_path)], capsys)
    assert code == 0, err
    cells = rows_by_cell(only_run_dir(str(tmp_path)))
    row = cells[("sdpa_flash", 16)]
    assert row["status"] == "unsupported"
    assert "does not run on cpu" in row["message"]
    assert row["latency_ms"] == ""
    assert cells[("sdpa", 16)]["status"] == "ok"


@pytest.mark.slow
@pytest.mark.ci  # two sweeps in subprocesses: about 30 s
def test_interrupted_sweep_resumes_without_repeating_or_losing_cells(tmp_path):
    out = tmp_path / "runs"
    lengths = "8,16,24,32,40,48"
    cmd = [sys.executable, "-m", "ctxbench", "sweep", *SMALL, "--rep-ms", "100", "--lengths", lengths,
           "--impls", "sdpa,naive", "--out", str(out), "--run-id", "r"]
    # Ctrl-C must reach the sweep even when pytest itself runs in the background of a script,
    # where the shell starts it with SIGINT ignored and every child would inherit that.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    csv_path = out / "r" / "results.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if csv_path.exists() and len(csv_path.read_text().splitlines()) >= 4:  # header + 3 rows
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    assert "--resume" in output
    _, before = read_results(str(csv_path), repair_tail=True)
    assert 3 <= len(before) < 12

    done = subprocess.run([sys.executable, "-m", "ctxbench", "sweep", "--resume", str(out / "r")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _, after = read_results(str(csv_path))
    keys = [(r["impl"], r["n"]) for r in after]
    assert len(keys) == len(set(keys)) == 12, keys
    assert after[:len(before)] == before  # finished cells untouched, not re-run
    meta = json.load(open(out / "r" / "meta.json"))
    assert len(meta["invocations"]) == 2


# ---------------------------------------------------------------- --resume with configuration flags

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-length run of sdpa, shared by the tests that must leave it untouched."""
    out = tmp_path_factory.mktemp("finished")
    with pytest.raises(SystemExit) as exc:
        main(["sweep", *SMALL, "--lengths", "32,64", "--impls", "sdpa", "--out", str(out), "--run-id", "r"])
    assert exc.value.code == 0
    return str(out / "r")


@pytest.fixture
def small_run(finished_run, tmp_path):
    """A copy of finished_run of the test's own (what --resume continues and changes): a sweep's
    workers cost about 10 s per run, a copy nothing."""
    shutil.copytree(finished_run, tmp_path / "r")
    return str(tmp_path / "r")


@pytest.mark.parametrize("args, fragments", [
    (["--dtype", "bf16"], ["--dtype cannot change when resuming"]),
    (["--heads", "4", "--mask", "none"], ["--heads, --mask cannot change", "resume without them"]),
    (["--rep-ms", "50"], ["--rep-ms cannot change"]),
    (["--seed", "1"], ["--seed cannot change"]),
    (["--min-len", "64", "--max-len", "4096"], ["leave out 32 of the run", "can only gain lengths"]),
    (["--lengths", "1024,2048"], ["leave out 32, 64 of the run"]),
    (["--timeout", "-1"], ["--timeout must be positive"]),
    (["--address", "127.0.0.1:6379"], ["--address", "needs --executor ray"]),
    (["--lengths", "64,128"], ["leave out 32 of the run"]),
    (["--impls", "naive"], ["--impls leaves out sdpa", "only gain implementations", "--impls sdpa,naive"]),
    (["--run-id", "other"], ["--run-id names a new run"]),
])
def test_resume_refuses_flags_that_would_change_the_run(finished_run, capsys, args, fragments):
    """A flag given with --resume is refused in one line unless it extends the run; the run is untouched."""
    files = ("meta.json", "results.csv")
    before = [open(os.path.join(finished_run, f)).read() for f in files]
    usage_error(["sweep", "--resume", finished_run, *args], capsys, *fragments)
    assert [open(os.path.join(finished_run, f)).read() for f in files] == before


def test_resume_extends_lengths_and_impls_and_records_it(small_run, capsys):
    code, out, err = run_cli(["sweep", "--resume", small_run, "--lengths", "32,64,96", "--impls", "sdpa,naive",
                              "--timeout", "300"], capsys)
    assert code == 0, err
    assert "resume extends the run" in out
    cells = rows_by_cell(small_run)
    assert set(cells) == {(i, n) for i in ("sdpa", "naive") for n in (32, 64, 96)}
    assert all(r["status"] == "ok" for r in cells.values())
    meta = json.load(open(os.path.join(small_run, "meta.json")))
    assert meta["spec"]["lengths"] == [32, 64, 96] and meta["spec"]["plans"]["kernel"]["impls"] == ["sdpa", "naive"]
    assert meta["spec"]["timeout_s"] == 300
    assert meta["invocations"][-1]["changed"] == {"lengths": [32, 64, 96], "impls": ["sdpa", "naive"],
                                                  "timeout_s": 300.0}
    # the extended spec is what a later plain resume continues: nothing left to do
    code, out, err = run_cli(["sweep", "--resume", small_run], capsys)
    assert code == 0 and "0 to go" in out, out
    assert len(rows_by_cell(small_run)) == 6


def test_resume_max_len_alone_extends_from_the_runs_shortest_length(small_run, capsys):
    """`--max-len` with --resume grows the run's own powers of two (from its shortest length,
    not from the default --min-len of a new sweep)."""
    code, out, err = run_cli(["sweep", "--resume", small_run, "--max-len", "128"], capsys)
    assert code == 0, err
    assert {n for _, n in rows_by_cell(small_run)} == {32, 64, 128}


def test_a_passkey_run_is_not_resumed_as_a_sweep(small_run, capsys):
    usage_error(["passkey", "--resume", small_run], capsys, "is a `ctxbench sweep` run", "ctxbench sweep --resume")
