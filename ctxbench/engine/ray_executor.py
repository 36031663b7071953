"""The Ray executor: every cell a Ray task, on whichever node of the cluster has room.

A task asks for one GPU (CUDA sweeps) or one CPU (CPU sweeps) and measures its cell in a
fresh worker subprocess on its node, through the local executor's Worker: a cell that
raises, runs out of memory, crashes or hangs costs its row exactly as it does locally. The
task returns the result, the node's environment (hostname, device name, versions: the row's
environment columns say which node measured it) and the worker's log lines, which the
driver appends to the run's logs/<impl>.log. The driver writes each row as it arrives, so
--resume works across executors.

Cells of one (implementation, kind) run one after another in length order, so an
implementation that runs out of memory at N is not tried at 2N; different implementations
run in parallel, as many as the cluster's resources allow.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from dataclasses import asdict
from typing import Any

from ctxbench.core.formatting import one_line
from ctxbench.core import kinds
from ctxbench.core.cell import Cell, Settings

INSTALL_HINT = "pip install 'ctxbench[ray]'"


class RayMissing(RuntimeError):
    """ray is not installed."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayMissing(f"--executor ray needs the ray package: {INSTALL_HINT}") from None
    return ray


def run_cell_on_node(cell_json: dict[str, Any], settings_json: dict[str, Any], timeout_s: float,
                     memory_limit_bytes: int | None, import_path: str,
                     kind_origin: dict[str, str] | None = None) -> dict[str, Any]:
    """The body of a Ray task: measure one cell in a worker subprocess of this node.

    memory_limit_bytes None: 85% of the memory this node has available now. kind_origin: where
    the cell's kind was registered (ctxbench.core.kinds.origin), for a kind this node's ctxbench
    does not have itself.
    Returns the worker's result plus `env` (this node's environment columns), `log_lines`
    (the worker's log for this cell) and `node` (hostname).
    """
    from ctxbench.core.env import environment
    from ctxbench.engine.executor import Worker, default_memory_limit

    # --impl modules resolve against the driver's working directory, as in a local sweep
    os.environ.setdefault("CTXBENCH_IMPORT_PATH", import_path)
    if memory_limit_bytes is None:
        memory_limit_bytes = default_memory_limit()
    cell = Cell.from_job(cell_json, kind_origin)
    with tempfile.TemporaryDirectory(prefix="ctxbench-ray-") as tmp:
        log_path = os.path.join(tmp, "worker.log")
        worker = Worker(memory_limit_bytes, log_path, cell.device)
        try:
            result = worker.run(cell, Settings(**settings_json), timeout_s)
        finally:
            worker.close()
        with open(log_path, errors="replace") as f:
            log_lines = f.read()
    result["env"] = environment(cell.device)
    result["log_lines"] = log_lines
    result["node"] = socket.gethostname()
    return result


class RayExecutor:
    """Cells as Ray tasks on the cluster at `address` (None: RAY_ADDRESS, or a local cluster
    started for this sweep). An executor.Executor, as executor.LocalExecutor is."""

    name = "ray"

    def __init__(self, address: str | None, memory_limit_bytes: int | None, device: str,
                 capacity: int = 256) -> None:
        ray = self.ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self.memory_limit_bytes = memory_limit_bytes
        resources = {"num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        # No retries: a task that died is a measurement that failed, recorded as such.
        self._task = ray.remote(max_retries=0, **resources)(run_cell_on_node)
        self.capacity = capacity
        self._refs: dict[Any, tuple[Cell, str, float]] = {}
        self._import_path = os.getcwd()

    @property
    def in_flight(self) -> int:
        return len(self._refs)

    def submit(self, cell: Cell, settings: Settings, *, timeout_s: float, log_path: str) -> None:
        ref = self._task.remote(cell.to_json(), asdict(settings), timeout_s, self.memory_limit_bytes,
                                self._import_path, kinds.origin(cell.kind))
        self._refs[ref] = (cell, log_path, time.perf_counter())

    def wait(self) -> tuple[Cell, dict[str, Any]]:
        """The next cell to finish anywhere on the cluster, and its result."""
        ray = self.ray
        ready, _ = ray.wait(list(self._refs), num_returns=1)
        ref = ready[0]
        cell, log_path, start = self._refs.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.OutOfMemoryError as exc:
            result = {"status": "oom", "message": "Ray's memory monitor killed the task: " + one_line(exc)}
        except ray.exceptions.RayError as exc:  # the task's process or node died
            result = {"status": "error", "message": f"Ray task failed: {one_line(exc)}"}
        lines = result.pop("log_lines", "")
        node = result.pop("node", "?")
        with open(log_path, "a") as f:
            f.write(f"--- ray task on {node}\n{lines}")
        result["wall_s"] = time.perf_counter() - start
        return cell, result

    def close(self) -> None:
        for ref in list(self._refs):
            self.ray.cancel(ref, force=True)
        self._refs.clear()

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
