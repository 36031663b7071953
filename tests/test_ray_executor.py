"""`ctxbench sweep --executor ray` on a local Ray cluster that the tests start (2 CPUs).

The Ray executor must give the rows the local executor gives (everything but timing and
the thread count Ray grants a one-CPU task), survive tasks that crash, run out of memory or
hang, and resume a run that another executor started, and vice versa.
"""

from __future__ import annotations

import csv
import os
import sys

import pytest

from sweep_helpers import MISBEHAVING, rows_by_cell, run_cli, usage_error

ray = pytest.importorskip("ray")

# Columns that are measured (timing, memory) or describe how the process ran: they may differ
# between two runs of the same cells. Everything else must be equal.
MEASURED = {"latency_ms", "latency_p20_ms", "latency_p80_ms", "latency_min_ms", "repeats", "latency_samples_ms",
            "tflops", "peak_fraction", "peak_mem_bytes", "wall_s", "finished_at", "tokens_per_s", "run_id",
            "torch_threads", "log", "impl_info", "setup_ms", "setup_mem_bytes", "first_call_ms",
            # each run probes the device's bandwidth once (ctxbench.engine.bandwidth): a measurement too,
            # and its source names the probes' spread
            "gbps", "bw_fraction", "device_bw_gbps", "device_bw_probe_gbps", "device_bw_source"}
# Errors against the float64 reference: equal up to the order of floating-point sums, which
# depends on the number of threads.
ERRORS = {"err_rel_l2", "err_max_abs", "grad_err_rel_l2"}

COMMON = ["sweep", "--device", "cpu", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--rep-ms", "20",
          "--ppl-max-len", "0", "--memory-limit", "2"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs for this module (the CI machine has 2 cores)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def _sweep(tmp_path, run_id: str, extra: list[str], capsys, executor: str = "local") -> dict:
    args = COMMON + ["--out", str(tmp_path), "--run-id", run_id, "--executor", executor] + extra
    code, out, err = run_cli(args, capsys)
    assert code == 0, out + err
    return rows_by_cell(os.path.join(str(tmp_path), run_id))


@pytest.mark.slow
@pytest.mark.ci  # a local Ray cluster: about a minute
def test_ray_rows_equal_local_rows(cluster, tmp_path, capsys):
    extra = ["--impls", "naive,sdpa,chunked", "--lengths", "32,64,100", "--mode", "fwd+bwd"]
    local = _sweep(tmp_path, "local", extra, capsys)
    remote = _sweep(tmp_path, "ray", extra, capsys, executor="ray")
    assert local.keys() == remote.keys() and len(local) == 9
    for key, row in local.items():
        other = remote[key]
        assert row.keys() == other.keys()
        for col in row:
            if col in MEASURED:
                continue
            if col in ERRORS and row[col]:
                assert float(other[col]) == pytest.approx(float(row[col]), rel=1e-3, abs=1e-9), (key, col)
            else:
                assert row[col] == other[col], (key, col, row[col], other[col])
        assert other["status"] == "ok" and float(other["latency_ms"]) > 0
        # a call of a few KiB can be served from memory the worker already holds: 0 growth
        assert int(other["peak_mem_bytes"]) >= 0 and other["mem_method"] == row["mem_method"]
        # the row names the node and device that measured it
        assert other["hostname"] and other["device_name"]
    # the Ray task measured memory: the larger cells grew the worker's resident set
    assert any(int(r["peak_mem_bytes"]) > 0 for r in remote.values())


@pytest.mark.slow
@pytest.mark.ci  # a local Ray cluster: about a minute
def test_ray_tasks_that_crash_oom_or_hang_cost_their_row(cluster, tmp_path, capsys):
    extra = ["--impls", "sdpa", "--lengths", "32,64,128", "--timeout", "10"]
    for name in ("aborts", "hogs_memory", "sleeps"):
        extra += ["--impl", f"{MISBEHAVING}:{name}"]
    cells = _sweep(tmp_path, "bad", extra, capsys, executor="ray")
    spec = {name: f"{MISBEHAVING}:{name}" for name in ("aborts", "hogs_memory", "sleeps")}
    assert cells[(spec["aborts"], 64)]["status"] == "error"
    assert "SIGABRT" in cells[(spec["aborts"], 64)]["message"]
    assert cells[(spec["aborts"], 128)]["status"] == "ok"  # the next length runs in a fresh worker
    assert cells[(spec["hogs_memory"], 64)]["status"] == "oom"
    assert cells[(spec["sleeps"], 64)]["status"] == "timeout"
    for name in ("hogs_memory", "sleeps"):
        assert cells[(spec[name], 32)]["status"] == "ok"
        assert cells[(spec[name], 128)]["status"] == "skipped"
    assert all(cells[("sdpa", n)]["status"] == "ok" for n in (32, 64, 128))
    # the worker's log came back from the task into the run folder
    log = os.path.join(str(tmp_path), "bad", cells[(spec["aborts"], 64)]["log"])
    assert "ray task on" in open(log).read()


def _truncate(run_dir: str, keep: int) -> None:
    """Keep the header and the first `keep` rows: what an interrupted sweep leaves."""
    path = os.path.join(run_dir, "results.csv")
    with open(path, newline="") as f:
        lines = f.readlines()
    with open(path, "w", newline="") as f:
        f.writelines(lines[:1 + keep])


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.parametrize("first,then", [("local", "ray"), ("ray", "local")])
def test_resume_across_executors(cluster, tmp_path, capsys, first, then):
    extra = ["--impls", "naive,sdpa", "--lengths", "32,64,96"]
    full = _sweep(tmp_path, "run", extra, capsys, executor=first)
    run_dir = os.path.join(str(tmp_path), "run")
    _truncate(run_dir, 2)
    with open(os.path.join(run_dir, "results.csv"), newline="") as f:
        kept = {(r["impl"], int(r["n"])): r["finished_at"] for r in csv.DictReader(f)}
    code, out, err = run_cli(["sweep", "--resume", run_dir, "--executor", then], capsys)
    assert code == 0, out + err
    assert "2 cells done, 4 to go" in out
    resumed = rows_by_cell(run_dir)  # asserts no cell is recorded twice
    assert resumed.keys() == full.keys()
    assert all(r["status"] == "ok" for r in resumed.values())
    for key, finished_at in kept.items():  # finished cells were not measured again
        assert resumed[key]["finished_at"] == finished_at


def test_missing_ray_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    usage_error(COMMON + ["--impls", "sdpa", "--lengths", "32", "--executor", "ray", "--out", str(tmp_path)], capsys,
                "pip install 'ctxbench[ray]'")
    assert not os.listdir(tmp_path)  # nothing half-made


def test_address_needs_ray_executor(tmp_path, capsys):
    usage_error(COMMON + ["--impls", "sdpa", "--lengths", "32", "--address", "10.0.0.1:6379", "--out", str(tmp_path)],
                capsys, "--executor ray")
