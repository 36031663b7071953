"""Command line: `ctxbench sweep` and `ctxbench list`.

The CLI's job is to turn flags into a validated SweepSpec (ctxbench.sweep) and to turn
every user mistake into one line that says what was wrong and what to do, exit status 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import click
from rich.console import Console
from rich.table import Table

from ctxbench import __version__, registry
from ctxbench.measure import Settings
from ctxbench.plan import DTYPE_ALIASES, Cell, Config, powers_of_two
from ctxbench.results import CorruptResults, read_results
from ctxbench.sweep import SweepSpec, print_summary, read_meta, run_sweep

EXIT_USAGE = 2


class UsageError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


def _fail(message: str) -> None:
    raise UsageError(message)


# ---------------------------------------------------------------- validation helpers

def parse_lengths(text: str) -> list[int]:
    """'1024,2048,4096' -> [1024, 2048, 4096]; positive and strictly increasing."""
    try:
        lengths = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        _fail(f"--lengths {text!r} is not a comma-separated list of integers, e.g. --lengths 1024,2048,4096")
    if not lengths:
        _fail("--lengths is empty; give e.g. --lengths 1024,2048,4096")
    if any(n <= 0 for n in lengths):
        _fail(f"--lengths must be positive (got {text}); context lengths are token counts >= 1")
    if any(b <= a for a, b in zip(lengths, lengths[1:])):
        _fail(f"--lengths must be strictly increasing (got {text}); list each length once, shortest first")
    return lengths


def parse_dtype(text: str) -> str:
    key = text.strip().lower().replace("torch.", "")
    if key not in DTYPE_ALIASES:
        _fail(f"unsupported --dtype {text!r}; choose float32, float16 or bfloat16 (or fp32, fp16, bf16)")
    return DTYPE_ALIASES[key]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    import torch

    if device not in registry.DEVICES:
        _fail(f"unsupported --device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda was asked for but torch sees no CUDA device; use --device cpu, "
              "or install a CUDA build of torch on a machine with a GPU")


def check_writable(folder: str) -> None:
    """Create `folder` if needed and prove a file can be written in it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        _fail(f"output folder {folder} is a file, not a folder; pass --out with a folder path")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ctxbench-write-test-"):
            pass
    except OSError as exc:
        _fail(f"cannot write to output folder {folder} ({exc.strerror or exc}); pass --out with a writable folder")


def resolve_impls(names: list[str], specs: list[str], config: Config) -> list[str]:
    """The implementations to sweep: named ones, --impl specs, or every one that supports `config`."""
    try:
        known = registry.all_impls()
        for spec in specs:
            registry.load_spec(spec)
        for name in names:
            registry.get(name)
    except registry.RegistryError as exc:
        _fail(str(exc))
    chosen = list(dict.fromkeys(names + specs))
    if not chosen:
        # Declared capabilities only: a run-time check (e.g. the Triton interpreter's length
        # limit) still yields rows saying why, which is worth seeing.
        probe = Cell.of(config, "", 1)
        chosen = [name for name, impl in known.items() if _declares(impl, probe)]
        if not chosen:
            _fail(f"no registered implementation supports this configuration ({config.device}, {config.dtype}, "
                  f"mask={config.mask}); see `ctxbench list`")
    return chosen


def _declares(impl: registry.Impl, cell: Cell) -> bool:
    return (cell.device in impl.devices and cell.dtype in impl.dtypes and cell.mask in impl.masks
            and cell.mode in impl.modes and (impl.gqa or cell.heads == cell.kv_heads))


def default_memory_limit() -> int:
    """85% of the memory available now: leaves room for the sweep itself and the OS."""
    import psutil

    return int(psutil.virtual_memory().available * 0.85)


def new_run_dir(out: str, config: Config, run_id: str | None) -> str:
    if run_id is None:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{config.device}-{config.mask}-{config.dtype}-{config.mode}"
        run_id = run_id.replace("+", "_")
    path = os.path.join(out, run_id)
    if os.path.exists(os.path.join(path, "results.csv")):
        _fail(f"run {path} already exists; continue it with --resume {path} or choose another --run-id")
    return path


# ---------------------------------------------------------------- commands

@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctxbench")
def cli() -> None:
    """ctxbench: what an attention implementation costs, per context length."""


