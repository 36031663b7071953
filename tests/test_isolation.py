"""The harness survives implementations that raise, abort, exhaust memory, hang or lie."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import time

import pytest

from sweep_helpers import MISBEHAVING, only_run_dir, rows_by_cell, run_cli


@pytest.mark.slow
@pytest.mark.ci  # six workers and a 10 s timeout: about 40 s
def test_each_failure_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    impls = ["raises", "aborts", "hogs_memory", "sleeps", "wrong"]
    args = ["sweep", "--device", "cpu", "--lengths", "32,64,128", "--heads", "4", "--kv-heads", "2",
            "--head-dim", "32", "--impls", "sdpa", "--timeout", "10", "--memory-limit", "2",
            "--rep-ms", "20", "--ppl-max-len", "0", "--out", str(tmp_path)]
    for name in impls:
        args += ["--impl", f"{MISBEHAVING}:{name}"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    cells = rows_by_cell(only_run_dir(str(tmp_path)))
    spec = {name: f"{MISBEHAVING}:{name}" for name in impls}

    expected_at_trigger = {"raises": "error", "aborts": "error", "hogs_memory": "oom", "sleeps": "timeout",
                           "wrong": "wrong"}
    for name, status in expected_at_trigger.items():
        row = cells[(spec[name], 64)]
        assert row["status"] == status, (name, row["status"], row["message"])
        assert row["message"], f"{name}: a failure must say what happened"
        assert "\n" not in row["message"]
        # Below the trigger every implementation worked, measured like any other.
        assert cells[(spec[name], 32)]["status"] == "ok", cells[(spec[name], 32)]["message"]

    assert "deliberate failure" in cells[(spec["raises"], 64)]["message"]
    assert "SIGABRT" in cells[(spec["aborts"], 64)]["message"]
    assert float(cells[(spec["wrong"], 64)]["err_rel_l2"]) > 1e-3
    assert math.isfinite(float(cells[(spec["wrong"], 64)]["latency_ms"]))  # still timed
    # After a crash or a wrong answer the next length is attempted; after oom or timeout it is skipped.
    for name in ("raises", "aborts", "wrong"):
        assert cells[(spec[name], 128)]["status"] == "ok"
    for name in ("hogs_memory", "sleeps"):
        assert cells[(spec[name], 128)]["status"] == "skipped"
        assert "N=64" in cells[(spec[name], 128)]["message"]
    # The well-behaved implementation is unaffected by its neighbours.
    assert all(cells[("sdpa", n)]["status"] == "ok" for n in (32, 64, 128))
    # Tracebacks are kept in a log, not on the user's screen.
    assert "Traceback" not in out + err
    assert cells[(spec["raises"], 64)]["log"].endswith(".log")


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped is not)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_workers_die_with_the_sweep(tmp_path):
    """A worker runs in its own session; when the sweep driving it is killed, it goes too."""
    script = tmp_path / "driver.py"
    # The worker is busy (an implementation that sleeps for an hour), so it never reads the
    # closed stdin that would end an idle worker.
    script.write_text(textwrap.dedent(f"""
        import sys, threading, time
        from ctxbench.engine.executor import Worker
        from ctxbench.core.cell import Cell, Config, Settings
        w = Worker(None, sys.argv[1])
        cell = Cell.of(Config(heads=2, kv_heads=2, head_dim=16), {MISBEHAVING + ":sleeps"!r}, 64, "kernel")
        threading.Thread(target=w.run, args=(cell, Settings(rep_ms=5), 600), daemon=True).start()
        print(w.proc.pid, flush=True)
        time.sleep(600)
    """))
    log = tmp_path / "w.log"
    driver = subprocess.Popen([sys.executable, str(script), str(log)], stdout=subprocess.PIPE,
                              text=True, cwd=str(tmp_path))
    try:
        pid = int(driver.stdout.readline())
        deadline = time.monotonic() + 60
        while "=== " not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3)  # the cell is inside the sleeping implementation now
        assert _alive(pid)
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 20
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), "the worker outlived its driver"
    finally:
        driver.kill()


def _address_space_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max address space"))
    return line.split()[3]  # the soft limit: a byte count, or "unlimited"


def test_cpu_workers_cap_their_address_space_and_cuda_workers_do_not(tmp_path):
    """RLIMIT_AS would break CUDA (a context reserves more virtual memory than the host has),
    so a worker for CUDA cells runs uncapped and is watched instead; a CPU worker keeps the cap."""
    from ctxbench.engine.executor import Worker

    limit = 6 * 2**30
    cpu = Worker(limit, str(tmp_path / "cpu.log"), "cpu")
    cuda = Worker(limit, str(tmp_path / "cuda.log"), "cuda")
    try:
        deadline = time.monotonic() + 60
        # the cap is set when the worker starts serving; wait until it shows
        while _address_space_limit(cpu.proc.pid) == "unlimited" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert int(_address_space_limit(cpu.proc.pid)) == limit
        assert cpu.rss_limit_bytes is None
        time.sleep(0.5)
        assert _address_space_limit(cuda.proc.pid) == "unlimited"
        assert cuda.rss_limit_bytes == limit
    finally:
        cpu.close()
        cuda.close()


def test_an_uncapped_worker_over_its_resident_limit_is_killed_as_oom(tmp_path):
    """The resident-set watch that protects the host from a CUDA worker, exercised on the CPU:
    the worker runs without an address-space cap and is killed once it holds more than the limit."""
    from ctxbench.core.cell import Cell, Config, Settings
    from ctxbench.engine.executor import Worker
    from misbehaving import TRIGGER

    worker = Worker(1 * 2**30, str(tmp_path / "w.log"), "cuda")
    cell = Cell.of(Config(heads=2, kv_heads=2, head_dim=16, device="cpu"), f"{MISBEHAVING}:hogs_memory", TRIGGER,
                   "kernel")
    try:
        t0 = time.monotonic()
        result = worker.run(cell, Settings(rep_ms=5), timeout_s=120)
    finally:
        worker.close()
    assert result["status"] == "oom", result
    assert "resident set" in result["message"] and "1.00 GiB" in result["message"]
    assert time.monotonic() - t0 < 120
    assert not worker.alive


def test_model_cells_get_a_worker_of_their_own(tmp_path, monkeypatch):
    """A model cell runs in a worker apart from the implementation's kernel cells (one process at
    a time), so nothing a kernel cell left in the process reaches a model's timings."""
    from ctxbench.core.cell import Cell, Settings
    from ctxbench.engine import executor

    started, closed = [], []

    class Recorder:  # a worker that records which cells it served and measures nothing
        alive = True

        def __init__(self, *args):
            self.kinds = []
            started.append(self)

        def run(self, cell, settings, timeout_s, more=False):
            self.kinds.append(cell.kind)
            return {"status": "ok"}

        def close(self):
            closed.append(self)

    monkeypatch.setattr(executor, "Worker", Recorder)
    pool = executor.WorkerPool(None)
    for kind in ("kernel", "kernel", "perplexity", "retrieval", "passkey"):
        assert Cell(impl="sdpa", n=64, kind=kind).runs_a_model == (kind != "kernel")
        pool.run_cell(Cell(impl="sdpa", n=64, kind=kind), Settings(), timeout_s=5, log_path=str(tmp_path / "x.log"))
    # one worker for the kernel cells, then one for the model cells, each reused; the kernel
    # worker was closed when the first model cell came
    assert [w.kinds for w in started] == [["kernel", "kernel"], ["perplexity", "retrieval", "passkey"]]
    assert closed == started[:1]
    pool.close()
    assert closed == started


