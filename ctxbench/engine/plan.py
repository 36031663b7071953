"""The sweep plan: one configuration x implementations x context lengths -> cells.

A Cell is everything one measurement needs to know; its fields are the configuration
columns of the CSV, and its key identifies a finished cell when a sweep is resumed.
A cell is a kernel measurement (task "kernel": one attention call on random inputs), a
perplexity measurement (task "perplexity": a language model whose attention layers run
through the implementation, ctxbench.measurements.perplexity.measure), one passkey-retrieval trial (task
"passkey": one prompt of N tokens with a key at a depth, ctxbench.measurements.passkey.measure), or one prompt of
`ctxbench ruler` under a KV-cache policy and budget (task "retrieval": a RULER task's prompt;
"continuation": the corpus's next tokens; ctxbench.measurements.ruler.compression).

A SweepSpec is a whole run (configuration, implementations, lengths, the perplexity or passkey
plan, and the Settings that say how to measure); it is saved in meta.json, so --resume
rebuilds the same cells. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from ctxbench.core.masks import Mask

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


@dataclass(frozen=True)
class Config:
    """The configuration shared by every cell of a sweep (everything but impl and length)."""

    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    mask: str = "causal"
    window: int | None = None
    mode: str = "fwd"
    device: str = "cpu"
    # Run interpreted (Triton on the CPU) implementations beyond their small default limit.
    allow_interpreter: bool = False
    # Attention sinks: with a window, the first `sinks` keys stay visible to every query.
    sinks: int = 0
    # How perplexity cells cut the corpus: "truncated" or "strided" (ctxbench.measurements.perplexity.measure).
    ppl_scheme: str = "truncated"
    # Query tokens per sequence against n keys (decode: 1; chunked prefill: a few hundred);
    # None: as many as keys (prefill, the square Lq = Lk). The queries are the last tokens.
    query_len: int | None = None
    # Ragged batches and paged caches (ctxbench.core.kv_layout): KV lengths drawn per sequence with
    # the seed (ragged), or given ("1000,70000": tokens, one per sequence); K and V in pages of
    # page_size tokens. None / False: every sequence has n keys, stored contiguously.
    ragged: bool = False
    kv_lens: str | None = None
    page_size: int | None = None

    @property
    def attention_mask(self) -> Mask:
        """The mask the cells apply: the mask column, with window and sinks only for 'window'."""
        return Mask.named(self.mask, self.window, self.sinks)

    @property
    def attn_window(self) -> int | None:
        return self.attention_mask.window

    @property
    def attn_sinks(self) -> int:
        return self.attention_mask.sinks


# The KV-cache policies of `ctxbench ruler` (ctxbench.measurements.ruler.policies, which imports torch; here so
# the planning and report sides can name them without it).
KV_POLICIES = ("full", "streaming", "h2o", "snapkv", "knorm", "random")
# The cell tasks of `ctxbench ruler` (ctxbench.measurements.ruler.compression): a RULER prompt answered from a
# compressed KV cache, and the corpus's continuation scored after one.
RULER_TASKS = ("retrieval", "continuation")


@dataclass(frozen=True)
class Cell(Config):
    """One measurement: an implementation at one context length under a Config."""

    impl: str = ""
    n: int = 0
    task: str = "kernel"  # "kernel", "perplexity", "passkey", "decode", "retrieval" or "continuation"
    rope: str = "default"  # RoPE variant of the model (model cells; "default" for kernels)
    # passkey cells: where the key goes (fraction of the filler) and which key of that
    # (length, depth); None for every other task
    depth: float | None = None
    trial: int | None = None
    # ruler cells (tasks "retrieval" and "continuation"): the RULER task (retrieval only), the
    # KV-cache policy, and its budget as given ("512": tokens; "0.25": of the context; None:
    # the whole cache); None for every other task
    ruler_task: str | None = None
    policy: str | None = None
    kv_budget: str | None = None

    @classmethod
    def of(cls, config: Config, impl: str, n: int, **fields_: object) -> "Cell":
        return cls(**{**asdict(config), **fields_}, impl=impl, n=n)

    @property
    def q_len(self) -> int:
        """Query tokens per sequence (Lq): query_len, or n for a square (prefill) cell."""
        return self.n if self.query_len is None else self.query_len

    @property
    def runs_a_model(self) -> bool:
        """Whether the cell runs a whole language model (perplexity, passkey, decode, ruler)
        rather than one attention call; only an attention call's peak memory is measured."""
        return self.task != "kernel"

    @property
    def is_ragged(self) -> bool:
        """Whether the sequences of the batch have different KV lengths."""
        return self.ragged or self.kv_lens is not None

    @property
    def attention_mask(self) -> Mask:
        """The mask of this cell's Lq x n score matrix: the configuration's, with the queries
        aligned to the last keys (q_offset = n - Lq, bottom-right, as FlashAttention's)."""
        return self.sequence_mask(self.n)

    def sequence_mask(self, kv_len: int) -> Mask:
        """The mask of one sequence holding kv_len keys (ragged batches: each its own offset)."""
        return Mask.named(self.mask, self.window, self.sinks, q_offset=kv_len - self.q_len)

    @property
    def key(self) -> tuple:
        """Identity of the cell in a results CSV (all configuration fields, as strings)."""
        return tuple(_key_str(getattr(self, f)) for f in KEY_FIELDS)

    @property
    def label(self) -> str:
        rope = "" if self.rope == "default" else f" {self.rope}"
        if self.task == "perplexity":
            return f"ppl {self.impl} N={self.n}{rope}"
        if self.task == "decode":
            return f"decode {self.impl} N={self.n}{rope}"
        if self.task == "passkey":
            return f"passkey {self.impl} N={self.n} d={self.depth:g}" + (f" #{self.trial}" if self.trial else "") + rope
        if self.task in RULER_TASKS:
            budget = "" if self.kv_budget is None else f"@{self.kv_budget}"
            what = self.ruler_task if self.task == "retrieval" else "continuation"
            at = f" d={self.depth:g}" + (f" #{self.trial}" if self.trial else "") if self.task == "retrieval" else ""
            return f"{what} {self.policy}{budget} N={self.n}{at}"
        if self.query_len is not None:
            return f"{self.impl} Lq={self.query_len} N={self.n}"
        return f"{self.impl} N={self.n}"


