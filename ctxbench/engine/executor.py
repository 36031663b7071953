"""The local executor: runs cells in worker subprocesses and classifies how each ended.
Also the interface every executor has (Executor), which the sweep drives.

Isolation is the point: an implementation that raises, runs out of memory, segfaults,
calls abort(), is killed by the OS or hangs costs one row, never the sweep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Protocol, runtime_checkable

from ctxbench.core import kinds
from ctxbench.core.cell import Cell, Settings
from ctxbench.engine.worker import job_line


# The worker starts with the current directory removed from sys.path: run from a checkout of
# ctxbench with a non-editable install, `python -m` would otherwise import the source tree's
# ctxbench/ (which has no kernels/ inside) instead of the installed package.
_BOOT = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
         "from ctxbench.engine.worker import main; main()")


def default_memory_limit() -> int:
    """85% of the memory available now (bytes): leaves room for the sweep itself and the OS."""
    import psutil

    return int(psutil.virtual_memory().available * 0.85)


def worker_env() -> dict[str, str]:
    """The worker's environment: the parent's, plus the current directory in
    CTXBENCH_IMPORT_PATH (so --impl module:function resolves as it did here, appended after
    the installed packages). glibc's heap is left as a user's process has it; only the peak-memory
    pass pins it, for its own duration (ctxbench.core.heap)."""
    env = dict(os.environ)
    env.setdefault("CTXBENCH_IMPORT_PATH", os.getcwd())
    return env


def _tail(path: str, lines: int = 40) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except OSError:
        return []


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


# How often a CUDA worker's resident set is read against the host-memory cap (seconds).
RSS_POLL_S = 0.2


def resident_bytes(pid: int) -> int:
    """Resident set of a process and all its descendants (bytes); 0 once it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Worker:
    """One worker process serving cells of one implementation (see ctxbench.engine.worker.serve).

    Host memory is protected two ways, by device. A CPU worker caps its own address space
    (RLIMIT_AS), so a huge allocation fails inside it as a MemoryError. A CUDA worker is not
    capped: creating a CUDA context reserves far more virtual address space than any host has
    memory, and under such a cap the first CUDA call fails with 'out of memory'. Its resident
    set (with its children's) is watched from here instead, and the worker is killed, as
    `oom`, when it passes the same limit.
    """

    def __init__(self, memory_limit_bytes: int | None, log_path: str, device: str = "cpu") -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")
        args = [sys.executable, "-c", _BOOT]
        self.rss_limit_bytes = int(memory_limit_bytes) if memory_limit_bytes and device == "cuda" else None
        if memory_limit_bytes and self.rss_limit_bytes is None:
            args += ["--memory-limit", str(int(memory_limit_bytes))]
        # A new session: on timeout the whole process group (threads, helpers) is killed.
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=self._log, stderr=self._log,
                                     env=worker_env(), start_new_session=True, text=True)

    def run(self, cell: Cell, settings: Settings, timeout_s: float, more: bool = False) -> dict[str, Any]:
        """Measure one cell; the result dict always has a status. Raises nothing for the
        implementation's failures; on timeout or crash the process is gone afterwards.
        more: time the cell this worker measured last again (an A/B run's later round)."""
        job = {"cell": cell.to_json(), "settings": asdict(settings), "kind_origin": kinds.origin(cell.kind),
               "more": more}
        with tempfile.TemporaryDirectory(prefix="ctxbench-") as tmp:
            job_path = os.path.join(tmp, "job.json")
            result_path = os.path.join(tmp, "result.json")
            with open(job_path, "w") as f:
                json.dump(job, f)
            self._log.write(f"=== {cell.label} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            self._log.flush()
            start = time.monotonic()
            deadline = start + timeout_s
            next_rss = 0.0
            try:
                self.proc.stdin.write(job_line(job_path, result_path))
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # it died between cells: classified below
            while True:
                if os.path.exists(result_path):
                    with open(result_path) as f:
                        return json.load(f)
                if self.proc.poll() is not None:
                    return _classify_crash(self.proc.returncode, self.log_path)
                now = time.monotonic()
                if now > deadline:
                    self.kill()
                    return {"status": "timeout", "message": f"no result after {timeout_s:g} s; worker killed"}
                if self.rss_limit_bytes is not None and now >= next_rss:
                    next_rss = now + RSS_POLL_S
                    rss = resident_bytes(self.proc.pid)
                    if rss > self.rss_limit_bytes:
                        self.kill()
                        return {"status": "oom", "message": f"worker's resident set {rss / 2**30:.2f} GiB passed the "
                                f"host-memory limit {self.rss_limit_bytes / 2**30:.2f} GiB; worker killed"}
                # 1 ms at first: an A/B round of a few tens of ms must not wait 20 ms for its turn
                time.sleep(0.001 if now - start < 0.2 else 0.02)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        _kill_group(self.proc)
        self._log.close()

    def close(self) -> None:
        """Let the worker finish (stdin closed); kill it if it doesn't within seconds."""
        if self.alive:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (subprocess.TimeoutExpired, OSError):
                pass
        self.kill()


# Statuses after which a worker is replaced: its process may be left in a bad state.
REPLACE_AFTER = ("error", "oom", "timeout")


class WorkerPool:
    """Worker processes keyed by implementation and by whether they run a model (whose cells
    get a worker of their own, so nothing a kernel cell left in the process, its heap thresholds
    after a memory pass or its compiled caches, reaches a model's timings; it replaces the
    implementation's kernel worker, and the other way round), replaced after any failure.

    With reuse=False every cell gets a fresh process (slower, fully cold).
    """

    def __init__(self, memory_limit_bytes: int | None, reuse: bool = True) -> None:
        self.memory_limit_bytes = memory_limit_bytes
        self.reuse = reuse
        self.workers: dict[tuple[str, bool], Worker] = {}

    def run_cell(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str,
                 more: bool = False) -> dict[str, Any]:
        """Measured fields with status and message, plus wall_s (seconds, worker start included).
        more: another round of the cell the implementation's worker measured last (Worker.run)."""
        start = time.perf_counter()
        key = (cell.impl, cell.runs_a_model)
        worker = self.workers.get(key)
        if worker is None or not worker.alive:
            # one process per implementation at a time: the sweep plans its model cells after its kernels
            other = self.workers.pop((cell.impl, not cell.runs_a_model), None)
            if other is not None:
                other.close()
            worker = self.workers[key] = Worker(self.memory_limit_bytes, log_path, cell.device)
        try:
            result = worker.run(cell, settings, timeout_s, more)
        except BaseException:  # Ctrl-C in the parent: don't leave the worker behind
            worker.kill()
            raise
        if result.get("status") in REPLACE_AFTER or not self.reuse or not worker.alive:
            worker.close()
            del self.workers[key]
        result["wall_s"] = time.perf_counter() - start
        return result

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.workers.clear()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _classify_crash(returncode: int, log_path: str) -> dict[str, str]:
    """Status and message for a worker that died without writing its result."""
    tail = [ln for ln in _tail(log_path) if ln.strip()]
    last = tail[-1].strip()[:300] if tail else ""
    if returncode < 0:
        sig = _signal_name(-returncode)
        if -returncode == signal.SIGKILL:
            # Nobody in ctxbench sent it (timeouts are handled above): the kernel's OOM
            # killer is by far the likeliest sender.
            return {"status": "oom", "message": "worker killed by SIGKILL (most likely the OS out-of-memory killer)"}
        return {"status": "error", "message": f"worker died with {sig}" + (f": {last}" if last else "")}
    return {"status": "error", "message": f"worker exited with status {returncode} and no result"
            + (f": {last}" if last else "")}


@runtime_checkable
class Executor(Protocol):
    """What the sweep needs of an executor (ctxbench.engine.sweep.run_sweep's scheduling loop).

    The sweep submits cells while in_flight < capacity, then waits for one to finish; so the
    same loop drives a Ray cluster (ctxbench.engine.ray_executor.RayExecutor) with many cells in
    flight, the ranks of torchrun (ctxbench.engine.torchrun.DistributedExecutor) and this machine's
    worker processes (LocalExecutor), where submit() measures the cell before it returns.
    """

    name: str  # the executor's name, e.g. "local"
    capacity: int  # how many cells may be in flight at once

    @property
    def in_flight(self) -> int:
        """Cells submitted whose result wait() has not returned yet."""

    def submit(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str) -> None:
        """Start measuring a cell (timeout_s: seconds before its worker is killed; log_path:
        the file the worker's output is appended to)."""

    def wait(self) -> tuple[Cell, dict[str, Any]]:
        """The next finished cell and its result (measured fields, status, message, wall_s)."""

    def close(self) -> None:
        """Stop every worker (and cell in flight); the executor is not used afterwards."""

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc: object) -> None: ...


class LocalExecutor:
    """The default executor (an Executor): one cell at a time, in this machine's worker processes."""

    name = "local"
    capacity = 1

    def __init__(self, memory_limit_bytes: int | None, reuse: bool = True) -> None:
        self.pool = WorkerPool(memory_limit_bytes, reuse=reuse)
        self._done: list[tuple[Cell, dict[str, Any]]] = []

    @property
    def in_flight(self) -> int:
        return len(self._done)

    def submit(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str) -> None:
        self._done.append((cell, self.run_cell(cell, settings, timeout_s=timeout_s, log_path=log_path)))

    def run_cell(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str,
                 more: bool = False) -> dict[str, Any]:
        """Measure one cell now, in this machine's pool (submit() queues what this returns)."""
        return self.pool.run_cell(cell, settings, timeout_s=timeout_s, log_path=log_path, more=more)

    def wait(self) -> tuple[Cell, dict[str, Any]]:
        """The next finished cell and its result (measured fields, status, message, wall_s)."""
        return self._done.pop(0)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
