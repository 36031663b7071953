"""The options of `ctxbench sweep`, `ctxbench passkey` and `ctxbench ruler`, as one dataclass,
validated once.

The CLI (ctxbench.cli) declares each flag once with click and turns what it parsed into an
`Options`; `resolve(options)` turns that into the validated SweepSpec and run folder, for a
new run or a resumed one. Every user mistake is a `UsageError`: one line that says what was
wrong and what to do (the CLI prints it and exits 2). Nothing here imports torch at module
level, so `ctxbench --help` stays fast.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ctxbench.core.masks import Mask
from ctxbench.engine.plan import (DTYPE_ALIASES, Cell, Config, DecodePlan, PerplexityPlan, Settings, SweepSpec,
                           parse_budgets, powers_of_two)

# Perplexity defaults. CPU: the default model's fp32 forward pass runs at a few hundred
# tokens/s on 2 cores, so perplexity at 1024 and 2048 with 2048 tokens scored per cell keeps
# the default sweep (kernel cells included) inside 15 minutes. CUDA: up to the sweep's usual
# 32768 (beyond the default model's trained 8192, where RoPE variants matter) and 32768
# tokens per cell (one window at 32K, 32 at 1K): seconds per cell on a GPU.
PPL_MAX_LEN = {"cpu": 2048, "cuda": 32768}
PPL_TOKENS = {"cpu": 2048, "cuda": 32768}
# Longest passkey prompt by default (tokens): one forward pass of the default model each.
PASSKEY_MAX_LEN = {"cpu": 4096, "cuda": 32768}
# Longest ruler prompt by default (tokens): a prefill and a few dozen decode steps per prompt,
# then one compression and answer per (policy, budget).
RULER_MAX_LEN = {"cpu": 4096, "cuda": 32768}
SWEEP_MAX_LEN = 16384
TASKS = ("sweep", "passkey", "ruler")
# Needle depths by default (fractions of the haystack): passkey sweeps them; ruler measures the
# middle, where a compressed cache is tested hardest, unless asked for more.
DEPTHS = {"passkey": "0,0.25,0.5,0.75,1", "ruler": "0.5"}


class UsageError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2."""


def fail(message: str) -> None:
    raise UsageError(message)