def _key_str(value: object) -> str:
    return "" if value is None else str(value)


KEY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Cell))


def powers_of_two(min_len: int, max_len: int) -> list[int]:
    """Powers of two from min_len up to max_len, both included when they are powers of two.

    A min_len that is not a power of two is kept as the first length.
    """
    lengths = [min_len]
    p = 1
    while p <= min_len:
        p *= 2
    while p <= max_len:
        lengths.append(p)
        p *= 2
    return lengths


@dataclass(frozen=True)
class PerplexityPlan:
    """Which perplexity cells a sweep has, and the model's shape for their CSV columns."""

    max_len: int                 # lengths above this get no perplexity cells
    impls: list[str]             # implementations that get perplexity cells
    ropes: list[str]             # RoPE variants, e.g. ["default", "yarn:4"]
    heads: int                   # the model's query heads, kv heads and head dim
    kv_heads: int
    head_dim: int
    dtype: str                   # the model's dtype (fp32 on CPU, the sweep's dtype on CUDA)

    def cells(self, config: Config, n: int) -> list[Cell]:
        """The perplexity cells at length n: each implementation x RoPE variant, one forward
        pass per window of n tokens (batch 1, forward only)."""
        if n > self.max_len:
            return []
        base = replace(config, batch=1, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                       dtype=self.dtype, mode="fwd", query_len=None, ragged=False, kv_lens=None,
                       page_size=None)
        return [Cell.of(base, impl, n, task="perplexity", rope=rope) for impl in self.impls for rope in self.ropes]


