"""ctxbench: what an attention implementation costs, and what it does to quality, per context length."""

__version__ = "0.1.0"
