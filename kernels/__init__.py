"""Built-in attention implementations, installed as ctxbench.kernels.

Importing this package registers every built-in with ctxbench.registry.
"""

from ctxbench.kernels import naive, sdpa  # noqa: F401