@dataclass
class Options:
    """Every flag of `ctxbench sweep` / `passkey` / `ruler`; None where a flag was not given and
    its default depends on the device or the command. These defaults are the CLI's too
    (ctxbench.cli declares each flag with the default of its field here).

    `command` says which command built it ("sweep": kernel and perplexity cells; "passkey":
    passkey cells only; "ruler": retrieval and continuation cells under KV-cache policies).
    `given` maps the fields typed on the command line to their flag ("impl_names": "--impls"),
    which decides what `--resume` may take (`resolve_resume`).
    """

    command: str = "sweep"
    min_len: int = 1024                 # tokens
    max_len: int | None = None          # tokens (sweep: SWEEP_MAX_LEN; passkey, ruler: *_MAX_LEN)
    lengths: str | None = None          # "1024,2048": tokens, instead of powers of two
    batch: int = 1
    query_len: int | None = None        # query tokens against n keys (None: n, prefill; 1: decode)
    ragged: bool = False                # KV lengths drawn per sequence in [n/8, n]
    kv_lens: str | None = None          # "1000,70000": KV tokens per sequence (one per --batch)
    page_size: int | None = None        # tokens per page of a paged KV cache
    cuda_graph: str = "on"              # CUDA decode cells: time graph replays ("on") or launches ("off")
    heads: int = 8                      # query heads
    kv_heads: int | None = None         # key/value heads (None: = heads)
    head_dim: int = 64
    dtype: str | None = None            # None: bfloat16 on CUDA, float32 on the CPU
    mask: str | None = None             # None: window when a window is given, else causal
    window: int | None = None           # W keys per query, itself included
    sinks: int = 0                      # first S keys visible beside a window
    mode: str = "fwd"
    device: str | None = None           # None: cuda when torch sees one
    impl_names: str | None = None       # "a,b": registered names
    impl_specs: tuple[str, ...] = ()    # package.module:function or file.py:function
    timeout: float = 600.0              # s per cell
    out: str = "results"                # folder of runs
    run_id: str | None = None
    resume: str | None = None           # a run folder, or a run id under `out`
    memory_limit: float | None = None   # GiB per worker (None: 85% of available)
    rep_ms: float | None = None         # ms of timed repeats per cell (None: 1000 CPU, 100 CUDA)
    check_rows: int = 256               # query rows checked against float64
    seed: int = 0
    allow_interpreter: bool = False
    fresh_worker: bool = False
    ppl_max_len: int | None = None      # tokens (None: PPL_MAX_LEN; 0: no perplexity)
    ppl_tokens: int | None = None       # tokens scored per cell (None: PPL_TOKENS)
    ppl_scheme: str = "truncated"
    ppl_stride: int = 256               # tokens scored at the end of each strided window
    decode_max_len: int = 0             # decode cells (a model prefill + greedy tokens) up to this length
    decode_tokens: int = 16             # greedy tokens per decode cell
    model_path: str | None = None       # None: the embedded default model
    text_path: str | None = None        # None: the default corpus
    rope: str = "default"               # "default,yarn:4"
    depths: str | None = None           # needle depths, fractions of the haystack (None: DEPTHS[command])
    trials: int = 1                     # passkey keys / ruler prompts per (task, length, depth)
    ruler_tasks: str = "all"            # ruler: RULER tasks (ctxbench.measurements.ruler.prompts.TASKS)
    policies: str = "all"               # ruler: KV-cache policies (ctxbench.measurements.ruler.policies.POLICIES)
    kv_budget: str = "0.25,0.5"         # ruler: tokens kept ("512") or ratios of the context ("0.25")
    haystack: str = "corpus"            # ruler: "corpus" (--text) or "filler" (repeated sentences)
    continuation_tokens: int = 256      # ruler: tokens scored after the compressed context (0: none)
    executor: str = "local"
    address: str | None = None          # Ray cluster address
    given: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_click(cls, command: str, params: dict[str, Any], given: dict[str, str]) -> "Options":
        """From click's parsed parameters (names as the command's function takes them) and
        the typed ones with their flags."""
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:  # a flag declared in the CLI but not here: a bug, not a user error
            raise TypeError(f"Options has no field for {sorted(unknown)}")
        values = {k: (tuple(v) if k == "impl_specs" else v) for k, v in params.items()}
        return cls(command=command, given=dict(given), **values)


def default(name: str) -> Any:
    """The default of an Options field (what the CLI's flag defaults to)."""
    f = Options.__dataclass_fields__[name]
    return f.default


# What --resume may take: flags that extend a run or say where it runs, without changing what
# a finished cell means.
RESUMABLE = {"resume", "out", "timeout", "executor", "address", "lengths", "min_len", "max_len", "impl_names",
             "impl_specs"}


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


def parse_kv_lens(o: Options) -> list[int]:
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


def parse_ropes(text: str) -> list[str]:
    """'default,yarn:4' -> canonical RoPE variants, each once; UsageError for an unknown one."""
    from ctxbench.models import lm

    items = [t for t in (x.strip() for x in text.split(",")) if t]
    if not items:
        fail("--rope is empty; give e.g. --rope default or --rope default,linear:4,dynamic:4,yarn:4")
    try:
        return list(dict.fromkeys(lm.parse_rope(t) for t in items))
    except lm.ModelError as exc:
        fail(str(exc))


def impl_names(o: Options) -> list[str]:
    return [n.strip() for n in o.impl_names.split(",") if n.strip()] if o.impl_names else []


def validate_impls(names: list[str], specs: list[str]) -> list[str]:
    """Names and --impl specs, each checked to resolve (UsageError naming the problem), in order."""
    from ctxbench.core import registry

    try:
        for spec in specs:
            registry.load_spec(spec)
        for name in names:
            registry.get(name)
    except registry.RegistryError as exc:
        fail(str(exc))
    return list(dict.fromkeys(names + specs))


