"""triton_settings: how the Triton flash-attention kernel (triton_attention) is launched.

TritonSettings holds the choices a call can make; a call given none reads them from the
environment at that moment (TritonSettings.from_environment), never at import, so a variable
set after ctxbench was imported still counts:

  CTXBENCH_TRITON_AUTOTUNE        on CUDA, autotune the block sizes ("1", the default) or launch
                                  the default configs ("0")
  CTXBENCH_TRITON_SPACE           the autotuning space: "full" (default) or "check", the GPU
                                  check's few configs (triton_configs.CHECK_SPACE)
  CTXBENCH_TRITON_FP32_PRECISION  tl.dot's input_precision for fp32 inputs: "ieee" (default,
                                  true fp32 products), or "tf32" / "tf32x3" (tensor cores)
  CTXBENCH_TRITON_FUSED_DQ        the backward's dQ: "auto" (default), "1" fused into dK/dV with
                                  atomics, "0" from a kernel of its own (triton_configs.fused_dq)

The other fields are for tests and tools (count_visits, fixed configs, autotuners of one's own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from ctxbench.kernels.triton_configs import KINDS, SPACES, Config

FUSED_DQ_VALUES = ("auto", "1", "0")


@dataclass(frozen=True)
class TritonSettings:
    """How triton_attention launches its kernels.

    autotune: on CUDA, autotune the block sizes (else the default configs, triton_configs.default_config).
    space: the autotuning space, "full" or "check" (triton_configs.tuning_space).
    fp32_precision: tl.dot's input_precision for fp32 inputs ("ieee", "tf32" or "tf32x3").
    fused_dq: the backward's dQ, "auto", "1" (fused into dK/dV) or "0" (triton_configs.fused_dq).
    count_visits: every kernel counts the blocks each program visits, and records the order its
      programs started in (triton_attention.last_visits / last_order); fixed configs only.
    configs: fixed configs by kernel kind ("fwd", "dkdv", "dq": (BLOCK_M, BLOCK_N, warps,
      stages)), launched instead of any other, on the interpreter too.
    tuners: autotuners by kernel kind (triton_attention.make_tuner, built for the same
      interpretation as the call), launched instead of the space's, on the interpreter too.
    """

    autotune: bool = True
    space: str = "full"
    fp32_precision: str = "ieee"
    fused_dq: str = "auto"
    count_visits: bool = False
    configs: Mapping[str, Config] | None = None
    tuners: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.space not in SPACES:
            raise ValueError(f"CTXBENCH_TRITON_SPACE (space) must be 'full' or 'check' (got {self.space!r})")
        if self.fused_dq not in FUSED_DQ_VALUES:
            raise ValueError(f"CTXBENCH_TRITON_FUSED_DQ (fused_dq) must be auto, 1 or 0 (got {self.fused_dq!r})")
        for name, given in (("configs", self.configs), ("tuners", self.tuners)):
            unknown = set(given or ()) - set(KINDS)
            if unknown:
                raise ValueError(f"{name}: unknown kernel kinds {sorted(unknown)}; choose from {KINDS}")
        if self.count_visits and self.tuners:
            raise ValueError("count_visits sizes its buffers from fixed configs: it takes no tuners")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, **fields: Any) -> TritonSettings:
        """The settings the CTXBENCH_TRITON_* variables of `environ` (default: os.environ, read
        now) say, with `fields` given explicitly on top."""
        env = os.environ if environ is None else environ
        read = dict(autotune=env.get("CTXBENCH_TRITON_AUTOTUNE", "1") != "0",
                    space=env.get("CTXBENCH_TRITON_SPACE", "full"),
                    fp32_precision=env.get("CTXBENCH_TRITON_FP32_PRECISION", "ieee"),
                    fused_dq=env.get("CTXBENCH_TRITON_FUSED_DQ", "auto"))
        return cls(**{**read, **fields})