@dataclass(frozen=True)
class DecodePlan:
    """Which decode cells a sweep has (ctxbench.measurements.decode.measure: a prefill of n tokens through the
    model, then greedy tokens with a KV cache), and the model's shape for their CSV columns."""

    max_len: int                 # lengths above this get no decode cells
    impls: list[str]             # implementations that get decode cells (they declare kv_cache)
    heads: int                   # the model's query heads, kv heads and head dim
    kv_heads: int
    head_dim: int
    dtype: str                   # the model's dtype

    def cells(self, config: Config, n: int) -> list[Cell]:
        """The decode cells at length n: one per implementation (batch 1, forward only)."""
        if n > self.max_len:
            return []
        base = replace(config, batch=1, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                       dtype=self.dtype, mode="fwd", query_len=None, ragged=False, kv_lens=None,
                       page_size=None)
        return [Cell.of(base, impl, n, task="decode") for impl in self.impls]


@dataclass(frozen=True)
class PasskeyPlan:
    """Which passkey cells a sweep has (ctxbench.measurements.passkey.measure), and the model's shape for their CSV
    columns. Every length of the sweep gets them; the key of a trial is drawn from the seed,
    the length, the depth and the trial, so every implementation and RoPE variant answers the
    same questions."""

    impls: list[str]             # implementations that get passkey cells
    ropes: list[str]             # RoPE variants, e.g. ["default", "yarn:4"]
    depths: list[float]          # where the key goes: fractions 0..1 of the filler
    trials: int                  # keys per (length, depth)
    heads: int                   # the model's query heads, kv heads and head dim
    kv_heads: int
    head_dim: int
    dtype: str                   # the model's dtype

    def cells(self, config: Config, n: int) -> list[Cell]:
        """The passkey cells at length n: implementation x RoPE variant x depth x trial, one
        forward pass of n tokens each (batch 1, forward only)."""
        base = replace(config, batch=1, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                       dtype=self.dtype, mode="fwd", query_len=None, ragged=False, kv_lens=None,
                       page_size=None)
        return [Cell.of(base, impl, n, task="passkey", rope=rope, depth=float(depth), trial=trial)
                for impl in self.impls for rope in self.ropes for depth in self.depths for trial in range(self.trials)]


def parse_budget(text: str) -> int | float:
    """One budget: an integer is a token count (>= 1), a decimal 0 < r < 1 a ratio of the context.
    Raises ValueError with a one-line message naming --kv-budget."""
    t = text.strip()
    try:
        if t.isdigit():
            value: int | float = int(t)
            if value >= 1:
                return value
        else:
            value = float(t)
            if 0 < value < 1:
                return value
    except ValueError:
        pass
    raise ValueError(f"--kv-budget: {text!r} is neither a token count (an integer >= 1) nor a ratio of the "
                     "context (a decimal between 0 and 1, exclusive); e.g. --kv-budget 512,1024 or 0.25,0.5")


def parse_budgets(text: str) -> tuple[int | float, ...]:
    """Budgets from a comma-separated list (see parse_budget), each once, in the order given."""
    items = [b for b in text.split(",") if b.strip()]
    if not items:
        raise ValueError("--kv-budget: no budget given; e.g. --kv-budget 512,1024 or 0.25,0.5")
    return tuple(dict.fromkeys(parse_budget(b) for b in items))


def resolve_budget(budget: int | float | None, n: int) -> int:
    """Tokens kept of a context of n tokens: n for no budget, a token budget capped at n, or
    round(ratio x n) (at least 1)."""
    if budget is None:
        return n
    if isinstance(budget, int):
        return min(budget, n)
    return min(n, max(1, round(budget * n)))


