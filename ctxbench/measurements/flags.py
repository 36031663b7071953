"""The flags and fields more than one measurement kind takes, declared once: the mask (kernel
cells and passkey), the RoPE variants (perplexity and passkey), the corpus (perplexity, decode
and ruler), and where needles go and how many prompts (passkey and ruler)."""

from __future__ import annotations

import os
from typing import Any

from ctxbench.core.flags import Flag
from ctxbench.core.kinds import Field

MASK = Flag("mask", "--mask", None, str, "default: window when --window is given, else causal",
            choices=("none", "causal", "window"))
WINDOW = Flag("window", "--window", None, int, "window W: query i sees keys i-W < j <= i")
SINKS = Flag("sinks", "--sinks", 0, int, "attention sinks: with --mask window, the first S keys stay visible to every "
             "query", show_default=True)
ROPE = Flag("rope", "--rope", "default", str, "RoPE variants, e.g. default,linear:4,dynamic:4,yarn:4",
            show_default=True)
TEXT = Flag("text_path", "--text", None, str, "UTF-8 corpus file for perplexity and ruler's haystack and continuation "
            "(default: CPython's pydoc_data.topics)")
DEPTHS = Flag("depths", "--depths", None, str, "where the key (ruler: the asked needle) goes, as fractions of the "
              "haystack (default: passkey 0,0.25,0.5,0.75,1; ruler 0.5)")
TRIALS = Flag("trials", "--trials", 1, int, "keys (ruler: prompts) per (task, length, depth)", show_default=True)

# Fields of the cells: the RoPE variant a model runs with, a needle's depth (a fraction of the
# haystack) and which prompt of its (length, depth) a cell is.
ROPE_FIELD = Field("rope", "default")
DEPTH_FIELD = Field("depth", numeric=True)
TRIAL_FIELD = Field("trial", numeric=True)


def text_setting(o: Any) -> str:
    """Settings.text from --text: the corpus file's absolute path, "" for the default corpus."""
    return os.path.abspath(o.text_path) if o.text_path else ""


def parse_depths(text: str) -> list[float]:
    """'0,0.5,1' -> [0.0, 0.5, 1.0], each once; ValueError (one line) unless fractions in [0, 1]."""
    try:
        depths = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        depths = []
    if not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"--depths {text!r} must be comma-separated fractions between 0 and 1, e.g. 0,0.5,1")
    return list(dict.fromkeys(depths))


def parse_ropes(text: str) -> list[str]:
    """'default,yarn:4' -> canonical RoPE variants, each once; UsageError for an unknown one."""
    from ctxbench.core.flags import fail
    from ctxbench.models import lm

    items = [t for t in (x.strip() for x in text.split(",")) if t]
    if not items:
        fail("--rope is empty; give e.g. --rope default or --rope default,linear:4,dynamic:4,yarn:4")
    try:
        return list(dict.fromkeys(lm.parse_rope(t) for t in items))
    except lm.ModelError as exc:
        fail(str(exc))
