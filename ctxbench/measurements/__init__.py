"""The measurement kinds, one package each (ctxbench.core.kinds): importing this registers them.

    kernel/      one attention call on random inputs (`ctxbench sweep`), and its distributed form
    perplexity/  a language model's perplexity with its attention through an implementation
    decode/      the model prefilling and generating greedy tokens through a KV cache
    passkey/     passkey retrieval (`ctxbench passkey`)
    ruler/       RULER-style retrieval and the continuation's perplexity from a KV cache that a
                 policy compressed to a budget (`ctxbench ruler`)

Each package's __init__ declares its kind (flags, fields, columns, plan, weight, label) and
imports nothing heavy; its measure module runs in the worker, its report module draws. The
order here is the order of their cells at each length and of their report sections.
"""

from ctxbench.measurements import kernel, perplexity, passkey, decode, ruler  # noqa: F401  # isort: skip
