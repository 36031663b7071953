"""The public face of the implementation registry, for plugin authors and users' own kernels::

    from ctxbench.registry import register

    @register("mine", masks=["causal", "window"], kv_cache=True, setup=True)
    def mine(q, k, v, *, causal, window, scale): ...

The registry itself (the contract, the capability checks, plugin and --impl loading) is
ctxbench.core.registry; these are its public names.
"""

from ctxbench.core.registry import (DEVICES, DTYPES, ENTRY_POINT_GROUP, MASKS, MODES, AttentionFn, Impl,
                                    RegistryError, Runner, Unsupported, accepts_sinks, all_impls, get, load_builtins,
                                    load_plugins, load_spec, register, resolve)

__all__ = ["DEVICES", "DTYPES", "ENTRY_POINT_GROUP", "MASKS", "MODES", "AttentionFn", "Impl", "RegistryError",
           "Runner", "Unsupported", "accepts_sinks", "all_impls", "get", "load_builtins", "load_plugins", "load_spec",
           "register", "resolve"]
