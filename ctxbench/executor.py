"""The local executor: runs one cell's worker as a subprocess and classifies how it ended.

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
from typing import Any

from ctxbench.measure import Settings
from ctxbench.plan import Cell


def worker_env() -> dict[str, str]:
    """The worker's environment: the parent's, plus the current directory on PYTHONPATH
    (so --impl module:function resolves as it did here) and a fixed glibc mmap threshold
    (large blocks are returned to the OS on free, which peak-RSS measurement relies on)."""
    env = dict(os.environ)
    paths = [os.getcwd()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
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


def run_cell(cell: Cell, settings: Settings, *, timeout_s: float, memory_limit_bytes: int | None,
             log_path: str) -> dict[str, Any]:
    """Run `cell` in a fresh worker process; returns the measured fields with status and message.

    The worker's stdout and stderr (tracebacks included) go to `log_path`.
    """
    job = {"cell": asdict(cell), "settings": asdict(settings), "memory_limit_bytes": memory_limit_bytes}
    with tempfile.TemporaryDirectory(prefix="ctxbench-") as tmp:
        job_path = os.path.join(tmp, "job.json")
        result_path = os.path.join(tmp, "result.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        start = time.perf_counter()
        with open(log_path, "ab") as log:
            log.write(f"=== {cell.label} {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
            log.flush()
            # A new session: on timeout the whole process group (threads, helpers) is killed.
            proc = subprocess.Popen([sys.executable, "-m", "ctxbench.worker", job_path, result_path],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=worker_env(),
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
            except BaseException:  # Ctrl-C in the parent: don't leave the worker behind
                _kill_group(proc)
                raise
        wall_s = time.perf_counter() - start
        if timed_out:
            result = {"status": "timeout", "message": f"no result after {timeout_s:g} s; worker killed"}
        elif os.path.exists(result_path):
            with open(result_path) as f:
                result = json.load(f)
        else:
            result = _classify_crash(proc.returncode, log_path)
    result["wall_s"] = wall_s
    return result


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