@cli.command("list")
def list_cmd() -> None:
    """List the registered attention implementations and what each declares."""
    impls = registry.all_impls()
    table = Table(title="attention implementations", title_justify="left")
    for col in ("name", "devices", "dtypes", "masks", "modes", "GQA", "exact", "description"):
        table.add_column(col)
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    for name, impl in sorted(impls.items()):
        table.add_row(name, ",".join(sorted(impl.devices)), ",".join(short[d] for d in registry.DTYPES if d in impl.dtypes),
                      ",".join(m for m in registry.MASKS if m in impl.masks),
                      ",".join(m for m in registry.MODES if m in impl.modes),
                      "yes" if impl.gqa else "no", "yes" if impl.exact else "approx", impl.description)
    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


@cli.command("sweep")
@click.option("--min-len", type=int, default=1024, show_default=True, help="shortest context length (tokens)")
@click.option("--max-len", type=int, default=16384, show_default=True, help="longest context length (tokens)")
@click.option("--lengths", default=None, help="explicit comma-separated lengths instead of powers of two")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--heads", type=int, default=8, show_default=True, help="query heads")
@click.option("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
@click.option("--head-dim", type=int, default=64, show_default=True)
@click.option("--dtype", default=None, help="float32|float16|bfloat16 or fp32|fp16|bf16 (default: bf16 on cuda, fp32 on cpu)")
@click.option("--mask", type=click.Choice(["none", "causal", "window"]), default=None,
              help="default: window when --window is given, else causal")
@click.option("--window", type=int, default=None, help="window W: query i sees keys i-W < j <= i")
@click.option("--mode", type=click.Choice(["fwd", "bwd", "fwd+bwd"]), default="fwd", show_default=True)
@click.option("--device", default=None, help="cpu|cuda (default: cuda when available)")
@click.option("--impls", "impl_names", default=None, help="comma-separated implementation names (default: all that support the configuration)")
@click.option("--impl", "impl_specs", multiple=True, help="extra implementation as package.module:function or file.py:function (repeatable)")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="seconds per cell before its worker is killed")
@click.option("--out", default="results", show_default=True, help="folder for runs")
@click.option("--run-id", default=None, help="name of the run folder (default: time and configuration)")
@click.option("--resume", default=None, metavar="RUN", help="continue the run in folder RUN, skipping finished cells")
@click.option("--memory-limit", type=float, default=None, help="CPU worker memory cap in GiB (default: 85%% of available)")
@click.option("--rep-ms", type=float, default=None, help="time budget of the timed repeats per cell in ms (default: 1000 cpu, 100 cuda)")
@click.option("--check-rows", type=int, default=256, show_default=True, help="query rows checked against the float64 reference")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the random inputs")
@click.option("--allow-interpreter", is_flag=True, help="time interpreted (Triton-on-CPU) implementations at every length")
@click.option("--fresh-worker", is_flag=True, help="a new worker process for every cell (default: one per implementation, replaced after any failure)")
def sweep_cmd(min_len: int, max_len: int, lengths: str | None, batch: int, heads: int, kv_heads: int | None,
              head_dim: int, dtype: str | None, mask: str | None, window: int | None, mode: str, device: str | None,
              impl_names: str | None, impl_specs: tuple[str, ...], timeout: float, out: str, run_id: str | None,
              resume: str | None, memory_limit: float | None, rep_ms: float | None, check_rows: int, seed: int,
              allow_interpreter: bool, fresh_worker: bool) -> None:
    """Sweep implementations x context lengths for one configuration; writes results.csv."""
    console = Console(stderr=False)
    if resume is not None:
        spec, run_dir = load_resume(resume, out)
        check_device(spec.config.device)
        resolve_impls([n for n in spec.impls if ":" not in n], [n for n in spec.impls if ":" in n], spec.config)
    else:
        spec = build_spec(min_len, max_len, lengths, batch, heads, kv_heads, head_dim, dtype, mask, window, mode,
                          device, impl_names, impl_specs, timeout, memory_limit, rep_ms, check_rows, seed,
                          allow_interpreter, fresh_worker)
        check_writable(out)
        run_dir = new_run_dir(out, spec.config, run_id)
        os.makedirs(run_dir, exist_ok=True)
    c = spec.config
    console.print(f"[bold]ctxbench sweep[/] {c.device} {c.dtype} B={c.batch} Hq={c.heads} Hkv={c.kv_heads} "
                  f"D={c.head_dim} mask={c.mask}{f' W={c.window}' if c.mask == 'window' else ''} mode={c.mode}; "
                  f"impls: {', '.join(spec.impls)}; N: {', '.join(map(str, spec.lengths))}")
    console.print(f"run folder: {run_dir}")
    try:
        rows = run_sweep(spec, run_dir, console=console, argv=sys.argv)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted; finished cells are in {run_dir}/results.csv. "
                      f"Continue with: ctxbench sweep --resume {run_dir}")
        sys.exit(130)
    print_summary(rows, run_dir, console)


