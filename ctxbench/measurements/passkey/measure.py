"""One passkey trial in the worker (ctxbench.measurements.passkey.prompt has the method)."""

from __future__ import annotations

import time
from typing import Any

from ctxbench.core.cell import Cell
from ctxbench.core.registry import Impl, Unsupported
from ctxbench.measurements.passkey.prompt import build_prompt, make_key, score
from ctxbench.models import lm
from ctxbench.models.prepare import prepare


def measure_passkey(impl: Impl, cell: Cell, settings: Any) -> dict[str, Any]:
    """Measure one passkey cell: the model (loaded once per worker) with `cell`'s RoPE variant,
    window and sinks and `impl` as its attention, one prompt of cell.n tokens with the key of
    (settings.seed, n, depth, trial) at cell.depth. Returns the CSV fields with status and message."""
    model, ref = prepare(impl, cell, settings.model)
    tokenizer = lm.load_tokenizer(ref)
    depth, trial = cell.get("depth"), cell.get("trial")
    key = make_key(settings.seed, cell.n, depth, trial)
    try:
        prompt = build_prompt(tokenizer, cell.n, depth, key)
    except ValueError as exc:  # a length below the prompt's overhead
        raise Unsupported(str(exc)) from None
    t0 = time.perf_counter()
    correct, predicted = score(model, tokenizer, prompt, cell.device)  # synchronises: .tolist()
    seconds = time.perf_counter() - t0
    return {"status": "ok", "message": "", "key": key, "predicted": predicted, "correct": int(correct),
            "n_tokens": len(prompt.ids), "model": ref.label,
            "tokens_per_s": len(prompt.ids) / seconds if seconds > 0 else None}
