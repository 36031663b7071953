"""ctxbench.engine.worker on its own, in this process: run_job turns every way a cell can end into
a row (ok, unsupported, error, oom) with a one-line message, adds the implementation's details,
finds a kind registered elsewhere from its origin, and serve() answers job files read from stdin."""

from __future__ import annotations

import gc
import io
import json
from dataclasses import asdict

import pytest
import torch

from ctxbench.core import kinds, registry
from ctxbench.core.cell import Cell, Config, Settings
from ctxbench.engine.worker import is_oom, job_line, run_job, serve

FAST = Settings(warmup_ms=0.5, rep_ms=2.0, min_repeats=3, max_repeats=5, seed=17)
CONFIG = Config(heads=2, kv_heads=1, head_dim=16)

IMPLS = '''
import torch
import torch.nn.functional as F

from ctxbench.registry import Unsupported, register


def _good(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def good(q, k, v, *, causal, window, scale=None):
    return _good(q, k, v, causal)


def refuses(q, k, v, *, causal, window, scale=None):
    raise Unsupported("head_dim 16 is not one of 64, 128\\nsecond line of the reason")


def refuses_silently(q, k, v, *, causal, window, scale=None):
    raise Unsupported()


def raises(q, k, v, *, causal, window, scale=None):
    raise ValueError("deliberate failure\\nwith a second line")


def no_memory(q, k, v, *, causal, window, scale=None):
    raise MemoryError()


def cuda_oom(q, k, v, *, causal, window, scale=None):
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\\nmore")


def interrupted(q, k, v, *, causal, window, scale=None):
    raise KeyboardInterrupt


def wrong(q, k, v, *, causal, window, scale=None):
    return _good(q, k, v, causal) * 1.01


@register("unit_worker_informed", info=lambda: {"tile": 64, "backend": "unit"})
def informed(q, k, v, *, causal, window, scale=None):
    return _good(q, k, v, causal)


def _broken_info():
    raise RuntimeError("no details today\\nnone")


@register("unit_worker_broken_info", info=_broken_info)
def broken_info(q, k, v, *, causal, window, scale=None):
    return _good(q, k, v, causal)
'''


@pytest.fixture(scope="module", autouse=True)
def quick_gc():
    """measure_cell collects garbage several times per cell; with torch's modules frozen out of the
    collector's way each collection takes microseconds instead of a third of a second."""
    import ctxbench.measurements.kernel.measure  # noqa: F401 - what the kernel kind's cells import

    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module", autouse=True)
def own_registry():
    """The implementations the file below registers are forgotten after this module."""
    yield
    for name in ("unit_worker_informed", "unit_worker_broken_info"):
        registry._REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def impls(tmp_path_factory) -> str:
    """The folder of the implementations above; a cell names one as FILE:function."""
    folder = tmp_path_factory.mktemp("impls")
    (folder / "worker_impls.py").write_text(IMPLS)
    return str(folder / "worker_impls.py")


def job(impl: str, n: int = 32, kind: str = "kernel", settings: Settings = FAST, **fields) -> dict:
    """A job as the executor writes it (JSON: what a worker process reads)."""
    if kind == "kernel":
        fields = {"query_len": None, "ragged": False, "kv_lens": None, "page_size": None, **fields}
    cell = Cell.of(CONFIG, impl, n, kind, **fields)
    return json.loads(json.dumps({"cell": cell.to_json(), "settings": asdict(settings),
                                  "kind_origin": kinds.origin(kind)}))


# ---------------------------------------------------------------- run_job

def test_an_ok_row_is_the_kinds_measurement(impls, capsys):
    row = run_job(job(f"{impls}:good", n=48))
    assert row["status"] == "ok" and row["message"] == ""
    assert row["err_rel_l2"] < 1e-5 and row["err_rows"] == 48
    assert 3 <= row["repeats"] <= 5 and row["latency_min_ms"] <= row["latency_ms"]
    assert row["flops"] == 4 * 2 * 16 * 48 * 49 / 2  # causal pairs of a 48-token square, Hq=2, D=16
    assert "impl_info" not in row  # a plain function has no details
    assert "Traceback" not in capsys.readouterr().err


def test_a_wrong_answer_is_measured_not_an_error(impls):
    row = run_job(job(f"{impls}:wrong"))
    assert row["status"] == "wrong" and "relative L2 error" in row["message"]
    assert 5e-3 < row["err_rel_l2"] < 2e-2  # 1% off
    assert row["latency_ms"] > 0