def build_spec(min_len: int, max_len: int, lengths: str | None, batch: int, heads: int, kv_heads: int | None,
               head_dim: int, dtype: str | None, mask: str | None, window: int | None, mode: str,
               device: str | None, impl_names: str | None, impl_specs: tuple[str, ...], timeout: float,
               memory_limit: float | None, rep_ms: float | None, check_rows: int, seed: int,
               allow_interpreter: bool, fresh_worker: bool = False) -> SweepSpec:
    """Validate the sweep flags (UsageError on the first problem) and build the spec."""
    if lengths is not None:
        ns = parse_lengths(lengths)
    else:
        if min_len <= 0 or max_len <= 0:
            _fail(f"--min-len and --max-len must be positive (got {min_len} and {max_len})")
        if max_len < min_len:
            _fail(f"--max-len {max_len} is below --min-len {min_len}; lengths must increase")
        ns = powers_of_two(min_len, max_len)
    for flag, value in (("--batch", batch), ("--heads", heads), ("--head-dim", head_dim)):
        if value <= 0:
            _fail(f"{flag} must be a positive integer (got {value})")
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads <= 0:
        _fail(f"--kv-heads must be a positive integer (got {kv_heads})")
    if heads % kv_heads:
        _fail(f"--heads {heads} is not divisible by --kv-heads {kv_heads}; grouped-query attention needs "
              "heads to be a multiple of kv-heads")
    if window is not None and window < 1:
        _fail(f"--window must be at least 1 (got {window}); a window of W keys includes the query itself")
    if mask is None:
        mask = "window" if window is not None else "causal"
    if mask == "window" and window is None:
        _fail("--mask window needs --window W (the number of keys each query sees)")
    if mask != "window" and window is not None:
        _fail(f"--window was given with --mask {mask}; use --mask window (or drop --mask) to sweep a window")
    if timeout <= 0:
        _fail(f"--timeout must be positive seconds (got {timeout:g})")
    if check_rows < 2:
        _fail(f"--check-rows must be at least 2 (got {check_rows})")
    if memory_limit is not None and memory_limit <= 0:
        _fail(f"--memory-limit must be positive GiB (got {memory_limit:g})")
    device = device or default_device()
    check_device(device)
    dtype = parse_dtype(dtype) if dtype else ("bfloat16" if device == "cuda" else "float32")
    config = Config(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, mask=mask,
                    window=window if mask == "window" else None, mode=mode, device=device,
                    allow_interpreter=allow_interpreter)
    names = [n.strip() for n in impl_names.split(",") if n.strip()] if impl_names else []
    impls = resolve_impls(names, list(impl_specs), config)
    if rep_ms is None:
        rep_ms = 100.0 if device == "cuda" else 1000.0
    settings = Settings(rep_ms=rep_ms, warmup_ms=25.0 if device == "cuda" else 100.0, check_rows=check_rows,
                        seed=seed)
    limit = int(memory_limit * 2**30) if memory_limit is not None else default_memory_limit()
    return SweepSpec(config=config, impls=impls, lengths=ns, timeout_s=timeout, memory_limit_bytes=limit,
                     settings=settings, reuse_workers=not fresh_worker)


def load_resume(resume: str, out: str) -> tuple[SweepSpec, str]:
    """The spec and folder of the run to continue (a folder path, or a run id under --out)."""
    run_dir = resume if os.path.isdir(resume) else os.path.join(out, resume)
    if not os.path.isdir(run_dir):
        _fail(f"--resume {resume}: no such run folder; give the folder printed when the run started")
    if not os.path.exists(os.path.join(run_dir, "meta.json")):
        _fail(f"--resume {resume}: {run_dir} has no meta.json, so it is not a ctxbench run folder")
    try:
        spec = SweepSpec.from_json(read_meta(run_dir)["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _fail(f"--resume {resume}: meta.json is unreadable ({type(exc).__name__}: {exc}); start a new run")
    csv_path = os.path.join(run_dir, "results.csv")
    if os.path.exists(csv_path):
        try:
            read_results(csv_path, repair_tail=False)
        except CorruptResults as exc:
            if "last line is incomplete" not in str(exc):
                _fail(f"--resume {resume}: {exc}; fix or delete that line, then resume")
    check_writable(run_dir)
    return spec, run_dir


def main(argv: list[str] | None = None) -> None:
    """Entry point: click without its multi-line error screens; usage errors exit 2 in one line."""
    try:
        cli.main(args=argv, prog_name="ctxbench", standalone_mode=False)
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
    sys.exit(0)
