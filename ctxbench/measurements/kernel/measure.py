"""Measurement of one cell inside a worker: setup, first call, error check, peak memory, latency.

Order matters. The implementation's setup step (per-shape work: masks, plans, block masks)
is timed alone (setup_ms); then its first call (compilation, autotuning and lazy caches
happen there: first_call_ms), so that neither lands in latency_ms or in the memory reading.
The error check and memory run come next (one call each) so that an implementation that is
wrong or runs out of memory is found before the timing loop, and the timing loop runs on a
warmed-up implementation. Every number in a CSV row that is
measured (not configured) is produced by `measure_cell` below.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Callable

import torch

from ctxbench.core.formatting import first_line
from ctxbench.core.flops import attention_bytes, attention_flops, device_peak_tflops
from ctxbench.core.kv_layout import KVLayout, draw_lengths, paginate
from ctxbench.core.cell import Cell, Settings
from ctxbench.core.heap import pinned_heap
from ctxbench.core.procfs import reset_rss_peak, status_kib
from ctxbench.core.reference import TOLERANCE, errors, reference_attention, sample_rows
from ctxbench.core.registry import Impl, Runner

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Gradients are checked only up to this length: the float64 reference backward is O(N^2).
GRAD_CHECK_MAX_LEN = 2048
# Gradients of low-precision inputs carry more rounding than the output does.
GRAD_TOLERANCE_FACTOR = 2.0
# Bytes the float64 reference may use for one block of checked rows.
REFERENCE_BUDGET_BYTES = 256 * 2**20


def make_inputs(cell: Cell, seed: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    """Random q, k, v (and dout) for a cell; the same seed and length give the same inputs
    to every implementation, so their errors are comparable."""
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + cell.n)
    dtype = TORCH_DTYPES[cell.dtype]

    def rand(heads: int, length: int) -> torch.Tensor:
        t = torch.randn(cell.batch, heads, length, cell.head_dim, generator=gen, dtype=torch.float32)
        return t.to(device=cell.device, dtype=dtype).requires_grad_(requires_grad)

    # q and dout have the cell's Lq rows, k and v its n keys; at Lq = n the same draws as a
    # square cell always had
    q, k, v = rand(cell.heads, cell.q_len), rand(cell.kv_heads, cell.n), rand(cell.kv_heads, cell.n)
    dout = rand(cell.heads, cell.q_len).detach()
    return q, k, v, dout


def kv_lengths(cell: Cell, seed: int) -> list[int] | None:
    """Per-sequence KV lengths (tokens) of a ragged or paged cell, None for a plain one."""
    if cell.kv_lens is not None:
        return [int(x) for x in cell.kv_lens.split(",")]
    if cell.ragged:
        return draw_lengths(cell.n, cell.batch, cell.q_len, seed)
    if cell.page_size:
        return [cell.n] * cell.batch
    return None


def kv_inputs(impl: Impl, cell: Cell, seed: int, k: torch.Tensor,
              v: torch.Tensor) -> tuple[KVLayout | None, torch.Tensor, torch.Tensor]:
    """(layout, k, v) as `impl` is called with them: page pools for an implementation that
    reads a paged cache, else the contiguous K and V (ctxbench.core.kv_layout). Built before any
    timing: a block table is the serving engine's state, not the kernel's work."""
    lengths = kv_lengths(cell, seed)
    if lengths is None:
        return None, k, v
    kv_lens = torch.tensor(lengths, dtype=torch.int32, device=k.device)
    if not (cell.page_size and impl.paged):
        return KVLayout(tuple(lengths), kv_lens), k, v
    k_pool, v_pool, table = paginate(k.detach(), v.detach(), lengths, cell.page_size, seed)
    return KVLayout(tuple(lengths), kv_lens, table, cell.page_size), k_pool, v_pool


def make_step(run: Runner, mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              dout: torch.Tensor) -> Callable[[], Any]:
    """The function the timing loop calls for the cell's mode, around the prepared run(q, k, v).

    bwd times only the backward: one forward is kept and its graph retained, and the
    gradients are dropped before each call so accumulation is not timed.
    """
    if mode == "fwd":
        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return run(q, k, v)
        return fwd
    if mode == "fwd+bwd":
        def fwd_bwd() -> None:
            q.grad = k.grad = v.grad = None
            run(q, k, v).backward(dout)
        return fwd_bwd
    out = run(q, k, v)

    def bwd() -> None:
        q.grad = k.grad = v.grad = None
        out.backward(dout, retain_graph=True)
    return bwd


# ---------------------------------------------------------------- memory

def peak_memory(step: Callable[[], Any], device: str) -> tuple[int, str, Any]:
    """(peak bytes above what was allocated before, method name, step's return value).

    cuda: torch.cuda.max_memory_allocated minus memory_allocated before the step (so the
    inputs' footprint is not counted). cpu: growth of the process's peak resident set
    (VmHWM after resetting it) over the resident set before the step, read with glibc's mmap
    threshold pinned low for this pass only (ctxbench.core.heap.pinned_heap), so freed blocks
    leave the resident set at once; the timed calls run on the heap a user's process has.
    """
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "cuda_max_allocated", result
    with pinned_heap():
        base_kib = status_kib("VmRSS")
        if base_kib is not None and reset_rss_peak():
            result = step()
            peak_kib = status_kib("VmHWM") or base_kib
            return max(0, peak_kib - base_kib) * 1024, "cpu_rss_peak_growth", result
    import resource  # not Linux: ru_maxrss is a lifetime peak, the best available

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if __import__("sys").platform == "darwin" else 1024
    return max(0, after - before) * scale, "cpu_ru_maxrss_growth", result


# ---------------------------------------------------------------- timing

def quantiles(samples_ms: list[float]) -> dict[str, Any]:
    """The latency columns of timed calls (samples_ms: one call's time each, ms): latency_ms
    (median), latency_p20_ms, latency_p80_ms, latency_min_ms (all ms), repeats (how many
    calls) and latency_samples_ms (every sample, ms, ";"-separated)."""
    t = torch.tensor(samples_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return {"latency_ms": q[0].item(), "latency_p20_ms": q[1].item(), "latency_p80_ms": q[2].item(),
            "latency_min_ms": t.min().item(), "repeats": len(samples_ms),
            # Every repeat, so `ctxbench compare` can test a slowdown against the run-to-run spread;
            # 6 significant digits are far below timing noise and keep the row short.
            "latency_samples_ms": ";".join(f"{x:.6g}" for x in samples_ms)}


def repeats(estimate_ms: float, s: Settings) -> int:
    """How many timed calls: enough to fill s.rep_ms (ms) at estimate_ms (ms) per call, within
    s.min_repeats and s.max_repeats."""
    return int(min(s.max_repeats, max(s.min_repeats, math.ceil(s.rep_ms / max(estimate_ms, 1e-3)))))


def time_cpu(step: Callable[[], Any], s: Settings) -> dict[str, Any]:
    """Warm up for s.warmup_ms (ms; at least one call, at most 20), then time repeats with
    perf_counter (ms), as many as fill s.rep_ms at the fastest warm-up call.

    The warm-up is its own: the memory run before it is no estimate of a call (its wall time
    holds a garbage collection and the peak-RSS reset, often 100 ms and more around a call of a
    few ms, which once sized an 8-repeat loop for a 6 ms call), and it ran under the pinned
    heap of the memory pass."""
    warm: list[float] = []
    start = time.perf_counter()
    while not warm or ((time.perf_counter() - start) * 1e3 < s.warmup_ms and len(warm) < 20):
        t0 = time.perf_counter()
        step()
        warm.append((time.perf_counter() - t0) * 1e3)
    samples = []
    for _ in range(repeats(min(warm), s)):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


def time_cuda(step: Callable[[], Any], s: Settings) -> dict[str, Any]:
    """CUDA events around each call, with L2 flushed before each (as triton.testing.do_bench).
    The step has had its first call already (measure_cell): compilation and autotuning are
    never in these timings."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")  # larger than any L2
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n_warm = 0
    while n_warm < 1 or ((time.perf_counter() - t0) * 1e3 < s.warmup_ms and n_warm < 1000):
        step()
        torch.cuda.synchronize()
        n_warm += 1
    estimate_ms = (time.perf_counter() - t0) * 1e3 / n_warm
    n = repeats(estimate_ms, s)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.zero_()
        starts[i].record()
        step()
        ends[i].record()
    torch.cuda.synchronize()
    return quantiles([a.elapsed_time(b) for a, b in zip(starts, ends)])


def time_cuda_graph(step: Callable[[], Any], s: Settings) -> dict[str, Any]:
    """Like time_cuda, but each timed call is a replay of a CUDA graph that captured one call:
    a decode kernel can run for 10-20 us, the order of its launch overhead, which a graph
    removes (as tritonbench --cudagraph and vLLM's do_bench_cudagraph time them). The graph is
    captured after warm-up calls on a side stream, as CUDA graph capture requires; the caller
    falls back to time_cuda when capture fails (an implementation that syncs with the host)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return time_cuda(graph.replay, s)


# ---------------------------------------------------------------- setup and first call

def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _held_bytes(device: str) -> int | None:
    """Bytes this process holds now: allocated CUDA memory, or the resident set on the CPU."""
    if device == "cuda":
        return torch.cuda.memory_allocated()
    kib = status_kib("VmRSS")
    return None if kib is None else kib * 1024


def timed_prepare(impl: Impl, cell: Cell, q: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, layout: KVLayout | None = None) -> tuple[Runner, dict[str, Any]]:
    """Run the implementation's setup step alone: (run, {setup_ms, setup_mem_bytes}).

    setup_ms: wall time of the setup step (ms; 0 for a plain function, which has none).
    setup_mem_bytes: what the setup step keeps allocated for the calls (bytes: CUDA memory
    allocated, or resident-set growth on the CPU, which also counts code and caches it loads).
    """
    gc.collect()
    _sync(cell.device)
    before = _held_bytes(cell.device)
    t0 = time.perf_counter()
    run = impl.prepare(q, k, v, cell.attention_mask, layout=layout)
    _sync(cell.device)
    setup_ms = (time.perf_counter() - t0) * 1e3
    after = _held_bytes(cell.device)
    held = None if before is None or after is None else max(0, after - before)
    return run, {"setup_ms": setup_ms if impl.setup else 0.0, "setup_mem_bytes": held if impl.setup else 0}


def timed_first_call(once: Callable[[], Any], device: str) -> float:
    """Wall time (ms) of the first call, where JIT compilation (torch.compile, Triton),
    autotuning and lazily built caches happen; first_call_ms - latency_ms is their cost."""
    _sync(device)
    t0 = time.perf_counter()
    once()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------- the cell

def check_output(impl: Impl, cell: Cell, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, s: Settings, lengths: list[int] | None = None) -> dict[str, Any]:
    """Relative L2 and max-abs error of `out` on a random subset of rows vs the float64 reference.

    lengths: a ragged batch's KV lengths; each sequence is then checked against its own keys
    (k, v contiguous [B, Hkv, n, D]) and its own offset, and the errors pooled."""
    expected = (cell.batch, cell.heads, cell.q_len, cell.head_dim)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{impl.name} returned {shape}, expected a tensor of shape {expected}")
    gen = torch.Generator().manual_seed(s.seed + cell.n)
    rows = sample_rows(cell.q_len, s.check_rows, gen)
    # the reference holds rows x n float64 scores per head: a block of rows within the budget
    row_block = max(1, min(len(rows), REFERENCE_BUDGET_BYTES // (8 * cell.batch * cell.heads * cell.n)))
    with torch.no_grad():
        got = out.detach()[:, :, rows.to(out.device), :]
        if lengths is None:
            ref = reference_attention(q.detach(), k.detach(), v.detach(), cell.attention_mask, rows=rows,
                                      row_block=row_block)
        else:
            ref = torch.cat([reference_attention(q[b:b + 1].detach(), k[b:b + 1, :, :n].detach(),
                                                 v[b:b + 1, :, :n].detach(), cell.sequence_mask(n), rows=rows,
                                                 row_block=row_block) for b, n in enumerate(lengths)])
        rel, mx = errors(got, ref)
    return {"err_rel_l2": rel, "err_max_abs": mx, "err_rows": len(rows), "err_tolerance": TOLERANCE[cell.dtype],
            "out_dtype_ok": out.dtype == q.dtype}


def check_grads(run: Runner, cell: Cell, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                dout: torch.Tensor) -> float:
    """Relative L2 error of (dq, dk, dv) from the prepared run(q, k, v) against float64
    autograd of the reference."""
    q.grad = k.grad = v.grad = None
    run(q, k, v).backward(dout)
    got = [t.grad.double().flatten() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, cell.attention_mask)
    ref.backward(dout.double())
    want = [t.grad.flatten() for t in (q64, k64, v64)]
    rel, _ = errors(torch.cat(got), torch.cat(want))
    q.grad = k.grad = v.grad = None
    return rel


def verdict(err_rel_l2: float, tolerance: float, dtype: str, dtype_ok: bool,
            grad_err: float | None = None) -> tuple[str, str]:
    """(status, message) of a measured cell from its checks: "ok" and "", or "wrong" and the
    reasons joined by "; ".

    err_rel_l2: the output's relative L2 error against the float64 reference, wrong unless
    <= tolerance (NaN and inf are wrong); dtype: the input dtype's name, for the message;
    dtype_ok: whether the output has the input's dtype; grad_err: the gradients' relative L2
    error (None: not checked), wrong unless <= GRAD_TOLERANCE_FACTOR x tolerance.
    """
    problems = []
    if not err_rel_l2 <= tolerance:
        problems.append(f"relative L2 error {err_rel_l2:.3g} over the {dtype} tolerance {tolerance:g}")
    if not dtype_ok:
        problems.append(f"output dtype differs from the input's {dtype}")
    if grad_err is not None and not grad_err <= GRAD_TOLERANCE_FACTOR * tolerance:
        problems.append(f"gradient relative L2 error {grad_err:.3g} over {GRAD_TOLERANCE_FACTOR:g}x the {dtype} "
                        "tolerance")
    return ("wrong" if problems else "ok"), "; ".join(problems)


def throughput(cell: Cell, latency_ms: float, s: Settings, devices: int = 1,
               lengths: list[int] | None = None) -> dict[str, Any]:
    """The rates of one call at latency_ms (ms):

    flops (mask-aware FLOPs), tflops, and on CUDA peak_fraction (of `devices` GPUs' dense
    peak); forward cells also bytes_moved (the minimum traffic, bytes: ctxbench.core.flops), gbps
    (GB/s, 1e9 bytes) and bw_fraction (of the run's device bandwidth, s.bandwidth_gbps, which
    the sweep measured or looked up once: ctxbench.engine.bandwidth), with that bandwidth beside it.
    A ragged batch (lengths: KV tokens per sequence) counts each sequence's real keys only.
    """
    seqs = [(1, n) for n in lengths] if lengths is not None else [(cell.batch, cell.n)]
    flops = sum(attention_flops(b, cell.heads, cell.q_len, cell.head_dim, cell.sequence_mask(n), cell.mode, n_k=n)
                for b, n in seqs)
    seconds = latency_ms * 1e-3
    row: dict[str, Any] = {"flops": flops, "tflops": flops / seconds / 1e12}
    if cell.device == "cuda":
        peak = device_peak_tflops(torch.cuda.get_device_name(0), cell.dtype)
        row["peak_fraction"] = row["tflops"] / (peak * devices) if peak else None
    if cell.mode == "fwd":  # the backward's traffic has no such simple minimum
        moved = sum(attention_bytes(b, cell.heads, cell.kv_heads, cell.q_len, n, cell.head_dim,
                                    cell.sequence_mask(n), cell.dtype) for b, n in seqs)
        row.update(bytes_moved=moved, gbps=moved / seconds / 1e9)
        if s.bandwidth_gbps:
            row["bw_fraction"] = row["gbps"] / (s.bandwidth_gbps * devices)
    row.update(device_bw_gbps=s.bandwidth_gbps, device_bw_probe_gbps=s.bandwidth_probe_gbps,
               device_bw_source=s.bandwidth_source or None)
    return row


def measure_cell(impl: Impl, cell: Cell, s: Settings) -> dict[str, Any]:
    """Measure one cell; returns the measured CSV fields (status 'ok' or 'wrong', message)."""
    _KEPT.clear()  # the previous cell's tensors go before this cell's are made
    needs_grad = cell.mode != "fwd"
    q, k, v, dout = make_inputs(cell, s.seed, needs_grad)
    layout, k_in, v_in = kv_inputs(impl, cell, s.seed, k, v)  # the page pools, for a paged reader
    run, row = timed_prepare(impl, cell, q, k_in, v_in, layout)
    lengths = list(layout.lengths) if layout is not None else None
    if lengths is not None:
        row["kv_lens_used"] = ",".join(map(str, lengths))

    def once() -> torch.Tensor:
        if needs_grad:
            q.grad = k.grad = v.grad = None
            out = run(q, k, v)
            out.backward(dout)
            return out.detach()
        with torch.no_grad():
            return run(q, k_in, v_in)

    # Compilation and autotuning (which allocate benchmark buffers of their own) happen on
    # the first call: keep them out of the memory reading as well as the timings.
    row["first_call_ms"] = timed_first_call(once, cell.device)
    mem_bytes, mem_method, out = peak_memory(once, cell.device)
    row.update({"peak_mem_bytes": mem_bytes, "mem_method": mem_method})
    row.update(check_output(impl, cell, q, k, v, out, s, lengths))
    del out
    dtype_ok = row.pop("out_dtype_ok")
    if needs_grad and cell.n <= GRAD_CHECK_MAX_LEN:
        row["grad_err_rel_l2"] = check_grads(run, cell, q, k, v, dout)
    status, message = verdict(row["err_rel_l2"], row["err_tolerance"], cell.dtype, dtype_ok,
                              grad_err=row.get("grad_err_rel_l2"))
    gc.collect()

    step = make_step(run, cell.mode, q, k_in, v_in, dout)
    timing = time_step(step, cell, s)
    row.update(timing, timing_rounds=1, round_latency_ms=None)
    row.update(throughput(cell, timing["latency_ms"], s, lengths=lengths))
    row["status"], row["message"] = status, message
    if s.keep_for_more:  # an A/B run times this call again in later rounds (measure_more)
        _KEPT.update(key=cell.key, step=step, timing_method=timing["timing_method"])
    return row


def time_step(step: Callable[[], Any], cell: Cell, s: Settings, method: str | None = None) -> dict[str, Any]:
    """The latency columns of timed calls of `step` and the method used: CUDA-graph replays for a
    CUDA decode cell (falling back to CUDA events when capture fails), CUDA events on CUDA,
    perf_counter on the CPU. method: the one an earlier round of the cell used, kept."""
    if cell.device == "cuda" and s.cuda_graph and cell.query_len is not None and cell.mode == "fwd" \
            and (method is None or method == "cuda_graph"):
        try:
            return {**time_cuda_graph(step, s), "timing_method": "cuda_graph"}
        except Exception as exc:  # noqa: BLE001 - e.g. a host sync inside the call: time it launch by launch
            torch.cuda.synchronize()
            return {**time_cuda(step, s), "timing_method": f"cuda_events (graph capture failed: {first_line(str(exc))})"}
    if cell.device == "cuda":
        return {**time_cuda(step, s), "timing_method": method or "cuda_events"}
    return {**time_cpu(step, s), "timing_method": "perf_counter"}


# The prepared call of the cell this worker measured last with Settings.keep_for_more, which an
# A/B run's later rounds time again (measure_more) without setting it up, checking it or reading
# its memory again; dropped when the next cell starts.
_KEPT: dict[str, Any] = {}


def measure_more(impl: Impl, cell: Cell, s: Settings) -> dict[str, Any]:
    """More timed calls of the cell this worker measured last (ctxbench.engine.interleave's later
    rounds): the latency columns of this round (ms), with its own warm-up (s.warmup_ms, at least
    one call: the other side ran in between)."""
    if _KEPT.get("key") != cell.key:
        raise RuntimeError(f"this worker has no prepared call of {cell.label} to time again (it measured "
                           "another cell since, or restarted)")
    timing = time_step(_KEPT["step"], cell, s, _KEPT["timing_method"])
    if not s.keep_for_more:  # the last round: the worker holds no tensors while other cells run
        _KEPT.clear()
    return {**timing, "status": "ok", "message": ""}


def merge_rounds(cell: Cell, rows: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """One row from a cell measured in rounds (ctxbench.engine.interleave: X and X@REV in turn):
    the first round's checks, memory and setup (measure_cell), and the latency columns and rates
    of every round's timed calls together (ms), with each round's median in round_latency_ms (ms,
    ';'-separated, in the order run: ctxbench compare pairs them with the other side's). A round
    that did not end ok or wrong ends the cell with its row."""
    first = rows[0]
    if len(rows) == 1 or first.get("status") not in ("ok", "wrong"):
        return first
    failed = next((r for r in rows[1:] if r.get("status") not in ("ok", "wrong")), None)
    if failed is not None:
        return failed
    per_round = [[float(x) for x in str(r.get("latency_samples_ms") or "").split(";") if x] for r in rows]
    timed = [x for samples in per_round for x in samples]
    medians = [statistics.median(x) for x in per_round if x]
    merged = {**first, **quantiles(timed), "timing_rounds": len(rows),
              "round_latency_ms": ";".join(f"{x:.6g}" for x in medians)}
    lengths = [int(x) for x in str(first["kv_lens_used"]).split(",")] if first.get("kv_lens_used") else None
    merged.update(throughput(cell, merged["latency_ms"], s, lengths=lengths))
    return merged


def measure_kernel(impl: Impl, cell: Cell, s: Settings) -> dict[str, Any]:
    """The kernel kind's measurement in the worker: one attention call (measure_cell), or, for a
    distributed implementation, this rank's share of it (ctxbench.measurements.kernel.sharded;
    the whole sequence when the sweep runs without torchrun)."""
    if impl.distributed:
        from ctxbench.measurements.kernel.sharded import measure_sharded_cell

        return measure_sharded_cell(impl, cell, s)
    return measure_cell(impl, cell, s)
