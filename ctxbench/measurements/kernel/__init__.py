"""The kernel kind: one attention call of an implementation on random inputs (`ctxbench sweep`).

Declares the `sweep` command (kernel cells, then the perplexity and decode kinds, which join
it) and the kind: its flags (the attention's shape, mask and mode, decode and serving shapes,
the timing budget), its fields (query_len, the KV layout), its columns, its
plan and how a worker measures a cell (ctxbench.measurements.kernel.measure; sharded.py for
one rank of a distributed implementation). The report section is report.py.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ctxbench.core.flags import Flag, fail
from ctxbench.core.kinds import Command, Field, Kind, register_command, register_kind
from ctxbench.measurements.flags import MASK, SINKS, WINDOW

SWEEP_MAX_LEN = 16384

register_command(Command(
    name="sweep", max_len={"cpu": SWEEP_MAX_LEN, "cuda": SWEEP_MAX_LEN},
    help="Sweep implementations x context lengths for one configuration; writes results.csv."))

FLAGS: tuple[Flag, ...] = (
    Flag("query_len", "--query-len", None, int, "query tokens per sequence against N keys, aligned to the last keys "
         "(1: decode; default: N, prefill)"),
    Flag("ragged", "--ragged", False, bool, "ragged batch: each sequence's KV length drawn with the seed in [N/8, N]",
         is_flag=True),
    Flag("kv_lens", "--kv-lens", None, str, "KV lengths of the batch's sequences, e.g. 1000,70000 (tokens, one per "
         "--batch)"),
    Flag("page_size", "--page-size", None, int, "paged KV cache: tokens per page, pages in a shuffled order (e.g. 16)"),
    Flag("cuda_graph", "--cuda-graph", "on", str, "CUDA decode cells (--query-len): time CUDA-graph replays, or each "
         "launch", choices=("on", "off"), show_default=True),
    Flag("batch", "--batch", 1, int, show_default=True),
    Flag("heads", "--heads", 8, int, "query heads", show_default=True),
    Flag("kv_heads", "--kv-heads", None, int, "key/value heads (default: --heads)"),
    Flag("head_dim", "--head-dim", 64, int, show_default=True),
    MASK, WINDOW,
    Flag("mode", "--mode", "fwd", str, choices=("fwd", "bwd", "fwd+bwd"), show_default=True),
    Flag("rep_ms", "--rep-ms", None, float, "time budget of the timed repeats per cell in ms (default: 1000 cpu, "
         "100 cuda)"),
    Flag("check_rows", "--check-rows", 256, int, "query rows checked against the float64 reference",
         show_default=True),
    SINKS,
)

# Rough throughput for progress weights only; the ETA adapts to measured speed.
ROUGH_FLOPS_PER_S = {"cpu": 5e10, "cuda": 2e14}
ROUGH_BYTES_PER_S = {"cpu": 5e9, "cuda": 2e12}


@dataclass(frozen=True)
class KernelPlan:
    """The kernel cells of a sweep: each implementation at each length, with the decode and serving
    shape every cell shares (Lq, the KV layout) and whether interpreted kernels run everywhere."""

    impls: list[str]
    # Query tokens per sequence against n keys (decode: 1; chunked prefill: a few hundred);
    # None: as many as keys (prefill, the square Lq = Lk). The queries are the last tokens.
    query_len: int | None = None
    # Ragged batches and paged caches (ctxbench.core.kv_layout): KV lengths drawn per sequence with
    # the seed (ragged), or given ("1000,70000": tokens, one per sequence); K and V in pages of
    # page_size tokens. None / False: every sequence has n keys, stored contiguously.
    ragged: bool = False
    kv_lens: str | None = None
    page_size: int | None = None

    def fields(self) -> dict[str, Any]:
        return {"query_len": self.query_len, "ragged": self.ragged, "kv_lens": self.kv_lens,
                "page_size": self.page_size}

    def cells(self, config: Any, n: int) -> list[Any]:
        from ctxbench.core.cell import Cell

        return [Cell.of(config, impl, n, "kernel", **self.fields()) for impl in self.impls]


def parse_kv_lens(o: Any) -> list[int]:
    """--kv-lens '1000,70000' -> [1000, 70000] (tokens): one per sequence of --batch, each at
    least --query-len and at most --max-len; it fixes the lengths, so --lengths and --min-len
    are refused beside it (--max-len, when given, is the padded cache length)."""
    text = o.kv_lens or ""
    try:
        lens = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(f"--kv-lens {text!r} is not a comma-separated list of integers, e.g. --kv-lens 1000,70000")
    if len(lens) != o.batch:
        fail(f"--kv-lens gives {len(lens)} lengths for --batch {o.batch}; give one KV length per sequence")
    low = max(1, o.query_len or 1)
    if min(lens) < low:
        fail(f"--kv-lens {text}: every KV length must be at least {low} (the query length, tokens)")
    if o.max_len is not None and max(lens) > o.max_len:
        fail(f"--kv-lens {text}: {max(lens)} is above --max-len {o.max_len}; raise --max-len or shorten the lengths")
    if o.lengths is not None or "min_len" in o.given:
        fail("--kv-lens fixes the KV lengths, so --lengths and --min-len don't apply; give --max-len for the padded "
             "cache length, or drop --kv-lens")
    return lens


@register_kind
class KernelKind(Kind):
    """One attention call: latency, TFLOP/s, GB/s, peak memory and the error against float64."""

    name = "kernel"
    command = "sweep"
    flags = FLAGS
    fields = (Field("query_len", numeric=True), Field("ragged", "False"), Field("kv_lens"),
              Field("page_size", numeric=True))
    columns = (
        "latency_ms", "latency_p20_ms", "latency_p80_ms", "latency_min_ms", "repeats",  # ms; timed calls
        "latency_samples_ms",                              # every timed call, ms, ';'-separated (ctxbench compare)
        "timing_method",                                   # perf_counter, cuda_events or cuda_graph (replays)
        "timing_rounds",                                   # rounds the repeats ran in (A/B: interleaved with X@REV)
        "round_latency_ms",                                # A/B: each round's median, ms, ';'-separated, in order
        "ab_pair",                                         # A/B: an id both sides' rows share (their rounds pair)
        "setup_ms", "setup_mem_bytes",                     # the setup step, once per cell: ms; bytes it keeps
        "first_call_ms",                                   # ms; compilation and autotuning happen in it
        "flops", "tflops", "peak_fraction",                # FLOPs of one call; TFLOP/s at the median
        # forward cells: the minimum traffic of one call (bytes: Q, the K and V some query sees, O),
        # GB/s at the median and its fraction of the device bandwidth; that bandwidth (GB/s), what
        # the run's probe measured (GB/s) and where the bandwidth comes from (ctxbench.engine.bandwidth)
        "bytes_moved", "gbps", "bw_fraction", "device_bw_gbps", "device_bw_probe_gbps", "device_bw_source",
        "kv_lens_used",                                    # ragged or paged cells: KV tokens per sequence
        "peak_mem_bytes", "mem_method",                    # bytes above the inputs; how it was read
        "err_rel_l2", "err_max_abs", "err_rows", "err_tolerance", "grad_err_rel_l2",
        "impl_info",                                       # JSON the implementation reports (config chosen, ...)
        # distributed implementations (sharded.py): ranks, each rank's peak memory (JSON list,
        # bytes; peak_mem_bytes is the largest), and the share of a call's time spent waiting for
        # communication (mean over ranks and timed calls)
        "world_size", "peak_mem_rank_bytes", "comm_fraction",
    )
    text_columns = ("latency_samples_ms", "round_latency_ms", "ab_pair", "timing_method", "device_bw_source", "kv_lens_used", "mem_method",
                    "impl_info", "peak_mem_rank_bytes")
    uses_bandwidth = True
    oldest = True  # the first ctxbench measured nothing else
    measurement = "ctxbench.measurements.kernel.measure:measure_kernel"
    measurement_more = "ctxbench.measurements.kernel.measure:measure_more"
    report = "ctxbench.measurements.kernel.report:SECTION"

    def validate(self, o: Any) -> None:
        for flag, value in (("--batch", o.batch), ("--heads", o.heads), ("--head-dim", o.head_dim)):
            if value <= 0:
                fail(f"{flag} must be a positive integer (got {value})")
        kv_heads = o.heads if o.kv_heads is None else o.kv_heads
        if kv_heads <= 0:
            fail(f"--kv-heads must be a positive integer (got {kv_heads})")
        if o.heads % kv_heads:
            fail(f"--heads {o.heads} is not divisible by --kv-heads {kv_heads}; grouped-query attention needs "
                 "heads to be a multiple of kv-heads")
        if o.check_rows < 2:
            fail(f"--check-rows must be at least 2 (got {o.check_rows})")
        if o.rep_ms is not None and o.rep_ms <= 0:
            fail(f"--rep-ms must be positive milliseconds (got {o.rep_ms:g})")
        if o.page_size is not None and o.page_size <= 0:
            fail(f"--page-size must be a positive integer number of tokens per page (got {o.page_size}), e.g. 16")
        if (o.ragged or o.kv_lens is not None or o.page_size is not None) and o.mode != "fwd":
            fail(f"--ragged, --kv-lens and --page-size describe a KV cache, which is measured forward only; drop "
                 f"--mode {o.mode} or them")
        if o.ragged and o.kv_lens is not None:
            fail("--ragged draws the KV lengths, --kv-lens gives them: give one of them")
        if o.query_len is not None and o.query_len <= 0:
            fail(f"--query-len must be a positive number of query tokens (got {o.query_len}); 1 is decode")

    def lengths(self, o: Any) -> list[int] | None:
        if o.kv_lens is None:
            return None
        # the lengths are given: one cell length, the padded cache's
        return [o.max_len if o.max_len is not None else max(parse_kv_lens(o))]

    def settings(self, o: Any, device: str) -> dict[str, Any]:
        given = {} if o.rep_ms is None else {"rep_ms": o.rep_ms}  # else the device's (settings_of)
        return {**given, "check_rows": o.check_rows, "cuda_graph": o.cuda_graph == "on"}

    def default_impls(self, context: Any) -> list[str]:
        """Every implementation that declares support for the configuration and is in the default
        sweep of its device (distributed ones only under torchrun, where they run alone)."""
        from ctxbench.core import registry
        from ctxbench.core.cell import Cell

        o, config = context.options, context.config
        # Declared capabilities only: a run-time check (e.g. the Triton interpreter's length
        # limit) still yields rows saying why, which is worth seeing. The probe has the sweep's
        # shape: more keys than queries when Lq is set, else a square of a typical length (a decode
        # kernel's query-length limit leaves it out of a prefill sweep).
        probe = Cell.of(config, "", o.query_len + 1 if o.query_len else 1024, self.name, query_len=o.query_len,
                        ragged=o.ragged, kv_lens=o.kv_lens)
        chosen = [name for name, impl in registry.all_impls().items()
                  if impl.declared_reason(probe) is None and impl.distributed == (context.world > 1)
                  and impl.in_default_sweep(config.device)]
        if not chosen:
            fail(f"no registered implementation supports this configuration ({config.device}, {config.dtype}, "
                 f"mask={config.mask}); see `ctxbench list`")
        return chosen

    def plan(self, context: Any) -> KernelPlan:
        o = context.options
        if o.query_len is not None and o.query_len > context.lengths[0]:
            fail(f"--query-len {o.query_len} is above the KV length {context.lengths[0]} (the shortest of the sweep); "
                 f"the queries are the last tokens of each sequence: raise --min-len (or --lengths) to at least "
                 f"{o.query_len}")
        kv_lens = None if o.kv_lens is None else ",".join(map(str, parse_kv_lens(o)))
        return KernelPlan(impls=list(context.impls), query_len=o.query_len, ragged=o.ragged, kv_lens=kv_lens,
                          page_size=o.page_size)

    def plan_from_json(self, data: dict[str, Any]) -> KernelPlan:
        return KernelPlan(**data)

    def plan_from_legacy(self, spec: dict[str, Any]) -> KernelPlan | None:
        if not spec.get("impls"):
            return None
        config = spec["config"]
        return KernelPlan(impls=list(spec["impls"]), query_len=config.get("query_len"),
                          ragged=config.get("ragged", False), kv_lens=config.get("kv_lens"),
                          page_size=config.get("page_size"))

    def extend(self, plan: KernelPlan, names: list[str], added: list[str]) -> KernelPlan:
        return replace(plan, impls=list(names))

    def describe(self, plan: KernelPlan | None, spec: Any) -> list[str]:
        if plan is None:
            return []
        c = spec.config
        shape = (f"{c.device} {c.dtype} B={c.batch} Hq={c.heads} Hkv={c.kv_heads} D={c.head_dim} "
                 f"{f'Lq={plan.query_len} ' if plan.query_len is not None else ''}"
                 f"mask={c.mask}{f' W={c.window}' if c.mask == 'window' else ''}"
                 f"{f' sinks={c.sinks}' if c.attn_sinks else ''} mode={c.mode}")
        return [f"[bold]ctxbench sweep[/] {shape}; impls: {', '.join(plan.impls)}; "
                f"N: {', '.join(map(str, spec.lengths))}"]

    def weight(self, cell: Any, settings: Any) -> float:
        from ctxbench.core.flops import attention_bytes, attention_flops

        mask = cell.attention_mask
        flops = attention_flops(cell.batch, cell.heads, cell.q_len, cell.head_dim, mask, cell.mode, n_k=cell.n)
        moved = attention_bytes(cell.batch, cell.heads, cell.kv_heads, cell.q_len, cell.n, cell.head_dim, mask,
                                cell.dtype)
        # decode is bound by bytes, prefill by FLOPs; making the inputs costs about as much again
        seconds = max(flops / ROUGH_FLOPS_PER_S.get(cell.device, 5e10),
                      moved / ROUGH_BYTES_PER_S.get(cell.device, 5e9))
        return self.worker_start_s + settings.rep_ms / 1e3 + 5 * seconds

    def merge_rounds(self, cell: Any, rows: list[dict[str, Any]], settings: Any) -> dict[str, Any]:
        from ctxbench.measurements.kernel.measure import merge_rounds

        return merge_rounds(cell, rows, settings)

    def label(self, cell: Any) -> str:
        query_len = cell.get("query_len")
        if query_len is not None:
            return f"{cell.impl} Lq={query_len} N={cell.n}"
        return f"{cell.impl} N={cell.n}"
