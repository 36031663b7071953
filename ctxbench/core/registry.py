"""The attention registry: implementations as plain functions with declared capabilities.

Every implementation follows one contract::

    out = attn(q, k, v, *, causal: bool, window: int | None, scale: float | None[, sinks: int])

* q is [B, Hq, Lq, D]; k and v are [B, Hkv, Lk, D] with Hq % Hkv == 0. Query head h
  reads kv head h // (Hq // Hkv) (grouped-query attention).
* Lq = Lk (prefill) for every implementation; Lq < Lk (decode, chunked prefill against a KV
  cache) only for those that declare ``kv_cache=True``. The queries are the last Lq tokens:
  query i sits at position p = Lk - Lq + i (bottom-right alignment, as FlashAttention >= 2.1
  and transformers' KV cache; not SDPA's is_causal, which is top-left).
* causal: query i sees keys j <= p. window=W: also p - W < j (W keys, itself included). A
  window implies causal. This is transformers' ``sliding_window`` convention.
* sinks=S (attention sinks, StreamingLLM; only with a window, only to implementations that
  declare ``sinks=True``, and passed as a keyword only when S > 0): query i also sees keys
  j < S, i.e. j <= p and (p - W < j or j < S).
* scale defaults to 1/sqrt(D); softmax statistics are kept in fp32 whatever the dtype.
* out is [B, Hq, Lq, D] in q's dtype.
* Ragged batches (``ragged=True``): also ``kv_lens=`` (int32 [B], on q's device): sequence b
  has kv_lens[b] <= Lk real keys, its query i sits at position kv_lens[b] - Lq + i, and the
  keys past kv_lens[b] are padding that must not be read into the result.
* Paged caches (``paged=True``, implies ragged): k and v are pools [pages, page_size, Hkv, D]
  and ``block_table=`` (int32 [B, pages per sequence]) says which page holds sequence b's keys
  [p * page_size, (p + 1) * page_size) (ctxbench.core.kv_layout). An implementation that does not
  declare paged gets the same data made contiguous.

Work done once per shape (a block mask, a plan, a mask tensor, a page table) stays out of the
timed call with a setup step, in the spirit of tritonbench's backends: declare ``setup=True``
and the function becomes the setup step. It takes the same arguments once per cell and
returns the function to time, called as ``run(q, k, v)`` with tensors of the shapes, dtypes
and device it was prepared for (their values may change, e.g. from layer to layer)::

    @register("mine", setup=True)
    def mine(q, k, v, *, causal, window, scale):
        bias = build_bias(q.shape[-2], causal, window)      # once: recorded as setup_ms
        return lambda q, k, v: my_kernel(q, k, v, bias, scale)   # timed: latency_ms

Plain functions (``setup=False``, the default) are called directly and need nothing else.

Implementations declare what they can do with ``@register``; the harness never asks one
for anything it has not declared (such a cell is recorded as ``unsupported``). Users add
their own without editing ctxbench: ``--impl package.module:function`` on the command line
(a plain function, or one decorated with ``@register``), or an installed plugin exposing
an entry point in the group ``ctxbench.attention``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field, replace
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:  # the registry stays importable without torch
    import torch

    from ctxbench.core.masks import Mask

ENTRY_POINT_GROUP = "ctxbench.attention"

DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16", "bfloat16")
MASKS = ("none", "causal", "window")
MODES = ("fwd", "bwd", "fwd+bwd")

AttentionFn = Callable[..., Any]
# What a setup step returns and the harness times: run(q, k, v) -> out.
Runner = Callable[[Any, Any, Any], Any]


class Unsupported(Exception):
    """Raised by an implementation at run time when it refuses a shape it cannot handle.

    The harness records the cell as ``unsupported`` with the exception's message, rather
    than as an error. Example: a pinned SDPA backend that rejects a head dimension.
    """


class RegistryError(ValueError):
    """A user-facing problem resolving an implementation (unknown name, bad spec)."""


@dataclass(frozen=True)
class Impl:
    """One registered attention implementation and what it declares it can do."""

    name: str
    fn: AttentionFn
    devices: frozenset[str] = frozenset(DEVICES)
    dtypes: frozenset[str] = frozenset(DTYPES)
    masks: frozenset[str] = frozenset(MASKS)
    modes: frozenset[str] = frozenset(MODES)
    gqa: bool = True
    exact: bool = True
    # Whether the function takes `sinks=S` (attention sinks beside a window).
    sinks: bool = False
    # Whether it takes fewer queries than keys (Lq < Lk, aligned bottom-right): decode and
    # chunked prefill against a KV cache.
    kv_cache: bool = False
    # Whether it takes `kv_lens=` (int32 [B]: a ragged batch, ctxbench.core.kv_layout), and whether
    # it reads a paged cache (k, v as page pools with `block_table=`; implies ragged).
    ragged: bool = False
    paged: bool = False
    # The most query tokens per sequence it takes (a decode kernel's limit); None: any.
    max_query_len: int | None = None
    # Whether it runs across the ranks of a torch.distributed group, each rank calling it with
    # its shard of the sequence (ctxbench.measurements.kernel.sharded measures such cells; launch with torchrun).
    distributed: bool = False
    # Whether fn is a setup step that returns the function to time (see the module docstring).
    setup: bool = False
    # Devices on which a sweep that names no implementation includes it (None: every device it
    # declares); elsewhere it runs only when named (--impls), e.g. where it is impractically slow.
    default_devices: frozenset[str] | None = None
    description: str = ""
    source: str = ""
    # Optional run-time checks: check(cell) -> None when the cell can run, else the reason.
    check: Callable[[Any], str | None] | None = None
    # Optional: info() -> dict of details worth a column after a run (a chosen config, ...).
    info: Callable[[], dict] | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    def prepare(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask,
                scale: float | None = None, layout: Any = None) -> Runner:
        """The function to time for these shapes under `mask` (ctxbench.core.masks.Mask): run(q, k, v).

        A setup implementation does its per-shape work here (the harness records its cost as
        setup_ms); a plain one is only bound to its arguments. The mask's offset is not an
        argument of the contract: bottom-right alignment fixes it at Lk - Lq, so a mask that
        says otherwise is refused rather than silently ignored. layout: a
        ctxbench.core.kv_layout.KVLayout for ragged or paged cells (its keywords are passed as
        this implementation declares; k and v are then padded tensors or page pools).
        """
        n_k = max(layout.lengths) if layout is not None else k.shape[-2]
        if mask.q_offset != n_k - q.shape[-2]:
            raise ValueError(f"{mask.describe()} does not match {q.shape[-2]} queries against {n_k} keys "
                             "(queries are aligned to the last keys: q_offset must be Lk - Lq)")
        kwargs = mask.contract_kwargs()
        if layout is not None:
            kwargs.update(layout.kwargs(self.ragged, self.paged))
        fn = self.fn
        if self.setup:
            run = fn(q, k, v, scale=scale, **kwargs)
            if not callable(run):
                raise TypeError(f"{self.name} declares setup=True but its setup step returned "
                                f"{type(run).__name__}, not the function to time (run(q, k, v) -> out)")
            return run

        def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Any:
            return fn(q, k, v, scale=scale, **kwargs)
        return run

    def call(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask,
             scale: float | None = None) -> Any:
        """Run the implementation once under `mask`: its setup (if any), then the call."""
        return self.prepare(q, k, v, mask, scale)(q, k, v)

    def in_default_sweep(self, device: str) -> bool:
        """Whether a sweep on `device` that names no implementation includes this one."""
        return device in self.devices and (self.default_devices is None or device in self.default_devices)

    def unsupported_reason(self, cell: Any) -> str | None:
        """Why this implementation can't run `cell` (a ctxbench.core.cell.Cell), or None if it can:
        what it declares, then its own run-time check."""
        reason = self.declared_reason(cell)
        if reason is None and self.check is not None:
            reason = self.check(cell)
        return reason

    def declared_reason(self, cell: Any) -> str | None:
        """Why `cell` is outside what this implementation declares (devices, dtypes, masks,
        modes, GQA, sinks, fewer queries than keys), or None; its run-time check is not consulted."""
        if cell.device not in self.devices:
            return f"{self.name} does not run on {cell.device} (declares {', '.join(sorted(self.devices))})"
        if cell.dtype not in self.dtypes:
            return f"{self.name} does not support {cell.dtype} (declares {', '.join(sorted(self.dtypes))})"
        if cell.mask not in self.masks:
            return f"{self.name} does not support mask={cell.mask} (declares {', '.join(sorted(self.masks))})"
        if cell.mode not in self.modes:
            return f"{self.name} does not support mode={cell.mode} (declares {', '.join(sorted(self.modes))})"
        if cell.heads != cell.kv_heads and not self.gqa:
            return f"{self.name} does not support grouped-query attention (heads {cell.heads} != kv-heads {cell.kv_heads})"
        sinks = getattr(cell, "attn_sinks", 0)
        if sinks > 0 and not self.sinks:
            return f"{self.name} does not support attention sinks (sinks={sinks})"
        if getattr(cell, "is_ragged", False) and not self.ragged:
            return f"{self.name} does not support ragged batches (it does not declare ragged=True)"
        if getattr(cell, "needs_kv_cache", False) and not self.kv_cache:
            return f"{self.name} cannot decode with a KV cache (it does not declare kv_cache=True)"
        q_len = getattr(cell, "q_len", cell.n)
        if self.max_query_len is not None and q_len > self.max_query_len:
            return f"{self.name} takes at most {self.max_query_len} query tokens (got {q_len}; it is a decode kernel)"
        if q_len != cell.n and not self.kv_cache:
            return (f"{self.name} does not support fewer queries than keys ({q_len} queries against {cell.n} keys; "
                    "it does not declare kv_cache=True)")
        return None


_REGISTRY: dict[str, Impl] = {}
_SPECS: dict[str, Impl] = {}
_BUILTINS_LOADED = False
_PLUGINS_LOADED = False


def register(
    name: str,
    *,
    devices: Iterable[str] = DEVICES,
    dtypes: Iterable[str] = DTYPES,
    masks: Iterable[str] = MASKS,
    modes: Iterable[str] = MODES,
    gqa: bool = True,
    exact: bool = True,
    sinks: bool = False,
    kv_cache: bool = False,
    ragged: bool = False,
    paged: bool = False,
    max_query_len: int | None = None,
    distributed: bool = False,
    setup: bool = False,
    default_devices: Iterable[str] | None = None,
    description: str = "",
    check: Callable[[Any], str | None] | None = None,
    info: Callable[[], dict] | None = None,
) -> Callable[[AttentionFn], AttentionFn]:
    """Declare an attention implementation and its capabilities; returns the function unchanged.

    >>> @register("mine", devices=["cpu"], masks=["none", "causal"])
    ... def mine(q, k, v, *, causal, window, scale): ...

    setup=True: the function is a setup step returning run(q, k, v) (see the module docstring).
    kv_cache=True: it takes Lq < Lk queries, aligned to the last keys (see the module docstring).
    ragged=True: it takes kv_lens=; paged=True: it reads page pools with block_table= (and kv_lens=).
    default_devices: where a sweep naming no implementation includes it (default: every device
    it declares); on its other devices it runs only when named.
    """
    for label, values, allowed in (("devices", devices, DEVICES), ("dtypes", dtypes, DTYPES),
                                   ("masks", masks, MASKS), ("modes", modes, MODES)):
        bad = set(values) - set(allowed)
        if bad:
            raise RegistryError(f"register({name!r}): unknown {label} {sorted(bad)}; choose from {list(allowed)}")

    def deco(fn: AttentionFn) -> AttentionFn:
        impl = Impl(
            name=name, fn=fn, devices=frozenset(devices), dtypes=frozenset(dtypes),
            masks=frozenset(masks), modes=frozenset(modes), gqa=gqa, exact=exact, sinks=sinks,
            kv_cache=kv_cache, ragged=ragged or paged, paged=paged, max_query_len=max_query_len,
            distributed=distributed, setup=setup,
            default_devices=None if default_devices is None else frozenset(default_devices), description=description or _first_doc_line(fn), source=f"{fn.__module__}:{fn.__qualname__}",
            check=check, info=info,
        )
        _REGISTRY[name] = impl
        fn.__ctxbench_impl__ = impl  # lets --impl module:function find the declaration
        return fn

    return deco


def accepts_sinks(fn: Callable) -> bool:
    """Whether a plain function takes a `sinks` keyword (or **kwargs)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "sinks" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _first_doc_line(fn: Callable) -> str:
    doc = (fn.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def load_builtins() -> None:
    """Import every module of ctxbench.kernels (the kernels/ folder) once, so that the built-in
    implementations register themselves (a helper module registers nothing; one named with a
    leading underscore is left for the modules that use it). Adding a file to kernels/ adds a
    built-in."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    import pkgutil

    package = importlib.import_module("ctxbench.kernels")
    for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
        if not module.startswith("_"):
            importlib.import_module(f"ctxbench.kernels.{module}")
    _BUILTINS_LOADED = True


def load_plugins() -> list[str]:
    """Load every installed ``ctxbench.attention`` entry point; returns the names that failed.

    An entry point may point at a module (whose import registers functions), at a function
    decorated with @register, or at a plain function, which is registered under the entry
    point's name with default capabilities.
    """
    global _PLUGINS_LOADED
    failed: list[str] = []
    if _PLUGINS_LOADED:
        return failed
    _PLUGINS_LOADED = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the whole tool down
            failed.append(f"{ep.name} ({type(exc).__name__}: {exc})")
            continue
        if callable(obj) and not hasattr(obj, "__ctxbench_impl__"):
            register(ep.name, sinks=accepts_sinks(obj))(obj)
    return failed


def all_impls() -> dict[str, Impl]:
    """Every known implementation (built-ins, plugins and anything registered so far), by name."""
    load_builtins()
    load_plugins()
    return dict(_REGISTRY)


def get(name: str) -> Impl:
    """The implementation registered as `name`; RegistryError listing the known ones if none."""
    impls = all_impls()
    if name not in impls:
        raise RegistryError(f"unknown implementation {name!r}; known: {', '.join(sorted(impls))} "
                            "(or pass --impl package.module:function)")
    return impls[name]


def load_spec(spec: str) -> Impl:
    """Resolve ``package.module:function`` or ``path/to/file.py:function`` to an Impl.

    A function decorated with @register keeps its declaration; a plain function gets the
    default capabilities (every device, dtype, mask and mode; sinks when it takes a `sinks`
    keyword) under the name `spec`.
    The current directory is importable, as it is for ``python -m``.
    """
    if spec.count(":") != 1:
        raise RegistryError(f"--impl {spec!r} is not of the form package.module:function")
    mod_name, fn_name = spec.split(":")
    if not mod_name or not fn_name:
        raise RegistryError(f"--impl {spec!r} is not of the form package.module:function")
    try:
        if mod_name.endswith(".py"):
            path = os.path.abspath(mod_name)
            if not os.path.isfile(path):
                raise RegistryError(f"--impl {spec!r}: no file {mod_name}")
            module_key = "ctxbench_user_" + os.path.splitext(os.path.basename(path))[0]
            s = importlib.util.spec_from_file_location(module_key, path)
            module = importlib.util.module_from_spec(s)
            sys.modules[module_key] = module
            s.loader.exec_module(module)
        else:
            # The user's directory goes after the installed packages, never before them: a
            # checkout's ctxbench/ must not shadow the installed ctxbench.
            where = os.environ.get("CTXBENCH_IMPORT_PATH") or os.getcwd()
            if where not in sys.path and "" not in sys.path:
                sys.path.append(where)
            module = importlib.import_module(mod_name)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"--impl {spec!r}: cannot import {mod_name} ({type(exc).__name__}: {exc})") from None
    fn = module
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RegistryError(f"--impl {spec!r}: {mod_name} has no attribute {fn_name!r}")
    if not callable(fn):
        raise RegistryError(f"--impl {spec!r}: {fn_name} is not callable")
    declared = getattr(fn, "__ctxbench_impl__", None)
    if declared is not None:
        return declared
    impl = Impl(name=spec, fn=fn, sinks=accepts_sinks(fn), description=_first_doc_line(fn), source=spec)
    # Kept apart from the registry: a function named on one command line is not an
    # implementation every later `all_impls()` caller (default sweeps, model tests) should run.
    _SPECS[spec] = impl
    return impl


def resolve(name_or_spec: str) -> Impl:
    """A registered name, a module:function spec (anything with a colon), or a name at a pinned
    revision, `X@<commit>` (ctxbench.core.revisions): X as registered in this process, under that
    name. (A worker measuring X@<commit> has pointed ctxbench.kernels at the revision's kernels/
    first, so there X is the revision's; the driver plans it with the current X's capabilities.)"""
    if ":" in name_or_spec:
        return load_spec(name_or_spec)
    from ctxbench.core import revisions

    base, rev = revisions.split(name_or_spec)
    if rev is not None:
        if not revisions.is_pinned(name_or_spec):
            raise RegistryError(f"{name_or_spec}: an implementation at a revision is planned as X@<commit>; "
                                "pin it first (ctxbench.core.revisions.pin)")
        return replace(get(base), name=name_or_spec)
    return get(name_or_spec)