def resolve_impls(names: list[str], specs: list[str], config: Config, world: int = 1) -> list[str]:
    """The implementations to sweep: named ones, --impl specs, or every one that declares
    support for `config` and is in the default sweep of its device (distributed ones only
    under torchrun, where they run alone)."""
    from ctxbench.core import registry

    chosen = validate_impls(names, specs)
    if not chosen:
        # Declared capabilities only: a run-time check (e.g. the Triton interpreter's length
        # limit) still yields rows saying why, which is worth seeing.
        # a cell of the sweep's shape: more keys than queries when Lq is set, else a square of a
        # typical length (a decode kernel's query-length limit leaves it out of a prefill sweep)
        probe = Cell.of(config, "", config.query_len + 1 if config.query_len else 1024)
        chosen = [name for name, impl in registry.all_impls().items()
                  if impl.declared_reason(probe) is None and impl.distributed == (world > 1)
                  and impl.in_default_sweep(config.device)]
        if not chosen:
            fail(f"no registered implementation supports this configuration ({config.device}, {config.dtype}, "
                 f"mask={config.mask}); see `ctxbench list`")
    return chosen


# ---------------------------------------------------------------- the configuration

def mask_of(o: Options, allowed: tuple[str, ...] = ("none", "causal", "window")) -> tuple[str, int | None, int]:
    """(mask, window, sinks) from --mask, --window and --sinks; the mask rules themselves are
    ctxbench.core.masks.Mask's (only the flag default is the CLI's: --window alone means --mask window)."""
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


def check_numbers(o: Options) -> None:
    for flag, value in (("--batch", o.batch), ("--heads", o.heads), ("--head-dim", o.head_dim)):
        if value <= 0:
            fail(f"{flag} must be a positive integer (got {value})")
    kv_heads = o.heads if o.kv_heads is None else o.kv_heads
    if kv_heads <= 0:
        fail(f"--kv-heads must be a positive integer (got {kv_heads})")
    if o.heads % kv_heads:
        fail(f"--heads {o.heads} is not divisible by --kv-heads {kv_heads}; grouped-query attention needs "
             "heads to be a multiple of kv-heads")
    if o.timeout <= 0:
        fail(f"--timeout must be positive seconds (got {o.timeout:g})")
    if o.check_rows < 2:
        fail(f"--check-rows must be at least 2 (got {o.check_rows})")
    if o.memory_limit is not None and o.memory_limit <= 0:
        fail(f"--memory-limit must be positive GiB (got {o.memory_limit:g})")
    if o.rep_ms is not None and o.rep_ms <= 0:
        fail(f"--rep-ms must be positive milliseconds (got {o.rep_ms:g})")
    for flag, value in (("--ppl-max-len", o.ppl_max_len), ("--ppl-tokens", o.ppl_tokens),
                        ("--ppl-stride", o.ppl_stride)):
        if value is not None and (value < 0 or (value == 0 and flag != "--ppl-max-len")):
            fail(f"{flag} must be a positive integer (got {value})"
                 + (" or 0 for no perplexity" if flag == "--ppl-max-len" else ""))
    if o.page_size is not None and o.page_size <= 0:
        fail(f"--page-size must be a positive integer number of tokens per page (got {o.page_size}), e.g. 16")
    if (o.ragged or o.kv_lens is not None or o.page_size is not None) and o.mode != "fwd":
        fail(f"--ragged, --kv-lens and --page-size describe a KV cache, which is measured forward only; drop "
             f"--mode {o.mode} or them")
    if o.ragged and o.kv_lens is not None:
        fail("--ragged draws the KV lengths, --kv-lens gives them: give one of them")
    if o.query_len is not None and o.query_len <= 0:
        fail(f"--query-len must be a positive number of query tokens (got {o.query_len}); 1 is decode")
    if o.decode_max_len < 0:
        fail(f"--decode-max-len must be >= 0 tokens (got {o.decode_max_len}); 0 plans no decode cells")
    if o.decode_tokens < 2:
        fail(f"--decode-tokens must be at least 2 (got {o.decode_tokens}): the first token comes from the prefill")
    if o.address is not None and o.executor != "ray":
        fail("--address is the Ray cluster's address; it needs --executor ray")