@pytest.mark.parametrize("function, status, message", [
    ("refuses", "unsupported", "head_dim 16 is not one of 64, 128"),
    ("refuses_silently", "unsupported", "unsupported"),
    ("raises", "error", "ValueError: deliberate failure"),
    ("no_memory", "oom", "MemoryError"),
    ("cuda_oom", "oom", "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_each_failure_is_a_row_with_a_one_line_message(impls, capsys, function, status, message):
    row = run_job(job(f"{impls}:{function}"))
    assert row == {"status": status, "message": message}
    # the traceback of a failure goes to stderr (the implementation's log); a refusal has none
    assert ("Traceback" in capsys.readouterr().err) == (status != "unsupported")


def test_ctrl_c_is_not_a_row(impls):
    with pytest.raises(KeyboardInterrupt):
        run_job(job(f"{impls}:interrupted"))


def test_an_implementation_that_does_not_resolve_raises(impls):
    # serve() makes that a row; run_job only turns the implementation's own failures into rows
    with pytest.raises(registry.RegistryError, match=r"cannot import no_such_module_for_a_worker \(ModuleNotFound"):
        run_job(job("no_such_module_for_a_worker:attn"))
    with pytest.raises(registry.RegistryError, match="has no attribute 'nosuch'"):
        run_job(job(f"{impls}:nosuch"))


def test_impl_info_is_added_as_sorted_json(impls):
    row = run_job(job(f"{impls}:informed"))
    assert row["status"] == "ok" and row["impl_info"] == '{"backend": "unit", "tile": 64}'
    row = run_job(job(f"{impls}:broken_info"))
    assert row["status"] == "ok"
    assert json.loads(row["impl_info"]) == {"info_error": "RuntimeError: no details today"}


# ---------------------------------------------------------------- a kind this process has not registered

KIND = '''
from dataclasses import dataclass

from ctxbench.core.kinds import Kind, register_kind


@register_kind
class UnitWorkerKind(Kind):
    name = "unit_worker_kind"
    command = "sweep"
    columns = ("unit_sum",)

    def measure(self, impl, cell, settings):
        import torch

        from ctxbench.core.masks import Mask

        g = torch.Generator().manual_seed(settings.seed)
        q, k, v = (torch.randn(1, cell.heads, cell.n, cell.head_dim, generator=g) for _ in range(3))
        out = impl.call(q, k, v, Mask("causal"))
        return {"status": "ok", "message": "", "unit_sum": float(out.double().sum()), "unit_seed": settings.seed}
'''


def test_a_kind_is_found_from_the_file_that_registered_it(tmp_path, impls):
    source = tmp_path / "unit_worker_kind.py"
    source.write_text(KIND)
    cell = Cell(impl=f"{impls}:good", n=8, kind="unit_worker_kind", heads=2, kv_heads=2, head_dim=4)
    data = {"cell": cell.to_json(), "settings": asdict(FAST),
            "kind_origin": {"module": "no_such_module_for_unit_worker_kind", "source": str(source)}}
    assert "unit_worker_kind" not in kinds.all_kinds()
    try:
        row = run_job(json.loads(json.dumps(data)))
        assert kinds.get("unit_worker_kind").source == str(source)
    finally:
        kinds.unregister("unit_worker_kind")
    g = torch.Generator().manual_seed(FAST.seed)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    want = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert row["status"] == "ok" and row["unit_seed"] == 17
    assert abs(row["unit_sum"] - float(want.sum())) < 1e-4


# ---------------------------------------------------------------- is_oom

@pytest.mark.parametrize("exc, oom", [
    (MemoryError(), True),
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 68719476736 bytes"), True),
    (OSError(12, "Cannot allocate memory"), True),
    (RuntimeError("std::bad_alloc"), True),
    (RuntimeError("Triton Error [CUDA]: FAILED TO ALLOCATE the workspace"), True),
    (ValueError("shapes (2, 3) and (4,) do not match"), False),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (KeyError("memory"), False),
])
def test_is_oom(exc, oom):
    assert is_oom(exc) is oom


# ---------------------------------------------------------------- serve

def test_serve_answers_each_job_file_named_on_stdin(tmp_path, impls, monkeypatch):
    jobs = {"good": job(f"{impls}:good"), "refuses": job(f"{impls}:refuses"),
            "gone": job("no_such_module_for_a_worker:attn")}
    lines = []
    for name, data in jobs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
        lines.append(job_line(str(tmp_path / f"{name}.json"), str(tmp_path / f"{name}.result.json")))
    monkeypatch.setattr("sys.stdin", io.StringIO("\n" + "".join(lines)))
    serve(None)
    results = {name: json.loads((tmp_path / f"{name}.result.json").read_text()) for name in jobs}
    assert results["good"]["status"] == "ok" and results["good"]["err_rel_l2"] < 1e-5
    assert results["refuses"] == {"status": "unsupported", "message": "head_dim 16 is not one of 64, 128"}
    assert results["gone"]["status"] == "error"
    assert results["gone"]["message"].startswith("RegistryError: --impl 'no_such_module_for_a_worker:attn': "
                                                 "cannot import no_such_module_for_a_worker")
    assert not list(tmp_path.glob("*.tmp"))  # results are written whole, then renamed


# A job folder with a space in its path (the executor makes it with tempfile.TemporaryDirectory, under
# $TMPDIR): the worker once split the line on blanks and died, and every cell became an error.
def test_serve_reads_job_paths_with_spaces(tmp_path, impls, monkeypatch):
    folder = tmp_path / "my runs"
    folder.mkdir()
    (folder / "job.json").write_text(json.dumps(job(f"{impls}:refuses")))
    monkeypatch.setattr("sys.stdin", io.StringIO(job_line(str(folder / "job.json"), str(folder / "result.json"))))
    serve(None)
    assert json.loads((folder / "result.json").read_text())["status"] == "unsupported"
