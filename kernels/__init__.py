"""Built-in attention implementations, installed as ctxbench.kernels.

Importing this package registers every built-in with ctxbench.registry.
"""

from ctxbench.kernels import chunked, flash_attn, naive, ring_attention, sdpa, sliding_window, triton_attention  # noqa: F401
