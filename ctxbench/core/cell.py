"""What one measurement is (Cell), the configuration its run shares (Config), and how cells are
measured (Settings).

A Cell is an implementation at one context length under a Config, of one kind
(ctxbench.core.kinds), with the fields that kind adds (`params`: a RoPE variant, a needle depth,
a KV-cache policy...). Its configuration columns are the identity of a CSV row: `key` finds a
finished cell when a run resumes, `row()` writes them. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ctxbench.core import kinds
from ctxbench.core.masks import Mask


@dataclass(frozen=True)
class Config:
    """The configuration every cell of a run shares: the attention's shape, dtype, mask, mode,
    device, and whether interpreted implementations run at every length. Kinds that run a model
    take the model's shape instead (for_model)."""

    batch: int = 1
    heads: int = 8
    kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    mask: str = "causal"
    window: int | None = None
    # Attention sinks: with a window, the first `sinks` keys stay visible to every query.
    sinks: int = 0
    mode: str = "fwd"
    device: str = "cpu"
    # Run interpreted (Triton on the CPU) implementations beyond their small default limit: a
    # kernel's cells and a model's alike.
    allow_interpreter: bool = False

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

    def for_model(self, heads: int, kv_heads: int, head_dim: int, dtype: str) -> "Config":
        """The configuration of a cell that runs a language model: one sequence of the model's
        attention shape (query heads, KV heads, head dim) in its dtype, forward only."""
        return replace(self, batch=1, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, mode="fwd")


CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Config))
# The configuration columns that hold numbers.
NUMERIC_CONFIG: tuple[str, ...] = ("batch", "heads", "kv_heads", "head_dim", "window", "sinks")


@dataclass(frozen=True)
class Cell(Config):
    """One measurement: implementation `impl` at context length `n` (tokens) of kind `kind`, with
    the kind's fields in `params` ((name, value) pairs, as the kind declares them)."""

    impl: str = ""
    n: int = 0
    kind: str = ""
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, config: Config, impl: str, n: int, kind: str, **params: Any) -> "Cell":
        """A cell of `kind` with its fields `params` (each one the kind declares; ValueError if not),
        kept in the kind's order so that equal cells compare and hash equal."""
        return cls(**asdict(config), impl=impl, n=n, kind=kind, params=own_fields(kind, params))

    def get(self, name: str, default: Any = None) -> Any:
        """The value of the kind's field `name`; `default` when the cell has none."""
        for key, value in self.params:
            if key == name:
                return value
        return default

    def __getattr__(self, name: str) -> Any:
        # cell.query_len, cell.rope...: a kind's fields read as attributes too (an implementation's
        # check(cell) does), None where the cell's kind has no such field.
        if name.startswith("__") or name == "params":
            raise AttributeError(name)
        for key, value in self.params:
            if key == name:
                return value
        if any(f.name == name for f in kinds.fields()):
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ------------------------------------------------------------------ the attention's shape

    @property
    def q_len(self) -> int:
        """Query tokens per sequence (Lq): the cell's query_len, or n for a square (prefill) cell."""
        query_len = self.get("query_len")
        return self.n if query_len is None else int(query_len)

    @property
    def is_ragged(self) -> bool:
        """Whether the sequences of the batch have different KV lengths (ctxbench.core.kv_layout)."""
        return bool(self.get("ragged")) or self.get("kv_lens") is not None

    @property
    def attention_mask(self) -> Mask:
        """The mask of this cell's Lq x n score matrix: the configuration's, with the queries
        aligned to the last keys (q_offset = n - Lq, bottom-right, as FlashAttention's)."""
        return self.sequence_mask(self.n)

    def sequence_mask(self, kv_len: int) -> Mask:
        """The mask of one sequence holding kv_len keys (ragged batches: each its own offset)."""
        return Mask.named(self.mask, self.window, self.sinks, q_offset=kv_len - self.q_len)

    # ------------------------------------------------------------------ what its kind says

    @property
    def runs_a_model(self) -> bool:
        """Whether the cell runs a whole language model rather than one attention call."""
        return kinds.get(self.kind).runs_a_model

    @property
    def needs_kv_cache(self) -> bool:
        """Whether its kind decodes against a KV cache, so its implementation must declare kv_cache=True."""
        return kinds.get(self.kind).needs_kv_cache

    @property
    def label(self) -> str:
        return kinds.get(self.kind).label(self)

    # ------------------------------------------------------------------ as a CSV row and as JSON

    def row(self) -> dict[str, Any]:
        """Every configuration column of the CSV (key_columns), the fields of other kinds at
        their `absent` value."""
        values = {name: getattr(self, name) for name in ("impl", "n", "kind") + CONFIG_FIELDS}
        own = dict(self.params)
        for f in kinds.fields():
            values[f.name] = own[f.name] if f.name in own else f.absent
        return values

    @property
    def key(self) -> tuple[str, ...]:
        """Identity of the cell in a results CSV (every configuration column, as text)."""
        row = self.row()
        return tuple(key_text(row[c]) for c in key_columns())

    def to_json(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in CONFIG_FIELDS + ("impl", "n", "kind")},
                "params": dict(self.params)}

    @classmethod
    def from_job(cls, data: dict[str, Any], where: dict[str, str] | None) -> "Cell":
        """from_json in a process that may not have imported the cell's kind yet (a worker, a Ray
        task, a torchrun rank): the kind's module, or its file (`where`, as kinds.origin gave it),
        is imported first, since the cell's fields are the kind's."""
        kinds.find(data["kind"], where)
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Cell":
        data = dict(data)
        return cls(**{**data, "params": own_fields(data["kind"], dict(data.pop("params", {})))})