def settings_of(o: Options, device: str, ppl_tokens: int) -> Settings:
    rep_ms = o.rep_ms if o.rep_ms is not None else (100.0 if device == "cuda" else 1000.0)
    return Settings(rep_ms=rep_ms, warmup_ms=25.0 if device == "cuda" else 100.0, check_rows=o.check_rows,
                    cuda_graph=o.cuda_graph == "on",
                    seed=o.seed, model=os.path.abspath(o.model_path) if o.model_path else "",
                    text=os.path.abspath(o.text_path) if o.text_path else "", ppl_tokens=ppl_tokens,
                    ppl_stride=o.ppl_stride, decode_tokens=o.decode_tokens, haystack=o.haystack,
                    continuation_tokens=o.continuation_tokens)


def build_spec(o: Options, world: int = 1) -> SweepSpec:
    """Validate the options of a new run (UsageError on the first problem) and build its spec."""
    from ctxbench.engine.executor import default_memory_limit

    check_numbers(o)
    passkey = o.command == "passkey"
    model_only = o.command in ("passkey", "ruler")  # a model's cells, no kernel cells
    mask, window, sinks = mask_of(o, ("causal", "window") if model_only else ("none", "causal", "window"))
    ropes = parse_ropes(o.rope)
    device = o.device or default_device()
    check_device(device)
    dtype = parse_dtype(o.dtype) if o.dtype else ("bfloat16" if device == "cuda" else "float32")
    kv_lens = parse_kv_lens(o) if o.kv_lens is not None else None
    if kv_lens is not None:  # the lengths are given: one cell length, the padded cache's
        lengths = [o.max_len if o.max_len is not None else max(kv_lens)]
    else:
        lengths = lengths_of(o, default_max_len(o.command, device))
    if o.query_len is not None and o.query_len > lengths[0]:
        fail(f"--query-len {o.query_len} is above the KV length {lengths[0]} (the shortest of the sweep); the "
             f"queries are the last tokens of each sequence: raise --min-len (or --lengths) to at least {o.query_len}")
    config = Config(batch=o.batch, query_len=o.query_len, ragged=o.ragged, page_size=o.page_size,
                    kv_lens=None if kv_lens is None else ",".join(map(str, kv_lens)), heads=o.heads, kv_heads=o.heads if o.kv_heads is None else o.kv_heads,
                    head_dim=o.head_dim, dtype=dtype, mask=mask, window=window, mode=o.mode, device=device,
                    allow_interpreter=o.allow_interpreter, sinks=sinks, ppl_scheme=o.ppl_scheme)
    names = impl_names(o)
    ppl_tokens = PPL_TOKENS[device] if o.ppl_tokens is None else o.ppl_tokens
    limit = int(o.memory_limit * 2**30) if o.memory_limit is not None else default_memory_limit()
    spec = SweepSpec(config=config, impls=[], lengths=lengths, timeout_s=o.timeout, memory_limit_bytes=limit,
                     settings=settings_of(o, device, ppl_tokens), reuse_workers=not o.fresh_worker,
                     memory_limit_auto=o.memory_limit is None)
    if model_only:
        impls = validate_impls(names or ["sdpa"], list(o.impl_specs))  # --impl adds to the default sdpa
        if passkey:
            return replace(spec, passkey=passkey_plan(o, config, impls, lengths, ropes))
        return replace(spec, ruler=ruler_plan(o, config, impls, lengths))
    impls = resolve_impls(names, list(o.impl_specs), config, world)
    # Perplexity measures the model's prefill: a decode sweep (--query-len) has none unless asked.
    ppl_max_len = (0 if o.query_len is not None else PPL_MAX_LEN[device]) if o.ppl_max_len is None else o.ppl_max_len
    ppl = perplexity_plan(config, impls, explicit=bool(names or o.impl_specs), lengths=lengths,
                          max_len=ppl_max_len, ropes=ropes, model_path=o.model_path, text_path=o.text_path)
    decode = decode_plan(config, impls, lengths, o.decode_max_len, o.model_path)
    return replace(spec, impls=impls, ppl=ppl, decode=decode)


