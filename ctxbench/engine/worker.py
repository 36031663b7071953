"""The worker: a separate process that measures cells, one at a time.

    python -m ctxbench.engine.worker [--memory-limit BYTES]    (then '["JOB.json", "RESULT.json"]' lines on stdin)

JOB.json holds the cell and the measurement settings; RESULT.json gets the measured
fields, or a status (oom, unsupported, error) and a one-line message. The full traceback
of a failure goes to stderr, which the executor keeps in the implementation's log. A
crash that leaves no RESULT.json (segfault, abort, OOM killer) is classified by the
executor from the exit status.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

from ctxbench.core.formatting import first_line, one_line


def cap_memory(limit_bytes: int) -> None:
    """Cap the address space so a huge allocation fails here (MemoryError or a torch
    'can't allocate memory' error) instead of waking the kernel's OOM killer."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, hard))


def is_oom(exc: BaseException) -> bool:
    """Whether an exception means the device or the process ran out of memory."""
    if isinstance(exc, MemoryError):
        return True
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                   "std::bad_alloc", "failed to allocate"))


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Measure the job's cell with its kind's measurement (ctxbench.core.kinds: Kind.measure);
    never raises for failures of the implementation itself. What a kind loads (a model, a
    prompt's prefill, compiled kernels) stays in this process for the next cell."""
    from ctxbench.core import kinds, registry, revisions
    from ctxbench.core.cell import Cell, Settings

    # X@<commit>: this process imports its implementations from that commit's kernels/, before
    # anything imports the current ones
    revisions.use_revision(str(job["cell"].get("impl", "")))
    cell = Cell.from_job(job["cell"], job.get("kind_origin"))
    kind = kinds.get(cell.kind)
    settings = Settings(**job["settings"])
    pin(settings.pin_cpu)
    impl = registry.resolve(cell.impl)
    if revisions.split(cell.impl)[1] is not None and not job.get("more"):
        # the driver planned X@<commit> with today's X's declarations; the revision's own decide here
        reason = impl.unsupported_reason(cell)
        if reason is not None:
            return {"status": "unsupported", "message": reason}
    try:
        # "more": another round of an A/B run's interleaved timing (ctxbench.engine.interleave)
        row = kind.measure_more(impl, cell, settings) if job.get("more") else kind.measure(impl, cell, settings)
    except registry.Unsupported as exc:
        return {"status": "unsupported", "message": first_line(str(exc)) or "unsupported"}
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc()
        return {"status": "oom" if is_oom(exc) else "error", "message": one_line(exc)}
    if impl.info is not None:
        try:
            row["impl_info"] = json.dumps(impl.info(), sort_keys=True)
        except Exception as exc:  # details are optional; a failure to report them is not fatal
            row["impl_info"] = json.dumps({"info_error": one_line(exc)})
    return row


_ALL_CPUS: set[int] | None = None


def pin(cpu: int | None) -> None:
    """Run this process on one CPU (an A/B round, Settings.pin_cpu), or on every CPU it was
    started with (None); nothing where the OS has no affinity call."""
    global _ALL_CPUS
    if not hasattr(os, "sched_setaffinity"):
        return
    if _ALL_CPUS is None:
        _ALL_CPUS = set(os.sched_getaffinity(0))
    wanted = {cpu} if cpu is not None and cpu in _ALL_CPUS else _ALL_CPUS
    if os.sched_getaffinity(0) != wanted:
        os.sched_setaffinity(0, wanted)


def job_line(job_path: str, result_path: str) -> str:
    """The stdin line that hands a worker one job: a JSON list, so a path may hold spaces."""
    return json.dumps([job_path, result_path]) + "\n"


def _write_result(result: dict[str, Any], result_path: str) -> None:
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=float)
    os.replace(tmp, result_path)  # the executor sees the whole result or none of it


def serve(memory_limit_bytes: int | None) -> None:
    """Measure jobs named on stdin, one '["JOB.json", "RESULT.json"]' line each, until stdin closes.

    One process serves many cells of one implementation, which saves the start-up (torch
    import, CUDA context, compilation caches) per cell; the executor replaces it after any
    failure, so a crash still costs one row.
    """
    if memory_limit_bytes:
        cap_memory(memory_limit_bytes)
    for line in sys.stdin:
        if not line.strip():
            continue
        job_path, result_path = json.loads(line)  # job_line's format
        with open(job_path) as f:
            job = json.load(f)
        try:
            result = run_job(job)
        except BaseException as exc:  # noqa: BLE001 - e.g. the implementation could not be imported
            if isinstance(exc, KeyboardInterrupt):
                raise
            traceback.print_exc()
            result = {"status": "oom" if is_oom(exc) else "error", "message": one_line(exc)}
        sys.stdout.flush()
        sys.stderr.flush()
        # a round of an A/B run that keeps its call for the next one allocated nothing to free (and a
        # collection costs 50-100 ms, more than such a round's calls)
        if not (job.get("more") and job["settings"].get("keep_for_more")):
            _free_device_memory()
        _write_result(result, result_path)


def _free_device_memory() -> None:
    """Return cached CUDA blocks so the next cell (maybe another worker's) starts from empty."""
    import gc

    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def die_with_parent() -> None:
    """On Linux, be killed when the sweep that started this worker dies (killed, crashed).

    A worker runs in a session of its own (so a timeout can kill its whole process group), so
    nothing else would stop one that is busy, e.g. waiting for the other ranks of a
    distributed cell whose drivers are gone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    limit = int(args[1]) if len(args) > 1 and args[0] == "--memory-limit" else None
    die_with_parent()
    try:
        serve(limit)
    except KeyboardInterrupt:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: some extensions crash or hang at exit, and results are safe.
    os._exit(0)


if __name__ == "__main__":
    main()