@dataclass(frozen=True)
class RulerPlan:
    """The cells of `ctxbench ruler` (ctxbench.measurements.ruler.compression): RULER tasks (ctxbench.measurements.ruler.prompts)
    and the continuation's perplexity, each under every KV-cache policy and budget, and the
    model's shape for their CSV columns. The cells of one prompt are consecutive (policies
    and budgets innermost), so its worker prefills the prompt once and compresses the same
    cache for each of them."""

    impls: list[str]             # implementations the model runs on (they declare kv_cache)
    tasks: list[str]             # RULER tasks (ctxbench.measurements.ruler.prompts.TASKS)
    policies: list[str]          # KV-cache policies (ctxbench.measurements.ruler.policies.POLICIES)
    budgets: list[str]           # as given: "512" (tokens) or "0.25" (of the context)
    depths: list[float]          # where the asked needle goes: fractions 0..1 of the haystack
    trials: int                  # prompts per (task, length, depth)
    continuation: int            # tokens scored after the context (0: no continuation cells)
    heads: int                   # the model's query heads, kv heads and head dim
    kv_heads: int
    head_dim: int
    dtype: str                   # the model's dtype

    def policy_budgets(self, n: int) -> list[tuple[str, str | None]]:
        """(policy, budget) pairs at context length n (tokens): "full" once with no budget; a
        compressing policy at each budget that keeps fewer than the n - 1 tokens cached before
        the last prompt token (one that keeps all of them is the full cache, planned once), each
        kept-token count once per policy."""
        pairs: list[tuple[str, str | None]] = []
        for policy in self.policies:
            if policy == "full":
                pairs.append(("full", None))
                continue
            kept: set[int] = set()
            for budget in self.budgets:
                tokens = resolve_budget(parse_budget(budget), n)
                if tokens < n - 1 and tokens not in kept:
                    kept.add(tokens)
                    pairs.append((policy, budget))
        return pairs

    def cells(self, config: Config, n: int) -> list[Cell]:
        """The ruler cells at length n: per implementation, each task x depth x trial prompt,
        then the continuation, each under every (policy, budget) of policy_budgets(n)."""
        base = replace(config, batch=1, heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
                       dtype=self.dtype, mode="fwd", query_len=None, ragged=False, kv_lens=None,
                       page_size=None)
        pairs = self.policy_budgets(n)
        cells = []
        for impl in self.impls:
            cells += [Cell.of(base, impl, n, task="retrieval", ruler_task=task, depth=float(depth), trial=trial,
                              policy=policy, kv_budget=budget)
                      for task in self.tasks for depth in self.depths for trial in range(self.trials)
                      for policy, budget in pairs]
            if self.continuation:
                cells += [Cell.of(base, impl, n, task="continuation", policy=policy, kv_budget=budget)
                          for policy, budget in pairs]
        return cells


def build_cells(config: Config, impls: list[str], lengths: list[int],
                ppl: PerplexityPlan | None = None, passkey: PasskeyPlan | None = None,
                decode: DecodePlan | None = None, ruler: RulerPlan | None = None) -> list[Cell]:
    """Cells in sweep order: length-major, so every implementation's short lengths come first;
    at each length the kernel cells, then the perplexity cells (when `ppl` plans any), then the
    passkey cells (when `passkey` plans any).

    Length-major ordering means an interrupted sweep still has a comparable picture of all
    implementations, and an implementation's out-of-memory at N is known before its 2N.
    """
    cells = []
    for n in lengths:
        cells += [Cell.of(config, impl, n) for impl in impls]
        if ppl is not None:
            cells += ppl.cells(config, n)
        if passkey is not None:
            cells += passkey.cells(config, n)
        if decode is not None:
            cells += decode.cells(config, n)
        if ruler is not None:
            cells += ruler.cells(config, n)
    return cells