def decode_plan(config: Config, impls: list[str], lengths: list[int], max_len: int,
                model_path: str | None) -> DecodePlan | None:
    """The sweep's decode cells (ctxbench.measurements.decode.measure): the swept implementations that declare
    kv_cache=True, at the lengths up to max_len (None when there are none); the model must be
    there (UsageError naming the fix when not)."""
    from ctxbench.models import lm
    from ctxbench.core import registry

    if max_len == 0 or config.mask == "none" or not any(n <= max_len for n in lengths):
        return None
    chosen = [n for n in impls if registry.resolve(n).kv_cache and not registry.resolve(n).distributed]
    if not chosen:
        fail(f"--decode-max-len {max_len}: none of {', '.join(impls)} takes a KV cache (kv_cache=True); add e.g. "
             "--impls sdpa,chunked")
    try:
        ref = lm.resolve_model(model_path)
        lm.check_dependencies(ref)
        heads, kv_heads, head_dim = lm.model_shape(lm.load_config(ref))
    except lm.ModelError as exc:
        fail(str(exc))
    dtype = "float32" if config.device == "cpu" else config.dtype
    return DecodePlan(max_len=max_len, impls=chosen, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)


def perplexity_plan(config: Config, impls: list[str], *, explicit: bool, lengths: list[int], max_len: int,
                    ropes: list[str], model_path: str | None, text_path: str | None) -> PerplexityPlan | None:
    """The sweep's perplexity cells (None when there are none), after checking that the model
    and the corpus are there (UsageError naming the fix when not).

    Implementations: every one swept when the user named them, else the exact ones.
    """
    from ctxbench.models import lm
    from ctxbench.core import registry

    if max_len == 0 or config.mask == "none" or not any(n <= max_len for n in lengths):
        return None
    chosen = impls if explicit else [n for n in impls if registry.resolve(n).exact]
    # a distributed implementation is called with a rank's shard, which a model layer can't give
    chosen = [n for n in chosen if not registry.resolve(n).distributed]
    if not chosen:
        return None
    try:
        ref = lm.resolve_model(model_path)
        lm.check_dependencies(ref)
        lm.read_text(text_path)
        heads, kv_heads, head_dim = lm.model_shape(lm.load_config(ref))
    except lm.ModelError as exc:
        hint = "" if model_path else " (or --ppl-max-len 0 to sweep without perplexity)"
        fail(f"{exc}{hint}")
    dtype = "float32" if config.device == "cpu" else config.dtype
    return PerplexityPlan(max_len=max_len, impls=chosen, ropes=ropes, heads=heads, kv_heads=kv_heads,
                          head_dim=head_dim, dtype=dtype)


def passkey_plan(o: Options, config: Config, impls: list[str], lengths: list[int], ropes: list[str]) -> Any:
    """The passkey cells of `ctxbench passkey` (ctxbench.measurements.passkey.measure), after checking the model,
    the depths, the trials and that the shortest length holds a prompt."""
    from ctxbench.measurements.passkey import measure as passkey

    try:  # lm.ModelError and registry.RegistryError are ValueErrors, each one line naming the flag
        depths = passkey.parse_depths(o.depths or DEPTHS["passkey"])
        return passkey.passkey_plan(impls, lengths, ropes=ropes, depths=depths,
                                    trials=o.trials, model_path=o.model_path, dtype=config.dtype)
    except ValueError as exc:
        fail(str(exc))