def own_fields(kind: str, params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """`params` as a Cell holds them: (name, value) pairs in the order kind `kind` declares its
    fields; ValueError naming a field it does not declare."""
    declared = [f.name for f in kinds.get(kind).fields]
    unknown = set(params) - set(declared)
    if unknown:
        raise ValueError(f"kind {kind!r} has no field {', '.join(sorted(unknown))}")
    return tuple((name, params[name]) for name in declared if name in params)


def key_text(value: object) -> str:
    """A configuration value as the CSV writes it ("" for None)."""
    return "" if value is None else str(value)


def key_columns() -> list[str]:
    """The CSV's configuration columns, which identify a row: implementation, length, kind, the
    shared configuration, then every kind's fields."""
    return ["impl", "n", "kind", *CONFIG_FIELDS, *(f.name for f in kinds.fields())]


@dataclass(frozen=True)
class Settings:
    """How to measure (not what): shared by every cell of a run and saved in meta.json. Fields
    beyond the timing budget are set by the kinds that use them (Kind.settings)."""

    warmup_ms: float = 100.0
    rep_ms: float = 1000.0
    min_repeats: int = 3
    max_repeats: int = 100
    check_rows: int = 256
    seed: int = 0
    model: str = ""        # checkpoint folder or .gguf file; "" = the embedded default model
    text: str = ""         # UTF-8 corpus file; "" = the default corpus (pydoc_data.topics)
    ppl_tokens: int = 2048  # perplexity: tokens scored per cell (fewer when the corpus is short)
    ppl_stride: int = 256   # perplexity, strided scheme: tokens scored at the end of each window
    decode_tokens: int = 16  # decode: greedy tokens generated after the prefill
    haystack: str = "corpus"  # ruler: the haystack, "corpus" (the --text corpus) or "filler"
    continuation_tokens: int = 256  # ruler continuation: tokens scored after the context
    # The device's memory bandwidth (GB/s), the denominator of bw_fraction, and what a probe
    # measured and where the denominator comes from (ctxbench.engine.bandwidth): filled in once
    # per run by the sweep, so a resumed run divides by the same figure. None: not known.
    bandwidth_gbps: float | None = None
    bandwidth_probe_gbps: float | None = None
    bandwidth_source: str = ""
    # CUDA decode cells (query_len set, forward): time CUDA-graph replays, not launches.
    cuda_graph: bool = True
    # Keep the cell's prepared call in the worker for more timed rounds (an A/B run's first
    # round, ctxbench.engine.interleave; Kind.measure_more).
    keep_for_more: bool = False
    # An A/B round of a single-threaded run: the CPU its calls run on, the same for both sides of a
    # pair of rounds, so that a CPU that is slower than the other (a busy hyperthread sibling, the
    # driver's polling) weighs on both alike (ctxbench.engine.interleave). None: wherever the OS puts it.
    pin_cpu: int | None = None