def test_the_heap_is_pinned_for_the_memory_pass_only():
    """Inside pinned_heap a freed 8 MiB block leaves the resident set at once (the peak-memory
    reading needs that); after it, the same block is kept in the heap, as in a user's process.
    In a fresh process: this one's heap thresholds are whatever earlier tests left."""
    import os
    import subprocess
    import sys

    if not sys.platform.startswith("linux") or "malloc" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("glibc's malloc only (not another platform, nor jemalloc or tcmalloc preloaded)")
    code = "import sys; sys.path.insert(0, %r); from test_isolation import _probe; _probe()" % os.path.dirname(
        os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    inside, after = (int(x) for x in done.stdout.split())
    assert inside >= 7 * 1024, inside  # KiB returned at the free: the block was an mmap
    assert after < 1024, after  # kept by the heap, as under glibc's steady thresholds


def _probe() -> None:
    """In a fresh process (tests/test_isolation.py): KiB returned to the OS when an 8 MiB block is
    freed, inside pinned_heap and after it."""
    import torch

    from ctxbench.core.heap import pinned_heap
    from ctxbench.core.procfs import status_kib

    def freed() -> int:
        block = torch.empty(2 * 2**20, dtype=torch.float32)
        block.fill_(1.0)
        held = status_kib("VmRSS")
        del block
        return held - status_kib("VmRSS")

    with pinned_heap() as pinned:
        if not pinned:
            print(8192, 0)  # not glibc: nothing to check
            return
        inside = freed()
    freed()  # the first block after the pass may still be an mmap of the pinned pass's making
    print(inside, freed())