def ruler_plan(o: Options, config: Config, impls: list[str], lengths: list[int]) -> Any:
    """The cells of `ctxbench ruler` (ctxbench.measurements.ruler.compression), after checking the tasks, the
    policies, the budgets, the depths, the model and that the shortest length holds every prompt."""
    from ctxbench.measurements.ruler import compression as kv_compression
    from ctxbench.measurements.ruler import policies as kv_policies
    from ctxbench.measurements.ruler import prompts as ruler
    from ctxbench.measurements.passkey.measure import parse_depths

    try:  # lm.ModelError and registry.RegistryError are ValueErrors, each one line naming the flag
        tasks = ruler.parse_tasks(o.ruler_tasks)
        policies = list(kv_policies.parse_policies(o.policies))
        budgets = [str(b) for b in parse_budgets(o.kv_budget)]
        if o.haystack not in ruler.HAYSTACKS:
            raise ValueError(f"--haystack {o.haystack!r}: choose from {', '.join(ruler.HAYSTACKS)}")
        return kv_compression.ruler_plan(impls, lengths, tasks=tasks, policies=policies, budgets=budgets,
                                         depths=parse_depths(o.depths or DEPTHS["ruler"]), trials=o.trials,
                                         continuation=o.continuation_tokens, model_path=o.model_path,
                                         dtype="float32" if config.device == "cpu" else config.dtype)
    except ValueError as exc:
        fail(str(exc))


def default_max_len(command: str, device: str) -> int:
    """The longest length (tokens) a command runs to when --max-len is not given."""
    if command == "passkey":
        return PASSKEY_MAX_LEN[device]
    if command == "ruler":
        return RULER_MAX_LEN[device]
    return SWEEP_MAX_LEN


# ---------------------------------------------------------------- new or resumed run

