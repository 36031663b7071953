"""Command line: `ctxbench sweep`, `ctxbench passkey`, `ctxbench ruler` (the commands that run
cells, one per ctxbench.core.kinds.Command), `ctxbench list`, `ctxbench report`, `ctxbench
compare` and `ctxbench kv`.

A command that runs cells takes the flags every such command shares
(ctxbench.engine.options.SHARED_FLAGS) and those its measurement kinds declare
(ctxbench.core.kinds.Kind.flags), each declared once as a ctxbench.core.flags.Flag and turned
into a click option here. What click parsed becomes the command's ctxbench.engine.options.Options,
validated once by ctxbench.engine.options.resolve. Every user mistake becomes one line that says
what was wrong and what to do, exit status 2. Heavy modules (torch, rich, pandas) are imported
inside the commands, so `ctxbench --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import click

from ctxbench import __version__
from ctxbench.core import kinds
from ctxbench.core.flags import Flag, UsageError, fail

EXIT_USAGE = 2
TYPES = {int: int, float: float, str: str}


def click_option(flag: Flag) -> Callable[[Callable], Callable]:
    """The click option of a declared flag."""
    kwargs: dict[str, Any] = {"default": flag.default, "help": flag.help or None, "show_default": flag.show_default}
    if flag.is_flag:
        kwargs["is_flag"] = True
    elif flag.choices is not None:
        kwargs["type"] = click.Choice(list(flag.choices))
    else:
        kwargs["type"] = TYPES[flag.type]
    if flag.multiple:
        kwargs["multiple"] = True
        kwargs.pop("default")
    if flag.metavar:
        kwargs["metavar"] = flag.metavar
    return click.option(flag.flag, flag.name, **kwargs)


def with_flags(flags: list[Flag]) -> Callable[[Callable], Callable]:
    """Apply the click options of `flags`, in order (click lists them in --help in that order)."""
    def deco(fn: Callable) -> Callable:
        for flag in reversed(flags):
            fn = click_option(flag)(fn)
        return fn
    return deco


def options_from(command: str) -> Any:
    """The current click command's parameters as the command's Options, with the flags typed on
    the command line."""
    from ctxbench.engine.options import Options

    ctx = click.get_current_context()
    given = {p.name: p.opts[0] for p in ctx.command.params
             if p.name in ctx.params and ctx.get_parameter_source(p.name) is click.core.ParameterSource.COMMANDLINE}
    return Options(command, dict(ctx.params), given)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctxbench")
def cli() -> None:
    """ctxbench: what an attention implementation costs, per context length."""


def add_run_command(command: kinds.Command) -> None:
    """`ctxbench <command>`: the shared flags and its kinds' flags; runs its cells."""
    from ctxbench.engine.options import command_flags

    def run(**_: Any) -> None:
        run_cells(options_from(command.name))

    run.__doc__ = command.help
    cli.command(command.name, help=command.help)(with_flags(command_flags(command.name))(run))


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


def run_cells(o: Any) -> None:
    """Validate, start the executor and run the cells of a command (`ctxbench sweep`, `passkey`,
    `ruler`): o is its ctxbench.engine.options.Options.

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


def start_executor(spec: Any, o: Any) -> Any:
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
                      f"Continue with: ctxbench {spec.command} --resume {run_dir}")
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

    Prints the files written, then each report section's tables as markdown (the pivot and the
    scaling fits of kernel cells, perplexity, passkey, the KV-cache policies...).
    """
    from ctxbench.engine.results import CorruptResults, read_results
    from ctxbench.reports.report import markdown, report

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
    text = markdown(rows)
    if text:
        click.echo("\n" + text)


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
@click.argument("current", required=False)
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
@click.option("--allow-missing", is_flag=True,
              help="a cell of the baseline that the current run lacks is not a regression")
@click.option("--min-common", default="50%", show_default=True,
              help="fewest cells in common, a count or a percentage of the baseline's cells; fewer is an error")
def compare_cmd(baseline: str, current: str | None, max_slowdown: float, max_memory_growth: float,
                min_memory_growth: float, max_ppl_increase: float, max_score_drop: float, normalize_by: str | None,
                statistic: str, alpha: float, allow_missing: bool, min_common: str) -> int:
    """Compare two sweeps (results.csv files or run folders): a markdown table of changes. With one
    run folder, compare within an A/B run: each X@REV (baseline) against X (current).

    Exit status 1 when a regression passes its threshold or a baseline cell is missing, 2 on bad
    input (or fewer cells in common than --min-common), else 0.
    """
    from ctxbench.reports.compare import BadInput, Thresholds, compare_paths

    if min_memory_growth < 0:
        fail(f"--min-memory-growth must be >= 0 MiB (got {min_memory_growth:g})")
    text = min_common.strip()
    try:
        common = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        common = -1.0
    if not (text.endswith("%") and 0 <= common <= 1) and not (not text.endswith("%") and common >= 1
                                                               and common.is_integer()):
        fail(f"--min-common {min_common!r}: give a count of cells (e.g. 10) or a percentage of the baseline's (e.g. 50%)")
    thresholds = Thresholds(max_slowdown=max_slowdown, max_memory_growth=max_memory_growth,
                            max_ppl_increase=max_ppl_increase, max_score_drop=max_score_drop,
                            min_memory_growth_bytes=int(min_memory_growth * 2**20),
                            alpha=alpha, statistic=statistic, allow_missing=allow_missing,
                            min_common=min(common, 0.999999) if text.endswith("%") else common)
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


for _command in kinds.commands().values():
    add_run_command(_command)


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
