"""What the kinds that run a language model share when they plan (perplexity, decode, passkey,
ruler): the model's attention shape for their CSV columns, the dtype it runs in, a rough
throughput for the progress bar, and the base of their plans. Light at import: the model is
read (its config, its tokenizer) only when a run is planned, and loaded only in the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctxbench.core.cell import Config
from ctxbench.core.flags import fail
from ctxbench.core.kinds import Kind

# Rough language-model throughput (tokens/s through the default model), for ETAs only.
ROUGH_TOKENS_PER_S = {"cpu": 300.0, "cuda": 30000.0}


def seconds_for(tokens: float, device: str) -> float:
    """Rough seconds to run `tokens` tokens through the default model on `device` (for ETAs)."""
    return tokens / ROUGH_TOKENS_PER_S.get(device, ROUGH_TOKENS_PER_S["cpu"])


def model_dtype(config: Config) -> str:
    """The dtype a model runs in: fp32 on the CPU, the run's dtype on CUDA."""
    return "float32" if config.device == "cpu" else config.dtype


def model_shape(model_path: str | None, *, text_path: str | None = None, hint: str = "") -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of the model, after checking that it, its dependencies
    and (with text_path) the corpus are there; UsageError naming the fix (plus `hint`) if not."""
    from ctxbench.models import lm

    try:
        ref = lm.resolve_model(model_path)
        lm.check_dependencies(ref)
        if text_path is not None:
            lm.read_text(text_path)
        return lm.model_shape(lm.load_config(ref))
    except lm.ModelError as exc:
        fail(f"{exc}{hint}")


def one_process_impls(kind: str, names: list[str], *, kv_cache: bool = False) -> None:
    """UsageError (one line) unless every implementation runs in one process (not distributed:
    a whole model in one process can't give it a rank's shard) and, with kv_cache, takes a KV cache."""
    from ctxbench.core import registry

    try:
        impls = {name: registry.resolve(name) for name in names}
    except registry.RegistryError as exc:
        fail(str(exc))
    distributed = [n for n, impl in impls.items() if impl.distributed]
    if distributed:
        fail(f"{', '.join(distributed)}: a distributed implementation can't run {kind} (a whole model in one process "
             "can't give it a rank's shard)")
    if kv_cache:
        unfit = [n for n, impl in impls.items() if not impl.kv_cache]
        if unfit:
            fail(f"{', '.join(unfit)} does not take a KV cache (kv_cache=True), which {kind} decodes against; "
                 "choose e.g. --impls sdpa")


@dataclass(frozen=True)
class ModelPlan:
    """The base of a model kind's plan: its implementations and the model's attention shape
    (query heads, KV heads, head dim) and dtype, which its cells record."""

    impls: list[str]
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    def base(self, config: Config) -> Config:
        """The run's configuration with the model's shape and dtype: one sequence, forward."""
        return config.for_model(self.heads, self.kv_heads, self.head_dim, self.dtype)


class ModelKind(Kind):
    """A kind whose cells run a whole language model through an implementation (so no peak memory
    of one attention call is read, and its worker keeps glibc's own heap)."""

    runs_a_model = True

    def describe_model(self, spec: Any) -> str:
        return spec.settings.model or "default model (SmolLM2-135M-Instruct)"