@dataclass(frozen=True)
class Settings:
    """How to measure (not what): timing budget, rows checked, input seed; for perplexity
    cells (ctxbench.measurements.perplexity.measure) the model, the corpus, the tokens scored and the stride."""

    warmup_ms: float = 100.0
    rep_ms: float = 1000.0
    min_repeats: int = 3
    max_repeats: int = 100
    check_rows: int = 256
    seed: int = 0
    model: str = ""        # checkpoint folder or .gguf file; "" = the embedded default model
    text: str = ""         # UTF-8 corpus file; "" = the default corpus (pydoc_data.topics)
    ppl_tokens: int = 2048  # tokens scored per perplexity cell (fewer when the corpus is short)
    ppl_stride: int = 256   # strided scheme: tokens scored at the end of each window
    decode_tokens: int = 16  # decode cells: greedy tokens generated after the prefill
    haystack: str = "corpus"  # ruler cells: the haystack, "corpus" (the --text corpus) or "filler"
    continuation_tokens: int = 256  # continuation cells: tokens scored after the context
    # The device's memory bandwidth (GB/s), the denominator of bw_fraction, and what a probe
    # measured and where the denominator comes from (ctxbench.engine.bandwidth): filled in once per
    # run by the sweep, so a resumed run divides by the same figure. None: not known.
    bandwidth_gbps: float | None = None
    bandwidth_probe_gbps: float | None = None
    bandwidth_source: str = ""
    # CUDA decode cells (query_len set, forward): time CUDA-graph replays, not launches.
    cuda_graph: bool = True


@dataclass
class SweepSpec:
    """Everything that defines a sweep; saved in meta.json so --resume can rebuild it."""

    config: Config
    impls: list[str]
    lengths: list[int]
    timeout_s: float
    memory_limit_bytes: int | None
    settings: Settings = field(default_factory=Settings)
    reuse_workers: bool = True
    ppl: PerplexityPlan | None = None  # perplexity cells (None: kernel cells only)
    passkey: PasskeyPlan | None = None  # passkey-retrieval cells (None: none)
    decode: DecodePlan | None = None  # model decode cells (None: none)
    ruler: RulerPlan | None = None  # `ctxbench ruler` cells (None: none)
    # memory_limit_bytes is this machine's default (85% of available), not the user's
    # --memory-limit: a Ray node computes its own instead
    memory_limit_auto: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "impls": self.impls, "lengths": self.lengths,
                "timeout_s": self.timeout_s, "memory_limit_bytes": self.memory_limit_bytes,
                "settings": asdict(self.settings), "reuse_workers": self.reuse_workers,
                "ppl": asdict(self.ppl) if self.ppl is not None else None,
                "memory_limit_auto": self.memory_limit_auto,
                "passkey": asdict(self.passkey) if self.passkey is not None else None,
                "decode": asdict(self.decode) if self.decode is not None else None,
                "ruler": asdict(self.ruler) if self.ruler is not None else None}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SweepSpec":
        return cls(config=Config(**d["config"]), impls=list(d["impls"]), lengths=[int(n) for n in d["lengths"]],
                   timeout_s=float(d["timeout_s"]), memory_limit_bytes=d.get("memory_limit_bytes"),
                   settings=Settings(**d.get("settings", {})), reuse_workers=d.get("reuse_workers", True),
                   ppl=PerplexityPlan(**d["ppl"]) if d.get("ppl") else None,
                   memory_limit_auto=d.get("memory_limit_auto", False),
                   passkey=PasskeyPlan(**d["passkey"]) if d.get("passkey") else None,
                   decode=DecodePlan(**d["decode"]) if d.get("decode") else None,
                   ruler=RulerPlan(**d["ruler"]) if d.get("ruler") else None)

    def cells(self) -> list[Cell]:
        return build_cells(self.config, self.impls, self.lengths, self.ppl, self.passkey, self.decode, self.ruler)

    def all_impls(self) -> list[str]:
        """Every implementation with cells in the sweep (kernel, perplexity or passkey), once each."""
        return list(dict.fromkeys(self.impls + (self.ppl.impls if self.ppl else [])
                                  + (self.passkey.impls if self.passkey else [])
                                  + (self.decode.impls if self.decode else [])
                                  + (self.ruler.impls if self.ruler else [])))
