"""triton_common: what the Triton kernels (triton_attention, triton_decode) share.

* jit: the decorator of their @triton.jit functions, a JITFunction whatever TRITON_INTERPRET
  said at import (triton_interpreter decides between compiling and interpreting per launch);
* mm, mma: tl.dot with fp32 accumulation, exact on bf16 under the interpreter too;
* device_reason: why a cell cannot run on its device (CPU only interpreted, CUDA only compiled);
* NOT_INSTALLED: the reason given everywhere when triton is missing.
A module with nothing to register: ctxbench.core.registry imports it like every module of kernels/.
"""

import os
from types import SimpleNamespace
from typing import Any, Callable

import torch

from ctxbench.kernels.triton_interpreter import interpreted

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports: the kernels register as unsupported
    triton = None
    tl = SimpleNamespace(constexpr=None)  # for the annotations below; no kernel runs

NOT_INSTALLED = "triton is not installed: pip install triton"


def jit(fn: Callable) -> Any:
    """fn as a triton JITFunction, what triton.jit returns when TRITON_INTERPRET is not set:
    a kernel to compile, which triton_interpreter.launchable runs interpreted when a launch
    asks for that. (triton.jit itself would return an InterpretedFunction, which can never be
    compiled, whenever TRITON_INTERPRET happens to be set at import.) Without triton, fn itself:
    the module imports and its implementations refuse every call."""
    if triton is None:
        return fn
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


@jit
def mm(a, b, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """tl.dot(a, b) with fp32 accumulation. Under the interpreter, tl.dot on bf16 multiplies
    raw bit patterns (triton-lang/triton#11584): bf16 operands are then widened to fp32 first,
    which is exact, so the result is what bf16 tensor cores compute. Compiled kernels
    (INTERPRETED is False) always take the plain tl.dot branch."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            c = tl.dot(a, b, input_precision=PRECISION)
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@jit
def mma(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + tl.dot(a, b); see mm."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            c = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        c = tl.dot(a, b, acc, input_precision=PRECISION)
    return c


def device_reason(cell: Any, interpreter_max_len: int) -> str | None:
    """Why a Triton kernel can't run `cell` on its device, or None: on the CPU only through
    the interpreter, up to interpreter_max_len keys (tokens) unless --allow-interpreter; on
    CUDA only compiled, and bf16 from compute capability 8.0. Asked when the cell is checked
    (interpreted() reads TRITON_INTERPRET then)."""
    setting = os.environ.get("TRITON_INTERPRET")
    if cell.device == "cpu":
        if not interpreted():
            told = "TRITON_INTERPRET is not set" if setting is None else f"TRITON_INTERPRET={setting}"
            return f"triton runs on the CPU only through its interpreter, and this process compiles for CUDA ({told})"
        if not cell.allow_interpreter and cell.n > interpreter_max_len:
            return (f"Triton interpreter on CPU is for correctness only; N > {interpreter_max_len} "
                    "needs --allow-interpreter")
    elif cell.device == "cuda":
        if setting is not None and interpreted():
            return f"TRITON_INTERPRET={setting} is set: triton would run interpreted; unset it to run on CUDA"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if cell.dtype == "bfloat16" and torch.cuda.get_device_capability() < (8, 0):
            return "bfloat16 needs compute capability 8.0 or newer"
    return None
