"""Built-in attention implementations, installed as ctxbench.kernels.

Importing this package registers every built-in with ctxbench.registry.
"""

from ctxbench.kernels import (  # noqa: F401
    chunked,
    flash_attn,
    flashinfer_attention,
    flex,
    naive,
    ring_attention,
    sdpa,
    sliding_window,
    triton_attention,
    triton_decode,
    xformers_attention,
)
