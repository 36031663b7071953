"""Built-in attention implementations, installed as ctxbench.kernels.

Importing this package registers every built-in with ctxbench.registry.
"""

# First, on its own: triton_attention chooses Triton's interpreter on a machine without CUDA
# (TRITON_INTERPRET=1), which must happen before anything imports triton, and
# torch.nn.attention.bias (which sdpa uses) does.
from ctxbench.kernels import triton_attention  # noqa: F401, I001  # isort: skip

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
