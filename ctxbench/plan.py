"""The sweep plan: one configuration x implementations x context lengths -> cells.

A Cell is everything one measurement needs to know; its fields are the configuration
columns of the CSV, and its key identifies a finished cell when a sweep is resumed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

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

    @property
    def causal(self) -> bool:
        return self.mask in ("causal", "window")

    @property
    def attn_window(self) -> int | None:
        return self.window if self.mask == "window" else None


@dataclass(frozen=True)
class Cell(Config):
    """One measurement: an implementation at one context length under a Config."""

    impl: str = ""
    n: int = 0

    @classmethod
    def of(cls, config: Config, impl: str, n: int) -> "Cell":
        return cls(**asdict(config), impl=impl, n=n)

    @property
    def key(self) -> tuple:
        """Identity of the cell in a results CSV (all configuration fields, as strings)."""
        return tuple(_key_str(getattr(self, f)) for f in KEY_FIELDS)

    @property
    def label(self) -> str:
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


def build_cells(config: Config, impls: list[str], lengths: list[int]) -> list[Cell]:
    """Cells in sweep order: length-major, so every implementation's short lengths come first.

    Length-major ordering means an interrupted sweep still has a comparable picture of all
    implementations, and an implementation's out-of-memory at N is known before its 2N.
    """
    return [Cell.of(config, impl, n) for n in lengths for impl in impls]