def new_run_dir(out: str, config: Config, run_id: str | None, command: str = "sweep") -> str:
    if run_id is None:
        what = f"{command}-" if command in ("passkey", "ruler") else ""
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{what}{config.device}-{config.mask}-{config.dtype}-{config.mode}"
        run_id = run_id.replace("+", "_")
    path = os.path.join(out, run_id)
    if os.path.exists(os.path.join(path, "results.csv")):
        fail(f"run {path} already exists; continue it with --resume {path} or choose another --run-id")
    return path


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
        spec = SweepSpec.from_json(read_meta(run_dir)["spec"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        fail(f"--resume {resume}: meta.json is unreadable ({type(exc).__name__}: {exc}); start a new run")
    csv_path = os.path.join(run_dir, "results.csv")
    if os.path.exists(csv_path):
        try:
            read_results(csv_path, repair_tail=False)
        except CorruptResults as exc:
            if "last line is incomplete" not in str(exc):
                fail(f"--resume {resume}: {exc}; fix or delete that line, then resume")
    check_writable(run_dir)
    return spec, run_dir


def resolve_resume(o: Options, world: int = 1) -> tuple[SweepSpec, str, dict[str, Any]]:
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
    was = command_of(spec)
    if was != o.command:
        fail(f"{run_dir} is a `ctxbench {was}` run; continue it with ctxbench {was} --resume {o.resume}")
    check_numbers(o)
    check_device(spec.config.device)
    changes: dict[str, Any] = {}
    if o.given.keys() & {"lengths", "min_len", "max_len"}:
        lengths_from = o if "min_len" in o.given else replace(o, min_len=spec.lengths[0])
        wanted = lengths_of(lengths_from, default_max_len(was, spec.config.device))
        dropped = [n for n in spec.lengths if n not in wanted]
        if dropped:
            fail(f"resuming {run_dir}: the lengths asked for ({', '.join(map(str, wanted))}) leave out "
                 f"{', '.join(map(str, dropped))} of the run; a resumed run can only gain lengths (resume without "
                 "the length flags, or start a new run)")
        if wanted != spec.lengths:
            changes["lengths"] = wanted
    saved = saved_impls(spec)
    if o.given.keys() & {"impl_names", "impl_specs"}:
        names = impl_names(o)
        validate_impls(names, list(o.impl_specs))
        missing = [n for n in saved if names and n not in names and n not in o.impl_specs]
        if missing:
            fail(f"resuming {run_dir}: --impls leaves out {', '.join(missing)} of the run; a resumed run can only "
                 f"gain implementations (give --impls {','.join(dict.fromkeys(saved + names))})")
        added = [n for n in dict.fromkeys(names + list(o.impl_specs)) if n not in saved]
        if added:
            changes["impls"] = saved + added
    if "timeout" in o.given and o.timeout != spec.timeout_s:
        changes["timeout_s"] = o.timeout
    return extend_spec(spec, changes), run_dir, changes


def command_of(spec: SweepSpec) -> str:
    """The command that runs (and resumes) a spec's cells: "passkey", "ruler" or "sweep"."""
    return "passkey" if spec.passkey is not None else "ruler" if spec.ruler is not None else "sweep"


def saved_impls(spec: SweepSpec) -> list[str]:
    """The implementations a run was started with (passkey and ruler runs keep theirs in their plan)."""
    if spec.passkey is not None:
        return spec.passkey.impls
    if spec.ruler is not None:
        return spec.ruler.impls
    return spec.impls


def extend_spec(spec: SweepSpec, changes: dict[str, Any]) -> SweepSpec:
    """The saved spec with a resume's changes applied (lengths, implementations, timeout);
    UsageError when a saved or added implementation no longer resolves or cannot run there."""
    from ctxbench.core import registry

    spec = replace(spec, lengths=changes.get("lengths", spec.lengths),
                   timeout_s=changes.get("timeout_s", spec.timeout_s))
    names = changes.get("impls", saved_impls(spec))
    # every implementation of the run must still resolve (a saved --impl file may have moved)
    validate_impls([n for n in names if ":" not in n], [n for n in names if ":" in n])
    if "impls" not in changes:
        return spec
    if spec.passkey is not None:
        distributed = [n for n in names if registry.resolve(n).distributed]
        if distributed:
            fail(f"{', '.join(distributed)}: a distributed implementation can't run passkey (a whole model in one "
                 "process can't give it a rank's shard)")
        return replace(spec, passkey=replace(spec.passkey, impls=names))
    if spec.ruler is not None:
        unfit = [n for n in names if registry.resolve(n).distributed or not registry.resolve(n).kv_cache]
        if unfit:
            fail(f"{', '.join(unfit)}: ctxbench ruler needs implementations that take a KV cache (kv_cache=True) "
                 "in one process")
        return replace(spec, ruler=replace(spec.ruler, impls=names))
    added = [n for n in names if n not in spec.impls]
    spec = replace(spec, impls=names)
    if spec.ppl is not None:
        # implementations added by name get perplexity cells, as named ones do in a new run
        extra = [n for n in added if not registry.resolve(n).distributed]
        spec = replace(spec, ppl=replace(spec.ppl, impls=spec.ppl.impls + extra))
    return spec


def resolve(o: Options, world: int = 1, local_world: int = 1) -> tuple[SweepSpec, str, dict[str, Any]]:
    """The validated spec, the run folder and (for --resume) what changed: every command's one
    entry into validation."""
    if o.command not in TASKS:
        raise ValueError(f"unknown command {o.command!r}")
    if world > 1 and o.executor != "local":
        fail("under torchrun the ranks measure each cell together; drop --executor ray")
    if o.resume is not None:
        if o.run_id is not None:
            fail("--run-id names a new run; --resume continues an existing one: give one of them")
        spec, run_dir, changes = resolve_resume(o, world)
    else:
        spec = build_spec(o, world)
        check_writable(o.out)
        run_dir = new_run_dir(o.out, spec.config, o.run_id, o.command)
        changes = {}
        if world > 1 and o.memory_limit is None:  # the ranks on this node share its memory
            spec = replace(spec, memory_limit_bytes=spec.memory_limit_bytes // local_world)
    if world > 1:
        from ctxbench.core import registry

        bad = [n for n in spec.impls if not registry.resolve(n).distributed]
        model_cmd = command_of(spec) if command_of(spec) != "sweep" else None
        if bad or model_cmd:
            fail(f"under torchrun (WORLD_SIZE={world}) only distributed implementations run (e.g. ring); "
                 f"{', '.join(bad) or model_cmd} would run once per rank: run {'it' if len(bad) <= 1 else 'them'} "
                 "without torchrun")
    return spec, run_dir, changes
