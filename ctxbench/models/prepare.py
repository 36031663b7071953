"""The step every kind that runs a model shares: the model (loaded once per worker process,
ctxbench.models.lm) with a cell's RoPE variant, and an implementation as the attention of
every layer (ctxbench.models.attention), with the cell's window and sinks."""

from __future__ import annotations

from typing import Any

from ctxbench.core.registry import Impl
from ctxbench.models import lm
from ctxbench.models.attention import attention_name


def prepare(impl: Impl, cell: Any, model_path: str) -> tuple[Any, lm.ModelRef]:
    """(the cached model with `cell`'s RoPE variant and `impl` as its attention, its ModelRef).
    cell: a ctxbench.core.cell.Cell of a model kind; its `rope` field, when it has one, picks the
    RoPE variant ("default" otherwise)."""
    ref = lm.resolve_model(model_path)
    model = lm.load_model(ref, cell.dtype, cell.device)
    lm.set_rope(model, cell.get("rope") or "default")
    model.set_attn_implementation(attention_name(impl, window=cell.attn_window, sinks=cell.attn_sinks))
    return model, ref
