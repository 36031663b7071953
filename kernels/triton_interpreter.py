"""triton_interpreter: Triton kernels run by Triton's interpreter, whatever was imported first.

Triton chooses between compiling and interpreting when a function is decorated: triton.jit
returns an InterpretedFunction if TRITON_INTERPRET is set at that moment, else a JITFunction,
which only compiles (calling one from Python raises "Cannot call @triton.jit'd outside of the
scope of a kernel"). Triton's own library is decorated the same way when triton is first
imported (tl.max, tl.sum, tl.cdiv and the tensor members x.max(), x.sum(), ... in
triton/language/standard.py). So a process that imported triton before anything set
TRITON_INTERPRET (transformers.modeling_utils, torch.nn.attention.flex_attention and torch's
inductor all import it) holds JITFunctions there, and an interpreted kernel calling tl.max fails.

Here the choice is made at each launch instead (interpreted()), and the kernels of
triton_attention and triton_decode are JITFunctions whatever the environment said at import
(triton_common.jit): compiled launches, and benchmarks/kernel_stats.py, use them as they are.
An interpreted launch
  * runs the kernel's InterpretedFunction twin (launchable(): one per kernel, made once), and
  * happens inside interpreter_scope(), where each JITFunction that interpreted code calls (the
    kernels' helpers, triton's library functions) runs as the InterpretedFunction triton would
    have made of it under TRITON_INTERPRET: JITFunction.__call__, which otherwise only raises,
    calls that twin, and the JITFunctions that triton attached to its tensor class as methods
    (x.max(), x.sum(), ...; a JITFunction does not bind to an instance the way a function
    does) are plain functions calling them, as under TRITON_INTERPRET. Both are restored when
    the last scope open in the process closes.
Compiled launches never enter the scope, and compiling never calls JITFunction.__call__ (triton's
code generator resolves calls between @triton.jit functions itself), so a compiled kernel is
exactly what it was.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any, Callable, Iterator

import torch

# The values of TRITON_INTERPRET that mean "interpret" (triton's own reading of the variable).
TRUE_VALUES = ("1", "true", "on", "yes")


def interpreted() -> bool:
    """Whether Triton kernels launched now run in Triton's interpreter: as TRITON_INTERPRET says
    when it is set (1, true, on or yes: interpret; any other value: compile), else exactly when
    this machine has no CUDA. Read at each call, never at import."""
    value = os.environ.get("TRITON_INTERPRET")
    if value is not None:
        return value.strip().lower() in TRUE_VALUES
    return not torch.cuda.is_available()


# kernel.fn (the Python function) -> its InterpretedFunction. Made once per function: building one
# inspects the function's signature, and helpers are called once per tile of every program.
_TWINS: dict[Callable, Any] = {}


def _twin(kernel: Any) -> Any:
    """The InterpretedFunction of a JITFunction, as triton.jit makes one under TRITON_INTERPRET."""
    twin = _TWINS.get(kernel.fn)
    if twin is None:
        from triton.runtime.interpreter import InterpretedFunction

        twin = _TWINS.setdefault(kernel.fn, InterpretedFunction(kernel.fn))
    return twin


def launchable(kernel: Any, interpret: bool) -> Any:
    """What to launch `kernel` (a JITFunction) through: the kernel itself when compiling, its
    InterpretedFunction twin when interpreting (launch it inside interpreter_scope())."""
    return _twin(kernel) if interpret else kernel


def _call_twin(self: Any, *args: Any, **kwargs: Any) -> Any:
    """JITFunction.__call__ inside interpreter_scope(): a device-function call, interpreted."""
    return _twin(self)(*args, **kwargs)


def _method(kernel: Any) -> Callable:
    """A tensor method calling `kernel` (which then goes through _call_twin), as triton's
    _tensor_member_fn attaches an InterpretedFunction to the tensor class."""

    @functools.wraps(kernel.fn)
    def method(*args: Any, **kwargs: Any) -> Any:
        return kernel(*args, **kwargs)
    return method


class _Routing:
    """The patches of interpreter_scope(), applied while at least one scope is open in the
    process (scopes may nest, and run in several threads) and undone when the last closes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: list[tuple[type, str, Any]] = []  # (class, attribute, its value before)

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0:
                from triton.language.core import tensor
                from triton.runtime.jit import JITFunction

                members = {name: value for name, value in vars(tensor).items() if isinstance(value, JITFunction)}
                self.saved = [(JITFunction, "__call__", vars(JITFunction).get("__call__"))]
                self.saved += [(tensor, name, value) for name, value in members.items()]
                JITFunction.__call__ = _call_twin
                for name, value in members.items():
                    setattr(tensor, name, _method(value))
            self.depth += 1

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                for cls, name, value in reversed(self.saved):
                    if value is None:  # inherited before: drop the override
                        delattr(cls, name)
                    else:
                        setattr(cls, name, value)
                self.saved = []


_ROUTING = _Routing()


@contextlib.contextmanager
def interpreter_scope() -> Iterator[None]:
    """The scope of interpreted launches: within it, @triton.jit functions called from
    interpreted code run interpreted (see the module docstring); restored on leaving."""
    _ROUTING.enter()
    try:
        yield
    finally:
        _ROUTING.exit()


def launch_scope(interpret: bool) -> contextlib.AbstractContextManager:
    """interpreter_scope() when interpret, else a scope that changes nothing (compiled launches)."""
    return interpreter_scope() if interpret else contextlib.nullcontext()
